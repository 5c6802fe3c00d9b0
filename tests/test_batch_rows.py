"""Sweeps, tuning and evaluation with several plans as rows of one batch (issue 14, item 3).

The reference is the point-by-point path (``batch_rows=0``: each plan's model alone, 64 prompts / 4 neutral rows a
pass, as before rows). Batched runs must give the same reports — every suite's per-prompt values, generated outputs,
score and extras, and KL (mean, max), top-1 agreement and perplexity on neutral text — within float tolerance, for
logprob and generation suites, plans on different sites with ``scope: generation`` edits, a chunking that splits both
the plans and the prompts of a suite (``batch_rows`` 7), and the default model. The tiny models run in float64, so
the tolerance is tight (the batch's other rows change a row's float32 results by ~1e-6 at most on the default model).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import steer
from steer.cli.main import main
from steer.evaluate.constraints import parse_constraint
from steer.evaluate.report import evaluate, evaluate_many, measure_baseline
from steer.evaluate.suites import load_suite, load_suite_text
from steer.evaluate.sweep import parse_param, run_sweep
from steer.evaluate.tune import parse_range, tune
from steer.sae import save_sae
from steer.spec import load_spec_file
from tests.conftest import D, random_sae, save_tiny, tiny_model, tiny_tokenizer
from tests.test_evaluate import EXPLICIT_SUITE, GAP_SUITE

KEYWORD_SUITE = """\
name: tiny-kw
prefix: "Q: sky. A: blue. Q: grass. A: green. "
scoring: {rule: keyword_rate, keywords: [a, e], max_new_tokens: 6}
prompts: ["Q: sea. A:", "Q: sun. A:", "Q: a big tree. A:", "Q: snow. A:", "Q: x. A:"]
"""
EXACT_SUITE = """\
name: tiny-em
scoring: {rule: exact_match, max_new_tokens: 5}
prompts:
  - {text: "Q: one. A:", answer: a}
  - {text: "Q: two. A:", answer: b}
  - {text: "Q: three, then four. A:", answer: c}
"""


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch_rows") / "dirs.safetensors"
    g = torch.Generator().manual_seed(7)
    save_file({"u": torch.randn(D, generator=g)}, str(path))
    return path


def suites():
    return [load_suite_text(text, name) for text, name in
            ((GAP_SUITE, "gap.yaml"), (KEYWORD_SUITE, "kw.yaml"), (EXACT_SUITE, "em.yaml"))]


def assert_reports_equal(batched, alone, *, rel, abs_):
    assert len(batched) == len(alone)
    for b, a in zip(batched, alone):
        assert b.subject == a.subject
        for key in ("kl_mean", "kl_max", "top1", "ppl_base", "ppl_steered", "predictions"):
            assert getattr(b.neutral, key) == pytest.approx(getattr(a.neutral, key), rel=rel, abs=abs_), (a.subject, key)
        for sb, sa in zip(b.suites, a.suites):
            assert sb.name == sa.name
            for side in ("base", "steered"):
                rb, ra = getattr(sb, side), getattr(sa, side)
                assert rb.outputs == ra.outputs, (a.subject, sa.name, side)
                assert rb.values == pytest.approx(ra.values, rel=rel, abs=abs_), (a.subject, sa.name, side)
                assert rb.score == pytest.approx(ra.score, rel=rel, abs=abs_)
                assert rb.extras.keys() == ra.extras.keys()
                for key in ra.extras:
                    assert rb.extras[key] == pytest.approx(ra.extras[key], rel=rel, abs=abs_), (a.subject, key)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_sweep_as_rows_equals_point_by_point(arch, dirs):
    """6 points (a feature edit's factor × the site of a `scope: generation` direction edit), a logprob suite and two
    generation suites (one with a shared few-shot prefix): batched (default rows, and 7 rows a pass: plans and
    prompts both chunked) equals point by point."""
    model, tokenizer = tiny_model(arch).double(), tiny_tokenizer()
    sae = random_sae(site="resid_post.1")
    spec = steer.parse_spec(f"suppress feature 3 by 50%; add direction {dirs}:u by 3 site resid_post.0 scope generation",
                            site="resid_post.1")
    params = [parse_param("edits[0].factor=0,0.5,1"), parse_param("edits[1].site=resid_post.0,resid_post.2")]
    runs = {rows: run_sweep(spec, model, tokenizer, params, suites(), split="all", sae=sae, neutral="calibration",
                            neutral_tokens=384, progress=False, batch_rows=rows) for rows in (0, 256, 7)}
    alone = runs[0]
    assert len(alone.reports) == 6 and any(r.neutral.kl_mean > 1e-3 for r in alone.reports)
    assert any(s.steered.outputs != s.base.outputs for r in alone.reports for s in r.suites[1:])  # edits show
    for rows in (256, 7):
        assert_reports_equal(runs[rows].reports, alone.reports, rel=1e-9, abs_=1e-9)
        assert runs[rows].front == alone.front


def test_evaluate_with_rows_equals_one_model_at_a_time(dirs):
    model, tokenizer = tiny_model("llama").double(), tiny_tokenizer()
    plan = steer.compile(f"add direction {dirs}:u by 2 site resid_post.1 scope generation; suppress feature 4 by 90%",
                         model, random_sae(site="resid_post.1"))
    reports = []
    for rows in (0, 5):
        baseline = measure_baseline(model, tokenizer, neutral="calibration", neutral_tokens=384)
        reports.append(evaluate(plan, model, tokenizer, suites(), baseline=baseline, batch_rows=rows))
    assert_reports_equal([reports[1]], [reports[0]], rel=1e-9, abs_=1e-9)


def test_a_plan_that_changes_nothing_reads_exactly_the_base_in_any_batch(dirs):
    """Scale by 1, add 0, project out 0 % (each alone, and all together) are the unedited model: batched with real
    edits, chunked 5 rows a pass, their reports read exactly 0 KL, top-1 1, the base's perplexity and the base's
    suite results — not ~1e-9 from running as rows of other shapes. Clamp, cap and any other amount are not
    identities (their deltas depend on the input) and are run."""
    model, tokenizer = tiny_model("llama").double(), tiny_tokenizer()
    sae = random_sae(site="resid_post.1")
    texts = {"scale by 1": "scale feature 3 by 1", "add 0": f"add direction {dirs}:u by 0",
             "project out 0": f"project out direction {dirs}:u by 0%",
             "all three": f"scale feature 3 by 1; add direction {dirs}:u by 0; project out direction {dirs}:u by 0%",
             "scale by 0.5": "scale feature 3 by 0.5", "clamp to 0": "clamp feature 3 to 0",
             "cap at 0": f"cap direction {dirs}:u at 0"}
    plans = {name: steer.compile(steer.parse_spec(text, site="resid_post.1"), model, sae) for name, text in texts.items()}
    identities = {"scale by 1", "add 0", "project out 0", "all three"}
    assert {name for name, plan in plans.items() if plan.changes_nothing} == identities
    baseline = measure_baseline(model, tokenizer, neutral="calibration", neutral_tokens=384)
    reports = evaluate_many(list(plans.values()), model, tokenizer, suites(), baseline=baseline, split="all",
                            batch_rows=5)
    for name, report in zip(plans, reports):
        n = report.neutral
        if name in identities:
            assert (n.kl_mean, n.kl_max, n.top1, n.ppl_steered) == (0.0, 0.0, 1.0, n.ppl_base), name
            for s in report.suites:
                assert s.steered.values == s.base.values and s.steered.outputs == s.base.outputs, (name, s.name)
                assert s.steered.score == s.base.score, (name, s.name)
        else:
            assert n.kl_mean > 1e-6, name  # run for real: each moves the neutral text
    calls = []  # the base's numbers are now all in the baseline: identity plans run no forward pass at all
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        again = evaluate_many([plans[name] for name in sorted(identities)] + [None], model, tokenizer, suites(),
                              baseline=baseline, split="all", batch_rows=5)
    finally:
        handle.remove()
    assert calls == [] and all(r.neutral.kl_mean == 0.0 for r in again)


def test_default_model_sweep_as_rows_equals_point_by_point(default_model):
    """The weddings edit over 3 strengths on the default model (float32): part of gender-occupation (logprob
    stereotype) and of capability (3-shot prefix, greedy exact match), neutral text KL — batched equals point by
    point within float32 tolerance, generated answers identical."""
    model, tokenizer = default_model
    gender, capability = load_suite("gender-occupation"), load_suite("capability")
    picked = [dataclasses.replace(gender, prompts=gender.select("dev")[::4]),
              dataclasses.replace(capability, prompts=capability.prompts[:6])]
    spec = load_spec_file("edits/weddings.yaml")
    params = [parse_param("edits[0].strength=0,0.3,0.8")]
    runs = {rows: run_sweep(spec, model, tokenizer, params, picked, split="all", neutral_tokens=256, progress=False,
                            batch_rows=rows) for rows in (0, 256)}
    assert runs[0].reports[-1].neutral.kl_mean > 0.01  # the strongest point moves the model
    assert runs[0].reports[0].neutral.kl_mean == pytest.approx(0.0, abs=1e-5)  # strength 0 changes nothing
    assert_reports_equal(runs[256].reports, runs[0].reports, rel=1e-4, abs_=2e-5)


def test_batched_tune_is_seeded_and_starts_with_sequential_tpes_trials(tmp_path):
    """--batch-trials 3: the first 10 trials (TPE's random start-up) are sequential TPE's, same params and (within
    float tolerance) same numbers; the whole run is the same twice under one seed."""
    model, tokenizer = tiny_model("llama").double(), tiny_tokenizer()
    sae = random_sae(site="resid_post.1")
    spec = steer.parse_spec("suppress feature 3 by 50%", site="resid_post.1")
    gap = load_suite_text(GAP_SUITE, "gap.yaml")
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(textwrap.dedent(EXPLICIT_SUITE))
    kept = [parse_constraint(f"{explicit}>=90%")]

    def run(batch_trials, batch_rows=256):
        return tune(spec, model, tokenizer, gap, trials=14, ranges=[parse_range("edits[0].factor=0:1")],
                    candidates={None: (3, 7, 11)}, max_kl=10, seed=3, sae=sae, neutral="calibration",
                    neutral_tokens=256, constraints=kept, progress=False, batch_trials=batch_trials,
                    batch_rows=batch_rows)

    sequential, batched, again = run(1, 0), run(3), run(3)
    assert [t.params for t in batched.trials] == [t.params for t in again.trials]
    assert [(t.score, t.kl, t.kept) for t in batched.trials] == [(t.score, t.kl, t.kept) for t in again.trials]
    assert [t.params for t in batched.trials[:10]] == [t.params for t in sequential.trials[:10]]
    assert any(t.spec is None for t in sequential.trials)  # a trial with no candidate: the unedited model
    for b, s in zip(batched.trials[:10], sequential.trials[:10]):
        assert (b.score, b.kl) == pytest.approx((s.score, s.kl), rel=1e-9, abs=1e-9)
        assert b.kept == pytest.approx(s.kept, rel=1e-9, abs=1e-9) and b.violations == pytest.approx(s.violations)
    assert len(batched.trials) == 14 and [t.number for t in batched.trials] == list(range(14))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_rows_cli")
    model, tokenizer, directory = save_tiny("llama", root / "model")
    sae_dir = save_sae(random_sae(site="resid_post.1"), root / "sae")
    spec = root / "spec.yaml"
    spec.write_text(f"model: {directory}\nsae: {sae_dir}\nsite: resid_post.1\nedits:\n  - suppress: 3\n    by: 50%\n")
    gap = root / "gap.yaml"
    gap.write_text(GAP_SUITE)
    return spec, gap, root


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sweep_and_eval_cli_take_batch_rows(saved, capsys):
    spec, gap, root = saved
    rows = {}
    for n in ("0", "5"):
        out = root / f"sweep{n}"
        code, _, err = cli(capsys, "sweep", str(spec), "--param", "edits[0].factor=0:1:0.5", "--suite", str(gap),
                           "--neutral", "calibration", "--neutral-tokens", "256", "-o", str(out), "--no-progress",
                           "--batch-rows", n)
        assert code == 0, err
        rows[n] = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows["0"]) == 3
    for a, b in zip(rows["0"], rows["5"]):
        assert a.keys() == b.keys()
        for key in a:  # float32: a change in % of ~1e-7 relative noise reads ~1e-5
            tolerance = 1e-3 if key.endswith("change_pct") else 1e-5
            assert float(a[key] or 0) == pytest.approx(float(b[key] or 0), rel=1e-4, abs=tolerance), key
    reports = []
    for n in ("0", "3"):
        code, _, err = cli(capsys, "eval", str(spec), "--suite", str(gap), "--neutral", "calibration",
                           "--neutral-tokens", "256", "--batch-rows", n, "--json", str(root / f"e{n}.json"))
        assert code == 0, err
        reports.append(json.loads((root / f"e{n}.json").read_text()))
    assert reports[0]["neutral"]["kl_mean"] == pytest.approx(reports[1]["neutral"]["kl_mean"], rel=1e-4)
    assert reports[0]["suites"][0]["steered"]["score"] == pytest.approx(reports[1]["suites"][0]["steered"]["score"],
                                                                        rel=1e-4)


@pytest.mark.parametrize("argv, what", [
    (["sweep", "S", "--param", "edits[0].factor=0,1", "--suite", "age", "-o", "x", "--batch-rows", "-1"], "--batch-rows"),
    (["eval", "S", "--batch-rows", "many"], "--batch-rows"),
    (["tune", "S", "--suite", "age", "--trials", "3", "--batch-trials", "0"], "--batch-trials"),
])
def test_bad_batch_options_are_usage_errors(capsys, argv, what):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and what in capsys.readouterr().err
