"""The feature atlas: what every SAE feature fires on and what it writes, in one SQLite file.

``build_atlas(model, tokenizer, sae, corpus, tokens=N, out=PATH)`` runs ``N``
corpus tokens through the model (only up to the SAE's site, see
`steer.train.activations.SiteReader`) and the SAE, and stores per feature:

- **density** (fraction of the tokens where it fires), **max** and **p99** of its
  activation (p99: nearest rank over the tokens where it fires, as in the SAE's
  own `feature_stats` — `steer.train.statistics`);
- its **top contexts**: the ``contexts`` corpus rows where its activation peaks
  highest, at most one per row (so one long document does not fill the list),
  each a window of ``window`` tokens around the peak with the feature's
  activation at every token;
- its **promoted / suppressed tokens**: the decoder row through the final
  norm's gain and the unembedding (`steer.discover.logit_lens`).

**Text.** The corpus (`steer.data.corpus`; default: the SAE's training corpus,
else the embedded BBC News) is read from its *training* split — the documents
the SAE's recipe did not hold out, so `steer sae eval`'s text stays unseen —
packed into rows of the SAE's training context size. A directory corpus is
read in `steer.data.corpus`'s fixed pseudo-random file order, so a token budget
smaller than the corpus samples all of it. Position 0
of every row (an attention sink with an outsized norm, left out of SAE
training too) is left out of every statistic and of every window.

**Memory.** Bounded by the batch and the running top-``contexts`` buffer
(``d_sae × contexts × window``), plus one ``(feature, value)`` pair per firing
for the exact p99 (≈ 6 bytes × tokens × L0).

**Storage.** SQLite (stdlib ``sqlite3``): tables ``metadata`` (key → JSON
value), ``features`` (one row per feature id, dead ones included),
``contexts`` (feature, rank → tokens as a JSON list of strings, activations as
a little-endian float32 blob) and the FTS5 table ``feature_search`` (per
feature: the tokens it fires on, its promoted tokens, its context text; porter
stemming) that `Atlas.search` ranks with BM25. The file is written to a temp
file beside ``out`` and renamed into place: an error or Ctrl-C leaves nothing.

``default_atlas()`` is the atlas of the default SAE (the shipped resid_post.10 one) on the default model,
built on first use (a progress bar; measured on this 2-core machine kind, quiet: 75 s, 146 s of CPU time; the
deepest shipped site, resid_post.16, 112 s; 4 min 22 s while another job held about one core) and
cached under ``$STEER_CACHE/atlases/<SAE content hash>-<params hash>.db``; a pointer file keyed on the SAE's
files finds it again without torch.
``open_atlas(path)`` reads one: ``Atlas.feature(i)``, ``Atlas.search(text)``,
``Atlas.metadata``. Reading an atlas file needs neither the model nor the SAE.

Never changes the model or the SAE; writes nothing but ``out`` (and its temp file).
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import sqlite3
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from steer.errors import SteerError
from steer.export.atomic import atomic_file, write_text_atomic

FORMAT = "steer-feature-atlas/1"
DEFAULT_TOKENS = 100_000
"""Tokens the default atlas reads: ≈ 9% of the embedded corpus; the build takes 75 s on 2 quiet cores (146 s of CPU
time), most of it the model's pass up to block 10 (profiled at 20k tokens: the pass 60%, writing the SQLite file
20%, the SAE encode and the scan the rest)."""
DEFAULT_WINDOW = 24
"""Tokens per stored context: ``WINDOW_BEFORE`` before the peak, the peak, the rest after it."""
WINDOW_BEFORE = 17
DEFAULT_CONTEXTS = 16
"""Top contexts kept per feature (at most one per corpus row)."""
DEFAULT_TOP_TOKENS = 10
"""Promoted and suppressed tokens kept per feature."""
DEFAULT_CONTEXT_SIZE = 128
SKIP_FIRST = 1
FIRING_FRACTION = 0.5
"""A context token counts as a *firing* token for search when its activation is ≥ this × the context's peak."""
SEARCH_WEIGHTS = (4.0, 2.0, 1.0)
"""BM25 column weights of feature_search: firing tokens, promoted tokens, context text."""


class AtlasError(SteerError):
    """An atlas file that is missing, unreadable or not an atlas; a feature id it does not have."""


# -- what a reader gets ----------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """A window of corpus text around one of a feature's peak activations."""

    tokens: list[str]
    """The window's tokens as text (a leading space kept), in order."""
    activations: list[float]
    """The feature's activation at each token (0 where it does not fire)."""
    max_activation: float
    """The peak: the largest of ``activations``."""

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass(frozen=True)
class FeatureCard:
    """Everything the atlas knows about one feature."""

    id: int
    density: float
    """Fraction of the atlas's tokens where the feature fires (activation > 0)."""
    max_activation: float
    p99: float
    """99th percentile (nearest rank) of its activation over the tokens where it fires; 0 when it never fires."""
    promoted: list[tuple[str, float]]
    """Output tokens its decoder direction raises most, with the logit change per unit of the direction."""
    suppressed: list[tuple[str, float]]
    """Output tokens it lowers most (most negative first)."""
    contexts: list[Context]
    """Top activating contexts, highest peak first (empty for a feature that never fired)."""


class Atlas:
    """A read-only view of an atlas file (safe to share between threads)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        where = f"atlas {self.path}"
        if not self.path.exists():
            raise AtlasError("no such atlas file; build one with `steer features index`", where=where)
        if not self.path.is_file():
            raise AtlasError("is not a file", where=where)
        try:
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            rows = self._db.execute("SELECT key, value FROM metadata").fetchall()
        except sqlite3.DatabaseError as exc:
            raise AtlasError(f"is not a steer feature atlas ({exc})", where=where) from None
        self.metadata: dict = {key: json.loads(value) for key, value in rows}
        if self.metadata.get("format") != FORMAT:
            raise AtlasError(f"is not a steer feature atlas (format {self.metadata.get('format')!r}, expected {FORMAT!r})",
                             where=where)
        self.n_features = int(self.metadata["d_sae"])

    def __len__(self) -> int:
        return self.n_features

    def __enter__(self) -> "Atlas":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def feature(self, i: int) -> FeatureCard:
        """The card of feature ``i``; AtlasError when the SAE has no such feature."""
        try:
            i = operator.index(i)  # ints and numpy integers; not floats or bools' look-alikes
        except TypeError:
            raise AtlasError(f"feature id must be an integer, got {i!r}", where=f"atlas {self.path}") from None
        if not 0 <= i < self.n_features:
            raise AtlasError(f"feature {i!r} is out of range: this atlas's SAE has {self.n_features} features "
                             f"(0..{self.n_features - 1})", where=f"atlas {self.path}")
        density, max_activation, p99, promoted, suppressed = self._db.execute(
            "SELECT density, max_activation, p99, promoted, suppressed FROM features WHERE id = ?", (i,)).fetchone()
        contexts = [
            Context(json.loads(tokens), array("f", blob).tolist(), peak)
            for tokens, blob, peak in self._db.execute(
                "SELECT tokens, activations, max_activation FROM contexts WHERE feature = ? ORDER BY rank", (i,))
        ]
        return FeatureCard(
            id=i, density=density, max_activation=max_activation, p99=p99,
            promoted=[(t, v) for t, v in json.loads(promoted)], suppressed=[(t, v) for t, v in json.loads(suppressed)],
            contexts=contexts,
        )

    def search(self, text: str, limit: int = 20) -> list[FeatureCard]:
        """Features whose firing tokens, promoted tokens or contexts match any word of ``text``, best first (BM25)."""
        words = re.findall(r"\w+", text)
        if not words:
            raise AtlasError(f"search text {text!r} has no words to look for", where="search")
        query = " OR ".join(f'"{w}"' for w in words)
        ids = [row[0] for row in self._db.execute(
            f"SELECT rowid FROM feature_search WHERE feature_search MATCH ? "
            f"ORDER BY bm25(feature_search, {', '.join(map(str, SEARCH_WEIGHTS))}), rowid LIMIT ?",
            (query, int(limit)))]
        return [self.feature(i) for i in ids]


def open_atlas(path: str | os.PathLike) -> Atlas:
    return Atlas(path)


# -- building ---------------------------------------------------------------------------


def atlas_path(sae, params: dict) -> Path:
    """Where the atlas of ``sae`` with these build parameters is cached."""
    from steer.models.loading import cache_root

    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return cache_root() / "atlases" / f"{sae.content_hash()[:16]}-{digest}.db"


def build_params(sae, corpus_spec: str, *, model_name: str, tokens: int, context_size: int | None = None,
                 window: int = DEFAULT_WINDOW, contexts: int = DEFAULT_CONTEXTS, top_tokens: int = DEFAULT_TOP_TOKENS,
                 held_out: float | None = None) -> dict:
    """Everything that decides an atlas's content besides the SAE's weights (its cache key)."""
    record = sae.metadata.get("steer_training", {}).get("recipe", {})
    return {
        "format": FORMAT, "model": model_name, "site": sae.site, "corpus": str(corpus_spec), "split": "train",
        "held_out": float(held_out if held_out is not None else record.get("held_out", 0.0)),
        "tokens": int(tokens), "context_size": int(context_size or sae.metadata.get("context_size") or DEFAULT_CONTEXT_SIZE),
        "window": int(window), "contexts": int(contexts), "top_tokens": int(top_tokens), "skip_first": SKIP_FIRST,
    }


def default_atlas_path(sae) -> Path:
    """Where the default atlas of ``sae`` (the default SAE) is cached, built or not."""
    from steer.models.loading import DEFAULT_MODEL

    return atlas_path(sae, build_params(sae, "default", model_name=DEFAULT_MODEL, tokens=DEFAULT_TOKENS))


def default_atlas(progress: bool = True) -> Path:
    """The default SAE's atlas on the default model and corpus, built on first use and cached.

    Finding it means hashing the default SAE, which needs torch (seconds to import on a small machine);
    so the answer is also kept in a pointer file (`_pointer_path`, keyed by `_pointer_key`: the SAE's files)
    that `quick_default_atlas` reads without torch, for `steer features show`/`search`.
    """
    from steer.models.loading import DEFAULT_MODEL, load_model
    from steer.sae import load_sae
    from steer.saes import default_sae_dir

    sae_dir = default_sae_dir(progress=progress)
    sae = load_sae(sae_dir)
    path = default_atlas_path(sae)
    if not path.is_file():
        if progress:
            print(f"steer: building the default feature atlas into {path} — once", file=sys.stderr)
        model, tokenizer = load_model(DEFAULT_MODEL)
        build_atlas(model, tokenizer, sae, "default", tokens=DEFAULT_TOKENS, out=path, progress=progress,
                    model_name=DEFAULT_MODEL)
    _write_pointer(path, sae_dir)
    return path


def _default_sae_now() -> dict:
    """What the name ``default`` reads now, found without torch: the shipped SAE at the manifest's default site (its
    directory), or — in a checkout that ships none — the SAE the one-site recipe trains (that recipe's bytes)."""
    from steer.data import SAES_DIR

    manifest = SAES_DIR / "manifest.json"
    if manifest.is_file():
        record = json.loads(manifest.read_text(encoding="utf-8"))
        return {"shipped": str(SAES_DIR / record["saes"][record["default_site"]]["path"])}
    recipe = Path(__file__).resolve().parents[2] / "configs" / "smollm2-135m-resid_post.10.yaml"
    return {"recipe_sha256": hashlib.sha256(recipe.read_bytes()).hexdigest() if recipe.is_file() else None}


def _pointer_key(sae_dir: Path) -> dict:
    """What the pointer is valid for: this steer, what ``default`` names now (`_default_sae_now`), and the SAE
    directory the atlas was built from with the sha256 of each of its files — so a changed default SAE (other shipped
    files, another default site, a retrained recipe) never finds the atlas of the old one."""
    from steer import __version__
    from steer.data import file_hashes

    return {"steer": __version__, "source": str(Path(__file__).resolve().parents[1]), "default": _default_sae_now(),
            "sae": str(sae_dir), "sae_files": file_hashes(sae_dir)}


def _pointer_path() -> Path:
    from steer.cache import cache_root

    return cache_root() / "atlases" / "default.json"


def _write_pointer(atlas: Path, sae_dir: Path) -> None:
    write_text_atomic(_pointer_path(), json.dumps({**_pointer_key(Path(sae_dir)), "atlas": str(atlas)}, indent=1),
                      what="atlas pointer", error=AtlasError)


def quick_default_atlas() -> Path | None:
    """The default atlas from the pointer `default_atlas` leaves, without importing torch; None when unsure: another
    steer, another default SAE, or SAE files that are gone or changed since (~20 ms to hash the 9 MB)."""
    try:
        record = json.loads(_pointer_path().read_text())
        sae_dir = Path(record["sae"])
        key = _pointer_key(sae_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if {k: record.get(k) for k in key} != key or not key["sae_files"]:
        return None
    shipped = key["default"].get("shipped")
    if shipped is not None and Path(shipped) != sae_dir:
        return None  # built for another SAE than the one ``default`` reads now
    atlas = Path(record.get("atlas", ""))
    return atlas if atlas.is_file() else None


def build_atlas(model, tokenizer, sae, corpus, *, tokens: int = DEFAULT_TOKENS, out: str | os.PathLike,
                progress: bool = True, model_name: str | None = None, site: str | None = None,
                context_size: int | None = None, window: int = DEFAULT_WINDOW, contexts: int = DEFAULT_CONTEXTS,
                top_tokens: int = DEFAULT_TOP_TOKENS, batch_size: int = 16, held_out: float | None = None,
                overwrite: bool = True) -> Path:
    """Build the atlas of ``sae`` over ``tokens`` tokens of ``corpus`` (a spec string or a `Corpus`) into ``out``.

    See the module docstring for what is stored and how. ``held_out``: the
    fraction of documents to leave out (default: what the SAE's recipe held
    out, else none). Refuses an existing ``out`` unless ``overwrite``.
    """
    import torch

    from steer.data.corpus import Corpus, first_document, open_corpus
    from steer.models.adapters import adapter_for, hidden_size
    from steer.train.activations import SiteReader

    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise AtlasError("already exists; pass --overwrite (overwrite=True) to replace it", where=str(out))
    if out.is_dir():
        raise AtlasError("is a directory; give a file name such as atlas.db", where=str(out))
    if tokens <= 0:
        raise AtlasError(f"tokens must be positive, got {tokens}", where="tokens")
    site_name = site or sae.site
    if site_name is None:
        raise AtlasError("the SAE's config names no site; pass --site", where=sae.source or "sae")
    parsed_site = adapter_for(model).parse_site(str(site_name), model)
    if sae.d_in != hidden_size(model):
        raise AtlasError(f"SAE d_in is {sae.d_in} but the model's hidden size is {hidden_size(model)}",
                         where=sae.source or "sae")
    corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
    name = model_name or str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
    params = build_params(sae, corpus.spec, model_name=name, tokens=tokens, context_size=context_size, window=window,
                          contexts=contexts, top_tokens=top_tokens, held_out=held_out)
    T, held = params["context_size"], params["held_out"]
    window = min(window, T - SKIP_FIRST)
    first_document(corpus, "train", held)  # an empty corpus fails here, before any model work

    started = time.perf_counter()
    param = next(model.parameters())
    sae_here = sae.to(dtype=param.dtype, device=param.device)
    reader = SiteReader(model, parsed_site)
    rows = _rows(corpus, tokenizer, T, held)
    n_rows = -(-tokens // (T - SKIP_FIRST))
    scan = _Scan(sae.d_sae, contexts, window)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_rows * (T - SKIP_FIRST), unit="tok", unit_scale=True, desc="feature atlas", file=sys.stderr)
    try:
        batch: list = []
        done = 0
        for row in rows:
            batch.append(row)
            if len(batch) == batch_size or done + len(batch) == n_rows:
                ids = torch.stack(batch).to(param.device)                       # (B, T)
                with torch.inference_mode():
                    x = reader(ids)[:, SKIP_FIRST:]                             # (B, T-1, d)
                    f = sae_here.encode(x).float().cpu()                        # (B, T-1, d_sae)
                scan.add(ids.cpu(), f, first_row=done)
                done += len(batch)
                batch = []
                if bar is not None:
                    bar.update(ids.shape[0] * (T - SKIP_FIRST))
                if done == n_rows:
                    break
    finally:
        if bar is not None:
            bar.close()
    if done == 0:
        raise AtlasError(f"the corpus has no full {T}-token sequence in its training split", where=f"corpus {corpus.spec}")

    from steer.discover.logit_lens import logit_lens

    stats = scan.finish()
    promoted_ids, promoted_values, suppressed_ids, suppressed_values = logit_lens(model, sae.W_dec, k=top_tokens)
    metadata = {
        **params, "format": FORMAT, "d_sae": sae.d_sae, "d_in": sae.d_in, "site": str(parsed_site),
        "sae": str(sae.source or "<memory>"), "sae_hash": sae.content_hash(), "architecture": sae.architecture,
        "tokens_read": stats["tokens"], "rows": done, "window": window, "build_seconds": round(time.perf_counter() - started, 1),
        "logit_lens": "W_U · (final-norm gain ⊙ W_dec[i]) (centred first for LayerNorm); values in logits per unit",
    }
    texts = _TokenTexts(tokenizer)
    _write_atomically(out, lambda db: _store(db, metadata, stats, scan, texts,
                                              (promoted_ids, promoted_values, suppressed_ids, suppressed_values)))
    return out


def _rows(corpus, tokenizer, context_size: int, held_out: float):
    from steer.data.corpus import token_sequences

    return token_sequences(corpus.documents("train", held_out), tokenizer, context_size)


class _Scan:
    """Running per-feature statistics and top contexts over batches of feature activations."""

    def __init__(self, d_sae: int, contexts: int, window: int):
        import torch

        self.d_sae, self.n, self.window = d_sae, contexts, window
        self.tokens = 0
        self.fired_features: list = []
        self.fired_values: list = []
        # the running top-n buffer, per feature: peak value, global row, window start, window ids, window activations
        self.top_values = torch.full((d_sae, contexts), -1.0)
        self.top_rows = torch.full((d_sae, contexts), -1, dtype=torch.long)
        self.top_starts = torch.zeros((d_sae, contexts), dtype=torch.long)
        self.top_ids = torch.zeros((d_sae, contexts, window), dtype=torch.long)
        self.top_acts = torch.zeros((d_sae, contexts, window))

    def add(self, ids, f, first_row: int) -> None:
        """``ids (B, T)`` token rows, ``f (B, T-1, d_sae)`` activations at positions 1.. of them."""
        import torch

        B, T_f, _ = f.shape
        T = ids.shape[1]
        self.tokens += B * T_f
        fires = f > 0
        features = torch.nonzero(fires)[:, 2]                        # row-major, the same order as f[fires]
        self.fired_features.append(features.to(torch.int16 if self.d_sae < 2**15 else torch.int32))
        self.fired_values.append(f[fires])

        peak, at = f.max(dim=1)                                     # (B, d_sae): first position of each row's peak
        at = at + SKIP_FIRST                                        # position in the row
        start = (at - WINDOW_BEFORE).clamp(min=SKIP_FIRST, max=T - self.window)     # (B, d_sae)
        offsets = torch.arange(self.window)
        positions = start[..., None] + offsets                      # (B, d_sae, W) positions in the row
        b = torch.arange(B)[:, None, None]
        feature = torch.arange(self.d_sae)[None, :, None]
        window_acts = f[b, positions - SKIP_FIRST, feature]         # (B, d_sae, W)
        window_ids = ids[b, positions]                              # (B, d_sae, W)

        # merge: buffer first, so a tie keeps the earlier row (the sort is stable)
        values = torch.cat([self.top_values, peak.T], dim=1)        # (d_sae, n + B)
        order = values.sort(dim=1, descending=True, stable=True).indices[:, : self.n]   # (d_sae, n)
        row_ids = torch.arange(first_row, first_row + B)
        self.top_values = values.gather(1, order)
        self.top_rows = torch.cat([self.top_rows, row_ids.expand(self.d_sae, B)], dim=1).gather(1, order)
        self.top_starts = torch.cat([self.top_starts, start.T], dim=1).gather(1, order)
        expand = order[..., None].expand(-1, -1, self.window)
        self.top_ids = torch.cat([self.top_ids, window_ids.transpose(0, 1)], dim=1).gather(1, expand)
        self.top_acts = torch.cat([self.top_acts, window_acts.transpose(0, 1)], dim=1).gather(1, expand)

    def finish(self) -> dict:
        import torch

        from steer.train.statistics import p99_by_feature

        features = torch.cat(self.fired_features).long() if self.fired_features else torch.zeros(0, dtype=torch.long)
        values = torch.cat(self.fired_values) if self.fired_values else torch.zeros(0)
        counts = torch.bincount(features, minlength=self.d_sae)
        maxima = torch.zeros(self.d_sae).scatter_reduce(0, features, values, reduce="amax", include_self=True)
        return {"tokens": self.tokens, "counts": counts, "density": counts.double() / max(self.tokens, 1),
                "max": maxima, "p99": p99_by_feature(features, values, counts)}


class _TokenTexts:
    """Token id → text, decoded once per id."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            from steer.discover.logit_lens import token_text

            text = self.cache[token_id] = token_text(self.tokenizer, token_id)
        return text


SCHEMA = """
CREATE TABLE metadata (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features (
    id INTEGER PRIMARY KEY, density REAL NOT NULL, fired INTEGER NOT NULL, max_activation REAL NOT NULL,
    p99 REAL NOT NULL, promoted TEXT NOT NULL, suppressed TEXT NOT NULL);
CREATE TABLE contexts (
    feature INTEGER NOT NULL, rank INTEGER NOT NULL, max_activation REAL NOT NULL, corpus_row INTEGER NOT NULL,
    start INTEGER NOT NULL, tokens TEXT NOT NULL, activations BLOB NOT NULL, PRIMARY KEY (feature, rank)) WITHOUT ROWID;
CREATE VIRTUAL TABLE feature_search USING fts5(firing, promoted, context, tokenize = 'porter unicode61');
"""


def _store(db: sqlite3.Connection, metadata: dict, stats: dict, scan: _Scan, texts: _TokenTexts, lens) -> None:
    promoted_ids, promoted_values, suppressed_ids, suppressed_values = (t.tolist() for t in lens)
    db.executescript(SCHEMA)
    db.executemany("INSERT INTO metadata VALUES (?, ?)", [(k, json.dumps(v)) for k, v in sorted(metadata.items())])
    counts, density, maxima, p99 = (stats[k].tolist() for k in ("counts", "density", "max", "p99"))
    top_values, top_rows, top_starts = scan.top_values.tolist(), scan.top_rows.tolist(), scan.top_starts.tolist()
    top_ids, top_acts = scan.top_ids.tolist(), scan.top_acts.numpy()
    for i in range(scan.d_sae):
        promoted = [(texts(t), round(v, 5)) for t, v in zip(promoted_ids[i], promoted_values[i])]
        suppressed = [(texts(t), round(v, 5)) for t, v in zip(suppressed_ids[i], suppressed_values[i])]
        db.execute("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (i, density[i], counts[i], maxima[i], p99[i], json.dumps(promoted), json.dumps(suppressed)))
        firing, context_texts = [], []
        for rank in range(scan.n):
            if top_values[i][rank] <= 0:
                break  # the buffer is sorted: the rest never fired
            tokens = [texts(t) for t in top_ids[i][rank]]
            acts = top_acts[i, rank]
            db.execute("INSERT INTO contexts VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (i, rank, top_values[i][rank], top_rows[i][rank], top_starts[i][rank], json.dumps(tokens),
                        acts.astype("<f4").tobytes()))
            peak = float(acts.max())
            firing.extend(t.strip() for t, a in zip(tokens, acts) if a > 0 and a >= FIRING_FRACTION * peak)
            context_texts.append("".join(tokens))
        db.execute("INSERT INTO feature_search (rowid, firing, promoted, context) VALUES (?, ?, ?, ?)",
                   (i, " ".join(firing), " ".join(t.strip() for t, _ in promoted), " … ".join(context_texts)))


def _write_atomically(out: Path, fill) -> None:
    """``fill(connection)`` into a temp file beside ``out``, then rename it to ``out`` (nothing left on error)."""
    with atomic_file(out, what="atlas", error=AtlasError) as tmp:
        db = sqlite3.connect(tmp)
        try:
            with db:
                fill(db)
        finally:
            db.close()
