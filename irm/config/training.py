"""The sections of the pipeline's first half: the models, the corpus and the reward, PPO and its evaluation, layer
divergence, the activation cache and the SAEs with their comparison (paper 4.1-4.2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from irm.config.problems import Problems


@dataclass
class ModelConfig:
    """The base model M_base. `name` is one of: a registry alias (`smollm2-135m-instruct`, the embedded default;
    `tiny-gpt-neox`, `tiny-gpt-neo`, `tiny-llama`, `tiny-gpt2`: randomly initialised from `RunConfig.seed`),
    a hub id (`EleutherAI/pythia-70m`), a local HF directory, or a `.gguf` file; `tuned` the same for M_RLHF."""

    name: str = "smollm2-135m-instruct"
    # M_RLHF given, not trained: a hub id, local HF directory or .gguf (as `name` accepts) fine-tuned from `name` (a
    # full fine-tune or merged adapters). The rlhf stage then copies it into the run instead of running PPO.
    tuned: Optional[str] = None
    revision: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False  # off unless the user turns it on: hub code runs on this machine
    # Sizes of the tiny models (ignored for real ones).
    tiny_layers: int = 4
    tiny_d_model: int = 64


@dataclass
class CorpusConfig:
    """Texts for PPO prompts, the activation cache, triples and evaluation. `source` is `generated` (the built-in
    review corpus), a `datasets` hub name (`stanfordnlp/imdb`), or local json/jsonl/csv/parquet/txt file(s)."""

    source: str = "generated"
    text_column: str = "text"
    split: str = "train"
    eval_split: str = "test"  # held-out texts: reward evaluation, validation, ablation prompts
    n_documents: int = 4000  # size of the generated corpus (per split); also a cap for loaded corpora
    data_files: Optional[list[str]] = None


@dataclass
class RewardConfig:
    """The RLHF reward. `lexicon`: paper eq. 3 (VADER lexicon or the `lexicon` file, spaCy tokens, sum / scale,
    clipped). `classifier`: positive-label logit of an HF sequence classifier (paper appendix F). Every stage
    compares the model with this reward's word values (irm.reward.reference_lexicon)."""

    kind: Literal["lexicon", "classifier"] = "lexicon"
    # kind lexicon: a .csv/.tsv (word, value) or .json ({word: value}) file of the user's; None: VADER's lexicon
    lexicon: Optional[str] = None
    scale: float = 5.0  # eq. 3 divisor
    clip: float = 10.0  # eq. 3 clip bound
    spacy_pipeline: str = "blank:en"  # `blank:en` tokenises as en_core_web_md does, with no download
    classifier: Optional[str] = None  # hub id or local dir of a sequence classifier
    positive_label: int = 1
    description: Optional[str] = None  # plain-language description for the explainer; None = default for kind


@dataclass
class RLHFConfig:
    """PPO (paper 4.1, appendix C) through TRL 1.12's PPOTrainer."""

    steps: int = 100  # PPO batches (TRL: total_episodes = steps * batch_size)
    batch_size: int = 64
    mini_batch_size: int = 16
    ppo_epochs: int = 4  # TRL default num_ppo_epochs
    learning_rate: float = 1.0e-6
    kl_coef: float = 0.5
    max_grad_norm: float = 1.0
    prompt_min_tokens: int = 2
    prompt_max_tokens: int = 10
    response_length: int = 20
    temperature: float = 1.0
    checkpoint_every: int = 10  # steps between full-state checkpoints
    # After a completed run: keep the last full-state checkpoints (a later, longer run continues from them exactly), or
    # delete them all and skip the last step's (a SmolLM2-135M one is ~3 GB; the tuned policy is saved either way).
    keep_final_checkpoint: bool = True
    bf16: bool = False
    # LoRA (peft): rank 0 is full fine-tuning (the paper). With rank r > 0 the policy trains rank-r adapters on
    # `lora_targets` (`all-linear`: every linear layer of the transformer body, attention and MLP; or a list of module
    # names), TRL's reference model is the policy with its adapters off, and the value model's body is frozen but for
    # adapters of the same shape (its head trains in full). The saved policy is the merged full model either way.
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: str | list[str] = "all-linear"
    # The value model's body frozen at the base model's weights, only its one-output head trained (no adapters): PPO's
    # critic reads the reference pass's last hidden states (that body's) and adds no pass of its own, forward or
    # backward, at the price of a coarser baseline. False: the paper's critic.
    value_head_only: bool = False


@dataclass
class PrefixSampling:
    """Completions sampled after held-out corpus prefixes with the run's sampling rule (irm.sampling.rule), what the
    reward evaluation (table 7) and the ablation (table 5) score. Not a section: both sections extend it, so these
    are their keys (`evaluate_reward.new_tokens`, `ablate.new_tokens`)."""

    prefix_tokens: int = 30  # a prompt is the first this many tokens of a corpus.eval_split text (shorter ones skipped)
    new_tokens: int = 30  # tokens sampled after each prompt (at rlhf.temperature, stopping at end-of-text)
    batch_size: int = 32  # prompts sampled (or read) together in one batch


@dataclass
class EvaluateRewardConfig(PrefixSampling):
    """Paper table 7: mean reward of completions to held-out prefixes, base vs tuned."""

    n: int = 1000  # completions per model (prefixes repeat when the split has fewer)


@dataclass
class DivergenceConfig:
    top_k: int = 5  # paper 4.2


@dataclass
class CacheConfig:
    """MLP activations of the chosen layers over the corpus (paper 4.2)."""

    layers: Optional[list[int]] = None  # None: the divergence stage's top-k layers
    site: Literal["mlp_out", "mlp_hidden"] = "mlp_out"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_length: int = 64  # tokens per document
    batch_size: int = 16
    n_documents: Optional[int] = None  # None: the whole corpus split
    shard_rows: int = 65536


@dataclass
class SAEConfig:
    """Sparse autoencoders (paper 4.2, appendix D)."""

    # dictionary sizes as multiples of d_model (paper table 1: 1x and 2x)
    expansions: list[int] = field(default_factory=lambda: [1, 2])
    activation: Literal["relu", "topk"] = "relu"  # relu: the paper's ReLU + L1; topk: sparsify's k largest codes, no L1
    k: Optional[int] = None  # codes kept per token by topk (required by topk)
    # alpha of the L1 term (paper 4.2: 1e-3; 1.5e-3 for GPT-Neo-125m) on activations normalised to mean norm
    # sqrt(d_model) (when normalize); unused by topk
    l1_coefficient: float = 1.0e-3
    learning_rate: float = 1.0e-3  # Adam step size (paper 4.2)
    batch_size: int = 32
    epochs: int = 3
    tied: bool = True  # decoder = transposed encoder (paper 4.2, appendix J); decoder rows kept at unit norm either way
    normalize: bool = True  # scale activations to mean norm sqrt(d_model); the factor goes into cfg.json
    # dead features: resample (every dead_window steps, towards badly reconstructed inputs, during the first
    # resample_until of training: Anthropic's resampling), auxk (sparsify's auxiliary loss, weight aux_coefficient,
    # k_aux = d_model / 2), none; auto: auxk for topk, resample for relu
    revive: Literal["auto", "resample", "auxk", "none"] = "auto"
    aux_coefficient: float = 0.03125  # AuxK weight (sparsify, OpenAI: 1/32)
    resample_until: float = 0.5  # resampling happens during this fraction of the training steps
    center_input: bool = False  # encoder reads x - b_dec (sparsify's TopK; SAELens apply_b_dec_to_input)
    val_fraction: float = 0.05
    dead_window: int = 1000  # optimizer steps without firing after which a feature counts as dead (and is revived)
    ce_documents: int = 16  # held-out documents for CE loss recovered (0: skip; it runs the tuned model)
    # Batches per loader item, one optimizer step each: > 1 spreads Lightning's per-item work over several steps
    # (same updates), worth it at small batches such as the paper's 32.
    batches_per_item: int = 1
    checkpoint_every: int = 500  # optimizer steps between checkpoints (last.ckpt), what an interrupted run resumes from
    trainer: dict = field(default_factory=dict)  # extra lightning.Trainer arguments (accelerator, devices, ...)

    def check(self) -> list[str]:
        """Every range problem of this section, one line each (the section's one place for them: irm.config.check_all
        and `python -m irm fit` call it before any work)."""
        ch = Problems(prefix="sae.")
        ch.need(bool(self.expansions) and all(isinstance(x, int) and x >= 1 for x in self.expansions)
                and len(set(self.expansions)) == len(self.expansions), "sae.expansions", self.expansions,
                "must be distinct whole numbers >= 1 (e.g. [1, 2])")
        ch.need(self.activation in ("relu", "topk"), "sae.activation", self.activation, "must be relu or topk")
        ch.need(self.activation != "topk" or self.k is not None, "sae.k", self.k,
                "activation topk keeps the k largest codes per token: set sae.k (e.g. 32)")
        ch.at_least(self, "k", 1, optional=True)
        ch.at_least(self, "l1_coefficient", 0)
        ch.positive(self, "learning_rate")
        for name in ("batch_size", "epochs", "dead_window", "batches_per_item", "checkpoint_every"):
            ch.at_least(self, name, 1)
        ch.fraction(self, "val_fraction")
        ch.at_least(self, "ce_documents", 0)  # 0 skips CE loss recovered
        ch.need(self.revive in ("auto", "resample", "auxk", "none"), "sae.revive", self.revive,
                "must be one of auto, resample, auxk, none")
        ch.at_least(self, "aux_coefficient", 0)
        ch.need(0.0 <= self.resample_until <= 1.0, "sae.resample_until", self.resample_until, "must be in [0, 1]")
        clash = sorted(set(self.trainer) & {"max_epochs", "callbacks", "default_root_dir"})
        ch.need(not clash, "sae.trainer", clash,
                "must not set max_epochs, callbacks or default_root_dir (the sae stage sets them; sae.epochs gives "
                "the epochs)")
        return ch.out

    def dictionary_pair(self) -> tuple[int, int]:
        """(small, large) expansions: MMCS compares the two; the small one is the dictionary that is explained,
        spliced for deltas, lexicon and validation, and ablated (paper 4.2-5.2). The one definition of both."""
        from irm.errors import UserError

        expansions = sorted(set(self.expansions))
        if len(expansions) < 2:
            raise UserError(
                f"sae.expansions={self.expansions} gives one dictionary per layer; MMCS compares two: "
                "set sae.expansions: [1, 2] and rerun `python -m irm sae`"
            )
        return expansions[0], expansions[-1]


@dataclass
class DictionariesConfig:
    top_k: int = 10  # shared feature pairs per layer (paper E.1)
    # Pairs of random dictionaries (rows with the two dictionaries' own mean and covariance) for MMCS's chance; the
    # verdict is a t of the real MMCS against their spread. 49 pairs of 576 x 1152 rows: about 3 s a layer
    # (quickstart-sized run, measured), 99 about twice that.
    chance_draws: int = 99
    # Train a second small SAE per layer with another seed (the sae stage's fit, in <run_dir>/dictionaries/seed-pair)
    # and report its MMCS with the first: what "the same features" score. Off by default: one more SAE fit per layer
    # (x1 is a third of the pair's parameters: estimated under 30 s of the quickstart's 81 s sae stage, not measured).
    seed_pair: bool = False
