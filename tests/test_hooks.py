"""Hooks ≡ the DESIGN §5 formulas, written out here independently of steer's code.

For every operation and modifier, on tiny random Llama, GPT-2, GPT-NeoX and
Gemma 2 models and at every site kind, the activation at the site inside
`steer.applied` equals x + delta with delta computed in this file from the SAE's
tensors; the logits equal those of the model with that expected activation
substituted by this file's own hook. Sites are located here by explicit module
paths, so the adapters' site mapping is tested too.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import steer
from steer.spec.edit import Condition, Edit, Spec
from tests.conftest import D, random_sae, tiny_model

# site → (module path, input/output), per architecture, written out by hand
SITE_MODULES = {
    "llama": {"resid_post.1": ("model.layers.1", "output"), "resid_pre.1": ("model.layers.1", "input"),
              "attn_out.0": ("model.layers.0.self_attn", "output"), "mlp_out.1": ("model.layers.1.mlp", "output")},
    "gpt2": {"resid_post.1": ("transformer.h.1", "output"), "resid_pre.1": ("transformer.h.1", "input"),
             "attn_out.0": ("transformer.h.0.attn", "output"), "mlp_out.1": ("transformer.h.1.mlp", "output")},
    "gpt_neox": {"resid_post.1": ("gpt_neox.layers.1", "output"), "resid_pre.1": ("gpt_neox.layers.1", "input"),
                 "attn_out.0": ("gpt_neox.layers.0.attention", "output"), "mlp_out.1": ("gpt_neox.layers.1.mlp", "output")},
    # Gemma 2 renormalises each writer's output before the residual add: the site is the norm's output
    "gemma2": {"resid_post.1": ("model.layers.1", "output"), "resid_pre.1": ("model.layers.1", "input"),
               "attn_out.0": ("model.layers.0.post_attention_layernorm", "output"),
               "mlp_out.1": ("model.layers.1.post_feedforward_layernorm", "output")},
}

IDS = torch.tensor([[1, 17, 42, 5, 88, 23, 61, 9, 34, 70]])


# -- the reference, written out ---------------------------------------------

def ref_features(sae, x):
    """f(x) per DESIGN §4, from the SAE's tensors (no steer code)."""
    sigma = torch.ones(x.shape[:-1] + (1,))
    mu = torch.zeros_like(sigma)
    if sae.normalize_activations == "constant_norm_rescale":
        sigma = x.norm(dim=-1, keepdim=True) / D**0.5
    elif sae.normalize_activations == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        sigma = (x - mu).std(-1, keepdim=True) + 1e-5
    xn = (x - mu) / sigma
    pre = (xn - sae.b_dec) @ sae.W_enc + sae.b_enc
    if sae.architecture == "relu":
        f = torch.clamp(pre, min=0)
    elif sae.architecture == "jumprelu":
        f = torch.where(pre > sae.threshold, torch.clamp(pre, min=0), torch.zeros_like(pre))
    else:
        top = torch.topk(pre, sae.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, torch.clamp(top.values, min=0))
    return f, sigma


def unit(v):
    return v / v.norm()


def _module(model, arch, site):
    path, where = SITE_MODULES[arch][site]
    return model.get_submodule(path), where


def activation_at(model, arch, site, ids, replace=None):
    """(activation at the site, logits); `replace(x) -> x'` substitutes the site's value."""
    module, where = _module(model, arch, site)
    seen = {}

    if where == "output":
        def hook(_m, _a, out):
            x = out if isinstance(out, torch.Tensor) else out[0]
            if replace is not None:
                x = replace(x)
                out = x if isinstance(out, torch.Tensor) else (x, *out[1:])
            seen["x"] = x.detach().clone()
            return out
        handle = module.register_forward_hook(hook)
    else:
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if replace is not None:
                x = replace(x)
            seen["x"] = x.detach().clone()
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        handle.remove()
    return seen["x"], logits


# -- the cases: (edits, expected delta(x, f, sigma, sae, dirs)) ----------------

def dirs_file(tmp_path):
    g = torch.Generator().manual_seed(7)
    dirs = {"v": torch.randn(D, generator=g), "u": torch.randn(D, generator=g)}
    path = tmp_path / "dirs.safetensors"
    save_file(dirs, str(path))
    return path, dirs


CASES = {
    "scale": (lambda p: [Edit("scale", feature=3, amount=0.2)],
              lambda x, f, s, sae, d: (0.2 - 1) * f[..., 3:4] * s * sae.W_dec[3]),
    "ablate": (lambda p: [Edit("scale", feature=5, amount=0.0)],
               lambda x, f, s, sae, d: -f[..., 5:6] * s * sae.W_dec[5]),
    "amplify": (lambda p: [Edit("scale", feature=7, amount=3.0)],
                lambda x, f, s, sae, d: 2.0 * f[..., 7:8] * s * sae.W_dec[7]),
    "clamp_always": (lambda p: [Edit("clamp", feature=3, amount=2.0)],
                     lambda x, f, s, sae, d: (2.0 - f[..., 3:4]) * s * sae.W_dec[3]),
    "clamp_active": (lambda p: [Edit("clamp", feature=3, amount=2.0, when="active")],
                     lambda x, f, s, sae, d: (f[..., 3:4] > 0) * (2.0 - f[..., 3:4]) * s * sae.W_dec[3]),
    "add_feature": (lambda p: [Edit("add", feature=4, amount=1.5)],
                    lambda x, f, s, sae, d: 1.5 * sae.W_dec[4].expand_as(x)),
    "add_direction": (lambda p: [Edit("add", direction=f"{p}:v", amount=-2.0)],
                      lambda x, f, s, sae, d: -2.0 * d["v"].expand_as(x)),
    "project_out_direction": (lambda p: [Edit("project_out", direction=f"{p}:u", amount=0.7)],
                              lambda x, f, s, sae, d: -0.7 * (x @ unit(d["u"]))[..., None] * unit(d["u"])),
    "project_out_past_removal": (lambda p: [Edit("project_out", direction=f"{p}:u", amount=1.15)],
                                 lambda x, f, s, sae, d: -1.15 * (x @ unit(d["u"]))[..., None] * unit(d["u"])),
    "project_out_feature": (lambda p: [Edit("project_out", feature=2)],
                            lambda x, f, s, sae, d: -(x @ unit(sae.W_dec[2]))[..., None] * unit(sae.W_dec[2])),
    "cap": (lambda p: [Edit("cap", direction=f"{p}:u", amount=0.05)],
            lambda x, f, s, sae, d: -torch.clamp(x @ unit(d["u"]) - 0.05, min=0)[..., None] * unit(d["u"])),
    "when_condition": (lambda p: [Edit("add", feature=4, amount=1.0, when=Condition(9, 0.1))],
                       lambda x, f, s, sae, d: (f[..., 9:10] > 0.1) * sae.W_dec[4]),
    "monitor": (lambda p: [Edit("monitor", feature=3, amount=0.0)],
                lambda x, f, s, sae, d: torch.zeros_like(x)),
    "simultaneous": (lambda p: [Edit("scale", feature=3, amount=0.0), Edit("add", feature=4, amount=1.0),
                                Edit("project_out", direction=f"{p}:u")],
                     lambda x, f, s, sae, d: -f[..., 3:4] * s * sae.W_dec[3] + sae.W_dec[4]
                     - (x @ unit(d["u"]))[..., None] * unit(d["u"])),
}


def check_case(arch, site, case, tmp_path, sae):
    path, dirs = dirs_file(tmp_path)
    make_edits, expected_delta = CASES[case]
    model = tiny_model(arch)
    spec = Spec(edits=tuple(make_edits(path)), site=site)
    plan = steer.compile(spec, model, sae)

    x_clean, logits_clean = activation_at(model, arch, site, IDS)
    f, sigma = ref_features(sae, x_clean)
    expected = x_clean + expected_delta(x_clean, f, sigma, sae, dirs)
    with steer.applied(model, plan) as run:
        x_steered, logits_steered = activation_at(model, arch, site, IDS)
    # float32 as torch's own default tolerance has it (atol 1e-5, rtol 1.3e-6): the hook and the formula sum in
    # different orders, and on some CPUs (an AMX Xeon) that differs by ~15 ulp at |x| ≈ 12
    torch.testing.assert_close(x_steered, expected, atol=1e-5, rtol=1.3e-6)

    _, logits_expected = activation_at(model, arch, site, IDS, replace=lambda x: x + expected_delta(x, *ref_features(sae, x), sae, dirs))
    torch.testing.assert_close(logits_steered, logits_expected, atol=1e-4, rtol=0)
    if case == "monitor":
        assert torch.equal(logits_steered, logits_clean)
        torch.testing.assert_close(run.activations(0), f[..., 3], atol=1e-6, rtol=1e-6)
        assert torch.equal(run.fired(0), run.activations(0) > 0)
    elif torch.equal(expected, x_clean):  # e.g. a condition that holds at no token here
        assert torch.equal(logits_steered, logits_clean)
    else:
        assert (logits_steered - logits_clean).abs().max() > 1e-4, "the edit did not reach the logits"
    return f


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("site", ["resid_post.1", "resid_pre.1", "attn_out.0", "mlp_out.1"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_hook_equals_formula(arch, site, case, tmp_path):
    check_case(arch, site, case, tmp_path, random_sae())


@pytest.mark.parametrize("case", ["scale", "clamp_active", "when_condition", "monitor", "simultaneous"])
@pytest.mark.parametrize("variant", ["jumprelu", "topk", "constant_norm_rescale", "layer_norm"])
def test_hook_equals_formula_for_sae_variants(variant, case, tmp_path):
    if variant in ("jumprelu", "topk"):
        sae = random_sae(architecture=variant)
    else:
        sae = random_sae(normalize_activations=variant)
    for arch in ("llama", "gpt2"):
        check_case(arch, "resid_post.1", case, tmp_path, sae)


def test_when_condition_gates_per_token(tmp_path):
    """The condition case above must hold at some tokens and not at others, or it proves little."""
    f = check_case("llama", "resid_post.1", "when_condition", tmp_path, random_sae())
    holds = f[..., 9] > 0.1
    assert holds.any() and not holds.all()


def test_feature_units_use_the_p99_statistic():
    sae = random_sae()
    p99 = torch.rand(sae.d_sae) + 0.5
    sae.feature_stats["p99"] = p99
    model = tiny_model("llama")
    plan = steer.compile(Spec(edits=(Edit("add", feature=4, amount=2.0, units="feature"),), site="resid_post.1"), model, sae)
    x_clean, _ = activation_at(model, "llama", "resid_post.1", IDS)
    with steer.applied(model, plan):
        x_steered, _ = activation_at(model, "llama", "resid_post.1", IDS)
    torch.testing.assert_close(x_steered, x_clean + 2.0 * p99[4] * sae.W_dec[4], atol=1e-5, rtol=0)


# -- identities and cleanliness --------------------------------------------------

def dead_feature_sae():
    """Feature 0 never fires: a zero encoder column and a negative bias."""
    sae = random_sae()
    sae.W_enc[:, 0] = 0
    sae.b_enc[0] = -1.0
    return sae


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("edit", [
    Edit("scale", feature=3, amount=1.0),
    Edit("add", feature=4, amount=0.0),
    Edit("clamp", feature=0, amount=0.0),  # clamp a feature to its current value (0: it never fires)
    Edit("clamp", feature=0, amount=5.0, when="active"),
    Edit("project_out", feature=2, amount=0.0),
], ids=lambda e: f"{e.op}-{e.feature}-{e.amount}-{e.when}")
def test_identity_edits_leave_logits_bit_identical(arch, edit):
    model = tiny_model(arch)
    with torch.no_grad():
        clean = model(IDS).logits
        plan = steer.compile(Spec(edits=(edit,), site="resid_post.1"), model, dead_feature_sae())
        with steer.applied(model, plan):
            steered = model(IDS).logits
    assert torch.equal(clean, steered)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_model_bit_identical_after_exit_and_after_exception(arch, tmp_path):
    path, _ = dirs_file(tmp_path)
    model = tiny_model(arch)
    before = _snapshot(model)
    hooks_before = _hook_count(model)
    with torch.no_grad():
        clean = model(IDS).logits
    spec = Spec(edits=(Edit("scale", feature=3, amount=0.0), Edit("add", direction=f"{path}:v", amount=3.0, scope="generation"),
                       Edit("monitor", feature=1)), site="resid_pre.2")
    plan = steer.compile(spec, model, random_sae())
    with steer.applied(model, plan), torch.no_grad():
        assert _hook_count(model) > hooks_before
        model(IDS)
    with pytest.raises(RuntimeError, match="boom"):
        with steer.applied(model, plan), torch.no_grad():
            model(IDS)
            raise RuntimeError("boom")
    assert _hook_count(model) == hooks_before
    after = _snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, clean)


# -- generation: KV cache, scope, padding ---------------------------------------

def generation_spec(path):
    return Spec(edits=(
        Edit("add", direction=f"{path}:v", amount=4.0, scope="generation"),
        Edit("scale", feature=3, amount=0.0, when=Condition(9, 0.05)),
        Edit("project_out", direction=f"{path}:u", scope="prompt"),
    ), site="resid_post.1")


def greedy(model, ids, n, **kwargs):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_cached_generation_equals_uncached(arch, tmp_path):
    path, _ = dirs_file(tmp_path)
    model = tiny_model(arch)
    plan = steer.compile(generation_spec(path), model, random_sae())
    ids = IDS[:, :6]
    with steer.applied(model, plan):
        cached = greedy(model, ids, 32, use_cache=True, output_scores=True, return_dict_in_generate=True)
    with steer.applied(model, plan):
        uncached = greedy(model, ids, 32, use_cache=False, output_scores=True, return_dict_in_generate=True)
    plain = greedy(model, ids, 32, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-4, rtol=1e-5)
    steered, unsteered = torch.stack(cached.scores), torch.stack(plain.scores)
    finite = torch.isfinite(steered) & torch.isfinite(unsteered)  # min_new_tokens masks EOS with -inf
    assert (steered - unsteered)[finite].abs().max() > 1e-2, "the edit did not change generation"


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("scope", ["prompt", "generation"])
def test_scope_splits_prompt_and_generation_tokens(scope, use_cache, tmp_path):
    """Per forward call, the delta (site value after steer's hook minus before it) is v exactly
    at the tokens of the scope and 0 elsewhere: the prompt is the first call's tokens."""
    path, dirs = dirs_file(tmp_path)
    model = tiny_model("llama")
    spec = Spec(edits=(Edit("add", direction=f"{path}:v", amount=1.0, scope=scope),), site="resid_post.1")
    plan = steer.compile(spec, model, None)
    module, _ = _module(model, "llama", "resid_post.1")
    before, after = [], []
    first = module.register_forward_hook(lambda _m, _a, out: before.append(out.detach().clone()))
    try:
        with steer.applied(model, plan):
            last = module.register_forward_hook(lambda _m, _a, out: after.append(out.detach().clone()))
            try:
                greedy(model, IDS[:, :5], 3, use_cache=use_cache)
            finally:
                last.remove()
    finally:
        first.remove()
    assert len(before) == 3
    for call, (b, a) in enumerate(zip(before, after)):
        positions = torch.arange(a.shape[1]) + (a.shape[1] == 1) * (4 + call)
        in_scope = (positions >= 5) if scope == "generation" else (positions < 5)
        expected = b + in_scope[None, :, None] * dirs["v"]
        assert torch.equal(a, expected), f"call {call}: delta is not v exactly on the {scope} tokens"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_left_padded_batch_equals_rows_alone(arch, tmp_path):
    path, _ = dirs_file(tmp_path)
    model = tiny_model(arch)
    plan = steer.compile(generation_spec(path), model, random_sae())
    rows = [[1, 17, 42, 5], [1, 88, 23, 61, 9, 34, 70], [1, 33, 12, 7, 40]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with steer.applied(model, plan):
        batch = greedy(model, ids, 12, attention_mask=mask)[:, width:]
    for i, r in enumerate(rows):
        with steer.applied(model, plan):
            alone = greedy(model, torch.tensor([r]), 12)[0, len(r):]
        assert torch.equal(batch[i], alone), f"row {i} differs when batched"
