"""EleutherAI sparsify SAEs: one directory per hookpoint, ``cfg.json`` + ``sae.safetensors``.

``cfg.json`` is sparsify's ``SparseCoderConfig`` plus ``d_in``: ``activation``
("topk"; "groupmax" is refused), ``k`` (default 32), ``num_latents`` (0: use
``expansion_factor``, default 32, times ``d_in``), ``normalize_decoder``,
``multi_topk`` (training-only), ``skip_connection`` and ``transcode``. Missing
keys take sparsify's defaults. ``sae.safetensors`` holds ``encoder.weight
[d_sae, d_in]``, ``encoder.bias [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]`` (and ``W_skip [d_in, d_in]`` with a skip connection).

sparsify encodes ``relu((x - b_dec) encoder.weightᵀ + encoder.bias)``, keeps the
top k, and decodes ``f W_dec + b_dec``: our ``topk`` SAE with
``W_enc = encoder.weightᵀ`` and ``apply_b_dec_to_input=True`` (taking the top k
before or after the ReLU gives the same activations). Skip connections,
transcoders, groupmax and signed activations are refused with a `SAEError`.

The hookpoint is the directory's name (``layers.6`` = output of layer 6,
``layers.6.mlp``, ``embed_tokens``) and is kept raw as `SAE.site`; the model
adapter resolves it. The model name comes from the run directory's
``config.json`` (``model``) when there is one. The whole ``cfg.json`` is kept
as ``SAE.metadata["sparsify_cfg"]``. This module only reads.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from steer.errors import SAEError
from steer.sae.formats.saelens import check_finite, check_shapes, parse_dtype, read_json, read_safetensors, stored_dtype, take_tensors
from steer.sae.sae import SAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae.safetensors"
RUN_CONFIG_FILENAME = "config.json"
TENSOR_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")

# sparsify's SparseCoderConfig defaults
DEFAULTS = {"activation": "topk", "expansion_factor": 32, "num_latents": 0, "k": 32}
# options whose true value changes the math in ways our SAE cannot express
REFUSED = {
    "transcode": "transcoders are not supported yet",
    "skip_connection": "skip connections are not supported yet",
    "signed": "signed top-k activations are not supported",
    "embed_skip": "embedding skip connections are not supported",
    "gram_lookup": "n-gram lookup tables are not supported",
}


def read_sparsify(directory: str | Path, *, dtype: str | torch.dtype | None = None) -> SAE:
    """The SAE in one sparsify hookpoint directory."""
    directory = Path(directory).resolve()
    cfg_path = directory / CFG_FILENAME
    where = str(cfg_path)
    cfg = read_json(cfg_path)
    for option, why in REFUSED.items():
        if cfg.get(option):
            raise SAEError(f"{option} is true: {why}", where=where)
    activation = cfg.get("activation", DEFAULTS["activation"])
    if activation != "topk":
        raise SAEError(f"activation {activation!r} is not supported (steer reads sparsify's 'topk')", where=where)
    d_in = _int_field(cfg, "d_in", None, where)
    num_latents = _int_field(cfg, "num_latents", DEFAULTS["num_latents"], where)
    d_sae = num_latents or d_in * _int_field(cfg, "expansion_factor", DEFAULTS["expansion_factor"], where)
    k = _int_field(cfg, "k", DEFAULTS["k"], where)
    if not 1 <= k <= d_sae:
        raise SAEError(f"field 'k' is {k}, expected 1..d_sae={d_sae}", where=where)

    weights_path = directory / WEIGHTS_FILENAME
    tensors = read_safetensors(weights_path)
    wwhere = str(weights_path)
    if "W_skip" in tensors:
        raise SAEError("has a skip connection (W_skip): skip connections are not supported yet", where=wwhere)
    weights = take_tensors(tensors, TENSOR_NAMES, weights_path)
    if tensors:
        raise SAEError(f"unexpected tensor(s) {', '.join(sorted(tensors))} (expected {', '.join(TENSOR_NAMES)})", where=wwhere)
    check_shapes(
        weights,
        {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)},
        wwhere,
        f"cfg.json says d_in={d_in}, {'num_latents' if num_latents else 'd_in·expansion_factor'}={d_sae}",
    )
    stored_dtype(weights, wwhere)
    check_finite(weights, wwhere)
    if dtype is not None:
        target = parse_dtype(dtype)
        weights = {n: t.to(target) for n, t in weights.items()}

    return SAE(
        W_enc=weights["encoder.weight"].T.contiguous(),  # (d_in, d_sae)
        W_dec=weights["W_dec"],
        b_enc=weights["encoder.bias"],
        b_dec=weights["b_dec"],
        architecture="topk",
        k=k,
        apply_b_dec_to_input=True,
        normalize_activations="none",
        site=directory.name,
        model_name=_run_model_name(directory.parent),
        metadata={"sparsify_cfg": cfg},
        source=str(directory),
    )


def hookpoint_directories(run_directory: str | Path) -> list[Path]:
    """The hookpoint subdirectories of a sparsify run directory, in natural order."""
    found = [
        d for d in Path(run_directory).iterdir()
        if d.is_dir() and (d / CFG_FILENAME).is_file() and (d / WEIGHTS_FILENAME).is_file()
    ]
    return sorted(found, key=lambda d: _natural_key(d.name))


def _int_field(cfg: dict, field: str, default: int | None, where: str) -> int:
    if field not in cfg and default is None:
        raise SAEError(f"cfg.json has no field {field!r}", where=where)
    value = cfg.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and field != "num_latents"):
        raise SAEError(f"field {field!r} must be a positive integer, found {value!r}", where=where)
    return value


def _run_model_name(run_directory: Path) -> str | None:
    """``model`` from the run's config.json, if it is there and readable (it is optional)."""
    try:
        model = read_json(run_directory / RUN_CONFIG_FILENAME).get("model")
    except SAEError:
        return None
    return model if isinstance(model, str) else None


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
