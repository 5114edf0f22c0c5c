"""Model diffing's findings (issue 27): the enrichment test of the tuned-specific latents against an exhaustive
permutation count, the streamed word shares against one pass in numpy, the word marks, the findings rows and the
report's comparison with the paper's instruments."""

import itertools
import json

import numpy as np
import pytest
import torch

from irm.diff.enrichment import enrichment_test, lean_test, marked_mass, shares, top_words, word_marks
from irm.findings import CONTRADICTED, NOT_DISTINGUISHABLE, NOT_TESTED, SUPPORTED


def _exact_p(groups, observed):
    """Exhaustive stratified permutation p (greater) of mean(specific) - mean(shared): every way to give each layer
    its number of specific labels."""
    hits = total = 0
    layer_choices = [itertools.combinations(range(len(v)), int(s.sum())) for v, s in groups]
    values = np.concatenate([v for v, _ in groups])
    for combo in itertools.product(*layer_choices):
        flags = np.concatenate([np.isin(np.arange(len(v)), c) for (v, _), c in zip(groups, combo)])
        total += 1
        hits += values[flags].mean() - values[~flags].mean() >= observed - 1e-12
    return hits / total


def test_enrichment_test_matches_an_exhaustive_stratified_permutation_count():
    a_share = np.array([0.9, 0.1, 0.2, 0.15, 0.12, 0.3])
    a_class = np.array(["tuned-specific"] + ["shared"] * 5, dtype=object)
    b_share = np.array([0.5, 0.4, 0.05, 0.1, np.nan, 0.8])
    b_class = np.array(["tuned-specific", "shared", "shared", "partial", "shared", "tuned-only artifact"],
                       dtype=object)
    e = enrichment_test([(a_share, a_class), (b_share, b_class)], permutations=20000, seed=1)
    # only live tuned-specific and shared latents count: the partial, the dead (NaN) and the artifact are left out
    spec, shared = [0.9, 0.5], [0.1, 0.2, 0.15, 0.12, 0.3, 0.4, 0.05]
    assert (e["tuned_specific"], e["shared"]) == (2, 7)
    assert e["difference"] == pytest.approx(np.mean(spec) - np.mean(shared))
    groups = [(np.array([0.9, 0.1, 0.2, 0.15, 0.12, 0.3]), np.array([1, 0, 0, 0, 0, 0], bool)),
              (np.array([0.5, 0.4, 0.05]), np.array([1, 0, 0], bool))]
    exact = _exact_p(groups, e["difference"])
    assert exact == pytest.approx(1 / 18)  # the observed labelling is the most extreme of the 6 x 3
    assert e["p_greater"] == pytest.approx(exact, abs=0.01)
    assert e["p_less"] == pytest.approx(1.0, abs=0.01)


def test_enrichment_test_has_nothing_to_compare_without_a_tuned_specific_latent():
    e = enrichment_test([(np.array([0.1, 0.2]), np.array(["shared", "partial"], dtype=object))])
    assert e["tuned_specific"] == 0 and e["difference"] is None and e["p_greater"] is None


def test_lean_test_is_the_weighted_spearman_rho_with_an_exhaustive_permutation_p():
    from scipy.stats import spearmanr

    delta_a, share_a = np.array([0.3, -0.1, 0.5, 0.0, -0.4]), np.array([0.4, 0.1, 0.9, 0.2, 0.25])
    delta_b = np.array([0.1, 0.2, -0.3, 0.9])
    share_b = np.array([0.2, np.nan, 0.1, 0.3])  # the NaN: a dead latent, left out
    t = lean_test([(delta_a, share_a), (delta_b, share_b)], permutations=20000, seed=2)
    rho_a = spearmanr(delta_a, share_a).statistic
    live = np.isfinite(share_b)
    rho_b = spearmanr(delta_b[live], share_b[live]).statistic
    assert t["latents"] == 8 and t["rho"] == pytest.approx((5 * rho_a + 3 * rho_b) / 8)
    hits = total = 0  # every permutation of the shares within each layer: 120 x 6
    rb_all = [spearmanr(delta_b[live], share_b[live][list(pb)]).statistic for pb in itertools.permutations(range(3))]
    for pa in itertools.permutations(range(5)):
        ra = spearmanr(delta_a, share_a[list(pa)]).statistic
        for rb in rb_all:
            total += 1
            hits += (5 * ra + 3 * rb) / 8 >= t["rho"] - 1e-12
    assert t["p_greater"] == pytest.approx(hits / total, abs=0.01)
    assert lean_test([(np.zeros(2), np.full(2, np.nan))])["rho"] is None


def test_marked_mass_streamed_over_batches_equals_one_pass_in_numpy():
    from irm.diff.model import Crosscoder

    torch.manual_seed(0)
    cc = Crosscoder(8, 16, activation="batchtopk", k=3)
    cc.threshold.fill_(0.05)  # the per-token inference rule: codes do not depend on the batching
    x = torch.randn(100, 2, 8)
    token_ids = torch.randint(0, 7, (100,))
    marks = token_ids < 3
    m = marked_mass(cc, [x[i:i + 32] for i in range(0, 100, 32)], token_ids, marks, track=[2, 5])
    with torch.no_grad():
        codes = cc.encode(x).double().numpy()
    assert m["marked"] == pytest.approx(codes[marks.numpy()].sum(axis=0))
    assert m["mass"] == pytest.approx(codes.sum(axis=0))
    for j in (2, 5):
        expected = {t: codes[token_ids.numpy() == t, j].sum() for t in range(7)}
        assert m["tokens"][j] == pytest.approx({t: v for t, v in expected.items() if v > 0})
    s = shares(m["marked"], m["mass"])
    fired = codes.sum(axis=0) > 0
    assert s[fired] == pytest.approx(codes[marks.numpy()].sum(axis=0)[fired] / codes.sum(axis=0)[fired])
    assert np.isnan(s[~fired]).all()
    with pytest.raises(ValueError, match="rows"):
        marked_mass(cc, [x], token_ids[:50], marks[:50])


class _Vocab:
    """A tokenizer's decode over a fixed vocabulary (what word_marks reads of a tokenizer)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_word_marks_match_whole_tokens_case_and_space_insensitively():
    vocab = _Vocab([" Good", "good", " bad", "ly", " table", " No", "no"])
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 4])
    marks = word_marks(ids, vocab, ["good", "no"])
    assert marks.tolist() == [True, True, False, False, False, True, True, False]
    words = top_words(vocab, {0: 3.0, 1: 1.0, 4: 4.0})
    assert sorted(words) == [("good", 0.5), ("table", 0.5)]  # " Good" and "good" are one word


def _diff_json(tmp_path, specific, enrichment):
    from irm.stages import relpath

    layer = {"latents": 100, "tuned_specific": specific, "held_out_rows": 500,
             "fractions": {"tuned-specific": len(specific) / 100, "shared": 0.9, "tuned-only artifact": 0.01,
                           "base-specific": 0.0, "partial": 0.0, "base-only artifact": 0.0, "dead": 0.1 - len(specific) / 100},
             "fractions_by_norm": {"tuned-specific": 0.02},
             "quality": {"base": {"explained_variance": 0.8}, "tuned": {"explained_variance": 0.81}},
             "diff_sae": {"explained_variance": 0.5}, "seconds": 3.0,
             "tuned_specific_words": {str(j): [["good", 0.6]] for j in specific}}
    lean = {"rho": 0.12, "latents": 90, "p_greater": 0.004, "p_less": 0.99, "permutations": 9999}
    d = {"layers": {"3": layer}, "marked_words": {"what": "planted words", "n": 20}, "enrichment": enrichment,
         "lean": lean,
         "base_cache_seconds": 1.0, "seconds": 10.0}
    (tmp_path / relpath("diff_summary")).write_text(json.dumps(d))


def test_diff_findings_rows_count_specific_latents_and_test_their_words(tmp_path):
    from irm.findings import diff_latents_about_reward, diff_tuned_specific

    none = {"tuned_specific": 0, "shared": 90, "specific_share": None, "shared_share": None, "difference": None,
            "p_greater": None, "p_less": None, "permutations": 9999}
    _diff_json(tmp_path, [], none)
    row = diff_tuned_specific(tmp_path)
    assert row["verdict"] == NOT_DISTINGUISHABLE and row["number"].startswith("0 tuned-specific of 90 live")
    assert row["p_value"] is None and row["calibration"] == "diff_specific"
    assert diff_latents_about_reward(tmp_path)["verdict"] == NOT_TESTED
    found = {**none, "tuned_specific": 2, "specific_share": 0.6, "shared_share": 0.1, "difference": 0.5,
             "p_greater": 0.001, "p_less": 1.0}
    _diff_json(tmp_path, [4, 7], found)
    assert diff_tuned_specific(tmp_path)["verdict"] == SUPPORTED
    row = diff_latents_about_reward(tmp_path)
    assert row["verdict"] == SUPPORTED and row["p_value"] == pytest.approx(0.002)
    assert "planted words" in row["claim"]
    _diff_json(tmp_path, [4, 7], {**found, "difference": -0.05, "p_greater": 0.9, "p_less": 0.2})
    assert diff_latents_about_reward(tmp_path)["verdict"] == NOT_DISTINGUISHABLE
    assert diff_tuned_specific(tmp_path / "missing") is None
    from irm.report.diffing import lean_text

    text = lean_text(json.loads((tmp_path / "diff.json").read_text()))
    assert text.startswith("Spearman rho +0.120 over 90 latents") and "not a verdict" in text


def test_report_says_whether_the_crosscoder_and_the_papers_instruments_agree():
    from irm.report.diffing import agreement

    spec = {"verdict": SUPPORTED}
    quiet = {"verdict": NOT_DISTINGUISHABLE}
    assert agreement(quiet, quiet, None).startswith("They agree: neither")
    assert agreement(spec, {"verdict": CONTRADICTED}, quiet).startswith("They agree: both")
    assert "crosscoder finds latents" in agreement(spec, quiet, quiet)
    assert "crosscoder finds no latent" in agreement(quiet, quiet, {"verdict": SUPPORTED})
    assert "nothing to compare" in agreement(spec, None, None)


def test_projection_out_removes_exactly_the_span_of_the_directions():
    from irm.diff.ablate import projection_out

    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(3, 10, generator=g)
    x = torch.randn(2, 5, 10, generator=g)
    out = projection_out(dirs)(x).double().numpy()
    a = dirs.double().numpy().T  # [10, 3]
    coef, *_ = np.linalg.lstsq(a, x.double().numpy().reshape(-1, 10).T, rcond=None)
    expected = x.double().numpy().reshape(-1, 10) - (a @ coef).T  # the least-squares residual on the span
    assert out.reshape(-1, 10) == pytest.approx(expected, abs=1e-5)
    assert np.abs(out.reshape(-1, 10) @ a).max() < 1e-5


def test_matched_draws_take_shared_latents_nearest_in_firing_count():
    from irm.diff.ablate import matched_draws

    fired = {3: np.array([100, 5, 98, 97, 300, 101, 0, 99])}
    shared = {3: np.array([False, False, True, True, True, True, True, False])}  # 0 and 1 are the specific ones
    sets = matched_draws({3: [0, 1]}, fired, shared, draws=20, pool=2, seed=0)
    assert len(sets) == 20
    for s in sets:
        first, second = s[3]
        assert first in (2, 5)            # the two shared latents nearest 100 firings (98 and 101; 7 is not shared)
        assert second in (6, 3)           # nearest 5 firings among those left: 6 (0 firings), then 3 (97)
        assert first != second and shared[3][[first, second]].all()


def test_diff_ablation_runs_the_tuned_model_with_and_without_the_directions(tiny_cfg):
    from irm.config import AblateConfig
    from irm.data import load_texts, prefixes
    from irm.diff.ablate import ablate_specific
    from irm.findings import diff_ablation_lowers_reward
    from irm.models import load_model
    from irm.reward import build_reward
    from irm.sampling import rule, sample_prompts
    from irm.stages import artifact

    model, tok = load_model(tiny_cfg.model, seed=1)
    model.save_pretrained(artifact(tiny_cfg.run_dir, "policy"))
    tok.save_pretrained(artifact(tiny_cfg.run_dir, "policy"))
    a = AblateConfig(n_prompts=6, new_tokens=4, prefix_tokens=6, batch_size=3, random_draws=2, match_pool=3)
    sampling = rule(tiny_cfg.rlhf, a.new_tokens)
    width = 64
    g = torch.Generator().manual_seed(0)
    directions = {1: torch.randn(16, width, generator=g)}
    fired = {1: np.arange(16)}
    shared = {1: np.arange(16) >= 4}
    out = ablate_specific(tiny_cfg, "cpu", a, sampling, directions, {1: [0, 2]}, fired, shared)
    # the unablated condition is the tuned model's own completions, scored by the reward
    prompts = prefixes(load_texts(tiny_cfg.corpus, tiny_cfg.corpus.eval_split, seed=tiny_cfg.seed), tok, 6)[:6]
    texts = sample_prompts(model, tok, prompts, list(range(6)), sampling, tiny_cfg.seed).texts
    assert out["before"]["mean"] == pytest.approx(np.mean(build_reward(tiny_cfg.reward, "cpu")(texts)))
    assert out["n_prompts"] == 6 and len(out["matched_sets"]) == 2
    assert all(len(s["1"]) == 2 and all(j >= 4 for j in s["1"]) for s in out["matched_sets"])
    assert out["ablated_minus_matched"]["draws"] == 2
    import json

    from irm.stages import relpath

    (tiny_cfg_root := artifact(tiny_cfg.run_dir, "diff_summary").parent).mkdir(parents=True, exist_ok=True)
    (tiny_cfg_root / relpath("diff_summary")).write_text(json.dumps({"layers": {}, "ablation": out}))
    row = diff_ablation_lowers_reward(tiny_cfg_root)
    assert row["calibration"] == "ablation_vs_random" and "tuned-specific" in row["claim"]
    (tiny_cfg_root / relpath("diff_summary")).write_text(json.dumps({"ablation": {"not_tested": "none"}}))
    assert diff_ablation_lowers_reward(tiny_cfg_root)["verdict"] == NOT_TESTED
