"""Every config section is checked before any stage runs (issue 15.4): a bad value anywhere, or a missing explainer
model or API key that a later stage needs, is one line and exit 2 before anything is loaded or written."""

import glob
import os
import sys
import textwrap
from pathlib import Path

import proc
import pytest

from irm.cli import parse_config
from irm.config import check_all
from irm.errors import UserError

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

# one bad value per section (and the top level), with the field the message must name
BAD = [
    (["--devices", "0"], "devices"),
    (["--threads", "0"], "threads"),
    (["--model.tiny_d_model", "30"], "model.tiny_d_model"),
    (["--corpus.n_documents", "0"], "corpus.n_documents"),
    (["--reward.scale", "0"], "reward.scale"),
    (["--reward.kind", "classifier"], "reward.classifier"),
    (["--rlhf.batch_size", "6", "--rlhf.mini_batch_size", "4"], "rlhf.batch_size"),
    (["--rlhf.mini_batch_size", "1"], "rlhf.mini_batch_size"),
    (["--rlhf.prompt_min_tokens", "9", "--rlhf.prompt_max_tokens", "3"], "rlhf.prompt_min_tokens"),
    (["--rlhf.learning_rate", "-1"], "rlhf.learning_rate"),
    (["--evaluate_reward.n", "1"], "evaluate_reward.n"),
    (["--divergence.top_k", "0"], "divergence.top_k"),
    (["--cache.layers", "[-1]"], "cache.layers"),
    (["--cache.layers", "[1, 1]"], "cache.layers"),
    (["--cache.layers", "[]"], "cache.layers"),
    (["--cache.shard_rows", "0"], "cache.shard_rows"),
    (["--sae.expansions", "[1, 1]"], "sae.expansions"),
    (["--sae.val_fraction", "1.0"], "sae.val_fraction"),
    (["--sae.ce_documents", "-1"], "sae.ce_documents"),
    (["--sae.activation", "topk"], "sae.k"),  # a TopK SAE keeps k codes: no default
    (["--sae.resample_until", "1.5"], "sae.resample_until"),
    (["--sae.trainer", '{"max_epochs": 3}'], "sae.trainer"),
    (["--dictionaries.top_k", "0"], "dictionaries.top_k"),
    (["--dictionaries.chance_draws", "0"], "dictionaries.chance_draws"),
    (["--explain.concurrency", "0"], "explain.concurrency"),
    (["--explain.timeout", "0"], "explain.timeout"),
    (["--triples.heldout_fraction", "1.0"], "triples.heldout_fraction"),
    (["--triples.max_length", "1"], "triples.max_length"),
    (["--regression.val_fraction", "0"], "regression.val_fraction"),
    (["--regression.weight_decay", "-0.1"], "regression.weight_decay"),
    (["--lexicon.bootstrap", "-1"], "lexicon.bootstrap"),
    (["--lexicon.percentiles", "[90, 10]"], "lexicon.percentiles"),
    (["--control.permutations", "0"], "control.permutations"),
    (["--control.max_words", "2"], "control.max_words"),
    (["--control.ridge_alphas", "[0.1, -1]"], "control.ridge_alphas"),
    (["--validate_features.threshold", "4"], "validate_features.threshold"),
    (["--ablate.modes", "[zero]"], "ablate.modes"),
    (["--ablate.n_prompts", "0"], "ablate.n_prompts"),
]


@pytest.mark.parametrize("args,field", BAD, ids=[b[1] for b in BAD])
def test_a_bad_value_in_any_section_is_refused_naming_the_field(tmp_path, args, field):
    cfg = parse_config("pipeline", ["--config", str(TINY), "--run_dir", str(tmp_path / "run"), *args])
    with pytest.raises(UserError, match=rf"^bad configuration: {field.replace('.', '[.]')}=") as e:
        check_all(cfg)
    problem, sep, fix = str(e.value).partition("; ")  # `<problem>; <fix>`, as the README promises
    assert sep and "is not valid" in problem and fix.strip() and "\n" not in str(e.value)


def test_the_shipped_run_configs_are_valid():
    checked = 0
    for path in sorted(glob.glob(str(ROOT / "configs" / "*.yaml"))):
        if Path(path).name in ("sae.yaml", "regression.yaml"):  # Lightning CLI configs, not run configs
            continue
        check_all(parse_config("pipeline", ["--config", path]))
        checked += 1
    assert checked >= 3


def test_the_explainers_needs_are_checked_only_for_the_stages_that_will_use_it(monkeypatch, tmp_path):
    monkeypatch.delenv("IRM_TEST_KEY", raising=False)
    base = ["--config", str(TINY), "--run_dir", str(tmp_path / "run"), "--explain.backend", "openai"]
    no_model = parse_config("pipeline", base + ["--explain.api_key_env", "IRM_TEST_KEY"])
    with pytest.raises(UserError, match="explain.model is empty"):
        check_all(no_model, ["rlhf", "explain"])
    no_key = parse_config("pipeline", base + ["--explain.model", "m", "--explain.api_key_env", "IRM_TEST_KEY"])
    with pytest.raises(UserError, match="IRM_TEST_KEY"):
        check_all(no_key, ["explain"])
    check_all(no_key, ["rlhf"])  # PPO alone does not need the explainer
    llm_triples = parse_config("pipeline", base + ["--explain.model", "m", "--explain.api_key_env", "IRM_TEST_KEY",
                                                   "--triples.substitution", "llm"])
    with pytest.raises(UserError, match="IRM_TEST_KEY"):
        check_all(llm_triples, ["triples"])  # llm substitution asks the explainer too
    monkeypatch.setenv("IRM_TEST_KEY", "k")
    check_all(no_key, ["explain"])


# The refusal happens before anything heavy is imported (so it takes the CLI's start-up, a few seconds) and before the
# run directory is created. Run in a fresh interpreter so the modules it loads are its own.
PROBE = textwrap.dedent("""
    import sys
    from irm.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        heavy = [m for m in ("torch", "lightning", "trl", "transformers") if m in sys.modules]
        print("exit", e.code, "heavy", heavy, flush=True)
""")


@pytest.mark.parametrize("case", ["bad-lexicon", "openai-no-model", "openai-no-key", "missing-reward-lexicon",
                                  "topk-without-k"])
def test_the_pipeline_refuses_before_the_first_stage_and_writes_nothing(tmp_path, case):
    run_dir = tmp_path / "run"
    extra = {"bad-lexicon": ["--lexicon.bootstrap", "-5"],
             "openai-no-model": ["--explain.backend", "openai"],
             "openai-no-key": ["--explain.backend", "openai", "--explain.model", "gpt-4o-mini",
                               "--explain.api_key_env", "IRM_TEST_UNSET_KEY"],
             "missing-reward-lexicon": ["--reward.lexicon", str(tmp_path / "mine.tsv")],
             "topk-without-k": ["--sae.activation", "topk"]}[case]
    env = {k: v for k, v in os.environ.items() if k != "IRM_TEST_UNSET_KEY"}
    out = proc.run([sys.executable, "-c", PROBE, "pipeline", "--config", str(TINY), "--run_dir", str(run_dir),
                    "--log_dir", str(tmp_path / "tb"), *extra], timeout=120, cwd=tmp_path, env=env)
    assert out.stdout.strip() == "exit 2 heavy []", (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("irm pipeline: error: bad configuration: ")
    assert {"bad-lexicon": "lexicon.bootstrap=-5", "openai-no-model": "explain.model is empty",
            "openai-no-key": "IRM_TEST_UNSET_KEY",
            "missing-reward-lexicon": f"reward.lexicon {tmp_path / 'mine.tsv'} does not exist; give",
            "topk-without-k": "sae.k=None is not valid; activation topk"}[case] in lines[0]
    assert not run_dir.exists() and not (tmp_path / "tb").exists()


def test_a_reward_lexicon_too_small_for_the_triples_is_refused(tmp_path):
    lexicon = tmp_path / "lex.tsv"
    lexicon.write_text("great\t2\ngood\t1\nbad\t-2\n", encoding="utf-8")  # one negative word
    cfg = parse_config("pipeline", ["--config", str(TINY), "--reward.lexicon", str(lexicon)])
    with pytest.raises(UserError, match=r"leaves \d positive and [01] negative words outside the held-out lemma "
                                        r"families .*; the triples need at least 2 of each: add words of both signs$"):
        check_all(cfg)
    cfg = parse_config("pipeline", ["--config", str(TINY), "--reward.lexicon", str(lexicon), "--reward.kind",
                                    "classifier", "--reward.classifier", "x"])
    with pytest.raises(UserError, match="reward.lexicon=.*is read only by reward.kind lexicon"):
        check_all(cfg)


def test_the_reward_lexicon_enters_fingerprints_by_content_not_path(tmp_path):
    """Editing the lexicon file changes the fingerprint of every stage that reads the reward and of no other; the
    same content at another path changes nothing; without a file the fingerprints are those of a config that never
    had the field (run directories made before it keep theirs)."""
    import dataclasses

    from irm.stages import ORDER, sections_of, stage_fingerprint

    a, b = tmp_path / "a.tsv", tmp_path / "moved.tsv"
    a.write_text("great\t2\nbad\t-2\n", encoding="utf-8")
    b.write_text(a.read_text(encoding="utf-8"), encoding="utf-8")

    def fps(lexicon):
        cfg = parse_config("pipeline", ["--config", str(TINY), "--run_dir", str(tmp_path / "run")])
        cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, lexicon=lexicon))
        return {s: stage_fingerprint(cfg, s) for s in ORDER}

    before = fps(str(a))
    assert fps(str(b)) == before
    a.write_text("great\t2\nbad\t-3\n", encoding="utf-8")
    after = fps(str(a))
    cfg = parse_config("pipeline", ["--config", str(TINY)])
    reads_reward = {s for s in ORDER if "reward" in sections_of(cfg, s)}
    assert {s for s in ORDER if after[s] != before[s]} == reads_reward
    assert {"rlhf", "triples", "lexicon", "control", "explain"} <= reads_reward
    from irm.artifacts import fingerprint

    legacy = {k: v for k, v in dataclasses.asdict(cfg.reward).items() if k != "lexicon"}
    assert fps(None)["rlhf"] == fingerprint("rlhf", {"seed": cfg.seed, "model": {k: v for k, v in dataclasses.asdict(
        cfg.model).items() if k != "tuned"}, "corpus": dataclasses.asdict(cfg.corpus), "reward": legacy,
        "rlhf": {k: v for k, v in dataclasses.asdict(cfg.rlhf).items()
                 if k not in ("checkpoint_every", "keep_final_checkpoint")}}, {})


def test_a_local_classifier_enters_fingerprints_by_content_not_path(tmp_path):
    """A reward classifier in a local directory, retrained in place, changes the fingerprint of every stage that
    reads the reward (and of no other); the same files at another path change nothing; a hub id stays its name."""
    import dataclasses

    from irm.stages import ORDER, sections_of, stage_fingerprint

    a, b = tmp_path / "clf", tmp_path / "moved"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "distilbert"}', encoding="utf-8")
        (d / "model.safetensors").write_bytes(b"weights-1")

    def fps(classifier):
        cfg = parse_config("pipeline", ["--config", str(TINY), "--run_dir", str(tmp_path / "run")])
        cfg = dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, kind="classifier", classifier=classifier))
        return {s: stage_fingerprint(cfg, s) for s in ORDER}

    before = fps(str(a))
    assert fps(str(b)) == before
    (a / "model.safetensors").write_bytes(b"weights-2")
    after = fps(str(a))
    cfg = parse_config("pipeline", ["--config", str(TINY)])
    reads_reward = {s for s in ORDER if "reward" in sections_of(cfg, s)}
    assert {s for s in ORDER if after[s] != before[s]} == reads_reward and "rlhf" in reads_reward
    hub = fps("lvwerra/distilbert-imdb")
    assert hub != before and hub == fps("lvwerra/distilbert-imdb")
