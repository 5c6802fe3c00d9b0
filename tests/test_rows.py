"""Per-row plans: ``steer.applied(model, [plan_0, None, ...])`` steers each batch row by its own plan, exactly.

The reference is each row run alone under its own plan through the single-plan path (which tests/test_hooks.py
checks against DESIGN §5's formulas) — or with no hooks for a None row. On the tiny Llama, GPT-2, GPT-NeoX and
Gemma 2 models, a left-padded batch of prompts of different lengths is decoded greedily with `model.generate`
(KV cache), rows carrying every operation (`steer.ops.OPERATIONS`, each from its ``example``), the modifiers
(scope prompt / generation, ``when``), None, plans on other sites and other SAEs (relu, topk, per-token
normalisation) and two rows sharing one Plan; each row's tokens must equal its solo run's, its logits be close
to them, and each monitor row's read-out equal its solo read-out.

The tiny models run in float64 here (Gemma 2 excepted: see `tiny`). In float32 the unhooked models themselves
give logits (|logit| up to ~15) that differ by up to 3e-5 between a row of a padded batch and the row alone
(kernels sum in another order), which would hide a small error of the hook; in float64 that noise is ~1e-14
(generate hands back float32 logits: ~1e-6), so atol 1e-5 with rtol 0 is strict. Every edit here moves its row's
logits by > 1e-4 (asserted), so a row steered by the wrong plan, or not at all, fails.
The default-model test runs in float32.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import save_file

import steer
from steer.generate import cache_keyword, cache_of
from steer.ops import OPERATIONS
from tests.conftest import TINY_ARCHS, VOCAB, D, random_sae, tiny_model, tiny_tokenizer

NEW = 10  # new tokens per row
ATOL, RTOL = 1e-5, 0


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "dirs.safetensors"
    g = torch.Generator().manual_seed(7)
    save_file({"u": torch.randn(D, generator=g), "v": torch.randn(D, generator=g)}, str(path))
    return path


def tiny(arch: str, **kwargs):
    """A tiny model in float64 (see the module's docstring) — Gemma 2 in float32: transformers' Gemma 2 gives NaN
    logits for left-padded rows in float64 (with or without steer), and its float32 batching noise is ~4e-6."""
    model = tiny_model(arch, **kwargs)
    return model if arch == "gemma2" else model.double()


def row_plans(model, dirs) -> list[tuple[str, steer.Plan | None]]:
    """(label, plan) per row: every operation's example, the modifiers, None, other sites and other SAEs."""
    sae = random_sae(site="resid_post.1")
    plans = [("none", None)]
    for name, op in OPERATIONS.items():
        plans.append((name, steer.compile(op.example.format(feature=3, direction=f"{dirs}:u"), model, sae)))
    modifiers = {
        "scope_generation": f"add direction {dirs}:v by 3 site resid_post.1 scope generation",
        "scope_prompt": f"project out direction {dirs}:u site resid_post.1 scope prompt",
        "when": "add feature 4 by 2 when feature 9 above 0.1 site resid_post.1",
        "simultaneous": f"scale feature 3 by 0; add feature 4 by 1; project out direction {dirs}:u; monitor feature 9 above 0.2",
    }
    for label, text in modifiers.items():
        plans.append((label, steer.compile(text, model, sae)))
    others = {  # other SAEs, at the same site and at other sites
        "other_sae_same_site": (random_sae(seed=2, site="resid_post.1"), "suppress feature 5 by 100%; monitor feature 6"),
        "topk_sae": (random_sae(seed=3, architecture="topk", site="resid_post.1"), "clamp feature 2 to 1.5"),
        "layer_norm_sae_resid_pre": (random_sae(seed=4, normalize_activations="layer_norm", site="resid_pre.2"),
                                     "scale feature 3 by 3 scope generation; monitor feature 3"),
        "attn_out": (random_sae(seed=5, site="attn_out.0"), "add feature 1 by -2; monitor feature 2"),
    }
    for label, (other, text) in others.items():
        plans.append((label, steer.compile(text, model, other)))
    two_sites = steer.compile(f"suppress feature 3 by 80% site resid_post.1; add direction {dirs}:v by 2 site mlp_out.0 "
                              "scope generation", model, [sae, random_sae(seed=6, site="mlp_out.0")])
    plans.append(("two_sites", two_sites))
    plans.append(("none_again", None))
    plans.append(("scale_shared", plans[1][1]))  # the same Plan object as row 1: one group, two rows
    return plans


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, VOCAB, (3 + (5 * i) % 7,), generator=g).tolist() for i in range(n)]


def left_pad(rows):
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def decode(model, ids, mask, n=NEW):
    """Greedy tokens (B, n) and raw logits (B, n, V), KV-cached."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


def alone(model, plan, row, n=NEW):
    """(tokens, logits, run) of one row under its plan, through the single-plan path (no hooks for None)."""
    ids = torch.tensor([row])
    with (steer.applied(model, plan) if plan is not None else nullcontext()) as run:
        tokens, logits = decode(model, ids, torch.ones_like(ids), n)
    return tokens[0], logits[0], run


def monitor_indices(plan):
    return [] if plan is None else [e.index for sp in plan.sites for e in sp.edits if not OPERATIONS[e.op].writes]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_each_row_equals_its_plan_alone(arch, dirs):
    check_each_row_equals_its_plan_alone(arch, dirs, own_positions=False)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_each_row_at_its_own_positions_equals_its_plan_alone(arch, dirs):
    """``prompt_length=[len(row), ...]``: scope and monitors at each row's own positions (generate's position ids,
    pads not recorded) instead of the padded coordinates — the same tokens, logits and read-outs."""
    check_each_row_equals_its_plan_alone(arch, dirs, own_positions=True)


def check_each_row_equals_its_plan_alone(arch, dirs, *, own_positions: bool):
    model = tiny(arch)
    labelled = row_plans(model, dirs)
    labels, plans = [label for label, _ in labelled], [plan for _, plan in labelled]
    rows = prompts(len(plans))
    assert len(set(map(len, rows))) > 3, "rows of several lengths: left padding"
    ids, mask = left_pad(rows)
    lengths = [len(r) for r in rows] if own_positions else None
    with torch.no_grad(), steer.applied(model, plans, prompt_length=lengths) as run:
        tokens, logits = decode(model, ids, mask)
    assert len(run) == len(plans) and next(model.parameters()).dtype == (torch.float32 if arch == "gemma2" else torch.float64)
    with torch.no_grad():
        for i, (label, plan) in enumerate(labelled):
            solo_tokens, solo_logits, solo_run = alone(model, plan, rows[i])
            assert torch.equal(tokens[i], solo_tokens), f"{arch} row {i} ({label}): tokens differ from its run alone"
            torch.testing.assert_close(logits[i], solo_logits, atol=ATOL, rtol=RTOL, 
                                       msg=lambda m, where=f"{arch} row {i} ({label})": f"{where}: {m}")
            assert run[i].plan is plan
            for index in monitor_indices(plan):
                read = run[i].activations(index)
                assert read.shape == (1, len(rows[i]) + NEW - 1)
                torch.testing.assert_close(read, solo_run.activations(index), atol=ATOL, rtol=RTOL)
                assert torch.equal(run[i].fired(index), read > solo_run._thresholds[index])
            if plan is not None and any(OPERATIONS[e.op].writes for sp in plan.sites for e in sp.edits):
                plain = alone(model, None, rows[i])[1]
                assert (solo_logits - plain).abs().max() > 1e-4, f"{label}: the edit changes nothing: proves nothing"
    assert {"monitor", "simultaneous", "other_sae_same_site", "layer_norm_sae_resid_pre"} <= {
        labels[i] for i, p in enumerate(plans) if monitor_indices(p)}
    with pytest.raises(KeyError, match="no plan"):
        run[0].activations(0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_batch_of_one_is_todays_single_plan(arch, dirs):
    model = tiny(arch)
    plan = steer.compile(f"suppress feature 3 by 80% when feature 9 above 0.1; add direction {dirs}:v by 2 scope "
                         f"generation; project out direction {dirs}:u site resid_pre.2; monitor feature 7",
                         model, random_sae(site="resid_post.1"))
    ids = torch.tensor([prompts(1)[0]])
    with torch.no_grad():
        with steer.applied(model, plan) as single:
            tokens, logits = decode(model, ids, torch.ones_like(ids))
        with steer.applied(model, [plan]) as rows:
            row_tokens, row_logits = decode(model, ids, torch.ones_like(ids))
    assert torch.equal(tokens, row_tokens) and torch.equal(logits, row_logits)
    assert torch.equal(single.activations(3), rows[0].activations(3))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_same_plan_on_every_row_equals_the_single_plan_on_the_batch(arch, dirs):
    """A list of one Plan object per row is the single-plan path (one group covering the batch): bit-identical."""
    model = tiny(arch)
    plan = steer.compile("scale feature 3 by 0.2; monitor feature 4 site resid_post.1", model, random_sae(site="resid_post.1"))
    ids, mask = left_pad(prompts(3))
    with torch.no_grad():
        with steer.applied(model, plan) as single:
            tokens, logits = decode(model, ids, mask)
        with steer.applied(model, [plan] * 3) as rows:
            row_tokens, row_logits = decode(model, ids, mask)
    assert torch.equal(tokens, row_tokens) and torch.equal(logits, row_logits)
    pads = (mask == 0).sum(-1).tolist()
    for i in range(3):
        assert torch.equal(rows[i].activations(1), single.activations(1)[i: i + 1, pads[i]:])


def test_incremental_decoding_with_the_cache_by_hand(dirs):
    """The demo's way: a prefill call, then one token per call with the KV cache, position ids from the mask."""
    model = tiny("llama")
    sae = random_sae(site="resid_post.1")
    plans = [None, steer.compile("suppress feature 3 by 100%; monitor feature 3", model, sae),
             steer.compile(f"add direction {dirs}:v by 3 scope generation", model, sae)]
    rows = prompts(3, seed=1)
    key = cache_keyword(model)

    def run_by_hand(ids, mask, plan_or_plans, steps=6):
        logits_seen = []
        with torch.no_grad(), steer.applied(model, plan_or_plans) as run:
            out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
            for _ in range(steps):
                logits_seen.append(out.logits[:, -1])
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                out = model(nxt, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1, use_cache=True,
                            **{key: cache_of(out)})
        return torch.stack(logits_seen, 1), run

    ids, mask = left_pad(rows)
    batch, run = run_by_hand(ids, mask, plans)
    for i, plan in enumerate(plans):
        one = torch.tensor([rows[i]])
        solo, solo_run = run_by_hand(one, torch.ones_like(one), plan if plan is not None else [None])
        torch.testing.assert_close(batch[i], solo[0], atol=ATOL, rtol=RTOL)
        assert torch.equal(batch[i].argmax(-1), solo[0].argmax(-1))
        if i == 1:
            torch.testing.assert_close(run[1].activations(1), solo_run.activations(1), atol=ATOL, rtol=RTOL)


def test_generate_takes_one_plan_per_prompt(dirs):
    from steer.generate import Sampling, generate

    model, tokenizer = tiny("gpt2"), tiny_tokenizer()
    sae = random_sae(site="resid_post.1")
    plans = [steer.compile("add feature 4 by 40", model, sae), None, steer.compile("clamp feature 3 to 40", model, sae)]
    texts = ["hello there", "a much longer prompt, this one", "hi"]
    sampling = Sampling(max_new_tokens=8)
    batch = generate(model, tokenizer, texts, plans, sampling, chat=False)
    assert batch == [generate(model, tokenizer, [t], p, sampling, chat=False)[0] for t, p in zip(texts, plans)]
    plain = generate(model, tokenizer, texts, None, sampling, chat=False)
    assert batch[0] != plain[0] and batch[1] == plain[1] and batch[2] != plain[2]
    with pytest.raises(ValueError, match="one plan"):
        generate(model, tokenizer, texts, plans[:2], sampling, chat=False)


def test_errors_and_cleanliness(dirs):
    model = tiny("llama")
    plan = steer.compile("suppress feature 3 by 80%", model, random_sae(site="resid_post.1"))
    ids = torch.tensor(prompts(2)[:1] * 2)
    with torch.no_grad():
        clean = model(ids).logits
        with pytest.raises(ValueError, match="2 plan"), steer.applied(model, [plan, None]):
            model(ids[:1])
        with pytest.raises(TypeError, match="row 1"), steer.applied(model, [plan, "suppress feature 3"]):
            pass
        with pytest.raises(TypeError), steer.applied(model, "suppress feature 3"):
            pass
        with pytest.raises(ValueError, match="at least one"), steer.applied(model, []):
            pass
        other = steer.compile(f"add direction {dirs}:v by 1 site resid_post.1", tiny("llama", n_layers=4), None)
        with pytest.raises(ValueError, match="compiled for"), steer.applied(model, [None, other]):
            pass
        with pytest.raises(RuntimeError, match="boom"), steer.applied(model, [None, plan]):
            steered = model(ids).logits
            raise RuntimeError("boom")
        assert torch.equal(steered[0], clean[0]) and not torch.equal(steered[1], clean[1])
        assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
        assert torch.equal(model(ids).logits, clean)
        with steer.applied(model, [None, None]) as run:  # nothing to hook
            assert torch.equal(model(ids).logits, clean) and run[1].plan is None
        with pytest.raises(ValueError, match="3 for 2 row"), steer.applied(model, [plan, None], prompt_length=[1, 2, 3]):
            pass
        with pytest.raises(TypeError, match="per-row plans"), steer.applied(model, plan, prompt_length=[1, 2]):
            pass


@pytest.mark.default_model
def test_default_model_rows_none_suppress_add(default_model):
    from steer.generate import prompt_ids
    from steer.models.adapters import Site
    from steer.models.capture import capture

    model, tokenizer = default_model
    texts = ["Tell me about weddings.", "What is the capital of France? Answer briefly please.", "Hi!"]
    inputs = prompt_ids(tokenizer, texts)
    sae = steer.load_sae("default")  # resid_post.10
    one = prompt_ids(tokenizer, [texts[1]])
    with torch.no_grad(), capture(model, [Site(10, "resid_post")]) as acts:
        model(**one)
        busiest = int(sae.encode(acts[Site(10, "resid_post")][0][0]).mean(0).argmax())  # fires on row 1's prompt
    plans = [None, steer.compile(f"suppress feature {busiest} by 100%", model, sae, tokenizer=tokenizer),
             steer.compile(f"steer feature {busiest} by 8 units feature", model, sae, tokenizer=tokenizer)]
    assert len(set(inputs["attention_mask"].sum(-1).tolist())) == 3, "three prompt lengths: left padding"
    with torch.no_grad():
        with steer.applied(model, plans):
            tokens, logits = decode(model, inputs["input_ids"], inputs["attention_mask"], n=12)
        for i, plan in enumerate(plans):
            one = prompt_ids(tokenizer, [texts[i]])
            with steer.applied(model, plan) if plan is not None else nullcontext():
                solo_tokens, solo_logits = decode(model, one["input_ids"], one["attention_mask"], n=12)
            assert torch.equal(tokens[i], solo_tokens[0]), f"row {i}"
            torch.testing.assert_close(logits[i], solo_logits[0], atol=1e-4, rtol=0)
            if plan is not None:
                plain = decode(model, one["input_ids"], one["attention_mask"], n=12)[1]
                assert (solo_logits - plain).abs().max() > 1e-3, f"row {i}: the edit changes nothing"
