"""Architecture adapters: where each site of DESIGN §3 lives in a Hugging Face model.

A site is a point of the residual stream named model-agnostically —
``resid_pre.L`` (input of block L), ``resid_post.L`` (output of block L),
``attn_out.L`` and ``mlp_out.L`` (what attention / the MLP add to the stream).
SAELens hook names (``blocks.L.hook_resid_post``) and HF module paths
(``model.layers.L``, ``model.layers.L.mlp``; also relative to the base model, as
sparsify writes them: ``layers.L``) are accepted as aliases and resolve to the
canonical `Site`.

An adapter also knows each block's *writers* (the linear layers whose output is
added to the stream), its norms, and whether the writers have or can take a bias
— the facts the weight lowerings need. This module only names modules; it never
changes a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from steer.errors import ModelError

SiteKind = Literal["resid_pre", "resid_post", "attn_out", "mlp_out"]
SITE_KINDS: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_out")

_CANONICAL = re.compile(r"^(resid_pre|resid_post|attn_out|mlp_out)\.(\d+)$")
_SAELENS = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    kind: SiteKind

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"


@dataclass(frozen=True)
class ArchitectureAdapter:
    name: str
    model_types: tuple[str, ...]
    """config.model_type values this adapter serves."""
    base: str
    """Path of the base (headless) model, whose forward sees the KV cache."""
    layers: str
    """Path of the block list."""
    attn_out: str
    """Block-relative module whose output is attention's contribution to the stream."""
    mlp_out: str
    """Block-relative module whose output is the MLP's contribution to the stream."""
    attn_writer: str
    """Block-relative linear layer writing attention's output (o_proj / c_proj / dense)."""
    mlp_writer: str
    """Block-relative linear layer writing the MLP's output (down_proj / c_proj / dense_4h_to_h)."""
    embedding: str
    unembedding: str
    final_norm: str
    writer_bias: Literal["native", "mlp_bias", "none"]
    """Writers have a bias (GPT-2, NeoX), can take one via config `mlp_bias` (Llama), or not at all."""
    writers_renormalised: bool = False
    """Writer outputs pass through a norm before the residual add (Gemma 2): no exact `add` in weights."""
    conv1d_writers: bool = False
    """Writers are GPT-2 Conv1D layers, weight ``[in, out]`` (else nn.Linear, weight ``[out, in]``)."""
    position_embedding: str | None = None
    """Learned absolute position embedding added to the token embedding (GPT-2's wpe)."""
    bias_switches: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    """(writer "attn"/"mlp", config key, block-relative modules it gives a bias in every layer):
    how a writer without a bias gets one (Llama's mlp_bias / attention_bias, NeoX's attention_bias)."""

    def bias_switch(self, writer: str) -> tuple[str, tuple[str, ...]] | None:
        for kind, key, modules in self.bias_switches:
            if kind == writer:
                return key, modules
        return None

    # -- sites -------------------------------------------------------------
    def n_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def parse_site(self, name: str, model: nn.Module | None = None) -> Site:
        """Canonical site for a canonical name, a SAELens hook name or an HF module path."""
        site = parse_site_name(name) or self._parse_module_path(name)
        if site is None:
            raise ModelError(
                f"unknown site {name!r}: use resid_pre.L, resid_post.L, attn_out.L or mlp_out.L "
                f"(or blocks.L.hook_resid_post, or {self.layers}.L)",
                where="site",
            )
        if model is not None:
            n = self.n_layers(model)
            if site.layer >= n:
                raise ModelError(f"site {name!r} names layer {site.layer}, but the model has {n} layers (0..{n - 1})", where="site")
        return site

    def _parse_module_path(self, name: str) -> Site | None:
        prefixes = [self.layers]
        if self.layers.startswith(self.base + "."):
            prefixes.append(self.layers[len(self.base) + 1 :])  # relative to the base model (sparsify)
        for prefix in prefixes:
            m = re.fullmatch(re.escape(prefix) + r"\.(\d+)(?:\.(.+))?", name)
            if not m:
                continue
            layer, rest = int(m.group(1)), m.group(2)
            if rest is None:
                return Site(layer, "resid_post")
            # only the module whose output *is* the site: Gemma 2's self_attn / mlp output is not
            # what reaches the stream (a norm follows), so those paths name no site
            if rest == self.attn_out:
                return Site(layer, "attn_out")
            if rest == self.mlp_out:
                return Site(layer, "mlp_out")
        return None

    def site_module(self, model: nn.Module, site: Site) -> tuple[nn.Module, Literal["input", "output"]]:
        """The module to hook for a site, and whether the site is its input or output."""
        block = self.blocks(model)[site.layer]
        if site.kind == "resid_pre":
            return block, "input"
        if site.kind == "resid_post":
            return block, "output"
        return block.get_submodule(self.attn_out if site.kind == "attn_out" else self.mlp_out), "output"

    def writer_sites(self, model: nn.Module) -> list[Site]:
        """Every write to the residual stream, as sites: the embedding output (resid_pre.0), then attn_out.L and
        mlp_out.L of every layer (site set ``writers``)."""
        return [Site(0, "resid_pre")] + [Site(layer, kind) for layer in range(self.n_layers(model))
                                         for kind in ("attn_out", "mlp_out")]

    def writers(self, model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module]:
        block = self.blocks(model)[layer]
        return block.get_submodule(self.attn_writer), block.get_submodule(self.mlp_writer)


def parse_site_name(name: str) -> Site | None:
    """Canonical and SAELens names (architecture-independent); None if neither."""
    if not isinstance(name, str):
        return None
    m = _CANONICAL.match(name.strip())
    if m:
        return Site(int(m.group(2)), m.group(1))
    m = _SAELENS.match(name.strip())
    if m:
        return Site(int(m.group(1)), m.group(2))
    return None


LLAMA = ArchitectureAdapter(
    name="llama",
    model_types=("llama",),
    base="model", layers="model.layers",
    attn_out="self_attn", mlp_out="mlp",
    attn_writer="self_attn.o_proj", mlp_writer="mlp.down_proj",
    embedding="model.embed_tokens", unembedding="lm_head", final_norm="model.norm",
    writer_bias="mlp_bias",
    bias_switches=(
        ("mlp", "mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
        ("attn", "attention_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")),
    ),
)
# Mistral and Qwen2 share Llama's module names, but their MLPs take no bias
# (and vLLM loads no o_proj/MLP bias for Qwen2): no exact weight lowering of `add`.
LLAMA_LIKE = replace(LLAMA, name="llama-like", model_types=("mistral", "qwen2", "qwen3"), writer_bias="none", bias_switches=())
GPT2 = ArchitectureAdapter(
    name="gpt2",
    model_types=("gpt2",),
    base="transformer", layers="transformer.h",
    attn_out="attn", mlp_out="mlp",
    attn_writer="attn.c_proj", mlp_writer="mlp.c_proj",
    embedding="transformer.wte", unembedding="lm_head", final_norm="transformer.ln_f",
    writer_bias="native", conv1d_writers=True, position_embedding="transformer.wpe",
)
GPT_NEOX = ArchitectureAdapter(
    name="gpt_neox",
    model_types=("gpt_neox",),
    base="gpt_neox", layers="gpt_neox.layers",
    attn_out="attention", mlp_out="mlp",
    attn_writer="attention.dense", mlp_writer="mlp.dense_4h_to_h",
    embedding="gpt_neox.embed_in", unembedding="embed_out", final_norm="gpt_neox.final_layer_norm",
    writer_bias="native",
    bias_switches=(("attn", "attention_bias", ("attention.query_key_value", "attention.dense")),),
)
GEMMA2 = ArchitectureAdapter(
    name="gemma2",
    model_types=("gemma2",),
    base="model", layers="model.layers",
    attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
    attn_writer="self_attn.o_proj", mlp_writer="mlp.down_proj",
    embedding="model.embed_tokens", unembedding="lm_head", final_norm="model.norm",
    writer_bias="none", writers_renormalised=True,
)

ADAPTERS: tuple[ArchitectureAdapter, ...] = (LLAMA, LLAMA_LIKE, GPT2, GPT_NEOX, GEMMA2)


def adapter_for(model: nn.Module | str) -> ArchitectureAdapter:
    """The adapter for a model (or a config's model_type string)."""
    model_type = model if isinstance(model, str) else getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = sorted(t for a in ADAPTERS for t in a.model_types)
    raise ModelError(f"no architecture adapter for model_type {model_type!r}; supported: {', '.join(supported)}", where="model")


def hidden_size(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or getattr(config, "n_embd"))


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
