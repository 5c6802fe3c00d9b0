"""Lower a Plan into a weight patch for a standard checkpoint (DESIGN §6, "weights").

The patch is a list of *additive deltas* on the original tensors, so edits that
touch the same tensor compose exactly as the hooks sum their deltas (all edits
read the original x). Exact lowerings:

* ``add`` (strength α along d) — constant per token, so a writer bias:
  ``mlp_out.L`` and ``resid_post.L`` → block L's MLP writer bias; ``attn_out.L`` →
  its attention writer bias; ``resid_pre.L`` (L ≥ 1) → block L−1's MLP writer
  bias; ``resid_pre.0`` → every embedding row (GPT-2: every position-embedding
  row). A writer without a bias gets one by its config switch (Llama
  ``mlp_bias``/``attention_bias``: zero biases are written for every module the
  switch adds, in every layer).
* ``project_out`` (p, û) — ``W ← W − p·û ûᵀ W`` on the writer at ``attn_out.L`` /
  ``mlp_out.L`` (its bias too), and ``E ← E − p·(E û) ûᵀ`` on the embedding at
  ``resid_pre.0`` (and GPT-2's wpe). With the site set ``writers`` that is
  Arditi et al.'s orthogonalisation of everything written to the stream.
* ``monitor`` changes no output: it lowers to nothing (monitoring needs hooks).

A tied embedding that gets patched is untied: ``lm_head.weight`` is written as
a copy of the original embedding and ``tie_word_embeddings`` set false (reported).
Gemma 2 renormalises writer outputs: no exact lowering there. ``cap`` and
anything with a scope other than ``all`` or a ``when`` on another feature are
nonlinear or token-dependent: no weight lowering.

Approximate: ``scale`` and ``clamp`` (``when`` always or active) lower to a
*graft* (`steer.lower.graft`): extra MLP neurons fitted to the edit. Lowering
records a `GraftRequest` and marks the edit approximate; the exporter fits the
neurons and adds them with `add_grafts`, which appends them as `Growth`s of the
MLP tensors of every layer (zero neurons where nothing is grafted) and widens
the config's MLP width.

`lower_to_weights` reads only the Plan and the checkpoint's config and never
touches tensors; the target's ``write`` applies the patch while streaming the
base's shards (`steer.export.merge`: new tensors, then the additive deltas on
the original shapes, then the growths), ``load`` reloads the export in plain
transformers, and ``verify`` measures it against the hooks (a 16-bit base: the
lowering judged before rounding, the file checked to hold it rounded once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from steer.lower.graft import LAYOUTS, GraftRequest, Neurons, graft_block
from steer.lower.targets import (
    EditLowering,
    Loaded,
    Outcome,
    Target,
    Unlowerable,
    WriteOptions,
    Written,
    lower_each,
    outcome_of,
    refuse_approximate,
    register,
)
from steer.models.adapters import ArchitectureAdapter, Site, adapter_for
from steer.ops import OPERATIONS, Primitive
from steer.plan.ir import Plan, SiteEdit


@dataclass(frozen=True)
class Delta:
    tensor: str
    """State-dict name, e.g. ``model.layers.3.mlp.down_proj.bias``."""
    fn: Callable[[torch.Tensor], torch.Tensor]
    """Original tensor (fp32) → additive delta (fp32)."""
    optional: bool = False
    """Skip when the checkpoint has no such tensor (a writer bias that does not exist)."""
    rowwise: bool = False
    """Row r of the delta depends only on row r of the tensor, so the exporter may patch a big tensor in pieces."""


@dataclass(frozen=True)
class NewTensor:
    name: str
    kind: str
    """``zeros_bias``: zeros shaped like ``like``'s output dim; ``copy``: a copy of ``like``."""
    like: str


@dataclass(frozen=True)
class Growth:
    tensor: str
    dim: int
    values: torch.Tensor
    """Appended to the tensor along ``dim`` (fp64; cast to the tensor's dtype)."""


@dataclass
class WeightPatch:
    deltas: list[Delta]
    new_tensors: list[NewTensor]
    config: dict
    """config.json keys to set."""
    lowerings: list[EditLowering]
    notes: list[str]
    grafts: list[GraftRequest] = field(default_factory=list)
    """Edits to graft; their neurons are fitted by the exporter and added with `add_grafts`."""
    growths: list[Growth] = field(default_factory=list)

    def touched(self) -> set[str]:
        return {d.tensor for d in self.deltas} | {t.name for t in self.new_tensors} | {g.tensor for g in self.growths}


def lower_to_weights(plan: Plan, config: dict) -> WeightPatch:
    """The weight patch for ``plan``; `LoweringError` listing every edit that has none."""
    builder = _PatchBuilder(adapter_for(config.get("model_type", "")), config)
    lowerings = lower_each(plan, "weights", config, builder.lower)
    return WeightPatch(builder.deltas, builder.new_tensors, builder.config, lowerings, builder.notes, builder.grafts)


def add_grafts(patch: WeightPatch, fits: list[Neurons], base_config: dict) -> None:
    """Add the fitted neurons of ``patch.grafts`` (same order): every layer's MLP grows by the same
    number of neurons, zero where nothing is grafted; the writer bias takes each graft's constant."""
    arch = adapter_for(base_config["model_type"])
    layout = LAYOUTS[arch.name]
    by_block: dict[int, list[Neurons]] = {}
    for request, neurons in zip(patch.grafts, fits):
        by_block.setdefault(request.block, []).append(neurons)
        writer_bias = f"{arch.layers}.{request.block}.{layout.writer}.bias"
        patch.deltas.append(Delta(writer_bias, lambda b, n=neurons: n.constant * n.write.clone()))
    width = max(sum(n.count for n in group) for group in by_block.values())
    d = int(base_config.get("hidden_size") or base_config["n_embd"])
    n_layers = int(base_config.get("num_hidden_layers") or base_config["n_layer"])
    for layer in range(n_layers):
        group = by_block.get(layer, [])
        gate_w = torch.zeros(width, d, dtype=torch.float64)  # padding neurons: zero in, zero out
        gate_b, amplitude = torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
        write = torch.zeros(width, d, dtype=torch.float64)
        k = 0
        for n in group:
            gate_w[k:k + n.count], gate_b[k:k + n.count] = n.gate_weight, n.gate_bias
            amplitude[k:k + n.count], write[k:k + n.count] = n.amplitude, n.write
            k += n.count
        prefix = f"{arch.layers}.{layer}."
        in_dim = 1 if layout.conv1d else 0  # where a reader's output neurons are
        gate, *up = layout.readers
        grow = patch.growths.append
        grow(Growth(prefix + gate + ".weight", in_dim, gate_w.T if layout.conv1d else gate_w))
        grow(Growth(prefix + gate + ".bias", 0, gate_b))
        if layout.gated:  # up = its bias, the amplitude: act(gate)·amplitude; the writer column is d_i
            grow(Growth(prefix + up[0] + ".weight", in_dim, torch.zeros(width, d, dtype=torch.float64)))
            grow(Growth(prefix + up[0] + ".bias", 0, amplitude))
            rows = write
        else:
            rows = amplitude[:, None] * write
        grow(Growth(prefix + layout.writer + ".weight", 0 if layout.conv1d else 1, rows if layout.conv1d else rows.T))
    for request, n in zip(patch.grafts, fits):
        low = next(low for low in patch.lowerings if low.index == request.site_edit.index)
        low.note += f" ({n.count} neurons; fit R² {n.r2_fit:.3f}, on held-out fit tokens {n.r2_held_out:.3f})"
    base_width = base_config.get(layout.width_key) or 4 * d  # GPT-2's n_inner None means 4·d
    patch.config[layout.width_key] = int(base_width) + width
    patch.notes.append(f"grafted {sum(n.count for n in fits)} MLP neurons; every layer's MLP widened by {width} "
                       f"({layout.width_key} {base_width} → {int(base_width) + width}; zero neurons where nothing is grafted)")


class _PatchBuilder:
    def __init__(self, adapter: ArchitectureAdapter, config: dict):
        self.adapter, self.base_config = adapter, config
        self.deltas: list[Delta] = []
        self.new_tensors: list[NewTensor] = []
        self.config: dict = {}
        self.notes: list[str] = []
        self.grafts: list[GraftRequest] = []

    # -- per edit ----------------------------------------------------------------
    def lower(self, se: SiteEdit, site: Site, low: EditLowering) -> list[str] | None:
        primitive = OPERATIONS[se.op].lowers_to
        if primitive is Primitive.NOTHING:
            return None
        if se.scope != "all":
            raise Unlowerable("it applies only at prompt or generation tokens (scope): no weight change does that")
        if se.when_slot is not None and primitive is not Primitive.FEATURE:
            raise Unlowerable("it applies only where a feature fires (when): no weight change does that")
        if primitive not in (Primitive.CONSTANT, Primitive.PROJECTION, Primitive.FEATURE):
            raise Unlowerable(f"{se.op} is {primitive.value}: no weight lowering")
        if self.adapter.writers_renormalised:
            raise Unlowerable(f"{self.adapter.name} renormalises writer outputs, so a weight change cannot add or remove a fixed direction")
        if primitive is Primitive.CONSTANT:
            return self._add(se, site)
        if primitive is Primitive.PROJECTION:
            return self._project_out(se, site)
        return self._graft(se, site, low)

    def _graft(self, se: SiteEdit, site: Site, low: EditLowering) -> list[str]:
        block = graft_block(se, site, self.adapter.name)
        self._ensure_bias("mlp")
        self.grafts.append(GraftRequest(se, site, block))
        low.kind = "approximate"
        low.note = (f"graft: {se.op} is nonlinear in x, so it is approximated by MLP neurons added to block {block}, "
                    "fitted to the edit on captured activations")
        layout = LAYOUTS[self.adapter.name]
        prefix = f"{self.adapter.layers}.{block}."
        return [prefix + m + ".weight" for m in (*layout.readers, layout.writer)]

    def _add(self, se: SiteEdit, site: Site) -> list[str]:
        vector = se.amount * se.write.double()
        if site.kind == "resid_pre" and site.layer == 0:
            names = [self.adapter.position_embedding + ".weight"] if self.adapter.position_embedding else [self._embedding()]
            for name in names:
                self._delta(name, lambda E, v=vector: v.expand_as(E).clone(), rowwise=True)
            return names
        if site.kind == "resid_pre":
            layer, writer = site.layer - 1, "mlp"
        else:
            layer, writer = site.layer, "attn" if site.kind == "attn_out" else "mlp"
        bias = self._writer(layer, writer) + ".bias"
        self._ensure_bias(writer)
        self._delta(bias, lambda b, v=vector: v.clone())
        return [bias]

    def _project_out(self, se: SiteEdit, site: Site) -> list[str]:
        u, p = se.write.double(), se.amount
        if site.kind == "resid_pre" and site.layer == 0:
            names = [self._embedding()] + ([self.adapter.position_embedding + ".weight"] if self.adapter.position_embedding else [])
            for name in names:
                self._delta(name, lambda E, u=u: -p * torch.outer(E @ u, u), rowwise=True)  # rows are stream vectors
            return names
        if site.kind not in ("attn_out", "mlp_out"):
            raise Unlowerable(f"project_out at {site} acts on the sum of all earlier writes; use site `writers` "
                              "(every write: the embedding, attn_out.L and mlp_out.L) for a weight lowering")
        module = self._writer(site.layer, "attn" if site.kind == "attn_out" else "mlp")
        if self.adapter.conv1d_writers:  # weight [in, out]: y = h W
            self._delta(module + ".weight", lambda W, u=u: -p * torch.outer(W @ u, u))
        else:  # weight [out, in]: y = W h
            self._delta(module + ".weight", lambda W, u=u: -p * torch.outer(u, u @ W))
        self._delta(module + ".bias", lambda b, u=u: -p * (b @ u) * u, optional=True)
        return [module + ".weight", module + ".bias"]

    # -- helpers -----------------------------------------------------------------
    def _writer(self, layer: int, writer: str) -> str:
        relative = self.adapter.attn_writer if writer == "attn" else self.adapter.mlp_writer
        return f"{self.adapter.layers}.{layer}.{relative}"

    def _embedding(self) -> str:
        name = self.adapter.embedding + ".weight"
        tied = self.base_config.get("tie_word_embeddings", False)  # a full config dict (AutoConfig.to_dict())
        if tied and self.config.get("tie_word_embeddings") is not False:
            self.config["tie_word_embeddings"] = False
            self.new_tensors.append(NewTensor(self.adapter.unembedding + ".weight", "copy", name))
            self.notes.append(f"untied the embedding: {self.adapter.unembedding}.weight is written as a copy of the original {name}")
        return name

    def _ensure_bias(self, writer: str) -> None:
        if self.adapter.writer_bias == "native" and self.adapter.bias_switch(writer) is None:
            return
        switch = self.adapter.bias_switch(writer)
        if switch is None:
            raise Unlowerable(f"{self.adapter.name}'s {writer} writer takes no bias (in transformers and vLLM)")
        key, modules = switch
        if self.base_config.get(key) or self.config.get(key):
            return
        self.config[key] = True
        n = int(self.base_config.get("num_hidden_layers") or self.base_config.get("n_layer"))
        for layer in range(n):
            for module in modules:
                name = f"{self.adapter.layers}.{layer}.{module}"
                self.new_tensors.append(NewTensor(name + ".bias", "zeros_bias", name + ".weight"))
        self.notes.append(f"set {key}: true and wrote zero biases for {', '.join(modules)} in all {n} layers")

    def _delta(self, tensor: str, fn, optional: bool = False, rowwise: bool = False) -> None:
        self.deltas.append(Delta(tensor, fn, optional, rowwise))


def load_merged(directory: Path):
    """A merged export (or any checkpoint directory) in plain transformers, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


class WeightsTarget(Target):
    name = "weights"
    help = "a merged HF checkpoint (transformers, vLLM)"
    reads_base_files = True
    hub_relation = "finetune"
    hub_library = "transformers"
    manifest_keys = ("rounding",)
    approximate_kl = 0.05
    """A graft's mean KL on the tiny models' calibration text (the matrix checks it)."""

    def check(self, se: SiteEdit, site: Site, config: dict) -> Outcome:
        return outcome_of(_PatchBuilder(adapter_for(config.get("model_type", "")), config).lower, se, site)

    def write(self, plan: Plan, model, tokenizer, out: Path, options: WriteOptions) -> Written:
        from steer.export.merge import copy_base_files, rounding_check, write_merged
        from steer.lower.graft import fit_grafts
        from steer.verify.fidelity import measure

        config = model.config.to_dict()
        patch = lower_to_weights(plan, config)
        written = Written(patch.lowerings, patch.notes)
        if not options.allow_approximate and plan.spec.max_kl is None:
            refuse_approximate(self.name, patch.lowerings, None, None)  # before the (slow) graft fit
        if patch.grafts:
            fits, source = fit_grafts(patch.grafts, plan, model, tokenizer)
            add_grafts(patch, fits, config)
            written.notes.append(f"graft neurons were fitted on {fits[0].tokens} tokens of {source}")
        base_dir = options.base_dir
        copy_base_files(base_dir, out)
        raw = json.loads((base_dir / "config.json").read_text())
        raw.update(patch.config)
        (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        write_merged(patch, base_dir, out)
        artifact = load_merged(out)
        written.fidelity = measure(model, plan, artifact, tokenizer)
        rounding = rounding_check(artifact, patch, base_dir, out)  # a 16-bit base: judge the lowering unrounded
        if rounding is not None:
            unrounded = measure(model, plan, artifact, tokenizer)
            rounding["fidelity_before_rounding"] = unrounded.as_dict()
            written.notes.append(f"stored in {rounding['dtype']} like the base: the patched tensors are the float64 "
                                 f"lowering rounded once; before rounding {unrounded.describe()}")
            written.manifest["rounding"] = rounding
        return written

    def load(self, directory: Path, manifest: dict) -> Loaded:
        return Loaded(model=load_merged(directory))

    def verify(self, directory: Path, manifest: dict, model, tokenizer, plan: Plan, verdict) -> None:
        from steer.export.merge import base_directory, rounding_check
        from steer.verify.fidelity import judge, measure

        artifact = load_merged(directory)
        verdict.fidelity = judged = measure(model, plan, artifact, tokenizer)
        rounding = None
        if all(e["lowering"] == "exact" for e in manifest["edits"]):  # a 16-bit base: the lowering is judged unrounded
            rounding = rounding_check(artifact, lower_to_weights(plan, model.config.to_dict()),
                                      base_directory(manifest["base_model"]["name"]), directory)
        if rounding is None:
            verdict.lines.append(("ok   " if judged.is_exact() else "note ") + judged.describe())
        else:
            judged = measure(model, plan, artifact, tokenizer)
            verdict.lines.append(f"note stored in {rounding['dtype']} like the base; as stored: {verdict.fidelity.describe()}")
            if rounding["stored_equals_rounded"]:
                verdict.lines.append(f"ok   the {rounding['tensors']} patched tensor(s) are the lowering rounded once to "
                                     f"{rounding['dtype']}")
            else:
                verdict.fail(f"patched tensor(s) {', '.join(rounding['mismatched'])} are not the lowering rounded to "
                             f"{rounding['dtype']}")
            verdict.lines.append(("ok   " if judged.is_exact() else "note ") + "before rounding: " + judged.describe())
        judge(verdict, manifest, plan, judged)


WEIGHTS = register(WeightsTarget())
