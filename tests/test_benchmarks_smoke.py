"""The benchmark scripts run end to end at tiny sizes and write the JSON their readers expect; the pieces their
numbers rest on (the roofline FLOP count, the plain loop's maths, the ratios, the disk accounting) are checked
against independent computations. Real-size runs are measurements, not tests (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))


def run_script(name: str, tmp_path: Path, *args: str, timeout: int = 300) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--quick", "--json", str(out), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def assert_table_last(stdout: str, n_rows: int) -> None:
    lines = stdout.strip().splitlines()
    table = lines[-(n_rows + 2):]
    assert all(line.startswith("|") and line.endswith("|") for line in table), stdout
    assert set(table[1]) <= set("|-:"), table[1]


# ------------------------------------------------------------------------------------------- the scripts, end to end


def _installed_libs() -> list[str]:
    """irm and the plain loop always; the peers when the optional `bench` extra is installed."""
    import importlib.util

    peers = {"saelens": "sae_lens", "dictionary_learning": "dictionary_learning"}
    return ["irm", "plain", *(lib for lib, mod in peers.items() if importlib.util.find_spec(mod))]


@pytest.mark.slow  # runs the benchmark script end to end (5-21 s); the default suite keeps its maths
def test_sae_throughput_writes_one_positive_rate_per_library_batch_and_width(tmp_path):
    libs = _installed_libs()
    record, stdout = run_script("sae_throughput", tmp_path, "--threads", "1", "--libs", *libs)
    assert isinstance(record["gemm_gflops"], float) and record["gemm_gflops"] > 0
    seen = set()
    for r in record["results"]:
        assert set(r) >= {"lib", "batch", "d_in", "d_hidden", "acts_per_s"}
        assert r["lib"] in {"irm", "plain", "saelens", "dictionary_learning"}
        assert isinstance(r["batch"], int) and isinstance(r["d_in"], int) and r["d_hidden"] == 2 * r["d_in"]
        assert isinstance(r["acts_per_s"], float) and math.isfinite(r["acts_per_s"]) and r["acts_per_s"] > 0
        seen.add((r["lib"], r["batch"], r["d_in"]))
    assert seen == {(lib, b, 32) for lib in libs for b in (8, 64)}
    assert_table_last(stdout, n_rows=2)


@pytest.mark.slow  # runs the benchmark script end to end (5-21 s); the default suite keeps its maths
def test_cache_throughput_counts_every_token_and_the_bytes_on_disk(tmp_path):
    record, stdout = run_script("cache_throughput", tmp_path, "--threads", "1")
    (r,) = record["results"]
    assert r["model"] == "tiny" and r["tokens"] > 0
    assert r["cache_tokens_per_s"] > 0 and r["bare_tokens_per_s"] > 0 and r["cache_over_bare"] > 0
    # Raw size from the sizes alone: rows x width x 4 bytes (float32) per layer.
    assert r["raw_bytes"] == len(r["layers"]) * r["tokens"] * r["width"] * 4
    # Shards hold the raw activations plus three int64 columns, plus small headers; manifests come on top.
    assert r["raw_bytes"] + r["index_bytes"] < r["shard_bytes"] < r["disk_bytes"]
    assert r["disk_over_raw"] == pytest.approx(r["disk_bytes"] / r["raw_bytes"])
    assert_table_last(stdout, n_rows=1)


@pytest.mark.slow  # runs the benchmark script end to end (5-21 s); the default suite keeps its maths
def test_ppo_overhead_times_irm_and_bare_trl_on_the_same_settings(tmp_path):
    record, stdout = run_script("ppo_overhead", tmp_path, "--threads", "1", "--workdir", str(tmp_path / "work"))
    (r,) = record["results"]
    assert r["model"] == "tiny" and r["steps"] == 2
    assert r["irm_s_per_step"] > 0 and r["trl_s_per_step"] > 0
    assert r["irm_over_trl"] == pytest.approx(r["irm_s_per_step"] / r["trl_s_per_step"])  # one repetition
    # Both sides really trained: irm recorded its stage, the bare script its train() time.
    manifest = json.loads((tmp_path / "work" / "tiny" / "tiny-irm-0" / "manifest.json").read_text())
    assert manifest["stages"]["rlhf"]["seconds_per_step"] == pytest.approx(r["irm_s_per_step"])
    assert json.loads((tmp_path / "work" / "tiny" / "tiny-trl-0.json").read_text())["steps"] == 2
    assert_table_last(stdout, n_rows=1)


@pytest.mark.slow  # runs the benchmark script end to end (5-21 s); the default suite keeps its maths
def test_ppo_phases_count_every_phase_of_every_step(tmp_path):
    record, stdout = run_script("ppo_phases", tmp_path, "--threads", "1")
    assert record["config"] == "tiny" and record["steps"] == 2
    phases = record["phases"]
    # tiny.yaml: 4 PPO epochs of 2 mini-batches a step, one rollout batch, a critic pass and a reward pass per step
    assert phases["generation"]["calls"] == phases["reference pass"]["calls"] == 2
    assert phases["training forward"]["calls"] == phases["backward"]["calls"] == 2 * 4 * 2
    assert phases["critic and reward passes"]["calls"] == 2 * 2
    assert phases["optimizer step"]["calls"] == 2 * 4 * 2
    assert all(p["seconds"] > 0 for p in phases.values())
    assert sum(p["seconds"] for p in phases.values()) < record["stage_seconds"]
    assert_table_last(stdout, n_rows=6)


@pytest.mark.slow  # runs the benchmark script end to end (5-21 s); the default suite keeps its maths
def test_pipeline_profile_reports_the_first_stage_of_the_tiny_run(tmp_path):
    record, stdout = run_script("pipeline_profile", tmp_path, "--threads", "1", "--workdir", str(tmp_path / "work"))
    (c,) = record["configs"]
    assert c["config"] == "tiny" and c["complete"]
    assert [s["stage"] for s in c["stages"]] == record["settings"]["stages"] == ["rlhf"]
    (s,) = c["stages"]
    # A process that imported torch and trained a model holds well over 100 MiB at its peak.
    assert s["returncode"] == 0 and s["seconds"] > 0 and s["peak_rss_mib"] > 100
    assert c["total_seconds"] == s["seconds"]
    # The child really ran the stage in the profiled run directory.
    assert "rlhf" in json.loads((tmp_path / "work" / "tiny" / "run" / "manifest.json").read_text())["stages"]
    assert_table_last(stdout, n_rows=2)


# ------------------------------------------------------------------------------------------- what the numbers rest on


def test_roofline_flops_match_torch_flop_counter_for_one_training_step():
    from torch.utils.flop_counter import FlopCounterMode

    import sae_throughput as st

    batch, d_in = 16, 24
    d_hidden = st.EXPANSION * d_in
    w = torch.nn.Parameter(torch.randn(d_hidden, d_in))
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(d_hidden)), torch.nn.Parameter(torch.zeros(d_in))
    with FlopCounterMode(display=False) as counter:
        st.plain_loss(torch.randn(batch, d_in), w, b_enc, b_dec).backward()
    assert counter.get_total_flops() == st.FLOPS_PER_ACT * batch * d_in * d_hidden


def test_plain_loop_loss_and_gradients_equal_irm_sae_maths():
    import sae_throughput as st
    from irm.sae.model import SparseAutoencoder, sae_loss

    torch.manual_seed(1)
    sae = SparseAutoencoder(12, 24, tied=True)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(10, 12)
    x_hat, codes = sae(x)
    irm_loss = sae_loss(x, x_hat, codes, st.L1_COEFFICIENT)[0]
    irm_loss.backward()
    w, be, bd = (p.detach().clone().requires_grad_(True) for p in (sae.W_dec, sae.b_enc, sae.b_dec))
    plain = st.plain_loss(x, w, be, bd)
    plain.backward()
    assert plain.item() == pytest.approx(irm_loss.item(), rel=1e-6)
    for mine, theirs in ((w, sae.W_dec), (be, sae.b_enc), (bd, sae.b_dec)):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_ratio_median_pairs_repetitions_and_table_is_markdown():
    from _common import median, ratio_median, table

    # Pairwise ratios 2, 2, 3 -> 2; the ratio of medians (4 / 2) happens to agree, the pairing is what matters:
    assert ratio_median([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0
    assert ratio_median([10.0, 1.0, 3.0], [5.0, 1.0, 1.0]) == 2.0 != median([10.0, 1.0, 3.0]) / median([5.0, 1.0, 1.0])
    text = table(["a", "bb"], [[1, 0.5], [22, 12345.0]])
    assert text.splitlines() == ["|  a |     bb |", "|---:|-------:|", "|  1 |   0.50 |", "| 22 | 12,345 |"]


def test_sae_cache_rows_follow_documents_as_the_cache_stage_writes_them(tmp_path):
    import sae_throughput as st
    from irm.activations import ActivationCache

    st.write_cache(tmp_path / "layer-00", d_in=8, rows=300, shard_rows=128)
    cache = ActivationCache(tmp_path / "layer-00")
    cache.verify()
    assert (cache.rows, cache.width, len(cache.shards)) == (300, 8, 3)
    rows = cache.read_range(0, 300)
    assert torch.equal(rows["positions"], torch.arange(300) % 64)
    assert torch.equal(rows["doc_ids"], torch.arange(300) // 64)
    assert torch.isfinite(rows["acts"]).all() and rows["acts"].std() > 0


def test_stage_rates_divides_stage_times_by_steps_and_tokens(tmp_path):
    """gpu_check.sh's PPO s/step and cache tokens/s, on a run directory written by hand (pipeline.json's stage times,
    two layers' cache manifests of 1200 tokens each, 8 PPO steps): 12 s / 8 steps, 1200 tokens / 3 s."""
    from stage_rates import stage_rates

    run = tmp_path / "run"
    for layer in (1, 3):
        (run / "cache" / f"layer-{layer:02d}").mkdir(parents=True)
        (run / "cache" / f"layer-{layer:02d}" / "manifest.json").write_text(json.dumps({"rows": 1200}))
    (run / "pipeline.json").write_text(json.dumps({"seconds": {"rlhf": 12.0, "cache": 3.0}}))
    (tmp_path / "c.yaml").write_text("rlhf:\n  steps: 8\n")
    r = stage_rates(run, tmp_path / "c.yaml")
    assert r["ppo_seconds_per_step"] == 1.5 and r["cache_tokens_per_second"] == 400.0 and r["cache_layers"] == 2



def test_stage_rates_reads_the_runs_own_config_and_the_rlhf_records_step_time(tmp_path):
    """Without a config file the PPO steps come from the run's resolved config.yaml (which holds overrides such as
    gpu_check.sh's smoke sizes); train()'s own seconds per step from the rlhf stage's record: 10 s / 4 steps, 2.0."""
    from stage_rates import stage_rates

    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline.json").write_text(json.dumps({"seconds": {"rlhf": 10.0}}))
    (run / "config.yaml").write_text("rlhf:\n  steps: 4\n")
    (run / "manifest.json").write_text(json.dumps({"stages": {"rlhf": {"seconds_per_step": 2.0}}}))
    r = stage_rates(run)
    assert r["ppo_seconds_per_step"] == 2.5 and r["ppo_train_seconds_per_step"] == 2.0
    assert r["cache_tokens_per_second"] is None


def test_gpu_check_report_pairs_repetitions_and_lets_a_later_call_replace_a_part(tmp_path):
    """Two gpu_check.sh output folders written by hand: the first has the SAE runs (irm 2x and 4x the plain loop
    in two repetitions: ratio median 3; SAELens always 8x irm's rate: 0.125), a failed tiny pipeline and no
    quickstart model; the second call ran the tiny pipeline again and the quickstart."""
    import gpu_check_report

    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
    reps = {"irm": [2.0, 8.0], "plain": [1.0, 2.0], "saelens": [16.0, 64.0]}
    (first / "sae_b32.json").write_text(json.dumps({
        "gemm_gflops": 50.0, "settings": {"batches_per_item": 8, "device": "cuda"},
        "results": [{"lib": lib, "batch": 32, "d_in": 576, "acts_per_s_reps": v} for lib, v in reps.items()]}))
    (first / "parts.tsv").write_text("sync\t0\t12\t6 passed\nsae-b32\t0\t80\t\ntiny\t1\t30\tboom\n"
                                     "quickstart\tskipped\t0\tno model\n")
    (second / "parts.tsv").write_text("tiny\t0\t90\tdone\nquickstart\t0\t300\tdone\n")
    (second / "tiny_rates.json").write_text(json.dumps({"ppo_seconds_per_step": 3.0, "stage_seconds": {"rlhf": 24.0}}))
    (second / "env.json").write_text(json.dumps({"date": "2026-12-06", "dry": False, "device": "GPU"}))
    record = gpu_check_report.main([str(first), str(second), "--json", str(tmp_path / "r.json"),
                                    "--md", str(tmp_path / "r.md")])
    [row] = record["sae"]
    assert row["acts_per_s"] == {"irm": 5.0, "plain": 1.5, "saelens": 40.0}
    assert row["irm_over_plain"] == 3.0 and row["irm_over_saelens"] == 0.125
    assert row["targets"] == {"irm >= plain loop": True, "irm ahead of SAELens": False}
    tiny, quickstart = record["pipelines"]["tiny"], record["pipelines"]["quickstart"]
    assert (tiny["exit"], tiny["ppo_seconds_per_step"], quickstart["exit"], quickstart["ran"]) == (0, 3.0, 0, True)
    assert record["sync_test"]["note"] == "6 passed"
    assert json.loads((tmp_path / "r.json").read_text()) == record
    [sae_line] = [line for line in (tmp_path / "r.md").read_text().splitlines() if "irm >= plain loop" in line]
    assert [c.strip() for c in sae_line.split("|")[1:-1]] == [
        "32", "8", "576", "5", "2", "40", "3.00", "0.12", "irm >= plain loop: yes, irm ahead of SAELens: no"]

def test_side_by_side_totals_charge_a_stage_only_one_commit_has_to_that_commit():
    import side_by_side

    result = {"stages": {"rlhf": {"old": [10.0, 12.0, 11.0], "new": [5.0, 6.0, 7.0]},
                         "diff": {"old": [], "new": [3.0, 3.0, 3.0]}}}
    rows, totals = side_by_side.summarise(result)
    assert rows[0] == ["rlhf", 11.0, 6.0, 6.0 / 11.0] and rows[1] == ["diff", "-", 3.0, "-"]
    assert totals == {"old": 11.0, "new": 9.0} and rows[-1] == ["total", 11.0, 9.0, 9.0 / 11.0]
