"""The feature atlas and contrastive discovery (steer.discover.atlas / contrast, `steer features …`).

Unit cases run on a tiny random Llama (its final-norm weights randomised, so
the logit lens must apply the gain) with a random ReLU SAE at resid_post.1,
over a JSONL corpus written here. Every statistic is checked against a
reference written out in this file: activations from the model's own
``output_hidden_states`` (not steer's hooks) encoded with the ReLU formula in
float64 numpy, the packing of documents into rows, nearest-rank p99, the
top-context selection rule and the logit lens ``(W_dec ⊙ g) W_Uᵀ``; AUROC
against the brute-force pairwise count; the output score against a forward
hook written here. The default-model cases check the issue's done-when on the
real SmolLM2 + default SAE + default atlas (built on first use, then cached).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from steer.cli.main import main
from steer.discover.atlas import WINDOW_BEFORE, build_atlas, open_atlas
from steer.discover.contrast import auroc, contrast, read_prompts
from steer.sae import load_sae, save_sae
from tests.conftest import random_sae, save_tiny

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "contrast"
CONTEXT, WINDOW, N_CONTEXTS, TOKENS = 40, 24, 5, 1400
WORDS = ("pasta", "river", "green", "market", "seven", "quiet", "stone", "paper", "bread", "light", "north", "glass")


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + rng.choice(".!?")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny model (saved, for the CLI), SAE with one dead feature, corpus, and the atlas built from them."""
    root = tmp_path_factory.mktemp("features")
    model, tokenizer, model_dir = save_tiny("llama", root / "model", n_layers=3)
    with torch.no_grad():  # a non-trivial final-norm gain, which the logit lens must apply
        model.model.norm.weight.copy_(torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5)))
    sae = random_sae(d_sae=24, site="resid_post.1")
    sae.b_enc[7] = -1e6  # feature 7 never fires
    save_sae(sae, root / "sae")
    rng = random.Random(0)
    (root / "corpus.jsonl").write_text("\n".join(json.dumps({"text": " ".join(sentence(rng) for _ in range(3))})
                                                 for _ in range(40)) + "\n")
    out = build_atlas(model, tokenizer, sae, str(root / "corpus.jsonl"), tokens=TOKENS, out=root / "atlas.db",
                      context_size=CONTEXT, window=WINDOW, contexts=N_CONTEXTS, batch_size=7, progress=False)
    return dict(root=root, model=model, tokenizer=tokenizer, sae=sae, atlas=out, model_dir=model_dir)


def reference_rows(tokenizer, corpus: Path, context: int, n_rows: int) -> list[list[int]]:
    """Documents tokenized without special tokens, EOS after each, packed into full rows of ``context``."""
    ids: list[int] = []
    for line in corpus.read_text().splitlines():
        ids += tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [ids[i : i + context] for i in range(0, len(ids) - context + 1, context)][:n_rows]


def reference_features(model, sae, rows: list[list[int]], layer: int) -> np.ndarray:
    """ReLU SAE features (float64) of the output of block ``layer``, from HF's own hidden_states: (rows, T, d_sae)."""
    with torch.no_grad():
        hidden = model(torch.tensor(rows), output_hidden_states=True).hidden_states[layer + 1].double().numpy()
    W_enc, b_enc, b_dec = (t.double().numpy() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    return np.maximum((hidden - b_dec) @ W_enc + b_enc, 0.0)


def test_atlas_stores_the_statistics_contexts_and_tokens_of_an_independent_computation(tiny):
    model, tokenizer, sae = tiny["model"], tiny["tokenizer"], tiny["sae"]
    n_rows = math.ceil(TOKENS / (CONTEXT - 1))
    rows = reference_rows(tokenizer, tiny["root"] / "corpus.jsonl", CONTEXT, n_rows)
    assert len(rows) == n_rows  # the corpus is long enough that the token budget, not the corpus, stops the scan
    f = reference_features(model, sae, rows, layer=1)[:, 1:]           # position 0 (attention sink) left out
    flat = f.reshape(-1, sae.d_sae)
    W_U = model.lm_head.weight.double().numpy()
    gain = model.model.norm.weight.double().numpy()
    lens = (sae.W_dec.double().numpy() * gain) @ W_U.T                   # (d_sae, V)

    atlas = open_atlas(tiny["atlas"])
    assert len(atlas) == sae.d_sae and atlas.metadata["tokens_read"] == flat.shape[0]
    for i in range(sae.d_sae):
        card = atlas.feature(i)
        fired = np.sort(flat[:, i][flat[:, i] > 0])
        assert card.density == pytest.approx(len(fired) / flat.shape[0], abs=1e-12)
        assert card.max_activation == pytest.approx(fired.max() if len(fired) else 0.0, rel=1e-4, abs=1e-4)
        p99 = fired[math.ceil(0.99 * len(fired)) - 1] if len(fired) else 0.0
        assert card.p99 == pytest.approx(p99, rel=1e-4, abs=1e-4)

        # top contexts: one per row, rows by peak (descending), window of WINDOW tokens around the first peak
        peaks = f[:, :, i].max(axis=1)
        firsts = f[:, :, i].argmax(axis=1) + 1                          # position in the row
        ranked = sorted((r for r in range(n_rows) if peaks[r] > 0), key=lambda r: (-peaks[r], r))[:N_CONTEXTS]
        assert len(card.contexts) == len(ranked)
        for context, r in zip(card.contexts, ranked):
            start = min(max(firsts[r] - WINDOW_BEFORE, 1), CONTEXT - WINDOW)
            assert context.tokens == [tokenizer.decode([t]) for t in rows[r][start : start + WINDOW]]
            np.testing.assert_allclose(context.activations, f[r, start - 1 : start - 1 + WINDOW, i], rtol=1e-4, atol=1e-4)
            assert context.max_activation == pytest.approx(peaks[r], rel=1e-4)

        top = np.argsort(-lens[i], kind="stable")[:10]
        bottom = np.argsort(lens[i], kind="stable")[:10]
        assert [t for t, _ in card.promoted] == [tokenizer.decode([int(t)]) for t in top]
        assert [t for t, _ in card.suppressed] == [tokenizer.decode([int(t)]) for t in bottom]
        np.testing.assert_allclose([v for _, v in card.promoted], lens[i][top], atol=1e-4)
        np.testing.assert_allclose([v for _, v in card.suppressed], lens[i][bottom], atol=1e-4)

    dead = atlas.feature(7)
    assert (dead.density, dead.max_activation, dead.p99, dead.contexts) == (0.0, 0.0, 0.0, [])


def test_search_finds_exactly_the_features_whose_contexts_hold_the_word(tiny):
    atlas = open_atlas(tiny["atlas"])
    cards = [atlas.feature(i) for i in range(len(atlas))]
    for word in ("pasta", "glass"):
        pattern = re.compile(rf"\b{word}\b", re.IGNORECASE)
        expected = {c.id for c in cards if any(pattern.search(x.text) for x in c.contexts)}
        found = atlas.search(f"{word.upper()}!", limit=len(atlas))
        assert expected and {c.id for c in found} == expected
    assert atlas.search("zebra") == []


def test_a_failed_build_leaves_nothing_and_an_existing_atlas_is_kept(tiny, tmp_path):
    from steer.discover.atlas import AtlasError

    (tmp_path / "short.jsonl").write_text(json.dumps({"text": "Too short for one row."}) + "\n")
    with pytest.raises(AtlasError, match="no full 40-token sequence"):
        build_atlas(tiny["model"], tiny["tokenizer"], tiny["sae"], str(tmp_path / "short.jsonl"), tokens=100,
                    out=tmp_path / "atlas.db", context_size=CONTEXT, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.jsonl"]
    kept = tiny["atlas"].read_bytes()
    with pytest.raises(AtlasError, match="already exists"):
        build_atlas(tiny["model"], tiny["tokenizer"], tiny["sae"], str(tmp_path / "short.jsonl"), tokens=100,
                    out=tiny["atlas"], context_size=CONTEXT, progress=False, overwrite=False)
    assert tiny["atlas"].read_bytes() == kept


# -- CLI: show, search, index ----------------------------------------------------------------


def test_show_marks_exactly_the_tokens_where_the_feature_fires(tiny, capsys):
    card = open_atlas(tiny["atlas"]).feature(3)
    assert main(["features", "show", "3", "--atlas", str(tiny["atlas"]), "--contexts", "3", "--color", "never"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"feature 3   density {100 * card.density:.3f}%")
    assert f"max {card.max_activation:.3f}" in lines[0] and f"p99 {card.p99:.3f}" in lines[0]
    assert all(repr(t) in lines[1] for t, _ in card.promoted) and all(repr(t) in lines[2] for t, _ in card.suppressed)
    shown = [line for line in lines if line.startswith("  ")]
    assert len(shown) == 3
    for line, context in zip(shown, card.contexts):
        assert line.split()[0] == f"{context.max_activation:.3f}"
        marked = re.findall(r"⟦(.*?)⟧", line)
        assert marked == [t.strip() or t for t, a in zip(context.tokens, context.activations) if a > 0]
        assert re.sub(r"[⟦⟧]", "", line.split(None, 1)[1]) == "…" + context.text + "…"

    assert main(["features", "show", "3", "--atlas", str(tiny["atlas"]), "--color", "always"]) == 0
    coloured = capsys.readouterr().out
    assert "\033[" in coloured and "⟦" not in coloured


def test_search_cli_lists_the_api_ranking(tiny, capsys):
    expected = [c.id for c in open_atlas(tiny["atlas"]).search("pasta bread", limit=6)]
    assert main(["features", "search", "pasta bread", "--atlas", str(tiny["atlas"]), "--limit", "6"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [int(r.split()[0]) for r in rows] == expected
    assert main(["features", "search", "pasta bread", "--atlas", str(tiny["atlas"]), "--limit", "6", "--json"]) == 0
    assert [c["id"] for c in json.loads(capsys.readouterr().out)] == expected


def test_show_and_search_run_without_importing_torch(tiny, tmp_path):
    """They only read SQLite, so `steer features show/search` must not pay torch's import (seconds)."""
    code = ("import sys\nfrom steer.cli.main import main\n"
            f"assert main(['features', 'show', '3', '--atlas', {str(tiny['atlas'])!r}]) == 0\n"
            f"assert main(['features', 'search', 'pasta', '--atlas', {str(tiny['atlas'])!r}]) == 0\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False False"


def fake_shipped(root: Path, default_site: str = "resid_post.10") -> Path:
    """A shipped-SAE layout under ``root``: two site directories with a few files and a manifest naming the default."""
    for site in ("resid_post.3", "resid_post.10"):
        (root / site).mkdir(parents=True, exist_ok=True)
        (root / site / "cfg.json").write_text(json.dumps({"site": site}))
        (root / site / "sae_weights.safetensors").write_bytes(site.encode() * 100)
    (root / "manifest.json").write_text(json.dumps({"default_site": default_site,
                                                    "saes": {s: {"path": s} for s in ("resid_post.3", "resid_post.10")}}))
    return root / default_site


def test_the_default_atlas_pointer_is_found_without_torch_and_refused_when_stale(tmp_path, monkeypatch):
    """The pointer names the atlas of the SAE ``default`` reads, keyed on that SAE's files: it is refused for another
    default SAE — changed shipped files, another default site, another recipe where none ship — or a gone SAE."""
    import steer.data
    from steer.discover import atlas as atlas_module

    monkeypatch.setenv("STEER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "atlases").mkdir(parents=True)
    db = tmp_path / "cache" / "atlases" / "x.db"
    db.write_bytes(b"")
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(steer.data, "SAES_DIR", shipped)
    sae = fake_shipped(shipped)
    atlas_module._write_pointer(db, sae)
    assert atlas_module.quick_default_atlas() == db
    weights = sae / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"!")
    assert atlas_module.quick_default_atlas() is None          # other files at the default site: another SAE
    atlas_module._write_pointer(db, sae)
    assert atlas_module.quick_default_atlas() == db
    fake_shipped(shipped, default_site="resid_post.3")
    assert atlas_module.quick_default_atlas() is None          # ``default`` reads another site's SAE now
    atlas_module._write_pointer(db, shipped / "resid_post.10")  # nor is a pointer to a non-default SAE ever taken
    assert atlas_module.quick_default_atlas() is None
    atlas_module._write_pointer(db, shipped / "resid_post.3")
    assert atlas_module.quick_default_atlas() == db
    (shipped / "resid_post.3" / "cfg.json").unlink()
    assert atlas_module.quick_default_atlas() is None          # the SAE it was built for is gone

    # a checkout that ships no SAEs: ``default`` is the one-site recipe's SAE, trained once
    monkeypatch.setattr(steer.data, "SAES_DIR", tmp_path / "ships-none")
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "cfg.json").write_text("{}")
    atlas_module._write_pointer(db, trained)
    assert atlas_module.quick_default_atlas() == db
    record = json.loads((tmp_path / "cache" / "atlases" / "default.json").read_text())
    (tmp_path / "cache" / "atlases" / "default.json").write_text(
        json.dumps({**record, "default": {"recipe_sha256": "0" * 64}}))
    assert atlas_module.quick_default_atlas() is None          # another recipe: another SAE, not this atlas
    atlas_module._write_pointer(db, trained)
    (trained / "cfg.json").unlink()
    assert atlas_module.quick_default_atlas() is None          # the SAE it was built for is gone


def test_the_default_atlas_pointer_is_read_without_importing_torch(tmp_path):
    """`steer features show ID` without --atlas finds the atlas of the shipped default SAE through the pointer alone."""
    from steer.sae.shipped import shipped_available, shipped_sae_dir

    if not shipped_available():
        pytest.skip("this checkout ships no SAEs")
    code = ("import sys\nfrom pathlib import Path\nfrom steer.discover import atlas\n"
            f"atlas._write_pointer(Path({str(tmp_path / 'x.db')!r}), Path({str(shipped_sae_dir())!r}))\n"
            "print(atlas.quick_default_atlas(), 'torch' in sys.modules)\n")
    (tmp_path / "x.db").write_bytes(b"")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "STEER_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "x.db"), "False"]


def test_index_cli_builds_the_same_atlas_as_the_api(tiny, tmp_path, capsys):
    out = tmp_path / "cli.db"
    assert main(["features", "index", "--model", tiny["model_dir"], "--sae", str(tiny["root"] / "sae"), "--corpus",
                 str(tiny["root"] / "corpus.jsonl"), "--tokens", "300", "-o", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    from steer.models import load_model

    model, tokenizer = load_model(tiny["model_dir"])
    reference = build_atlas(model, tokenizer, tiny["sae"], str(tiny["root"] / "corpus.jsonl"), tokens=300,
                            out=tmp_path / "api.db", progress=False)
    a, b = open_atlas(out), open_atlas(reference)
    assert a.metadata["tokens_read"] == b.metadata["tokens_read"] == 381  # 3 rows of 128 (the default context) − 1
    for i in (0, 3, 11):
        assert a.feature(i) == b.feature(i)


# -- bad input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    (root / "a.txt").write_text("The wedding was lovely\n\nThe bride smiled at the groom\nA big wedding cake\n")
    (root / "b.txt").write_text("The meeting was long\nThe clerk smiled at the manager\nA big office desk\n")
    (root / "empty.txt").write_text("\n  \n")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"words": "no text"}\n')
    (root / "good.jsonl").write_text('{"text": "one prompt"}\n"two prompt"\n{"prompt": "three"}\n')
    (root / "one_token.txt").write_text("a\n")
    (root / "dir").mkdir()
    return root


def test_prompt_files_read_text_and_jsonl(prompt_files):
    assert read_prompts(prompt_files / "a.txt") == ["The wedding was lovely", "The bride smiled at the groom", "A big wedding cake"]
    assert read_prompts(prompt_files / "good.jsonl") == ["one prompt", "two prompt", "three"]


def one_line_error(capsys, argv: list[str], *expected: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("steer: error: "), captured.err
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_bad_input_is_one_line_and_exit_2(tiny, prompt_files, capsys, tmp_path):
    atlas, sae, p = str(tiny["atlas"]), str(tiny["root"] / "sae"), prompt_files
    model = ["--model", tiny["model_dir"], "--sae", sae]
    one_line_error(capsys, ["features", "show", "1", "--atlas", str(tmp_path / "missing.db")], "missing.db", "no such atlas file")
    one_line_error(capsys, ["features", "show", "1", "--atlas", str(p / "a.txt")], "a.txt", "not a steer feature atlas")
    one_line_error(capsys, ["features", "show", "24", "--atlas", atlas], "feature 24 is out of range", "24 features (0..23)")
    one_line_error(capsys, ["features", "show", "-1", "--atlas", atlas], "feature -1 is out of range")
    one_line_error(capsys, ["features", "search", "?!", "--atlas", atlas], "has no words")
    one_line_error(capsys, ["features", "contrast", "--a", str(p / "empty.txt"), "--b", str(p / "b.txt"), *model],
                   "empty.txt", "has no prompts")
    one_line_error(capsys, ["features", "contrast", "--a", str(p / "a.txt"), "--b", str(p / "latin1.txt"), *model],
                   "latin1.txt", "not UTF-8")
    one_line_error(capsys, ["features", "contrast", "--a", str(p / "dir"), "--b", str(p / "b.txt"), *model],
                   "dir", "not a regular file")
    one_line_error(capsys, ["features", "contrast", "--a", str(p / "nope.txt"), "--b", str(p / "b.txt"), *model],
                   "nope.txt", "no such prompt file")
    one_line_error(capsys, ["features", "contrast", "--a", str(p / "bad.jsonl"), "--b", str(p / "b.txt"), *model],
                   "bad.jsonl:2", "no string 'text' or 'prompt' field")
    one_line_error(capsys, ["features", "contrast", "--a", str(p / "one_token.txt"), "--b", str(p / "b.txt"), *model],
                   "prompts A", "prompt 1", "single token")
    one_line_error(capsys, ["features", "index", *model, "--corpus", str(p / "empty.txt"), "-o", str(tmp_path / "x.db")],
                   "empty.txt", "is empty")
    one_line_error(capsys, ["features", "index", *model, "--tokens", "0", "-o", str(tmp_path / "x.db")], "--tokens", "positive")
    one_line_error(capsys, ["features", "index", *model, "--corpus", str(p / "a.txt"), "-o", atlas], "already exists")
    assert sorted(x.name for x in tmp_path.iterdir()) == []


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "steer.cli.main", "features", "show", "5", "--atlas",
                             str(tmp_path / "none.db")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"steer: error: atlas {tmp_path / 'none.db'}: no such atlas file; "
                                                  "build one with `steer features index`"]


# -- contrast ------------------------------------------------------------------------------------


def test_auroc_equals_the_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(0)
    for n_a, n_b in ((1, 1), (5, 9), (30, 30), (17, 4)):
        a = torch.randint(0, 4, (n_a, 12), generator=g).float()      # few distinct values: many ties
        b = torch.randint(0, 4, (n_b, 12), generator=g).float()
        b[:, 0] = a[0, 0]
        a[:, 0] = a[0, 0]                                            # a column that is all one value: 0.5
        expected = [
            sum((x > y) + 0.5 * (x == y) for x in a[:, j].tolist() for y in b[:, j].tolist()) / (n_a * n_b)
            for j in range(12)
        ]
        assert auroc(a, b).tolist() == pytest.approx(expected, abs=1e-12)
        assert expected[0] == 0.5


def test_contrast_matches_a_reference_computation(tiny, prompt_files):
    model, tokenizer, sae = tiny["model"], tiny["tokenizer"], tiny["sae"]
    prompts_a, prompts_b = read_prompts(prompt_files / "a.txt"), read_prompts(prompt_files / "b.txt")
    rows = contrast(model, tokenizer, sae, prompts_a, prompts_b, top=6, candidates=4)

    def summaries(prompts):  # each prompt alone (no padding), max over positions ≥ 1
        return np.stack([reference_features(model, sae, [tokenizer(p)["input_ids"]], layer=1)[0, 1:].max(axis=0)
                         for p in prompts])

    a, b = summaries(prompts_a), summaries(prompts_b)
    area = np.array([np.mean([(x > y) + 0.5 * (x == y) for x in a[:, j] for y in b[:, j]]) for j in range(sae.d_sae)])
    diff = a.mean(0) - b.mean(0)
    order = sorted(range(sae.d_sae), key=lambda j: (-abs(area[j] - 0.5), -abs(diff[j]), j))[:6]
    assert [r.feature for r in rows] == order
    for r in rows:
        j = r.feature
        assert r.auroc == pytest.approx(area[j]) and r.diff == pytest.approx(diff[j], rel=1e-4)
        assert (r.mean_a, r.mean_b) == pytest.approx((a[:, j].mean(), b[:, j].mean()), rel=1e-4)
        assert (r.fired_a, r.fired_b) == (np.mean(a[:, j] > 0), np.mean(b[:, j] > 0))
    assert [r.output_score is None for r in rows] == [False] * 4 + [True] * 2

    # output score: +10 × (largest feature at the last position) × d_i at the last position of the neutral prompt
    ids = torch.tensor([tokenizer("From my experience,")["input_ids"]])
    last = reference_features(model, sae, ids.tolist(), layer=1)[0, -1]
    lens = (sae.W_dec.double().numpy() * model.model.norm.weight.double().numpy()) @ model.lm_head.weight.double().numpy().T

    def reference_score(j: int, tokens: list[int]) -> float:
        delta = 10.0 * last.max() * sae.W_dec[j]

        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[:, -1] += delta
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = model.model.layers[1].register_forward_hook(hook)
        try:
            with torch.no_grad():
                p = torch.softmax(model(ids).logits[0, -1].double(), dim=-1).numpy()
        finally:
            handle.remove()
        best = p[tokens].max()
        return (1 - np.sum(p > best) / len(p)) * best

    for r in rows[:4]:
        own = list(np.argsort(-lens[r.feature], kind="stable")[:20])
        assert r.output_score == pytest.approx(reference_score(r.feature, own), rel=1e-5)
    targeted = contrast(model, tokenizer, sae, prompts_a, prompts_b, top=3, target_tokens=["w", "b"], rank_by="output")
    targets = [tokenizer(" w", add_special_tokens=False)["input_ids"][0], tokenizer("w", add_special_tokens=False)["input_ids"][0],
               tokenizer(" b", add_special_tokens=False)["input_ids"][0], tokenizer("b", add_special_tokens=False)["input_ids"][0]]
    scores = {r.feature: r.output_score for r in targeted}
    assert set(scores) == set(order[:3])
    for j, score in scores.items():
        assert score == pytest.approx(reference_score(j, sorted(set(targets))), rel=1e-5)
    assert [r.output_score for r in targeted] == sorted(scores.values(), reverse=True)


def test_contrast_cli_prints_the_api_rows(tiny, prompt_files, capsys):
    rows = contrast(tiny["model"], tiny["tokenizer"], tiny["sae"], read_prompts(prompt_files / "a.txt"),
                    read_prompts(prompt_files / "b.txt"), top=5, candidates=0)
    assert main(["features", "contrast", "--a", str(prompt_files / "a.txt"), "--b", str(prompt_files / "b.txt"),
                 "--model", tiny["model_dir"], "--sae", str(tiny["root"] / "sae"), "--top", "5", "--candidates", "0",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["feature"] for r in printed] == [r.feature for r in rows]
    assert [r["auroc"] for r in printed] == pytest.approx([r.auroc for r in rows], abs=1e-9)
    assert main(["features", "contrast", "--a", str(prompt_files / "a.txt"), "--b", str(prompt_files / "b.txt"),
                 "--model", tiny["model_dir"], "--sae", str(tiny["root"] / "sae"), "--top", "5", "--candidates", "0",
                 "--atlas", str(tiny["atlas"])]) == 0
    table = capsys.readouterr().out.splitlines()[2:]
    atlas = open_atlas(tiny["atlas"])
    for line, row in zip(table, rows):
        assert int(line.split()[1]) == row.feature
        assert line.endswith(" ".join(repr(t) for t, _ in atlas.feature(row.feature).promoted[:6]))


# -- the default model ------------------------------------------------------------------------------

FOOTBALL = ("football", "soccer", "rugby", "striker", "goalkeeper", "midfield", "premiership", "uefa", "fa cup",
            "league", "stadium", "arsenal", "chelsea", "liverpool", "manchester united", "glazer")


@pytest.fixture(scope="module")
def default_setup(default_model):
    from steer.discover.atlas import default_atlas
    from steer.train import default_sae

    return default_model, load_sae(default_sae()), open_atlas(default_atlas())


@pytest.mark.default_model
def test_contrast_on_one_concept_finds_a_feature_whose_atlas_contexts_show_it(default_setup):
    (model, tokenizer), sae, atlas = default_setup
    football, other = read_prompts(DATA / "football.txt"), read_prompts(DATA / "without_football.txt")
    assert len(football) == len(other) == 30
    rows = contrast(model, tokenizer, sae, football, other, top=5, candidates=0, atlas=atlas)
    assert len(rows) == 5

    def shows_football(feature: int) -> bool:
        contexts = atlas.feature(feature).contexts[:10]
        hits = sum(any(k in c.text.lower() for k in FOOTBALL) for c in contexts)
        return len(contexts) == 10 and hits >= 8

    assert any(shows_football(r.feature) and r.auroc > 0.9 for r in rows), [r.feature for r in rows]
    # and the match is not vacuous: most features' contexts do not show football
    assert sum(shows_football(i) for i in range(0, sae.d_sae, 64)) <= 2


@pytest.mark.default_model
def test_default_atlas_search_ranks_a_feature_firing_on_the_word_first(default_setup):
    _, sae, atlas = default_setup
    assert len(atlas) == sae.d_sae and atlas.metadata["sae_hash"] == sae.content_hash()
    # words with a feature that peaks on them (measured on the shipped SAE's atlas); not "football": that SAE splits it
    # into club-name, game, ball and rugby features, none peaking on the word itself in 5 of its top 10 contexts
    for word in ("oil", "election", "film", "court"):
        first = atlas.search(word, limit=3)[0]
        peaks = [c.tokens[int(np.argmax(c.activations))].strip().lower() for c in first.contexts[:10]]
        assert sum(word in t for t in peaks) >= 5, (word, first.id, peaks)



@pytest.mark.default_model
def test_the_default_atlas_is_the_shipped_default_saes_and_its_pointer_is_keyed_on_those_files(default_setup):
    from steer.discover.atlas import _pointer_path, quick_default_atlas
    from steer.sae.shipped import shipped_available, shipped_manifest, shipped_sae_dir

    if not shipped_available():
        pytest.skip("this checkout ships no SAEs")
    _, sae, atlas = default_setup
    manifest = shipped_manifest()
    # the atlas is cached by the SAE's content, so checkouts sharing ~/.cache share it: it records the directory it
    # was built from (maybe another checkout's), and is the shipped SAE's by its content hash
    assert atlas.metadata["sae_hash"] == load_sae(shipped_sae_dir()).content_hash() == sae.content_hash()
    assert quick_default_atlas() == atlas.path
    record = json.loads(_pointer_path().read_text())
    assert record["sae"] == str(shipped_sae_dir())
    assert record["sae_files"] == manifest["saes"][manifest["default_site"]]["files"]
