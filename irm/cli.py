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
from irm.stages import STAGES as DECLARED

LIGHTNING = {
    "fit": "train an SAE or the IRM regression (Lightning CLI; --config configs/sae.yaml | configs/regression.yaml)",
    "validate": "evaluate a trained SAE or regression on its validation data (Lightning CLI)",
    "test": "test a trained SAE or regression (Lightning CLI)",
}

# name -> (module, one-line help): every stage as irm.stages declares it, then the whole pipeline. Modules define
# `run(cfg: RunConfig)`.
STAGES = {st.name: (st.module, st.help) for st in DECLARED}
STAGES["pipeline"] = ("irm.pipeline", "run every stage in order from one config, skipping finished ones")


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
    parser.add_argument("--force", action="store_true",
                        help="run the stage even when it is up to date (its downstream stages then rerun too)")
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
    ns_dict = {k: v for k, v in vars(cfg).items() if k not in ("config", "force")}
    from irm.config import RunConfig

    return RunConfig(**ns_dict)


def _one_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return " ".join(lines)[:600]


def run_stage(stage: str, argv: list[str]) -> None:
    """Start-up shared by every stage subcommand: parse, validate every section, threads, the run-directory lock,
    then the "already done?" check: a stage whose outputs and whose upstream stages' outputs are all intact and made
    from this config is a no-op (its completion stamp, which downstream fingerprints hash, is kept) unless `--force`
    is given. A forced run that fails leaves the stage's previous completion record in place: nothing is lost."""
    from irm.artifacts import RunDir
    from irm.runtime import set_threads
    from irm.config import validate
    from irm.rundir_lock import hold_run_dir
    from irm.stages import ORDER, open_run_dir, up_to_date

    cfg = parse_config(stage, argv)
    validate(cfg, ORDER if stage == "pipeline" else [stage])  # every section, before anything runs or is written
    set_threads(cfg.threads)
    with hold_run_dir(cfg.run_dir, [stage, *argv]):  # one run at a time on a run directory
        open_run_dir(cfg)
        rd, previous = RunDir(cfg.run_dir), None
        if stage != "pipeline":
            if "--force" in argv:
                previous, order = rd.stage_record(stage), list(rd.manifest()["stages"])
                rd.invalidate(stage)
            elif up_to_date(cfg, stage):
                print(f"irm {stage}: up to date in {cfg.run_dir} (same config and inputs); --force reruns it",
                      file=sys.stderr)
                return
        module = importlib.import_module(STAGES[stage][0])
        try:
            module.run(cfg)
        except BaseException:
            if previous is not None and rd.stage_record(stage) is None:
                rd.restore(stage, previous, order)
            raise


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
