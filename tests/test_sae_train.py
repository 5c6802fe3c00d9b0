"""SAE training (`steer.train`), evaluation (`steer.evaluate.sae_metrics`) and `steer sae train|eval`.

Real training runs throughout, on planted synthetic activations or on a tiny
random Llama with a character-level tokenizer; nothing of the trainer is mocked.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import steer
from steer.cli.main import main as steer_main
from steer.data.state_file import load_state
from steer.train import TrainConfig, TrainError, load_recipe, train_sae
from tests.conftest import VOCAB, tiny_model

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the river town people evening stone wall bread flour water salt dough committee budget project year "
         "music child garden train station letter window market morning rain light city north south quiet "
         "runs sits makes reads writes opens walks falls rises meets closes grows").split()


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors train faster on one thread, and a loaded 2-core machine makes two threads spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- fixtures: planted activations, a tiny model with a tokenizer, a text corpus -------------------------


def planted(n: int = 40_000, d: int = 32, n_true: int = 64, k: int = 3, seed: int = 0):
    """Activations that are k-sparse positive combinations of ``n_true`` unit directions, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_true, d, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    chosen = torch.stack([torch.randperm(n_true, generator=g)[:k] for _ in range(n)])  # (n, k)
    coefficients = torch.rand(n, k, generator=g) + 0.5
    x = torch.einsum("nk,nkd->nd", coefficients, directions[chosen]) + 0.3
    return x, directions


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    paragraphs = []
    for _ in range(400):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "." for _ in range(4)]
        paragraphs.append(" ".join(sentences))
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, corpus_file) -> Path:
    """A tiny random Llama saved with a character-level tokenizer (ids < VOCAB)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(corpus_file.read_text()))
    assert len(chars) + 4 <= VOCAB
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
    )
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", n_layers=3).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_config(corpus: Path, **changes) -> TrainConfig:
    base = dict(model="tiny", site="resid_post.1", corpus=str(corpus), width=64, k=4, tokens=8192, batch_size=512,
                context_size=32, buffer_size=2048, model_batch_size=16, stats_tokens=2048, dead_tokens=4096,
                checkpoint_every=4, lr=3e-3, device="cpu")
    return TrainConfig(**{**base, **changes})


def cli(*args: str, launcher: tuple[str, ...] = (sys.executable, "-m")) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread
    return subprocess.run([*launcher, "steer.cli.main", *args], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)


# -- the trainer ----------------------------------------------------------------------------------------


def test_recovers_planted_directions(tmp_path):
    x, directions = planted()
    config = TrainConfig(width=128, k=3, tokens=250_000, batch_size=1024, lr=3e-3, dead_tokens=20_000,
                         stats_tokens=8192, checkpoint_every=10_000, device="cpu")
    result = train_sae(config, tmp_path / "sae", activations=x, progress=False)
    best = (directions @ result.sae.W_dec.T).max(dim=1).values  # best cosine per planted direction (decoder rows are unit)
    assert (best >= 0.9).float().mean() >= 0.9, best
    assert result.tokens_seen == config.steps * config.batch_size


def test_saved_sae_is_bit_identical_and_saelens_v6(tmp_path, tiny_dir, corpus_file):
    model, tokenizer = steer.load_model(tiny_dir)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    result = train_sae(tiny_config(corpus_file), tmp_path / "sae", model=model, tokenizer=tokenizer, progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the caller's model is untouched
    assert not list(model.model.layers[1]._forward_hooks) and not list(model.model.layers[1]._forward_pre_hooks)

    loaded = steer.load_sae(result.path)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(result.sae, name)), name
    for name, values in result.sae.feature_stats.items():
        assert torch.equal(loaded.feature_stats[name], values), name
    assert (loaded.architecture, loaded.k, loaded.site) == ("topk", 4, "resid_post.1")

    cfg = json.loads((result.path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (32, 64, "float32", "none")
    assert cfg["apply_b_dec_to_input"] is True and cfg["reshape_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["model_name"] == "tiny"
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6 and meta["context_size"] == 32
    assert meta["steer_training"]["tokens_seen"] == 8192
    with safe_open(result.path / "sae_weights.safetensors", "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"W_enc": [32, 64], "W_dec": [64, 32], "b_enc": [64], "b_dec": [32]}
    with safe_open(result.path / "sparsity.safetensors", "pt") as f:
        assert list(f.keys()) == ["sparsity"] and list(f.get_slice("sparsity").get_shape()) == [64]
    with safe_open(result.path / "feature_stats.safetensors", "pt") as f:
        assert {"density", "max", "p99"} <= set(f.keys())
    # decoder rows are unit-norm in the model's space; p99 is positive exactly where a feature fires
    assert torch.allclose(loaded.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    stats = loaded.feature_stats
    assert torch.equal(stats["p99"] > 0, stats["density"] > 0) and bool((stats["p99"] <= stats["max"]).all())


def _interrupt_at(step: int):
    def callback(info):
        if info.step == step:
            raise KeyboardInterrupt
    return callback


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    x, _ = planted(n=20_000)
    config = TrainConfig(width=96, k=3, tokens=40_960, batch_size=1024, lr=3e-3, dead_tokens=8192,
                         stats_tokens=4096, checkpoint_every=5, device="cpu")
    straight = train_sae(config, tmp_path / "straight", activations=x, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_sae(config, tmp_path / "resumed", activations=x, progress=False, callback=_interrupt_at(13))
    assert (tmp_path / ".resumed.train" / "checkpoint.safetensors").is_file()
    seen = []
    resumed = train_sae(config, tmp_path / "resumed", activations=x, progress=False, callback=lambda i: seen.append(i.step))
    assert seen[0] == 14 and seen[-1] == config.steps                 # it continued, it did not start over
    assert resumed.tokens_seen == straight.tokens_seen == config.steps * config.batch_size
    assert torch.equal(resumed.sae.W_dec, straight.sae.W_dec)         # from an activation tensor, resume is exact
    assert not (tmp_path / ".resumed.train").exists()


def test_interrupted_streaming_run_resumes_to_the_same_tokens_seen(tmp_path, tiny_dir, corpus_file):
    model, tokenizer = steer.load_model(tiny_dir)
    config = tiny_config(corpus_file, tokens=6144)
    with pytest.raises(KeyboardInterrupt):
        train_sae(config, tmp_path / "sae", model=model, tokenizer=tokenizer, progress=False, callback=_interrupt_at(5))
    resumed = train_sae(config, tmp_path / "sae", model=model, tokenizer=tokenizer, progress=False)
    assert resumed.tokens_seen == 6144
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["steer_training"]["tokens_seen"] == 6144 and cfg["metadata"]["steer_training"]["steps"] == 12


def test_ctrl_c_checkpoints_and_the_same_command_resumes(tmp_path, tiny_dir, corpus_file):
    """A real SIGINT to `steer sae train`: it stops after the current step, checkpoints, exits 130; rerun finishes."""
    import signal
    import time

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_dir}\nsite: resid_post.1\nwidth: 64\nk: 4\ncontext_size: 32\nbatch_size: 512\n"
                      "buffer_size: 4096\nstats_tokens: 2048\ncheckpoint_every: 100000\ntokens: 1000\n")
    args = [sys.executable, "-m", "steer.cli.main", "sae", "train", "--config", str(recipe), "--corpus", str(corpus_file),
            "--tokens", "256000", "-o", str(tmp_path / "sae")]  # flags override the recipe
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT, env=env)
        deadline = time.monotonic() + 300
        while "training SAE" not in log.read_text() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130, log.read_text()
    checkpoint = load_state(tmp_path / ".sae.train" / "checkpoint.safetensors")
    assert 0 < checkpoint["step"] < 500 and "checkpoint saved" in log.read_text()
    finished = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert f"resuming from step {checkpoint['step']}" in finished.stderr and "256,000 tokens seen" in finished.stdout


def test_batchtopk_saves_as_jumprelu_whose_threshold_keeps_k(tmp_path):
    x, _ = planted(n=30_000, k=4)
    config = TrainConfig(architecture="batchtopk", width=128, k=4, tokens=150_000, batch_size=1024, lr=3e-3,
                         dead_tokens=20_000, stats_tokens=16_384, checkpoint_every=10_000, device="cpu")
    result = train_sae(config, tmp_path / "sae", activations=x, progress=False)
    loaded = steer.load_sae(result.path)
    assert loaded.architecture == "jumprelu" and loaded.threshold is not None
    assert torch.equal(loaded.threshold, torch.full((128,), float(loaded.threshold[0])))  # one learned θ
    assert json.loads((result.path / "cfg.json").read_text())["architecture"] == "jumprelu"
    l0 = float((loaded.encode(x) > 0).sum(-1).float().mean())
    assert abs(l0 - 4) <= 0.6, l0


def test_recipe_rejects_unknown_keys_and_bad_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("width: 64\nk: 4\nwidht: 3\n")
    with pytest.raises(TrainError, match=r"r\.yaml.*unknown field 'widht'; allowed: model, site"):
        load_recipe(recipe)
    recipe.write_text("width: 64\nk: 128\n")
    with pytest.raises(TrainError, match="field 'k' is 128; it must be at most width"):
        load_recipe(recipe)
    recipe.write_text("architecture: relu\n")
    with pytest.raises(TrainError, match="allowed: topk, batchtopk"):
        load_recipe(recipe)
    assert load_recipe(ROOT / "configs" / "smollm2-135m-resid_post.10.yaml", k=16).k == 16


def test_recipes_in_configs_validate():
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert any("gpu" in r.name for r in recipes) and any(r.name == "smollm2-135m-resid_post.10.yaml" for r in recipes)
    for recipe in recipes:
        config = load_recipe(recipe)
        assert config.model == "smollm2-135m-instruct" and config.k <= 64


# -- the command line ------------------------------------------------------------------------------------


def _one_line_error(capsys, *args: str) -> str:
    code = steer_main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("steer: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_bad_input_is_one_line_and_exit_2(capsys, tmp_path, tiny_dir, corpus_file):
    train = ("sae", "train", "--model", str(tiny_dir), "--site", "resid_post.1", "--batch-size", "256", "--tokens", "512")
    (tmp_path / "empty").mkdir()
    assert "empty corpus" in _one_line_error(capsys, *train, "--corpus", str(tmp_path / "empty"), "-o", str(tmp_path / "o"))
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    assert "is empty" in _one_line_error(capsys, *train, "--corpus", str(tmp_path / "blank.txt"), "-o", str(tmp_path / "o"))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    assert "not UTF-8" in _one_line_error(capsys, *train, "--corpus", str(tmp_path / "binary.txt"), "-o", str(tmp_path / "o"))
    assert "no such file" in _one_line_error(capsys, *train, "--corpus", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o"))
    assert "3 layers" in _one_line_error(capsys, *train, "--corpus", str(corpus_file), "--site", "resid_post.7", "-o", str(tmp_path / "o"))
    assert "unknown site" in _one_line_error(capsys, *train, "--corpus", str(corpus_file), "--site", "resid_middle.1", "-o", str(tmp_path / "o"))
    assert "'width' is 0" in _one_line_error(capsys, *train, "--width", "0", "-o", str(tmp_path / "o"))
    assert "'width' is -5" in _one_line_error(capsys, *train, "--width", "-5", "-o", str(tmp_path / "o"))
    assert "at most width" in _one_line_error(capsys, *train, "--width", "8", "--k", "9", "-o", str(tmp_path / "o"))
    assert "cannot read the recipe" in _one_line_error(capsys, "sae", "train", "--config", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


ACCELERATE_ONE_CPU_PROCESS = (sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                              "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m")


def test_cli_train_then_eval_end_to_end(tmp_path, tiny_dir, corpus_file):
    """`steer sae train` under `accelerate launch` (one CPU process here), then `steer sae eval` and `inspect`."""
    out = tmp_path / "sae"
    trained = cli("sae", "train", "--model", str(tiny_dir), "--site", "resid_post.1", "--width", "64", "--k", "4",
                  "--corpus", str(corpus_file), "--tokens", "4096", "--batch-size", "512", "--context-size", "32",
                  "--quiet", "-o", str(out), launcher=ACCELERATE_ONE_CPU_PROCESS)
    assert trained.returncode == 0, trained.stderr
    assert "4,096 tokens seen" in trained.stdout
    assert (out / "cfg.json").is_file() and not (tmp_path / ".sae.train").exists()
    evaluated = cli("sae", "eval", str(out), "--tokens", "620", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    m = json.loads(evaluated.stdout)
    assert m["model"] == str(tiny_dir) and m["site"] == "resid_post.1" and m["split"] == "held_out"
    assert m["tokens"] >= 620 and 0 <= m["fvu"] < 1.5 and 0 < m["l0"] <= 4
    assert m["ce_zero"] > 0 and m["delta_lm_loss"] == pytest.approx(m["ce_spliced"] - m["ce_clean"])
    inspected = cli("sae", "inspect", str(out))
    assert inspected.returncode == 0 and "topk" in inspected.stdout


# -- corpora and the default SAE's cache -------------------------------------------------------------------


def test_corpus_readers_and_held_out_split(tmp_path, corpus_file):
    from steer.data.corpus import CorpusError, open_corpus

    (tmp_path / "docs").mkdir()
    texts = [f"Document number {i} says something about {WORDS[i % len(WORDS)]}." for i in range(400)]
    (tmp_path / "docs" / "a.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts[:200]) + "\n")
    (tmp_path / "docs" / "b.txt").write_text("\n\n".join(texts[200:]))
    (tmp_path / "docs" / ".hidden.txt").write_text("never read")
    corpus = open_corpus(tmp_path / "docs", text_field="body")
    assert sorted(p.name for p in corpus.files) == ["a.jsonl", "b.txt"]
    everything = list(corpus.documents("all"))
    train, held = list(corpus.documents("train", 0.2)), list(corpus.documents("held_out", 0.2))
    assert not set(train) & set(held) and sorted(train + held) == sorted(everything)
    assert 0.1 < len([t for t in held if t in texts[:200]]) / 200 < 0.3        # JSONL: one document per line
    assert all(len(doc) < 2500 for doc in everything if doc not in texts)      # text: ~2000-character documents
    (tmp_path / "bad.jsonl").write_text('{"body": "fine"}\n{"text": "no body"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: no 'body' field"):
        list(open_corpus(tmp_path / "bad.jsonl", text_field="body").documents())


def test_directory_corpora_are_read_in_a_fixed_order_that_mixes_subdirectories(tmp_path):
    """Files sorted by the sha256 of their relative path: a token budget samples every topic, not the first one."""
    import hashlib

    from steer.data.corpus import open_corpus

    for topic in ("business", "sport", "tech"):
        (tmp_path / topic).mkdir()
        for i in range(20):
            (tmp_path / topic / f"{i:03d}.txt").write_text(f"{topic} story {i}")
    names = [p.relative_to(tmp_path).as_posix() for p in open_corpus(tmp_path).files]
    assert names == sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    assert {n.split("/")[0] for n in names[:12]} == {"business", "sport", "tech"}


def test_the_embedded_corpus_reads_its_one_latin1_file():
    from steer.data.corpus import open_corpus

    corpus = open_corpus("default")
    (latin1,) = [p for p in corpus.files if p.as_posix().endswith("sports/199.txt")]
    text = next(iter(type(corpus)(corpus.spec, corpus.kind, (latin1,)).documents()))
    assert "fee for Mutu, a \u00a315.8" in text        # byte 0xa3 is the pound sign in cp1252/Latin-1


def test_default_sae_is_the_shipped_one_and_a_recipe_is_trained_once_and_cached(tmp_path, monkeypatch):
    from steer.sae import save_sae
    from steer.sae.shipped import shipped_available, shipped_sae_dir
    from steer.train import default_sae, recipe_hash
    from tests.conftest import random_sae

    monkeypatch.setenv("STEER_CACHE", str(tmp_path))
    monkeypatch.setattr("steer.train.trainer.train_sae", _no_training)
    monkeypatch.setattr("steer.train.trainer.train_saes", _no_training)
    recipe = ROOT / "configs" / "smollm2-135m-resid_post.10.yaml"
    expected = tmp_path / "saes" / f"{recipe.stem}-{recipe_hash(load_recipe(recipe))}"
    save_sae(random_sae(d_in=576, d_sae=8, site="resid_post.10"), expected)
    assert default_sae(recipe, progress=False) == expected
    if shipped_available():
        assert default_sae() == shipped_sae_dir() and default_sae(site="resid_post.3") == shipped_sae_dir(site="resid_post.3")
    else:
        assert default_sae(progress=False) == expected


def _no_training(*args, **kwargs):
    raise AssertionError("trained an SAE")


# -- several sites from one model pass ---------------------------------------------------------------------


def test_multi_site_run_reads_every_site_in_one_pass_and_trains_one_sae_each(tmp_path, tiny_dir, corpus_file):
    from steer.models.adapters import Site
    from steer.train import train_saes
    from steer.train.activations import SitesReader

    model, tokenizer = steer.load_model(tiny_dir)
    calls = {"layer0": 0, "layer2": 0}
    hooks = [model.model.layers[0].register_forward_hook(lambda *a: calls.__setitem__("layer0", calls["layer0"] + 1)),
             model.model.layers[2].register_forward_hook(lambda *a: calls.__setitem__("layer2", calls["layer2"] + 1))]
    config = tiny_config(corpus_file, sites=("resid_post.1", "resid_pre.0"), tokens=6200, epochs=2, stats_tokens=1024)
    try:
        results = train_saes(config, tmp_path / "saes", model=model, tokenizer=tokenizer, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert [r.path.name for r in results] == ["resid_post.1", "resid_pre.0"]
    rows = -(-(6200 // 2) // 31)                                     # distinct activations / (context - skip_first)
    assert calls["layer0"] == -(-rows // 16) and calls["layer2"] == 0  # one pass per model batch, stopped after block 1
    for result, site in zip(results, ("resid_post.1", "resid_pre.0")):
        loaded = steer.load_sae(result.path)
        assert loaded.site == site and result.tokens_seen == config.steps * config.batch_size
        meta = json.loads((result.path / "cfg.json").read_text())["metadata"]["steer_training"]
        assert meta["recipe"]["site"] == site and meta["multi_site_run"]["sites"] == ["resid_post.1", "resid_pre.0"]
    assert not (tmp_path / ".saes.train").exists()
    # what the cache held is what a one-site reader sees (float16 on disk)
    ids = torch.randint(0, 40, (2, 32))
    both = SitesReader(model, [Site(1, "resid_post"), Site(0, "resid_pre")])(ids)
    alone = SitesReader(model, [Site(0, "resid_pre")])(ids)
    assert torch.equal(both[Site(0, "resid_pre")], alone[Site(0, "resid_pre")])


def test_multi_site_recipe_fields_and_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sites: [resid_post.3, resid_post.10]\nwidth: 64\nk: 4\n")
    config = load_recipe(recipe)
    assert config.sites == ("resid_post.3", "resid_post.10") and config.site_names == config.sites
    assert load_recipe(recipe, sites="resid_post.1,resid_post.2").sites == ("resid_post.1", "resid_post.2")
    assert load_recipe(recipe, site="resid_post.7").site_names == ("resid_post.7",)   # --site: that one site
    recipe.write_text("site: resid_post.3\nsites: [resid_post.3, resid_post.10]\n")
    with pytest.raises(TrainError, match="either 'site'.*or 'sites'"):
        load_recipe(recipe)
    recipe.write_text("sites: [resid_post.3, resid_post.3]\n")
    with pytest.raises(TrainError, match="names a site twice"):
        load_recipe(recipe)
    with pytest.raises(TrainError, match="train_saes"):
        train_sae(load_recipe(ROOT / "configs" / "smollm2-135m-multidepth.yaml"), tmp_path / "o")
    # one-site recipes keep the hash they had before `sites` existed (their cached SAEs stay valid)
    from steer.train import recipe_hash
    assert recipe_hash(TrainConfig()) == "96fbe6450fec"


def test_two_data_parallel_processes_train_the_same_sae_as_one(tmp_path):
    """`accelerate launch --num_processes 2` on the CPU (gloo) vs one process, same global batch, planted activations.

    Tolerance: every decoder row within cosine 0.999 of the one-process SAE's, and FVU within 0.002 (measured: 0.9998
    and 1e-4 on this machine kind) — DDP averages the
    two processes' gradients of their own half-batch losses, which differ from the whole batch's only in how the FVU
    denominators (each half's variance) and float sums split.
    """
    def launch(processes: int, out: Path) -> None:
        # --multi_gpu is accelerate's flag for "start N processes with torchrun"; the recipe's device: cpu makes
        # them a gloo group on the CPU (with --cpu, accelerate's simple launcher would start only one)
        several = ["--multi_gpu"] if processes > 1 else ["--cpu"]
        command = [sys.executable, "-m", "accelerate.commands.launch", *several, "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "tests.sae_dp_worker", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]

    launch(1, tmp_path / "one")
    launch(2, tmp_path / "two")
    one, two = steer.load_sae(tmp_path / "one"), steer.load_sae(tmp_path / "two")
    assert json.loads((tmp_path / "two" / "cfg.json").read_text())["metadata"]["steer_training"]["processes"] == 2
    cosine = (one.W_dec * two.W_dec).sum(dim=1)                      # rows are unit vectors
    x, _ = planted(n=20_000)
    fvu = [float((s.decode(s.encode(x)) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) for s in (one, two)]
    print(f"\nDP 2 vs 1 process: min decoder-row cosine {float(cosine.min()):.5f}, FVU {fvu[0]:.4f} vs {fvu[1]:.4f}")
    assert float(cosine.min()) >= 0.999 and abs(fvu[0] - fvu[1]) <= 0.002


# -- the shipped SAEs --------------------------------------------------------------------------------------


def test_shipped_saes_load_without_training_and_match_their_manifest(monkeypatch):
    from steer.sae.shipped import SHIPPED_DIR, file_hashes, shipped_available, shipped_manifest, shipped_sae_dir

    if not shipped_available():
        pytest.skip("this checkout ships no SAEs yet (steer/data/saes/manifest.json)")

    monkeypatch.setattr("steer.train.trainer.train_sae", _no_training)
    monkeypatch.setattr("steer.train.trainer.train_saes", _no_training)
    manifest = shipped_manifest()
    sites = list(manifest["saes"])
    layers = sorted(int(site.split(".")[1]) for site in sites)
    assert len(sites) >= 4 and manifest["default_site"] in sites
    assert manifest["recipe"] == load_recipe(ROOT / manifest["recipe_file"]).to_dict() | {"sites": sites}
    assert len(manifest["corpus"]["sources"]) >= 2 and all(s["sha256"] for s in manifest["corpus"]["sources"].values())
    for site, entry in manifest["saes"].items():
        directory = shipped_sae_dir(site=site)
        assert directory.parent == SHIPPED_DIR and file_hashes(directory) == entry["files"], site
        sae = steer.load_sae(f"default:{site}")
        assert (sae.site, sae.d_in, sae.d_sae, sae.dtype) == (site, 576, 4096, torch.float32)
        assert entry["tokens_seen"] >= 2_000_000
        m = entry["held_out"]
        assert m["fvu"] <= 0.25 and m["l0"] <= 64 and m["dead_fraction"] <= 0.05 and m["delta_lm_loss"] <= 0.3, site
    assert steer.load_sae("default").site == manifest["default_site"]
    assert layers[-1] - layers[0] >= 10
    with pytest.raises(steer.errors.SAEError, match="no shipped SAE at resid_post.29; shipped sites"):
        steer.load_sae("default:resid_post.29")


@pytest.mark.default_model
def test_generate_with_the_default_sae_and_an_empty_cache_does_not_train(tmp_path):
    from steer.sae.shipped import shipped_available

    if not shipped_available():
        pytest.skip("this checkout ships no SAEs yet: `default` would train the one-site recipe on first use")
    env = {**os.environ, "STEER_CACHE": str(tmp_path / "empty-cache"), "OMP_NUM_THREADS": "1"}
    # feature 3448 of the shipped resid_post.10 SAE fires on "weather" (36 on this prompt; atlas: Sun, weather, sky)
    done = subprocess.run([sys.executable, "-m", "steer.cli.main", "generate", "The weather today is", "--sae", "default",
                           "--spec", "suppress feature 3448 by 50%", "--max-new-tokens", "4"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training" not in done.stderr.lower() and not (tmp_path / "empty-cache" / "saes").exists()
