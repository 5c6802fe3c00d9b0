"""Write compiled artifacts: merged checkpoints, adapters, control vectors, packs (DESIGN §8).

Every artifact is a directory holding the artifact itself, an embedded pack
(``steer_pack/``: the plan, so ``steer verify`` can rebuild the hooked reference
without the original SAE files), ``steer_manifest.json`` and an edit card
(``README.md``). Directories are written atomically (`atomic_directory`).

The merged checkpoint streams tensor by tensor (`steer.export.stream`): an
untouched tensor is copied from its byte range in the base shard without ever
being materialised; a touched one is read alone, gets the weight patch's
additive deltas (in float64, cast back to its dtype; an embedding-sized tensor
whose deltas all act row by row, in pieces of rows), then its grafted neurons
appended (tensors grow along their MLP-width dimension; the index's sizes
follow). Peak memory is therefore about the largest touched tensor's working
copies, far below a shard (measured by bench/export.py). Every other file is
copied unchanged, and the base directory is only read. Same inputs give the same bytes: no timestamps, sorted JSON,
deterministic tensor order, a seeded graft fit.

Approximate lowerings (a graft; a LoRA that cannot carry a writer bias) are
refused unless ``allow_approximate`` or the spec's ``max_kl`` accepts them:
with ``max_kl`` the artifact is measured first and kept only if its mean
per-token KL(hooks ‖ artifact) on the calibration text is at most ``max_kl``.
A refusal raises `LoweringError` and leaves nothing behind. A graft is refused
*before* its neurons are fitted when nothing could accept it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from collections.abc import Callable

import torch
from steer.errors import SteerError
from steer.export.atomic import atomic_directory
from steer.lower.pack import write_pack
from steer.lower.targets import EditLowering, LoweringError
from steer.export.stream import Producer, StoredTensor, read_index, tensor_bytes, write_file
from steer.lower.weights import Delta, Growth, WeightPatch, lower_to_weights
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


# -- merged checkpoint --------------------------------------------------------------

def write_merged(patch: WeightPatch, base: Path, out: Path) -> None:
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
    growths: dict[str, list[Growth]] = {}
    for g in patch.growths:
        key = resolve(g.tensor) or (g.tensor if g.tensor in new_names else None)
        if key is None:
            raise SteerError(f"the base checkpoint has no tensor {g.tensor!r} to widen", where=str(base))
        growths.setdefault(key, []).append(g)
    deltas: dict[str, list[Delta]] = {}
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


def rounding_check(artifact, patch: WeightPatch, base: Path, out: Path) -> dict | None:
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
    by_tensor: dict[str, list[Delta]] = {}
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


def _producer(source: StoredTensor, kind: str, deltas: list[Delta], growths: list[Growth]) -> Producer:
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


# -- the artifacts ------------------------------------------------------------------

def export(plan: Plan, model, tokenizer, target: str, out, *, base: str, overwrite: bool = False,
           allow_approximate: bool = False, suites=(), eval_split: str = "all") -> dict:
    """Compile ``plan`` to ``target`` (weights | adapter | cvec | pack) into directory ``out``; the manifest.

    With ``suites`` (names or files, `steer.evaluate`), the written artifact is also evaluated against the
    base model — suite scores, KL, perplexity and top-1 on neutral text — and the numbers go into the
    manifest's ``evaluation`` and the edit card.
    """
    from steer.verify.fidelity import measure

    base_dir = base_directory(base) if target != "pack" else None
    config = model.config.to_dict()
    max_kl = plan.spec.max_kl
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        fidelity, notes, lowerings, cvec_fidelity, rounding = None, [], [], None, None
        if target == "weights":
            from steer.lower.graft import fit_grafts
            from steer.lower.weights import add_grafts

            patch = lower_to_weights(plan, config)
            lowerings, notes = patch.lowerings, patch.notes
            if not allow_approximate and max_kl is None:
                refuse_approximate(target, lowerings, None, None)  # before the (slow) graft fit
            if patch.grafts:
                fits, source = fit_grafts(patch.grafts, plan, model, tokenizer)
                add_grafts(patch, fits, config)
                notes.append(f"graft neurons were fitted on {fits[0].tokens} tokens of {source}")
            copy_base_files(base_dir, tmp)
            raw = json.loads((base_dir / "config.json").read_text())
            raw.update(patch.config)
            (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
            write_merged(patch, base_dir, tmp)
            artifact = _load_merged(tmp)
            fidelity = measure(model, plan, artifact, tokenizer)
            rounding = rounding_check(artifact, patch, base_dir, tmp)  # a 16-bit base: judge the lowering unrounded
            if rounding is not None:
                unrounded = measure(model, plan, artifact, tokenizer)
                rounding["fidelity_before_rounding"] = unrounded.as_dict()
                notes.append(f"stored in {rounding['dtype']} like the base: the patched tensors are the float64 lowering "
                             f"rounded once; before rounding {unrounded.describe()}")
            del artifact
        elif target == "adapter":
            from steer.lower.adapter import write_adapter

            lowerings = write_adapter(plan, model, tmp, base_model_name=base)
            artifact = _load_adapter(base_dir, tmp)
            fidelity = measure(model, plan, artifact, tokenizer)
            del artifact
        elif target == "cvec":
            from steer.lower.cvec import write_cvec
            from steer.verify.llamacpp import LlamaCppError, measure_cvec_export

            lowerings = write_cvec(plan, tmp / "control_vector.gguf", plan.model_type)
            try:  # the vector is written either way; a failing llama.cpp costs only its measurement
                cvec_fidelity, why = measure_cvec_export(model, tokenizer, plan, tmp / "control_vector.gguf", base)
            except LlamaCppError as exc:
                cvec_fidelity, why = None, str(exc)
            if why:
                notes.append(f"llama.cpp fidelity not measured: {why}")
        elif target == "pack":
            by_index: dict[int, EditLowering] = {}
            for sp in plan.sites:
                for e in sp.edits:
                    by_index.setdefault(e.index, EditLowering(e.index, e.edit)).sites.append(str(sp.site))
            lowerings = [by_index[i] for i in sorted(by_index)]
        else:
            raise SteerError(f"unknown target {target!r}; allowed: weights, adapter, cvec, pack", where="--target")
        if not allow_approximate:
            accepted = refuse_approximate(target, lowerings, fidelity, max_kl)
            if accepted:
                notes.append(accepted)
        write_pack(plan, tmp / PACK_DIR)
        evaluation, card_lines = _evaluate_export(target, plan, model, tokenizer, tmp, base_dir, suites, eval_split, notes)
        manifest = _manifest(plan, target, base, base_dir, lowerings, notes, fidelity, tmp)
        manifest["llamacpp_fidelity"] = cvec_fidelity
        if rounding is not None:
            manifest["rounding"] = rounding
        manifest["evaluation"] = evaluation
        (tmp / "README.md").write_text(edit_card(manifest, card_lines))
        manifest["files"] = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
                             if p.is_file() and p.name != MANIFEST}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _evaluate_export(target, plan, model, tokenizer, tmp: Path, base_dir, suites, split: str, notes: list):
    """(manifest ``evaluation``, edit-card lines) for the artifact in ``tmp`` against the base; (None, []) without suites."""
    if not suites:
        return None, []
    from steer.evaluate.report import evaluate, evaluation_for_export

    if target == "cvec":
        notes.append("suites not evaluated: a control vector runs in llama.cpp, which `steer eval` does not drive")
        return None, []
    subject = f"{target} export"
    if target == "pack":  # a pack is the plan itself, applied by hooks
        report = evaluate(plan, model, tokenizer, suites, split=split, subject=subject)
    else:
        artifact = _load_merged(tmp) if target == "weights" else _load_adapter(base_dir, tmp)
        report = evaluate(None, model, tokenizer, suites, steered_model=artifact, split=split, subject=subject)
        del artifact
    return evaluation_for_export(report)


def refuse_approximate(target: str, lowerings: list[EditLowering], fidelity, max_kl: float | None) -> str | None:
    """`LoweringError` unless every approximate lowering is accepted by ``max_kl`` (the spec's), judged on
    ``fidelity`` (None: not measured yet, so only "no approximate edits" passes); the acceptance note, if any."""
    approximate = [low for low in lowerings if low.kind != "exact"]
    if not approximate:
        return None
    listing = "; ".join(f"edits[{low.index}] ({low.edit.describe_target()}): {low.note}" for low in approximate)
    if max_kl is None:
        measured = f" (measured: {fidelity.describe()})" if fidelity else ""
        raise LoweringError(f"approximate lowering refused — {listing}{measured}; pass --allow-approximate to accept it, "
                            "or set `max_kl` in the spec to accept it when its measured mean KL(hooks‖artifact) "
                            "per token is at most that", where=f"target {target}")
    if fidelity is None:
        return None
    if fidelity.kl_mean > max_kl:
        raise LoweringError(f"approximate lowering refused — measured mean KL(hooks‖artifact) {fidelity.kl_mean:.4g} "
                            f"nats/token on the calibration text is above the spec's max_kl {max_kl:g} ({listing}; "
                            f"{fidelity.describe()}); nothing was written", where=f"target {target}")
    return (f"approximate lowering accepted by the spec's max_kl {max_kl:g}: measured mean KL(hooks‖artifact) "
            f"{fidelity.kl_mean:.4g} nats/token")


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


def edit_card(manifest: dict, evaluation_lines=()) -> str:
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
    approximate = [e for e in manifest["edits"] if e["lowering"] != "exact"]
    if approximate:
        lines.append(f"\n**Approximate:** {len(approximate)} edit(s) are approximated, not reproduced exactly "
                     "(see their notes above); the figures above are what that costs.")
    c = manifest.get("llamacpp_fidelity")
    if c:
        lines.append(f"\nIn llama.cpp (the model's quantised GGUF with this control vector) against the hooked fp32 "
                     f"reference, over {c['tokens']} positions: mean KL {c['kl']:.4g} nats/token (quantisation alone: "
                     f"{c['kl_unedited']:.4g}), top-1 agreement {100 * c['top1']:.1f}% (quantisation alone: "
                     f"{100 * c['top1_unedited']:.1f}%) — {'pass' if c['passes'] else 'FAIL'} ({c['rule']}).")
    for note in manifest["notes"]:
        lines.append(f"\n- {note}")
    if evaluation_lines:
        lines += ["", *evaluation_lines]
    lines += ["", "Check it again with `steer verify <this directory>`.", ""]
    return "\n".join(lines)
