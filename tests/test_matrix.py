"""The equivalence matrix: every operation × every artifact target × every tiny architecture.

Generated from the registries — `steer.ops.OPERATIONS` (each op's ``example`` edit at its natural site) ×
`steer.lower.targets.TARGETS` × Llama / GPT-2 / GPT-NeoX / Gemma 2 — so a new operation or target gets its
cells without editing this file. Each cell's expected outcome is what the target *declares*
(`Target.outcome`, from its own lowering rule, with its ``exact_kl`` / ``approximate_kl`` tolerances), and the
cell checks that the written artifact does exactly that:

- **exact**: written without ``--allow-approximate``, every edit recorded exact, and the artifact — reloaded
  here the way its users load it, independently of steer's loaders (`REFERENCE_LOADERS`, one row per target)
  — gives the hooked reference's logits within the target's ``exact_kl`` (max per-token KL) and the same
  argmax;
- **approximate**: refused without ``--allow-approximate`` (nothing written); accepted with it, recorded
  approximate, and within the target's declared ``approximate_kl`` mean KL when it declares one;
- **refused**: a `LoweringError` carrying the declared reason, and nothing written.

The one row a new target adds here is its entry in `REFERENCE_LOADERS`: how a user of that artifact runs it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import steer
from steer.export.checkpoint import export
from steer.lower.pack import load_pack
from steer.lower.targets import TARGETS, LoweringError
from steer.ops import OPERATIONS
from tests.conftest import TINY_ARCHS, D, random_sae, save_tiny

IDS = torch.tensor([[1, 17, 42, 5, 88, 23, 61, 9, 34, 70, 12, 44], [1, 60, 8, 31, 77, 15, 50, 3, 66, 21, 90, 40]])
FEATURE = 3
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "gemma2": "model.layers"}
"""Where each architecture's blocks are (for the control vector's reference: direction.N is added to block N's output)."""


# -- how users run each artifact (independent of steer's own loaders) -----------------------------------------

def _merged(out, directory, model, plan):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()(IDS).logits


def _adapter(out, directory, model, plan):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, str(out)).eval()(IDS).logits


def _control_vector(out, directory, model, plan, arch):
    """llama.cpp's semantics, written out: GGUF ``direction.N`` (F32, [d]) added to the output of block N."""
    from gguf import GGUFReader

    reader = GGUFReader(str(out / "control_vector.gguf"))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "controlvector"
    blocks = model.get_submodule(BLOCKS[arch])
    handles = []
    for tensor in reader.tensors:
        layer = int(tensor.name.split(".")[1])
        vector = torch.tensor(tensor.data.copy(), dtype=torch.float32).reshape(D)

        def add(_module, _args, output, v=vector):
            if isinstance(output, tuple):
                return (output[0] + v, *output[1:])
            return output + v
        handles.append(blocks[layer].register_forward_hook(add))
    try:
        return model(IDS).logits
    finally:
        for h in handles:
            h.remove()


def _pack(out, directory, model, plan):
    reloaded = load_pack(out / "steer_pack")
    with steer.applied(model, reloaded):
        return model(IDS).logits


REFERENCE_LOADERS = {"weights": _merged, "adapter": _adapter, "cvec": _control_vector, "pack": _pack}


# -- the cells -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=TINY_ARCHS)
def base(request, tmp_path_factory):
    model, tokenizer, directory = save_tiny(request.param, tmp_path_factory.mktemp(f"matrix-{request.param}"))
    path = tmp_path_factory.mktemp("matrix-dirs") / "dirs.safetensors"
    save_file({"u": torch.randn(D, generator=torch.Generator().manual_seed(7))}, str(path))
    return request.param, model, tokenizer, directory, path


def kl_per_token(reference: torch.Tensor, artifact: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ artifact) at every position, nats, in float64."""
    p, q = F.log_softmax(reference.double(), -1), F.log_softmax(artifact.double(), -1)
    return (p.exp() * (p - q)).sum(-1).clamp(min=0)


def test_every_operation_has_an_example_and_every_target_a_reference_loader():
    assert set(REFERENCE_LOADERS) == set(TARGETS), "a new target needs its row in REFERENCE_LOADERS"
    for name, op in OPERATIONS.items():
        assert op.example and ("{feature}" in op.example or "{direction}" in op.example), name


@pytest.mark.parametrize("target_name", list(TARGETS))
@pytest.mark.parametrize("op_name", list(OPERATIONS))
def test_cell(base, op_name, target_name, tmp_path):
    arch, model, tokenizer, directory, dirs = base
    op, target = OPERATIONS[op_name], TARGETS[target_name]
    text = op.example.format(feature=FEATURE, direction=f"{dirs}:u")
    plan = steer.compile(text, model, random_sae(site="resid_post.1"), tokenizer=tokenizer)
    declared = target.outcome(plan, model.config.to_dict())
    out = tmp_path / "out"

    if declared.kind == "refused":
        with pytest.raises(LoweringError) as info:
            export(plan, model, tokenizer, target_name, out, base=directory, allow_approximate=True)
        assert declared.reason and declared.reason in str(info.value), (declared, str(info.value))
        assert not out.exists()
        return

    if declared.kind == "approximate":
        with pytest.raises(LoweringError, match="approximate lowering refused"):
            export(plan, model, tokenizer, target_name, out, base=directory)
        assert not out.exists()
    manifest = export(plan, model, tokenizer, target_name, out, base=directory,
                      allow_approximate=declared.kind == "approximate")
    kinds = {e["lowering"] for e in manifest["edits"]}
    assert kinds == {declared.kind}, (kinds, declared)

    with torch.no_grad():
        with steer.applied(model, plan):
            reference = model(IDS).logits
        loader = REFERENCE_LOADERS[target_name]
        artifact = loader(out, directory, model, plan, arch) if loader is _control_vector else loader(out, directory, model, plan)
        clean = model(IDS).logits
    kl = kl_per_token(reference, artifact)
    if declared.kind == "exact":
        if op.writes:
            assert float(kl_per_token(reference, clean).max()) > 1e-4, "the edit changes nothing: the cell proves nothing"
        assert float(kl.max()) <= target.exact_kl, f"{arch} {op_name}→{target_name}: KL max {float(kl.max()):.3g}"
        assert torch.equal(reference.argmax(-1), artifact.argmax(-1))
    else:
        assert float(kl_per_token(reference, clean).max()) > 0, "the edit changes nothing: the cell proves nothing"
        if target.approximate_kl is not None:
            assert float(kl.mean()) <= target.approximate_kl, (
                f"{arch} {op_name}→{target_name}: mean KL {float(kl.mean()):.3g} > the declared {target.approximate_kl}")
