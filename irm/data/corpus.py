"""Corpus loading for every stage that reads texts (PPO prompts, reward evaluation prefixes, the activation cache,
triples): the generated reviews, local json/jsonl/csv/parquet/txt files, or a `datasets` hub source.

Local files are read here (pyarrow for parquet, the csv and json modules otherwise) rather than through
`datasets.load_dataset(fmt, data_files=...)`, which reads the same formats: that path writes an Arrow copy of every
file into the datasets cache on first use and reports a malformed record as "An error occurred while generating the
dataset" with the row only in its chained cause, where a user needs the file and line to fix it (checked with
datasets 5.2 on a jsonl with a bad second line). Hub sources go through `datasets`."""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import random
import re
from pathlib import Path
from typing import Optional

from irm.artifacts import fingerprint, sha256_file
from irm.config import CorpusConfig
from irm.data import generated
from irm.errors import UserError

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
TEST_FRACTION = 0.1  # held-out share of local files that have no split of their own


def _is_local(source: str) -> bool:
    """A source names local files if it exists, is a glob, or ends in a data-file extension (a missing file then
    gets a "not found" error instead of a hub lookup)."""
    return Path(source).exists() or glob.has_magic(source) or Path(source).suffix.lower() in FORMATS


def _expand(pattern: str) -> list[Path]:
    """Data files named by one path: a file, every data file under a directory (recursively), or a glob."""
    path = Path(pattern)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
    if glob.has_magic(pattern):
        return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not path.is_file():
        raise UserError(f"corpus file {pattern} not found; fix corpus.source/corpus.data_files "
                        f"or use source: generated")
    return [path]


def _split_files(files: list[Path], root: Path, split: str) -> Optional[list[Path]]:
    """Files of `split` when a directory holds per-split files (named like `train.csv`, `test-00000.parquet`,
    `data/test/...`), else None (the files have no splits)."""
    named: dict[str, list[Path]] = {}
    for f in files:
        for part in re.split(r"[/\\_.-]", str(f.relative_to(root)).lower()):
            if part in ("train", "test", "validation", "valid", "dev", "unsupervised"):
                named.setdefault(part, []).append(f)
    if not named:
        return None
    if split not in named:
        raise UserError(f"corpus {root} has files for splits {sorted(named)} but none for split {split!r}; "
                        f"set corpus.split/eval_split to one of them")
    return named[split]


def _read_texts(path: Path, text_column: str) -> list[str]:
    """The non-empty `text_column` values of one file (plain text: one document per non-empty line)."""
    values = _read_column(path, text_column)
    wrong = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if wrong is not None:
        raise UserError(f"column {text_column!r} of corpus file {path} holds {type(wrong).__name__} values, not text; "
                        f"set corpus.text_column to a text column")
    return [v for v in values if v and v.strip()]


def _read_column(path: Path, text_column: str) -> list:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"corpus file {path} has an unsupported extension; use one of {sorted(FORMATS)}")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a damaged or foreign file
            raise UserError(f"corpus file {path} is not a readable parquet file ({_first_line(e)}); "
                        f"re-export it") from e
        columns = table.column_names
        if text_column not in columns:
            raise _missing_column(path, text_column, columns)
        return table.column(text_column).to_pylist()
    try:
        raw = path.read_bytes().decode("utf-8-sig")  # -sig: a spreadsheet's byte-order mark is not part of a text
    except UnicodeDecodeError as e:
        raise UserError(f"corpus file {path} is not UTF-8 (invalid byte at offset {e.start}); "
                        f"convert it, e.g. iconv -t UTF-8 {path.name}") from e
    if fmt == "text":
        return [line for line in raw.splitlines() if line.strip()]
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(raw, newline=""))
        try:
            columns = reader.fieldnames or []
            if text_column not in columns:
                raise _missing_column(path, text_column, columns)
            return [row[text_column] for row in reader]
        except csv.Error as e:  # e.g. a field over the csv module's size limit
            raise UserError(f"corpus file {path} line {reader.line_num} is not valid CSV ({e}); "
                            f"fix it or convert it to jsonl/parquet") from e
    return _json_values(path, raw, text_column)


def _json_values(path: Path, raw: str, text_column: str) -> list:
    """A JSON array of objects, an object of columns, or JSON lines (one object a line), as `datasets` reads them."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        data = []
        for number, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"corpus file {path} line {number} is not valid JSON ({e.msg}); "
                                    f"fix the file") from e
    if isinstance(data, dict):
        if text_column not in data:
            raise _missing_column(path, text_column, list(data))
        column = data[text_column]
        return column if isinstance(column, list) else [column]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"corpus file {path} must hold JSON objects (one per record) with a {text_column!r} field")
    if data and not any(text_column in r for r in data):
        raise _missing_column(path, text_column, list(dict.fromkeys(k for r in data for k in r)))
    return [r.get(text_column) for r in data]


def _missing_column(where, text_column: str, columns) -> UserError:
    present = ", ".join(map(str, columns)) or "none"
    return UserError(f"corpus {where} has no column {text_column!r} (columns: {present}); set corpus.text_column")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _held_out(text: str) -> bool:
    """The deterministic 90/10 split of split-less files: by a hash of the text, so a text is never in both."""
    bucket = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return bucket < TEST_FRACTION * 2**64


def _local_texts(cfg: CorpusConfig, split: str) -> list[str]:
    patterns = list(cfg.data_files) if cfg.data_files else [cfg.source]
    values = []
    for pattern in patterns:
        files = _expand(pattern)
        if not files:
            raise UserError(f"no data files ({', '.join(sorted(FORMATS))}) match {pattern}; "
                            f"fix corpus.source/data_files")
        per_split = _split_files(files, Path(pattern), split) if Path(pattern).is_dir() else None
        if per_split is not None:
            values += [v for f in per_split for v in _read_texts(f, cfg.text_column)]
            continue
        if split not in ("train", "test"):
            raise UserError(f"corpus {pattern} has no splits of its own, only the 90/10 train/test split; "
                            f"set corpus split {split!r} to train or test")
        rows = [v for f in files for v in _read_texts(f, cfg.text_column)]
        values += [v for v in rows if _held_out(v) == (split == "test")]
    return values


def _hub_texts(cfg: CorpusConfig, split: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, split=split)
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError, its own errors ...
        raise UserError(f"could not load corpus {cfg.source!r} split {split!r} through datasets ({_first_line(e)}); "
                        f"check the name and network, or use local files or source: generated") from e
    if cfg.text_column not in ds.column_names:
        raise _missing_column(repr(cfg.source), cfg.text_column, ds.column_names)
    feature = ds.features[cfg.text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(f"column {cfg.text_column!r} of corpus {cfg.source!r} holds {feature}, not text; "
                        f"set corpus.text_column to a text column")
    return [v for v in ds[cfg.text_column] if v and v.strip()]


def load_texts(corpus_cfg: CorpusConfig, split: str, seed: int = 0, n: Optional[int] = None) -> list[str]:
    """The texts of `split` ("train"/"test" or a source's own split name): at most `n` (default
    `corpus_cfg.n_documents`), the same list for the same config, split and seed. Loaded corpora are shuffled with
    `seed` before capping, because sources such as IMDb are sorted by label."""
    cap = corpus_cfg.n_documents if n is None else n
    if not isinstance(cap, int) or cap < 1:
        raise UserError(f"corpus size must be a whole number of documents >= 1, not {cap!r}; fix corpus.n_documents")
    if corpus_cfg.source == "generated" and not corpus_cfg.data_files:
        if split not in ("train", "test"):
            raise UserError(f"the generated corpus has splits train and test, not {split!r}; "
                            f"fix corpus.split/eval_split")
        return generated.generate_reviews(cap, seed, split)
    if corpus_cfg.data_files or _is_local(corpus_cfg.source):
        texts, where = _local_texts(corpus_cfg, split), ", ".join(corpus_cfg.data_files or [corpus_cfg.source])
    else:
        texts, where = _hub_texts(corpus_cfg, split), corpus_cfg.source
    if not texts:
        raise UserError(f"corpus {where} has no non-empty texts in split {split!r}; "
                        f"check the files and corpus.text_column")
    random.Random(f"irm-corpus:{seed}").shuffle(texts)
    return texts[:cap]


def make_prompts(texts: list[str], tokenizer, min_tokens: int, max_tokens: int, seed: int) -> list[list[int]]:
    """PPO prompts (paper 4.1, C): each text truncated to a seeded random length in [min_tokens, max_tokens]
    tokens (or the whole text if shorter); texts with fewer than `min_tokens` tokens are dropped."""
    if not 1 <= min_tokens <= max_tokens:
        raise UserError(f"prompt lengths need 1 <= min ({min_tokens}) <= max ({max_tokens}); "
                        f"fix rlhf.prompt_min_tokens/prompt_max_tokens")
    rng = random.Random(f"irm-prompts:{seed}")
    ids = _token_ids(texts, tokenizer, max_tokens)
    prompts = []
    for row in ids:
        length = rng.randint(min_tokens, max_tokens)  # drawn for every text so one text's length ignores the others
        if len(row) >= min_tokens:
            prompts.append(row[:length])
    return prompts


def prefixes(texts: list[str], tokenizer, n_tokens: int) -> list[list[int]]:
    """The first `n_tokens` tokens of each text that has at least that many (reward evaluation, paper table 7)."""
    if n_tokens < 1:
        raise UserError(f"prefix length must be at least 1 token, not {n_tokens}; fix the prefix_tokens setting")
    return [row for row in _token_ids(texts, tokenizer, n_tokens) if len(row) == n_tokens]


def _token_ids(texts: list[str], tokenizer, max_tokens: int) -> list[list[int]]:
    """Token ids without special tokens (a prompt continues a text, it does not start a new one), cut at
    `max_tokens` by the tokenizer itself so long documents cost nothing."""
    if not texts:
        return []
    # A tokenizer that truncates on the left would keep the ends of texts: let it encode them whole instead.
    right = getattr(tokenizer, "truncation_side", "right") == "right"
    cut = {"truncation": True, "max_length": max_tokens} if right else {}
    encoded = tokenizer(list(texts), add_special_tokens=False, **cut)
    return [list(row[:max_tokens]) for row in encoded["input_ids"]]


def corpus_fingerprint(corpus_cfg: CorpusConfig, split: str, seed: int) -> str:
    """A hash that changes when `load_texts(corpus_cfg, split, seed)` may: the config, split and seed, the
    generator's source for the generated corpus, and each local file's name and checksum."""
    # The `split` argument is what is loaded; the config's split/eval_split names only choose it.
    settings = {k: v for k, v in dataclasses.asdict(corpus_cfg).items() if k not in ("split", "eval_split")}
    parts: list = [settings, split, seed]
    if corpus_cfg.source == "generated" and not corpus_cfg.data_files:
        parts.append(_file_stamp(Path(generated.__file__)))
    elif corpus_cfg.data_files or _is_local(corpus_cfg.source):
        for pattern in corpus_cfg.data_files or [corpus_cfg.source]:
            parts += [_file_stamp(f) for f in _expand(pattern)]
    return fingerprint(*parts)


def _file_stamp(path: Path) -> list:
    """A file by name and content: touching or copying it elsewhere changes nothing, any edit does."""
    return [path.name, sha256_file(path)]
