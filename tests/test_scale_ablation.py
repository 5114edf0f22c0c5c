"""Ablation across processes (`python -m irm ablate --devices 2`: CPU processes talking gloo, no GPU). Every prompt
samples from its own seed, so two processes reproduce the single-process completions and rewards of every condition
and the same ablation.json; a run cut short resumes with the other process count without redoing a finished prompt;
a user error stops every rank with one line instead of leaving ranks waiting for each other."""

import copy
import json
from pathlib import Path

import pytest
from test_ablation import RELATED, ablate_cfg, build_run  # noqa: F401 (ablate_cfg is a fixture)

from irm.stages.ablate import run
from irm.artifacts import read_jsonl
from irm.errors import UserError

N_PROMPTS = 8


@pytest.fixture
def cfg(ablate_cfg):
    """The stage's tiny config with one prompt per batch: a batch is then the same computation in any process, so
    completions agree exactly (with larger batches only up to float noise of the batch's padding and shape)."""
    a = ablate_cfg.ablate
    a.n_prompts, a.batch_size, a.random_draws = N_PROMPTS, 1, 1
    return ablate_cfg


def with_devices(cfg, devices: int, run_dir: str | None = None):
    other = copy.deepcopy(cfg)
    other.devices = devices
    other.run_dir = run_dir or cfg.run_dir
    return other


def per_prompt(run_dir) -> dict[str, dict[int, tuple[str, float]]]:
    """Condition -> prompt -> (text, reward), over every file of every condition; a prompt stored twice fails."""
    out: dict[str, dict[int, tuple[str, float]]] = {}
    for path in sorted((Path(run_dir) / "ablate").glob("*.jsonl")):
        cond = out.setdefault(path.name.split(".")[0], {})
        for rec in read_jsonl(path):
            for i, text, reward in zip(rec["prompts"], rec["texts"], rec["rewards"]):
                assert i not in cond, f"prompt {i} generated twice for {path.name}"
                cond[i] = (text, reward)
    return out


def prompts_by_file(run_dir) -> dict[str, list[int]]:
    return {p.name: [i for rec in read_jsonl(p) for i in rec["prompts"]]
            for p in sorted((Path(run_dir) / "ablate").glob("*.jsonl"))}


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "ablation.json").read_text())


@pytest.mark.slow
def test_two_processes_reproduce_every_condition_and_the_summary_of_one(cfg):
    n = cfg.ablate.n_prompts = 4  # two per rank; fewer prompts keep the default suite fast
    one = cfg
    two = with_devices(cfg, 2, str(Path(cfg.run_dir).with_name("run-2")))
    build_run(one, RELATED)
    build_run(two, RELATED)
    assert run(two) == run(one)
    assert summary(two.run_dir) == summary(one.run_dir)
    rewards = per_prompt(one.run_dir)
    assert len(rewards) == 1 + 2 * (2 + 1)  # model + per mode: splice, ablated, 1 random draw
    assert all(sorted(cond) == list(range(n)) for cond in rewards.values())
    assert per_prompt(two.run_dir) == rewards  # the same texts and rewards, prompt by prompt
    # Each rank wrote its own file per condition with its contiguous half of the prompts, and nothing else.
    assert prompts_by_file(two.run_dir) == {
        f"{cond}.rank-{r}.jsonl": list(range(r * n // 2, (r + 1) * n // 2)) for cond in rewards for r in (0, 1)}
    outputs = json.loads((Path(two.run_dir) / "manifest.json").read_text())["stages"]["ablate"]["outputs"]
    assert sorted(outputs) == sorted(["ablation.json", *(f"ablate/{name}" for name in prompts_by_file(two.run_dir))])


@pytest.mark.slow
def test_a_two_process_run_cut_short_finishes_in_one_process_without_redoing_a_prompt(cfg):
    build_run(cfg, RELATED)
    first = run(with_devices(cfg, 2))
    whole = per_prompt(cfg.run_dir)
    ablate = Path(cfg.run_dir) / "ablate"
    cut, lost = sorted(whole)[:2]
    # The kill came while rank 1 generated its last prompt of `cut`, before either rank reached `lost`.
    victim = ablate / f"{cut}.rank-1.jsonl"
    victim.write_text("".join(victim.read_text().splitlines(keepends=True)[:-1]))
    for r in (0, 1):
        (ablate / f"{lost}.rank-{r}.jsonl").unlink()
    (Path(cfg.run_dir) / "ablation.json").unlink()
    kept = {p.name: p.read_bytes() for p in ablate.glob("*.jsonl")}

    assert run(cfg) == first
    files = prompts_by_file(cfg.run_dir)
    # Only the missing prompts were generated, into the single-process files; the ranks' files are untouched.
    assert {name: prompts for name, prompts in files.items() if name not in kept} == {
        f"{cut}.jsonl": [N_PROMPTS - 1], f"{lost}.jsonl": list(range(N_PROMPTS))}
    assert all((ablate / name).read_bytes() == content for name, content in kept.items())
    assert per_prompt(cfg.run_dir) == whole
    assert summary(cfg.run_dir) == json.loads(json.dumps(first))


@pytest.mark.slow
def test_a_one_process_run_cut_short_finishes_in_two_processes_without_redoing_a_prompt(cfg):
    build_run(cfg, RELATED)
    first = run(cfg)
    whole = per_prompt(cfg.run_dir)
    ablate = Path(cfg.run_dir) / "ablate"
    cut, lost = sorted(whole)[-2:]
    victim = ablate / f"{cut}.jsonl"
    victim.write_text("".join(victim.read_text().splitlines(keepends=True)[:3]))  # prompts 0, 1, 2 survive
    (ablate / f"{lost}.jsonl").unlink()
    (Path(cfg.run_dir) / "ablation.json").unlink()
    kept = {p.name: p.read_bytes() for p in ablate.glob("*.jsonl")}

    assert run(with_devices(cfg, 2)) == first
    files = prompts_by_file(cfg.run_dir)
    # The two ranks split what was missing, contiguously, each into its own file.
    assert {name: prompts for name, prompts in files.items() if name not in kept} == {
        f"{cut}.rank-0.jsonl": [3, 4], f"{cut}.rank-1.jsonl": [5, 6, 7],
        f"{lost}.rank-0.jsonl": [0, 1, 2, 3], f"{lost}.rank-1.jsonl": [4, 5, 6, 7]}
    assert all((ablate / name).read_bytes() == content for name, content in kept.items())
    assert per_prompt(cfg.run_dir) == whole
    assert summary(cfg.run_dir) == json.loads(json.dumps(first))


@pytest.mark.slow
def test_a_user_error_in_two_processes_is_one_error_before_any_generation(cfg):
    build_run(cfg, RELATED)
    cfg.ablate.n_prompts = 10_000
    with pytest.raises(UserError, match="lower ablate.n_prompts"):
        run(with_devices(cfg, 2))
    assert not (Path(cfg.run_dir) / "ablate").exists()
    assert not (Path(cfg.run_dir) / "ablation.json").exists()
