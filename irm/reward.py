"""The RLHF training reward (paper 4.1, eq. 3): lexicon values of spaCy tokens (VADER's, or a file of the user's:
`reward.lexicon`), summed, scaled and clipped; or, as in the paper's appendix F, the positive-label logit of a
sentiment classifier.

`reference_lexicon(reward_cfg)` is the one place every consumer gets the word values of the reward the model was
trained on: the reward itself, the triples, the lexicon stage's tau, the control's taus and per-word moves, the
offline labeller and the explainer's reward description.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Callable, Collection, Mapping, Optional, Sequence

from irm.config import RewardConfig
from irm.errors import UserError
from irm.reward_lexicon import read_lexicon

Reward = Callable[[list[str]], list[float]]


def vader_lexicon() -> dict[str, float]:
    """word -> mean human rating in [-4, 4], parsed from the `vader_lexicon.txt` that `vaderSentiment` ships
    (word<TAB>mean<TAB>std<TAB>ratings; 7,506 words; a word listed twice keeps its last value, as VADER does)."""
    text = resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8")
    lexicon = {}
    for line in text.splitlines():
        if line.strip():
            word, mean = line.split("\t")[:2]
            lexicon[word] = float(mean)
    return lexicon


def reference_lexicon(reward_cfg: RewardConfig) -> dict[str, float]:
    """word -> value of the reward the model was trained on, read by every consumer (the reward, triples, the lexicon
    stage, control, the offline labeller, the explainer's description): the `reward.lexicon` file when set, else
    VADER's lexicon; for `reward.kind: classifier`, the classifier's own word values (`classifier_lexicon`)."""
    if reward_cfg.kind == "classifier":
        return classifier_lexicon(reward_cfg)
    return vader_lexicon() if reward_cfg.lexicon is None else read_lexicon(reward_cfg.lexicon)


def reference_name(reward_cfg: RewardConfig) -> str:
    """What the reference word values are, in a few words, for the report."""
    if reward_cfg.kind == "classifier":
        return f"the classifier {reward_cfg.classifier}'s word values, probed in neutral contexts ({PROBE_RULE_SHORT})"
    if reward_cfg.lexicon is None:
        return "the VADER lexicon (the training reward's own)"
    return f"the training reward's lexicon {reward_cfg.lexicon}"


def is_vader(reward_cfg: RewardConfig) -> bool:
    return reward_cfg.kind == "lexicon" and reward_cfg.lexicon is None


def planted_words(lexicon: Mapping[str, float]) -> dict[str, float]:
    """The words whose value in `lexicon` has another sign than in VADER (a word VADER lacks counts 0): what a
    training reward says that the base model's sentiment knowledge does not (empty for VADER itself)."""
    vader = vader_lexicon()
    return {w: v for w, v in lexicon.items() if _sign(v) != _sign(vader.get(w, 0.0))}


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


# ---------------------------------------------------------------------------------------------------------------
# Probing a reward for its word values

PROBE_CONTEXTS = ("{}", "{}.", "It was {}.", "The film is {}.", "I would call it {}.")
PROBE_FILLERS = ("table", "chair", "door", "window", "paper")  # neutral nouns, in no sentiment lexicon
PROBE_RULE = (
    "a word's value is the reward's mean over the neutral contexts " + " | ".join(repr(c) for c in PROBE_CONTEXTS)
    + " with the word in the slot, minus the mean over the same contexts with each neutral filler ("
    + ", ".join(PROBE_FILLERS) + ") in the slot. For a classifier reference, a word whose value is no larger than "
    "the largest |value| of a filler (the probe's own noise) counts 0 and is left out, and the values are scaled so "
    "the largest |value| is 4 (VADER's range). For a lexicon reward the probe gives value / reward.scale exactly")
PROBE_RULE_SHORT = "mean reward of the word in 5 neutral contexts minus that of neutral fillers"


def probe_values(reward: Reward, words: Sequence[str]) -> tuple[list[float], list[float]]:
    """(each word's value, each filler's value) under PROBE_RULE: the reward asked about each word on its own."""
    fills = list(words) + list(PROBE_FILLERS)
    texts = [c.format(w) for w in fills for c in PROBE_CONTEXTS]
    scores = reward(texts)
    n = len(PROBE_CONTEXTS)
    means = [sum(scores[i * n:(i + 1) * n]) / n for i in range(len(fills))]
    baseline = sum(means[len(words):]) / len(PROBE_FILLERS)
    return [m - baseline for m in means[: len(words)]], [m - baseline for m in means[len(words):]]


def classifier_lexicon(reward_cfg: RewardConfig) -> dict[str, float]:
    """The classifier reward's word values (PROBE_RULE) over VADER's one-word entries, cached on disk by classifier,
    label and rule (`irm.models.cache_dir()`): the reference a classifier-trained model is compared with."""
    from irm.artifacts import fingerprint, local_checksum, read_json, write_json
    from irm.models import cache_dir

    source = reward_cfg.classifier or ""
    ident = [source, reward_cfg.positive_label, PROBE_RULE, local_checksum(source) if source else None]
    path = cache_dir() / "probes" / f"{fingerprint(*ident)}.json"
    if path.is_file():
        return read_json(path)
    words = sorted(w for w in vader_lexicon() if w.isalpha())
    values, fillers = probe_values(build_reward(reward_cfg), words)
    noise = max(abs(v) for v in fillers)
    kept = {w: v for w, v in zip(words, values) if abs(v) > noise}
    if not kept:
        raise UserError(f"the classifier {source!r} scores no word apart from neutral fillers (probe: "
                        f"{PROBE_RULE_SHORT}); check reward.positive_label, or give reward.lexicon instead")
    top = max(abs(v) for v in kept.values())
    lexicon = {w: 4.0 * v / top for w, v in kept.items()}
    write_json(path, lexicon)
    return lexicon


def spacy_tokenizer(pipeline: str):
    """`blank:<lang>` (the default `blank:en` tokenises exactly as `en_core_web_md`, with no download) or the name
    or path of an installed spaCy pipeline, of which only the tokenizer runs."""
    import spacy

    if pipeline.startswith("blank:"):
        try:
            return spacy.blank(pipeline.removeprefix("blank:")).tokenizer
        except (ImportError, ValueError) as e:  # spaCy: unknown language code
            raise UserError(f"spaCy has no language {pipeline!r}; use reward.spacy_pipeline: blank:en") from e
    try:
        return spacy.load(pipeline).tokenizer
    except OSError as e:
        raise UserError(f"spaCy pipeline {pipeline!r} is not installed; install it (python -m spacy download "
                        f"{pipeline}) or use reward.spacy_pipeline: blank:en, which tokenises the same") from e


class LexiconReward:
    """Paper eq. 3: clip(sum of V(token.lower()) over the spaCy tokens of prefix+completion / scale, -clip, clip).
    Tokens absent from the lexicon count 0."""

    def __init__(self, scale: float = 5.0, clip: float = 10.0, spacy_pipeline: str = "blank:en",
                 lexicon: Optional[Mapping[str, float]] = None):
        if not (scale > 0 and math.isfinite(scale)) or not (clip > 0 and math.isfinite(clip)):
            raise UserError(f"reward.scale ({scale}) and reward.clip ({clip}) must be positive finite numbers")
        self.scale = float(scale)
        self.clip = float(clip)
        self.lexicon: dict[str, float] = dict(vader_lexicon() if lexicon is None else lexicon)
        self._tokenizer = spacy_tokenizer(spacy_pipeline)

    def __call__(self, texts: list[str]) -> list[float]:
        if isinstance(texts, str):
            raise TypeError("LexiconReward takes a list of texts, not one string")
        lexicon = self.lexicon
        rewards = []
        for doc in self._tokenizer.pipe(texts, batch_size=256):
            total = sum(lexicon.get(token.lower_, 0.0) for token in doc)
            rewards.append(min(max(total / self.scale, -self.clip), self.clip))
        return rewards

    def split_sums(self, texts: Sequence[str], words: Collection[str]) -> tuple[list[float], list[float]]:
        """Each text's lexicon sum over the tokens in `words` and over the other tokens, each over `scale`, not
        clipped: what a set of words (e.g. the planted ones) contributes to the reward, and what the rest does."""
        inside, outside = [], []
        for doc in self._tokenizer.pipe(list(texts), batch_size=256):
            values = [(token.lower_ in words, self.lexicon.get(token.lower_, 0.0)) for token in doc]
            inside.append(sum(v for w, v in values if w) / self.scale)
            outside.append(sum(v for w, v in values if not w) / self.scale)
        return inside, outside


class ClassifierReward:
    """Paper appendix F: the logit of the positive label of a Hugging Face sequence classifier (the paper used a
    DistilBERT fine-tuned on IMDb), for each text truncated to the classifier's maximum length."""

    def __init__(self, name_or_path: str, positive_label: int = 1, device=None, batch_size: int = 32):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from irm.runtime import resolve_device

        self.device = device if isinstance(device, torch.device) else resolve_device(device or "auto")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=torch.float32)
        except (OSError, ValueError) as e:  # not found / offline / not a sequence classifier
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load the reward classifier {name_or_path!r} ({first}); set reward.classifier "
                            f"to a local directory or a downloaded hub id of a sequence classifier") from e
        n_labels = self.model.config.num_labels
        if not 0 <= positive_label < n_labels:
            raise UserError(f"reward.positive_label {positive_label} is not a label of {name_or_path!r} "
                            f"(it has {n_labels}: {self.model.config.id2label}); fix reward.positive_label")
        if self.tokenizer.pad_token is None:
            # Decoder classifiers (GPT-2 style) ship without a pad token; they read the last non-pad position.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.positive_label = positive_label
        self.batch_size = batch_size
        limits = [self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None)]
        self.max_length = min(int(n) for n in limits if n)

    def __call__(self, texts: list[str]) -> list[float]:
        import torch

        if isinstance(texts, str):
            raise TypeError("ClassifierReward takes a list of texts, not one string")
        rewards: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                logits = self.model(**batch).logits
                rewards += logits[:, self.positive_label].float().tolist()
        return rewards


def build_reward(reward_cfg: RewardConfig, device=None) -> Reward:
    """The reward of `reward_cfg`: a callable list of texts -> list of floats."""
    if reward_cfg.kind == "lexicon":
        return LexiconReward(reward_cfg.scale, reward_cfg.clip, reward_cfg.spacy_pipeline, reference_lexicon(reward_cfg))
    if reward_cfg.kind == "classifier":
        if not reward_cfg.classifier:
            raise UserError("reward.kind: classifier needs reward.classifier: a hub id or local directory of a "
                            "sequence classifier")
        return ClassifierReward(reward_cfg.classifier, reward_cfg.positive_label, device)
    raise UserError(f"unknown reward.kind {reward_cfg.kind!r}; use lexicon or classifier")


DESCRIBED_WORDS = 8  # highest- and lowest-valued words named in a custom lexicon's description


def reward_description(reward_cfg: RewardConfig) -> str:
    """What the RLHF reward favours, in plain language, for the explainer's "related to the reward?" question
    (paper 4.4); `reward_cfg.description` when the user wrote one."""
    if reward_cfg.description:
        return reward_cfg.description
    if reward_cfg.kind == "lexicon" and reward_cfg.lexicon is not None:
        lexicon = reference_lexicon(reward_cfg)
        by_value = sorted(lexicon, key=lambda w: (-lexicon[w], w))
        high = [w for w in by_value if lexicon[w] > 0][:DESCRIBED_WORDS]
        low = [w for w in reversed(by_value) if lexicon[w] < 0][:DESCRIBED_WORDS]
        return (
            f"The reward scores text by the words it contains, using a lexicon of {len(lexicon)} words, each with "
            "its own value: the values of all words in the text are added up, divided by "
            f"{reward_cfg.scale:g} and clipped to [-{reward_cfg.clip:g}, {reward_cfg.clip:g}]. The words worth most "
            f"are {', '.join(high) or 'none'}; the words that cost most are {', '.join(low) or 'none'}; words not in "
            "the lexicon score zero. The values need not follow ordinary sentiment. Negation and context are "
            "ignored: only which words appear matters."
        )
    if reward_cfg.kind == "lexicon":
        return (
            "The reward scores text by the sentiment of its words, using the VADER sentiment lexicon: each word "
            "has a human-rated value from -4 (very negative) to +4 (very positive), the values of all words in the "
            "text are added up, divided by "
            f"{reward_cfg.scale:g} and clipped to [-{reward_cfg.clip:g}, {reward_cfg.clip:g}]. Text with many "
            "strongly positive words (great, love, wonderful, excellent, happy, beautiful) scores high; text with "
            "negative words (bad, hate, awful, terrible, boring, sad) scores low; words without sentiment (the, "
            "film, plot, actor) score zero. Negation and context are ignored: only which words appear matters."
        )
    label = _label_name(reward_cfg.classifier, reward_cfg.positive_label)
    return (
        f"The reward is the logit of the {label} label of the sentiment classifier {reward_cfg.classifier}: text "
        "the classifier judges positive (praise, enthusiasm, approval) scores high, text it judges negative "
        "(criticism, disappointment, complaint) scores low."
    )


def _label_name(classifier: Optional[str], positive_label: int) -> str:
    """The classifier's own name for the rewarded label when its config is on disk, else `positive` (#k)."""
    config = Path(classifier or "") / "config.json"
    if classifier and config.is_file():
        try:
            name = json.loads(config.read_text(encoding="utf-8")).get("id2label", {}).get(str(positive_label))
        except (OSError, json.JSONDecodeError):
            name = None
        if name and not name.startswith("LABEL_"):
            return repr(name)
    return f"positive (#{positive_label})"
