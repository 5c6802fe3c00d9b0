"""Gemma Scope SAEs: one ``params.npz`` per SAE (Google DeepMind's release).

The file holds five arrays: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
``b_enc [d_sae]``, ``b_dec [d_in]``, ``threshold [d_sae]`` (lower-case ``w_enc``
/ ``w_dec`` are accepted too, as SAELens does). The SAEs are JumpReLU and encode
*without* subtracting ``b_dec`` from the input:
``f = relu(x W_enc + b_enc) · [x W_enc + b_enc > threshold]`` — so
``apply_b_dec_to_input=False``. There is no config file.

Site and model come from the path when it follows the release layout
``<release>/layer_<L>/width_<W>/<id>/params.npz`` (also inside a Hugging Face
cache folder ``models--google--<release>``), release
``gemma-scope-<size>-<pt|it>-<res|mlp|att>``:

- ``-res`` → ``resid_post.L``; ``-mlp`` → ``mlp_out.L``;
- ``-att`` → ``blocks.L.attn.hook_z``: the attention SAEs read the concatenated
  per-head outputs *before* the output projection (``d_in = n_heads·d_head``,
  e.g. 2048 on gemma-2-2b whose d_model is 2304), as SAELens' Gemma Scope
  loader says. That is not ``attn_out.L``, so we keep the SAELens hook name and
  let the model adapter accept or refuse it;
- model ``google/gemma-2-<size>`` (``-it`` for instruction-tuned releases).

The ``embedding`` SAEs (which SAELens rescales by √d_model) get the model but
no site; outside the release layout both stay None. This module only reads.
"""

from __future__ import annotations

import math
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from steer.errors import SAEError
from steer.sae.formats.saelens import check_finite, check_shapes, parse_dtype, stored_dtype, take_tensors
from steer.sae.sae import SAE

PARAMS_FILENAME = "params.npz"
TENSOR_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")

RELEASE = re.compile(r"(?:models--google--)?gemma-scope-(?P<size>\d+b)-(?P<kind>pt|it)-(?P<sublayer>res|mlp|att)(?:-canonical)?")
SITE_OF_SUBLAYER = {"res": "resid_post.{layer}", "mlp": "mlp_out.{layer}", "att": "blocks.{layer}.attn.hook_z"}


def read_gemmascope(path: str | Path, *, dtype: str | torch.dtype | None = None) -> SAE:
    """The SAE in a Gemma Scope ``params.npz`` (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / PARAMS_FILENAME
    where = str(path)
    if not path.is_file():
        raise SAEError(f"missing {path.name}", where=where)
    arrays = _read_npz(path, where)
    tensors = {}
    for name, array in arrays.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise SAEError(f"array {name!r} has dtype {array.dtype}, expected a floating-point dtype", where=where)
        tensors["W_" + name[2:] if name.startswith("w_") else name] = torch.from_numpy(np.ascontiguousarray(array))
    weights = take_tensors(tensors, TENSOR_NAMES, path)
    if tensors:
        unexpected = ", ".join(sorted(tensors))
        raise SAEError(f"unexpected array(s) {unexpected} (a Gemma Scope SAE holds {', '.join(TENSOR_NAMES)})", where=where)
    if weights["W_enc"].dim() != 2:
        raise SAEError(f"array 'W_enc' has shape {list(weights['W_enc'].shape)}, expected [d_in, d_sae]", where=where)
    d_in, d_sae = weights["W_enc"].shape
    check_shapes(
        weights,
        {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)},
        where,
        f"W_enc is [d_in={d_in}, d_sae={d_sae}]",
    )
    stored_dtype(weights, where)
    check_finite(weights, where)
    if dtype is not None:
        target = parse_dtype(dtype)
        weights = {n: t.to(target) for n, t in weights.items()}

    site, model_name, release = _release_layout(path)
    return SAE(
        **weights,
        architecture="jumprelu",
        apply_b_dec_to_input=False,
        normalize_activations="none",
        site=site,
        model_name=model_name,
        metadata={"gemma_scope": release} if release else {},
        source=str(path),
    )


def _read_npz(path: Path, where: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive, each header checked against its member's size before anything is allocated
    (a damaged header may claim terabytes); object arrays (pickles) are refused, never unpickled."""
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                name = member.filename.removesuffix(".npy")
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise ValueError(f"unsupported .npy format version {version}")
                    if dtype.hasobject:
                        raise SAEError(f"array {name!r} holds Python objects (a pickle); steer never unpickles", where=where)
                    size = dtype.itemsize * math.prod(shape)
                    data = f.read(size + 1)
                    if len(data) != size:
                        raise ValueError(f"array {name!r} is {len(data)} bytes, its header says {size}")
                    array = np.frombuffer(bytearray(data), dtype=dtype)
                    arrays[name] = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    except SAEError:
        raise
    except (OSError, ValueError, EOFError, KeyError, TypeError, SyntaxError, OverflowError, RuntimeError,
            NotImplementedError, MemoryError, zipfile.BadZipFile, zlib.error, struct.error) as e:
        raise SAEError(f"cannot read {path.name} as a numpy .npz archive: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                       where=where) from None
    return arrays


def _release_layout(path: Path) -> tuple[str | None, str | None, dict | None]:
    """(site, model name, release info) from a path in the release layout, else Nones."""
    parts = path.parent.parts
    for i, part in enumerate(parts):
        release = RELEASE.fullmatch(part)
        if release is None:
            continue
        sae_id = "/".join(parts[i + 1 :])
        if part.startswith("models--"):  # HF cache: models--google--<repo>/snapshots/<sha>/<sae id>
            sae_id = "/".join(parts[i + 3 :]) if parts[i + 1 : i + 2] == ("snapshots",) else sae_id
        layer = re.fullmatch(r"layer_(\d+)", sae_id.split("/")[0]) if sae_id else None
        size, kind = release.group("size"), release.group("kind")
        model_name = f"google/gemma-2-{size}" + ("-it" if kind == "it" else "")
        info = {"release": part.removeprefix("models--google--"), "sae_id": sae_id}
        if layer is None:
            return None, model_name, info
        site = SITE_OF_SUBLAYER[release.group("sublayer")].format(layer=int(layer.group(1)))
        return site, model_name, info
    return None, None, None
