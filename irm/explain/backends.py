"""The explainer LLM behind `.chat(messages) -> str` (paper 4.4 used GPT-4): any OpenAI-compatible endpoint, an
in-process HF chat model, or a deterministic offline stand-in for tests and air-gapped runs. Other stages reuse
these through `make_backend(cfg.explain)`.

The API key is read from the environment variable the config names and lives only inside the openai client;
every error text that leaves this module has it redacted, since an endpoint may echo request headers back.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from typing import Optional, Protocol

from irm.errors import UserError
from irm.explain import prompts

RETRY_CAP_S = 60.0  # longest wait before asking again after a malformed reply, whatever the backoff says


class ExplainerBackend(Protocol):
    """What every explainer backend provides (the contract `make_backend` returns and the answer caches key on).

    `name`: the backend kind (`offline`, `local`, `openai`, ...); `model`: the model that answers (part of every
    cached answer's key, so another model never reuses an answer); `params`: the generation settings that shape an
    answer (also keyed); `chat(messages)`: one OpenAI-style chat turn in, the answer's text out. It raises
    `BackendError` when no usable answer came (retries included) and `UserError` for a setting the user must fix; it
    must be safe to call from several threads (the explain stage runs `explain.concurrency` requests at once)."""

    name: str
    model: Optional[str]
    params: dict

    def chat(self, messages: list[dict]) -> str: ...


class BackendError(Exception):
    """A request that got no usable answer (retries exhausted or refused); the message holds no secret."""


class OpenAIBackend:
    """Chat completions through the `openai` client: OpenAI itself or any compatible server (vLLM, Ollama,
    llama.cpp server) via `base_url`. Retries rate limits, 5xx, timeouts, dropped connections and malformed
    replies: HTTP faults through the client's own retries (which honour Retry-After), malformed replies here."""

    name = "openai"

    def __init__(self, cfg):
        import openai

        # irm.config.check_all refused an empty explain.model or an unset key before any stage ran.
        key = os.environ[cfg.api_key_env]
        self.model = cfg.model
        self.params = {"max_tokens": cfg.max_new_tokens, "temperature": 0}
        self._env = cfg.api_key_env
        self._base_url = cfg.base_url
        self._retries = cfg.max_retries
        self._backoff = cfg.retry_backoff
        self._secret = key
        self._jitter = random.Random()  # its own stream: waiting must not shift the run's seeded randomness
        self._client = openai.OpenAI(api_key=key, base_url=cfg.base_url, timeout=cfg.timeout,
                                     max_retries=cfg.max_retries)

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.model!r}, base_url={self._base_url!r}, key from ${self._env})"

    def redact(self, text: str) -> str:
        return text.replace(self._secret, f"<${self._env}>") if self._secret else text

    def chat(self, messages: list[dict]) -> str:
        import openai

        # HTTP-level faults (429 with its Retry-After, 408/409, 5xx, timeouts, dropped connections) are retried by
        # the openai client itself, `max_retries` times with its own backoff; what reaches this loop has outlasted
        # them. A 200 whose body is not a chat completion (truncated JSON, no choices) is asked again here.
        malformed = (openai.APIResponseValidationError, _Malformed, ValueError)
        last = ""
        for attempt in range(self._retries + 1):
            try:
                resp = self._client.chat.completions.create(model=self.model, messages=messages, **self.params)
                return self.redact(_content(resp))
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise UserError(f"the endpoint refused the key in ${self._env} (HTTP {e.status_code}); check the key "
                                f"and explain.base_url") from None
            except openai.NotFoundError:
                raise UserError(f"model {self.model!r} or its endpoint was not found at "
                                f"{self._base_url or 'api.openai.com'}; check explain.model and explain.base_url") \
                    from None
            except malformed as e:
                last = f"{type(e).__name__}: {e}"
            except openai.APIStatusError as e:
                raise BackendError(self.redact(f"HTTP {e.status_code} after {self._retries + 1} attempts at most: "
                                               f"{e.message}")) from None
            except openai.APIConnectionError as e:  # timeouts included
                # the client's own words ("Connection error.") hide why; the transport's error it wraps says it
                why = f" ({e.__cause__})" if e.__cause__ is not None and str(e.__cause__) else ""
                raise BackendError(self.redact(f"{type(e).__name__} after {self._retries + 1} attempts: {e}{why}")) \
                    from None
            if attempt < self._retries:
                time.sleep(min(RETRY_CAP_S, self._backoff * 2**attempt * self._jitter.uniform(1.0, 1.25)))
        raise BackendError(self.redact(f"no answer after {self._retries + 1} attempts; last: {last}")) from None


class _Malformed(Exception):
    """A 200 reply without a chat completion in it."""


def _content(resp) -> str:
    choices = getattr(resp, "choices", None)
    message = getattr(choices[0], "message", None) if isinstance(choices, list) and choices else None
    if message is None:
        raise _Malformed(f"reply without choices[0].message: {str(resp)[:200]!r}")
    return message.content or ""


class LocalBackend:
    """An HF chat model in this process (default: the embedded SmolLM2-135M-Instruct), greedy decoding through its
    chat template. Loaded on the first request, so a rerun with nothing left to ask loads nothing; one generation
    at a time, since threads would only contend for the same cores or GPU."""

    name = "local"

    def __init__(self, cfg, device=None):
        self.model = cfg.model or "smollm2-135m-instruct"
        self.params = {"max_new_tokens": cfg.max_new_tokens, "do_sample": False}
        self._device = device
        self._lock = threading.Lock()
        self._loaded = None

    def __repr__(self) -> str:
        return f"LocalBackend(model={self.model!r})"

    def _load(self):
        if self._loaded is None:
            from irm.config import ModelConfig
            from irm.models import load_model

            model, tokenizer = load_model(ModelConfig(name=self.model), device=self._device)
            if not getattr(tokenizer, "chat_template", None):
                raise UserError(f"explain.model {self.model!r} has no chat template; choose an instruction-tuned "
                                f"chat model (e.g. smollm2-135m-instruct)")
            model.eval()
            self._loaded = model, tokenizer
        return self._loaded

    def chat(self, messages: list[dict]) -> str:
        import torch

        with self._lock:
            model, tokenizer = self._load()
            enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with torch.inference_mode():
                out = model.generate(**enc, **self.params, pad_token_id=tokenizer.pad_token_id)
            return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


class OfflineBackend:
    """No model at all: the deterministic top-token summary explainer, for air-gapped runs and tests. It answers this
    package's three prompts by rule, and every answer says so:
    - explanation: the words carrying most of the feature's activation in the records shown (sub-word tokens joined
      into the word they spell, so a feature on the "l" of "lame" names "lame"), with their shares
      ("top-activating tokens "great" (61%), ...");
    - label (`label_method`): 1 when words of the reward's own lexicon (`irm.reward.reference_lexicon`: VADER, the
      `reward.lexicon` file or a classifier's probed words) carry at least half of the named activation. This is a keyword rule on what the feature fires on, not a judgement of meaning: it can only find
      features of the lexicon reward, and says nothing about features an LLM would call related for other reasons;
    - detection: a text activates when it contains one of the named tokens;
    - fuzzing: a text's highlighting matches when a highlighted run holds one of the named tokens."""

    name = "offline"
    # the rule's version is part of the name: answers are cached by backend, model and prompt, so a changed rule must
    # not be served its predecessor's answers (v2: sub-word tokens joined into whole words)
    model = "offline-top-token-summary-v2"
    label_method = ("rule, no LLM: tokens of the training reward's lexicon carry at least half of the activation of "
                    "the tokens the summary names")

    def __init__(self, reward_cfg=None):
        from irm.config import RewardConfig
        from irm.reward import is_vader, reference_lexicon
        from irm.reward_lexicon import lexicon_checksum

        reward_cfg = reward_cfg or RewardConfig()
        self.lexicon = frozenset(reference_lexicon(reward_cfg))
        # answers are cached by backend, model and params: another lexicon must not be served these labels
        self.params = {} if is_vader(reward_cfg) else {"lexicon": lexicon_checksum(reward_cfg) or
                                                       f"classifier {reward_cfg.classifier}"}

    def __repr__(self) -> str:
        return "OfflineBackend()"

    def chat(self, messages: list[dict]) -> str:
        task = prompts.task_of(messages)
        text = messages[-1]["content"]
        if task == "explain":
            return _summarise(prompts.read_activations(text))
        if task == "label":
            shares = _named_shares(prompts.read_explanation(text))
            on_lexicon = sum(share for tok, share in shares.items() if tok in self.lexicon)
            hits = sorted(t for t in shares if t in self.lexicon)
            if shares and on_lexicon >= LEXICON_SHARE * sum(shares.values()):
                return f"Answer: 1 (offline rule: lexicon tokens {', '.join(hits)} carry most of the activation)"
            return "Answer: 0 (offline rule: lexicon tokens carry less than half of the activation)"
        if task in ("detect", "fuzz"):
            words = set(_named_shares(prompts.read_explanation(text))) or _content_words(
                prompts.read_explanation(text))
            if task == "fuzz":  # the highlighted runs, not the whole text, must hold a named word
                marks = [int(bool(words & set(_words(" ".join(prompts.read_highlights(t))))))
                         for t in prompts.read_examples(text)]
                return f"{marks} (offline: a highlighted token is a named token)"
            marks = [int(bool(words & set(_words(t)))) for t in prompts.read_examples(text)]
            return f"{marks} (offline: contains a named token)"
        raise UserError("the offline explain backend answers only irm's explain prompts; set explain.backend to "
                        "local or openai for this stage")


N_SUMMARY_TOKENS = 3  # tokens named by an offline explanation
LEXICON_SHARE = 0.5  # the offline label rule's threshold on the lexicon tokens' share of the named activation


def _whole_words(record: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """A record's tokens joined into the words they spell, each with the activation summed over its tokens: a
    sub-word token (one that starts with a letter or digit and follows one that ends in a letter or digit, with no
    space between) continues the word before it, so " l" + "ame" is "lame" and " odd" + "ly" is "oddly". Only for a
    tokenizer whose tokens carry their spaces (a record with a space-led token): a word-level tokenizer's tokens are
    words already and carry none. The joining reads the tokens' text because this backend, like an LLM, sees only the
    prompt: the tokenizer's `word_ids()` are not in it."""
    words: list[list] = []
    spaced = any(tok[:1].isspace() for tok, _ in record)
    for tok, act in record:
        glued = spaced and words and tok[:1].isalnum() and words[-1][0][-1:].isalnum()
        if glued:
            words[-1][0] += tok
            words[-1][1] += act
        else:
            words.append([tok, act])
    return [(w.strip().lower(), a) for w, a in words]


def _summarise(records: list[list[tuple[str, int]]]) -> str:
    weight: dict[str, int] = {}
    for rec in records:
        for word, act in _whole_words(rec):
            if act > 0 and word:
                weight[word] = weight.get(word, 0) + act
    top = sorted(weight, key=lambda t: (-weight[t], t))[:N_SUMMARY_TOKENS]
    if not top:
        return "nothing: no token activates (offline top-token summary, no LLM)"
    total = sum(weight.values())
    named = ", ".join(f'"{t}" ({100 * weight[t] / total:.0f}%)' for t in top)
    return f"top-activating tokens {named} (offline top-token summary, no LLM)"


_STOP = frozenset("a an and are as at be by feature find for from in is it its of on or that the this to with "
                  "tokens token words word offline summary top activating no llm nothing".split())


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+|[^\w\s]+", text.lower())


def _named_shares(explanation: str) -> dict[str, float]:
    """The quoted tokens of a summary explanation and their shares of the activation (equal shares when the
    explanation gives none); empty for an explanation that quotes nothing."""
    out: dict[str, float] = {}
    for tok, share in re.findall(r'"([^"]+)"(?:\s*\((\d+)%\))?', explanation):
        key = tok.strip().lower()
        out[key] = out.get(key, 0.0) + (float(share) if share else 1.0)
    return out


def _content_words(explanation: str) -> set[str]:
    return {w for w in _words(explanation) if w not in _STOP and w.isalpha()}


def make_backend(explain_cfg, device=None, reward_cfg=None) -> ExplainerBackend:
    """The backend `explain_cfg.backend` names (the offline one labels by `reward_cfg`'s lexicon, VADER when None)."""
    if explain_cfg.backend == "openai":
        return OpenAIBackend(explain_cfg)
    if explain_cfg.backend == "local":
        return LocalBackend(explain_cfg, device=device)
    if explain_cfg.backend == "offline":
        return OfflineBackend(reward_cfg)
    raise UserError(f"explain.backend {explain_cfg.backend!r} is not one of offline, local, openai")
