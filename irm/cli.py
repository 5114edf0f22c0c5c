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
from pathlib import Path

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
# Sharing a run's SAEs through a Hugging Face Hub repository (irm.sae.hub).
SHARING = {
    "push": "irm push RUN_DIR REPO_ID [--private]: upload the run's exported SAEs to a hub repository",
    "pull": "irm pull REPO_ID|FOLDER [--to DIR]: fetch SAEs in irm's hub layout and list their folders",
}


def version() -> str:
    """The installed package's version (pyproject.toml's, through the package metadata)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("irm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _print_help() -> None:
    print("usage: irm <command> [--config CONFIG.yaml] [--key.sub value ...]   (or: python -m irm ...)\n")
    print("Measure and explain the divergence between an RLHF-tuned model's implicit reward and its training reward.\n")
    print("Training (Lightning CLI):")
    for name, text in LIGHTNING.items():
        print(f"  {name:<18} {text}")
    print("\nStages, in pipeline order (one YAML config for all; `irm <stage> --help` lists its options):")
    for i, (name, (_, text)) in enumerate(STAGES.items(), 1):
        number = f"{i:>2}." if name != "pipeline" else "   "
        print(f"  {number} {name:<18} {text}")
    print("\nSharing SAEs (Hugging Face Hub layout, loadable by SAELens):")
    for name, text in SHARING.items():
        print(f"  {name:<18} {text}")
    print("\nExample: irm pipeline --config configs/quickstart.yaml        irm --version")


def share(cmd: str, argv: list[str]) -> None:
    """`irm push` / `irm pull` (irm.sae.hub)."""
    from irm.sae import hub

    parser = argparse.ArgumentParser(prog=f"irm {cmd}", description=SHARING[cmd], exit_on_error=False)
    if cmd == "push":
        parser.add_argument("run_dir")
        parser.add_argument("repo_id")
        parser.add_argument("--private", action="store_true")
    else:
        parser.add_argument("source", help="a hub repo id or a local folder in irm's layout")
        parser.add_argument("--to", default=None, help="download into this folder (default: the hub cache)")
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise UserError(f"{e}; `irm {cmd} --help` shows the arguments") from None
    if cmd == "push":
        print(hub.push(args.run_dir, args.repo_id, private=args.private))
        return
    for (layer, expansion), folder in sorted(hub.pull(args.source, args.to).items()):
        print(f"layer {layer} x{expansion}: {folder}")


def build_parser(stage: str):
    """The jsonargparse parser of a stage subcommand: `--config`, `--print_config` and every RunConfig field."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from irm.config import RunConfig

    from irm.config_docs import document

    parser = ArgumentParser(prog=f"irm {stage}", description=STAGES[stage][1].strip(), exit_on_error=False,
                            epilog=FORCE_HELP if stage != "pipeline" else None)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML run config (see configs/)")
    parser.add_class_arguments(document(RunConfig))
    return parser


# `--force` is read off the command line by `run_stage`, not parsed into the config, so `--print_config` shows only
# the run's settings.
FORCE_HELP = "--force: run the stage even when it is up to date (its downstream stages then rerun too)"


def parse_config(stage: str, argv: list[str]):
    """Parse argv into a RunConfig; any parse error becomes a one-line UserError."""
    parser = build_parser(stage)
    try:
        ns = parser.parse_args(renamed_sections([a for a in argv if a != "--force"]))
    except argparse.ArgumentError as e:
        raise UserError(f"bad configuration: {explain_parse_error(_one_line(str(e)))}") from None
    cfg = parser.instantiate(ns)
    ns_dict = {k: v for k, v in vars(cfg).items() if k != "config"}
    from irm.config import RunConfig

    return RunConfig(**ns_dict)


def renamed_sections(argv: list[str]) -> list[str]:
    """argv with the old names of renamed sections (irm.config.RENAMED_SECTIONS) replaced by the new ones, in
    dotted options (`--evaluate.n 8`) and in the top level of `--config` files (given to the parser as YAML text), with
    one warning line per old name. A file that sets a section under both names is refused."""
    import yaml

    from irm.config import RENAMED_SECTIONS

    def warn(old: str, where: str) -> None:
        print(f"irm: warning: config section `{old}` is now `{RENAMED_SECTIONS[old]}` (the stage's name); {where} "
              "still uses the old name, read as the new one until irm 0.3: rename it", file=sys.stderr)

    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        section = arg[2:].split(".", 1)[0].split("=", 1)[0] if arg.startswith("--") else ""
        if section in RENAMED_SECTIONS and arg != f"--{section}":
            warn(section, f"the option {arg.split('=', 1)[0]}")
            arg = f"--{RENAMED_SECTIONS[section]}{arg[2 + len(section):]}"
        if arg == "--config" and i + 1 < len(argv) or arg.startswith("--config="):
            path = argv[i + 1] if arg == "--config" else arg.split("=", 1)[1]
            i += arg == "--config"
            try:
                data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                data = None  # the parser reports it (or it is YAML text, not a path)
            old = [k for k in RENAMED_SECTIONS if isinstance(data, dict) and k in data]
            for key in old:
                if RENAMED_SECTIONS[key] in data:
                    raise UserError(f"{path} sets both `{key}` and `{RENAMED_SECTIONS[key]}`; `{key}` is the old name "
                                    f"of `{RENAMED_SECTIONS[key]}`: keep one")
                warn(key, path)
            renamed = {RENAMED_SECTIONS.get(k, k): v for k, v in data.items()} if old else None
            out += ["--config", yaml.safe_dump(renamed, sort_keys=False) if old else path]
        else:
            out.append(arg)
        i += 1
    return out


def explain_parse_error(msg: str) -> str:
    """jsonargparse's message turned into `<problem>; <fix>`: an unknown key gets the closest valid one, a value of
    the wrong type what the field takes and its default."""
    import re

    from irm.config import RunConfig
    from irm.config_docs import closest, option_names

    keys = option_names(RunConfig)
    unknown = re.search(r"unrecognized arguments: --(\S+)", msg)
    in_group = re.search(r"Group '([\w.]+)' does not accept option '(\w+)'", msg)
    wrong = re.search(r'Parser key "([\w.]+)": Expected an? (.+?)\. Got value: (.*)$', msg)
    if unknown or in_group:
        key = unknown.group(1) if unknown else f"{in_group.group(1)}.{in_group.group(2)}"
        guess = closest(key, keys)
        fix = f"did you mean `{guess}`?" if guess else "`irm <stage> --help` lists every option"
        return f"unknown option `{key}`; {fix}"
    union = re.search(r'Parser key "([\w.]+)": Does not validate against any of the Union subtypes Subtypes: '
                      r'\[(.*?)\] Errors:.*Given value: (.*)$', msg)
    if wrong or union:
        key, expected, got = (wrong or union).groups()
        kind = re.sub(r"<class '(\w+)'>", r"\1", expected).replace("typing.", "").replace("NoneType", "null")
        kind = f"({kind.replace(', ', ' or ')})" if union else kind
        literal = re.match(r"Literal\[(.*)\]$", kind)
        takes = f"one of {literal.group(1)}" if literal else f"a value of type {kind}"
        default = _default_of(key)
        return (f"{key} got {got.strip()!r}, which is not {takes}; set {key} to {takes}"
                + (f" (default: {default!r})" if default is not None else ""))
    return msg


def _default_of(key: str):
    import dataclasses

    from irm.config import RunConfig

    obj = RunConfig()
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def _one_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return " ".join(lines)[:600]


def run_stage(stage: str, argv: list[str]) -> None:
    """Start-up shared by every stage subcommand: parse, validate every section (and a given tuned model against its
    base, which needs irm.models: config imports nothing above it), threads, the run-directory lock, then the
    "already done?" check: a stage whose outputs and whose upstream stages' outputs are all intact and made
    from this config is a no-op (its completion stamp, which downstream fingerprints hash, is kept) unless `--force`
    is given. A forced run that fails leaves the stage's previous completion record in place: nothing is lost."""
    from irm.artifacts import RunDir
    from irm.runtime import set_threads
    from irm.config import refuse, check_all
    from irm.rundir_lock import hold_run_dir
    from irm.stages import ORDER, open_run_dir, up_to_date

    cfg = parse_config(stage, argv)
    check_all(cfg, ORDER if stage == "pipeline" else [stage])  # every section, before anything runs or is written
    if cfg.model.tuned is not None:  # a given tuned model against model.name: their configs and tokenizers
        from irm.models import pair_problem

        problem = pair_problem(cfg.model, cfg.seed)
        refuse([problem] if problem else [])
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
    if argv[0] in ("-V", "--version"):
        print(f"irm {version()}")
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
        elif cmd in SHARING:
            share(cmd, rest)
        else:
            raise UserError(f"unknown command {cmd!r}; `python -m irm --help` lists the commands")
    except UserError as e:
        print(f"irm {cmd}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"irm {cmd}: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
