"""Lower constant `add` edits into a llama.cpp control vector (DESIGN §6, "cvec").

GGUF with ``general.architecture = controlvector``, ``controlvector.model_hint``
(the model_type, e.g. ``llama``), ``controlvector.layer_count`` (how many
direction tensors) and F32 tensors ``direction.N`` ``[d]``. llama.cpp adds
``direction.N`` to the output of block N, counted from 0 after the residual add
(its loader skips N = 0), i.e. ``resid_post.N`` for N ≥ 1. So: ``add`` at
``resid_post.N`` or ``mlp_out.N`` (a constant added to the MLP's output reaches
the stream at the same point) or ``resid_pre.N+1``, N ≥ 1. Never touches a model.

The target measures the written vector in llama.cpp on the base's GGUF when steer knows it
(`steer.verify.llamacpp`, in a child process); a control vector runs outside transformers, so
``load`` refuses (evaluate the spec, or a weights export, instead).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from steer.errors import SteerError
from steer.lower.targets import (
    EditLowering,
    Loaded,
    LoweringError,
    Outcome,
    Target,
    Unlowerable,
    WriteOptions,
    Written,
    lower_each,
    outcome_of,
    register,
)
from steer.models.adapters import Site, adapter_for
from steer.ops import OPERATIONS, Primitive
from steer.plan.ir import Plan, SiteEdit


def _layer(se: SiteEdit, site: Site, arch) -> int | None:
    primitive = OPERATIONS[se.op].lowers_to
    if primitive is Primitive.NOTHING:
        return None
    if primitive is not Primitive.CONSTANT:
        raise Unlowerable(f"a control vector only adds a constant per layer; {se.op} is {primitive.value}")
    if se.scope != "all" or se.when_slot is not None:
        raise Unlowerable("a control vector applies at every token; this edit is scoped or conditional")
    if site.kind == "resid_pre":
        layer = site.layer - 1
    elif site.kind == "attn_out":
        raise Unlowerable("llama.cpp adds control vectors after the whole block, not after attention")
    else:
        if site.kind == "mlp_out" and arch.writers_renormalised:
            raise Unlowerable(f"{arch.name} renormalises the MLP output before the residual add")
        layer = site.layer
    if layer < 1:
        raise Unlowerable("llama.cpp applies no control vector to block 0's output (direction.0 is skipped)")
    return layer


def write_cvec(plan: Plan, path: Path, config: dict) -> list[EditLowering]:
    """Write the control vector GGUF for ``plan`` on a model with config ``config`` (its ``to_dict()``)."""
    import gguf

    model_type = config.get("model_type", "")
    arch = adapter_for(model_type)
    directions: dict[int, torch.Tensor] = {}

    def rule(se: SiteEdit, site: Site, _low: EditLowering) -> list[str] | None:
        layer = _layer(se, site, arch)
        if layer is None:
            return None
        directions[layer] = directions.get(layer, torch.zeros(plan.hidden_size, dtype=torch.float64)) + se.amount * se.write.double()
        return [f"direction.{layer}"]

    lowerings = lower_each(plan, "cvec", config, rule)
    if not directions:
        raise LoweringError("no edit changes the model's outputs: an empty cvec artifact is refused (the control "
                            "vector would hold no direction)", where="target cvec")
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_type)
    writer.add_int32("controlvector.layer_count", len(directions))
    for layer in sorted(directions):
        writer.add_tensor(f"direction.{layer}", directions[layer].float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return lowerings


FILE = "control_vector.gguf"


class ControlVectorTarget(Target):
    name = "cvec"
    help = "a llama.cpp control vector (GGUF)"
    hub_relation = "adapter"  # applied on the base at load time (llama.cpp --control-vector), as a LoRA GGUF is
    manifest_keys = ("llamacpp_fidelity",)
    writes_unchanged = False

    def check(self, se: SiteEdit, site: Site, config: dict) -> Outcome:
        arch = adapter_for(config.get("model_type", ""))
        return outcome_of(lambda se, site, _low: None if _layer(se, site, arch) is None else ["direction"], se, site)

    def write(self, plan: Plan, model, tokenizer, out: Path, options: WriteOptions) -> Written:
        from steer.verify.llamacpp import LlamaCppError, measure_cvec_export

        written = Written(write_cvec(plan, out / FILE, model.config.to_dict()))
        try:  # the vector is written either way; a failing llama.cpp costs only its measurement
            measured, why = measure_cvec_export(model, tokenizer, plan, out / FILE, options.base)
        except LlamaCppError as exc:
            measured, why = None, str(exc)
        if why:
            written.notes.append(f"llama.cpp fidelity not measured: {why}")
        written.manifest["llamacpp_fidelity"] = measured
        return written

    def load(self, directory: Path, manifest: dict) -> Loaded:
        raise SteerError("a control vector runs in llama.cpp, outside transformers; evaluate its spec (steer eval "
                         "SPEC) or a weights/adapter export", where=str(directory))

    def verify(self, directory: Path, manifest: dict, model, tokenizer, plan: Plan, verdict) -> None:
        from steer.verify.llamacpp import LlamaCppError, measure_cvec_export

        try:
            measured, why = measure_cvec_export(model, tokenizer, plan, directory / FILE, manifest["base_model"]["name"])
        except LlamaCppError as exc:
            verdict.fail(f"llama.cpp fidelity could not be measured: {exc}")
            return
        if measured is None:
            verdict.lines.append(f"note llama.cpp fidelity not measured: {why}")
            return
        line = (f"llama.cpp + control vector vs the hooked fp32 reference over {measured['tokens']} positions: "
                f"mean KL {measured['kl']:.4g} (quantisation alone {measured['kl_unedited']:.4g}), top-1 "
                f"{100 * measured['top1']:.1f}% (quantisation alone {100 * measured['top1_unedited']:.1f}%); "
                f"{measured['rule']}")
        if measured["passes"]:
            verdict.lines.append("ok   " + line)
        else:
            verdict.fail(line)


CVEC = register(ControlVectorTarget())
