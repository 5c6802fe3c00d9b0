"""The pack: a compiled Plan on disk, for exact hook steering in any process (DESIGN §6, "pack").

A pack holds the spec and only the SAE rows the edits use — a 4-feature edit
ships 4 encoder columns and 4 decoder rows, not the whole SAE (a topk SAE ships
whole: its features depend on every pre-activation). Layout::

    steer_pack.json        format, spec (canonical), model shape, per-site reader settings and edits
    tensors.safetensors    sites.S.sae.{W_enc,W_dec,b_enc,b_dec,threshold}, sites.S.gather,
                           sites.S.directions, sites.S.edits.E.write

``load_pack(dir)`` returns the `Plan`, ready for ``steer.applied(model, plan)``;
no SAE file or direction file is needed. Never executes code from the pack.

Every artifact embeds one in ``steer_pack/`` (`PACK_DIR`), so `steer verify` can rebuild the hooked
reference; the ``pack`` target's artifact is that embedded pack alone — it takes every edit exactly, since
hooks apply it — and its file hashes are its whole verification.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from steer.errors import SteerError
from steer.lower.targets import (
    EditLowering,
    Loaded,
    Outcome,
    Target,
    WriteOptions,
    Written,
    register,
)
from steer.models.adapters import parse_site_name
from steer.plan.ir import FeatureReader, Plan, SiteEdit, SitePlan
from steer.sae.sae import SAE
from steer.spec import load_spec_text
from steer.spec.yaml_io import dump_spec

PACK_DIR = "steer_pack"
"""Where every artifact directory embeds its pack."""
FORMAT = "steer-pack"
VERSION = 1
MANIFEST = "steer_pack.json"
TENSORS = "tensors.safetensors"


def write_pack(plan: Plan, directory: Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    sites = []
    for s, sp in enumerate(plan.sites):
        entry = {"site": str(sp.site), "reader": None, "directions": sp.directions is not None, "edits": []}
        if sp.reader is not None:
            sae = sp.reader.sae
            entry["reader"] = {
                "feature_ids": list(sp.reader.feature_ids), "sae_hash": sp.reader.sae_hash,
                "architecture": sae.architecture, "k": sae.k, "apply_b_dec_to_input": sae.apply_b_dec_to_input,
                "normalize_activations": sae.normalize_activations, "norm_scaling_factor": sae.norm_scaling_factor,
            }
            for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
                if getattr(sae, name) is not None:
                    tensors[f"sites.{s}.sae.{name}"] = getattr(sae, name).contiguous()
            if sp.reader.gather is not None:
                tensors[f"sites.{s}.gather"] = sp.reader.gather.contiguous()
        if sp.directions is not None:
            tensors[f"sites.{s}.directions"] = sp.directions.contiguous()
        for e, se in enumerate(sp.edits):
            entry["edits"].append({"index": se.index, "amount": se.amount, "read_slot": se.read_slot,
                                   "when_slot": se.when_slot, "when_above": se.when_above, "scope": se.scope,
                                   "note": se.note, "write": se.write is not None})
            if se.write is not None:
                tensors[f"sites.{s}.edits.{e}.write"] = se.write.clone()  # a topk site's write is a view of its W_dec
        sites.append(entry)
    manifest = {
        "format": FORMAT, "version": VERSION, "spec": dump_spec(plan.spec), "model_type": plan.model_type,
        "n_layers": plan.n_layers, "hidden_size": plan.hidden_size, "saes": [list(s) for s in plan.saes], "sites": sites,
    }
    save_file(tensors, str(directory / TENSORS), metadata={"format": "pt"})
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_pack(directory) -> Plan:
    directory = Path(directory)
    where = str(directory)
    if not (directory / MANIFEST).is_file() or not (directory / TENSORS).is_file():
        raise SteerError(f"not a steer pack: expected {MANIFEST} and {TENSORS} in it", where=where)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise SteerError(f"{MANIFEST} is not valid JSON: {exc}", where=where) from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise SteerError(f"unsupported pack format {manifest.get('format')!r} v{manifest.get('version')!r}", where=where)
    tensors = load_file(str(directory / TENSORS))
    spec = load_spec_text(manifest["spec"], source=f"{where}/{MANIFEST}")
    site_plans = []
    for s, entry in enumerate(manifest["sites"]):
        reader = None
        if entry["reader"] is not None:
            r = entry["reader"]
            sae = SAE(
                W_enc=tensors[f"sites.{s}.sae.W_enc"], W_dec=tensors[f"sites.{s}.sae.W_dec"],
                b_enc=tensors[f"sites.{s}.sae.b_enc"], b_dec=tensors[f"sites.{s}.sae.b_dec"],
                threshold=tensors.get(f"sites.{s}.sae.threshold"), architecture=r["architecture"], k=r["k"],
                apply_b_dec_to_input=r["apply_b_dec_to_input"], normalize_activations=r["normalize_activations"],
                norm_scaling_factor=r["norm_scaling_factor"], source=where,
            )
            reader = FeatureReader(sae=sae, feature_ids=tuple(r["feature_ids"]), gather=tensors.get(f"sites.{s}.gather"),
                                   sae_hash=r["sae_hash"])
        edits = tuple(
            SiteEdit(index=e["index"], edit=spec.edits[e["index"]], amount=e["amount"], read_slot=e["read_slot"],
                     write=tensors.get(f"sites.{s}.edits.{j}.write") if e["write"] else None,
                     when_slot=e["when_slot"], when_above=e["when_above"], scope=e["scope"], note=e["note"])
            for j, e in enumerate(entry["edits"])
        )
        site_plans.append(SitePlan(site=parse_site_name(entry["site"]), reader=reader,
                                   directions=tensors.get(f"sites.{s}.directions"), edits=edits))
    return Plan(spec=spec, model_type=manifest["model_type"], n_layers=manifest["n_layers"],
                hidden_size=manifest["hidden_size"], sites=tuple(site_plans), saes=tuple(tuple(x) for x in manifest["saes"]))


class PackTarget(Target):
    name = "pack"
    help = "the plan + the SAE rows it uses, for hooks elsewhere (steer.load_pack)"
    hub_relation = "adapter"  # the SAE rows and the plan, applied as hooks on the unchanged base
    verify_needs_model = False

    def check(self, se: SiteEdit, site, config: dict) -> Outcome:
        return Outcome("exact")  # hooks apply the plan itself

    def write(self, plan: Plan, model, tokenizer, out: Path, options: WriteOptions) -> Written:
        by_index: dict[int, EditLowering] = {}
        for sp in plan.sites:  # the exporter embeds the pack (PACK_DIR) in every artifact: that is this one
            for e in sp.edits:
                by_index.setdefault(e.index, EditLowering(e.index, e.edit)).sites.append(str(sp.site))
        return Written([by_index[i] for i in sorted(by_index)])

    def load(self, directory: Path, manifest: dict) -> Loaded:
        return Loaded(plan=load_pack(Path(directory) / PACK_DIR))

    def verify(self, directory: Path, manifest: dict, model, tokenizer, plan: Plan, verdict) -> None:
        verdict.lines.append("note a pack holds the plan itself: its hashes are the check")


PACK = register(PackTarget())
