"""Graft (DESIGN §6): scale/clamp lowered into extra MLP neurons; the spec's `max_kl`; the refusal without either.

The reference is the hooked model (itself checked against the DESIGN §5
formulas in test_hooks.py). Every export is reloaded with plain
`AutoModelForCausalLM.from_pretrained` and compared here with the hooks on
steer's calibration text, which the graft fit never reads (it fits on the
default corpus's held-out split). The padding is read straight from the
safetensors files, in the layout Hugging Face gives each architecture.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import steer
from steer.cli.main import main
from steer.errors import SpecError
from steer.export.checkpoint import export
from steer.lower.targets import LoweringError
from steer.sae import save_sae
from steer.spec import load_spec_text, parse_spec
from steer.verify.artifact import verify_artifact
from tests.conftest import random_sae, save_tiny

CALIBRATION = [t for t in resources.files("steer.data").joinpath("calibration.txt").read_text().splitlines() if t]

# Each architecture's MLP tensors as Hugging Face names them, and the dimension along which the MLP's neurons lie.
MLP_TENSORS = {
    "llama": {"mlp.gate_proj.weight": 0, "mlp.gate_proj.bias": 0, "mlp.up_proj.weight": 0, "mlp.up_proj.bias": 0,
              "mlp.down_proj.weight": 1},
    "gpt2": {"mlp.c_fc.weight": 1, "mlp.c_fc.bias": 0, "mlp.c_proj.weight": 0},  # Conv1D: weight [in, out]
    "gpt_neox": {"mlp.dense_h_to_4h.weight": 0, "mlp.dense_h_to_4h.bias": 0, "mlp.dense_4h_to_h.weight": 1},
}
LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}
WIDTH_KEY = {"llama": "intermediate_size", "gpt2": "n_inner", "gpt_neox": "intermediate_size"}

# (arch, DSL, grafted block, bound on KL(hooks‖graft) / KL(hooks‖unedited)).
# GPT-NeoX's blocks are parallel (x + attn(ln1 x) + mlp(ln2 x)): the MLP never sees the attention output that the
# site includes, so a graft there cannot be as close; measured 0.24 on this tiny model, bound 0.35.
GRAFT_CASES = [
    ("llama", "suppress feature 3 by 80% site resid_post.1", 1, 0.2),
    ("gpt2", "suppress feature 3 by 80% site resid_post.1", 1, 0.2),
    ("gpt_neox", "suppress feature 3 by 80% site resid_post.1", 1, 0.35),
    ("llama", "clamp feature 5 to 2 when active site resid_post.1", 1, 0.2),
    ("llama", "amplify feature 7 by 3x site resid_pre.2", 1, 0.2),
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = save_tiny(arch, tmp_path_factory.mktemp(f"graft-base-{arch}"))
        return made[arch]

    return get


def kl_and_top1(reference, artifact, tokenizer, texts=CALIBRATION):
    """Mean per-token KL(reference ‖ artifact) and top-1 agreement of two logits functions."""
    kls, agree = [], []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            ref = torch.log_softmax(reference(ids)[0].double(), -1)
            art = torch.log_softmax(artifact(ids)[0].double(), -1)
            kls.append((ref.exp() * (ref - art)).sum(-1))
            agree.append(ref.argmax(-1) == art.argmax(-1))
    return float(torch.cat(kls).mean()), float(torch.cat(agree).double().mean())


def hooked(model, plan):
    def logits(ids):
        with steer.applied(model, plan):
            return model(ids).logits
    return logits


def reload(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


def assert_padding(arch, base_dir, out_dir, grafted: dict[int, int]):
    """Every layer's MLP grew by the same width; the original neurons are the base's, bit for bit; the new neurons
    are exactly zero except the first ``grafted[layer]`` of a grafted layer."""
    base, new = tensors(base_dir), tensors(out_dir)
    base_config = json.loads((Path(base_dir) / "config.json").read_text())
    config = json.loads((Path(out_dir) / "config.json").read_text())
    inner = base_config.get(WIDTH_KEY[arch]) or 4 * base_config["n_embd"]
    width = config[WIDTH_KEY[arch]] - inner
    assert width == max(grafted.values())
    for layer in range(base_config.get("num_hidden_layers") or base_config["n_layer"]):
        for name, dim in MLP_TENSORS[arch].items():
            key = f"{LAYERS[arch]}.{layer}.{name}"
            t = new[key]
            assert t.shape[dim] == inner + width, key
            original = base.get(key, torch.zeros(inner))  # Llama's MLP biases are new: zero for the old neurons
            assert torch.equal(t.narrow(dim, 0, inner), original), key
            used = grafted.get(layer, 0)
            padding = t.narrow(dim, inner + used, width - used)
            assert torch.count_nonzero(padding) == 0, f"{key}: padding neurons are not zero"
            if used and name.endswith("weight") and "up_proj" not in name:  # Llama's up rows are 0: amplitude in its bias
                assert torch.count_nonzero(t.narrow(dim, inner, used)) > 0, f"{key}: grafted neurons are empty"


@pytest.mark.parametrize("arch,dsl,block,bound", GRAFT_CASES, ids=[f"{a}-{d.split(' site')[0].replace(' ', '_')}"
                                                                   for a, d, _b, _r in GRAFT_CASES])
def test_graft_export_is_much_closer_to_the_hooks_than_the_unedited_model(bases, arch, dsl, block, bound, tmp_path):
    model, tokenizer, directory = bases(arch)
    site = dsl.split("site ")[1]
    plan = steer.compile(dsl, model, random_sae(site=site), tokenizer=tokenizer)
    manifest = export(plan, model, tokenizer, "weights", tmp_path / "out", base=directory, allow_approximate=True)
    assert [e["lowering"] for e in manifest["edits"]] == ["approximate"]
    assert "graft" in manifest["edits"][0]["note"] and manifest["fidelity"]["kl_mean"] > 0

    merged = reload(tmp_path / "out")
    kl_graft, top1_graft = kl_and_top1(hooked(model, plan), lambda ids: merged(ids).logits, tokenizer)
    kl_clean, top1_clean = kl_and_top1(hooked(model, plan), lambda ids: model(ids).logits, tokenizer)
    print(f"\n{arch} {dsl}: KL(hooks‖graft) {kl_graft:.4g}, KL(hooks‖unedited) {kl_clean:.4g}, "
          f"ratio {kl_graft / kl_clean:.3f}; top-1 {top1_graft:.3f} vs unedited {top1_clean:.3f}")
    assert kl_clean > 1e-3, "the edit should change the model"
    assert kl_graft <= bound * kl_clean
    assert top1_graft >= top1_clean
    assert_padding(arch, directory, tmp_path / "out", {block: 8})


def test_grafts_in_two_blocks_pad_every_layer_with_zero_neurons_and_export_reproducibly(bases, tmp_path):
    model, tokenizer, directory = bases("llama")
    saes = [random_sae(site="resid_post.1"), random_sae(site="resid_post.0", seed=2)]
    dsl = ("suppress feature 3 by 80% site resid_post.1; clamp feature 5 to 1 site resid_post.1; "
           "add feature 9 by 0.5 site resid_post.1; amplify feature 4 by 2x site resid_post.0")
    plan = steer.compile(dsl, model, saes, tokenizer=tokenizer)
    first = export(plan, model, tokenizer, "weights", tmp_path / "a", base=directory, allow_approximate=True)
    export(plan, model, tokenizer, "weights", tmp_path / "b", base=directory, allow_approximate=True)
    assert [e["lowering"] for e in first["edits"]] == ["approximate", "approximate", "exact", "approximate"]
    assert_padding("llama", directory, tmp_path / "a", {1: 16, 0: 8})  # block 2: 16 zero neurons; block 0: 8
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / "a").glob("*")) if p.is_file()}
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted((tmp_path / "b").glob("*")) if p.is_file()}
    merged = reload(tmp_path / "a")
    kl_graft, _ = kl_and_top1(hooked(model, plan), lambda ids: merged(ids).logits, tokenizer)
    kl_clean, _ = kl_and_top1(hooked(model, plan), lambda ids: model(ids).logits, tokenizer)
    assert kl_graft <= 0.25 * kl_clean


# -- refusal, max_kl ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(bases, tmp_path_factory):
    """A tiny Llama and an SAE on disk, as the CLI and spec files name them."""
    root = tmp_path_factory.mktemp("graft-files")
    model, tokenizer, directory = bases("llama")
    save_sae(dataclasses.replace(random_sae(), site="resid_post.1"), root / "sae")
    return root, model, tokenizer, directory


def spec_file(root: Path, max_kl: str | None) -> Path:
    path = root / f"spec-{max_kl}.yaml"
    line = f"max_kl: {max_kl}\n" if max_kl is not None else ""
    path.write_text(f"sae: sae\n{line}edits:\n  - suppress: 3\n    by: 80%\n")
    return path


def test_graft_is_refused_without_allow_or_max_kl_and_writes_nothing(files, tmp_path, capsys):
    root, model, tokenizer, directory = files
    plan = steer.compile(parse_spec(str(spec_file(root, None))), model, tokenizer=tokenizer)
    with pytest.raises(LoweringError) as info:
        export(plan, model, tokenizer, "weights", tmp_path / "out", base=directory)
    message = str(info.value)
    for words in ("edits[0]", "graft", "approximate", "--allow-approximate", "max_kl"):
        assert words in message, message
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []

    capsys.readouterr()
    code = main(["compile", "suppress feature 3 by 80%", "--target", "weights", "--model", directory,
                 "--sae", str(root / "sae"), "-o", str(tmp_path / "cli")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("steer: error: target weights: approximate lowering refused")
    assert "graft" in err and "--allow-approximate" in err and "max_kl" in err
    assert not (tmp_path / "cli").exists()


def test_max_kl_accepts_a_graft_up_to_its_measured_kl_and_refuses_above(files, tmp_path):
    root, model, tokenizer, directory = files
    loose = steer.compile(parse_spec(str(spec_file(root, "10"))), model, tokenizer=tokenizer)
    manifest = export(loose, model, tokenizer, "weights", tmp_path / "ok", base=directory)
    measured = manifest["fidelity"]["kl_mean"]
    assert 0 < measured < 10
    assert any("accepted by the spec's max_kl 10" in note for note in manifest["notes"])
    assert "max_kl: 10" in manifest["spec"]
    verdict = verify_artifact(tmp_path / "ok")
    assert verdict.ok, verdict.lines
    assert any("≤ the spec's max_kl 10" in line for line in verdict.lines)

    # the same artifact judged against a spec whose max_kl it exceeds (KL measured here, independently)
    merged = reload(tmp_path / "ok")
    kl, _ = kl_and_top1(hooked(model, loose), lambda ids: merged(ids).logits, tokenizer)
    assert measured == pytest.approx(kl, rel=1e-3)  # the exporter measured what this test measures
    strict = spec_file(root, f"{kl / 2:.3g}")
    verdict = verify_artifact(tmp_path / "ok", spec=str(strict))
    assert not verdict.ok and any("above the spec's max_kl" in line for line in verdict.lines)

    tight = steer.compile(parse_spec(str(strict)), model, tokenizer=tokenizer)
    with pytest.raises(LoweringError) as info:
        export(tight, model, tokenizer, "weights", tmp_path / "refused", base=directory)
    message = str(info.value)
    assert "above the spec's max_kl" in message and f"{kl / 2:.3g}" in message and "nothing was written" in message
    assert f"{measured:.4g}" in message  # the measured KL, as the manifest of the accepted export recorded it
    assert not (tmp_path / "refused").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


@pytest.mark.parametrize("value,shown", [("-1", "-1"), ("abc", "'abc'"), ("[0.1]", "[0.1]"), (".inf", "inf"),
                                         ("true", "True")])
def test_bad_max_kl_is_a_spec_error_with_file_and_line(value, shown):
    with pytest.raises(SpecError) as info:
        load_spec_text(f"name: x\nmax_kl: {value}\nedits:\n  - suppress: 3\n    by: 80%\n", "spec.yaml")
    assert str(info.value).startswith("spec.yaml:2: max_kl: `max_kl` must be a number ≥ 0") and shown in str(info.value)


def test_max_kl_round_trips_and_unknown_top_level_keys_still_fail():
    spec = load_spec_text("max_kl: 1e-3\nedits:\n  - suppress: 3\n    by: 80%\n", "spec.yaml")
    assert spec.max_kl == 0.001
    assert load_spec_text(steer.spec.dump_spec(spec)) == spec
    with pytest.raises(SpecError, match="spec.yaml:1: max_kll: unknown key 'max_kll'.*max_kl"):
        load_spec_text("max_kll: 1\nedits:\n  - suppress: 3\n    by: 80%\n", "spec.yaml")


@pytest.mark.parametrize("dsl,sae_site,reason", [
    ("clamp feature 5 to 1 when feature 3 above 0.1 site resid_post.1", "resid_post.1", "condition on another feature"),
    ("suppress feature 3 by 80% site attn_out.1", "attn_out.1", "no MLP writes at attn_out.1"),
    ("suppress feature 3 by 80% site resid_pre.0", "resid_pre.0", "no MLP writes at resid_pre.0"),
])
def test_edits_a_graft_cannot_take_are_errors_naming_why(bases, dsl, sae_site, reason, tmp_path):
    model, tokenizer, directory = bases("llama")
    plan = steer.compile(dsl, model, random_sae(site=sae_site), tokenizer=tokenizer)
    with pytest.raises(LoweringError, match=reason):
        export(plan, model, tokenizer, "weights", tmp_path / "out", base=directory, allow_approximate=True)
    assert not (tmp_path / "out").exists()


# -- the real default model -------------------------------------------------------------------------------

@pytest.mark.default_model
def test_graft_of_a_frequent_default_sae_feature_on_the_default_model(default_model, tmp_path):
    """Suppress by 80% the default SAE's most frequently firing feature (by the density its file records)."""
    from steer.saes import load_sae

    model, tokenizer = default_model
    sae = load_sae("default")
    feature = int(sae.feature_stats["density"].argmax())
    plan = steer.compile(f"suppress feature {feature} by 80% site resid_post.10", model, sae, tokenizer=tokenizer)
    manifest = export(plan, model, tokenizer, "weights", tmp_path / "out", base="smollm2-135m-instruct",
                      allow_approximate=True)
    merged = reload(tmp_path / "out")
    kl_graft, top1_graft = kl_and_top1(hooked(model, plan), lambda ids: merged(ids).logits, tokenizer)
    kl_clean, top1_clean = kl_and_top1(hooked(model, plan), lambda ids: model(ids).logits, tokenizer)
    print(f"\ndefault model, suppress feature {feature} (density {float(sae.feature_stats['density'][feature]):.3f}) "
          f"at resid_post.10: KL(hooks‖graft) {kl_graft:.3g}, KL(hooks‖unedited) {kl_clean:.3g}, "
          f"ratio {kl_graft / kl_clean:.3f}; top-1 {100 * top1_graft:.1f}% vs unedited {100 * top1_clean:.1f}%; "
          f"{manifest['edits'][0]['note']}")
    assert kl_clean > 1e-3
    assert kl_graft <= 0.2 * kl_clean
    assert top1_graft >= top1_clean
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["intermediate_size"] == 1536 + 8 and config["mlp_bias"] is True
