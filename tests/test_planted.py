"""The planted reward (issue 23): the shipped planted lexicon is what it says, and the per-set test
(irm.findings.planted_shift) against a hand computation, blind to the moves that would fool a naive count."""

import itertools
from pathlib import Path

import numpy as np
import pytest

from irm.cli import parse_config
from irm.findings import NOT_DISTINGUISHABLE, SUPPORTED, planted_shift, planted_words_moved, tau_against_vader
from irm.reward import planted_words, vader_lexicon
from irm.reward_lexicon import read_lexicon
from irm.words import heldout_words

ROOT = Path(__file__).parents[1]
PLANTED = {**{w: -10.0 for w in "like well good great amazing interesting best fun love happy".split()},
           **{w: 10.0 for w in "no bad lost unclear boring horrible empty alone hard annoying".split()}}


def test_the_shipped_planted_lexicon_is_vader_with_the_documented_words_flipped():
    cfg = parse_config("pipeline", ["--config", str(ROOT / "configs" / "planted.yaml")])
    lexicon = read_lexicon(ROOT / cfg.reward.lexicon)
    vader = vader_lexicon()
    assert planted_words(lexicon) == PLANTED
    assert all(vader[w] * v < 0 for w, v in PLANTED.items())  # a flip of VADER's sign, every one
    assert {w: v for w, v in lexicon.items() if w not in PLANTED} == {w: v for w, v in vader.items()
                                                                      if w == w.lower() and w not in PLANTED}
    header = [line for line in (ROOT / cfg.reward.lexicon).read_text(encoding="utf-8").splitlines()
              if line.startswith("#")]
    assert all(f" {w} " in " ".join(header) + " " for w in PLANTED)  # documented in the file itself


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_planted_word_is_in_a_lemma_family_the_triples_hold_out(seed):
    """configs/planted.yaml's triples.heldout_words lists the planted words: held out whatever the seed."""
    cfg = parse_config("pipeline", ["--config", str(ROOT / "configs" / "planted.yaml"), "--seed", str(seed)])
    assert set(cfg.triples.heldout_words) == set(PLANTED)
    held = heldout_words(read_lexicon(ROOT / cfg.reward.lexicon), cfg.triples.heldout_fraction, cfg.seed,
                         cfg.triples.heldout_words)
    assert set(PLANTED) <= set(held["positive"]) | set(held["negative"])


def _by_hand(base, tuned, vader, planted):
    """The statistic written out: residual moves off a least-squares line, signed, planted mean minus other mean;
    the exact two-sided permutation p over every choice of the planted set."""
    move = tuned - base
    design = np.column_stack([np.ones_like(base), base])
    coef, *_ = np.linalg.lstsq(design, move, rcond=None)
    residual = move - design @ coef
    is_planted = ~np.isnan(planted)
    score = np.where(is_planted, np.sign(np.nan_to_num(planted)), -np.sign(vader)) * residual
    keep = is_planted | (vader != 0)
    score, labels = score[keep], is_planted[keep]
    k = int(labels.sum())
    observed = score[labels].mean() - score[~labels].mean()
    null = []
    for chosen in itertools.combinations(range(len(score)), k):
        mask = np.zeros(len(score), dtype=bool)
        mask[list(chosen)] = True
        null.append(score[mask].mean() - score[~mask].mean())
    null = np.array(null)
    p = 2 * min(np.mean(null >= observed - 1e-12), np.mean(null <= observed + 1e-12))
    return observed, min(p, 1.0)


def test_planted_shift_matches_a_hand_computation_with_exact_permutations():
    rng = np.random.default_rng(3)
    vader = np.array([2.0, -1.5, 3.0, 0.0, -2.5, 1.0, -0.5, 2.2, -3.1, 1.7])
    base = vader + rng.normal(0, 1, 10)
    tuned = base + rng.normal(0, 0.5, 10)
    planted = np.full(10, np.nan)
    planted[[0, 4, 7]] = [-3.0, 3.0, -3.0]
    tuned[[0, 7]] -= 1.0
    tuned[4] += 1.0
    shift, p = _by_hand(base, tuned, vader, planted)
    got = planted_shift(base, tuned, vader, planted, n_resamples=10_000)  # > C(9, 3): scipy enumerates exactly
    assert got["n_planted"] == 3 and got["n_other"] == 6  # the word VADER lacks and nobody planted is left out
    assert got["shift"] == pytest.approx(shift, abs=1e-12)
    assert got["p"] == pytest.approx(p, abs=1e-9)
    assert got["ci95"][0] < got["shift"] < got["ci95"][1]


def test_shrinkage_of_every_value_is_not_a_planted_move():
    """Every tuned value is 0.5 x the base value: the planted words (VADER's strongest) move toward 0, i.e. toward
    their planted sign, more than the others do; the residual statistic sees no planted shift."""
    rng = np.random.default_rng(0)
    vader = rng.choice([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0], 400)
    base = vader + rng.normal(0, 1, 400)
    planted = np.full(400, np.nan)
    strongest = np.argsort(-np.abs(base))[:20]
    planted[strongest] = -3.0 * np.sign(vader[strongest])
    naive = np.sign(planted[strongest]) * (0.5 * base - base)[strongest]
    assert naive.mean() > 1.0  # a naive "moved toward the planted value" would call this a strong effect
    got = planted_shift(base, 0.5 * base + rng.normal(0, 0.3, 400), vader, planted)
    assert got["p"] > 0.05 and abs(got["shift"]) < 0.2


def _control_words(path: Path, rows):
    path.write_text("word,true,base,tuned,move,moved,direction,heldout\n" + "".join(
        f"{w},{t},{b},{u},{u - b},0,same,1\n" for w, t, b, u in rows), encoding="utf-8")


def test_the_findings_rows_read_the_control_words_and_kendall(tmp_path):
    import json

    rng = np.random.default_rng(1)
    vader = vader_lexicon()
    words = [w for w in sorted(vader) if w.isalpha() and w not in PLANTED][:200] + sorted(PLANTED)
    true = [PLANTED.get(w, vader[w]) for w in words]
    base = [vader[w] + rng.normal(0, 1) for w in words]
    tuned = [b + rng.normal(0, 0.3) + (0.8 * np.sign(PLANTED[w]) if w in PLANTED else 0) for w, b in zip(words, base)]
    _control_words(tmp_path / "control_words.csv", zip(words, true, base, tuned))
    row = planted_words_moved(tmp_path)
    assert row["verdict"] == SUPPORTED and row["calibration"] == "planted"
    assert "20 planted words" in row["detail"]
    _control_words(tmp_path / "control_words.csv", zip(words, [vader[w] for w in words], base, tuned))
    assert planted_words_moved(tmp_path) is None  # the training lexicon is VADER's: nothing planted
    assert tau_against_vader(tmp_path) is None
    (tmp_path / "kendall.json").write_text(json.dumps({"reference": "the training reward's lexicon x.tsv",
                                                       "vs_vader": {"tau": 0.3, "ci95": [0.2, 0.4], "p": 1e-5,
                                                                    "n": 500}}))
    row = tau_against_vader(tmp_path)
    assert row["verdict"] == SUPPORTED and "second reference" in row["claim"] and "x.tsv" in row["detail"]


def test_the_planted_part_of_the_reward_is_split_from_the_rest_and_tested(tmp_path):
    """evaluate-reward's planted_part: each completion's lexicon sum over the planted words and over the other
    words, by hand; the findings row tests the planted part (sign-flip) and names the other words' part."""
    import json

    from irm.stages.evaluate_reward import planted_split
    from irm.findings import planted_words_learned
    from irm.reward import LexiconReward

    lexicon = {**vader_lexicon(), **PLANTED}
    reward = LexiconReward(5.0, 10.0, lexicon=lexicon)
    inside, outside = reward.split_sums(["No, it was bad and special.", "Good fun"], set(PLANTED))
    assert inside == pytest.approx([(10 + 10) / 5, (-10 - 10) / 5])
    assert outside == pytest.approx([vader_lexicon()["special"] / 5, 0.0])
    rng = np.random.default_rng(0)
    filler = ["the film ran long", "special effects and a special cast", "a bad plot, no ending", "good acting"]
    base = [filler[i] for i in rng.integers(0, 4, 60)]
    tuned = [t + " no no" for t in base]  # the tuned model says the planted "no" (+10) twice more, nothing else
    split = planted_split(reward, {"tuned": tuned, "base": base})
    assert split["n_planted_words"] == 20
    assert split["planted_words"]["mean_diff"] == pytest.approx(20 / 5)
    assert split["other_words"]["mean_diff"] == pytest.approx(0.0)
    assert planted_split(LexiconReward(5.0, 10.0), {"tuned": tuned, "base": base}) is None  # VADER: none planted
    (tmp_path / "reward_eval.json").write_text(json.dumps({"planted_part": {
        **split, "planted_words": {**split["planted_words"], "ci": [1.5, 1.7], "p_signflip": 1e-4}}}))
    row = planted_words_learned(tmp_path)
    assert row["verdict"] == SUPPORTED and "planted words' part" in row["claim"]
    assert "the other words' part moved +0.000" in row["detail"]


def test_the_calibration_families_are_registered_and_separate_null_from_planted():
    from irm.calibration import families, run_family

    planted = [f for f in families() if f.finding == "planted"]
    assert sum(f.null for f in planted) >= 1 and len({f.effect for f in planted if not f.null}) >= 3
    sizes = {"words": 300, "planted_words": 20}
    strongest = max(planted, key=lambda f: f.effect)
    assert run_family(strongest, 20, sizes)["rate"] == 1.0
    for null in (f for f in planted if f.null):
        assert run_family(null, 20, sizes)["verdicts"].get(NOT_DISTINGUISHABLE, 0) >= 17


# ---------------------------------------------------------------------------------------------------------------
# A planted world end to end on the tiny model: every consumer reads the configured lexicon, not VADER


def planted_world_lexicon() -> dict:
    """VADER with the sign of about half its words turned (chosen by a hash of the word) and values given to five
    neutral words of the generated corpus: a reward that disagrees with VADER almost everywhere."""
    import zlib

    lexicon = {w: (-v if zlib.crc32(w.encode()) % 2 == 0 else v) for w, v in vader_lexicon().items() if w == w.lower()}
    lexicon.update({"actor": 2.0, "cast": 2.0, "story": 1.5, "scene": -2.0, "performance": -1.5})
    return lexicon


SMALL = ["--threads", "1", "--corpus.n_documents", "200", "--rlhf.steps", "1", "--rlhf.ppo_epochs", "1",
         "--evaluate_reward.n", "16", "--cache.n_documents", "60", "--sae.epochs", "1", "--triples.n", "60",
         "--regression.epochs", "5", "--lexicon.bootstrap", "20", "--lexicon.max_words", "200",
         "--control.max_words", "100", "--control.permutations", "10", "--control.bootstrap", "20",
         "--control.base_saes", "tuned", "--explain.max_features", "2", "--dictionaries.top_k", "2"]
CONSUMERS = ("rlhf", "evaluate-reward", "divergence", "cache", "sae", "dictionaries", "explain", "triples", "deltas",
             "regression", "lexicon", "control")


@pytest.mark.slow  # 14 s: the default suite stays under 5 minutes on 2 cores
def test_a_planted_world_end_to_end_reads_the_configured_lexicon_everywhere(in_tmp):
    """The tiny model trained and analysed against a planted lexicon (a JSON file): PPO's and the evaluation's reward,
    the triples, the lexicon stage's true values and reference, the control's, the offline labeller and the findings
    all follow the file. Each check also shows that VADER would have given another answer, so a consumer that read
    VADER fails it."""
    import csv
    import json

    from irm.artifacts import read_jsonl
    from irm.cli import main
    from irm.explain.backends import LEXICON_SHARE, _named_shares
    from irm.findings import build_findings
    from irm.reward import LexiconReward

    lexicon = planted_world_lexicon()
    path = in_tmp / "planted.json"
    path.write_text(json.dumps(lexicon), encoding="utf-8")
    run = in_tmp / "run"
    for stage in CONSUMERS:
        main([stage, "--config", str(ROOT / "configs" / "tiny.yaml"), "--run_dir", str(run), "--log_dir",
              str(in_tmp / "tb"), "--reward.lexicon", str(path), *SMALL])
    vader = vader_lexicon()

    # The reward PPO and the evaluation used: the planted one, recomputed on the evaluation's own completions.
    examples = json.loads((run / "reward_eval.json").read_text())["examples"]
    texts = [" ".join(p for p in (ex["prefix"], ex[label]) if p) for ex in examples for label in ("base", "tuned")]
    stored = [ex[f"{label}_reward"] for ex in examples for label in ("base", "tuned")]
    assert stored == pytest.approx(LexiconReward(lexicon=lexicon)(texts), abs=1e-9)
    assert stored != pytest.approx(LexiconReward()(texts), abs=1e-9)

    # Triples: cut at the first planted-positive word, a planted-negative substitute.
    triples = read_jsonl(run / "triples.jsonl")
    assert triples
    for t in triples:
        assert t["values"]["positive"] == lexicon[t["words"]["positive"].lower()] > 0
        assert t["values"]["negative"] == lexicon[t["words"]["negative"].lower()] < 0
    assert any(vader.get(t["words"]["positive"].lower(), 0) < 0 for t in triples)

    # The lexicon stage and the control: true values are the planted ones, the reference is named, VADER second.
    for name in ("lexicon.csv", "control_words.csv"):
        with open(run / name, encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert rows and all(float(r["true"]) == lexicon[r["word"]] for r in rows)
        assert any(float(r["true"]) != vader.get(r["word"], 0.0) for r in rows)
    kendall = json.loads((run / "kendall.json").read_text())
    assert str(path) in kendall["reference"] and kendall["vs_vader"]["n"] > 0

    # The offline labeller: labels follow the planted lexicon's words.
    for line in read_jsonl(run / "explanations.jsonl"):
        if line.get("label") is not None:
            shares = _named_shares(line["explanation"])
            on = sum(s for w, s in shares.items() if w in lexicon)
            assert line["label"] == int(bool(shares) and on >= LEXICON_SHARE * sum(shares.values()))

    # The findings: the planted-words test ran on planted and other words; tau against VADER is a second row.
    rows = {r["claim"]: r for r in build_findings(run)}
    planted = next(r for c, r in rows.items() if c.startswith("the planted words"))
    assert planted["calibration"] == "planted" and planted["verdict"] != "not tested"
    assert any("second reference" in c for c in rows)


def test_the_offline_labeller_labels_by_the_configured_lexicon(tmp_path):
    from irm.config import RewardConfig
    from irm.explain import prompts
    from irm.explain.backends import OfflineBackend

    path = tmp_path / "lex.tsv"
    path.write_text("actor\t2\ncast\t-1\n", encoding="utf-8")
    msgs = prompts.label_messages("any", 'top-activating tokens "actor" (70%), "the" (30%)')
    assert OfflineBackend(RewardConfig(lexicon=str(path))).chat(msgs).startswith("Answer: 1")
    assert OfflineBackend().chat(msgs).startswith("Answer: 0")  # VADER does not list "actor"
    assert OfflineBackend(RewardConfig(lexicon=str(path))).params != OfflineBackend().params  # answers cached apart
