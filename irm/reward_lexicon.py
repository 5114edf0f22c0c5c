"""The reward's lexicon file (`reward.lexicon`): reading it, its checksum (what fingerprints hold in place of its
path) and whether it can serve a run once the triples hold out their lemma families. Below irm.config, which checks
the file and fingerprints it before any stage runs; irm.reward builds the reward from it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from irm.errors import UserError


LEXICON_FORMATS = (".csv or .tsv (word, value per line; a header line whose value cell is not a number is skipped) "
                   "or .json (an object {word: value})")


def read_lexicon(path: str | Path) -> dict[str, float]:
    """word -> value from a lexicon file (LEXICON_FORMATS). Words are lower-cased, as the reward matches spaCy tokens'
    lower case; a word listed twice with one value is kept once. Every problem a user can cause (missing,
    unreadable, a value that is not a finite number, a word listed twice with different values, nothing in it) is one
    UserError line with its fix."""
    import csv

    path = Path(path).expanduser()
    fix = f"give reward.lexicon a {LEXICON_FORMATS} file"
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".json"):
        raise UserError(f"reward.lexicon {path} is not a .csv, .tsv or .json file; {fix}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"reward.lexicon {path} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"reward.lexicon {path} cannot be read ({type(e).__name__}); {fix} in UTF-8") from None
    if suffix == ".json":
        try:
            obj = json.loads(text, object_pairs_hook=lambda pairs: pairs)  # every pair: a repeated key is seen
        except json.JSONDecodeError as e:
            raise UserError(f"reward.lexicon {path} is not valid JSON ({e.msg}, line {e.lineno}); {fix}") from None
        if not (isinstance(obj, list) and text.lstrip().startswith("{")):
            raise UserError(f"reward.lexicon {path} holds a JSON {type(obj).__name__}, not an object; {fix}")
        entries = [(str(k), v, f"key {k!r}") for k, v in obj]
    else:
        rows = csv.reader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        entries = [(row[0], row[1] if len(row) > 1 else None, f"line {i}")
                   for i, row in enumerate(rows, 1) if row and row[0].strip() and not row[0].startswith("#")]
        if entries and _number(entries[0][1]) is None:
            entries = entries[1:]  # a header line
    lexicon: dict[str, float] = {}
    for word, raw, where in entries:
        value, word = _number(raw), word.strip().lower()
        if value is None:
            raise UserError(f"reward.lexicon {path}, {where}: value {raw!r} of {word!r} is not a finite number; "
                            f"{fix}")
        if word in lexicon and lexicon[word] != value:
            raise UserError(f"reward.lexicon {path}: {word!r} is listed twice with different values "
                            f"({lexicon[word]:g} and {value:g}); keep one line per word")
        lexicon[word] = value
    if not any(lexicon.values()):
        raise UserError(f"reward.lexicon {path} has no word with a non-zero value; {fix}")
    return lexicon


def lexicon_problem(reward_cfg, triples_cfg, seed: int) -> Optional[str]:
    """Why the `reward.lexicon` file cannot serve the run (read_lexicon's line, or too few words of a sign once the
    triples hold out their lemma families), else None: irm.config.check_all asks before any stage runs."""
    try:
        lexicon = read_lexicon(reward_cfg.lexicon)
    except UserError as e:
        return str(e)
    if not 0.0 <= triples_cfg.heldout_fraction < 1.0:
        return None  # the range check reports it
    from irm.words import heldout_words

    held = heldout_words(lexicon, triples_cfg.heldout_fraction, seed, triples_cfg.heldout_words)
    held_out = set(held["positive"]) | set(held["negative"])
    n_pos = sum(1 for w, v in lexicon.items() if v > 0 and w not in held_out)
    n_neg = sum(1 for w, v in lexicon.items() if v < 0 and w not in held_out)
    if n_pos < MIN_WORDS_PER_SIGN or n_neg < MIN_WORDS_PER_SIGN:
        return (f"reward.lexicon {reward_cfg.lexicon} leaves {n_pos} positive and {n_neg} negative words outside the "
                f"held-out lemma families (triples.heldout_fraction {triples_cfg.heldout_fraction:g}); the triples "
                f"need at least {MIN_WORDS_PER_SIGN} of each: add words of both signs")
    return None


MIN_WORDS_PER_SIGN = 2  # triples: a positive word to truncate at, a negative substitute of comparable magnitude


def _number(raw) -> Optional[float]:
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and not isinstance(raw, bool) else None


def lexicon_checksum(reward_cfg) -> Optional[str]:
    """sha256 of the `reward.lexicon` file (None without one, "missing" when it cannot be read): what the
    fingerprints of the stages that read the reward hold in place of its path, so editing the file reruns them and
    moving it reruns nothing."""
    from irm.artifacts import sha256_file

    if reward_cfg.lexicon is None:
        return None
    try:
        return sha256_file(Path(reward_cfg.lexicon).expanduser())
    except OSError:
        return "missing"
