"""One run's config, `RunConfig`: run-wide settings and every stage's section; and how a section enters the stage
fingerprints (`fingerprint_data`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from irm.config.interpretation import (AblateConfig, CalibrateConfig, ControlConfig, ExplainConfig, LexiconConfig,
                                       RegressionConfig, TriplesConfig, ValidateFeaturesConfig)
from irm.config.training import (CacheConfig, CorpusConfig, DictionariesConfig, DivergenceConfig,
                                 EvaluateRewardConfig, ModelConfig, RewardConfig, RLHFConfig, SAEConfig)
from irm.diff.config import DiffConfig

LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")  # what `loggers` may name (irm.loggers.BACKENDS)


@dataclass
class RunConfig:
    """One run: every artifact lives in `run_dir`."""

    run_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N for the non-Lightning stages
    devices: int = 1  # processes (one GPU each, or CPU processes) for cache, deltas, lexicon and ablate (irm.parallel)
    threads: Optional[int] = None  # torch CPU threads per process; None: torch's default (one per core)
    log_dir: str = "lightning_logs"  # TensorBoard root; each stage logs under <log_dir>/<run name>/<stage>
    # Where the sae, regression and rlhf stages log their metrics, any of tensorboard, csv, mlflow (a local file store
    # under log_dir/mlruns), wandb (offline); a stage's trainer.logger overrides it (irm.loggers).
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)
    evaluate_reward: EvaluateRewardConfig = field(default_factory=EvaluateRewardConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    dictionaries: DictionariesConfig = field(default_factory=DictionariesConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    triples: TriplesConfig = field(default_factory=TriplesConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    lexicon: LexiconConfig = field(default_factory=LexiconConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    diff: DiffConfig = field(default_factory=DiffConfig)
    validate_features: ValidateFeaturesConfig = field(default_factory=ValidateFeaturesConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)


# Sections renamed to their stage's name (stage = module = section), old name -> new. A config or command line
# that uses an old name is read as the new one with a warning (irm.cli.parse_config) until irm 0.3, then refused.
RENAMED_SECTIONS = {"evaluate": "evaluate_reward", "validate": "validate_features"}


def fingerprint_data(section: str, data: dict) -> dict:
    """Config section `section` (as a dict) the way stage fingerprints and the run identity hold it: the
    `reward.lexicon` file and a `reward.classifier` in a local directory by their content (sha256: editing or
    retraining them in place reruns the stages that read the reward, moving them reruns nothing; a classifier's hub
    id stays its name); `reward.lexicon` and `model.tuned` left out when unset, so run directories made before these
    fields existed keep their fingerprints."""
    if section == "reward" and data.get("lexicon") is not None:
        from irm.reward_lexicon import lexicon_checksum

        return {**data, "lexicon": {"sha256": lexicon_checksum(RewardConfig(**data))}}
    if section == "reward" and data.get("kind") == "classifier" and data.get("classifier"):
        from irm.artifacts import local_checksum

        digest = local_checksum(data["classifier"])  # None for a hub id
        if digest is not None:
            return {**data, "classifier": {"sha256": digest}}
    optional = {"reward": "lexicon", "model": "tuned"}.get(section)
    return {k: v for k, v in data.items() if not (k == optional and v is None)}
