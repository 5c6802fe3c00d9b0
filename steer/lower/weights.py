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
Gemma 2 renormalises writer outputs: no exact lowering there. ``scale``,
``clamp``, ``cap`` and anything with ``when`` or a scope other than ``all`` are
nonlinear or token-dependent: no exact weight lowering (graft is future work).

Reads only the Plan and the checkpoint's config; never touches tensors (the
exporter applies the patch while streaming shards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from steer.lower.targets import EditLowering, Unlowerable, lower_each
from steer.models.adapters import ArchitectureAdapter, Site, adapter_for
from steer.plan.ir import Plan, SiteEdit


@dataclass(frozen=True)
class Delta:
    tensor: str
    """State-dict name, e.g. ``model.layers.3.mlp.down_proj.bias``."""
    fn: Callable[[torch.Tensor], torch.Tensor]
    """Original tensor (fp32) → additive delta (fp32)."""
    optional: bool = False
    """Skip when the checkpoint has no such tensor (a writer bias that does not exist)."""


@dataclass(frozen=True)
class NewTensor:
    name: str
    kind: str
    """``zeros_bias``: zeros shaped like ``like``'s output dim; ``copy``: a copy of ``like``."""
    like: str


@dataclass
class WeightPatch:
    deltas: list[Delta]
    new_tensors: list[NewTensor]
    config: dict
    """config.json keys to set."""
    lowerings: list[EditLowering]
    notes: list[str]

    def touched(self) -> set[str]:
        return {d.tensor for d in self.deltas} | {t.name for t in self.new_tensors}


def lower_to_weights(plan: Plan, config: dict) -> WeightPatch:
    """The weight patch for ``plan``; `LoweringError` listing every edit that has none."""
    builder = _PatchBuilder(adapter_for(config.get("model_type", "")), config)
    lowerings = lower_each(plan, "weights", config, lambda se, site, _low: builder.lower(se, site))
    return WeightPatch(builder.deltas, builder.new_tensors, builder.config, lowerings, builder.notes)


def check_weights(se: SiteEdit, site: Site, config: dict) -> str | None:
    """Why this site edit has no weight lowering, or None."""
    try:
        _PatchBuilder(adapter_for(config.get("model_type", "")), config).lower(se, site)
    except Unlowerable as exc:
        return str(exc)
    return None


class _PatchBuilder:
    def __init__(self, adapter: ArchitectureAdapter, config: dict):
        self.adapter, self.base_config = adapter, config
        self.deltas: list[Delta] = []
        self.new_tensors: list[NewTensor] = []
        self.config: dict = {}
        self.notes: list[str] = []

    # -- per edit ----------------------------------------------------------------
    def lower(self, se: SiteEdit, site: Site) -> list[str] | None:
        if se.op == "monitor":
            return None
        if se.scope != "all" or se.when_slot is not None:
            raise Unlowerable("it applies only at some tokens (scope/when): no weight change does that")
        if se.op not in ("add", "project_out"):
            raise Unlowerable(f"{se.op} is nonlinear in x: no exact weight lowering (graft is not implemented yet)")
        if self.adapter.writers_renormalised:
            raise Unlowerable(f"{self.adapter.name} renormalises writer outputs, so a weight change cannot add or remove a fixed direction")
        if se.op == "add":
            return self._add(se, site)
        return self._project_out(se, site)

    def _add(self, se: SiteEdit, site: Site) -> list[str]:
        vector = se.amount * se.write.double()
        if site.kind == "resid_pre" and site.layer == 0:
            names = [self.adapter.position_embedding + ".weight"] if self.adapter.position_embedding else [self._embedding()]
            for name in names:
                self._delta(name, lambda E, v=vector: v.expand_as(E).clone())
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
                self._delta(name, lambda E, u=u: -p * torch.outer(E @ u, u))  # rows are stream vectors
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

    def _delta(self, tensor: str, fn, optional: bool = False) -> None:
        self.deltas.append(Delta(tensor, fn, optional))
