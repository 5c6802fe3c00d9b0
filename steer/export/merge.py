"""A base checkpoint's files, and a copy of it with a weight patch applied, streamed tensor by tensor.

The weights target (`steer.lower.weights`) lowers a plan into a `WeightPatch` (additive deltas, new tensors,
growths); `write_merged` writes the patched checkpoint: an untouched tensor is copied from its byte range in
the base shard without ever being materialised; a touched one is read alone, gets the patch's additive deltas
(in float64, cast back to its dtype; an embedding-sized tensor whose deltas all act row by row, in pieces of
rows), then its grafted neurons appended (tensors grow along their MLP-width dimension; the index's sizes
follow). Peak memory is therefore about the largest touched tensor's working copies, far below a shard
(measured by bench/export.py). Every other file is copied unchanged, and the base directory is only read.
Same inputs give the same bytes: no timestamps, sorted JSON, deterministic tensor order.

A base stored in 16 bits can only hold the patched tensors rounded: `rounding_check` puts the unrounded
values into the reloaded model (so the lowering itself is judged exact in fp32) and checks bit for bit that
the file holds them rounded once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from steer.errors import SteerError
from steer.export.stream import (
    Producer,
    StoredTensor,
    read_index,
    tensor_bytes,
    write_file,
)
from steer.models.adapters import adapter_for
from steer.models.loading import resolve_checkpoint

INDEX = "model.safetensors.index.json"
SKIP_FROM_BASE = {"steer_manifest.json", "README.md", INDEX, "steer_source.json"}
"""Base files an export never copies (its own manifest and card replace them; the index is rewritten)."""


def base_directory(base: str) -> Path:
    path = Path(resolve_checkpoint(base))
    if not path.is_dir():
        raise SteerError(f"the base model {base!r} is not available locally (hub ids must be downloaded first)", where="model")
    return path


def base_shards(base: Path) -> list[str]:
    if (base / INDEX).is_file():
        return sorted(set(json.loads((base / INDEX).read_text())["weight_map"].values()))
    if (base / "model.safetensors").is_file():
        return ["model.safetensors"]
    if any(base.glob("pytorch_model*.bin")):
        raise SteerError("the base checkpoint has only pickled weights (pytorch_model*.bin); exports stream safetensors "
                         "files and never unpickle. Convert it once: `AutoModelForCausalLM.from_pretrained(DIR)"
                         ".save_pretrained(NEW_DIR)` (transformers reads the .bin with weights_only=True and writes "
                         "safetensors), copy the tokenizer files, and export from NEW_DIR", where=str(base))
    raise SteerError("the base checkpoint has no safetensors weights (model.safetensors or an index)", where=str(base))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_merged(patch, base: Path, out: Path) -> None:
    """Copy ``base`` into ``out`` with the patch applied, one tensor at a time (see the module docstring)."""
    shards = base_shards(base)
    stored: dict[str, StoredTensor] = {}
    keys_by_shard, metadata_by_shard = {}, {}
    for shard in shards:
        tensors, metadata = read_index(base / shard)
        keys_by_shard[shard], metadata_by_shard[shard] = list(tensors), metadata or {"format": "pt"}
        stored.update(tensors)
    home = {key: shard for shard, keys in keys_by_shard.items() for key in keys}
    resolve = tensor_resolver(base, home)

    new_names = {t.name for t in patch.new_tensors}
    growths: dict[str, list] = {}
    for g in patch.growths:
        key = resolve(g.tensor) or (g.tensor if g.tensor in new_names else None)
        if key is None:
            raise SteerError(f"the base checkpoint has no tensor {g.tensor!r} to widen", where=str(base))
        growths.setdefault(key, []).append(g)
    deltas: dict[str, list] = {}
    for d in patch.deltas:
        key = resolve(d.tensor)
        if key is None and d.tensor not in new_names:
            if d.optional:
                continue
            raise SteerError(f"the base checkpoint has no tensor {d.tensor!r} to patch", where=str(base))
        deltas.setdefault(key or d.tensor, []).append(d)
    new_by_shard: dict[str, list] = {}
    for t in patch.new_tensors:
        like = resolve(t.like)
        if like is None:
            raise SteerError(f"the base checkpoint has no tensor {t.like!r}", where=str(base))
        new_by_shard.setdefault(home[like], []).append((t, like))

    weight_map, total = {}, 0
    for shard in shards:
        producers = {key: _producer(stored[key], "base", deltas.get(key, []), growths.get(key, []))
                     for key in keys_by_shard[shard]}
        for t, like in new_by_shard.get(shard, []):
            producers[t.name] = _producer(stored[like], t.kind, deltas.get(t.name, []), growths.get(t.name, []))
        total += write_file(out / shard, producers, metadata_by_shard[shard])
        weight_map.update({key: shard for key in producers})
    if (base / INDEX).is_file():
        index = json.loads((base / INDEX).read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index.setdefault("metadata", {})["total_size"] = total
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def tensor_resolver(base: Path, names) -> Callable[[str], str | None]:
    """Our tensor name (a module path) → its name in the checkpoint ``base`` (old GPT-2 files drop the base prefix)."""
    prefix = adapter_for(json.loads((base / "config.json").read_text())["model_type"]).base + "."

    def resolve(name: str) -> str | None:
        if name in names:
            return name
        short = name[len(prefix):] if name.startswith(prefix) else None
        return short if short in names else None
    return resolve


def stored_tensors(directory: Path) -> dict[str, StoredTensor]:
    """Where every tensor of a checkpoint directory lies (all shards)."""
    stored: dict[str, StoredTensor] = {}
    for shard in base_shards(directory):
        stored.update(read_index(directory / shard)[0])
    return stored


SIXTEEN_BITS = {"F16": "float16", "BF16": "bfloat16"}


def rounding_check(artifact, patch, base: Path, out: Path) -> dict | None:
    """For a base stored in 16 bits, whose merged tensors can only be stored rounded: put into ``artifact`` (the
    export loaded in fp32) every patched tensor's value *before* rounding (the float64 sum cast to float32), so the
    lowering itself can be judged exact in fp32, and check that the export's file holds exactly that value rounded
    to the base's dtype. None where nothing was rounded (a 32-bit base) or the patch grows tensors (a graft, which
    is approximate and judged on the stored file). Reads one tensor at a time."""
    if patch.grafts or patch.growths:
        return None
    before, after = stored_tensors(base), stored_tensors(out)
    resolve, resolve_out = tensor_resolver(base, before), tensor_resolver(out, after)
    new = {t.name: t for t in patch.new_tensors}
    by_tensor: dict[str, list] = {}
    for d in patch.deltas:
        if resolve(d.tensor) is not None or d.tensor in new:
            by_tensor.setdefault(d.tensor, []).append(d)
    params = dict(artifact.state_dict(keep_vars=True))
    model_resolve = tensor_resolver(base, params)
    dtypes, mismatched = set(), []
    for name, deltas in sorted(by_tensor.items()):
        if name in new:
            like = before[resolve(new[name].like)]
            x = torch.zeros(like.shape[0], dtype=torch.float64) if new[name].kind == "zeros_bias" else like.read().double()
            dtype = like.dtype
        else:
            source = before[resolve(name)]
            x, dtype = source.read().double(), source.dtype
        if dtype not in SIXTEEN_BITS:
            continue
        dtypes.add(dtype)
        exact = x + deltas[0].fn(x)  # in the exporter's order (`_producer`), so the rounding is the same
        for d in deltas[1:]:
            exact += d.fn(x)
        stored = after[resolve_out(name)].read()
        if not torch.equal(stored, exact.to(stored.dtype)):
            mismatched.append(name)
        target = params.get(name) if name in params else params.get(model_resolve(name) or "")
        if target is None:
            raise RuntimeError(f"the reloaded export has no tensor {name}")
        with torch.no_grad():
            target.copy_(exact.to(target.dtype).reshape(target.shape))
    if not dtypes:
        return None
    return {"dtype": ", ".join(SIXTEEN_BITS[d] for d in sorted(dtypes)), "tensors": len(by_tensor),
            "stored_equals_rounded": not mismatched, "mismatched": mismatched[:8]}


ROWS_PER_PIECE = 1024
"""Rows of a tensor patched at once when all its deltas act row by row (an embedding: 1024 × d at a time)."""


def _producer(source: StoredTensor, kind: str, deltas: list, growths: list) -> Producer:
    """How to make one output tensor from a base tensor: ``kind`` base (itself), copy (a new copy of it) or
    zeros_bias (new zeros sized like its output dimension); then the deltas (in float64, on the original shape,
    by pieces of rows where every delta is row-wise), then the growths."""
    if kind == "zeros_bias":
        shape = (source.shape[0],)

        def read(rows=None):
            return torch.zeros(shape if rows is None else (rows.stop - rows.start,), dtype=source.torch_dtype)
    else:
        shape, read = source.shape, source.read
    final = list(shape)
    for g in growths:
        final[g.dim] += g.values.shape[g.dim]

    def patched(t: torch.Tensor) -> torch.Tensor:
        if not deltas:
            return t
        x = t.double()
        total = x + deltas[0].fn(x)
        for d in deltas[1:]:  # every delta reads the original x
            total += d.fn(x)
        return total.to(t.dtype)

    if not deltas and not growths:
        if kind == "zeros_bias":
            return Producer(source.dtype, shape, lambda: iter([tensor_bytes(read())]))
        return Producer(source.dtype, shape, source.chunks)  # untouched: bytes straight from the base file
    if not growths and all(d.rowwise for d in deltas) and shape:
        def by_rows():
            for start in range(0, shape[0], ROWS_PER_PIECE):
                yield tensor_bytes(patched(read(slice(start, min(shape[0], start + ROWS_PER_PIECE)))))
        return Producer(source.dtype, shape, by_rows)

    def whole():
        t = patched(read())
        for g in growths:  # after the deltas: they act on the original shapes
            t = torch.cat([t, g.values.to(t.dtype)], dim=g.dim)
        yield tensor_bytes(t)
    return Producer(source.dtype, tuple(final), whole)


def copy_base_files(base: Path, out: Path, *, skip_weights: bool = True) -> None:
    for path in sorted(base.iterdir()):
        if path.name in SKIP_FROM_BASE or path.name.startswith(".") or path.is_dir():
            continue
        if skip_weights and path.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            continue
        shutil.copyfile(path, out / path.name)
