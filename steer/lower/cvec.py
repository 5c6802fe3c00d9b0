"""Lower constant `add` edits into a llama.cpp control vector (DESIGN §6, "cvec").

GGUF with ``general.architecture = controlvector``, ``controlvector.model_hint``
(the model_type, e.g. ``llama``), ``controlvector.layer_count`` (how many
direction tensors) and F32 tensors ``direction.N`` ``[d]``. llama.cpp adds
``direction.N`` to the output of block N, counted from 0 after the residual add
(its loader skips N = 0), i.e. ``resid_post.N`` for N ≥ 1. So: ``add`` at
``resid_post.N`` or ``mlp_out.N`` (a constant added to the MLP's output reaches
the stream at the same point) or ``resid_pre.N+1``, N ≥ 1. Never touches a model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from steer.lower.targets import EditLowering, LoweringError, Unlowerable, lower_each
from steer.models.adapters import Site, adapter_for
from steer.ops import OPERATIONS, Primitive
from steer.plan.ir import Plan, SiteEdit


def check_cvec(se: SiteEdit, site: Site, config: dict) -> str | None:
    try:
        _layer(se, site, adapter_for(config.get("model_type", "")))
    except Unlowerable as exc:
        return str(exc)
    return None


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


def write_cvec(plan: Plan, path: Path, model_type: str) -> list[EditLowering]:
    import gguf

    arch = adapter_for(model_type)
    directions: dict[int, torch.Tensor] = {}

    def rule(se: SiteEdit, site: Site, _low: EditLowering) -> list[str] | None:
        layer = _layer(se, site, arch)
        if layer is None:
            return None
        directions[layer] = directions.get(layer, torch.zeros(plan.hidden_size, dtype=torch.float64)) + se.amount * se.write.double()
        return [f"direction.{layer}"]

    lowerings = lower_each(plan, "cvec", {"model_type": model_type}, rule)
    if not directions:
        raise LoweringError("no edit adds anything, so the control vector would be empty", where="target cvec")
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
