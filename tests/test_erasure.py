"""Learned erasure (steer.discover.erasure, `steer features erase`) on a tiny random Llama.

Checked independently of the code under test: the edit it fits through its own writer hooks is exactly what
steer's compiled `project_out ... site writers` spec (the hooks lowering) and the merged-weights export do; its
objective parts equal the variance, margin and KL formulas written out here in numpy; and fitting lowers the
fill's spread on the fitted prompts as scored by steer's compiled spec, measured here by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import steer
from steer.cli.main import main
from steer.discover.attribution import suite_gaps
from steer.discover.erasure import fill_groups, learn_erasure, margins, removed, shortfall, spread
from steer.errors import SteerError
from steer.evaluate.suites import load_suite_text
from tests.conftest import D, save_tiny, tiny_model, tiny_tokenizer
from tests.test_attribution import STEREOTYPE_SUITE
from tests.test_evaluate import EXPLICIT_SUITE


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama"), tiny_tokenizer()


def orthonormal(rank: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(D, rank, generator=g))[0]


def spread_by_hand(suite, gaps: list[float]) -> float:
    """Mean over templates of the population variance of the gaps across the jobs (written out here)."""
    by_template: dict[str, list[float]] = {}
    for p, g in zip(suite.select("all"), gaps):
        (_, job, _), = p.data
        by_template.setdefault(p.text.replace(job, "<job>"), []).append(g)
    return float(np.mean([np.var(v) for v in by_template.values() if len(v) > 1]))


@pytest.mark.parametrize("fraction", [1.0, 1.15])
def test_the_removal_is_the_writers_project_out_that_the_spec_and_the_merged_weights_do(tiny, tmp_path, fraction):
    model, tokenizer = tiny
    q = orthonormal(2)
    save_file({"u0": q[:, 0].contiguous(), "u1": q[:, 1].contiguous()}, str(tmp_path / "e.safetensors"))
    by = f" by {fraction * 100:g}%"
    spec = f"project out direction {tmp_path}/e.safetensors:u0{by} site writers; " \
           f"project out direction {tmp_path}/e.safetensors:u1{by} site writers"
    ids = torch.tensor([[1, 10, 20, 30, 40, 50, 60, 7]])
    with torch.no_grad():
        base = model(ids).logits
        with removed(model, q, fraction):
            ours = model(ids).logits
        with steer.applied(model, steer.compile(spec, model)):
            hooks = model(ids).logits
    assert (ours - base).abs().max() > 1e-2  # the removal does something
    torch.testing.assert_close(ours, hooks, atol=1e-5, rtol=1e-5)

    _, _, model_dir = save_tiny("llama", tmp_path / "model")
    assert main(["compile", spec, "--model", model_dir, "--target", "weights", "-o", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours, atol=1e-4, rtol=1e-4)


def test_the_objective_parts_are_the_variance_margin_and_kl_written_out(tiny):
    model, tokenizer = tiny
    suite = load_suite_text(STEREOTYPE_SUITE)
    prompts = suite.select("all")
    gaps = suite_gaps(model, tokenizer, suite, prompts)
    groups = fill_groups(suite, prompts)
    assert sorted(len(g) for g in groups) == [5, 5]  # two templates × five jobs
    ours = float(spread([torch.tensor(gaps, dtype=torch.float64)[g] for g in groups]))
    assert ours == pytest.approx(spread_by_hand(suite, gaps), rel=1e-9)

    explicit = load_suite_text(EXPLICIT_SUITE)
    e_prompts = explicit.select("all")
    e_gaps = suite_gaps(model, tokenizer, explicit, e_prompts)
    toward = [g if p.expect == "male" else -g for p, g in zip(e_prompts, e_gaps)]
    assert margins(explicit, e_prompts, torch.tensor(e_gaps)).tolist() == pytest.approx(toward)
    base = torch.tensor([0.5, 4.0, -1.0, 2.0])
    edited = torch.tensor([0.2, 2.5, -0.5, 3.0])
    # relu(min(base, 3) − edited): 0.3, 0.5, 0, 0 → mean 0.2
    assert float(shortfall(edited, base)) == pytest.approx(0.2)


def test_fitting_lowers_the_fill_spread_that_the_written_spec_then_shows(tiny, tmp_path, capsys):
    _, tokenizer, model_dir = save_tiny("llama", tmp_path / "model")
    (tmp_path / "stereo.yaml").write_text(STEREOTYPE_SUITE)
    (tmp_path / "explicit.yaml").write_text(EXPLICIT_SUITE)
    out = tmp_path / "erasure"
    argv = ["features", "erase", "--suite", str(tmp_path / "stereo.yaml"), "--keep", str(tmp_path / "explicit.yaml"),
            "--split", "all", "--model", model_dir, "--rank", "2", "--steps", "40", "--lr", "0.1", "--neutral", "none",
            "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tiny-gap" in printed and "wrote" in printed
    tensors = load_file(str(out / "erasure.safetensors"))
    q = torch.stack([tensors["u0"], tensors["u1"]], dim=1)
    torch.testing.assert_close(q.T @ q, torch.eye(2), atol=1e-5, rtol=0)  # orthonormal

    model = steer.load_model(model_dir)[0]
    suite = load_suite_text(STEREOTYPE_SUITE)
    before = spread_by_hand(suite, suite_gaps(model, tokenizer, suite, suite.select("all")))
    plan = steer.compile(steer.parse_spec(str(out / "erasure.yaml")), model)
    after = spread_by_hand(suite, suite_gaps(model, tokenizer, suite, suite.select("all"), plan))
    assert after < 0.5 * before, (before, after)
    history = json.loads((out / "history.json").read_text())
    assert len(history["history"]) == 40 and history["history"][-1]["spread"] < history["history"][0]["spread"]

    # the same arguments give the same directions (seeded minibatches and start)
    assert main(argv[:-1] + [str(tmp_path / "again")]) == 0
    torch.testing.assert_close(load_file(str(tmp_path / "again" / "erasure.safetensors"))["u0"], tensors["u0"])


def test_a_target_without_a_correlate_or_a_keep_without_accuracy_is_one_line(tmp_path, capsys):
    _, _, model_dir = save_tiny("llama", tmp_path / "model")
    plain = tmp_path / "plain.yaml"
    plain.write_text(STEREOTYPE_SUITE.replace("  correlate: share\n  headline: stereotype\n  midpoint: 40\n", ""))
    (tmp_path / "stereo.yaml").write_text(STEREOTYPE_SUITE)
    capsys.readouterr()  # the tiny model's own save messages are not the command's
    for argv, what in (
        (["--suite", str(plain)], "needs a logprob_gap suite with `correlate:`"),
        (["--suite", str(tmp_path / "stereo.yaml"), "--keep", str(tmp_path / "stereo.yaml")], "needs an accuracy headline"),
        (["--suite", str(tmp_path / "stereo.yaml"), "--rank", "0"], "--rank, --steps and the --*-per-step sizes"),
        (["--suite", str(tmp_path / "stereo.yaml"), "--keep-per-step", "0"], "--rank, --steps and the --*-per-step"),
    ):
        assert main(["features", "erase", *argv, "--split", "all", "--model", model_dir, "--neutral", "none",
                     "--steps", "1", "-o", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err, err
        assert not (tmp_path / "x").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    assert main(["features", "erase", "--suite", str(tmp_path / "stereo.yaml"), "--model", model_dir, "-o", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and (taken / "mine.txt").read_text() == "keep me"


def test_learn_erasure_leaves_the_model_as_it_was(tiny):
    model, tokenizer = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    result = learn_erasure(model, tokenizer, [load_suite_text(STEREOTYPE_SUITE)], hold=[load_suite_text(EXPLICIT_SUITE)],
                           split="all", steps=2)
    assert all(r["hold"] >= 0 for r in result.history)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    ids = torch.tensor([[1, 10, 20]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model("llama")(ids).logits)  # no hook left behind


def test_the_gap_shift_of_a_held_suite_and_the_lean_are_measured_through_the_compiled_spec(tiny, tmp_path):
    """With a ``logprob_gap`` suite held, the first step's ``hold_gap`` is the mean over its prompts of
    (gap with the start's directions removed − gap without)², and with ``lean_weight`` its ``lean`` is the mean over
    templates of the squared shift of their mean gap; the edited gaps are measured here through steer's compiled
    `project_out ... site writers` spec instead of the fit's own hooks."""
    model, tokenizer = tiny
    q = orthonormal(1, seed=5)
    held = load_suite_text(STEREOTYPE_SUITE)
    result = learn_erasure(model, tokenizer, [load_suite_text(STEREOTYPE_SUITE)], hold=[held], split="all", steps=1,
                           init=q, hold_per_step=10_000, lean_weight=1.0, groups_per_step=100)
    save_file({"u0": q[:, 0].contiguous()}, str(tmp_path / "q.safetensors"))
    plan = steer.compile(f"project out direction {tmp_path}/q.safetensors:u0 site writers", model)
    prompts = held.select("all")
    base = np.array(suite_gaps(model, tokenizer, held, prompts))
    edited = np.array(suite_gaps(model, tokenizer, held, prompts, plan))
    expected = float(np.mean((edited - base) ** 2))
    assert expected > 1e-6  # the removal moves the gaps
    assert result.history[0]["hold_gap"] == pytest.approx(expected, rel=1e-4)
    # the lean: per template (a group of the fill's values), the squared shift of the mean gap, averaged
    by_template: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        (_, job, _), = p.data
        by_template.setdefault(p.text.replace(job, "<job>"), []).append(i)
    lean = np.mean([(edited[i].mean() - base[i].mean()) ** 2 for i in map(np.array, by_template.values())])
    assert lean > 1e-6 and result.history[0]["lean"] == pytest.approx(lean, rel=1e-4)
    assert "lean" not in learn_erasure(model, tokenizer, [held], split="all", steps=1, init=q).history[0]


def test_a_fit_continues_from_or_widens_a_previous_one(tiny, tmp_path, capsys):
    """``--init`` starts from a previous fit's directions: a near-zero learning rate leaves them where they were, and a
    higher rank keeps them in its span; a file with more directions than --rank, or not safetensors, is one line."""
    _, _, model_dir = save_tiny("llama", tmp_path / "model")
    (tmp_path / "stereo.yaml").write_text(STEREOTYPE_SUITE)
    q = orthonormal(2, seed=7)
    save_file({"u0": q[:, 0].contiguous(), "u1": q[:, 1].contiguous()}, str(tmp_path / "start.safetensors"))
    common = ["features", "erase", "--suite", str(tmp_path / "stereo.yaml"), "--split", "all", "--model", model_dir,
              "--neutral", "none", "--steps", "1", "--lr", "1e-7", "--init", str(tmp_path / "start.safetensors")]
    assert main(common + ["--rank", "2", "-o", str(tmp_path / "same")]) == 0
    got = load_file(str(tmp_path / "same" / "erasure.safetensors"))
    new = torch.stack([got["u0"], got["u1"]], dim=1)
    torch.testing.assert_close((new.T @ q).abs(), torch.eye(2), atol=1e-4, rtol=0)  # the same columns, up to sign

    assert main(common + ["--rank", "3", "-o", str(tmp_path / "wider")]) == 0
    got = load_file(str(tmp_path / "wider" / "erasure.safetensors"))
    wide = torch.stack([got[f"u{i}"] for i in range(3)], dim=1)
    inside = wide @ (wide.T @ q)  # q's columns projected onto the new span
    torch.testing.assert_close(inside, q, atol=1e-4, rtol=0)
    capsys.readouterr()

    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    for init, rank, what in ((tmp_path / "start.safetensors", "1", "more than --rank 1"),
                             (tmp_path / "junk.safetensors", "1", "cannot read direction file")):
        argv = [a if a != str(tmp_path / "start.safetensors") else str(init) for a in common]
        assert main(argv + ["--rank", rank, "-o", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err, err
        assert not (tmp_path / "x").exists()


SECOND_KEEP = EXPLICIT_SUITE.replace("name: tiny-explicit", "name: tiny-explicit-2").replace(
    "{who} is a {job}. Then", "When {who} met the {job},").replace("{who}, the {job}, knew", "{who}, a {job}, said")


def test_several_keep_suites_count_every_prompt_margin_on_its_own(tiny, tmp_path):
    """With two keep suites, the first step's ``shortfall`` is the mean over the prompts of *both* of
    relu(min(margin without, 3) − margin with the start's directions removed), each margin the gap signed toward the
    prompt's stated label, the edited gaps measured through steer's compiled `project_out ... site writers` spec. Per
    prompt: a prompt that gains pays for none that loses."""
    model, tokenizer = tiny
    q = orthonormal(1, seed=11)
    suites = [load_suite_text(EXPLICIT_SUITE), load_suite_text(SECOND_KEEP)]
    result = learn_erasure(model, tokenizer, [load_suite_text(STEREOTYPE_SUITE)], keep=suites, split="all", steps=1,
                           init=q, keep_per_step=10_000)
    save_file({"u0": q[:, 0].contiguous()}, str(tmp_path / "q.safetensors"))
    plan = steer.compile(f"project out direction {tmp_path}/q.safetensors:u0 site writers", model)
    losses, gained = [], 0
    for suite in suites:
        prompts = suite.select("all")
        sign = np.array([1.0 if p.expect == "male" else -1.0 for p in prompts])
        base = sign * np.array(suite_gaps(model, tokenizer, suite, prompts))
        edited = sign * np.array(suite_gaps(model, tokenizer, suite, prompts, plan))
        losses += list(np.maximum(np.minimum(base, 3.0) - edited, 0.0))
        gained += int((edited > base).sum())
    assert len(losses) == 32 and gained > 0 and max(losses) > 1e-6  # some prompts gain, some lose
    assert result.history[0]["shortfall"] == pytest.approx(float(np.mean(losses)), rel=1e-4)
    assert set(result.before) == {"tiny-gap", "tiny-explicit", "tiny-explicit-2"}
    # the one-suite form still works and counts only that suite
    one = learn_erasure(model, tokenizer, [load_suite_text(STEREOTYPE_SUITE)], keep=suites[0], split="all", steps=1,
                        init=q, keep_per_step=10_000)
    assert one.history[0]["shortfall"] == pytest.approx(float(np.mean(losses[:16])), rel=1e-4)


def test_keep_suites_that_share_a_name_each_keep_their_own_before_and_after_score(tiny):
    """Two keep suites named alike (different files) are scored apart: each label's `before` is that suite's own
    accuracy without the edit — the share of its prompts whose gap, signed toward the stated label, is > 0 (the
    shortfall over both suites' prompts is the test above)."""
    model, tokenizer = tiny
    q = orthonormal(1, seed=11)
    same_name = SECOND_KEEP.replace("name: tiny-explicit-2", "name: tiny-explicit")
    suites = [load_suite_text(EXPLICIT_SUITE, "a/keep.yaml"), load_suite_text(same_name, "b/keep.yaml")]
    result = learn_erasure(model, tokenizer, [load_suite_text(STEREOTYPE_SUITE)], keep=suites, split="all", steps=0,
                           init=q)
    assert set(result.before) == set(result.after) == {
        "tiny-gap", "tiny-explicit (a/keep.yaml)", "tiny-explicit (b/keep.yaml)"}
    for suite, label in zip(suites, ("tiny-explicit (a/keep.yaml)", "tiny-explicit (b/keep.yaml)")):
        prompts = suite.select("all")
        sign = np.array([1.0 if p.expect == "male" else -1.0 for p in prompts])
        toward = sign * np.array(suite_gaps(model, tokenizer, suite, prompts))
        assert result.before[label] == pytest.approx(float((toward > 0).mean()))
    assert result.before["tiny-explicit (a/keep.yaml)"] != result.before["tiny-explicit (b/keep.yaml)"]
    # the same file given twice still gets two labels
    twice = learn_erasure(model, tokenizer, [load_suite_text(STEREOTYPE_SUITE)], keep=[suites[0], suites[0]],
                          split="all", steps=0, init=q)
    assert len(twice.before) == 3


def test_the_output_records_every_setting_the_fit_was_run_with(tmp_path, capsys):
    """A fit can be rerun from its file alone: the safetensors metadata and the spec's header carry the learning
    rate, every weight and the minibatch sizes given on the command line."""
    from safetensors import safe_open

    _, _, model_dir = save_tiny("llama", tmp_path / "model")
    (tmp_path / "stereo.yaml").write_text(STEREOTYPE_SUITE)
    (tmp_path / "explicit.yaml").write_text(EXPLICIT_SUITE)
    given = {"--lr": "0.05", "--keep-weight": "2.5", "--kl-weight": "7.0", "--hold-weight": "3.0",
             "--lean-weight": "0.5", "--groups-per-step": "2", "--keep-per-step": "5", "--hold-per-step": "6",
             "--seed": "9", "--average-last": "2", "--fraction": "1.5"}
    argv = ["features", "erase", "--suite", str(tmp_path / "stereo.yaml"), "--keep", str(tmp_path / "explicit.yaml"),
            "--split", "all", "--model", model_dir, "--steps", "2", "--neutral", "none", "-o", str(tmp_path / "out"),
            *[x for pair in given.items() for x in pair]]
    assert main(argv) == 0, capsys.readouterr().err
    with safe_open(str(tmp_path / "out" / "erasure.safetensors"), "pt") as f:
        metadata = f.metadata()
    header = (tmp_path / "out" / "erasure.yaml").read_text().splitlines()[:2]
    for flag, value in given.items():
        key = flag[2:].replace("-", "_")
        assert metadata[key] == value, (key, metadata)
        assert f"{key} {value}" in " ".join(header) or key == "seed", header
    assert metadata["neutral"] == "none" and "seed 9" in header[0]
    written = steer.parse_spec(str(tmp_path / "out" / "erasure.yaml"))
    assert [(e.op, e.amount) for e in written.edits] == [("project_out", 1.5)]  # the spec removes what was fitted


def test_a_fit_at_a_fraction_measures_its_objective_with_that_much_removed(tiny, tmp_path):
    """``fraction=1.5``: the first step's spread is the fill's variance with 150% of the starting direction's
    component taken out of every write, as steer's compiled ``project out ... by 150%`` spec gives it (scored here
    by hand), not with 100% taken out."""
    model, tokenizer = tiny
    suite = load_suite_text(STEREOTYPE_SUITE)
    u = orthonormal(1, seed=5)
    save_file({"u0": u[:, 0].contiguous()}, str(tmp_path / "u.safetensors"))
    spreads = {}
    for fraction in (1.0, 1.5):
        fit = learn_erasure(model, tokenizer, [suite], split="all", steps=1, lr=1e-9, groups_per_step=8,
                            init=u, fraction=fraction)
        spreads[fraction] = fit.history[0]["spread"]
        plan = steer.compile(f"project out direction {tmp_path}/u.safetensors:u0 by {fraction * 100:g}% site writers",
                             model)
        by_hand = spread_by_hand(suite, suite_gaps(model, tokenizer, suite, suite.select("all"), plan))
        assert spreads[fraction] == pytest.approx(by_hand, rel=1e-4), fraction
    assert abs(spreads[1.5] - spreads[1.0]) > 1e-3 * spreads[1.0]  # the fraction changes what is measured


def test_the_command_line_defaults_are_learn_erasures():
    """`steer features erase` writes its defaults into --help (so they are spelled out there, not imported with
    torch); each must be the keyword default of `learn_erasure`, or the CLI and the Python API fit different
    things from the same call."""
    import inspect

    from steer.cli.main import build_parser

    # the required options only: every other value in the namespace is the CLI's default
    cli = vars(build_parser().parse_args(["features", "erase", "--suite", "s.yaml", "-o", "out"]))
    api = {k: p.default for k, p in inspect.signature(learn_erasure).parameters.items()
           if p.default is not inspect.Parameter.empty}
    # keep, hold, neutral and init are read from files or names first, so their CLI forms differ by design
    shared = sorted(set(cli) & set(api) - {"keep", "hold", "neutral", "init"})
    assert shared == sorted({"rank", "steps", "lr", "keep_weight", "kl_weight", "hold_weight", "lean_weight",
                             "seed", "groups_per_step", "keep_per_step", "hold_per_step", "split",
                             "average_last", "fraction"}), shared
    assert {k: cli[k] for k in shared} == {k: api[k] for k in shared}


def test_averaging_the_last_steps_returns_the_mean_of_their_projectors(tiny):
    """``average_last=2`` returns the leading eigenvector of the mean of the last two steps' projectors; for two unit
    vectors a, b that is (a + s·b)/|a + s·b|, s the sign of a·b (written out here), taken from two plain fits of one
    and of two steps (same seed: the same trajectory). ``average_last=1`` is the plain fit, and more steps averaged
    than run is an error."""
    model, tokenizer = tiny
    suite = load_suite_text(STEREOTYPE_SUITE)
    kwargs = dict(split="all", rank=1, lr=0.3, seed=5)
    a = learn_erasure(model, tokenizer, [suite], steps=1, **kwargs).directions[:, 0]
    b = learn_erasure(model, tokenizer, [suite], steps=2, **kwargs).directions[:, 0]
    assert abs(float(a @ b)) < 0.999  # the second step moved the direction, so the average differs from both
    s = 1.0 if float(a @ b) >= 0 else -1.0
    mean = (a + s * b) / (a + s * b).norm()
    got = learn_erasure(model, tokenizer, [suite], steps=2, average_last=2, **kwargs).directions[:, 0]
    torch.testing.assert_close(got * torch.sign(got @ mean), mean, atol=1e-5, rtol=0)
    last = learn_erasure(model, tokenizer, [suite], steps=2, average_last=1, **kwargs).directions[:, 0]
    torch.testing.assert_close(last, b, atol=1e-5, rtol=0)  # signed like the last step's direction
    with pytest.raises(SteerError, match="average_last"):
        learn_erasure(model, tokenizer, [suite], steps=2, average_last=3, **kwargs)
