"""Shared fixtures: tiny random-initialised models of each supported architecture,
random SAEs built directly from tensors, and the real default model (loaded once)."""

from __future__ import annotations

import os

import pytest
import torch

TINY_ARCHS = ("llama", "gpt2", "gpt_neox", "gemma2")
VOCAB = 96
D = 32


def tiny_model(arch: str, n_layers: int = 3, seed: int = 0):
    from transformers import (
        Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
        LlamaConfig, LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    # initializer_range 0.5: O(1) activations, so random SAE features fire on about half the tokens
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.5)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=n_layers,
                                             num_attention_heads=4, num_key_value_heads=2, **common))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=D, n_layer=n_layers, n_head=4, n_positions=512, **common))
    elif arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=n_layers,
                                                 num_attention_heads=4, max_position_embeddings=512, **common))
    elif arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(hidden_size=D, intermediate_size=64, num_hidden_layers=n_layers,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, **common))
    else:
        raise ValueError(arch)
    model.generation_config.pad_token_id = 0
    with torch.no_grad():  # trained checkpoints have non-zero biases; the zero init would hide bias handling
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    return model.eval().requires_grad_(False)


def random_sae(d_in: int = D, d_sae: int = 24, architecture: str = "relu", seed: int = 1, **kwargs):
    """An SAE whose features fire on roughly half the tokens of a tiny model's stream."""
    from steer.sae import SAE

    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    W_dec = torch.randn(d_sae, d_in, generator=g) / d_in**0.5
    b_enc = 0.05 * torch.randn(d_sae, generator=g)
    b_dec = 0.05 * torch.randn(d_in, generator=g)
    extra = {}
    if architecture == "jumprelu":
        extra["threshold"] = 0.05 * torch.rand(d_sae, generator=g)
    if architecture == "topk":
        extra["k"] = kwargs.pop("k", 6)
    return SAE(W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec, architecture=architecture, **extra, **kwargs)


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct (converted once into ~/.cache/steer)."""
    import steer

    return steer.load_model("smollm2-135m-instruct")


def pytest_sessionstart(session):
    """First line of every run (even with -q): the llama.cpp build and the CPU flags that pick its kernels,
    so a log says which case it ran (issue 11: AMX weight repacking crashed llama.cpp)."""
    from importlib.metadata import PackageNotFoundError, version

    from steer.verify.llamacpp import cpu_features

    try:
        llama = f"llama-cpp-python {version('llama_cpp_python')} (weight repacking off in steer)"
    except PackageNotFoundError:
        llama = "llama-cpp-python not installed"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"steer tests: {llama}; CPU {cpu_features()}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_tokenizer():
    """A character-level tokenizer over VOCAB ids (0 pad, 1 bos, 2 eos, 3 unk, then characters)."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " .,!?'-:"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(chars[: VOCAB - 4])})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def save_tiny(arch: str, directory, n_layers: int = 3):
    """A tiny model + tokenizer saved as a standard HF checkpoint; returns (model, tokenizer, directory)."""
    model, tokenizer = tiny_model(arch, n_layers=n_layers), tiny_tokenizer()
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return model, tokenizer, str(directory)


@pytest.fixture(scope="session")
def demo_server():
    """`steer demo` on the real default model in a subprocess, on a free port of 127.0.0.1; yields its URL.

    Flags: the default atlas (built here on first use, cached), at most 16 new tokens, 16 concurrent generations.
    """
    from demo_server import running_demo
    from steer.discover.atlas import default_atlas

    atlas = default_atlas(progress=False)
    with running_demo("--atlas", str(atlas), "--max-new-tokens", "16", "--concurrency", "16") as url:
        yield url
