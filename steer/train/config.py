"""SAE training recipes: one frozen `TrainConfig`, read from YAML or built from flags.

Every field is documented where it is declared; `field_help` reads those
docstrings back, so the same text is the ``steer sae train`` help and the
error message's list of allowed values (sparsify's habit). Unknown keys,
wrong types and out-of-range values are `TrainError` s naming the file and
field. A recipe is never changed after validation: overrides build a new one
(`TrainConfig.replace`), and `recipe_hash` names the resolved recipe for the
default-SAE cache.

This module never touches a model, a corpus or the disk beyond reading a
recipe file.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

from steer.errors import SteerError

TRAINER_VERSION = 2
"""Bumped when a change to the trainer, or to how it reads a corpus, changes what a recipe produces (part of
`recipe_hash`). 2: directory corpora are read in a fixed pseudo-random file order, not by name."""


class TrainError(SteerError):
    """A training recipe or flag that does not validate."""


Architecture = Literal["topk", "batchtopk"]
BDecInit = Literal["geometric_median", "mean", "zeros"]


@dataclass(frozen=True)
class TrainConfig:
    # -- what to read ------------------------------------------------------------
    model: str = "smollm2-135m-instruct"
    """Model to read activations from: a registry name, a local HF directory, a .gguf file or a hub id."""
    site: str = "resid_post.10"
    """Where the SAE reads: resid_pre.L, resid_post.L, attn_out.L or mlp_out.L (or a SAELens/HF alias)."""
    sites: tuple[str, ...] = ()
    """Several sites instead of `site` (a YAML list, or comma-separated): one model pass up to the deepest caches the activations of all of them on disk (float16), then one SAE per site trains on its cache, saved as OUT/<site>/."""
    corpus: str = "default"
    """Text to train on: `default` (the embedded corpus), a text/JSONL/parquet file, a directory of them, or an HF dataset name (online)."""
    text_field: str = "text"
    """The text column of JSONL, parquet and HF-dataset corpora."""
    held_out: float = 0.05
    """Fraction of the corpus's documents kept out of training for `steer sae eval` (chosen by a hash of each document's text)."""
    context_size: int = 128
    """Tokens per sequence fed to the model (documents are packed, separated by EOS)."""
    skip_first: int = 1
    """Positions at the start of each sequence whose activations are left out (position 0 is an attention sink with an outsized norm)."""

    # -- the SAE -----------------------------------------------------------------
    architecture: Architecture = "topk"
    """topk (saved as SAELens topk) or batchtopk (top k·batch over the whole batch; saved as jumprelu with its learned threshold)."""
    width: int = 4096
    """Number of SAE features (d_sae)."""
    k: int = 32
    """Active features per token (topk), or on average per token (batchtopk)."""
    b_dec_init: BDecInit = "geometric_median"
    """Initial decoder bias: geometric_median or mean of a sample of activations, or zeros."""
    scale_inputs: bool = True
    """Train on inputs scaled so their mean norm is sqrt(d_in) (SAELens expected_average_only_in); the scale is folded into the saved weights."""

    # -- how long and how fast ---------------------------------------------------
    tokens: int = 1_000_000
    """Activations the SAE trains on in total (rounded down to whole batches); this is the tokens-seen count at the end."""
    epochs: int = 1
    """Passes over each distinct activation. 1 streams from the model; N > 1 runs the model over tokens/N corpus tokens once, caches the activations on disk and trains N shuffled passes over the cache."""
    batch_size: int = 4096
    """Activations per optimizer step, summed over data-parallel processes."""
    lr: float | None = None
    """Adam learning rate; default 2e-4 / sqrt(width / 2**14) (Gao et al. 2024)."""
    warmup: float = 0.02
    """Fraction of steps with a linear learning-rate warm-up from 0."""
    decay: float = 0.2
    """Fraction of steps at the end with a linear learning-rate decay to 0."""
    auxk_alpha: float = 0.03125
    """Weight of the AuxK loss that revives dead features (Gao et al. 2024: 1/32)."""
    dead_tokens: int = 200_000
    """A feature that has not fired for this many training activations is dead (and fed by the AuxK loss)."""
    buffer_size: int = 65536
    """Activations in the shuffling buffer when streaming (half of it is handed out per refill)."""
    model_batch_size: int = 16
    """Sequences per model forward pass."""
    seed: int = 0
    """Seed for initialisation and shuffling."""

    # -- bookkeeping -------------------------------------------------------------
    checkpoint_every: int = 100
    """Write a resumable checkpoint every this many steps (and on Ctrl-C)."""
    stats_tokens: int = 65536
    """Training activations used at the end for the feature statistics (density, max, p99) and the batchtopk threshold."""
    device: str | None = None
    """Device for the model and the SAE; default: accelerate's choice (the process's GPU, else cpu)."""

    def __post_init__(self) -> None:
        validate(self)

    # -- derived -----------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.width / 2**14)

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def site_names(self) -> tuple[str, ...]:
        """The sites this recipe trains SAEs for: ``sites``, else ``(site,)``."""
        return self.sites or (self.site,)

    def replace(self, **changes) -> "TrainConfig":
        """A new, validated recipe with ``changes`` (None values are ignored: an unset flag overrides nothing)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "site" in changes and "sites" not in changes:
            changes["sites"] = ()  # --site on a multi-site recipe: that one site
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise TrainError(f"unknown field {unknown[0]!r}; allowed: {', '.join(field_names())}")
        return from_dict({**self.to_dict(), **changes}, where="flags")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


@functools.cache
def field_help() -> dict[str, str]:
    """Each field's docstring (the text under it in the class body)."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def allowed_values(name: str) -> tuple[str, ...] | None:
    hint = get_type_hints(TrainConfig)[name]
    return tuple(get_args(hint)) if get_origin(hint) is Literal else None


# -- validation ---------------------------------------------------------------


def from_dict(values: dict, *, where: str) -> TrainConfig:
    """A TrainConfig from a mapping (a parsed recipe); TrainError naming ``where`` and the field."""
    if not isinstance(values, dict):
        raise TrainError(f"a recipe must be a mapping of field: value, found {type(values).__name__}", where=where)
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise TrainError(f"unknown field {unknown[0]!r}; allowed: {', '.join(field_names())}", where=where)
    if values.get("sites") and "site" in values and where != "flags":
        raise TrainError("give either 'site' (one SAE) or 'sites' (one SAE per site, one model pass), not both", where=where)
    hints = get_type_hints(TrainConfig)
    coerced = {name: _coerce(name, value, hints[name], where) for name, value in values.items()}
    try:
        return TrainConfig(**coerced)
    except TrainError as exc:
        raise TrainError(exc.message, where=where if exc.where is None else f"{where}: {exc.where}") from None


def _coerce(name: str, value, hint, where: str):
    expected = hint
    optional = type(None) in get_args(hint)
    if optional:
        if value is None:
            return None
        expected = next(a for a in get_args(hint) if a is not type(None))
    field = f"field {name!r}"
    if get_origin(expected) is Literal:
        allowed = get_args(expected)
        if value not in allowed:
            raise TrainError(f"{field} is {value!r}; allowed: {', '.join(map(str, allowed))}", where=where)
        return value
    if expected is bool:
        if not isinstance(value, bool):
            raise TrainError(f"{field} must be true or false, found {value!r}", where=where)
        return value
    if expected is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            try:
                value = int(float(value.replace("_", "")))
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainError(f"{field} must be an integer, found {value!r}", where=where)
        return value
    if expected is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainError(f"{field} must be a number, found {value!r}", where=where)
        return float(value)
    if get_origin(expected) is tuple:  # tuple[str, ...]: a YAML list or a comma-separated string
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in items):
            raise TrainError(f"{field} must be a list of non-empty strings, found {value!r}", where=where)
        items = tuple(v.strip() for v in items)
        if len(set(items)) != len(items):
            raise TrainError(f"{field} names a site twice: {', '.join(items)}", where=where)
        return items
    if expected is str:
        if not isinstance(value, str) or not value.strip():
            raise TrainError(f"{field} must be a non-empty string, found {value!r}", where=where)
        return value
    raise AssertionError(f"no coercion for {hint}")  # a new field type: teach _coerce


def validate(c: TrainConfig) -> None:
    """Range checks that need no model (the site is checked against the model later)."""
    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise TrainError(f"field {name!r} is {getattr(c, name)!r}; it must be {rule}")

    need(c.width > 0, "width", "a positive number of features")
    need(c.k >= 1, "k", "at least 1")
    need(c.k <= c.width, "k", f"at most width ({c.width})")
    need(c.context_size >= 2, "context_size", "at least 2")
    need(0 <= c.skip_first < c.context_size, "skip_first", f"in 0..context_size-1 ({c.context_size - 1})")
    need(0.0 <= c.held_out < 1.0, "held_out", "a fraction in [0, 1)")
    need(c.batch_size >= 1, "batch_size", "at least 1")
    need(c.tokens >= c.batch_size, "tokens", f"at least one batch (batch_size {c.batch_size})")
    need(c.epochs >= 1, "epochs", "at least 1")
    need(c.lr is None or c.lr > 0, "lr", "positive")
    need(0.0 <= c.warmup <= 1.0, "warmup", "a fraction in [0, 1]")
    need(0.0 <= c.decay <= 1.0, "decay", "a fraction in [0, 1]")
    need(c.warmup + c.decay <= 1.0, "decay", f"at most 1 - warmup ({1 - c.warmup:g})")
    need(c.auxk_alpha >= 0, "auxk_alpha", "non-negative")
    need(c.dead_tokens >= 1, "dead_tokens", "at least 1")
    need(c.buffer_size >= 2, "buffer_size", "at least 2")
    need(c.model_batch_size >= 1, "model_batch_size", "at least 1")
    need(c.checkpoint_every >= 1, "checkpoint_every", "at least 1")
    need(c.stats_tokens >= 1, "stats_tokens", "at least 1")


# -- files --------------------------------------------------------------------


def load_recipe(path: str | Path, **overrides) -> TrainConfig:
    """The recipe in a YAML file, with ``overrides`` (None = keep the file's value) applied."""
    import yaml

    path = Path(path).expanduser()
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainError(f"cannot read the recipe: {exc.__class__.__name__}: {exc}", where=where) from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise TrainError(f"not valid YAML{at}: {getattr(exc, 'problem', exc)}", where=where) from None
    config = from_dict(values or {}, where=where)
    return config.replace(**overrides) if overrides else config


def recipe_hash(config: TrainConfig) -> str:
    """sha256 (hex, 12 digits) of the resolved recipe and the trainer version."""
    fields = config.to_dict()
    if not fields["sites"]:
        del fields["sites"]  # one-site recipes hash as they did before `sites` existed
    payload = json.dumps({"trainer": TRAINER_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
