"""The sections of the pipeline's second half, reading the SAE features out: explanations, contrastive triples, the
IRM regression and the lexicon, the base-model control and its calibration, validation and ablation (paper 4.3-5.2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from irm.config.problems import Problems
from irm.config.training import PrefixSampling


@dataclass
class ExplainConfig:
    """Feature descriptions and reward labels (paper 4.4, E.1, F)."""

    backend: Literal["offline", "local", "openai"] = "offline"
    model: Optional[str] = None  # openai: model name; local: registry alias / hub id / dir (default embedded)
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"  # the key itself is never in a config
    concurrency: int = 4
    max_retries: int = 5  # per request: the openai client's own retries of 429/5xx/timeouts (Retry-After honoured)
    retry_backoff: float = 1.0  # seconds before asking again after a malformed reply; doubles each further time
    timeout: float = 60.0
    max_features: Optional[int] = None  # per layer and dictionary; None: every shared feature
    window: int = 32  # tokens per example window
    n_top: int = 10  # top-activating windows shown
    n_quantile: int = 5  # windows sampled from lower quantiles
    score: bool = True  # score each explanation by detection and by fuzzing (delphi-style; irm.explain.scoring)
    n_score: int = 5  # activating windows (not among those shown) and as many inactive ones per detection test
    max_new_tokens: int = 64


@dataclass
class TriplesConfig:
    """Contrastive (positive, neutral, negative) inputs (paper E.2)."""

    n: int = 2000  # maximum number of triples
    substitution: Literal["lexicon", "llm"] = "lexicon"
    multi_token: Literal["skip", "pool"] = "skip"
    heldout_fraction: float = 0.2  # lexicon lemma families never used in triples: measure generalisation
    # Words whose lemma families are always held out, on top of the seeded heldout_fraction (irm.words.heldout_words):
    # e.g. a planted reward's words (configs/planted.yaml), so no training triple pins their value
    heldout_words: list[str] = field(default_factory=list)
    max_length: int = 64
    context_texts: int = 64  # corpus texts kept from the triples: the lexicon stage reads words in them (unseen contexts)


@dataclass
class RegressionConfig:
    """Sentiment activation deltas and the linear IRM R (paper 4.3, E.2)."""

    batch_size: int = 64
    learning_rate: float = 1.0e-2
    weight_decay: float = 1.0e-4  # ridge
    optimizer: Literal["adam", "sgd", "adamw"] = "adam"  # adam/sgd: coupled decay, whose optimum is the ridge fit
    epochs: int = 50
    val_fraction: float = 0.1
    trainer: dict = field(default_factory=dict)

    def check(self) -> list[str]:
        """Every range problem of this section, one line each (irm.config.check_all and `python -m irm fit`)."""
        ch = Problems(prefix="regression.")
        ch.at_least(self, "batch_size", 1)
        ch.at_least(self, "epochs", 1)
        ch.positive(self, "learning_rate")
        ch.at_least(self, "weight_decay", 0)
        ch.need(self.optimizer in ("adam", "sgd", "adamw"), "regression.optimizer", self.optimizer,
                "must be adam, sgd or adamw")
        ch.fraction(self, "val_fraction", low_open=True)  # R^2 is measured on held-out rows
        return ch.out


@dataclass
class LexiconConfig:
    """Lexicon reconstruction and Kendall tau (paper 5.1, H, I)."""

    contexts_per_word: int = 5
    bootstrap: int = 1000
    sample_size: int = 20  # rows of the table 3/10-style sample
    percentiles: list[float] = field(default_factory=lambda: [10.0, 90.0])  # mapped onto [-4, 4]
    max_words: Optional[int] = None  # a seeded sample of the single-token lexicon words; None: every one


@dataclass
class ControlConfig:
    """Base-model control and nulls (README "What the numbers mean"): the deltas -> R -> lexicon chain on M_base as on M_RLHF, R
    refit on sign-shuffled targets, and R on raw MLP activations (irm.stages.control)."""

    max_words: Optional[int] = 1000  # a seeded sample of the single-token lexicon words, read by both models
    # SAEs of the base chain: `tuned` splices the tuned run's SAEs into M_base (one dictionary for both: the
    # default, see irm/stages/control.py); `base` trains SAEs on M_base's own activations at the same layers (cache and sae
    # stages in <run_dir>/control/base-run), for when RLHF moved the activations too far for one dictionary.
    base_saes: Literal["tuned", "base"] = "tuned"
    permutations: int = 200  # sign-shuffled refits of R per model (p-values down to 1/(n+1))
    bootstrap: int = 1000  # paired bootstrap resamples of words for delta_tau's interval
    ridge_alphas: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    raw: bool = True  # also fit R on the raw MLP activations the SAEs encode
    move_z: float = 3.0  # a word "moved" when its move is this many robust SDs from the median move
    top_words: int = 20  # rows of the per-word table in control.json and the report


@dataclass
class CalibrateConfig:
    """The calibration harness at this run's sizes (irm.calibration; `python -m irm calibrate`): simulated worlds
    through the findings' own code, for each finding's false-positive rate and minimal detectable effect."""

    worlds: int = 10  # worlds per family (null and planted); the full harness (benchmarks/calibration.py): more
    bootstrap: int = 100  # delta_tau's resamples inside each simulated world (a real run: control.bootstrap)
    permutations: int = 79  # sign-shuffled refits inside each simulated world (a real run: control.permutations)
    # The simulated control's words and triples are this run's, capped here for cost (a world at 800 words and 600
    # triples takes ~7 s): with fewer, the minimal detectable effect is an upper bound of this run's.
    max_words: int = 300
    max_triples: int = 200


@dataclass
class ValidateFeaturesConfig:
    threshold: float = 3.0  # paper table 6: inputs where R predicts delta > 3
    n_inputs: int = 500


ABLATION_MODES = ("reconstruction", "error")  # the splices `modes` may name (irm.stages.ablate)


@dataclass
class AblateConfig(PrefixSampling):
    """Zero-ablation of the labelled features (paper 5.2, table 5) with controls."""

    n_prompts: int = 200
    # Random feature sets, each one more generation pass over the prompts: the labelled set is compared with their
    # spread by a t prediction interval of half-width t(D-1) sqrt(1 + 1/D) s (2.37 s at 10 draws, 4.97 s at 3).
    random_draws: int = 10
    match_pool: int = 10  # a random control feature is drawn among the this many nearest in frequency and contribution
    # reconstruction: the layer output replaced by the SAE's reconstruction (the paper); error: the SAE's error kept
    modes: list[str] = field(default_factory=lambda: list(ABLATION_MODES))
