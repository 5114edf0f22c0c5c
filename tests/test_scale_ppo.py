"""PPO data parallel (`torchrun --nproc_per_node 2 -m irm rlhf`), on CPU processes talking gloo: the ranks split
every global batch of prompts, their replicas stay identical, rank 0 alone writes, and a run killed after a
checkpoint resumes on both ranks and ends exactly where the uninterrupted 2-process run ends. No GPU was used."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from itertools import islice
from pathlib import Path

import proc
import pytest
import torch
from safetensors.torch import load_file

from irm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_ranks_take_disjoint_slices_of_the_single_process_batches():
    from irm.rlhf.trainer import PromptOrder

    n, world, local, steps = 10, 2, 3, 5  # batches straddle passes over the prompts
    single = list(islice(iter(PromptOrder(n, seed=3)), world * local * steps))
    for start in (0, world * local * 2):  # fresh, and resumed two steps in
        ranks = []
        for r in range(world):
            order = PromptOrder(n, seed=3, rank=r, world_size=world, local_batch=local)
            order.start = start
            ranks.append(list(islice(iter(order), local * (steps - start // (world * local)))))
        rebuilt = [i for s in range(len(ranks[0]) // local) for r in ranks for i in r[s * local:(s + 1) * local]]
        assert rebuilt == single[start:]


def test_batch_sizes_must_split_evenly_between_processes():
    from irm.config import RLHFConfig
    from irm.rlhf.trainer import ppo_config

    args = ppo_config(RLHFConfig(batch_size=16, mini_batch_size=8), "/tmp/unused", 0, use_cpu=True, world_size=2)
    assert (args.per_device_train_batch_size, args.num_mini_batches) == (8, 2)
    with pytest.raises(UserError, match="multiples of the 3 processes"):
        ppo_config(RLHFConfig(batch_size=12, mini_batch_size=4), "/tmp/unused", 0, use_cpu=True, world_size=3)
    with pytest.raises(UserError, match="at least 2 per process"):
        ppo_config(RLHFConfig(batch_size=16, mini_batch_size=2), "/tmp/unused", 0, use_cpu=True, world_size=2)


# Runs the stage like `python -m irm rlhf`, plus a callback through which each rank reports a digest of its replica
# and how many of its head-only critic's passes the trunk served from the reference pass (`served`, of `lookups`;
# None: a row it had not seen, computed). `IRM_PROBE_CRITIC=copy`: the critic is instead a frozen copy of the base
# body under the same head (the value model before the shared trunk).
PROBE = textwrap.dedent("""
    import hashlib, json, os, sys
    from pathlib import Path
    import torch.distributed as dist
    from transformers import TrainerCallback
    from irm.cli import parse_config
    from irm.rlhf import adapter
    from irm.stages.rlhf import run

    served = []
    lookup = adapter.ReferenceTrunk._lookup
    adapter.ReferenceTrunk._lookup = lambda self, ids, mask: served.append(lookup(self, ids, mask)) or served[-1]
    if os.environ.get("IRM_PROBE_CRITIC") == "copy":
        sys.path.insert(0, os.environ["IRM_TESTS_DIR"])
        from critics import frozen_copy

        adapter.value_model_from = frozen_copy(adapter.value_model_from)

    class Digest(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            h = hashlib.sha256()
            for k, v in sorted(model.state_dict().items()):
                h.update(k.encode()); h.update(v.detach().cpu().numpy().tobytes())
            Path(sys.argv[1], f"rank-{os.environ['RANK']}.json").write_text(json.dumps(
                {"digest": h.hexdigest(), "world": dist.get_world_size(), "backend": dist.get_backend(),
                 "served": sum(x is not None for x in served), "lookups": len(served)}))

    run(parse_config("rlhf", sys.argv[2:]), callbacks=(Digest(),))
""")


def _torchrun(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return proc.start([sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node", "2", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True, env=env)


def _policy(run_dir: Path) -> dict:
    return load_file(run_dir / "rlhf" / "policy" / "model.safetensors")


@pytest.mark.slow
def test_two_processes_train_identical_replicas_and_resume_exactly_after_a_kill(tmp_path):
    common = ["--config", str(TINY), "--log_dir", str(tmp_path / "tb")]
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    full = _torchrun(str(script), str(tmp_path), *common, "--run_dir", str(tmp_path / "full"), cwd=tmp_path)
    _, err = proc.communicate(full, timeout=400)
    assert full.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["backend"] == "gloo"
    # Each rank sampled other prompts with its own random stream: only all-reduced gradients keep them equal.
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert "8 on each of 2 processes" in err
    assert err.count("irm rlhf: done") == 1  # rank 0 alone reports, saves and writes TensorBoard
    metrics = [json.loads(line) for line in (tmp_path / "full" / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))

    # Killed (SIGKILL to the launcher and both workers) once the step-4 checkpoint is complete, then resumed.
    split = tmp_path / "split"
    first = _torchrun("-m", "irm", "rlhf", *common, "--run_dir", str(split), cwd=tmp_path)
    ckpt = split / "rlhf" / "checkpoints" / "step-000004" / "state.json"
    deadline = time.time() + 300
    while not ckpt.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), first.communicate()[1][-3000:]
    proc.kill_tree(first.pid)
    first.communicate()
    assert not (split / "rlhf" / "policy").exists()
    second = _torchrun("-m", "irm", "rlhf", *common, "--run_dir", str(split), cwd=tmp_path)
    _, err = proc.communicate(second, timeout=400)
    assert second.returncode == 0, err[-3000:]
    assert err.count("resuming from") == 1 and "step 4 of 8" in err
    a, b = _policy(tmp_path / "full"), _policy(split)
    assert a.keys() == b.keys()
    assert all(hashlib.sha256(a[k].numpy().tobytes()).digest() == hashlib.sha256(b[k].numpy().tobytes()).digest()
               for k in a)
    resumed = [json.loads(line) for line in (split / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == list(range(1, 9))
    assert [m["rlhf/kl"] for m in resumed] == [m["rlhf/kl"] for m in metrics]


@pytest.mark.slow
def test_two_processes_with_lora_serve_the_critic_from_each_ranks_reference_pass_and_train_as_a_frozen_copy(
        tmp_path, monkeypatch):
    """The head-only critic's shared trunk under data parallelism: the hooks sit on the modules DDP wraps and each
    rank looks up only its own rows, so every critic pass of both ranks is served from that rank's reference pass,
    the ranks' replicas stay equal, and the run is bit for bit the 2-process run whose critic is a frozen copy of
    the base body (the value model before the shared trunk)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    steps = 3
    common = ["--config", str(TINY), "--log_dir", str(tmp_path / "tb"), "--rlhf.steps", str(steps),
              "--rlhf.checkpoint_every", "100", "--rlhf.value_head_only", "true", "--rlhf.lora_rank", "4",
              "--rlhf.lora_alpha", "8"]
    runs = {}
    for critic in ("shared", "copy"):
        out = tmp_path / critic
        out.mkdir()
        monkeypatch.setenv("IRM_PROBE_CRITIC", critic)
        monkeypatch.setenv("IRM_TESTS_DIR", str(Path(__file__).parent))
        p = _torchrun(str(script), str(out), *common, "--run_dir", str(out / "run"), cwd=tmp_path)
        _, err = proc.communicate(p, timeout=400)
        assert p.returncode == 0, err[-3000:]
        runs[critic] = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    shared, copied = runs["shared"], runs["copy"]
    # tiny: 4 PPO epochs of 2 mini-batches, 8 rows of each global 16 per rank: one rollout + 8 training lookups a step
    assert all(r["lookups"] == steps * (1 + 4 * 2) and r["served"] == r["lookups"] for r in shared)
    assert shared[0]["digest"] == shared[1]["digest"] and copied[0]["digest"] == copied[1]["digest"]
    a, b = _policy(tmp_path / "shared" / "run"), _policy(tmp_path / "copy" / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [[{k: v for k, v in json.loads(line).items() if "time" not in k and "second" not in k}
               for line in (tmp_path / c / "run" / "rlhf" / "metrics.jsonl").read_text().splitlines()]
              for c in ("shared", "copy")]
    assert logged[0] == logged[1] and len(logged[0]) == steps  # the critic's loss and values among them
