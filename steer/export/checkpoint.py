"""Write compiled artifacts: merged checkpoints, adapters, control vectors, packs (DESIGN §8).

Every artifact is a directory holding the artifact itself, an embedded pack
(``steer_pack/``: the plan, so ``steer verify`` can rebuild the hooked reference
without the original SAE files), ``steer_manifest.json`` and an edit card
(``README.md``). Directories are written atomically (`atomic_directory`).

The merged checkpoint streams shard by shard — peak memory is about one shard —
and applies the weight patch's additive deltas (in float64, cast back to each
tensor's dtype) only to the tensors it touches; every other tensor and file is
copied unchanged, and the base directory is only read. Same inputs give the
same bytes: no timestamps, sorted JSON, deterministic tensor order.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from steer.errors import SteerError
from steer.export.atomic import atomic_directory
from steer.lower.pack import write_pack
from steer.lower.targets import EditLowering, LoweringError
from steer.lower.weights import WeightPatch, lower_to_weights
from steer.models.adapters import adapter_for
from steer.models.loading import resolve_checkpoint
from steer.plan.ir import Plan
from steer.spec.yaml_io import dump_spec

MANIFEST = "steer_manifest.json"
PACK_DIR = "steer_pack"
INDEX = "model.safetensors.index.json"
SKIP_FROM_BASE = {MANIFEST, "README.md", INDEX, "steer_source.json"}


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
    raise SteerError("the base checkpoint has no safetensors weights (model.safetensors or an index)", where=str(base))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# -- merged checkpoint --------------------------------------------------------------

def write_merged(patch: WeightPatch, base: Path, out: Path) -> None:
    """Copy ``base`` into ``out`` with the patch applied, one shard at a time."""
    shards = base_shards(base)
    keys_by_shard = {}
    for shard in shards:
        with safe_open(str(base / shard), framework="pt") as f:
            keys_by_shard[shard] = list(f.keys())
    home = {key: shard for shard, keys in keys_by_shard.items() for key in keys}
    prefix = adapter_for(json.loads((base / "config.json").read_text())["model_type"]).base + "."

    def resolve(name: str) -> str | None:  # our names are module paths; old GPT-2 files drop the base prefix
        if name in home:
            return name
        short = name[len(prefix):] if name.startswith(prefix) else None
        return short if short in home else None

    deltas: dict[str, list] = {}
    for d in patch.deltas:
        key = resolve(d.tensor)
        if key is None and not any(t.name == d.tensor for t in patch.new_tensors):
            if d.optional:
                continue
            raise SteerError(f"the base checkpoint has no tensor {d.tensor!r} to patch", where=str(base))
        deltas.setdefault(key or d.tensor, []).append(d.fn)
    new_by_shard: dict[str, list] = {}
    for t in patch.new_tensors:
        like = resolve(t.like)
        if like is None:
            raise SteerError(f"the base checkpoint has no tensor {t.like!r}", where=str(base))
        new_by_shard.setdefault(home[like], []).append((t, like))

    weight_map = {}
    for shard in shards:
        with safe_open(str(base / shard), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {key: f.get_tensor(key) for key in keys_by_shard[shard]}
        for t, like in new_by_shard.get(shard, []):
            source = tensors[like]
            tensors[t.name] = source.clone() if t.kind == "copy" else source.new_zeros(source.shape[0])
        for key in list(tensors):
            fns = deltas.get(key)
            if fns:
                original = tensors[key].double()
                total = sum(fn(original) for fn in fns)
                tensors[key] = (original + total).to(tensors[key].dtype).contiguous()
        save_file(tensors, str(out / shard), metadata=metadata)
        weight_map.update({key: shard for key in tensors})
        del tensors
    if (base / INDEX).is_file():
        index = json.loads((base / INDEX).read_text())
        total = 0
        for shard in shards:
            with safe_open(str(out / shard), framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    total += _numel(s.get_shape()) * _itemsize(s.get_dtype())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index.setdefault("metadata", {})["total_size"] = total
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(dtype, 4)


def copy_base_files(base: Path, out: Path, *, skip_weights: bool = True) -> None:
    for path in sorted(base.iterdir()):
        if path.name in SKIP_FROM_BASE or path.name.startswith(".") or path.is_dir():
            continue
        if skip_weights and path.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            continue
        shutil.copyfile(path, out / path.name)


# -- the artifacts ------------------------------------------------------------------

def export(plan: Plan, model, tokenizer, target: str, out, *, base: str, overwrite: bool = False,
           allow_approximate: bool = False) -> dict:
    """Compile ``plan`` to ``target`` (weights | adapter | cvec | pack) into directory ``out``; the manifest."""
    from steer.verify.fidelity import measure

    base_dir = base_directory(base) if target != "pack" else None
    config = model.config.to_dict()
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        fidelity, notes, lowerings = None, [], []
        if target == "weights":
            patch = lower_to_weights(plan, config)
            lowerings, notes = patch.lowerings, list(patch.notes)
            copy_base_files(base_dir, tmp)
            raw = json.loads((base_dir / "config.json").read_text())
            raw.update(patch.config)
            (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
            write_merged(patch, base_dir, tmp)
            artifact = _load_merged(tmp)
            fidelity = measure(model, plan, artifact, tokenizer)
            del artifact
        elif target == "adapter":
            from steer.lower.adapter import write_adapter

            lowerings = write_adapter(plan, model, tmp, base_model_name=base)
            artifact = _load_adapter(base_dir, tmp)
            fidelity = measure(model, plan, artifact, tokenizer)
            del artifact
        elif target == "cvec":
            from steer.lower.cvec import write_cvec

            lowerings = write_cvec(plan, tmp / "control_vector.gguf", plan.model_type)
            notes.append("fidelity is measured by llama.cpp, not here: see `steer verify`")
        elif target == "pack":
            by_index: dict[int, EditLowering] = {}
            for sp in plan.sites:
                for e in sp.edits:
                    by_index.setdefault(e.index, EditLowering(e.index, e.edit)).sites.append(str(sp.site))
            lowerings = [by_index[i] for i in sorted(by_index)]
        else:
            raise SteerError(f"unknown target {target!r}; allowed: weights, adapter, cvec, pack", where="--target")
        approximate = [l for l in lowerings if l.kind != "exact"]
        if approximate and not allow_approximate:
            listing = "; ".join(f"edits[{l.index}] ({l.edit.describe_target()}): {l.note}" for l in approximate)
            measured = f" (measured: {fidelity.describe()})" if fidelity else ""
            raise LoweringError(f"approximate lowering refused — {listing}{measured}; pass --allow-approximate to accept it",
                                where=f"target {target}")
        write_pack(plan, tmp / PACK_DIR)
        manifest = _manifest(plan, target, base, base_dir, lowerings, notes, fidelity, tmp)
        (tmp / "README.md").write_text(edit_card(manifest))
        manifest["files"] = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
                             if p.is_file() and p.name != MANIFEST}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _load_merged(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def _load_adapter(base_dir: Path, directory: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, str(directory)).eval()


def _manifest(plan, target, base, base_dir, lowerings, notes, fidelity, tmp) -> dict:
    from steer import __version__

    edits = []
    for low in lowerings:
        edits.append({"index": low.index, "edit": low.edit.describe_target(), "lowering": low.kind,
                      "sites": sorted(set(low.sites)), "tensors": sorted(set(low.tensors)), "note": low.note})
    base_files = {}
    if base_dir is not None:
        for shard in base_shards(base_dir):
            base_files[shard] = sha256_file(base_dir / shard)
    return {
        "steer_version": __version__,
        "target": target,
        "spec": dump_spec(plan.spec),
        "base_model": {"name": base, "path": str(base_dir) if base_dir else None, "files": base_files},
        "saes": [{"source": s, "sha256": h} for s, h in plan.saes],
        "edits": edits,
        "notes": notes,
        "fidelity": fidelity.as_dict() if fidelity else None,
    }


def edit_card(manifest: dict) -> str:
    lines = [f"# Edited model ({manifest['target']})", "",
             f"Made by steer {manifest['steer_version']} from `{manifest['base_model']['name']}`.", "",
             "## Edits", "", "| # | edit | lowering | where | note |", "| --- | --- | --- | --- | --- |"]
    for e in manifest["edits"]:
        where = ", ".join(e["sites"][:4]) + (f" … ({len(e['sites'])} sites)" if len(e["sites"]) > 4 else "")
        lines.append(f"| {e['index']} | {e['edit']} | {e['lowering']} | {where} | {e['note']} |")
    lines += ["", "## Spec", "", "```yaml", manifest["spec"].rstrip(), "```", "", "## Measured fidelity", ""]
    f = manifest["fidelity"]
    if f:
        lines.append(f"Against the hooked reference on steer's calibration text: KL(ref‖artifact) mean {f['kl_mean']:.3g}, "
                     f"max {f['kl_max']:.3g} nats/token over {f['tokens']} tokens; top-1 agreement {100 * f['top1']:.2f}%; "
                     f"greedy continuations identical for {100 * f['greedy_match']:.0f}% of {f['prompts']} prompts.")
    else:
        lines.append("Not measured at export time.")
    for note in manifest["notes"]:
        lines.append(f"\n- {note}")
    lines += ["", "Check it again with `steer verify <this directory>`.", ""]
    return "\n".join(lines)
