"""Validation (table 6) frequencies by hand, and the chain triples -> deltas -> regression -> lexicon ->
validate-features from the CLI on a tiny model: artifacts, counts, Kendall tau equal to scipy's on lexicon.csv,
the manifest; with no feature labelled related, validation says so instead of failing."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from irm.enrichment import Frequencies, compare_groups

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "tiny.yaml"
LAYERS = [1, 3]
RELATED = {1: [2, 5], 3: [0]}


def test_frequencies_hand_worked():
    # 4 inputs, 2 layers x 3 features; inputs 0 and 2 selected.
    codes = np.zeros((4, 2, 3))
    codes[0, 0, 0] = codes[2, 0, 0] = 1.0  # layer A feature 0: active in both selected inputs
    codes[2, 1, 2] = 0.5                   # layer B feature 2: active in one selected input
    codes[1, 1, 1] = codes[3, 1, 1] = 2.0  # layer B feature 1: active only where not selected
    freqs = Frequencies(2, 3)
    freqs.update(codes[:2], np.array([True, False]))
    freqs.update(codes[2:], np.array([True, False]))
    out = freqs.summary([10, 20], {10: [0], 20: [1]})
    assert freqs.n_above == 2 and freqs.n_all == 4
    assert out["related_frequency"] == pytest.approx((1.0 + 0.0) / 2)
    assert out["average_frequency"] == pytest.approx((1.0 + 0.5) / 6)
    assert out["related_frequency_all_inputs"] == pytest.approx((0.5 + 0.5) / 2)
    assert out["per_layer"]["20"] == {"n_related": 1, "related_frequency": 0.0, "average_frequency": 0.5 / 3}
    none = freqs.summary([10, 20], {})
    assert none["related_frequency"] is None and none["average_frequency"] == out["average_frequency"]


def welch(a, b):
    """Welch's t in plain numpy."""
    return (a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))


def exact_one_sided_p(related, other, statistic=None):
    """P(stat(A, B) >= observed) over every way to choose which |related| of the pooled values are A; the statistic
    is Welch's t when both groups have two values or more (compare_groups' test), else the difference of means."""
    import itertools

    if statistic is None:
        statistic = welch if min(len(related), len(other)) >= 2 else (lambda a, b: a.mean() - b.mean())
    pool = np.concatenate([related, other])
    k, n = len(related), len(pool)
    observed = statistic(related, other)
    hits = total = 0
    for chosen in itertools.combinations(range(n), k):
        mask = np.zeros(n, dtype=bool)
        mask[list(chosen)] = True
        total += 1
        hits += statistic(pool[mask], pool[~mask]) >= observed - 1e-12
    return hits / total


def exact_mid_p_z(x, active, selected, total):
    """The normal score of the upper-tail mid-p of x active among `selected` of `total` inputs, `active` of which
    are active (hypergeometric), with the probabilities as exact fractions of binomial coefficients."""
    from fractions import Fraction
    from math import comb

    from scipy.stats import norm

    def pmf(k):
        return Fraction(comb(active, k) * comb(total - active, selected - k), comb(total, selected))

    upper = sum((pmf(k) for k in range(x + 1, min(active, selected) + 1)), Fraction(0)) + pmf(x) / 2
    return float(norm.isf(float(upper))) if upper < Fraction(1, 2) else float(norm.ppf(float(1 - upper)))


def test_enrichment_z_against_exact_fractions_in_both_tails():
    from irm.enrichment import enrichment_z

    cases = [(3, 4, 15, 40), (0, 7, 15, 40), (12, 20, 15, 40), (0, 300, 100, 1000), (95, 300, 100, 1000),
             (5, 395, 5, 400), (0, 395, 5, 400)]
    got = enrichment_z(*(np.array(c) for c in zip(*[(x, a) for x, a, _, _ in cases[:3]])), 15, 40)
    for (x, a, k, n), z in zip(cases[:3], got):
        assert z == pytest.approx(exact_mid_p_z(x, a, k, n), rel=1e-9)
    for x, a, k, n in cases[3:]:  # far out in a tail: finite and exact
        z = enrichment_z(np.array([x]), np.array([a]), k, n)[0]
        assert np.isfinite(z) and z == pytest.approx(exact_mid_p_z(x, a, k, n), rel=1e-6), (x, a, z)


def test_lift_and_permutation_p_against_an_exact_enumeration():
    related = np.array([0.30, 0.45, 0.25])
    other = np.array([0.10, 0.05, 0.20, 0.15, 0.12, 0.33, 0.08])
    got = compare_groups(related, other)
    assert got["lift"] == pytest.approx(related.mean() / other.mean())
    assert got["difference"] == pytest.approx(related.mean() - other.mean())
    assert got["n_related"] == 3 and got["n_other"] == 7
    want = exact_one_sided_p(related, other)  # C(10, 3) = 120 partitions: scipy enumerates them
    assert want < 0.05
    assert got["p_value"] == pytest.approx(want)
    assert got["p_value_less"] == pytest.approx(exact_one_sided_p(-related, -other))  # the other tail
    # Related features that fire less: the one-sided p is large, the lift below 1.
    flipped = compare_groups(other[:3], np.concatenate([related, other[3:]]))
    assert flipped["lift"] < 1 and flipped["p_value"] == pytest.approx(
        exact_one_sided_p(other[:3], np.concatenate([related, other[3:]])))
    assert flipped["p_value"] > 0.5
    # One feature in a group (scipy needs two): enumerated by hand, still equal to the exact enumeration.
    for a, b in ((related[:1], other), (related, other[5:6])):
        assert compare_groups(a, b)["p_value"] == pytest.approx(exact_one_sided_p(a, b))
        assert compare_groups(a, b)["p_value_less"] == pytest.approx(exact_one_sided_p(-a, -b))


def test_lift_compares_with_other_explained_features_not_every_feature():
    """Dead features pull 'the average feature' down; the control group is the other explained features only."""
    codes = np.zeros((10, 1, 6))
    codes[:8, 0, 0] = 1.0  # related feature 0: 8 of 10 inputs
    codes[:8, 0, 1] = 1.0  # other explained feature 1: as often
    codes[:2, 0, 2] = 1.0  # other explained feature 2: 2 of 10
    freqs = Frequencies(1, 6)
    freqs.update(codes, np.ones(10, dtype=bool))  # features 3-5 never fire and were not explained
    related, other = freqs.per_feature([7], {7: [0]}), freqs.per_feature([7], {7: [1, 2]})
    np.testing.assert_allclose(related, [0.8])
    np.testing.assert_allclose(other, [0.8, 0.2])
    got = compare_groups(related, other)
    assert got["lift"] == pytest.approx(0.8 / 0.5)
    assert freqs.summary([7], {7: [0]})["average_frequency"] == pytest.approx(1.8 / 6)  # the paper's control
    assert got["p_value"] == pytest.approx(exact_one_sided_p(related, other))  # 1/3: not distinguishable


def test_lift_without_another_explained_feature_is_none():
    got = compare_groups(np.array([0.5]), np.zeros(0))
    assert got["lift"] is None and got["p_value"] is None and got["n_other"] == 0


def build_upstream(cfg):
    """What the stages before `triples` leave in a run directory, made with the owners' public functions: a tuned
    policy (the tiny model, saved), each chosen layer's 1x SAE, and explanations labelling some features."""
    from irm.artifacts import append_jsonl
    from irm.models import load_model, site_width
    from irm.sae import SparseAutoencoder, sae_dir, save_sae

    root = Path(cfg.run_dir)
    model, tokenizer = load_model(cfg.model, seed=cfg.seed)
    model.save_pretrained(root / "rlhf" / "policy")
    tokenizer.save_pretrained(root / "rlhf" / "policy")
    torch.manual_seed(0)
    width = site_width(model, "mlp_out")
    for layer in LAYERS:
        save_sae(SparseAutoencoder(width, width), sae_dir(root, layer, 1), layer=layer)
        for index in range(width):
            append_jsonl(root / "explanations.jsonl", {"layer": layer, "dictionary": "x1", "role": "small",
                                                       "index": index, "label": int(index in RELATED[layer])})


ARGS = ["--cache.layers", json.dumps(LAYERS), "--triples.n", "40", "--regression.epochs", "3",
        "--lexicon.max_words", "300", "--lexicon.bootstrap", "50", "--validate_features.n_inputs", "20"]


def run_chain(cfg, stages):
    from irm.cli import main

    for stage in stages:
        main([stage, "--config", str(TINY_YAML), "--run_dir", cfg.run_dir, *ARGS])


def independent_codes(root, ids, position):
    """SAE codes at one position of one unpadded sequence, computed without the stage's batching: layer 1 from a
    plain forward, layer 3 from a forward with only layer 1's SAE spliced in."""
    from irm.models import capture, load_pretrained, splice
    from irm.sae import load_sae, sae_dir

    model, _ = load_pretrained(root / "rlhf" / "policy")
    sae1, sae3 = (load_sae(sae_dir(root, layer, 1)) for layer in LAYERS)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        with capture(model, [1]) as acts:
            model(input_ids=input_ids)
        codes1 = sae1.encode(acts[1][0, position])
        with splice(model, {1: lambda out: sae1.decode(sae1.encode(out))}), capture(model, [3]) as acts:
            model(input_ids=input_ids)
        codes3 = sae3.encode(acts[3][0, position])
    return codes1, codes3


def independent_selection(cfg, root):
    """Every validation input (eval text position but the first) as (R's output on the lexicon scale, active
    features [position, layer-major feature]), computed one unpadded text at a time, without the stage's code."""
    from irm.data import load_texts
    from irm.models import capture, load_pretrained, splice
    from irm.readers import load_irm
    from irm.sae import load_sae, sae_dir

    model, tokenizer = load_pretrained(root / "rlhf" / "policy")
    sae1, sae3 = (load_sae(sae_dir(root, layer, 1)) for layer in LAYERS)
    weight, bias, _ = load_irm(root)
    lo, hi = json.loads((root / "kendall.json").read_text())["mapping"]["raw_at_percentiles"]
    scaled, active = [], []
    for text in load_texts(cfg.corpus, cfg.corpus.eval_split, seed=cfg.seed, n=20):
        ids = tokenizer(text, truncation=True, max_length=cfg.cache.max_length)["input_ids"]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            with capture(model, [1]) as acts:
                model(input_ids=torch.tensor([ids]))
            codes1 = sae1.encode(acts[1][0, 1:])
            with splice(model, {1: lambda out: sae1.decode(sae1.encode(out))}), capture(model, [3]) as acts:
                model(input_ids=torch.tensor([ids]))
            codes3 = sae3.encode(acts[3][0, 1:])
        x = torch.cat([codes1, codes3], dim=1).double()
        raw = (x @ weight.double().flatten() + float(bias)).numpy()
        scaled.append(np.clip(-4 + 8 * (raw - lo) / (hi - lo), -4, 4))
        active.append((x > 0).numpy())
    return np.concatenate(scaled), np.concatenate(active)


def test_chain_from_the_cli_on_a_tiny_model(tiny_cfg, capsys, monkeypatch):
    from safetensors.torch import load_file
    from scipy.stats import kendalltau

    from irm.stages import deltas as deltas_stage
    from irm.artifacts import RunDir
    from irm.readers import load_irm

    monkeypatch.setattr(deltas_stage, "SHARD_TRIPLES", 16)  # 40 triples -> shards of 16, 16, 8
    build_upstream(tiny_cfg)
    run_chain(tiny_cfg, ["triples", "deltas"])
    root = Path(tiny_cfg.run_dir)

    # Deltas rows against codes computed one unpadded sequence at a time.
    triples = [json.loads(line) for line in (root / "triples.jsonl").read_text().splitlines()]
    shard = load_file(str(root / "deltas" / "shard-00000.safetensors"))
    for t in triples[:3]:
        codes = {v: independent_codes(root, t["ids"][v], t["positions"][v][0]) for v in ("positive", "neutral",
                                                                                          "negative")}
        row = 2 * t["id"]
        torch.testing.assert_close(shard["x"][row], torch.cat(codes["positive"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shard["x"][row + 1], torch.cat(codes["negative"]), atol=1e-5, rtol=1e-5)
        plus = sum((p - n).norm() for p, n in zip(codes["positive"], codes["neutral"]))
        minus = -sum((m - n).norm() for m, n in zip(codes["negative"], codes["neutral"]))
        assert float(plus) > 0 and float(shard["y"][row]) == pytest.approx(float(plus), rel=1e-4)
        assert float(shard["y"][row + 1]) == pytest.approx(float(minus), rel=1e-4)

    # An interrupted deltas run (one shard on disk) resumes and ends with the same shards.
    manifest_path = root / "deltas" / "manifest.json"
    full = json.loads(manifest_path.read_text())
    assert [s["rows"] for s in full["shards"]] == [32, 32, 16]
    manifest_path.write_text(json.dumps({**full, "shards": full["shards"][:1], "complete": False}))
    (root / "deltas" / "shard-00001.safetensors").unlink()
    kept = (root / "deltas" / "shard-00000.safetensors").stat().st_mtime_ns
    run_chain(tiny_cfg, ["deltas"])
    assert (root / "deltas" / "shard-00000.safetensors").stat().st_mtime_ns == kept  # not recomputed
    resumed = json.loads(manifest_path.read_text())
    assert resumed["complete"] and [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in full["shards"]]

    run_chain(tiny_cfg, ["regression", "lexicon", "validate-features"])
    printed = capsys.readouterr().out

    info = json.loads((root / "triples.json").read_text())
    assert info["n_triples"] == 40 and "40 triples" in printed
    assert info["heldout"]["n_positive"] > 0 and "multi-token words skipped" in printed
    deltas = json.loads((root / "deltas" / "manifest.json").read_text())
    assert deltas["complete"] and deltas["rows"] == 80 and deltas["layers"] == LAYERS
    weight, _, layers = load_irm(root)
    assert layers == LAYERS and weight.numel() == deltas["n_features"] == 2 * 64

    with open(root / "lexicon.csv") as f:
        rows = list(csv.DictReader(f))
    kendall = json.loads((root / "kendall.json").read_text())
    assert len(rows) == kendall["all"]["n"] == kendall["words_evaluated"] <= 300
    tau = kendalltau([float(r["true"]) for r in rows], [float(r["raw"]) for r in rows])
    assert kendall["all"]["tau"] == pytest.approx(tau.statistic, abs=1e-12)
    assert kendall["all"]["p"] == pytest.approx(tau.pvalue, rel=1e-9)
    assert kendall["heldout"]["n"] == sum(r["heldout"] == "1" for r in rows) > 0
    assert kendall["negative"]["n"] == sum(float(r["true"]) < 0 for r in rows)

    val = json.loads((root / "validation.json").read_text())
    assert val["n_texts"] == 20 and val["n_related"] == 3 and val["related"] == {"1": [2, 5], "3": [0]}
    # R's selection recomputed without the stage: one unpadded text at a time, R's weights on the codes, the mapping
    # written out by hand; then at a threshold that splits the inputs, which inputs R selects and how often the
    # related features fire among them
    scaled, active = independent_selection(tiny_cfg, root)
    assert val["n_inputs"] == len(scaled) and val["n_inputs_above"] == int((scaled > 3.0).sum())
    ordered = np.sort(scaled)
    middle = ordered[len(ordered) // 4: 3 * len(ordered) // 4]
    gap = int(np.argmax(np.diff(middle)))
    assert middle[gap + 1] - middle[gap] > 1e-3  # batching noise cannot move an input across it
    split = float((middle[gap] + middle[gap + 1]) / 2)
    from irm.cli import main

    main(["validate-features", "--force", "--config", str(TINY_YAML), "--run_dir", tiny_cfg.run_dir, *ARGS,
          "--validate_features.threshold", repr(split)])
    val_split = json.loads((root / "validation.json").read_text())
    chosen = scaled > split
    assert 0 < val_split["n_inputs_above"] == int(chosen.sum()) < len(scaled)
    related_columns = [*RELATED[1], 64 + RELATED[3][0]]
    assert val_split["related_frequency"] == pytest.approx(float(active[chosen][:, related_columns].mean()), abs=1e-9)
    assert val_split["average_frequency"] == pytest.approx(float(active[chosen].mean()), abs=1e-9)
    # each feature's enrichment over its own base rate, by hand; features that never fire have none
    base = active.mean(axis=0)
    lifted = np.where(base > 0, active[chosen].mean(axis=0) / np.where(base > 0, base, 1), np.nan)
    other_columns = [c for c in range(2 * 64) if c not in related_columns]
    e = val_split["vs_other_explained"]["enrichment over base rate"]
    assert e["related_enrichment"] == pytest.approx(np.nanmean(lifted[related_columns]), abs=1e-9)
    assert e["other_enrichment"] == pytest.approx(np.nanmean(lifted[other_columns]), abs=1e-9)
    # the verdict's z-scores: each feature's hypergeometric mid-p among the selected inputs, in exact fractions
    n_all, n_sel = len(scaled), int(chosen.sum())
    z = np.full(active.shape[1], np.nan)
    for c in range(active.shape[1]):
        a, x = int(active[:, c].sum()), int(active[chosen, c].sum())
        if 0 < a < n_all:
            z[c] = exact_mid_p_z(x, a, n_sel, n_all)
    assert e["related_frequency"] == pytest.approx(np.nanmean(z[related_columns]), abs=1e-9)
    assert e["other_frequency"] == pytest.approx(np.nanmean(z[other_columns]), abs=1e-9)
    assert e["n_undefined"] == int(np.isnan(z).sum())
    assert val_split["label_methods"] == [] and val_split["circular"] is None  # labels written without a method
    main(["validate-features", "--force", "--config", str(TINY_YAML), "--run_dir", tiny_cfg.run_dir, *ARGS])
    val = json.loads((root / "validation.json").read_text())
    assert 0.0 < val["average_frequency_all_inputs"] < 1.0
    vs = val["vs_other_explained"]["all inputs"]
    assert vs["n_related"] == 3 and vs["n_other"] == 2 * 64 - 3  # every other feature was explained, labelled 0
    assert val["other"]["1"] == [i for i in range(64) if i not in RELATED[1]]
    stages = RunDir(root).manifest()["stages"]
    assert {"triples", "deltas", "regression", "lexicon", "validate-features"} <= set(stages)

    # No feature labelled related: validation writes that plainly.
    lines = (root / "explanations.jsonl").read_text().splitlines()
    (root / "explanations.jsonl").write_text(
        "".join(json.dumps({**json.loads(line), "label": 0}) + "\n" for line in lines))
    from irm.cli import main

    main(["validate-features", "--force", "--config", str(TINY_YAML), "--run_dir", tiny_cfg.run_dir, *ARGS])
    val = json.loads((root / "validation.json").read_text())
    assert val["n_related"] == 0 and val["related_frequency"] is None and "no feature" in val["note"]


def test_stages_without_inputs_exit_2_with_one_line(in_tmp, capsys):
    from irm.cli import main

    for stage in ("triples", "deltas", "regression", "lexicon", "validate-features"):
        with pytest.raises(SystemExit) as exit_:
            main([stage, "--config", str(TINY_YAML), "--run_dir", str(in_tmp / "run"), *ARGS])
        err = capsys.readouterr().err
        assert exit_.value.code == 2, err
        assert len(err.strip().splitlines()) == 1 and "first" in err, err


@pytest.mark.slow
def test_whole_chain_from_scratch_on_the_tiny_config(tmp_path):
    """Every stage from PPO to validation as separate CLI processes on configs/tiny.yaml (minutes)."""
    stages = ["rlhf", "divergence", "cache", "sae", "dictionaries", "explain", "triples", "deltas", "regression",
              "lexicon", "validate-features"]
    for stage in stages:
        out = subprocess.run([sys.executable, "-m", "irm", stage, "--config", str(TINY_YAML), "--run_dir", "run"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=900)
        assert out.returncode == 0, (stage, out.stderr[-2000:])
    root = tmp_path / "run"
    for name in ("triples.jsonl", "triples.json", "deltas/manifest.json", "regression/regression.safetensors",
                 "lexicon.csv", "kendall.json", "validation.json"):
        assert (root / name).is_file(), name
    kendall = json.loads((root / "kendall.json").read_text())
    assert kendall["all"]["n"] > 1000 and kendall["heldout"]["n"] > 100
