"""Write compiled artifacts for any target (DESIGN §8): the atomic directory, the embedded pack, the manifest
and the edit card around what the target writes.

Every artifact is a directory holding the artifact itself (written by its target, `steer.lower.targets`), an
embedded pack (``steer_pack/``: the plan, so ``steer verify`` can rebuild the hooked reference without the
original SAE files), ``steer_manifest.json`` and an edit card (``README.md``). Directories are written
atomically (`atomic_directory`): a refusal or a failure leaves nothing behind.

Approximate lowerings (a graft; a LoRA that cannot carry a writer bias) are refused unless
``allow_approximate`` or the spec's ``max_kl`` accepts them: with ``max_kl`` the artifact is measured first and
kept only if its mean per-token KL(hooks ‖ artifact) on the calibration text is at most ``max_kl``
(`refuse_approximate`).
"""

from __future__ import annotations

import json
from pathlib import Path

from steer.export.atomic import atomic_directory
from steer.export.merge import base_directory, base_shards, sha256_file
from steer.lower.pack import PACK_DIR, write_pack
from steer.lower.targets import WriteOptions, get_target, refuse_approximate
from steer.plan.ir import Plan
from steer.spec.yaml_io import dump_spec

MANIFEST = "steer_manifest.json"


def export(plan: Plan, model, tokenizer, target: str, out, *, base: str, overwrite: bool = False,
           allow_approximate: bool = False, suites=(), eval_split: str = "all") -> dict:
    """Compile ``plan`` to ``target`` (a name of `steer.lower.targets.TARGETS`) into directory ``out``; the manifest.

    With ``suites`` (names or files, `steer.evaluate`), the written artifact is also evaluated against the
    base model — suite scores, KL, perplexity and top-1 on neutral text — and the numbers go into the
    manifest's ``evaluation`` and the edit card.
    """
    writer = get_target(target)
    base_dir = base_directory(base) if writer.reads_base_files else None
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        written = writer.write(plan, model, tokenizer, tmp,
                               WriteOptions(base=base, base_dir=base_dir, allow_approximate=allow_approximate))
        notes = written.notes
        if not allow_approximate:
            accepted = refuse_approximate(target, written.lowerings, written.fidelity, plan.spec.max_kl)
            if accepted:
                notes.append(accepted)
        write_pack(plan, tmp / PACK_DIR)
        evaluation, card_lines = _evaluate_export(writer, plan, model, tokenizer, tmp, suites, eval_split, notes, base)
        manifest = _manifest(plan, target, base, base_dir, written.lowerings, notes, written.fidelity, tmp)
        manifest["model_card"] = model_card_metadata(writer, base, base_dir)
        manifest.update({key: None for key in writer.manifest_keys})
        manifest.update(written.manifest)
        manifest["evaluation"] = evaluation
        (tmp / "README.md").write_text(edit_card(manifest, card_lines))
        manifest["files"] = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*"))
                             if p.is_file() and p.name != MANIFEST}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _evaluate_export(writer, plan, model, tokenizer, tmp: Path, suites, split: str, notes: list, base: str):
    """(manifest ``evaluation``, edit-card lines) for the artifact in ``tmp`` against the base; (None, []) without suites."""
    if not suites:
        return None, []
    from steer.errors import SteerError
    from steer.evaluate.firing import firing_lines, firing_rates, footprint_lines, footprint_saes
    from steer.evaluate.report import evaluate, evaluation_for_export, measure_baseline
    from steer.evaluate.suites import load_suites

    try:
        loaded = writer.load(tmp, {"target": writer.name, "base_model": {"name": base}})
    except SteerError as exc:
        notes.append(f"suites not evaluated: {exc.message}")
        return None, []
    subject = f"{writer.name} export"
    baseline = measure_baseline(model, tokenizer)
    report = evaluate(loaded.plan, model, tokenizer, suites, steered_model=loaded.model, split=split, subject=subject,
                      baseline=baseline)
    del loaded
    evaluation, lines = evaluation_for_export(report)
    row_sets = {"neutral text": baseline.neutral.rows.tolist()}
    for suite in load_suites(suites):
        row_sets[f"{suite.name} ({split})"] = [tokenizer(p.text).input_ids for p in suite.select(split)]
    rates, prints = firing_rates(plan, model, row_sets, footprint_saes(plan, model))
    evaluation["firing"] = [r.as_dict() for r in rates]
    evaluation["footprint"] = [p.as_dict() for p in prints]
    return evaluation, lines + firing_lines(rates) + footprint_lines(prints)


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


def model_card_metadata(writer, base: str, base_dir: Path | None) -> dict:
    """The edit card's YAML front matter, in the keys the Hugging Face Hub reads from a model card: the base
    model's hub id and licence (steer's model registry, else the base checkpoint's own card), the
    relation (the target's), the library that loads it and tags."""
    from steer.models.loading import REGISTRY

    entry = REGISTRY.get(base)
    meta = {"base_model": entry.hub_id if entry else None, "license": entry.license if entry else None}
    if base_dir is None and Path(base).is_dir():  # a target that never reads the base's weights: its card still may
        base_dir = Path(base)
    if base_dir is not None and (entry is None or not entry.license):
        card = _front_matter(base_dir / "README.md")
        meta["license"] = meta["license"] or card.get("license")
        meta["base_model"] = meta["base_model"] or card.get("base_model") or _hub_id(base)
    elif meta["base_model"] is None:
        meta["base_model"] = _hub_id(base)
    meta["base_model_relation"] = writer.hub_relation
    meta["library_name"] = writer.hub_library
    meta["tags"] = ["steer", "model-editing", "sparse-autoencoder", f"steer-{writer.name}"]
    return {k: v for k, v in meta.items() if v}


def _hub_id(base: str) -> str | None:
    """``base`` if it reads as a hub id (owner/name, not a local path)."""
    import re

    return base if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", base) and not Path(base).exists() else None


def _front_matter(path: Path) -> dict:
    """The YAML front matter of a model card (``---`` … ``---`` at its top), or {} (no card, none, or unreadable)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        data = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def edit_card(manifest: dict, evaluation_lines=()) -> str:
    import yaml

    meta = manifest.get("model_card") or {}
    front = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", ""] if meta else []
    lines = [*front, f"# Edited model ({manifest['target']})", "",
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
