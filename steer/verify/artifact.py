"""`steer verify DIR`: re-check an exported artifact against its manifest and the hooked reference.

1. Every file the manifest lists is re-hashed (a missing or tampered file is
   named); weight files the manifest does not list are refused.
2. The base model is loaded and its shards re-hashed against the manifest.
3. The reference plan is the embedded pack (or ``--spec``, compiled afresh);
   the artifact is loaded as a plain transformers model (weights, grafted
   neurons and all: the config's MLP width says how wide) or through PEFT
   (adapter), and `fidelity.measure` compares them. A control vector (cvec) is
   run in llama.cpp on the base's GGUF when steer knows it (the registry
   default model) and judged by the rule in `steer.verify.llamacpp`
   (KL within 2× the quantisation baseline + 1e-3, top-1 ≥ 95%); for any
   other base the verdict says that fidelity was not measured and why.
4. The verdict fails if a hash differs; if every edit was lowered exactly and
   the artifact is not exact (KL ≥ 1e-6 or top-1 < 100%); if an approximate
   artifact's mean KL exceeds the spec's ``max_kl`` (when it has one); or if a
   measured control vector fails its rule.
Never writes into the artifact directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from steer.errors import SteerError
from steer.export.checkpoint import (
    MANIFEST, PACK_DIR, _load_adapter, _load_merged, base_directory, rounding_check, sha256_file,
)
from steer.lower.weights import lower_to_weights
from steer.lower.pack import load_pack
from steer.verify.fidelity import Fidelity, measure

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass
class Verdict:
    ok: bool = True
    lines: list[str] = field(default_factory=list)
    fidelity: Fidelity | None = None

    def fail(self, line: str) -> None:
        self.ok = False
        self.lines.append(f"FAIL {line}")


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise SteerError(f"no {MANIFEST}: not a steer artifact directory", where=str(directory))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SteerError(f"{MANIFEST} is not valid JSON: {exc}", where=str(path)) from None


def check_hashes(directory: Path, manifest: dict, verdict: Verdict) -> None:
    listed = manifest.get("files", {})
    for name, digest in sorted(listed.items()):
        path = directory / name
        if not path.is_file():
            verdict.fail(f"{name}: listed in the manifest but missing")
        elif sha256_file(path) != digest:
            verdict.fail(f"{name}: sha256 differs from the manifest (the file was changed after export)")
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES and rel not in listed:
            verdict.fail(f"{rel}: a weight file the manifest does not list")
    if verdict.ok:
        verdict.lines.append(f"ok   {len(listed)} files match their sha256 in the manifest")


def verify_artifact(directory, spec=None) -> Verdict:
    import steer

    directory = Path(directory)
    manifest = read_manifest(directory)
    verdict = Verdict()
    check_hashes(directory, manifest, verdict)
    target = manifest["target"]
    base_name = manifest["base_model"]["name"]
    if target in ("weights", "adapter"):
        base_dir = base_directory(base_name)
        for shard, digest in manifest["base_model"]["files"].items():
            if not (base_dir / shard).is_file() or sha256_file(base_dir / shard) != digest:
                verdict.fail(f"base model {base_name}: {shard} differs from the one the artifact was made from")
    if not verdict.ok:
        return verdict
    if target == "pack":
        verdict.lines.append("note a pack holds the plan itself: its hashes are the check")
        return verdict
    model, tokenizer = steer.load_model(base_name)
    plan = steer.compile(spec, model, tokenizer=tokenizer) if spec is not None else load_pack(directory / PACK_DIR)
    if target == "cvec":
        _verify_cvec(directory, manifest, model, tokenizer, plan, verdict)
        return verdict
    artifact = _load_merged(directory) if target == "weights" else _load_adapter(base_directory(base_name), directory)
    verdict.fidelity = measure(model, plan, artifact, tokenizer)
    approximate = [e for e in manifest["edits"] if e["lowering"] != "exact"]
    judged = verdict.fidelity
    rounding = None
    if target == "weights" and not approximate:  # a 16-bit base: the lowering is judged before rounding
        rounding = rounding_check(artifact, lower_to_weights(plan, model.config.to_dict()), base_directory(base_name),
                                  directory)
    if rounding is not None:
        judged = measure(model, plan, artifact, tokenizer)
        verdict.lines.append(f"note stored in {rounding['dtype']} like the base; as stored: {verdict.fidelity.describe()}")
        if rounding["stored_equals_rounded"]:
            verdict.lines.append(f"ok   the {rounding['tensors']} patched tensor(s) are the lowering rounded once to "
                                 f"{rounding['dtype']}")
        else:
            verdict.fail(f"patched tensor(s) {', '.join(rounding['mismatched'])} are not the lowering rounded to "
                         f"{rounding['dtype']}")
        verdict.lines.append(("ok   " if judged.is_exact() else "note ") + "before rounding: " + judged.describe())
    else:
        verdict.lines.append(("ok   " if judged.is_exact() else "note ") + judged.describe())
    if not approximate and not judged.is_exact():
        verdict.fail(f"every edit was lowered exactly, but the artifact is not exact (KL max {judged.kl_max:.3g} ≥ 1e-6 "
                     f"or top-1 {100 * judged.top1:.2f}% < 100%)")
    max_kl = plan.spec.max_kl
    if approximate and max_kl is not None:
        if verdict.fidelity.kl_mean > max_kl:
            verdict.fail(f"mean KL(ref‖artifact) {verdict.fidelity.kl_mean:.4g} is above the spec's max_kl {max_kl:g}")
        else:
            verdict.lines.append(f"ok   mean KL(ref‖artifact) {verdict.fidelity.kl_mean:.4g} ≤ the spec's max_kl {max_kl:g}")
    elif approximate:
        verdict.lines.append(f"note {len(approximate)} edit(s) were lowered approximately (accepted with --allow-approximate)")
    return verdict


def _verify_cvec(directory: Path, manifest: dict, model, tokenizer, plan, verdict: Verdict) -> None:
    from steer.verify.llamacpp import LlamaCppError, measure_cvec_export

    try:
        measured, why = measure_cvec_export(model, tokenizer, plan, directory / "control_vector.gguf",
                                            manifest["base_model"]["name"])
    except LlamaCppError as exc:
        verdict.fail(f"llama.cpp fidelity could not be measured: {exc}")
        return
    if measured is None:
        verdict.lines.append(f"note llama.cpp fidelity not measured: {why}")
        return
    line = (f"llama.cpp + control vector vs the hooked fp32 reference over {measured['tokens']} positions: "
            f"mean KL {measured['kl']:.4g} (quantisation alone {measured['kl_unedited']:.4g}), top-1 "
            f"{100 * measured['top1']:.1f}% (quantisation alone {100 * measured['top1_unedited']:.1f}%); {measured['rule']}")
    if measured["passes"]:
        verdict.lines.append("ok   " + line)
    else:
        verdict.fail(line)
