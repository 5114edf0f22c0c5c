"""End to end: the tiny pipeline from one config writes every artifact and a summary consistent with them, and a
rerun redoes exactly the stages whose outputs or config changed, and their dependents."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from irm.stages import GRAPH, ORDER

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"

ARTIFACTS = [
    "config.yaml", "manifest.json", "rlhf/policy/config.json", "reward_eval.json", "divergence.json",
    "divergence.png", "mmcs.json", "explanations.jsonl", "triples.jsonl", "triples.json", "lexicon.csv",
    "kendall.json", "validation.json", "ablation.json", "diff.json", "report.md", "report.html", "summary.json",
]


# What each stage reads, written out from the paper's data flow and the stage modules' inputs, independently of
# irm.stages (a missing edge in the code's graph must fail here, not be copied into the expectation).
READS: dict[str, set[str]] = {
    "rlhf": set(),
    "evaluate-reward": {"rlhf"},                              # base and tuned policies
    "divergence": {"rlhf"},                                   # parameter distance base vs tuned
    "cache": {"rlhf", "divergence"},                          # tuned activations of the chosen layers
    "sae": {"cache"},
    "dictionaries": {"cache", "sae"},                         # MMCS of each layer's two dictionaries, chance levels
    "explain": {"cache", "sae", "dictionaries"},              # shared features, their top windows
    "triples": {"rlhf"},                                      # tokenizer of the tuned policy
    "deltas": {"rlhf", "triples", "sae"},                     # codes through the spliced SAEs
    "regression": {"deltas"},
    "lexicon": {"rlhf", "regression", "triples", "sae"},
    "control": {"rlhf", "divergence", "triples", "sae", "lexicon"},
    "validate-features": {"rlhf", "regression", "lexicon", "explain", "sae"},
    "ablate": {"rlhf", "sae", "explain"},                     # labelled features zeroed in the tuned policy
    "diff": {"rlhf", "divergence", "cache"},                  # base and tuned activations at the cached tokens,
                                                              # the tuned policy's completions (ablation)
    "calibrate": {"evaluate-reward", "divergence", "dictionaries", "control", "validate-features",
                  "ablate"},                                  # the sizes its simulated worlds take
    "report": {"evaluate-reward", "divergence", "sae", "dictionaries", "explain", "lexicon", "control",
               "validate-features", "ablate", "diff", "calibrate"},
}


def closure(stage: str, edges) -> set[str]:
    """Every stage `stage` reads, directly or not, under `edges(stage) -> upstream stages`."""
    out: set[str] = set()
    frontier = set(edges(stage))
    while frontier:
        out |= frontier
        frontier = {u for s in frontier for u in edges(s)} - out
    return out


def downstream(stage: str) -> set[str]:
    """Every stage that reads `stage`, directly or not, by READS (not by the code's graph)."""
    return {s for s in READS if stage in closure(s, READS.__getitem__)}


def test_the_stage_graph_has_every_edge_of_the_data_flow():
    assert set(READS) == set(GRAPH) == set(ORDER)
    for stage, reads in READS.items():
        upstream = closure(stage, lambda s: GRAPH[s][1])
        assert reads <= upstream, f"{stage} reads {sorted(reads - upstream)} but the graph does not say so"
        assert all(ORDER.index(u) < ORDER.index(stage) for u in GRAPH[stage][1])


def pipeline(run_dir: Path, *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "irm", "pipeline", "--config", str(CONFIG), "--run_dir", str(run_dir),
         "--log_dir", str(run_dir.parent / "tb"), *extra],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Report:" in out.stdout
    return json.loads((run_dir / "pipeline.json").read_text())["outcome"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipe") / "run"
    outcome = pipeline(run_dir)
    return run_dir, outcome


@pytest.mark.slow
def test_first_run_runs_every_stage_and_writes_every_artifact(tiny_run):
    run_dir, outcome = tiny_run
    assert outcome == {s: "ran" for s in ORDER}
    for name in ARTIFACTS:
        assert (run_dir / name).exists(), name
    layers = json.loads((run_dir / "divergence.json").read_text())["top_k"]
    for layer in layers:
        for e in ("x1", "x2"):
            assert (run_dir / "sae" / f"layer-{layer:02d}" / e / "cfg.json").exists()
        assert (run_dir / "cache" / f"layer-{layer:02d}" / "manifest.json").exists()


@pytest.mark.slow
def test_summary_matches_the_stage_artifacts(tiny_run):
    run_dir, _ = tiny_run
    s = json.loads((run_dir / "summary.json").read_text())
    reward = json.loads((run_dir / "reward_eval.json").read_text())
    kendall = json.loads((run_dir / "kendall.json").read_text())
    ablation = json.loads((run_dir / "ablation.json").read_text())
    mmcs = json.loads((run_dir / "mmcs.json").read_text())
    assert s["reward"]["base_mean"] == reward["base"]["mean"]
    assert s["reward"]["tuned_mean"] == reward["tuned"]["mean"]
    for part in ("all", "heldout"):
        assert s["kendall"][part]["tau"] == kendall[part]["tau"]
        assert s["kendall"][part]["p"] == kendall[part]["p"]
    assert set(s["mmcs"]) == set(mmcs["layers"])
    assert s["ablation"]["before"] == ablation["before"]["mean"]
    assert s["ablation"]["after"] == ablation["after"]["mean"]
    # the Kendall tau in the summary is the one scipy gives on lexicon.csv's value vectors
    from scipy.stats import kendalltau

    with open(run_dir / "lexicon.csv") as f:
        rows = list(csv.DictReader(f))
    # tau is taken on R's per-word means ("raw"): the [-4, 4] rescaling keeps their order, its clipping would tie
    tau = kendalltau([float(r["true"]) for r in rows], [float(r["raw"]) for r in rows]).statistic
    assert math.isclose(tau, s["kendall"]["all"]["tau"], rel_tol=1e-9, abs_tol=1e-12)
    # the report shows the same numbers
    md = (run_dir / "report.md").read_text()
    assert f"{reward['tuned']['mean']:.3f}" in md


@pytest.mark.slow
def test_rerun_redoes_only_the_changed_stage_and_its_dependents(tiny_run):
    run_dir, _ = tiny_run
    assert set(pipeline(run_dir).values()) == {"skipped"}

    (run_dir / "mmcs.json").unlink()  # one stage's output lost
    outcome = pipeline(run_dir)
    redone = {s for s, o in outcome.items() if o == "ran"}
    assert redone == {"dictionaries"} | downstream("dictionaries")

    outcome = pipeline(run_dir, "--lexicon.contexts_per_word", "1")  # one stage's config edited
    redone = {s for s, o in outcome.items() if o == "ran"}
    assert redone == {"lexicon"} | downstream("lexicon")
    assert "rlhf" not in redone and "sae" not in redone


def event_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files directly in `directory`, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_reads_every_scalar_the_readme_says_we_log(tiny_run):
    """README 'TensorBoard': PPO's mean reward, KL, policy and value losses and entropy; each SAE's MSE, normalised
    MSE, L1, L0, dead-feature fraction and explained variance; the regression's MSE and R^2; per-layer MMCS."""
    run_dir, _ = tiny_run
    tb = run_dir.parent / "tb" / run_dir.name
    metrics = [json.loads(line) for line in (run_dir / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    rlhf = event_scalars(tb / "rlhf")
    for tag in ("rlhf/reward_mean", "rlhf/kl", "rlhf/policy_loss", "rlhf/value_loss", "rlhf/entropy"):
        assert [s for s, _ in rlhf[tag]] == [m["step"] for m in metrics], tag
        assert [v for _, v in rlhf[tag]] == pytest.approx([m[tag] for m in metrics], rel=1e-6), tag
    layers = json.loads((run_dir / "divergence.json").read_text())["top_k"]
    for layer in layers:
        sae = event_scalars(tb / "sae" / f"layer-{layer:02d}")
        for split in ("train", "val"):
            for name in ("x1", "x2"):
                for stat in ("mse", "nmse", "l1", "l0", "dead_fraction", "explained_variance"):
                    values = sae.get(f"{split}/{name}/{stat}")
                    assert values and all(math.isfinite(v) for _, v in values), (layer, split, name, stat)
    regression = event_scalars(tb / "regression")
    assert regression.get("val/mse") and regression.get("val/r2") and regression.get("train/loss")
    mmcs = json.loads((run_dir / "mmcs.json").read_text())["layers"]
    logged = event_scalars(tb / "dictionaries")
    for method in ("max", "hungarian"):
        assert dict(logged[f"mmcs/{method}"]) == pytest.approx({int(k): v[method] for k, v in mmcs.items()})


@pytest.mark.slow
def test_saelens_loads_every_exported_sae_and_encodes_and_decodes_as_ours(tiny_run, tmp_path):
    """SAELens's own loader on every SAE the sae stage exported: codes and reconstructions of the layer's cached
    activations equal ours; an SAE SAELens saves back still loads here as the same SAE, tied flag included."""
    sae_lens = pytest.importorskip("sae_lens")
    import torch
    from safetensors.torch import load_file

    from irm.sae import load_sae

    run_dir, _ = tiny_run
    exported = sorted((run_dir / "sae").glob("layer-*/x*/cfg.json"))
    layers = json.loads((run_dir / "divergence.json").read_text())["top_k"]
    assert len(exported) == 2 * len(layers)
    for cfg_path in exported:
        directory = cfg_path.parent
        assert json.loads(cfg_path.read_text())["sae_lens_version"]  # read through SAELens's current format
        shard = sorted((run_dir / "cache" / directory.parent.name).glob("shard-*.safetensors"))[0]
        x = load_file(str(shard))["acts"][:256].float()
        ours = load_sae(directory)
        theirs = sae_lens.SAE.load_from_disk(str(directory), device="cpu")
        with torch.no_grad():
            codes = ours.encode(x)
            assert (codes > 0).any()
            torch.testing.assert_close(theirs.encode(x), codes, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(theirs.decode(codes), ours.decode(codes), rtol=1e-4, atol=1e-5)
            back = tmp_path / directory.parent.name / directory.name
            theirs.save_model(str(back))
            again = load_sae(back)
            assert again.tied == ours.tied
            torch.testing.assert_close(again.encode(x), codes, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(again.decode(codes), ours.decode(codes), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_an_sae_saved_by_saelens_itself_loads_here_and_computes_as_theirs(architecture, tmp_path):
    """Not one of ours: an SAE SAELens builds and saves (random weights, its own cfg.json: decoder bias subtracted
    from the input, no irm block) loads through irm.sae.load_sae and encodes and decodes as SAELens does; one irm
    cannot run (a normalisation it does not implement) is refused in one line."""
    sae_lens = pytest.importorskip("sae_lens")
    import torch

    from irm.errors import UserError
    from irm.sae import load_sae

    torch.manual_seed(0)
    if architecture == "topk":
        theirs = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=16, d_sae=48, k=5))
    else:
        theirs = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=16, d_sae=48))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    theirs.save_model(str(tmp_path / "theirs"))
    ours = load_sae(tmp_path / "theirs")
    x = torch.randn(64, 16)
    with torch.no_grad():
        codes = theirs.encode(x)
        assert (codes > 0).any()
        torch.testing.assert_close(ours.encode(x), codes, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.decode(codes), theirs.decode(codes), rtol=1e-4, atol=1e-5)
    cfg = json.loads((tmp_path / "theirs" / "cfg.json").read_text())
    cfg["normalize_activations"] = "layer_norm"
    (tmp_path / "theirs" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="normalize_activations 'layer_norm'"):
        load_sae(tmp_path / "theirs")


@pytest.mark.slow
def test_saelens_reads_our_model_and_hook_names(tiny_run):
    """SAELens's loader sees the model and hook names our cfg.json gives (TransformerLens hook naming)."""
    sae_lens = pytest.importorskip("sae_lens")

    run_dir, _ = tiny_run
    for cfg_path in sorted((run_dir / "sae").glob("layer-*/x*/cfg.json")):
        layer = int(cfg_path.parent.parent.name.split("-")[1])
        theirs = sae_lens.SAE.load_from_disk(str(cfg_path.parent), device="cpu")
        assert theirs.cfg.metadata.hook_name == f"blocks.{layer}.hook_mlp_out"
        assert theirs.cfg.metadata.model_name == json.loads(cfg_path.read_text())["irm"]["base_model"]

