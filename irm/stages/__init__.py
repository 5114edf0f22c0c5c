"""The stage graph: order, what each stage reads, and when a finished stage is still valid.

A stage's fingerprint hashes the config sections it depends on and the completion stamps of the stages it reads,
so a changed config redoes that stage, and a redone stage redoes everything downstream of it (as make does).
Standalone subcommands and the pipeline use the same fingerprints, so either can resume the other's work.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from irm.artifacts import RunDir, fingerprint, local_checksum, read_json, write_json, write_text
from irm.config import RunConfig, fingerprint_data
from irm.errors import UserError


class StageModule(Protocol):
    """A stage's module (`Stage.module`): `run(cfg)` reads its inputs from run_dir through `irm.artifacts`, writes its
    outputs atomically, and ends with `mark_done(cfg, name, outputs)`. The CLI has already parsed and validated the
    config, taken the run-directory lock and skipped the stage if it was up to date; the module seeds and picks
    its device itself (`device = irm.runtime.start(cfg.seed, cfg.device)`) since the pipeline calls several stages in
    one process."""

    def run(self, cfg: RunConfig) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage, declared once: the CLI, the pipeline, the fingerprints and the docs read this.

    `sections`: the config sections its code reads (a test checks this against the module's source);
    `when`: sections it reads only under a condition of the config (section -> predicate);
    `upstream`: stages whose artifacts it reads (their completion stamps enter its fingerprint);
    `bookkeeping`: per config section it owns, fields that change how work is kept or scheduled, not what it
    produces (editing them redoes nothing anywhere); `outputs`: the artifacts it writes, each
    a key and its path under run_dir, the one place a file name is spelled (`artifact(run_dir, key)`);
    `still_valid`: a check of files outside run_dir that the stage read (see `given_tuned_unchanged`).

    A stage's name is also its module's (`module`, under irm/stages/) and, where it has settings, its config
    section's (`section`), with `_` for `-`."""

    name: str
    help: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    when: tuple[tuple[str, Callable[[RunConfig], bool]], ...] = ()
    bookkeeping: tuple[tuple[str, tuple[str, ...]], ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()  # (artifact key, path under run_dir): read through `artifact`
    # what a finished stage read from outside run_dir and its fingerprint holds only by name: (cfg, its completion
    # record) -> whether that is still what the record says it was; False redoes it and everything downstream
    still_valid: Optional[Callable[[RunConfig, dict], bool]] = None

    @property
    def section(self) -> str:
        """Its config section's name (a RunConfig field, when the stage has settings of its own)."""
        return self.name.replace("-", "_")

    @property
    def module(self) -> str:
        """Its module, `run(cfg)` and whatever only this stage needs."""
        return f"irm.stages.{self.section}"


_TOLD: set = set()  # model.tuned changes already reported in this process (the stage graph asks many times)


def given_tuned_unchanged(cfg: RunConfig, record: dict) -> bool:
    """rlhf under `model.tuned`: the local files the run's policy was saved from still have the checksum its
    completion record holds (`irm.models.tuned_identity`). The fingerprint holds model.tuned's path, so a model
    retrained in place would otherwise leave the old policy, and every number after it, "up to date". A hub id
    cannot be checked offline (the record keeps its commit); a PPO-trained run has nothing to check."""
    if cfg.model.tuned is None:
        return True
    now = local_checksum(cfg.model.tuned)
    if now is None or (record.get("tuned") or {}).get("sha256") == now:
        return True
    if (cfg.model.tuned, now) not in _TOLD:
        _TOLD.add((cfg.model.tuned, now))
        print(f"irm: model.tuned {cfg.model.tuned} changed since the rlhf stage saved it as the run's policy: rlhf and "
              "every stage after it run again", file=sys.stderr)
    return False


# The explainer's connection settings: where and how fast answers are fetched, not which answers.
EXPLAIN_OPERATIONAL = ("base_url", "api_key_env", "concurrency", "max_retries", "retry_backoff", "timeout")

STAGES: tuple[Stage, ...] = (
    Stage("rlhf", "PPO fine-tuning of the base model against the reward (paper 4.1)",
          ("seed", "model", "corpus", "reward", "rlhf"),
          bookkeeping=(("rlhf", ("checkpoint_every", "keep_final_checkpoint")),),
          outputs=(("policy", "rlhf/policy"), ("rlhf_metrics", "rlhf/metrics.jsonl")),
          still_valid=given_tuned_unchanged),
    Stage("evaluate-reward", "mean reward of base vs tuned completions, paired difference (paper table 7)",
          ("seed", "model", "corpus", "reward", "rlhf", "evaluate_reward"), ("rlhf",),
          outputs=(("reward_eval", "reward_eval.json"),)),
    Stage("divergence", "per-layer parameter distance base vs tuned, top-k layers (paper 4.2, fig. 4)",
          ("seed", "model", "divergence", "cache"), ("rlhf",),
          outputs=(("divergence", "divergence.json"), ("divergence_plot", "divergence.png"))),
    Stage("cache", "MLP activations of the chosen layers over the corpus, sharded",
          ("seed", "model", "corpus", "cache"), ("rlhf", "divergence"), outputs=(("cache", "cache"),)),
    Stage("sae", "train the 1x and 2x sparse autoencoders of every chosen layer (paper 4.2, D)",
          ("seed", "corpus", "cache", "sae"), ("cache",), bookkeeping=(("sae", ("checkpoint_every",)),),
          outputs=(("sae", "sae"), ("sae_metrics", "sae/metrics.json"))),
    Stage("dictionaries", "MMCS between each layer's two dictionaries, shared features (eq. 2)",
          ("seed", "sae", "dictionaries"), ("cache", "sae"), outputs=(("mmcs", "mmcs.json"),)),
    Stage("explain", "LLM explanations of features and 'related to the reward' labels (4.4)",
          ("seed", "reward", "sae", "explain"), ("cache", "sae", "dictionaries"),
          bookkeeping=(("explain", EXPLAIN_OPERATIONAL),),
          outputs=(("explanations", "explanations.jsonl"), ("explain", "explain"),
                   ("explain_scores", "explain/scores.json"), ("neuronpedia", "explain/neuronpedia"))),
    Stage("triples", "contrastive (positive, neutral, negative) inputs (paper E.2)",
          ("seed", "model", "corpus", "reward", "triples"), ("rlhf",),
          when=(("explain", lambda cfg: cfg.triples.substitution == "llm"),),
          outputs=(("triples", "triples.jsonl"), ("triples_summary", "triples.json"))),
    Stage("deltas", "sentiment activation deltas through the spliced SAEs (paper 4.3)",
          ("seed", "cache", "sae"), ("triples", "sae"), outputs=(("deltas", "deltas"),)),
    Stage("regression", "fit the linear IRM R on the deltas (paper 4.3, E.2)",
          ("seed", "regression"), ("deltas",), outputs=(("regression", "regression"),)),
    Stage("lexicon", "reconstruct the lexicon from R, Kendall tau vs the true one (paper 5.1)",
          ("seed", "reward", "cache", "sae", "lexicon"), ("regression", "triples", "sae"),
          outputs=(("lexicon", "lexicon.csv"), ("kendall", "kendall.json"))),
    Stage("control",
          "base-model control and nulls: the same chain on M_base, delta_tau, permutation and raw-activation R",
          ("seed", "model", "reward", "cache", "sae", "lexicon", "control"),
          ("rlhf", "divergence", "triples", "sae", "deltas", "lexicon"),
          outputs=(("control", "control.json"), ("control_words", "control_words.csv"))),
    Stage("validate-features", "activation frequency of labelled features where R > 3 (table 6)",
          ("seed", "corpus", "cache", "sae", "validate_features"), ("regression", "lexicon", "explain", "sae"),
          outputs=(("validation", "validation.json"),)),
    Stage("ablate", "reward before/after ablating labelled features, with controls (table 5)",
          ("seed", "corpus", "reward", "rlhf", "cache", "sae", "ablate"), ("rlhf", "sae", "explain"),
          outputs=(("ablation", "ablation.json"),)),
    Stage("diff", "model diffing: a crosscoder with Latent Scaling and a diff-SAE on base vs tuned activations "
                  "(beyond the paper)",
          ("seed", "model", "corpus", "reward", "rlhf", "cache", "ablate", "explain", "diff"),
          ("rlhf", "divergence", "cache"), bookkeeping=(("explain", EXPLAIN_OPERATIONAL),),
          outputs=(("diff", "diff"), ("diff_summary", "diff.json"), ("diff_explanations", "diff/explanations.jsonl"))),
    Stage("calibrate",
          "the findings' false-positive rates and minimal detectable effects, simulated at this run's sizes",
          ("seed", "calibrate"),
          ("evaluate-reward", "divergence", "dictionaries", "control", "validate-features", "ablate"),
          outputs=(("calibration", "calibration.json"),)),
    Stage("report", "report.md, report.html and summary.json from a run directory",
          ("model", "reward", "explain", "lexicon"),
          ("evaluate-reward", "divergence", "sae", "dictionaries", "explain", "lexicon", "control",
           "validate-features", "ablate", "diff", "calibrate"),
          outputs=(("report_md", "report.md"), ("report_html", "report.html"), ("summary", "summary.json"),
                   ("plots", "plots"))),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
ORDER = [s.name for s in STAGES]
# stage -> (config sections, upstream stages): a view of STAGES for readers that want the bare graph.
GRAPH: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {s.name: (s.sections, s.upstream) for s in STAGES}

# The resolved config of the last stage that ran, beside the artifacts.
CONFIG_YAML = "config.yaml"

# Config sections that make a run directory a different run altogether (refused, not overwritten).
IDENTITY = ("model",)

# Fields that change how a stage keeps its working state, not what it produces: editing them redoes nothing.
BOOKKEEPING: dict[str, tuple[str, ...]] = {sec: fields for s in STAGES for sec, fields in s.bookkeeping}


# artifact key -> (path under run_dir, the stage that writes it)
ARTIFACTS: dict[str, tuple[str, str]] = {key: (rel, s.name) for s in STAGES for key, rel in s.outputs}


def relpath(key: str) -> str:
    """The path of artifact `key` relative to a run directory, as its Stage declares it."""
    return ARTIFACTS[key][0]


def artifact(run_dir: str | Path, key: str) -> Path:
    """The path of artifact `key` (a key of some Stage's `outputs`) in `run_dir`: writers and readers alike."""
    return Path(run_dir) / ARTIFACTS[key][0]


def read_artifact(run_dir: str | Path, key: str, missing_ok: bool = False) -> Any:
    """Artifact `key` parsed by its kind (.json, .jsonl, .csv as a list of row dicts). A missing one is None when
    `missing_ok`, else a one-line UserError naming the stage that writes it; a corrupt one is always that line."""
    import csv
    import json

    path = artifact(run_dir, key)
    rel, writer = ARTIFACTS[key]
    if not path.is_file():
        if missing_ok:
            return None
        raise UserError(f"{path} is missing: run `python -m irm {writer}` (or the pipeline) for this run_dir first")
    try:
        text = path.read_text(encoding="utf-8")
        if rel.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if rel.endswith(".csv"):
            return list(csv.DictReader(text.splitlines()))
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({type(e).__name__}: {str(e)[:120]}); rerun `python -m irm {writer} "
                        f"--force` to rewrite it") from None


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise UserError(f"unknown stage {name!r}; stages: {', '.join(ORDER)}") from None


def run_stage(cfg: RunConfig, name: str) -> Any:
    """Run stage `name` through its declared module: the pipeline, and a stage that runs others on a sub-run
    directory (the control's base run), reach a stage this way, never by importing its module."""
    import importlib

    return importlib.import_module(stage(name).module).run(cfg)


def sections_of(cfg: RunConfig, name: str) -> tuple[str, ...]:
    """The config sections `name` depends on under this config (its fixed ones plus the conditional ones that apply)."""
    st = stage(name)
    return st.sections + tuple(sec for sec, applies in st.when if applies(cfg))


def _section(cfg: RunConfig, name: str) -> Any:
    value = getattr(cfg, name)
    if not dataclasses.is_dataclass(value):
        return value
    return fingerprint_data(name, {k: v for k, v in dataclasses.asdict(value).items()
                                   if k not in BOOKKEEPING.get(name, ())})


def stage_fingerprint(cfg: RunConfig, stage: str) -> str:
    rd = RunDir(cfg.run_dir)
    stamps = {}
    for up in BY_NAME[stage].upstream:
        rec = rd.stage_record(up)
        stamps[up] = rec["completed_at"] if rec else None
    return fingerprint(stage, {s: _section(cfg, s) for s in sections_of(cfg, stage)}, stamps)


def is_done(cfg: RunConfig, stage: str) -> bool:
    rd = RunDir(cfg.run_dir)
    if not rd.is_complete(stage, stage_fingerprint(cfg, stage)):
        return False
    check = BY_NAME[stage].still_valid
    return check is None or check(cfg, rd.stage_record(stage))


def up_to_date(cfg: RunConfig, stage: str) -> bool:
    """`stage` is done and so is every stage upstream of it, transitively: an upstream artifact damaged or edited
    since (its checksum no longer matches) makes the stage run again, and the rerun finds the damage."""
    return is_done(cfg, stage) and all(up_to_date(cfg, up) for up in BY_NAME[stage].upstream)


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
    write_text(root / CONFIG_YAML, dump_config(cfg))
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
            try:
                ambiguous = not isinstance(yaml.safe_load(data), str) if data else False
            except yaml.YAMLError:  # text such as ":" or "a: b" that YAML cannot read as one plain scalar
                ambiguous = True
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="'" if ambiguous else None)

    Dumper.add_representer(str, text)
    return yaml.dump(dataclasses.asdict(cfg), Dumper=Dumper, sort_keys=False)
