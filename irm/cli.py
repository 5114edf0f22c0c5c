"""`python -m irm`: the Lightning CLI for the two trained models (fit/validate/test) and one subcommand per stage.

Stage subcommands all read the same `RunConfig` YAML (`--config`, `--print_config`, dotted overrides such as
`--rlhf.steps 3`) and call `run(cfg)` in the stage's module, imported only when that stage runs so `--help` and
config errors stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from irm.errors import UserError

LIGHTNING = {
    "fit": "train an SAE or the IRM regression (Lightning CLI; --config configs/sae.yaml | configs/regression.yaml)",
    "validate": "evaluate a trained SAE or regression on its validation data (Lightning CLI)",
    "test": "test a trained SAE or regression (Lightning CLI)",
}

# name -> (module, one-line help). Modules define `run(cfg: RunConfig)`.
STAGES = {
    "rlhf": ("irm.rlhf", "1. PPO fine-tuning of the base model against the reward (paper 4.1)"),
    "evaluate-reward": ("irm.evaluate", "   mean reward of base vs tuned completions, 95% CI (paper table 7)"),
    "divergence": ("irm.divergence", "2. per-layer parameter distance base vs tuned, top-k layers (paper 4.2, fig. 4)"),
    "cache": ("irm.activations.cache", "3. MLP activations of the chosen layers over the corpus, sharded"),
    "sae": ("irm.sae.stage", "4. train the 1x and 2x sparse autoencoders of every chosen layer (paper 4.2, D)"),
    "dictionaries": ("irm.dictionaries", "5. MMCS between each layer's two dictionaries, shared features (eq. 2)"),
    "explain": ("irm.explain.stage", "6. LLM explanations of features and 'related to the reward' labels (4.4)"),
    "triples": ("irm.triples", "7. contrastive (positive, neutral, negative) inputs (paper E.2)"),
    "deltas": ("irm.deltas", "8. sentiment activation deltas through the spliced SAEs (paper 4.3)"),
    "regression": ("irm.regression", "8. fit the linear IRM R on the deltas (paper 4.3, E.2)"),
    "lexicon": ("irm.lexicon", "9. reconstruct the lexicon from R, Kendall tau vs the true one (paper 5.1)"),
    "validate-features": ("irm.validate", "10. activation frequency of labelled features where R > 3 (table 6)"),
    "ablate": ("irm.ablation", "11. reward before/after ablating labelled features, with controls (table 5)"),
    "report": ("irm.report", "12. report.md, report.html and summary.json from a run directory"),
    "pipeline": ("irm.pipeline", "run every stage in order from one config, skipping finished ones"),
}


def _print_help() -> None:
    print("usage: python -m irm <command> [--config CONFIG.yaml] [--key.sub value ...]\n")
    print("Measure and explain the divergence between an RLHF-tuned model's implicit reward and its training reward.\n")
    print("Training (Lightning CLI):")
    for name, text in LIGHTNING.items():
        print(f"  {name:<18} {text}")
    print("\nStages (one YAML config for all; `python -m irm <stage> --help` lists its options):")
    for name, (_, text) in STAGES.items():
        print(f"  {name:<18} {text}")
    print("\nExample: python -m irm pipeline --config configs/quickstart.yaml")


def build_parser(stage: str):
    """The jsonargparse parser of a stage subcommand: `--config`, `--print_config` and every RunConfig field."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from irm.config import RunConfig

    parser = ArgumentParser(prog=f"python -m irm {stage}", description=STAGES[stage][1].strip(), exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML run config (see configs/)")
    parser.add_class_arguments(RunConfig)
    return parser


def parse_config(stage: str, argv: list[str]):
    """Parse argv into a RunConfig; any parse error becomes a one-line UserError."""
    parser = build_parser(stage)
    try:
        ns = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise UserError(f"bad configuration: {_one_line(str(e))}") from None
    cfg = parser.instantiate(ns)
    ns_dict = {k: v for k, v in vars(cfg).items() if k != "config"}
    from irm.config import RunConfig

    return RunConfig(**ns_dict)


def _one_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return " ".join(lines)[:600]


def run_stage(stage: str, argv: list[str]) -> None:
    from irm.stages import open_run_dir

    from irm.runtime import set_threads

    cfg = parse_config(stage, argv)
    set_threads(cfg.threads)
    open_run_dir(cfg)
    module = importlib.import_module(STAGES[stage][0])
    module.run(cfg)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_help()
        return
    cmd, rest = argv[0], argv[1:]
    # SIGTERM (a scheduler, `kill`, a container stop) ends the run as Ctrl-C does: atomic writes are abandoned,
    # checkpoints and finished artifacts stay, the rerun resumes. Stages with their own handling (rlhf) override it.
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        if cmd in LIGHTNING:
            from irm.lightning_cli import cli_main

            cli_main([cmd, *rest])
        elif cmd in STAGES:
            run_stage(cmd, rest)
        else:
            raise UserError(f"unknown command {cmd!r}; `python -m irm --help` lists the commands")
    except UserError as e:
        print(f"irm {cmd}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"irm {cmd}: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
