"""Lexicon words in text, shared by the triples, lexicon and control stages and the reward: lemma families and the
held-out split (paper E.2), where a word's tokens are in a text and how many it takes, and the words and contexts
in which R is read (paper 5.1)."""

from __future__ import annotations

import random
from typing import Iterable

CARRIER = "the "  # context in which a word's token count is measured: mid-sentence, after a space
FAMILY_RULE = ("lemma family = the word's Porter2 (Snowball English) stem with a trailing 'li', then 'i' or 'e', "
               "removed (3 letters kept at least): love/loved/loves/loving/lovely share 'lov', happy/happily/"
               "happiness share 'happ'. It merges more than a lemmatiser would (derivations too), which only makes "
               "held-out words more surely unseen")


def family(word: str) -> str:
    """The lemma-family key of a word (FAMILY_RULE): words with the same key are held out or used together."""
    import snowballstemmer

    global _STEMMER
    if _STEMMER is None:
        _STEMMER = snowballstemmer.stemmer("english")
    key = _STEMMER.stemWord(word.lower())
    for suffix in ("li", "i", "e"):
        if key.endswith(suffix) and len(key) - len(suffix) >= 3:
            key = key[: -len(suffix)]
    return key


_STEMMER = None


def heldout_words(lexicon: dict[str, float], fraction: float, seed: int,
                  always: Iterable[str] = ()) -> dict[str, list[str]]:
    """A seeded `fraction` of the lexicon's lemma families (FAMILY_RULE), held out whole, plus the families of the
    words in `always` (triples.heldout_words) on top of them: every positive and negative lexicon word of a chosen
    family, each list sorted, and the family keys (`families`). No word of a held-out family is used by a triple, so
    R never sees a held-out word or its inflections. The seeded draw is over the families not in `always` (the same
    draw as without them when `always` is empty)."""
    families: dict[str, list[str]] = {}
    for w, v in lexicon.items():
        if v != 0:
            families.setdefault(family(w), []).append(w)
    keys = sorted(families)
    forced = {family(w) for w in always} & set(keys)  # a family with no lexicon word holds nothing out
    rest = [k for k in keys if k not in forced]
    drawn = random.Random(f"irm-heldout-families:{seed}").sample(rest, min(len(rest), round(fraction * len(keys))))
    chosen = sorted(forced | set(drawn))
    words = [w for k in chosen for w in families[k]]
    return {"positive": sorted(w for w in words if lexicon[w] > 0),
            "negative": sorted(w for w in words if lexicon[w] < 0),
            "families": chosen}


def locate(tokenizer, text: str, start: int, end: int) -> tuple[list[int], list[int]]:
    """Token ids of `text` (with the tokenizer's special tokens) and the indices of the tokens covering characters
    [start, end): the word's positions, found from offsets so it is right whatever the tokenizer merges."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    positions = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
    return list(enc["input_ids"]), positions


def token_counts(tokenizer, words: Iterable[str]) -> dict[str, int]:
    """How many tokens each word takes mid-sentence (after `CARRIER`)."""
    words = sorted(set(words))
    if not words:
        return {}
    enc = tokenizer([CARRIER + w for w in words], return_offsets_mapping=True, add_special_tokens=False)
    start = len(CARRIER)
    return {
        w: sum(1 for a, b in offsets if b > a and b > start)
        for w, offsets in zip(words, enc["offset_mapping"])
    }


