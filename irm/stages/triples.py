"""Contrastive triples (paper E.2): corpus texts truncated at their first positive lexicon token, with that token
kept (positive), replaced by a word outside the lexicon (neutral) and by a negative lexicon word (negative).

Offline the substitutes come from the lexicon and the corpus itself: a negative word of comparable magnitude, and
a neutral word that follows the same left neighbour somewhere in the corpus (so "very good" becomes "very long",
"i loved" becomes "i watched"); choices are seeded per text. With `substitution: llm` the explain stage's backend
proposes both words, as the paper did with GPT-3.5; a proposal that breaks the rules falls back to the lexicon.

A seeded `heldout_fraction` of the positive and of the negative lexicon words never appears as a positive or a
substitute, so the lexicon stage can measure how R generalises to words it never saw; the lemma families of the
words in `heldout_words` are held out on top of them, whatever the seed (configs/planted.yaml's planted words).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Optional

from irm.artifacts import write_json, write_text
from irm.config import RunConfig, TriplesConfig
from irm.errors import UserError
from irm.readers import VARIANTS
from irm.stages import relpath
from irm.words import FAMILY_RULE, family, heldout_words, locate, token_counts

TRIPLES_JSONL = relpath("triples")
TRIPLES_JSON = relpath("triples_summary")
LLM_ANSWERS = "triples_llm.jsonl"  # append-only LLM answers: a rerun never pays twice
NEGATIVE_POOL = 5  # a negative substitute is drawn among this many closest in magnitude: spreads rows over words
MIN_NEUTRAL_LEN = 3  # neutral substitutes of 1-2 letters are function words ("a", "i"), not slot fillers


# ---------------------------------------------------------------------------------------------------------------
# Words and tokens


def fit_prefix(tokenizer, prefix: str, words: Iterable[str], max_length: int) -> str:
    """`prefix` cut from the left at a token boundary until `prefix + word` is at most `max_length` tokens for
    every word: the sentiment word, at the end, always survives."""
    words = list(words)
    while True:
        longest = max(words, key=lambda w: len(tokenizer(prefix + w)["input_ids"]))
        enc = tokenizer(prefix + longest, return_offsets_mapping=True, add_special_tokens=True)
        excess = len(enc["input_ids"]) - max_length
        if excess <= 0:
            return prefix
        real = [(a, b) for a, b in enc["offset_mapping"] if b > a]
        cut = min(excess, len(real) - 1)
        if cut <= 0 or real[cut][0] >= len(prefix):
            return ""
        prefix = prefix[real[cut][0]:].lstrip()


def match_case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() and not like.isupper() else word


# ---------------------------------------------------------------------------------------------------------------
# Substitutes


class Substitutes:
    """Lexicon substitution: a negative word of comparable magnitude and a neutral word absent from the lexicon,
    preferring words the corpus shows after the same left neighbour (they fit the slot)."""

    def __init__(
        self,
        lexicon: dict[str, float],
        heldout: set[str],
        follows: dict[str, set[str]],
        positive_lefts: set[str],
        usable: Callable[[str], bool],
    ):
        self.follows = follows
        held_families = {family(w) for w in heldout}
        self.negatives = {
            w: v for w, v in lexicon.items() if v < 0 and w.isalpha() and w not in heldout and usable(w)
        }
        if not self.negatives:
            raise UserError("no usable negative lexicon word to substitute; lower triples.heldout_fraction or use "
                            "triples.multi_token: pool")

        def neutral_ok(w: str) -> bool:
            return (w.isalpha() and len(w) >= MIN_NEUTRAL_LEN and w not in lexicon and usable(w)
                    and family(w) not in held_families)

        self.neutral_ok = neutral_ok
        slot = {w for left in positive_lefts for w in follows.get(left, ())}
        self.neutral_default = sorted(w for w in slot if neutral_ok(w)) or sorted(
            {w for nexts in follows.values() for w in nexts if neutral_ok(w)}
        )
        if not self.neutral_default:
            raise UserError("the corpus has no word outside the lexicon to use as a neutral substitute; use a "
                            "larger corpus or triples.substitution: llm")

    def neutral(self, left: str, rng: random.Random) -> str:
        fits = sorted(w for w in self.follows.get(left, ()) if self.neutral_ok(w))
        return rng.choice(fits or self.neutral_default)

    def negative(self, value: float, left: str, rng: random.Random) -> str:
        fits = [w for w in self.follows.get(left, ()) if w in self.negatives]
        pool = fits or list(self.negatives)
        pool.sort(key=lambda w: (abs(abs(self.negatives[w]) - value), w))
        return rng.choice(pool[:NEGATIVE_POOL])


LLM_SYSTEM = "You replace one word in a sentence. Answer with a JSON object only."
LLM_USER = (
    'Text: "{text}"\n'
    'The last word, "{word}", is positive. Give one neutral word (no sentiment at all) and one negative word '
    '(the opposite sentiment, of similar strength) that could each replace "{word}" in the same place. '
    'Answer exactly as {{"neutral": "...", "negative": "..."}}.'
)


def parse_llm_answer(answer: str) -> tuple[Optional[str], Optional[str]]:
    """(neutral, negative) from an answer holding a JSON object; None for whatever is missing or not one word."""
    match = re.search(r"\{.*?\}", answer, flags=re.S)
    try:
        obj = json.loads(match.group(0)) if match else {}
    except json.JSONDecodeError:
        obj = {}

    def one_word(v) -> Optional[str]:
        v = str(v).strip().strip(".\"'").lower() if isinstance(v, str) else ""
        return v if v.isalpha() else None

    return one_word(obj.get("neutral")), one_word(obj.get("negative"))


# ---------------------------------------------------------------------------------------------------------------
# The stage


class _LLM:
    """LLM substitution through the explain stage's backend and its answer cache (keyed by backend, model,
    generation parameters and prompt, so another explainer never reuses these answers)."""

    def __init__(self, cfg: RunConfig, path: Path):
        from irm.explain import make_backend
        from irm.explain.features import AnswerCache

        self.cache = AnswerCache(path, make_backend(cfg.explain))
        self.workers = cfg.explain.concurrency if cfg.explain.backend == "openai" else 1

    def answers(self, items: list[tuple[str, str]]) -> list[str]:
        """The answer for each (text, word), asking (concurrently for a remote API) only what is not cached."""
        from concurrent.futures import ThreadPoolExecutor

        def ask(item):
            text, word = item
            messages = [{"role": "system", "content": LLM_SYSTEM},
                        {"role": "user", "content": LLM_USER.format(text=text, word=word)}]
            return self.cache.ask(messages, task="substitute", word=word)

        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(ask, items))


def _corpus_bigrams(texts: list[str], lexicon: dict[str, float], nlp) -> tuple[dict[str, set[str]], set[str]]:
    """Which words follow which (left neighbour -> next words), and which neighbours precede a positive word."""
    from irm.runtime import progress

    follows: dict[str, set[str]] = {}
    positive_lefts: set[str] = set()
    for doc in progress(nlp.pipe(texts, batch_size=256), desc="triples: corpus bigrams", total=len(texts),
                        unit="doc"):
        for a, b in zip(doc[:-1], doc[1:]):
            follows.setdefault(a.lower_, set()).add(b.lower_)
            if lexicon.get(b.lower_, 0.0) > 0:
                positive_lefts.add(a.lower_)
    return follows, positive_lefts


class _TripleMaker:
    """Turns one text into a triple (or the reason it is skipped), counting what it skipped and why."""

    def __init__(self, texts, lexicon, tokenizer, tc: TriplesConfig, seed: int, nlp, held_families, subs):
        self.texts, self.lexicon, self.tokenizer, self.tc, self.seed, self.nlp = texts, lexicon, tokenizer, tc, seed, nlp
        self.held_families, self.subs = held_families, subs
        self.skipped: Counter = Counter()
        self.skipped_multi: set[str] = set()
        self.llm_fallback: Counter = Counter()

    def candidate(self, doc_id: int):
        """(doc_id, prefix, word, value, left neighbour) of a usable text, else why it is skipped."""
        doc = self.nlp(self.texts[doc_id])
        first = next((t for t in doc if self.lexicon.get(t.lower_, 0.0) > 0), None)
        if first is None:
            return "no_positive"
        if family(first.lower_) in self.held_families:
            return "heldout_positive"
        if any(family(t.lower_) in self.held_families for t in doc[: first.i]):
            return "heldout_in_prefix"  # R never reads a held-out family, not even in a context
        left = doc[first.i - 1].lower_ if first.i > 0 else ""
        return doc_id, self.texts[doc_id][: first.idx], first.text, self.lexicon[first.lower_], left

    def _substitutes(self, doc_id: int, value: float, left: str, answer: Optional[str]) -> tuple[str, str]:
        rng = random.Random(f"irm-triples:{self.seed}:{doc_id}")
        neutral, negative = self.subs.neutral(left, rng), self.subs.negative(value, left, rng)
        if answer is not None:
            proposed_neutral, proposed_negative = parse_llm_answer(answer)
            if proposed_neutral and self.subs.neutral_ok(proposed_neutral):
                neutral = proposed_neutral
            else:
                self.llm_fallback["neutral"] += 1
            if proposed_negative in self.subs.negatives:
                negative = proposed_negative
            else:
                self.llm_fallback["negative"] += 1
        return neutral, negative

    def make(self, doc_id: int, prefix: str, word: str, value: float, left: str, answer: Optional[str]):
        """The triple record, else why it is skipped."""
        neutral, negative = self._substitutes(doc_id, value, left, answer)
        words = {"positive": word, "neutral": match_case(neutral, word), "negative": match_case(negative, word)}
        prefix = fit_prefix(self.tokenizer, prefix, words.values(), self.tc.max_length)
        record = {"id": None, "doc_id": doc_id, "prefix": prefix, "words": words,
                  "values": {"positive": value, "negative": self.lexicon[negative]},
                  "substitution": "lexicon" if answer is None else "llm", "texts": {}, "ids": {}, "positions": {}}
        multi = False
        for variant, w in words.items():
            text = prefix + w
            ids, positions = locate(self.tokenizer, text, len(prefix), len(text))
            if not positions:
                return "word_not_tokenised"
            if len(positions) > 1:
                multi = True
                if self.tc.multi_token == "skip":
                    self.skipped_multi.add(w.lower())
            record["texts"][variant], record["ids"][variant], record["positions"][variant] = text, ids, positions
        return "multi_token" if multi and self.tc.multi_token == "skip" else record


def build_triples(
    texts: list[str],
    lexicon: dict[str, float],
    tokenizer,
    tc: TriplesConfig,
    seed: int,
    nlp,
    llm: Optional[_LLM] = None,
) -> tuple[list[dict], dict]:
    """Triples from `texts` (scanned in a seeded order) and the counts that describe them. `tc`'s ranges are
    irm.config.check_all's, checked before any stage runs."""
    from irm.runtime import progress

    heldout = heldout_words(lexicon, tc.heldout_fraction, seed, tc.heldout_words)
    heldout_all = set(heldout["positive"]) | set(heldout["negative"])

    # Pass 1: corpus bigrams, which single-token words can stand in for a positive word.
    follows, positive_lefts = _corpus_bigrams(texts, lexicon, nlp)
    candidates = {w for w, v in lexicon.items() if v < 0} | {w for s in follows.values() for w in s}
    counts = token_counts(tokenizer, candidates)

    def usable(word: str) -> bool:
        if tc.multi_token == "pool":
            return True
        if word not in counts:  # an LLM proposal outside the corpus and the lexicon
            counts.update(token_counts(tokenizer, [word]))
        return counts[word] == 1

    subs = Substitutes(lexicon, heldout_all, follows, positive_lefts, usable)
    multi_token_candidates = sum(1 for w in candidates if counts[w] > 1 and w.isalpha())
    maker = _TripleMaker(texts, lexicon, tokenizer, tc, seed, nlp, set(heldout["families"]), subs)

    # Pass 2: texts in a seeded order, each truncated at its first positive lexicon token.
    order = list(range(len(texts)))
    random.Random(f"irm-triples-order:{seed}").shuffle(order)
    # The first texts of the seeded order are kept from the triples: the lexicon stage reads words in them.
    reserved, order = order[: tc.context_texts], order[tc.context_texts:]
    triples: list[dict] = []
    bar = progress(desc="triples", total=tc.n, unit="triple")
    done = 0
    while len(triples) < tc.n and done < len(order):
        # At most as many texts as triples still wanted: their LLM questions go out together (concurrently for a
        # remote API) and never far beyond what is needed.
        chunk = order[done: done + tc.n - len(triples)]
        done += len(chunk)
        items = []
        for found in map(maker.candidate, chunk):
            if isinstance(found, str):
                maker.skipped[found] += 1
            else:
                items.append(found)
        answers = llm.answers([(p + w, w) for _, p, w, _, _ in items]) if llm is not None else [None] * len(items)
        for item, answer in zip(items, answers):
            made = maker.make(*item, answer)
            if isinstance(made, str):
                maker.skipped[made] += 1
            else:
                made["id"] = len(triples)
                triples.append(made)
                bar.update(1)
    bar.close()

    contexts = unseen_contexts([texts[i] for i in reserved], triples, lexicon, tokenizer, tc.max_length, nlp)
    summary = _summary(triples, maker, tc, seed, heldout, len(texts), multi_token_candidates, contexts, len(reserved))
    if llm is not None:
        summary["llm_fallback"] = {"neutral": maker.llm_fallback["neutral"], "negative": maker.llm_fallback["negative"]}
    return triples, summary


def _summary(triples, maker: _TripleMaker, tc: TriplesConfig, seed: int, heldout: dict, n_texts: int,
             multi_token_candidates: int, contexts: list[str], n_reserved: int) -> dict:
    used = {v: sorted({t["words"][v].lower() for t in triples}) for v in VARIANTS}
    return {
        "n_triples": len(triples),
        "texts_scanned": sum(maker.skipped.values()) + len(triples),
        "texts_available": n_texts,
        "skipped": dict(maker.skipped),
        "substitution": tc.substitution,
        "multi_token": tc.multi_token,
        "multi_token_words_skipped": sorted(maker.skipped_multi),
        "n_multi_token_words_skipped": len(maker.skipped_multi),
        "n_multi_token_candidates": multi_token_candidates,
        "words_used": {v: len(used[v]) for v in VARIANTS},
        "used": used,
        "heldout": {**heldout, "fraction": tc.heldout_fraction, "seed": seed, "always": list(tc.heldout_words),
                    "n_positive": len(heldout["positive"]), "n_negative": len(heldout["negative"])},
        "max_length": tc.max_length,
        "contexts": {"texts": contexts, "n": len(contexts), "reserved_texts": n_reserved,
                     "how": "texts no triple was built from, cut before their first positive lexicon word; a cut "
                            "equal to a triple's prefix is dropped"},
        "family_rule": FAMILY_RULE,
    }


def unseen_contexts(texts: list[str], triples: list[dict], lexicon: dict[str, float], tokenizer, max_length: int,
                    nlp) -> list[str]:
    """Contexts in which the lexicon stage reads words, none of them a training context: each of `texts` (kept
    from the triples) cut before its first positive lexicon word, as a triple's prefix is, and shortened to leave
    room for one word within `max_length` tokens; a cut equal (case and surrounding space aside) to a triple's
    prefix, an empty cut and a repeated cut are dropped."""
    seen = {t["prefix"].strip().lower() for t in triples}
    out: list[str] = []
    for text in texts:
        doc = nlp(text)
        first = next((tok for tok in doc if lexicon.get(tok.lower_, 0.0) > 0), None)
        if first is None or first.idx == 0:
            continue
        prefix = fit_prefix(tokenizer, text[: first.idx], ["x"], max_length - 1)
        key = prefix.strip().lower()
        if key and key not in seen:
            seen.add(key)
            out.append(prefix)
    return out


def run(cfg: RunConfig) -> dict:
    from irm.data import load_texts
    from irm.models import load_tuned
    from irm.reward import reference_lexicon, spacy_tokenizer
    from irm.runtime import start
    from irm.stages import mark_done

    start(cfg.seed, cfg.device)  # seeds; the triples need only the tokenizer, on the CPU
    root = Path(cfg.run_dir)
    _, tokenizer = load_tuned(cfg, device="cpu")
    if not tokenizer.is_fast:
        raise UserError(f"the tokenizer of {cfg.model.name} has no fast (Rust) version; token positions need its "
                        "offset mapping")
    lexicon = reference_lexicon(cfg.reward)
    texts = load_texts(cfg.corpus, cfg.corpus.split, seed=cfg.seed)
    llm = _LLM(cfg, root / LLM_ANSWERS) if cfg.triples.substitution == "llm" else None
    # The reward's own spaCy tokenizer: "first positive lexicon token" means a token the reward counts.
    triples, summary = build_triples(texts, lexicon, tokenizer, cfg.triples, cfg.seed,
                                     spacy_tokenizer(cfg.reward.spacy_pipeline), llm)
    if not triples:
        raise UserError(f"no triple could be built from {len(texts)} texts ({summary['skipped']}); use a corpus "
                        "with positive lexicon words, or triples.multi_token: pool")
    write_text(root / TRIPLES_JSONL, "".join(json.dumps(t) + "\n" for t in triples))
    write_json(root / TRIPLES_JSON, summary)
    outputs = [TRIPLES_JSONL, TRIPLES_JSON] + ([LLM_ANSWERS] if llm is not None else [])
    mark_done(cfg, "triples", outputs, n_triples=len(triples))
    print(f"triples: {summary['n_triples']} triples from {summary['texts_scanned']} texts "
          f"(skipped {summary['skipped']}); words used: {summary['words_used']}; held out: "
          f"{summary['heldout']['n_positive']} positive, {summary['heldout']['n_negative']} negative; "
          f"multi-token words skipped ({cfg.triples.multi_token}): {summary['n_multi_token_words_skipped']}")
    return summary
