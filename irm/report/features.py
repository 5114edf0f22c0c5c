"""The report's feature sections: the shared features' explanations, labels and scores (paper tables 2, 8, 9) and a
page per feature (irm/templates/feature_dashboard.html.j2)."""

from __future__ import annotations

from typing import Optional

from irm.report.doc import Doc, templates
from irm.report.tables import ReportInputs
from irm.report.text import ci, fmt, percent

HIST_W, HIST_H = 260, 90  # px: the dashboard's activation histogram


def features_section(doc: Doc, r: ReportInputs) -> None:
    """Tables 2, 8, 9: the shared features' explanations, labels, detection and fuzzing scores; a page per shared
    feature."""
    from irm.explain.features import NOT_EXPLAINED

    pages = r.load("explanations") or []
    # Related features first, then by layer, dictionary and how well the feature is matched in the other dictionary.
    pages = sorted(pages, key=lambda f: (f.get("label") != 1, f.get("status") == NOT_EXPLAINED, f.get("layer", 0),
                                         f.get("dictionary", ""), -((f.get("pair") or {}).get("cosine") or 0.0)))
    feats = [f for f in pages if f.get("status") != NOT_EXPLAINED]
    doc.heading("Shared features, their descriptions and reward labels (paper tables 2, 8, 9)")
    if feats:
        methods = sorted({f["label_method"] for f in feats if f.get("label_method")})
        doc.table(
            ["layer", "dictionary", "feature", "explanation", "related to reward", "detection score",
             "fuzzing score"],
            [[f.get("layer"), f.get("dictionary"), f.get("index"),
              f.get("explanation") or (f"[{f.get('status', 'unparsed')}] {f.get('rejected_explanation') or ''}"
                                       .strip()),
              {1: "yes", 0: "no"}.get(f.get("label"), f.get("status") or "unparsed"), _score(f), _score(f, "fuzz")]
             for f in feats],
            caption=f"explainer: {feats[0].get('backend')} / {feats[0].get('model')}; labels: "
                    f"{'; '.join(methods) or 'n/a'}; detection score: accuracy of the explainer predicting from the "
                    "explanation which texts activate the feature; fuzzing score: accuracy of telling windows with "
                    "the firing tokens highlighted from the same windows with random tokens highlighted; 'at chance': "
                    "the 95% Clopper-Pearson interval over the feature's texts holds 0.5",
        )
        scores = r.load("explain_scores") or {}
        means = [(name, s) for name, s in (("detection", scores), ("fuzzing", scores.get("fuzz") or {}))
                 if (s.get("mean") or {}).get("accuracy") is not None]
        if means:
            doc.para("Mean accuracy over the features scored: " + "; ".join(
                f"{name} {fmt(s['mean']['accuracy'])} {ci({'ci95': s.get('accuracy_ci95')})} over "
                f"{s.get('n_scored')} features ({s.get('n_at_chance')} at chance)"
                + (", at chance (the t interval over features holds 0.5)" if s.get("at_chance") else "")
                for name, s in means) + ".")
        statuses = {}
        for f in feats:
            statuses[f.get("status", "ok")] = statuses.get(f.get("status", "ok"), 0) + 1
        unusable = {k: v for k, v in statuses.items() if k != "ok"}
        if unusable:
            doc.para("Not explained (never labelled related): "
                     + "; ".join(f"{n} {k}" for k, n in sorted(unusable.items())) + ".")
    if len(pages) > len(feats):
        doc.para(f"{len(pages) - len(feats)} more features of the shared pairs have a page below but no explanation "
                 "(beyond explain.max_features).")
    if pages:
        dashboard_section(doc, pages)
    else:
        doc.para("Not run.")


def _score(f: dict, key: str = "score") -> str:
    """A feature's detection (`score`) or fuzzing (`fuzz`) accuracy: n/a when it was not scored, 'unparsed' when the
    scorer's answer was not, marked 'at chance' when its interval holds 0.5."""
    s = f.get(key)
    if not isinstance(s, dict):
        return "n/a"
    if s.get("accuracy") is None:
        return "unparsed"
    return fmt(s["accuracy"]) + (" (at chance)" if s.get("at_chance") else "")


def _score_detail(s: Optional[dict]) -> Optional[dict]:
    """A score for the feature page: accuracy, its interval, F1, the set's size and the at-chance mark."""
    if not isinstance(s, dict):
        return None
    if s.get("accuracy") is None:
        return {"text": "unparsed" + (f" ({s['unscored_reason']})" if s.get("unscored_reason") else ""),
                "at_chance": False}
    interval = s.get("ci95")
    return {"text": f"accuracy {fmt(s['accuracy'])}" + (f" [{fmt(interval[0])}, {fmt(interval[1])}]" if interval
                                                        else "")
                    + f", F1 {fmt(s.get('f1'))}, {s.get('n_active', 0) + s.get('n_inactive', 0)} texts",
            "at_chance": bool(s.get("at_chance"))}


def _histogram_svg(h: Optional[dict], caption: Optional[str] = None, height: int = HIST_H) -> Optional[dict]:
    """Bar geometry of a histogram ({edges, counts}) for the dashboard template."""
    if not h or not h.get("counts") or not sum(h["counts"]):
        return None
    counts, edges = h["counts"], h["edges"]
    top, w = max(counts), HIST_W / len(counts)
    bars = [{"x": round(i * w, 1), "w": round(max(w - 1, 1), 1), "h": round(height * c / top, 1),
             "y": round(height - height * c / top, 1),
             "title": f"{edges[i]:.3g} to {edges[i + 1]:.3g}: {c}"} for i, c in enumerate(counts)]
    return {"bars": bars, "width": HIST_W, "height": height, "min": f"{edges[0]:.3g}", "max": f"{edges[-1]:.3g}",
            "caption": caption or f"max activation per window ({h.get('windows_active')} of {h.get('windows')} "
                                  "windows fire)"}


def _density(d: Optional[dict]) -> Optional[str]:
    if not d:
        return None
    text = (f"fires on {percent(d.get('tokens'))} of tokens ({d.get('tokens_active')} of {d.get('tokens_total')} "
            f"cached) and {percent(d.get('windows'))} of windows")
    where = d.get("held_out_of", "the SAE's held-out tokens")
    return text + (f"; {percent(d['held_out'])} of {where}" if d.get("held_out") is not None else "")


def _window(r: dict, peak: float, gap: str) -> dict:
    """One record as shaded tokens; a quantile window says which bin it was drawn from."""
    b = r.get("bin")
    title = (f"drawn from windows with max {b[0]:.3g} to {b[1]:.3g} ({percent(b[2])} of the activating windows)"
             if b else "")
    return {"kind": r.get("kind", ""), "title": title,
            "tokens": [{"text": t + gap, "value": f"{a:.3g}",
                        "alpha": round(min(max(a, 0.0) / peak, 1.0), 3) if peak > 0 else 0.0}
                       for t, a in zip(r["tokens"], r["activations"])]}


def _dashboard(f: dict) -> dict:
    """One feature's page as the dashboard template's context."""
    from irm.explain.records import token_gap

    records = f.get("records") or []
    peak = max([a for r in records for a in r.get("activations", [])] + [0.0])
    # Word-level tokenizers decode tokens without their spaces (BPE ones keep a leading space): put one back.
    gap = token_gap(r.get("tokens", []) for r in records)
    lens = f.get("logit_lens") or {}
    promoted, suppressed = lens.get("promoted") or [], lens.get("suppressed") or []
    pair = f.get("pair") or {}
    return {"layer": f.get("layer"), "dictionary": f.get("dictionary"), "index": f.get("index"),
            "label": f.get("label"), "status": f.get("status") or "unparsed", "score": _score(f),
            "detection": _score_detail(f.get("score")), "fuzzing": _score_detail(f.get("fuzz")),
            "label_method": f.get("label_method"), "explanation": f.get("explanation"),
            "rejected": f.get("rejected_explanation") or (f.get("note") if f.get("explanation") is None else None),
            "max_activation": fmt(f.get("max_activation")), "density": _density(f.get("density")),
            "pair": f"{pair.get('dictionary')} #{pair.get('index')}, cosine {fmt(pair.get('cosine'))}" if pair else "",
            "kind": f"{f.get('role')} latent",
            "windows": [_window(r, peak, gap) for r in records if r.get("kind") == "top"],
            "quantiles": [_window(r, peak, gap) for r in records if r.get("kind") == "quantile"],
            "hist": _histogram_svg(f.get("histogram")),
            "logit_hist": _histogram_svg(lens.get("histogram"), "effect on every token's logit (vocabulary count)",
                                         height=50),
            "lens_method": lens.get("method"), "lens_note": lens.get("note") or "not computed",
            "promoted": promoted,
            "lens_rows": [((p[0], f"{p[1]:+.2f}"), (s[0], f"{s[1]:+.2f}")) for p, s in zip(promoted, suppressed)]}


SHARED_INTRO = ("Per feature of the shared pairs: its activation density, its top-activating windows and one window "
                "from each lower quantile bin with each token shaded by its activation (hover for the value), the "
                "histogram of its largest activation per window, the tokens its decoder direction promotes and "
                "suppresses directly through the unembedding (logit effect), and its explanation with its label and "
                "its detection and fuzzing scores (95% interval over the feature's texts; 'at chance' when it holds "
                "0.5, what guessing gets on these balanced sets). The same pages in SAEDashboard's Neuronpedia "
                "format: explain/neuronpedia/.")


def dashboard_section(doc: Doc, feats: list[dict], heading: str = "Feature dashboards", intro: str = SHARED_INTRO,
                      where: str = "; SAEDashboard/Neuronpedia JSON in explain/neuronpedia/") -> None:
    """A page per feature (Neuronpedia / SAEDashboard style), rendered from a Jinja2 template into the HTML; the
    Markdown points there (and `where` else the pages' data lives)."""
    from irm.explain.features import NOT_EXPLAINED

    boards = [_dashboard(f) for f in feats]
    doc.heading(heading, 3)
    doc.raw(templates().get_template("feature_dashboard.html.j2").render(intro=intro, features=boards,
                                                                         not_explained=NOT_EXPLAINED),
            f"{len(feats)} feature dashboards (density, top and quantile windows, histogram, logit effect, "
            f"explanation and scores): see report.html{where}.")
