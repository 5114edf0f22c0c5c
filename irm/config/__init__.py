"""The run configuration: one typed dataclass per stage, composed into `RunConfig`.

Every stage subcommand (`python -m irm rlhf|cache|...`) and `python -m irm pipeline` read the same YAML, so one
file describes one run. Research values (the paper's hyperparameters) are set in `configs/*.yaml` with the paper
section they come from; the defaults here are conventions or the paper's values where a default is needed at all.
This package imports nothing heavy: `python -m irm --help` and config errors stay fast.

The sections live in `training` (the pipeline's first half: models, reward, PPO, cache, SAEs) and `interpretation`
(the second: explanations, regression, lexicon, controls, validation, ablation), `RunConfig` in `run`, the range
checks in `checks` (`check_all`) over `problems` (the collector each section's own `check()` uses). A field's
documentation is the comment beside it there: `--help` shows it (irm.config_docs).
"""

from irm.config.checks import check_all
from irm.config.interpretation import (ABLATION_MODES, AblateConfig, CalibrateConfig, ControlConfig, ExplainConfig,
                                       LexiconConfig, RegressionConfig, TriplesConfig, ValidateFeaturesConfig)
from irm.config.problems import refuse
from irm.config.run import LOGGERS, RENAMED_SECTIONS, RunConfig, fingerprint_data
from irm.config.training import (CacheConfig, CorpusConfig, DictionariesConfig, DivergenceConfig, EvaluateRewardConfig,
                                 ModelConfig, PrefixSampling, RewardConfig, RLHFConfig, SAEConfig)
from irm.diff.config import DiffConfig

__all__ = [
    "ABLATION_MODES", "LOGGERS", "RENAMED_SECTIONS",
    "ModelConfig", "CorpusConfig", "RewardConfig", "RLHFConfig", "PrefixSampling", "EvaluateRewardConfig",
    "DivergenceConfig", "CacheConfig", "SAEConfig", "DictionariesConfig",
    "ExplainConfig", "TriplesConfig", "RegressionConfig", "LexiconConfig", "ControlConfig", "CalibrateConfig",
    "DiffConfig", "ValidateFeaturesConfig", "AblateConfig",
    "RunConfig", "fingerprint_data", "check_all", "refuse",
]
