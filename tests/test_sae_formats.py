"""SAE file formats: each reader against its format's own math, the SAELens writer, bad input.

Fixtures are written here, directly with safetensors / numpy / json in each
format's documented layout (never with steer's writer), and every loaded SAE's
``encode`` / ``decode`` is checked against the format's formula written out
below (fp32, atol 1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from steer.errors import SAEError
from steer.sae import SAE, describe_sae, load_sae, save_sae

D_IN, D_SAE = 16, 48
ATOL = 1e-6


# -- fixtures in each format's own layout ------------------------------------------


def random_weights(seed: int, *, threshold: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.4,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.4,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.2,
        "b_dec": torch.randn(D_IN, generator=g) * 0.2,
    }
    if threshold:  # a few negative: SAELens gates on pre > relu(threshold)
        w["threshold"] = torch.rand(D_SAE, generator=g) * 0.8 - 0.1
    return w


def inputs(seed: int = 123) -> torch.Tensor:
    return torch.randn(4, 3, D_IN, generator=torch.Generator().manual_seed(seed))  # (B, T, d_in)


def features(seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(5, D_SAE, generator=g)) * (torch.rand(5, D_SAE, generator=g) < 0.2)


def write_saelens_v6(directory: Path, architecture: str, weights: dict, *, k: int | None = None,
                     rescale: bool = False, apply_b_dec: bool = True, sparsity: torch.Tensor | None = None,
                     dtype: str = "float32", extra: dict | None = None) -> Path:
    directory.mkdir(parents=True)
    cfg = {
        "d_in": D_IN, "d_sae": D_SAE, "dtype": dtype, "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {
            "model_name": "gpt2", "hook_name": "blocks.6.hook_resid_post", "hook_head_index": None,
            "prepend_bos": True, "context_size": 128, "dataset_path": "Skylion007/openwebtext",
            "sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1",
        },
        "architecture": architecture,
        **(extra or {}),
    }
    if architecture == "topk":
        cfg["k"] = k
        cfg["rescale_acts_by_decoder_norm"] = rescale
    save_file(weights, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps(cfg))
    if sparsity is not None:
        save_file({"sparsity": sparsity}, str(directory / "sparsity.safetensors"))
    return directory


def write_saelens_v5(directory: Path, weights: dict, *, architecture: str = "standard",
                     activation: str = "relu", kwargs: dict | None = None, normalize="none") -> Path:
    directory.mkdir(parents=True)
    cfg = {
        "architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
        "model_name": "gpt2-small", "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8,
        "hook_head_index": None, "activation_fn_str": activation, "activation_fn_kwargs": kwargs or {},
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "sae_lens_version": "5.3.0",
        "sae_lens_training_version": "5.3.0", "prepend_bos": True, "dataset_path": "Skylion007/openwebtext",
        "dataset_trust_remote_code": True, "context_size": 128, "normalize_activations": normalize,
        "neuronpedia_id": "gpt2-small/8-res-jb", "model_from_pretrained_kwargs": {},
    }
    save_file(weights, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


def write_gemmascope(root: Path, weights: dict, release: str = "gemma-scope-2b-pt-res", layer: int = 12) -> Path:
    directory = root / release / f"layer_{layer}" / "width_16k" / "average_l0_82"
    directory.mkdir(parents=True)
    np.savez(directory / "params.npz", **{n: t.numpy() for n, t in weights.items()})
    return directory / "params.npz"


def sparsify_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g) * 0.4,  # (d_sae, d_in)
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.2,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.4,
        "b_dec": torch.randn(D_IN, generator=g) * 0.2,
    }


def write_sparsify(run: Path, tensors: dict, hookpoint: str = "layers.6", k: int = 8, **cfg_overrides) -> Path:
    directory = run / hookpoint
    directory.mkdir(parents=True)
    cfg = {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": 0, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN, **cfg_overrides}
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "sae.safetensors"))
    return directory


# -- each format's reference math, written out ----------------------------------------


def saelens_encode(w, x, architecture, *, k=None, rescale=False, apply_b_dec=True):
    pre = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
    if architecture == "standard":
        return torch.relu(pre)
    if architecture == "jumprelu":
        return torch.relu(pre) * (pre > torch.relu(w["threshold"]))
    if rescale:
        pre = pre * w["W_dec"].norm(dim=-1)
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


def saelens_decode(w, f, *, rescale=False):
    if rescale:
        f = f / w["W_dec"].norm(dim=-1)
    return f @ w["W_dec"] + w["b_dec"]


def gemmascope_encode(w, x):
    pre = x @ w["W_enc"] + w["b_enc"]
    return (pre > w["threshold"]) * torch.relu(pre)


def sparsify_encode(t, x, k):
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def sparsify_decode(t, f):
    return f @ t["W_dec"] + t["b_dec"]


# one row per (format, architecture): builds the fixture, returns (path, encode, decode, expected settings)
def case_v6_standard(tmp):
    w = random_weights(1)
    return (write_saelens_v6(tmp / "sae", "standard", w), lambda x: saelens_encode(w, x, "standard"),
            lambda f: saelens_decode(w, f), {"architecture": "relu", "site": "blocks.6.hook_resid_post"})


def case_v6_jumprelu(tmp):
    w = random_weights(2, threshold=True)
    sparsity = torch.log10(torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) + 1e-10)
    return (write_saelens_v6(tmp / "sae", "jumprelu", w, sparsity=sparsity), lambda x: saelens_encode(w, x, "jumprelu"),
            lambda f: saelens_decode(w, f), {"architecture": "jumprelu"})


def case_v6_topk(tmp):
    w = random_weights(4)
    return (write_saelens_v6(tmp / "sae", "topk", w, k=6), lambda x: saelens_encode(w, x, "topk", k=6),
            lambda f: saelens_decode(w, f), {"architecture": "topk", "k": 6})


def case_v6_topk_rescaled(tmp):
    w = random_weights(5)
    return (write_saelens_v6(tmp / "sae", "topk", w, k=5, rescale=True),
            lambda x: saelens_encode(w, x, "topk", k=5, rescale=True),
            lambda f: saelens_decode(w, f, rescale=True), {"architecture": "topk", "k": 5})


def case_v6_no_b_dec(tmp):
    w = random_weights(6, threshold=True)
    return (write_saelens_v6(tmp / "sae", "jumprelu", w, apply_b_dec=False),
            lambda x: saelens_encode(w, x, "jumprelu", apply_b_dec=False),
            lambda f: saelens_decode(w, f), {"architecture": "jumprelu", "apply_b_dec_to_input": False})


def case_v5_relu(tmp):
    w = random_weights(7)
    return (write_saelens_v5(tmp / "sae", w), lambda x: saelens_encode(w, x, "standard"),
            lambda f: saelens_decode(w, f), {"architecture": "relu", "site": "blocks.8.hook_resid_pre",
                                             "model_name": "gpt2-small"})


def case_v5_topk(tmp):
    w = random_weights(8)
    return (write_saelens_v5(tmp / "sae", w, activation="topk", kwargs={"k": 7}),
            lambda x: saelens_encode(w, x, "topk", k=7), lambda f: saelens_decode(w, f),
            {"architecture": "topk", "k": 7})


def case_v5_jumprelu(tmp):
    w = random_weights(9, threshold=True)
    return (write_saelens_v5(tmp / "sae", w, architecture="jumprelu"), lambda x: saelens_encode(w, x, "jumprelu"),
            lambda f: saelens_decode(w, f), {"architecture": "jumprelu"})


def case_gemmascope(tmp):
    w = random_weights(10, threshold=True)
    w["threshold"] = w["threshold"].abs()
    return (write_gemmascope(tmp, w), lambda x: gemmascope_encode(w, x), lambda f: saelens_decode(w, f),
            {"architecture": "jumprelu", "apply_b_dec_to_input": False, "site": "resid_post.12",
             "model_name": "google/gemma-2-2b"})


def case_sparsify(tmp):
    t = sparsify_tensors(11)
    return (write_sparsify(tmp / "run", t, k=8), lambda x: sparsify_encode(t, x, 8), lambda f: sparsify_decode(t, f),
            {"architecture": "topk", "k": 8, "site": "layers.6"})


CASES = {
    "saelens-v6-standard": case_v6_standard,
    "saelens-v6-jumprelu": case_v6_jumprelu,
    "saelens-v6-topk": case_v6_topk,
    "saelens-v6-topk-rescaled": case_v6_topk_rescaled,
    "saelens-v6-jumprelu-no-b_dec": case_v6_no_b_dec,
    "saelens-v5-relu": case_v5_relu,
    "saelens-v5-topk": case_v5_topk,
    "saelens-v5-jumprelu": case_v5_jumprelu,
    "gemmascope": case_gemmascope,
    "sparsify": case_sparsify,
}
# folding the decoder norms into W_enc/b_enc/W_dec rounds differently from SAELens' rescale-at-runtime
TOLERANCE = {"saelens-v6-topk-rescaled": 1e-5}


@pytest.mark.parametrize("case", CASES)
def test_reader_matches_format_math(case, tmp_path):
    path, ref_encode, ref_decode, expected = CASES[case](tmp_path)
    sae = load_sae(path)
    for field, value in expected.items():
        assert getattr(sae, field) == value, field
    atol = TOLERANCE.get(case, ATOL)
    x = inputs()
    f = sae.encode(x)
    torch.testing.assert_close(f, ref_encode(x), atol=atol, rtol=0)
    assert (f > 0).any() and (f == 0).any()  # the activation really gates
    torch.testing.assert_close(sae.decode(features()), ref_decode(features()), atol=atol, rtol=0)


# -- writer ---------------------------------------------------------------------------------


def assert_same_sae(a: SAE, b: SAE) -> None:
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None), name
        if ta is not None:
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name
    for field in ("architecture", "k", "apply_b_dec_to_input", "normalize_activations", "norm_scaling_factor",
                  "site", "model_name"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.feature_stats.keys() == b.feature_stats.keys()
    for name in a.feature_stats:
        assert torch.equal(a.feature_stats[name], b.feature_stats[name]), name


@pytest.mark.parametrize("case", CASES)
def test_round_trip_is_exact(case, tmp_path):
    path, *_ = CASES[case](tmp_path)
    first = load_sae(path)
    second = load_sae(save_sae(first, tmp_path / "out1"))
    assert_same_sae(first, second)
    # what the first load held survives (the version may be raised to v6 on the way)
    for key, value in first.metadata.items():
        if key != "sae_lens_version":
            assert second.metadata[key] == value, key
    if case.startswith("saelens-v6"):
        assert second.metadata == first.metadata
    # and a second save writes the same config
    third_dir = save_sae(second, tmp_path / "out2")
    assert json.loads((tmp_path / "out1" / "cfg.json").read_text()) == json.loads((third_dir / "cfg.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_written_files_follow_saelens_v6(case, tmp_path):
    path, *_ = CASES[case](tmp_path)
    sae = load_sae(path)
    out = save_sae(sae, tmp_path / "out")
    cfg = json.loads((out / "cfg.json").read_text())
    saelens_name = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[sae.architecture]
    assert cfg["architecture"] == saelens_name
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
    assert cfg["apply_b_dec_to_input"] is sae.apply_b_dec_to_input
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6  # else SAELens reads it as v5
    assert cfg["metadata"]["model_name"] == sae.model_name
    if sae.site == "resid_post.12":  # Gemma Scope: canonical site written as the SAELens hook name
        assert cfg["metadata"]["hook_name"] == "blocks.12.hook_resid_post"
        assert cfg["metadata"]["steer_site"] == "resid_post.12"
    else:
        assert cfg["metadata"]["hook_name"] == sae.site and "steer_site" not in cfg["metadata"]
    if sae.architecture == "topk":
        assert cfg["k"] == sae.k and cfg["rescale_acts_by_decoder_norm"] is False
    expected = {"W_enc": [D_IN, D_SAE], "W_dec": [D_SAE, D_IN], "b_enc": [D_SAE], "b_dec": [D_IN]}
    if sae.architecture == "jumprelu":
        expected["threshold"] = [D_SAE]
    with safe_open(str(out / "sae_weights.safetensors"), framework="pt") as f:
        assert {n: f.get_slice(n).get_shape() for n in f.keys()} == expected
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"F32"}


def test_sparsity_and_feature_stats_files(tmp_path):
    path, *_ = case_v6_jumprelu(tmp_path)
    sae = load_sae(path)
    with safe_open(str(path / "sparsity.safetensors"), framework="pt") as f:
        stored = f.get_tensor("sparsity")
    assert torch.equal(sae.feature_stats["log10_density"], stored)
    torch.testing.assert_close(sae.feature_stats["density"], 10.0 ** stored)
    sae = SAE(**{n: getattr(sae, n) for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")},
              architecture="jumprelu", feature_stats={"p99": torch.rand(D_SAE), "density": torch.rand(D_SAE)})
    out = save_sae(sae, tmp_path / "out")
    with safe_open(str(out / "feature_stats.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["density", "p99"]
    with safe_open(str(out / "sparsity.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["sparsity"]
        torch.testing.assert_close(f.get_tensor("sparsity"), torch.log10(sae.feature_stats["density"] + 1e-10))
    assert load_sae(out).feature_stats.keys() == {"p99", "density", "log10_density"}


def test_writer_maps_canonical_site_and_folds_norm_scaling_factor(tmp_path):
    w = random_weights(12)
    sae = SAE(**w, normalize_activations="expected_average_only_in", norm_scaling_factor=0.25, site="resid_post.3")
    out = save_sae(sae, tmp_path / "out")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["normalize_activations"] == "none"
    again = load_sae(out)
    assert again.site == "resid_post.3"  # read back from metadata.steer_site
    x = inputs()
    torch.testing.assert_close(again.encode(x), sae.encode(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(again.reconstruct(x), sae.reconstruct(x), atol=ATOL, rtol=0)


def test_bfloat16_round_trip(tmp_path):
    w = {n: t.to(torch.bfloat16) for n, t in random_weights(13, threshold=True).items()}
    first = load_sae(write_saelens_v6(tmp_path / "sae", "jumprelu", w, dtype="bfloat16"))
    assert first.dtype == torch.bfloat16
    second = load_sae(save_sae(first, tmp_path / "out"))
    assert_same_sae(first, second)
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["dtype"] == "bfloat16"


def test_save_refuses_non_empty_directory_unless_overwrite(tmp_path):
    sae = load_sae(case_v6_standard(tmp_path)[0])
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(SAEError, match="not empty"):
        save_sae(sae, target)
    assert (target / "notes.txt").exists()
    save_sae(sae, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


# -- loading options and layouts ----------------------------------------------------------


def test_site_and_dtype_overrides(tmp_path):
    path = case_v6_topk(tmp_path)[0]
    sae = load_sae(path, site="resid_post.6", dtype="bfloat16")
    assert sae.site == "resid_post.6" and sae.dtype == torch.bfloat16
    with pytest.raises(SAEError, match="float32"):
        load_sae(path, dtype="int8")


def test_v5_boolean_normalization(tmp_path):
    sae = load_sae(write_saelens_v5(tmp_path / "sae", random_weights(14), normalize=True))
    assert sae.normalize_activations == "expected_average_only_in"


@pytest.mark.parametrize(("release", "site", "model"), [
    ("gemma-scope-2b-pt-mlp", "mlp_out.5", "google/gemma-2-2b"),
    ("gemma-scope-9b-it-res", "resid_post.5", "google/gemma-2-9b-it"),
    ("gemma-scope-2b-pt-att", "blocks.5.attn.hook_z", "google/gemma-2-2b"),  # pre-o_proj z, not attn_out
    ("models--google--gemma-scope-2b-pt-res/snapshots/abc123", "resid_post.5", "google/gemma-2-2b"),
])
def test_gemmascope_site_from_release_layout(release, site, model, tmp_path):
    sae = load_sae(write_gemmascope(tmp_path, random_weights(15, threshold=True), release=release, layer=5))
    assert (sae.site, sae.model_name) == (site, model)


def test_gemmascope_outside_release_layout_has_no_site(tmp_path):
    w = random_weights(16, threshold=True)
    np.savez(tmp_path / "params.npz", **{n: t.numpy() for n, t in w.items()})
    sae = load_sae(tmp_path)  # a directory holding params.npz
    assert sae.site is None and sae.model_name is None and not sae.apply_b_dec_to_input


def test_sparsify_run_directory(tmp_path):
    run = tmp_path / "run"
    write_sparsify(run, sparsify_tensors(17), hookpoint="layers.2")
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    sae = load_sae(run)
    assert (sae.site, sae.model_name) == ("layers.2", "EleutherAI/pythia-70m")
    write_sparsify(run, sparsify_tensors(18), hookpoint="layers.10")
    with pytest.raises(SAEError, match=r"2 hookpoints \(layers\.2, layers\.10\)"):
        load_sae(run)


def test_describe_sae(tmp_path):
    text = describe_sae(load_sae(case_v6_jumprelu(tmp_path)[0]))
    for expected in ("jumprelu", "d_in=16", "d_sae=48", "float32", "gpt2", "blocks.6.hook_resid_post",
                     "W_enc [16, 48]", "threshold", "W_dec row norms", "W_enc col norms", "b_dec norm",
                     "density, log10_density"):
        assert expected in text, expected


# -- bad input ------------------------------------------------------------------------------


def test_hub_name_is_not_fetched():
    with pytest.raises(SAEError, match="not a local path.*network"):
        load_sae("gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")


def test_default_names_resolve_above_the_file_reader(tmp_path, monkeypatch):
    """`default` is `steer.saes`' (= ``steer.load_sae``); `steer.sae` reads files only and never imports steer.train."""
    import ast

    import steer
    import steer.saes

    assert steer.load_sae is steer.saes.load_sae
    with pytest.raises(SAEError, match="steer.load_sae"):
        load_sae("default")
    for path in (Path(steer.__file__).parent / "sae").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.startswith("steer.train") for n in names), path
    # a checkout that ships no SAEs: `default` is the one-site recipe's SAE, trained once (stood in for here)
    trained = case_v6_standard(tmp_path)[0]
    calls = []
    monkeypatch.setattr(steer.saes, "shipped_available", lambda: False)
    monkeypatch.setattr("steer.train.default.default_sae", lambda progress=True: calls.append(progress) or trained)
    assert steer.saes.default_sae_dir(progress=False) == trained and calls == [False]
    sae = steer.load_sae("default", site="resid_post.2")
    assert sae.site == "resid_post.2" and torch.equal(sae.W_dec, load_sae(trained).W_dec)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()  # a local directory named `default` is read as the path it is
    with pytest.raises(SAEError, match="no SAE found"):
        steer.load_sae("default")


def test_missing_weights_file(tmp_path):
    path = case_v6_standard(tmp_path)[0]
    (path / "sae_weights.safetensors").unlink()
    with pytest.raises(SAEError, match="sae_weights.safetensors"):
        load_sae(path)


def test_missing_params_npz(tmp_path):
    with pytest.raises(SAEError, match="no SAE found.*params.npz"):
        load_sae(tmp_path)


def test_unreadable_json(tmp_path):
    path = case_v6_standard(tmp_path)[0]
    (path / "cfg.json").write_text("{ not json")
    with pytest.raises(SAEError, match="cfg.json is not valid JSON") as err:
        load_sae(path)
    assert str(path / "cfg.json") in str(err.value)


def test_missing_config_field(tmp_path):
    path = case_v6_standard(tmp_path)[0]
    cfg = json.loads((path / "cfg.json").read_text())
    del cfg["d_sae"]
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match="no field 'd_sae'"):
        load_sae(path)


@pytest.mark.parametrize("fmt", ["saelens", "gemmascope", "sparsify"])
def test_missing_tensor(fmt, tmp_path):
    if fmt == "saelens":
        w = random_weights(20)
        del w["b_enc"]
        path, name = write_saelens_v6(tmp_path / "sae", "standard", w), "b_enc"
    elif fmt == "gemmascope":
        path, name = write_gemmascope(tmp_path, random_weights(21)), "threshold"  # no threshold written
    else:
        t = sparsify_tensors(22)
        del t["W_dec"]
        path, name = write_sparsify(tmp_path / "run", t), "W_dec"
    with pytest.raises(SAEError, match=f"no tensor '{name}'"):
        load_sae(path)


@pytest.mark.parametrize("fmt", ["saelens", "gemmascope", "sparsify"])
def test_wrong_shape(fmt, tmp_path):
    if fmt == "saelens":
        w = random_weights(23)
        w["W_dec"] = w["W_dec"][:, :15].contiguous()
        path, message = write_saelens_v6(tmp_path / "sae", "standard", w), r"'W_dec' has shape \[48, 15\], expected \[48, 16\]"
    elif fmt == "gemmascope":
        w = random_weights(24, threshold=True)
        w["b_enc"] = w["b_enc"][:40].contiguous()
        path, message = write_gemmascope(tmp_path, w), r"'b_enc' has shape \[40\], expected \[48\]"
    else:
        t = sparsify_tensors(25)
        t["encoder.weight"] = t["encoder.weight"].T.contiguous()
        path, message = write_sparsify(tmp_path / "run", t), r"'encoder.weight' has shape \[16, 48\], expected \[48, 16\]"
    with pytest.raises(SAEError, match=message):
        load_sae(path)


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_mixed_dtypes(fmt, tmp_path):
    if fmt == "saelens":
        w = random_weights(26)
        w["b_dec"] = w["b_dec"].half()
        path = write_saelens_v6(tmp_path / "sae", "standard", w)
    else:
        t = sparsify_tensors(27)
        t["b_dec"] = t["b_dec"].half()
        path = write_sparsify(tmp_path / "run", t)
    with pytest.raises(SAEError, match="mixed dtypes.*b_dec float16"):
        load_sae(path)


@pytest.mark.parametrize(("architecture", "message"), [
    ("banana", "unknown architecture 'banana'; steer reads: standard, jumprelu, topk"),
    ("gated", "'gated' is not supported yet"),
    ("jumprelu_transcoder", "transcoders are not supported yet"),
    ("batchtopk", "training checkpoint"),
])
def test_unsupported_saelens_architectures(architecture, message, tmp_path):
    path = write_saelens_v6(tmp_path / "sae", architecture, random_weights(28))
    with pytest.raises(SAEError, match=message):
        load_sae(path)


def test_saelens_unexpected_tensor(tmp_path):
    w = random_weights(29)
    w["W_skip"] = torch.zeros(D_IN, D_IN)
    with pytest.raises(SAEError, match="W_skip"):
        load_sae(write_saelens_v6(tmp_path / "sae", "standard", w))


@pytest.mark.parametrize(("override", "message"), [
    ({"skip_connection": True}, "skip connections are not supported"),
    ({"transcode": True}, "transcoders are not supported"),
    ({"activation": "groupmax"}, "activation 'groupmax' is not supported"),
])
def test_unsupported_sparsify_options(override, message, tmp_path):
    with pytest.raises(SAEError, match=message):
        load_sae(write_sparsify(tmp_path / "run", sparsify_tensors(30), **override))
