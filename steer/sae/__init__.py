"""SAEs: the one `SAE` type, and reading/writing it in the formats steer knows.

`load_sae` finds the format from what is on disk:

- a directory with ``cfg.json`` + ``sae_weights.safetensors`` → SAELens (v5 or v6);
- a directory with ``cfg.json`` + ``sae.safetensors`` → EleutherAI sparsify;
  a sparsify run directory with exactly one such hookpoint subdirectory is
  read too, several are an error that lists them;
- a ``params.npz`` file, or a directory holding one → Gemma Scope.

`save_sae` writes the SAELens v6 layout (see `steer.sae.formats.saelens`), so
SAELens can load what steer writes, atomically: into a fresh directory beside
the target, then renamed into place. `describe_sae` is ``steer sae inspect``.

This package reads local files only and never trains. The name ``default``
(the default model's default SAE, shipped pretrained in the package —
`steer.sae.shipped` finds those files — or trained on first use in a checkout
that ships none) is resolved above it, in `steer.saes`, whose `load_sae` is
``steer.load_sae``; nothing here imports `steer.train`.

Hub names (SAELens release ids, Hugging Face repos) are not fetched yet:
`resolve_hub_name` is the one place that will turn a name into a local
directory once steer goes online; today it says so. Nothing here touches a
model or the network.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from steer.errors import SAEError
from steer.sae.formats import gemmascope, saelens, sparsify
from steer.sae.formats.saelens import parse_dtype, save_saelens
from steer.sae.sae import SAE
from steer.sae.shipped import is_shipped_name

__all__ = ["SAE", "load_sae", "save_sae", "describe_sae", "find_sae", "resolve_hub_name"]

READERS = {
    "saelens": saelens.read_saelens,
    "sparsify": sparsify.read_sparsify,
    "gemmascope": gemmascope.read_gemmascope,
}
EXPECTED_LAYOUTS = (
    f"a directory with {saelens.CFG_FILENAME} + {saelens.WEIGHTS_FILENAME} (SAELens), "
    f"{sparsify.CFG_FILENAME} + {sparsify.WEIGHTS_FILENAME} (sparsify), "
    f"or a Gemma Scope {gemmascope.PARAMS_FILENAME}"
)


def load_sae(path_or_name: str | os.PathLike, site: str | None = None, *, dtype: str | torch.dtype | None = None) -> SAE:
    """The SAE at a local path (any format above), cast to ``dtype`` if given; ``site`` overrides whatever site
    the file names. The names ``default`` / ``default:SITE`` are `steer.saes.load_sae`'s (``steer.load_sae``)."""
    if dtype is not None:
        dtype = parse_dtype(dtype, field="dtype argument")
    path = Path(path_or_name).expanduser()
    if not path.exists() and is_shipped_name(str(path_or_name)):
        raise SAEError("the default SAEs are found by steer.load_sae (steer.saes.load_sae); steer.sae.load_sae reads "
                       "local files only", where=f"sae {path_or_name}")
    if not path.exists():
        path = resolve_hub_name(str(path_or_name))
    fmt, location = find_sae(path)
    sae = READERS[fmt](location, dtype=dtype)
    if site is not None:
        sae = dataclasses.replace(sae, site=site)
    return sae


def resolve_hub_name(name: str) -> Path:
    """A local directory for a hub name (SAELens release id, HF repo[/hookpoint]).

    Not implemented yet: steer works from local paths only. This is the hook
    where online resolution (download into a cache, return its path) belongs.
    """
    first = name.split("/", 1)[0]
    looks_like_a_path = name.startswith((".", "/", "~")) or name.endswith((".npz", ".json", ".safetensors")) or (
        "/" in name and Path(first).is_dir())  # `saes/x` where ./saes exists: a local path that is missing
    if looks_like_a_path:
        raise SAEError("no such SAE file or directory", where=f"sae {name}")
    raise SAEError(
        f"{name!r} is not a local path, and loading SAEs by hub name (SAELens release id or Hugging Face repo) "
        "needs network access, which steer does not do yet; download the SAE and pass its local path"
    )


def find_sae(path: str | os.PathLike) -> tuple[str, Path]:
    """``(format, location)`` of the SAE at a local path: format is saelens, sparsify or gemmascope."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".npz":
            return "gemmascope", path
        if path.name in (saelens.CFG_FILENAME, saelens.WEIGHTS_FILENAME, sparsify.WEIGHTS_FILENAME):
            return find_sae(path.parent)
        if path.suffix in saelens.PICKLE_SUFFIXES:
            raise saelens.pickle_refusal(path)
        raise SAEError(f"not an SAE file steer reads; expected {EXPECTED_LAYOUTS}", where=str(path))
    if not path.is_dir():
        raise SAEError("no such file or directory", where=str(path))

    def has(name: str) -> bool:
        return (path / name).is_file()

    if has(saelens.CFG_FILENAME):
        if has(saelens.WEIGHTS_FILENAME):
            return "saelens", path
        if has(sparsify.WEIGHTS_FILENAME):
            return "sparsify", path
        if saelens.pickled_files(path):
            raise saelens.pickle_refusal(saelens.pickled_files(path)[0])
        raise SAEError(
            f"has {saelens.CFG_FILENAME} but no weights: missing {saelens.WEIGHTS_FILENAME} (SAELens) "
            f"or {sparsify.WEIGHTS_FILENAME} (sparsify)",
            where=str(path),
        )
    if has(gemmascope.PARAMS_FILENAME):
        return "gemmascope", path / gemmascope.PARAMS_FILENAME
    hookpoints = sparsify.hookpoint_directories(path)
    if len(hookpoints) == 1:
        return "sparsify", hookpoints[0]
    if hookpoints:
        names = ", ".join(d.name for d in hookpoints)
        raise SAEError(
            f"is a sparsify run with {len(hookpoints)} hookpoints ({names}); pass the one you mean, "
            f"e.g. {hookpoints[0]}",
            where=str(path),
        )
    if saelens.pickled_files(path):
        raise saelens.pickle_refusal(saelens.pickled_files(path)[0])
    raise SAEError(f"no SAE found; expected {EXPECTED_LAYOUTS}", where=str(path))


def save_sae(sae: SAE, directory: str | os.PathLike, *, overwrite: bool = False, sparsity: torch.Tensor | None = None) -> Path:
    """Write ``sae`` as a SAELens v6 directory, atomically; returns the directory.

    Refuses an existing non-empty ``directory`` unless ``overwrite``. The files
    are written into a new directory beside the target and renamed into place,
    so a reader never sees a half-written SAE.
    """
    from steer.export.atomic import atomic_directory

    target = Path(directory).expanduser().resolve()
    try:
        with atomic_directory(target, overwrite=overwrite, what="SAE", error=SAEError) as staging:
            save_saelens(sae, staging, sparsity=sparsity)
    except OSError as e:
        raise SAEError(f"cannot write the SAE: {e}", where=str(target)) from None
    return target


def describe_sae(sae: SAE) -> str:
    """A human-readable summary: settings, shapes, and weight statistics."""
    saelens_name = saelens.ARCHITECTURE_TO_SAELENS[sae.architecture]
    lines = [f"SAE {sae.architecture} (SAELens {saelens_name!r})  d_in={sae.d_in}  d_sae={sae.d_sae}  dtype={_dtype(sae.dtype)}"]

    def row(label: str, value: object) -> None:
        lines.append(f"  {label:<19}{value}")

    row("source", sae.source or "-")
    row("model", sae.model_name or "-")
    row("site", sae.site or "-")
    shapes = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec, "threshold": sae.threshold}
    row("tensors", "  ".join(f"{n} {list(t.shape)}" for n, t in shapes.items() if t is not None))
    centred = "(x - b_dec)" if sae.apply_b_dec_to_input else "x (b_dec not subtracted)"
    row("encode", f"{centred} W_enc + b_enc, then {sae.architecture}")
    normalization = sae.normalize_activations
    if sae.norm_scaling_factor is not None:
        normalization += f" (factor {sae.norm_scaling_factor:.6g})"
    elif normalization == "expected_average_only_in":
        normalization += " (no scaling factor known: inputs are used unscaled, as SAELens does from disk)"
    row("normalization", normalization)
    if sae.architecture == "topk":
        row("k", sae.k)
    if sae.threshold is not None:
        threshold = sae.threshold.detach().float()
        nonpositive = int((threshold <= 0).sum())
        row("threshold", _stats(threshold) + (f"  ({nonpositive} ≤ 0)" if nonpositive else ""))
    row("W_dec row norms", _stats(sae.W_dec.detach().float().norm(dim=1)))
    row("W_enc col norms", _stats(sae.W_enc.detach().float().norm(dim=0)))
    row("b_dec norm", f"{float(sae.b_dec.detach().float().norm()):.4g}")
    row("b_enc", _stats(sae.b_enc.detach().float()))
    row("feature stats", ", ".join(sorted(sae.feature_stats)) or "none")
    if sae.metadata:
        row("metadata", ", ".join(sorted(sae.metadata)))
    return "\n".join(lines)


def _stats(values: torch.Tensor) -> str:
    return f"min {float(values.min()):.4g}  mean {float(values.mean()):.4g}  max {float(values.max()):.4g}"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
