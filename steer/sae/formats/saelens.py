"""SAELens SAE directories: read v5 (flat) and v6 (``metadata``) layouts, write v6.

A SAELens directory holds

- ``cfg.json`` — the config. **v6** (SAELens ≥ 6.0): the fields that change
  the math at top level (``architecture``, ``d_in``, ``d_sae``, ``dtype``,
  ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
  ``reshape_activations``; for ``topk`` also ``k`` and
  ``rescale_acts_by_decoder_norm``) plus a nested ``metadata`` dict
  (``model_name``, ``hook_name``, ``sae_lens_version``, ``prepend_bos``,
  ``context_size``, ``dataset_path``, ...). **v5** (flat): all of it at top
  level, with ``activation_fn_str`` + ``activation_fn_kwargs`` (``{"k": ...}``
  for TopK SAEs, which v5 marks ``architecture: "standard"``) and older aliases
  (``hook_point``, ``activation_fn``). SAELens itself decides v5/v6 by
  ``sae_lens_version`` (< 6.0 or absent: v5); we decide by the presence of the
  nested ``metadata`` dict, which v5 never has.
- ``sae_weights.safetensors`` — ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
  ``b_enc [d_sae]``, ``b_dec [d_in]``, and ``threshold [d_sae]`` for jumprelu.
- optionally ``sparsity.safetensors`` — one tensor ``sparsity [d_sae]``,
  ``log10(feature density + 1e-10)``.

Mapping to `SAE`: SAELens ``standard`` ⇄ ``relu``; ``jumprelu`` (SAELens gates
on ``pre > relu(threshold)``, which gives the same activations as our
``relu(pre)·[pre > threshold]``); ``topk`` with ``k`` (default 100, as in
SAELens). Defaults where a key is absent follow SAELens: ``dtype`` float32,
``apply_b_dec_to_input`` true, ``normalize_activations`` "none" (v5 booleans:
true → "expected_average_only_in"). Tensors are cast to the config's ``dtype``
on read, as SAELens does (``dtype=`` overrides), but tensors stored in more than
one dtype are an error.

Conversions on read (same math, tensors no longer bit-equal to the file):

- ``topk`` with ``rescale_acts_by_decoder_norm: true`` (SAELens ≥ 6 trains TopK
  this way) is folded: ``W_enc·n``, ``b_enc·n``, ``W_dec/n`` with ``n`` the
  decoder row norms — the same features and reconstruction, and the written
  config then says false.
- ``log_threshold`` (old jumprelu checkpoints) becomes ``threshold = exp(·)``.
- an all-ones v5 ``scaling_factor`` is dropped (SAELens does the same); any
  other finetuning scaling factor is rejected.

Not supported yet, rejected with a `SAEError`: ``gated``, transcoders
(``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``,
``jumprelu_skip_transcoder``, or any config with ``hook_name_out``), training
checkpoints (``batchtopk``, ``matryoshka_batchtopk``) and every other
architecture.

Where the config goes in `SAE`: ``model_name`` → `SAE.model_name`,
``hook_name`` → `SAE.site` (the raw hook name; the model adapter resolves
aliases); the rest of ``metadata`` → `SAE.metadata` as is; unknown top-level
keys → ``SAE.metadata["saelens_cfg"]``, written back at top level (SAELens
ignores keys its config class does not have). So load → save → load loses
nothing. ``device`` is not kept (SAELens overrides it on load); we write "cpu".

Writing (`save_saelens`) produces the v6 layout so that
``sae_lens.SAE.load_from_disk(directory)`` loads it. ``metadata.sae_lens_version``
must then be ≥ 6, or SAELens re-reads the file as v5 and drops the nested
metadata: a missing or older version is written as "6.0.0" (meaning "v6
layout", not the SAELens version that wrote it; an older one is kept as
``converted_from_sae_lens_version``). Canonical sites are written as SAELens
hook names (``resid_post.12`` → ``blocks.12.hook_resid_post``) so SAELens can
attach the SAE, with the canonical name kept as ``metadata.steer_site`` and
read back from there while it still matches ``hook_name``. An SAE with a
``norm_scaling_factor`` c (expected_average_only_in, not folded) is written
folded — ``W_enc·c``, ``W_dec/c``, ``b_dec/c``, ``normalize_activations:
"none"`` — as SAELens folds it on load, because SAELens has no config field
for c.

steer's own addition: ``feature_stats.safetensors`` beside the weights, one
``[d_sae]`` tensor per statistic of `SAE.feature_stats` (``p99``, ``max``,
``density``, ...). SAELens ignores the file. On read its entries win; the
SAELens sparsity file adds ``log10_density`` (as stored) and ``density``
(``10**sparsity``) where they are missing. On write ``sparsity.safetensors``
comes from the ``sparsity`` argument, else ``feature_stats["log10_density"]``,
else ``log10(feature_stats["density"] + 1e-10)``.

The small file helpers here (`read_json`, `read_safetensors`, `take_tensors`,
`check_shapes`, `stored_dtype`, `check_finite`, `parse_dtype`) are shared by the other format
readers. This module never touches the network and never replaces a directory
(`steer.sae.save_sae` does the atomic replace).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from steer.errors import SAEError
from steer.sae.sae import NORMALIZATIONS, SAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
FEATURE_STATS_FILENAME = "feature_stats.safetensors"
"""steer's own addition: per-feature statistics beside the SAELens files."""

V6_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version`` when the SAE has none ≥ 6."""

DENSITY_EPS = 1e-10
"""SAELens' epsilon in ``sparsity = log10(density + eps)``."""

TOPK_DEFAULT_K = 100  # SAELens' TopKSAEConfig default

# dtype names SAELens accepts in cfg.json (its DTYPE_MAP), and what we write
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# SAELens' names for architectures → ours; everything else is refused below
ARCHITECTURE_FROM_SAELENS = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
ARCHITECTURE_TO_SAELENS = {v: k for k, v in ARCHITECTURE_FROM_SAELENS.items()}
TRANSCODER_ARCHITECTURES = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
TRAINING_ARCHITECTURES = ("batchtopk", "matryoshka_batchtopk")

# keys a v5 (flat) cfg.json keeps at top level that v6 moves into ``metadata``
METADATA_KEYS = (
    "model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
    "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
    "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out", "hook_head_index_out",
)
# v5 aliases, old name → current name
RENAMED_KEYS = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}

EXTRA_CFG_KEY = "saelens_cfg"
"""`SAE.metadata` key holding unknown top-level cfg.json keys, written back at top level."""
SITE_KEY = "steer_site"
"""cfg.json ``metadata`` key for a canonical site written as a SAELens hook name, so it reads back as written."""


# -- shared file helpers ---------------------------------------------------------


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
"""Files that are Python pickles (torch.save): steer never loads them as SAEs, since unpickling can run code."""


def pickle_refusal(path: Path) -> SAEError:
    """The error for an SAE shipped as a pickle, saying how to convert it."""
    return SAEError(
        f"{Path(path).name} is a pickle (torch.save), which steer does not load: unpickling can run code from the "
        "file. Convert it once where you trust it: load it with torch.load(weights_only=True), then write "
        f"{WEIGHTS_FILENAME} (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec[, threshold]) with "
        f"safetensors.torch.save_file and a SAELens {CFG_FILENAME} — or build a steer.SAE and steer.sae.save_sae it",
        where=str(path),
    )


def pickled_files(directory: Path) -> list[Path]:
    """The pickle files directly in ``directory``, sorted."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; SAEError naming the file when absent or malformed."""
    path = Path(path)
    if not path.is_file():
        raise SAEError(f"missing {path.name}", where=str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SAEError(f"{path.name} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})", where=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SAEError(f"cannot read {path.name}: {e}", where=str(path)) from None
    if not isinstance(data, dict):
        raise SAEError(f"{path.name} must hold a JSON object, found {type(data).__name__}", where=str(path))
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (on CPU); SAEError naming the file when absent or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise SAEError(f"missing {path.name}", where=str(path))
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SAEError(f"cannot read {path.name} as safetensors: {e}", where=str(path)) from None


def take_tensors(tensors: dict[str, torch.Tensor], names: tuple[str, ...], path: Path) -> dict[str, torch.Tensor]:
    """Remove and return ``names`` from ``tensors``; SAEError naming the first one missing."""
    missing = [n for n in names if n not in tensors]
    if missing:
        held = ", ".join(sorted(tensors)) or "nothing"
        raise SAEError(f"{Path(path).name} has no tensor {missing[0]!r} (it holds: {held})", where=str(path))
    return {n: tensors.pop(n) for n in names}


def check_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str, context: str) -> None:
    """SAEError naming the first tensor whose shape is not the expected one."""
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != tuple(shape):
            raise SAEError(f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)} ({context})", where=where)


def stored_dtype(tensors: dict[str, torch.Tensor], where: str) -> torch.dtype:
    """The one floating dtype the tensors share; SAEError on mixed or non-float dtypes."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise SAEError(f"tensor {name!r} has dtype {t.dtype}, expected a floating-point dtype", where=where)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{n} {str(t.dtype).removeprefix('torch.')}" for n, t in tensors.items())
        raise SAEError(f"mixed dtypes ({listing}); all SAE tensors must share one dtype", where=where)
    return dtypes.pop()


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """SAEError naming the first tensor holding a NaN or an infinity (and how many, and the first index)."""
    for name, t in tensors.items():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            first = [int(i) for i in torch.nonzero(bad)[0]]
            raise SAEError(f"tensor {name!r} has {int(bad.sum())} non-finite value(s) (NaN or infinity; the first at "
                           f"index {first}); a usable SAE holds finite numbers only", where=where)


def parse_dtype(value: str | torch.dtype, *, field: str = "dtype", where: str | None = None) -> torch.dtype:
    """A torch dtype from a torch dtype or a SAELens dtype name ("float32", "torch.bfloat16", ...)."""
    if isinstance(value, torch.dtype):
        if value in DTYPE_NAMES:
            return value
    elif isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    raise SAEError(f"{field} {value!r} is not a dtype steer reads; allowed: {', '.join(DTYPES)}", where=where)


# -- read -------------------------------------------------------------------------


def read_saelens(directory: str | Path, *, dtype: str | torch.dtype | None = None) -> SAE:
    """The SAE in a SAELens v5 or v6 directory, cast to ``dtype`` (default: the config's)."""
    directory = Path(directory)
    cfg_path = directory / CFG_FILENAME
    where = str(cfg_path)
    top = read_json(cfg_path)

    # split the config into top-level fields and metadata, whichever layout it has
    nested = top.pop("metadata", None)
    if nested is not None and not isinstance(nested, dict):
        raise SAEError(f"field 'metadata' must be an object, found {type(nested).__name__}", where=where)
    top = {RENAMED_KEYS.get(k, k): v for k, v in top.items()}
    if nested is None:  # v5: metadata keys sit at top level
        meta = {k: top.pop(k) for k in METADATA_KEYS if k in top}
    else:
        meta = {RENAMED_KEYS.get(k, k): v for k, v in nested.items()}

    settings = _architecture_settings(top, meta, where)
    d_in = _positive_int(top, "d_in", where)
    d_sae = _positive_int(top, "d_sae", where)
    cfg_dtype = parse_dtype(top.pop("dtype", "float32"), field="field 'dtype'", where=where)
    apply_b_dec = top.pop("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise SAEError(f"field 'apply_b_dec_to_input' must be true or false, found {apply_b_dec!r}", where=where)
    normalization = _normalization(top.pop("normalize_activations", "none"), where)
    finetuning_scaling = top.pop("finetuning_scaling_factor", False)
    top.pop("device", None)

    # tensors
    weights_path = directory / WEIGHTS_FILENAME
    tensors = read_safetensors(weights_path)
    wwhere = str(weights_path)
    architecture = settings["architecture"]
    if "W_skip" in tensors:
        raise SAEError("has a skip connection (W_skip): transcoders are not supported yet", where=wwhere)
    if architecture == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = torch.exp(tensors.pop("log_threshold"))
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in tensors:
            factor = tensors.pop(name)
            if not bool(torch.all(factor == 1)):
                raise SAEError(
                    f"has a finetuning scaling factor ({name!r} not all ones"
                    f"{', finetuning_scaling_factor true' if finetuning_scaling else ''}); not supported yet",
                    where=wwhere,
                )
    names = ("W_enc", "W_dec", "b_enc", "b_dec") + (("threshold",) if architecture == "jumprelu" else ())
    weights = take_tensors(tensors, names, weights_path)
    if tensors:
        raise SAEError(
            f"unexpected tensor(s) {', '.join(sorted(tensors))} for SAELens architecture "
            f"{ARCHITECTURE_TO_SAELENS[architecture]!r} (expected {', '.join(names)})",
            where=wwhere,
        )
    check_shapes(
        weights,
        {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)},
        wwhere,
        f"cfg.json says d_in={d_in}, d_sae={d_sae}",
    )
    stored_dtype(weights, wwhere)
    check_finite(weights, wwhere)
    target = parse_dtype(dtype) if dtype is not None else cfg_dtype
    weights = {n: t.to(target) for n, t in weights.items()}

    if architecture == "topk" and settings.pop("rescale_acts_by_decoder_norm"):
        weights = _fold_decoder_norm(weights)
    settings.pop("rescale_acts_by_decoder_norm", None)

    model_name = meta.pop("model_name", None)
    hook_name = meta.pop("hook_name", None)
    steer_site = meta.pop(SITE_KEY, None)
    for field, value in (("model_name", model_name), ("hook_name", hook_name), (SITE_KEY, steer_site)):
        if value is not None and not isinstance(value, str):
            raise SAEError(f"field {field!r} must be a string, found {value!r}", where=where)
    site = steer_site if steer_site is not None and saelens_hook_name(steer_site) == hook_name else hook_name
    # SAELens' default: "none" in v6, derived from the hook name in v5; kept only where the writer would differ
    reshape = top.pop("reshape_activations", "none" if nested is not None else default_reshape(hook_name))
    if reshape != default_reshape(hook_name):
        top["reshape_activations"] = reshape
    if top:
        meta[EXTRA_CFG_KEY] = top
    return SAE(
        **weights,
        **settings,
        apply_b_dec_to_input=apply_b_dec,
        normalize_activations=normalization,
        site=site,
        model_name=model_name,
        feature_stats=_read_feature_stats(directory, d_sae),
        metadata=meta,
        source=str(directory),
    )


def _architecture_settings(top: dict, meta: dict, where: str) -> dict:
    """``architecture``, ``k`` and ``rescale_acts_by_decoder_norm`` from the config (popped from ``top``)."""
    name = top.pop("architecture", "standard")  # SAELens' default for configs that predate the field
    if not isinstance(name, str):
        raise SAEError(f"field 'architecture' must be a string, found {name!r}", where=where)
    if name == "gated":
        raise SAEError("architecture 'gated' is not supported yet (steer reads standard, jumprelu and topk SAEs)", where=where)
    if name in TRANSCODER_ARCHITECTURES or "hook_name_out" in meta or "d_out" in top:
        raise SAEError(f"architecture {name!r} is a transcoder; transcoders are not supported yet", where=where)
    if name in TRAINING_ARCHITECTURES:
        raise SAEError(
            f"architecture {name!r} is a SAELens training checkpoint; load the inference SAE SAELens saves "
            "(BatchTopK SAEs are saved as jumprelu)",
            where=where,
        )
    if name not in ARCHITECTURE_FROM_SAELENS:
        raise SAEError(
            f"unknown architecture {name!r}; steer reads: {', '.join(ARCHITECTURE_FROM_SAELENS)}", where=where
        )
    activation = top.pop("activation_fn", None)
    if activation is not None and not isinstance(activation, str):
        raise SAEError(f"field 'activation_fn' must be a string, found {activation!r}", where=where)
    kwargs = top.pop("activation_fn_kwargs", None) or {}
    if not isinstance(kwargs, dict):
        raise SAEError(f"field 'activation_fn_kwargs' must be an object, found {kwargs!r}", where=where)
    architecture = ARCHITECTURE_FROM_SAELENS[name]
    if name == "standard" and activation == "topk":  # v5 spelling of a TopK SAE
        architecture = "topk"
        if "k" not in kwargs and "k" not in top:
            raise SAEError("activation_fn 'topk' needs activation_fn_kwargs.k", where=where)
    elif activation not in (None, "relu", "topk") or (activation == "topk" and name != "topk"):
        raise SAEError(f"activation_fn {activation!r} is not supported for architecture {name!r}", where=where)

    settings: dict = {"architecture": architecture}
    if architecture == "topk":
        k = top.pop("k", kwargs.get("k", TOPK_DEFAULT_K))
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise SAEError(f"field 'k' must be a positive integer, found {k!r}", where=where)
        settings["k"] = k
        rescale = top.pop("rescale_acts_by_decoder_norm", False)
        if not isinstance(rescale, bool):
            raise SAEError(f"field 'rescale_acts_by_decoder_norm' must be true or false, found {rescale!r}", where=where)
        settings["rescale_acts_by_decoder_norm"] = rescale
    rest = {n: v for n, v in kwargs.items() if n != "k"}
    if rest:  # anything beyond k is kept, not interpreted
        top["activation_fn_kwargs"] = kwargs
    return settings


def _positive_int(cfg: dict, field: str, where: str) -> int:
    if field not in cfg:
        raise SAEError(f"cfg.json has no field {field!r}", where=where)
    value = cfg.pop(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SAEError(f"field {field!r} must be a positive integer, found {value!r}", where=where)
    return value


def _normalization(value, where: str) -> str:
    if value is None or value is False:
        return "none"
    if value is True:  # v5 boolean form
        return "expected_average_only_in"
    if value not in NORMALIZATIONS:
        raise SAEError(f"unknown normalize_activations {value!r}; allowed: {', '.join(NORMALIZATIONS)}", where=where)
    return value


def _fold_decoder_norm(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TopK with ``rescale_acts_by_decoder_norm``, rewritten so the decoder rows carry no norm."""
    norms = weights["W_dec"].norm(dim=-1).clamp(min=1e-8)  # (d_sae,), SAELens' floor for dead rows
    return {
        **weights,
        "W_enc": weights["W_enc"] * norms,
        "b_enc": weights["b_enc"] * norms,
        "W_dec": weights["W_dec"] / norms[:, None],
    }


def _read_feature_stats(directory: Path, d_sae: int) -> dict[str, torch.Tensor]:
    stats: dict[str, torch.Tensor] = {}
    stats_path = directory / FEATURE_STATS_FILENAME
    if stats_path.is_file():
        stats = read_safetensors(stats_path)
        check_shapes(stats, {n: (d_sae,) for n in stats}, str(stats_path), f"one value per feature, d_sae={d_sae}")
        for name, t in stats.items():
            if not t.is_floating_point():
                raise SAEError(f"tensor {name!r} has dtype {t.dtype}, expected a floating-point dtype", where=str(stats_path))
        check_finite(stats, str(stats_path))
    sparsity_path = directory / SPARSITY_FILENAME
    if sparsity_path.is_file():
        held = read_safetensors(sparsity_path)
        log10_density = take_tensors(held, ("sparsity",), sparsity_path)["sparsity"]
        check_shapes({"sparsity": log10_density}, {"sparsity": (d_sae,)}, str(sparsity_path), f"d_sae={d_sae}")
        stored_dtype({"sparsity": log10_density}, str(sparsity_path))
        check_finite({"sparsity": log10_density}, str(sparsity_path))
        stats.setdefault("log10_density", log10_density)
        stats.setdefault("density", torch.pow(10.0, log10_density))
    return stats


# -- write ------------------------------------------------------------------------


def save_saelens(sae: SAE, directory: str | Path, sparsity: torch.Tensor | None = None) -> None:
    """Write ``sae`` into ``directory`` (created if needed) in the SAELens v6 layout.

    ``sparsity``: log10 feature densities ``[d_sae]`` for ``sparsity.safetensors``
    (default: from ``sae.feature_stats``; no file when there are none).
    """
    directory = Path(directory)
    if sae.dtype not in DTYPE_NAMES:
        raise SAEError(f"cannot write dtype {sae.dtype}; SAELens reads: {', '.join(DTYPES)}", where=str(directory))
    weights = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}
    if sae.architecture == "jumprelu":
        weights["threshold"] = sae.threshold
    normalization = sae.normalize_activations
    if normalization == "expected_average_only_in" and sae.norm_scaling_factor is not None:
        c = float(sae.norm_scaling_factor)
        weights.update(W_enc=sae.W_enc * c, W_dec=sae.W_dec / c, b_dec=sae.b_dec / c)
        normalization = "none"
    weights = {n: t.detach().to("cpu").contiguous() for n, t in weights.items()}

    extra = dict(sae.metadata.get(EXTRA_CFG_KEY) or {})
    hook_name = saelens_hook_name(sae.site)
    reshape = extra.pop("reshape_activations", None) or default_reshape(hook_name)
    cfg: dict = {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": DTYPE_NAMES[sae.dtype],
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": normalization,
        "reshape_activations": reshape,
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg["metadata"] = _metadata_to_write(sae, hook_name)
    cfg["architecture"] = ARCHITECTURE_TO_SAELENS[sae.architecture]
    for key, value in extra.items():
        cfg.setdefault(key, value)
    try:
        text = json.dumps(cfg, indent=2)
    except (TypeError, ValueError) as e:
        raise SAEError(f"the SAE's metadata cannot be written as JSON: {e}", where=str(directory)) from None

    log10_density = _log10_density(sae, sparsity)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(directory / WEIGHTS_FILENAME))
        (directory / CFG_FILENAME).write_text(text + "\n", encoding="utf-8")
        if log10_density is not None:
            save_file({"sparsity": log10_density}, str(directory / SPARSITY_FILENAME))
        if sae.feature_stats:
            stats = {n: t.detach().to("cpu").contiguous() for n, t in sae.feature_stats.items()}
            save_file(stats, str(directory / FEATURE_STATS_FILENAME), metadata={"format": "steer feature_stats v1"})
    except OSError as e:
        raise SAEError(f"cannot write the SAE: {e}", where=str(directory)) from None


def saelens_hook_name(site: str | None) -> str | None:
    """A canonical site as the SAELens (TransformerLens) hook name; any other name unchanged."""
    match = re.fullmatch(r"(resid_pre|resid_post|attn_out|mlp_out)\.(\d+)", site or "")
    if match is None:
        return site
    return f"blocks.{match.group(2)}.hook_{match.group(1)}"


def default_reshape(hook_name: str | None) -> str:
    """SAELens' ``reshape_activations`` for a hook: "hook_z" for attention z hooks, else "none"."""
    return "hook_z" if (hook_name or "").endswith("_z") else "none"


def _metadata_to_write(sae: SAE, hook_name: str | None) -> dict:
    meta = {k: v for k, v in sae.metadata.items() if k != EXTRA_CFG_KEY}
    meta["model_name"] = sae.model_name
    meta["hook_name"] = hook_name
    if hook_name != sae.site:
        meta[SITE_KEY] = sae.site
    version = meta.get("sae_lens_version")
    if _major_version(version) < 6:
        if version is not None:
            meta.setdefault("converted_from_sae_lens_version", version)
        meta["sae_lens_version"] = V6_VERSION
    return meta


def _major_version(version) -> int:
    match = re.match(r"\s*v?(\d+)", str(version)) if version is not None else None
    return int(match.group(1)) if match else -1


def _log10_density(sae: SAE, sparsity: torch.Tensor | None) -> torch.Tensor | None:
    if sparsity is None:
        sparsity = sae.feature_stats.get("log10_density")
    if sparsity is None and "density" in sae.feature_stats:
        sparsity = torch.log10(sae.feature_stats["density"].float() + DENSITY_EPS)
    if sparsity is None:
        return None
    if tuple(sparsity.shape) != (sae.d_sae,):
        raise SAEError(f"sparsity has shape {list(sparsity.shape)}, expected [{sae.d_sae}]")
    if not sparsity.is_floating_point() or not bool(torch.isfinite(sparsity).all()):
        raise SAEError("sparsity must hold finite log10 feature densities")
    return sparsity.detach().to("cpu").contiguous()
