"""`steer verify DIR`: re-check an exported artifact against its manifest and the hooked reference.

1. Every file the manifest lists is re-hashed (a missing or tampered file is
   named); weight files the manifest does not list are refused.
2. For a target made from the base's files (weights, adapter), the base model's
   shards are re-hashed against the manifest.
3. The reference plan is the embedded pack (or ``--spec``, compiled afresh), and
   the artifact's target (`steer.lower.targets`) measures the artifact against it
   into the verdict: weights and adapter in transformers/PEFT by
   `fidelity.measure` and `fidelity.judge` (exact lowerings must be exact, KL <
   1e-6 and top-1 100%; approximate ones within the spec's ``max_kl`` when it has
   one); a control vector in llama.cpp on the base's GGUF when steer knows it,
   by the rule in `steer.verify.llamacpp`; a pack is the plan itself, so its
   hashes are the whole check.
Never writes into the artifact directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from steer.errors import SteerError
from steer.export.checkpoint import MANIFEST, PACK_DIR
from steer.export.merge import base_directory, sha256_file
from steer.lower.pack import load_pack
from steer.lower.targets import get_target
from steer.verify.fidelity import Verdict

__all__ = ["Verdict", "check_hashes", "read_manifest", "verify_artifact"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


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
    target = get_target(str(manifest.get("target")), where=f"{directory / MANIFEST}: target")
    base_name = manifest["base_model"]["name"]
    if target.reads_base_files:
        base_dir = base_directory(base_name)
        for shard, digest in manifest["base_model"]["files"].items():
            if not (base_dir / shard).is_file() or sha256_file(base_dir / shard) != digest:
                verdict.fail(f"base model {base_name}: {shard} differs from the one the artifact was made from")
    if not verdict.ok:
        return verdict
    if not target.verify_needs_model:
        target.verify(directory, manifest, None, None, None, verdict)
        return verdict
    model, tokenizer = steer.load_model(base_name)
    plan = steer.compile(spec, model, tokenizer=tokenizer) if spec is not None else load_pack(directory / PACK_DIR)
    target.verify(directory, manifest, model, tokenizer, plan, verdict)
    return verdict
