"""The stage graph: order, what each stage reads, and when a finished stage is still valid.

A stage's fingerprint hashes the config sections it depends on and the completion stamps of the stages it reads,
so a changed config redoes that stage, and a redone stage redoes everything downstream of it (as make does).
Standalone subcommands and the pipeline use the same fingerprints, so either can resume the other's work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from irm.artifacts import RunDir, fingerprint, read_json, write_json, write_text
from irm.config import RunConfig
from irm.errors import UserError

# stage -> (config sections it depends on, upstream stages it reads)
GRAPH: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "rlhf": (("seed", "model", "corpus", "reward", "rlhf"), ()),
    "evaluate-reward": (("seed", "model", "corpus", "reward", "evaluate"), ("rlhf",)),
    "divergence": (("model", "divergence"), ("rlhf",)),
    "cache": (("seed", "corpus", "cache"), ("rlhf", "divergence")),
    "sae": (("seed", "sae"), ("cache",)),
    "dictionaries": (("dictionaries",), ("sae",)),
    "explain": (("seed", "reward", "explain"), ("cache", "sae", "dictionaries")),
    "triples": (("seed", "corpus", "reward", "triples"), ("rlhf",)),
    "deltas": (("seed",), ("triples", "sae")),
    "regression": (("seed", "regression"), ("deltas",)),
    "lexicon": (("seed", "lexicon"), ("regression", "triples", "sae")),
    "validate-features": (("seed", "corpus", "validate"), ("regression", "lexicon", "explain", "sae")),
    "ablate": (("seed", "corpus", "reward", "ablate"), ("sae", "explain")),
    "report": ((), ("evaluate-reward", "divergence", "sae", "dictionaries", "explain", "lexicon",
                    "validate-features", "ablate")),
}
ORDER = list(GRAPH)

# Config sections that make a run directory a different run altogether (refused, not overwritten).
IDENTITY = ("model",)


# Fields that change how a stage keeps its working state, not what it produces: editing them redoes nothing.
BOOKKEEPING: dict[str, tuple[str, ...]] = {
    "rlhf": ("checkpoint_every", "keep_final_checkpoint"),
    "sae": ("checkpoint_every",),
}


def _section(cfg: RunConfig, name: str) -> Any:
    value = getattr(cfg, name)
    if not dataclasses.is_dataclass(value):
        return value
    return {k: v for k, v in dataclasses.asdict(value).items() if k not in BOOKKEEPING.get(name, ())}


def stage_fingerprint(cfg: RunConfig, stage: str) -> str:
    sections, upstream = GRAPH[stage]
    rd = RunDir(cfg.run_dir)
    stamps = {}
    for up in upstream:
        rec = rd.stage_record(up)
        stamps[up] = rec["completed_at"] if rec else None
    return fingerprint(stage, {s: _section(cfg, s) for s in sections}, stamps)


def is_done(cfg: RunConfig, stage: str) -> bool:
    return RunDir(cfg.run_dir).is_complete(stage, stage_fingerprint(cfg, stage))


def mark_done(cfg: RunConfig, stage: str, outputs: list, **extra: Any) -> None:
    """Record `stage` complete with the outputs it wrote (paths relative to run_dir, or absolute under it)."""
    RunDir(cfg.run_dir).mark_complete(stage, stage_fingerprint(cfg, stage), outputs, **extra)


def open_run_dir(cfg: RunConfig) -> Path:
    """Create run_dir or check it belongs to this run: a run directory made for another model is refused rather
    than mixed. Writes the resolved config beside the artifacts."""
    root = Path(cfg.run_dir)
    identity = {s: _section(cfg, s) for s in IDENTITY}
    ident_path = root / "run.json"
    if ident_path.exists():
        recorded = read_json(ident_path)
        if recorded.get("identity") != identity:
            was = recorded.get("identity", {}).get("model", {}).get("name")
            raise UserError(
                f"run_dir {root} was made by a different config (model {was!r}, this config has "
                f"{cfg.model.name!r}); choose a new run_dir or delete the old one"
            )
    else:
        root.mkdir(parents=True, exist_ok=True)
        write_json(ident_path, {"identity": identity})
    write_text(root / "config.yaml", dump_config(cfg))
    return root


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML that `--config` reads back to the same RunConfig: strings a YAML loader would take for a
    number, boolean or null (a model named `1e3`, a path `on`) are quoted."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, data: str):
        try:
            float(data)
            ambiguous = True
        except ValueError:
            ambiguous = not isinstance(yaml.safe_load(data), str) if data else False
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="'" if ambiguous else None)

    Dumper.add_representer(str, text)
    return yaml.dump(dataclasses.asdict(cfg), Dumper=Dumper, sort_keys=False)
