"""PPO stage (paper 4.1): the reward adapter as TRL reads it, the value model, the prompt order, and tiny runs that
show TensorBoard scalars, a stopped run resuming at step k+1 with value model and optimizer restored (and ending
exactly where an uninterrupted run ends), a no-op rerun, and PPO raising the reward."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import proc
import pytest
import torch
from critics import frozen_copy
from safetensors.torch import load_file
from transformers import TrainerCallback

from irm.cli import parse_config
from irm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STOP_AT = 3  # not a multiple of tiny.yaml's checkpoint_every (4): the stop itself must write the checkpoint


def tiny(tmp: Path, name: str, *overrides: str):
    return parse_config("rlhf", ["--config", str(TINY), "--run_dir", str(tmp / name), "--log_dir", str(tmp / "tb"),
                                 *overrides])


def ckpt_dir(cfg) -> Path:
    return Path(cfg.run_dir) / "rlhf" / "checkpoints"


class Probe(TrainerCallback):
    """Records, after the stage's own callbacks ran, the state training begins from and the steps it logs."""

    def __init__(self):
        self.begin = None
        self.logged_steps = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.begin = {
            "step": state.global_step,
            "value": {k: v.detach().clone() for k, v in model.value_model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()),
        }

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged_steps.append(state.global_step)


class SigtermAt(TrainerCallback):
    """Sends this process SIGTERM while step `step` is being logged, as `kill` from a shell would."""

    def __init__(self, step):
        self.step = step

    def on_log(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny runs of 8 steps: uninterrupted; stopped by SIGTERM after STOP_AT steps, then resumed; and one that
    finished 4 steps and was then asked for 8."""
    from irm.stages.rlhf import run

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("rlhf")
    full = tiny(tmp, "full")
    start = time.perf_counter()
    run(full)
    full_seconds = time.perf_counter() - start

    split = tiny(tmp, "split")
    with pytest.raises(SystemExit) as stopped:
        run(split, callbacks=(SigtermAt(STOP_AT),))
    stopped_ckpts = sorted(p.name for p in ckpt_dir(split).iterdir())
    # the resumed run prunes this checkpoint once it has written two newer ones: keep a copy to compare with
    saved = shutil.copytree(ckpt_dir(split) / f"step-{STOP_AT:06d}", tmp / "saved")
    split_probe = Probe()
    run(split, callbacks=(split_probe,))

    run(tiny(tmp, "extended", "--rlhf.steps", "4"))
    extended = tiny(tmp, "extended")  # the same run, asked for 8 steps once it finished 4
    extended_probe = Probe()
    run(extended, callbacks=(extended_probe,))
    return {"full": full, "full_seconds": full_seconds, "tmp": tmp,
            "split": split, "exit": stopped.value.code, "stopped_ckpts": stopped_ckpts, "saved": saved,
            "split_probe": split_probe, "extended": extended, "extended_probe": extended_probe}


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_reward_adapter_scores_prompt_plus_completion_where_trl_reads_it():
    from irm.rlhf.adapter import RewardAdapter
    from irm.rlhf.trainer import ppo_config  # noqa: F401  (imports TRL's experimental package quietly)
    from trl.experimental.utils import get_reward
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from irm.models import tiny_tokenizer
    from irm.reward import LexiconReward

    tok = tiny_tokenizer()
    pad = tok.pad_token_id
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    # TRL's layout: left-padded queries of one width, then responses right-padded after their stop.
    queries = [[pad, *ids("a good")], ids("the bad movie")]
    responses = [ids("movie , great"), [*ids("love"), pad, pad]]
    batch = torch.tensor([q + r for q, r in zip(queries, responses)])
    _, scores, _ = get_reward(RewardAdapter(LexiconReward(), tok), batch, pad, context_length=3)
    vader = SentimentIntensityAnalyzer().lexicon
    expected = [(vader["good"] + vader["great"]) / 5, (vader["bad"] + vader["love"]) / 5]  # eq. 3, no clipping
    assert scores.tolist() == pytest.approx(expected)


@pytest.mark.parametrize("name", ["tiny-gpt-neox", "tiny-llama"])
def test_value_model_starts_from_the_policy_backbone_and_has_one_output(name):
    from irm.config import ModelConfig
    from irm.models import load_model
    from irm.rlhf.adapter import value_model_from

    policy, _ = load_model(ModelConfig(name=name, tiny_layers=2, tiny_d_model=32), seed=0)
    value = value_model_from(policy)
    prefix = policy.base_model_prefix
    theirs, ours = getattr(policy, prefix).state_dict(), getattr(value, prefix).state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(theirs.values(), ours.values()))  # copies, not shared
    hidden = getattr(value, prefix)(input_ids=torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states[-1]
    assert value.score(hidden).shape == (1, 3, 1)


def test_prompt_order_resumed_mid_pass_continues_the_uninterrupted_stream():
    from itertools import islice

    from irm.rlhf.trainer import PromptOrder

    n, batch, k = 10, 4, 3  # batch 3 of the run straddles the first and second pass
    stream = list(islice(iter(PromptOrder(n, seed=7)), 40))
    assert sorted(stream[:n]) == list(range(n)) and sorted(stream[n:2 * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]  # each pass reshuffled
    resumed = PromptOrder(n, seed=7)
    resumed.start = k * batch
    assert list(islice(iter(resumed), 40 - k * batch)) == stream[k * batch:]


def test_checkpoints_of_another_configuration_or_a_longer_run_are_discarded(tmp_path):
    from irm.rlhf.checkpoint import FullStateCheckpoints
    from irm.rlhf.trainer import PromptOrder

    stale = tmp_path / "checkpoints" / "step-000004"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text(json.dumps({"step": 4, "episode": 64, "key": "old", "log_history": []}))
    callback = lambda key: FullStateCheckpoints(tmp_path / "checkpoints", 4, key, PromptOrder(10, 0))  # noqa: E731
    assert callback("old").resumable(max_steps=8) == [(4, stale)]
    assert callback("new").resumable(max_steps=8) == []
    assert not stale.exists()
    stale.mkdir(parents=True)
    (stale / "state.json").write_text(json.dumps({"step": 4, "episode": 64, "key": "old", "log_history": []}))
    assert callback("old").resumable(max_steps=3) == []


def test_batch_not_a_multiple_of_mini_batch_is_a_user_error():
    """Refused by the config check every stage entry runs first (irm.config.check_all)."""
    from irm.config import RLHFConfig, RunConfig, check_all

    with pytest.raises(UserError, match="multiple of mini_batch_size"):
        check_all(RunConfig(rlhf=RLHFConfig(batch_size=10, mini_batch_size=4)), ["rlhf"])


def test_the_optimizer_steps_with_the_gradient_clipped_to_max_grad_norm_and_logs_the_norm_before(monkeypatch):
    """The trainer's own optimizer (create_optimizer) rescales a gradient of norm 5 to norm 1 before stepping
    (SGD, lr 1: the step is minus the clipped gradient, worked by hand), and records 5; with max_grad_norm 0 the
    step is the whole gradient."""
    from types import SimpleNamespace

    from trl.experimental.ppo import PPOTrainer

    from irm.rlhf.trainer import ResumablePPOTrainer

    for max_norm, want in ((1.0, [-0.6, -0.8, 0.0]), (0.0, [-3.0, -4.0, 0.0])):
        p = torch.nn.Parameter(torch.zeros(3))
        monkeypatch.setattr(PPOTrainer, "create_optimizer", lambda self, model=None: torch.optim.SGD([p], lr=1.0))
        trainer = object.__new__(ResumablePPOTrainer)  # no model: only the optimizer under test
        trainer.args, trainer._grad_norms = SimpleNamespace(max_grad_norm=max_norm), []
        optimizer = ResumablePPOTrainer.create_optimizer(trainer)
        p.grad = torch.tensor([3.0, 4.0, 0.0])
        optimizer.step()
        torch.testing.assert_close(p.detach(), torch.tensor(want), rtol=0, atol=1e-6)
        assert trainer._grad_norms == pytest.approx([5.0])


def test_the_trl_internals_irm_replaces_are_those_of_the_trl_it_was_checked_against():
    """TRL gives no public hook for PPO's prompt loader, its rollout sampler or the policy's name under DDP
    (irm.rlhf.trl_internals): another TRL, or any of those internals changed, must fail here, naming what moved, not
    train silently through TRL's own ones."""
    from irm.rlhf.trl_internals import changed_internals

    assert changed_internals() == []


def test_a_moved_trl_internal_is_named(monkeypatch):
    import trl
    from trl.experimental.ppo import ppo_trainer

    from irm.rlhf.trl_internals import changed_internals, rollouts_sampled_by

    monkeypatch.setattr(trl, "__version__", "1.13.0")
    monkeypatch.setattr(ppo_trainer, "batch_generation", lambda model, queries: None)
    problems = changed_internals()
    assert len(problems) == 2 and "trl is 1.13.0" in problems[0] and "takes other parameters" in problems[1]
    monkeypatch.setattr(ppo_trainer.PPOTrainer, "train", lambda self: None)  # a train() that reads none of them
    assert changed_internals()[2:] == ["PPOTrainer.train no longer samples through batch_generation",
                                       "PPOTrainer.train no longer iterates self.dataloader",
                                       "PPOTrainer's reference pass no longer reads the policy as self.model.policy"]
    before = ppo_trainer.batch_generation
    with rollouts_sampled_by(print):
        assert ppo_trainer.batch_generation is print
    assert ppo_trainer.batch_generation is before


def test_run_writes_policy_and_tensorboard_reward_and_kl_for_every_step(runs):
    from irm.artifacts import read_jsonl
    from irm.models import load_tuned

    cfg = runs["full"]
    steps = cfg.rlhf.steps
    logged = scalars(runs["tmp"] / "tb" / "full" / "rlhf")
    for tag in ("rlhf/reward_mean", "rlhf/kl", "rlhf/policy_loss", "rlhf/value_loss", "rlhf/entropy"):
        assert [s for s, _ in logged[tag]] == list(range(1, steps + 1)), tag
    metrics = read_jsonl(Path(cfg.run_dir) / "rlhf" / "metrics.jsonl")
    assert [v for _, v in logged["rlhf/reward_mean"]] == pytest.approx([m["rlhf/reward_mean"] for m in metrics])
    # the paper clips the gradient norm at 1; TRL 1.12's loop does not, our optimizer hook does
    assert all(m["rlhf/grad_norm"] > 0 for m in metrics)
    model, _ = load_tuned(cfg)
    assert model.config.model_type == "gpt_neox"
    assert sorted(p.name for p in ckpt_dir(cfg).iterdir()) == ["step-000004", "step-000008"]


def test_sigterm_finishes_the_step_checkpoints_and_exits_143(runs):
    assert runs["exit"] == 128 + signal.SIGTERM
    assert runs["stopped_ckpts"] == [f"step-{STOP_AT:06d}"]


def test_resumed_run_starts_at_step_k_plus_1_with_value_model_and_optimizer_restored(runs):
    probe = runs["split_probe"]
    ckpt = runs["saved"]
    assert probe.begin["step"] == STOP_AT
    assert probe.logged_steps == list(range(STOP_AT + 1, runs["split"].rlhf.steps + 1))
    saved_value = load_file(ckpt / "value.safetensors")
    assert saved_value.keys() == probe.begin["value"].keys()
    assert all(torch.equal(saved_value[k], probe.begin["value"][k]) for k in saved_value)
    saved_opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    restored = probe.begin["optimizer"]["state"]
    assert saved_opt["state"].keys() == restored.keys() and len(restored) > 0
    for i, moments in saved_opt["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments[name], restored[i][name]), (i, name)
    # the fresh optimizer would have no moments at all: these are the checkpoint's, not zeros
    assert any(m["exp_avg"].abs().sum() > 0 for m in restored.values())
    # step-000003 pruned once step-000004 and step-000008 were written: the last two are kept
    assert sorted(p.name for p in ckpt_dir(runs["split"]).iterdir()) == ["step-000004", "step-000008"]


def tuned_weights(cfg) -> dict:
    return load_file(Path(cfg.run_dir) / "rlhf" / "policy" / "model.safetensors")


@pytest.mark.parametrize("other, resumed_at", [("split", STOP_AT), ("extended", 4)])
def test_resumed_or_extended_run_ends_exactly_where_the_uninterrupted_run_ends(runs, other, resumed_at):
    assert runs[f"{other}_probe"].begin["step"] == resumed_at  # it resumed rather than started over
    full, resumed = tuned_weights(runs["full"]), tuned_weights(runs[other])
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_resumed_run_logs_each_step_once_with_the_uninterrupted_values(runs):
    logged = scalars(runs["tmp"] / "tb" / "split" / "rlhf")
    assert [s for s, _ in logged["rlhf/kl"]] == list(range(1, runs["split"].rlhf.steps + 1))
    assert logged["rlhf/kl"] == scalars(runs["tmp"] / "tb" / "full" / "rlhf")["rlhf/kl"]


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(runs, capsys):
    from irm.stages.rlhf import run

    cfg = tiny(runs["tmp"], "damaged")
    shutil.copytree(ckpt_dir(runs["full"]), ckpt_dir(cfg))
    (ckpt_dir(cfg) / "step-000008" / "optimizer.pt").write_bytes(b"truncated")
    run(cfg)
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "step 4 of 8" in err
    full, resumed = tuned_weights(runs["full"]), tuned_weights(cfg)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_rerun_with_the_same_config_is_a_no_op(runs, capsys):
    from irm.stages.rlhf import run

    cfg = runs["full"]
    policy = Path(cfg.run_dir) / "rlhf" / "policy" / "model.safetensors"
    events = sorted((runs["tmp"] / "tb" / "full" / "rlhf").iterdir())
    before = policy.stat().st_mtime_ns
    run(cfg)
    assert policy.stat().st_mtime_ns == before
    assert sorted((runs["tmp"] / "tb" / "full" / "rlhf").iterdir()) == events
    assert "up to date" in capsys.readouterr().err


def test_ppo_raises_the_mean_reward_of_the_tiny_model(runs):
    """Table 7 on the tiny run: paired completions (same prefixes, same seeds) of tuned vs base."""
    from irm.artifacts import read_jsonl
    from irm.stages.evaluate_reward import run as evaluate

    cfg = runs["full"]
    evaluate(cfg)
    result = json.loads((Path(cfg.run_dir) / "reward_eval.json").read_text())
    assert result["tuned"]["mean"] > result["base"]["mean"]
    assert result["difference"]["ci95"][0] > 0  # the rise is not chance
    metrics = read_jsonl(Path(cfg.run_dir) / "rlhf" / "metrics.jsonl")
    first, last = metrics[0]["rlhf/reward_mean"], metrics[-1]["rlhf/reward_mean"]
    assert last > first


def _cli(*args, cwd):
    return proc.start([sys.executable, "-m", "irm", "rlhf", *args], cwd=cwd, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_cli_killed_after_a_checkpoint_resumes_and_logs_every_step_once(tmp_path):
    args = ["--config", str(TINY), "--run_dir", str(tmp_path / "run"), "--log_dir", str(tmp_path / "tb")]
    first = _cli(*args, cwd=tmp_path)
    ckpt = tmp_path / "run" / "rlhf" / "checkpoints" / "step-000004" / "state.json"
    deadline = time.time() + 300
    while not ckpt.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), first.communicate()[1][-2000:]
    proc.kill_tree(first.pid)
    first.communicate()
    second = _cli(*args, cwd=tmp_path)
    _, err = proc.communicate(second, timeout=300)
    assert second.returncode == 0, err[-2000:]
    assert "resuming from" in err and "step 4 of 8" in err
    logged = scalars(tmp_path / "tb" / "run" / "rlhf")
    assert [s for s, _ in logged["rlhf/reward_mean"]] == list(range(1, 9))


@pytest.mark.slow
def test_quickstart_smollm2_runs_ppo_and_evaluate_reports_base_vs_tuned(tmp_path):
    """The embedded SmolLM2-135M-Instruct through the quickstart config, with a handful of small steps."""
    pytest.importorskip("gguf")
    from irm.stages.evaluate_reward import run as evaluate
    from irm.models import embedded_gguf
    from irm.stages.rlhf import run

    try:
        embedded_gguf()
    except UserError as e:
        pytest.skip(str(e))
    cfg = parse_config("rlhf", [
        "--config", str(ROOT / "configs" / "quickstart.yaml"), "--run_dir", str(tmp_path / "run"),
        "--log_dir", str(tmp_path / "tb"), "--device", "cpu",
        "--rlhf.steps", "3", "--rlhf.batch_size", "4", "--rlhf.mini_batch_size", "2", "--rlhf.response_length", "8",
        "--rlhf.checkpoint_every", "2", "--evaluate_reward.n", "8", "--evaluate_reward.new_tokens", "8", "--evaluate_reward.batch_size", "8",
    ])
    run(cfg)
    assert (Path(cfg.run_dir) / "rlhf" / "policy" / "model.safetensors").is_file()
    assert [s for s, _ in scalars(tmp_path / "tb" / "run" / "rlhf")["rlhf/kl"]] == [1, 2, 3]
    evaluate(cfg)
    result = json.loads((Path(cfg.run_dir) / "reward_eval.json").read_text())
    assert result["base"]["n"] == result["tuned"]["n"] == 8
    # the interval recomputed with scipy from the journalled per-completion rewards (a mean always lies in its own
    # interval, so that proves nothing)
    import numpy as np
    from scipy import stats

    for label in ("base", "tuned"):
        journal = Path(cfg.run_dir) / "evaluate" / f"{label}.jsonl"
        rewards = np.concatenate([json.loads(line)["rewards"] for line in journal.read_text().splitlines()])
        assert len(rewards) == 8 and result[label]["mean"] == pytest.approx(rewards.mean(), abs=1e-9)
        low, high = stats.t.interval(0.95, len(rewards) - 1, loc=rewards.mean(), scale=stats.sem(rewards))
        assert result[label]["ci95"] == pytest.approx([low, high], abs=1e-9)
    journals = {label: np.concatenate([json.loads(line)["rewards"] for line in
                                       (Path(cfg.run_dir) / "evaluate" / f"{label}.jsonl").read_text().splitlines()])
                for label in ("base", "tuned")}
    d = journals["tuned"] - journals["base"]
    assert result["paired"]["n"] == 8 and result["paired"]["mean_diff"] == pytest.approx(d.mean(), abs=1e-9)
    if np.ptp(d) > 0:
        assert result["paired"]["p_value"] == pytest.approx(stats.ttest_rel(journals["tuned"], journals["base"]).pvalue)


def test_without_a_final_checkpoint_the_run_leaves_none_and_editing_bookkeeping_redoes_nothing(runs):
    """`rlhf.keep_final_checkpoint: false` (the quickstart's): the same policy, no checkpoint left on disk; and neither
    that field nor checkpoint_every is part of the stage's fingerprint."""
    import dataclasses

    from irm.stages.rlhf import run
    from irm.stages import is_done

    cfg = tiny(runs["tmp"], "no-final", "--rlhf.keep_final_checkpoint", "false")
    probe = Probe()
    run(cfg, callbacks=(probe,))
    assert probe.logged_steps == list(range(1, cfg.rlhf.steps + 1))
    assert not ckpt_dir(cfg).exists()
    full, lean = tuned_weights(runs["full"]), tuned_weights(cfg)
    assert all(torch.equal(full[k], lean[k]) for k in full)
    edited = dataclasses.replace(cfg, rlhf=dataclasses.replace(cfg.rlhf, keep_final_checkpoint=True,
                                                               checkpoint_every=3))
    assert is_done(edited, "rlhf")
    assert not is_done(dataclasses.replace(cfg, rlhf=dataclasses.replace(cfg.rlhf, kl_coef=0.25)), "rlhf")


# --- LoRA ------------------------------------------------------------------------------------------------------

LORA = ("--rlhf.lora_rank", "4", "--rlhf.lora_alpha", "8", "--rlhf.learning_rate", "1e-2")


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """Two tiny LoRA runs of 8 steps: uninterrupted; stopped by SIGTERM after STOP_AT steps, then resumed."""
    from irm.stages.rlhf import run

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("lora")
    full = tiny(tmp, "full", *LORA)
    run(full)
    split = tiny(tmp, "split", *LORA)
    with pytest.raises(SystemExit):
        run(split, callbacks=(SigtermAt(STOP_AT),))
    saved = shutil.copytree(ckpt_dir(split) / f"step-{STOP_AT:06d}", tmp / "saved")
    probe = Probe()
    run(split, callbacks=(probe,))
    return {"full": full, "split": split, "saved": saved, "probe": probe}


def test_lora_policy_is_saved_merged_and_loads_as_a_plain_model(lora_runs):
    from transformers import AutoModelForCausalLM

    from irm.models import load_model

    cfg = lora_runs["full"]
    path = Path(cfg.run_dir) / "rlhf" / "policy"
    tuned = AutoModelForCausalLM.from_pretrained(path)  # no peft involved
    base, _ = load_model(cfg.model, seed=cfg.seed)
    assert type(tuned) is type(base)
    ours, theirs = tuned.state_dict(), base.state_dict()
    assert ours.keys() == theirs.keys()  # no lora_A / base_layer names
    moved = {k for k in ours if not torch.equal(ours[k], theirs[k])}
    # only the adapted linear layers moved: embeddings, norms and biases are the base model's
    assert moved and all(k.endswith(".weight") and "layers." in k and "norm" not in k for k in moved), moved
    assert not any("embed" in k for k in moved)


def test_lora_checkpoints_hold_the_adapters_not_the_model(lora_runs):
    saved = lora_runs["saved"]
    policy = load_file(saved / "policy.safetensors")
    assert policy and all("lora_" in k for k in policy)
    value = load_file(saved / "value.safetensors")
    assert all("lora_" in k or k.startswith("score.") for k in value) and any(k.startswith("score.") for k in value)


def test_lora_run_resumed_ends_exactly_where_the_uninterrupted_run_ends(lora_runs):
    assert lora_runs["probe"].begin["step"] == STOP_AT
    full, resumed = tuned_weights(lora_runs["full"]), tuned_weights(lora_runs["split"])
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_lora_config_targets_every_linear_layer_of_the_body_and_refuses_others():
    from irm.config import ModelConfig, RLHFConfig
    from irm.models import load_model
    from irm.rlhf.adapter import linear_names, lora_config

    policy, _ = load_model(ModelConfig(name="tiny-llama", tiny_layers=2, tiny_d_model=32), seed=0)
    assert linear_names(policy) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert lora_config(RLHFConfig(), policy) is None  # rank 0: full fine-tuning
    lora = lora_config(RLHFConfig(lora_rank=8, lora_alpha=16), policy)
    assert set(lora.target_modules) == set(linear_names(policy)) and lora.r == 8 and lora.lora_alpha == 16
    assert set(lora_config(RLHFConfig(lora_rank=2, lora_targets=["q_proj", "v_proj"]), policy).target_modules) == {
        "q_proj", "v_proj"}
    with pytest.raises(UserError, match="lm_head"):
        lora_config(RLHFConfig(lora_rank=2, lora_targets=["lm_head"]), policy)


@pytest.mark.slow
def test_a_runs_own_policy_given_as_model_tuned_reproduces_its_taus(in_tmp):
    """model.tuned (issue 23.3): the tiny run's PPO-tuned policy, passed back as model.tuned into a new run directory,
    gives the same Kendall taus (lexicon stage, every subset) and the same control taus and delta_tau as the run that
    trained it; the new run's manifest records the policy's checksum, and no PPO ran."""
    from test_planted import CONSUMERS, SMALL

    from irm.cli import main
    from irm.artifacts import dir_checksum

    tiny = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    first, second = in_tmp / "first", in_tmp / "second"
    for run_dir, extra in ((first, []), (second, ["--model.tuned", str(first / "rlhf" / "policy")])):
        for stage in CONSUMERS:
            main([stage, "--config", tiny, "--run_dir", str(run_dir), "--log_dir", str(in_tmp / "tb"), *SMALL,
                  *extra])
    read = lambda run_dir, name: json.loads((run_dir / name).read_text())  # noqa: E731
    for subset in ("all", "negative", "heldout", "seen"):
        assert read(second, "kendall.json")[subset]["tau"] == read(first, "kendall.json")[subset]["tau"]
    c1, c2 = read(first, "control.json"), read(second, "control.json")
    for label in ("tuned", "base"):
        assert c2[label]["tau"]["all"]["tau"] == c1[label]["tau"]["all"]["tau"]
    assert c2["delta_tau"]["all"]["delta"] == c1["delta_tau"]["all"]["delta"]
    record = read(second, "manifest.json")["stages"]["rlhf"]
    assert record["tuned"]["sha256"] == dir_checksum(first / "rlhf" / "policy")
    assert not (second / "rlhf" / "metrics.jsonl").exists()


def assert_same_run(a, b, steps: int) -> None:
    """Two rlhf runs ended bit for bit alike: the saved policy and every logged metric but the timings."""
    ours, theirs = tuned_weights(a), tuned_weights(b)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    logged = [[{k: v for k, v in json.loads(line).items() if "time" not in k and "second" not in k}
               for line in (Path(c.run_dir) / "rlhf" / "metrics.jsonl").read_text().splitlines()] for c in (a, b)]
    assert logged[0] == logged[1] and len(logged[0]) == steps


# --- head-only critic ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["lora", "full-fine-tuning"])
def test_head_only_critic_reads_the_reference_pass_and_trains_exactly_as_a_frozen_copy_of_the_body(
        tmp_path, monkeypatch, lora):
    """`rlhf.value_head_only`: the critic's body is the reference model's, so the trunk answers every critic pass
    (the rollout's values, each mini-batch of each PPO epoch) from the step's reference pass without computing
    anything, and the run is bit for bit the run whose critic is a frozen copy of the base model's body (the
    value model before the shared trunk, built here by hand) under the same head."""
    from irm.rlhf import adapter
    from irm.stages.rlhf import run

    torch.set_num_threads(1)
    steps = ("--rlhf.steps", "3", "--rlhf.value_head_only", "true", *(LORA if lora else ()))
    lookups = []
    lookup = adapter.ReferenceTrunk._lookup
    monkeypatch.setattr(adapter.ReferenceTrunk, "_lookup",
                        lambda self, ids, mask: lookups.append(lookup(self, ids, mask)) or lookups[-1])
    shared = tiny(tmp_path, "shared", *steps)
    run(shared)
    assert lookups and all(h is not None for h in lookups)  # 3 rollouts + 3 steps x 4 epochs x 2 mini-batches
    assert len(lookups) == 3 * (1 + 4 * 2)

    monkeypatch.setattr(adapter, "value_model_from", frozen_copy(adapter.value_model_from))
    copied = tiny(tmp_path, "copied", *steps)
    run(copied)
    assert_same_run(shared, copied, steps=3)


@pytest.mark.parametrize("lora", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["lora", "full-fine-tuning"])
def test_output_head_on_the_response_positions_only_changes_no_number(tmp_path, monkeypatch, lora):
    """The reference and training passes run the output head on the response positions only (HF's logits_to_keep,
    padded back): the run is bit for bit the run whose head reads every position, and the head really was cut."""
    from irm.rlhf import trainer
    from irm.stages.rlhf import run

    torch.set_num_threads(1)
    steps = ("--rlhf.steps", "3", *(LORA if lora else ()))
    kept = []
    original = trainer.ResumablePPOTrainer._keep_response_logits

    def counting(self, lm):
        original(self, lm)
        lm.register_forward_pre_hook(lambda _m, _a, kw: kept.append(kw.get("logits_to_keep")) and None,
                                     with_kwargs=True)

    monkeypatch.setattr(trainer.ResumablePPOTrainer, "_keep_response_logits", counting)
    cut = tiny(tmp_path, "cut", *steps)
    run(cut)
    assert any(isinstance(k, int) and k > 0 for k in kept)
    monkeypatch.setattr(trainer.ResumablePPOTrainer, "_keep_response_logits", lambda self, lm: None)
    whole = tiny(tmp_path, "whole", *steps)
    run(whole)
    assert_same_run(cut, whole, steps=3)
