"""Behaviour suites, `steer eval`, `steer sweep`, `steer tune` (steer.evaluate).

Scores are checked against references computed here, independently of the
batched code under test: each prompt run alone and unpadded through the model
(under `steer.applied` for the steered side), the log-softmax / KL / perplexity
formulas written out, greedy continuations from `model.generate` one prompt at
a time. Tiny random models with the character-level tiny tokenizer (each
character one token); one test on the real default model.
"""

from __future__ import annotations

import csv
import json
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import steer
from steer.cli.main import main
from steer.evaluate.report import evaluate, neutral_text
from steer.evaluate.scoring import answer_matches, normalise, run_prompts, score_suite
from steer.evaluate.suites import load_suite, load_suite_text, shipped_suites
from steer.sae import save_sae
from steer.verify.fidelity import calibration_texts
from tests.conftest import TINY_ARCHS, random_sae, save_tiny, tiny_model, tiny_tokenizer

GAP_SUITE = """\
name: tiny-gap
scoring:
  rule: logprob_gap
  a: ["h", "H"]
  b: ["s"]
  correlate: share
templates:
  - {text: "The {job} said that", split: dev}
  - {text: "Then the {job} knew", split: held_out}
fill:
  job:
    - {value: cook, share: 10, split: dev}
    - {value: pilot, share: 40, split: held_out}
    - {value: nurse, share: 90, split: dev}
    - {value: clerk, share: 60, split: held_out}
    - {value: judge, share: 25, split: dev}
"""


@pytest.fixture(scope="module")
def tiny():
    """A tiny llama saved as a checkpoint, its tokenizer, and an SAE saved beside it."""
    return tiny_model("llama"), tiny_tokenizer()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    model, tokenizer, directory = save_tiny("llama", root / "model")
    sae_dir = save_sae(random_sae(site="resid_post.1"), root / "sae")
    return model, tokenizer, directory, sae_dir, root


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def alone_logprobs(model, tokenizer, text, plan=None):
    """The next-token log-softmax for one prompt, unpadded, on its own."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        if plan is None:
            logits = model(ids).logits[0, -1]
        else:
            with steer.applied(model, plan):
                logits = model(ids).logits[0, -1]
    return torch.log_softmax(logits.double(), -1)


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- scoring rules against hand-computed values ---------------------------------


@pytest.mark.parametrize("steered", [False, True])
def test_logprob_gap_equals_log_softmax_formula_per_prompt(tiny, steered):
    model, tokenizer = tiny
    suite = load_suite_text(GAP_SUITE, "tiny-gap.yaml")
    plan = None if not steered else steer.compile(
        steer.parse_spec("suppress feature 3 by 80%; add feature 5 by 2", site="resid_post.1"), model, random_sae())
    result = score_suite(model, tokenizer, suite, plan)
    h, H, s = (tokenizer.convert_tokens_to_ids(c) for c in "hHs")
    expected = []
    for text in result.prompts:
        lp = alone_logprobs(model, tokenizer, text, plan)
        p = lp.exp()
        expected.append(math.log(float(p[h] + p[H])) - math.log(float(p[s])))
    assert len(expected) == 10
    np.testing.assert_allclose(result.values, expected, atol=2e-5)
    assert result.score == pytest.approx(np.mean(np.abs(expected)), abs=2e-5)
    assert result.extras["signed"] == pytest.approx(np.mean(expected), abs=2e-5)
    # Pearson r of each job's mean gap (over its templates) with its share, by numpy
    shares = {"cook": 10, "pilot": 40, "nurse": 90, "clerk": 60, "judge": 25}
    means = {job: np.mean([g for t, g in zip(result.prompts, expected) if f" {job} " in t]) for job in shares}
    r = np.corrcoef([shares[j] for j in shares], [means[j] for j in shares])[0, 1]
    assert result.extras["r_share"] == pytest.approx(r, abs=1e-4)


@pytest.mark.parametrize("steered", [False, True])
def test_stereotype_headline_is_the_occupation_effect_apart_from_the_lean(tiny, steered):
    """headline: stereotype = mean over jobs with share < midpoint of their mean gap minus that over jobs with
    share > midpoint (a job at exactly the midpoint counts in neither); the slope is least squares on the job means,
    per 100 of share. Computed here from each prompt run alone."""
    model, tokenizer = tiny
    text = GAP_SUITE.replace("  correlate: share\n", "  correlate: share\n  headline: stereotype\n  midpoint: 40\n")
    suite = load_suite_text(text, "tiny-stereotype.yaml")
    plan = None if not steered else steer.compile(
        steer.parse_spec("suppress feature 3 by 80%; add feature 5 by 2", site="resid_post.1"), model, random_sae())
    result = score_suite(model, tokenizer, suite, plan)
    h, H, s = (tokenizer.convert_tokens_to_ids(c) for c in "hHs")
    gap = {}
    for prompt in result.prompts:
        p = alone_logprobs(model, tokenizer, prompt, plan).exp()
        gap[prompt] = math.log(float(p[h] + p[H])) - math.log(float(p[s]))
    share = {"cook": 10, "pilot": 40, "nurse": 90, "clerk": 60, "judge": 25}
    job_mean = {j: np.mean([g for t, g in gap.items() if f" {j} " in t]) for j in share}
    low = np.mean([job_mean["cook"], job_mean["judge"]])  # shares 10, 25 (pilot at 40 is the midpoint: neither)
    high = np.mean([job_mean["nurse"], job_mean["clerk"]])  # 90, 60
    assert result.headline == "stereotype" and result.better == "lower"
    assert result.extras["stereotype"] == pytest.approx(low - high, abs=2e-5)
    assert result.score == pytest.approx(abs(low - high), abs=2e-5)
    slope = np.polyfit([share[j] for j in share], [job_mean[j] for j in share], 1)[0]
    assert result.extras["slope_share"] == pytest.approx(100 * slope, abs=1e-4)
    assert result.extras["signed"] == pytest.approx(np.mean(list(gap.values())), abs=2e-5)
    assert result.extras["mean_abs"] == pytest.approx(np.mean(np.abs(list(gap.values()))), abs=2e-5)
    # a constant lean added to every gap leaves the stereotype unchanged: it is what the occupation adds
    assert "stereotype" in result.meaning


EXPLICIT_SUITE = """\
name: tiny-explicit
scoring:
  rule: logprob_gap
  a: ["h", "H"]
  b: ["s"]
  labels: [male, female]
  headline: accuracy
templates:
  - {text: "{who} is a {job}. Then", split: dev}
  - {text: "{who}, the {job}, knew", split: held_out}
fill:
  who:
    - {value: "Ma", expect: male, split: dev}
    - {value: "Sis", expect: female, split: dev}
    - {value: "Bo", expect: male, split: held_out}
    - {value: "Eve", expect: female, split: held_out}
  job: [cook, nurse]
"""


@pytest.mark.parametrize("steered", [False, True])
def test_accuracy_headline_counts_prompts_where_the_stated_gender_wins(tiny, steered):
    """headline: accuracy = share of prompts whose expected set has the higher summed probability; margin = the gap
    signed toward the expected set; accuracy per label over its prompts. Computed here from each prompt alone."""
    model, tokenizer = tiny
    suite = load_suite_text(EXPLICIT_SUITE, "tiny-explicit.yaml")
    plan = None if not steered else steer.compile(
        steer.parse_spec("suppress feature 3 by 80%; add feature 5 by 2", site="resid_post.1"), model, random_sae())
    result = score_suite(model, tokenizer, suite, plan)
    assert len(result.prompts) == 16 and result.better == "higher"
    h, H, s = (tokenizer.convert_tokens_to_ids(c) for c in "hHs")
    male_names = ("Ma", "Bo")
    toward, by_label = [], {"male": [], "female": []}
    for prompt in result.prompts:
        p = alone_logprobs(model, tokenizer, prompt, plan).exp()
        gap = math.log(float(p[h] + p[H])) - math.log(float(p[s]))
        label = "male" if prompt.startswith(male_names) else "female"
        t = gap if label == "male" else -gap
        toward.append(t)
        by_label[label].append(t > 0)
    assert result.score == pytest.approx(np.mean([t > 0 for t in toward]))
    assert result.extras["margin"] == pytest.approx(np.mean(toward), abs=2e-5)
    assert result.extras["accuracy_male"] == pytest.approx(np.mean(by_label["male"]))
    assert result.extras["accuracy_female"] == pytest.approx(np.mean(by_label["female"]))
    assert {p.text for p in suite.select("held_out")} == {f"{w}, the {j}, knew" for w in ("Bo", "Eve")
                                                           for j in ("cook", "nurse")}


@pytest.mark.parametrize("text, message", [
    (EXPLICIT_SUITE.replace('expect: male, split: dev}', 'expect: boy, split: dev}'), "`expect` must be male or female"),
    (EXPLICIT_SUITE.replace('    - {value: "Ma", expect: male, split: dev}\n', '    - {value: "Ma", split: dev}\n'),
     "needs `expect` on every prompt"),
    (GAP_SUITE.replace("  correlate: share\n", "  correlate: share\n  headline: stereotype\n"), "needs `midpoint`"),
    (GAP_SUITE.replace("  correlate: share\n", "  correlate: share\n  headline: stereotype\n  midpoint: 95\n"),
     "both sides"),
    (GAP_SUITE.replace("  correlate: share\n", "  headline: stereotype\n  midpoint: 50\n"), "needs `correlate"),
    (GAP_SUITE.replace("  correlate: share\n", "  correlate: share\n  headline: loud\n"), "unknown headline"),
])
def test_headline_mistakes_are_one_line_errors(text, message):
    from steer.evaluate.suites import SuiteError

    with pytest.raises(SuiteError, match=message):
        load_suite_text(text, "bad.yaml")


def test_constraints_parse_and_judge_reports_by_their_formula(tiny):
    """`--keep` bounds: relative suite bounds against the base score, absolute ones, kl and ppl; the violation
    is by how much the measured value misses the bound."""
    from steer.evaluate.constraints import parse_constraint

    model, tokenizer = tiny
    plan = steer.compile(steer.parse_spec("add feature 5 by 3", site="resid_post.1"), model, random_sae())
    suite = load_suite_text(EXPLICIT_SUITE, "tiny-explicit.yaml")
    report = evaluate(plan, model, tokenizer, [suite], neutral="calibration", neutral_tokens=256)
    base, steered = report.suite("tiny-explicit").base.score, report.suite("tiny-explicit").steered.score
    keep = parse_constraint("tiny-explicit >= 95%")
    assert keep.relative and keep.bound(report) == pytest.approx(0.95 * base)
    assert keep.violation(report) == pytest.approx(max(0.0, 0.95 * base - steered))
    absolute = parse_constraint("tiny-explicit<=0.25")
    assert absolute.violation(report) == pytest.approx(max(0.0, steered - 0.25))
    kl = parse_constraint("kl<=0.001")
    assert kl.violation(report) == pytest.approx(max(0.0, report.neutral.kl_mean - 0.001))
    ppl = parse_constraint("ppl≤3%")
    assert ppl.violation(report) == pytest.approx(max(0.0, report.neutral.ppl_change_pct - 3))
    # SUITE:KEY bounds one secondary number (accuracy_female is checked against each prompt alone above)
    base_f, steered_f = (r.extras["accuracy_female"] for r in (report.suite("tiny-explicit").base,
                                                               report.suite("tiny-explicit").steered))
    side = parse_constraint("tiny-explicit:accuracy_female>=95%")
    assert (side.name, side.key, side.relative) == ("tiny-explicit", "accuracy_female", True)
    assert side.bound(report) == pytest.approx(0.95 * base_f)
    assert side.violation(report) == pytest.approx(max(0.0, 0.95 * base_f - steered_f))
    lean = parse_constraint("tiny-explicit:signed<=-0.5")
    assert lean.violation(report) == pytest.approx(max(0.0, report.suite("tiny-explicit").steered.extras["signed"] + 0.5))
    assert str(side) == "tiny-explicit:accuracy_female>=95%"
    for bad in ("kl>=0.1", "gender", "x>=abc", "ppl>=2%", "kl:x<=1", ":margin>=1", "tiny-explicit:>=1"):
        with pytest.raises(steer.SteerError):
            parse_constraint(bad)


def test_secondary_number_bounds_name_keys_the_suite_reports(tiny):
    """`extra_names` lists exactly the secondary numbers a scored suite carries, for each headline; a bound on a key
    the suite does not report is one error naming the ones it does, before anything is evaluated."""
    from steer.evaluate.constraints import parse_constraint, resolve
    from steer.evaluate.scoring import extra_names

    model, tokenizer = tiny
    texts = {"mean_abs": GAP_SUITE, "accuracy": EXPLICIT_SUITE,
             "stereotype": GAP_SUITE.replace("  correlate: share\n", "  correlate: share\n  headline: stereotype\n"
                                             "  midpoint: 40\n")}
    for headline, text in texts.items():
        suite = load_suite_text(text, f"{headline}.yaml")
        assert set(extra_names(suite)) == set(score_suite(model, tokenizer, suite).extras), headline
    explicit = load_suite_text(EXPLICIT_SUITE, "tiny-explicit.yaml")
    assert resolve([parse_constraint("tiny-explicit.yaml:accuracy_male>=90%")], [explicit], "--keep")[0].name == \
        "tiny-explicit"
    with pytest.raises(steer.SteerError, match="no secondary number 'stereotype'.*accuracy_female"):
        resolve([parse_constraint("tiny-explicit:stereotype<=1")], [explicit], "--keep")


def test_splits_hold_out_templates_and_fill_values_together(tiny):
    model, tokenizer = tiny
    suite = load_suite_text(GAP_SUITE, "tiny-gap.yaml")
    dev = {p.text for p in suite.select("dev")}
    held = {p.text for p in suite.select("held_out")}
    assert dev == {f"The {j} said that" for j in ("cook", "nurse", "judge")}
    assert held == {f"Then the {j} knew" for j in ("pilot", "clerk")}
    assert len(suite.select("all")) == 10
    result = score_suite(model, tokenizer, suite, split="held_out")
    assert set(result.prompts) == held


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_shared_prefix_batches_equal_each_prompt_alone_with_generate(arch):
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    texts = ["Q: two. A: the cat", "Q: two. A: dogs", "Q: two. A: a longer answer here", "Q: zz"]
    logprobs, generated = run_prompts(model, tokenizer, texts, new_tokens=6)
    for i, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        ref = ref[:ref.index(2)] if 2 in ref else ref  # stops at EOS (id 2)
        assert generated[i] == ref
        torch.testing.assert_close(logprobs[i].double(), alone_logprobs(model, tokenizer, text), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("scope", ["all", "generation", "prompt"])
def test_steered_greedy_batches_equal_steer_generate_one_prompt_at_a_time(tiny, scope):
    from steer.generate import Sampling, generate

    model, tokenizer = tiny
    plan = steer.compile(steer.parse_spec(f"add feature 5 by 4 scope {scope}; suppress feature 2 by 90%",
                                          site="resid_post.1"), model, random_sae())
    texts = ["Q: one. A: the", "Q: one. A: a big", "Q: one. A:"]
    _, generated = run_prompts(model, tokenizer, texts, plan, new_tokens=6)
    for text, tokens in zip(texts, generated):
        alone = generate(model, tokenizer, [text], plan, Sampling(max_new_tokens=6), chat=False)[0]
        assert tokenizer.decode(tokens, skip_special_tokens=True) == alone


def test_keyword_rate_and_exact_match_score_greedy_outputs(tiny, tmp_path):
    model, tokenizer = tiny
    prompts = ["Q: red. A:", "Q: blue. A:", "Q: green. A:", "Q: gold. A:"]
    outputs = []
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    words = [re.findall(r"[A-Za-z0-9]+", o) for o in outputs]
    keyword = next(w[0] for w in words if w)
    expected_rate = np.mean([keyword.lower() in [x.lower() for x in w] for w in words])
    first = next(i for i, w in enumerate(words) if w and outputs[i].strip().lower().startswith(w[0].lower()))
    keyword_yaml = write(tmp_path / "kw.yaml", f"""\
        name: kw
        scoring: {{rule: keyword_rate, keywords: [{keyword!r}], max_new_tokens: 8}}
        prompts: {json.dumps(prompts)}
        """)
    kw = score_suite(model, tokenizer, load_suite(keyword_yaml))
    assert list(kw.outputs) == outputs
    assert kw.score == pytest.approx(expected_rate)
    items = [{"text": p, "answer": words[first][0] if i == first else "qqqqqqqq"} for i, p in enumerate(prompts)]
    exact_yaml = write(tmp_path / "em.yaml", f"""\
        name: em
        scoring: {{rule: exact_match, max_new_tokens: 8}}
        prompts: {json.dumps(items)}
        """)
    em = score_suite(model, tokenizer, load_suite(exact_yaml))
    assert em.values == tuple(float(i == first) for i in range(4))
    assert em.score == 0.25


def test_answer_normalisation_and_matching_by_hand():
    assert normalise("  The  Pacific Ocean! ") == "pacific ocean"
    assert normalise("H₂O") == "h2o"  # NFKC folds the subscript
    assert answer_matches(" Paris.\n\nQ: next", ("Paris",), "prefix")
    assert answer_matches(" paris is the capital", ("Paris",), "prefix")
    assert not answer_matches(" Parisian", ("Paris",), "prefix")  # whole words only
    assert not answer_matches(" paris is", ("Paris",), "equals")
    assert answer_matches(" William Shakespeare", ("Shakespeare", "William Shakespeare"), "equals")
    assert answer_matches("\n Paris\nQ:", ("Paris",), "equals")  # leading blank lines are skipped


# -- side effects on neutral text --------------------------------------------------


def test_identity_edit_gives_zero_kl_zero_ppl_change_and_equal_scores(tiny):
    model, tokenizer = tiny
    suite = load_suite_text(GAP_SUITE, "tiny-gap.yaml")
    plan = steer.compile(steer.parse_spec("scale feature 3 by 1; add feature 5 by 0", site="resid_post.1"), model,
                         random_sae())
    report = evaluate(plan, model, tokenizer, [suite], neutral="calibration", neutral_tokens=512)
    n = report.neutral
    assert n.kl_mean == 0.0 and n.kl_max == 0.0
    assert n.ppl_change_pct == 0.0 and n.top1 == 1.0
    assert n.predictions == 4 * 127
    s = report.suite("tiny-gap")
    assert s.steered.values == s.base.values and s.change_pct == 0.0


def test_evaluation_for_export_is_json_with_rounded_numbers_and_card_lines(tiny):
    from steer.evaluate.report import evaluation_for_export

    model, tokenizer = tiny
    plan = steer.compile(steer.parse_spec("add feature 5 by 3", site="resid_post.1"), model, random_sae())
    report = evaluate(plan, model, tokenizer, [load_suite_text(GAP_SUITE, "tiny-gap.yaml")], neutral="calibration",
                      neutral_tokens=256)
    data, lines = evaluation_for_export(report)
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["neutral"]["kl_mean"] == float(f"{report.neutral.kl_mean:.4g}")
    assert data["suites"][0]["steered"]["score"] == float(f"{report.suites[0].steered.score:.4g}")
    assert any(line.startswith("| tiny-gap |") for line in lines) and lines[0] == "## Measured effect"


def test_neutral_kl_perplexity_and_top1_match_their_formulas(tiny):
    model, tokenizer = tiny
    plan = steer.compile(steer.parse_spec("add feature 5 by 3; suppress feature 2 by 50%", site="resid_post.1"), model,
                         random_sae())
    text = neutral_text(tokenizer, "calibration", tokens=256)
    report = evaluate(plan, model, tokenizer, [], neutral=text)
    kls, agree, nll_b, nll_s = [], [], [], []
    for row in text.rows:
        ids = row[None]
        with torch.no_grad():
            base = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            with steer.applied(model, plan):
                edited = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        kls.append((base.exp() * (base - edited)).sum(-1))
        agree.append(base.argmax(-1) == edited.argmax(-1))
        nll_b.append(-base.gather(-1, row[1:, None]).squeeze(-1))
        nll_s.append(-edited.gather(-1, row[1:, None]).squeeze(-1))
    kl = torch.cat(kls)
    assert report.neutral.kl_mean == pytest.approx(float(kl.mean()), rel=1e-4)
    assert report.neutral.kl_max == pytest.approx(float(kl.max()), rel=1e-4)
    assert report.neutral.kl_mean > 1e-4  # the edit does something
    assert report.neutral.top1 == pytest.approx(float(torch.cat(agree).double().mean()))
    ppl_b, ppl_s = math.exp(float(torch.cat(nll_b).mean())), math.exp(float(torch.cat(nll_s).mean()))
    assert report.neutral.ppl_change_pct == pytest.approx(100 * (ppl_s / ppl_b - 1), rel=1e-4)


def test_calibration_neutral_text_packs_rows_of_the_calibration_tokens(tiny):
    _, tokenizer = tiny
    text = neutral_text(tokenizer, "calibration", tokens=300, context=100)
    joined = []
    for t in calibration_texts():
        joined += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert text.rows.shape == (3, 100)
    assert text.rows.flatten().tolist() == joined[:300]


# -- the CLI: eval, artifacts, sweep, tune ----------------------------------------------


def spec_file(saved, name="spec.yaml", edits="  - suppress: 3\n    by: 50%\n"):
    _, _, directory, sae_dir, root = saved
    return write(root / name, f"model: {directory}\nsae: {sae_dir}\nedits:\n{edits}")


def test_eval_cli_prints_the_table_and_writes_json(saved, capsys, tmp_path):
    suite = write(tmp_path / "gap.yaml", GAP_SUITE)
    code, out, err = cli(capsys, "eval", str(spec_file(saved)), "--suite", str(suite), "--split", "dev",
                         "--neutral", "calibration", "--neutral-tokens", "256", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "KL(base‖steered)" in out and "tiny-gap" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["split"] == "dev" and data["suites"][0]["prompts"] == 3
    assert len(data["suites"][0]["steered"]["per_prompt"]) == 3
    assert data["neutral"]["predictions"] == 2 * 127


def test_eval_of_an_exact_weights_export_matches_the_hooked_spec(saved, capsys, tmp_path):
    from steer.export.checkpoint import export

    model, tokenizer, directory, sae_dir, _ = saved
    spec = steer.parse_spec("add feature 4 by 1.5 site resid_post.1", sae=[str(sae_dir)])
    plan = steer.compile(spec, model, tokenizer=tokenizer)
    export(plan, model, tokenizer, "weights", tmp_path / "out", base=directory)
    suite = write(tmp_path / "gap.yaml", GAP_SUITE)
    hooked = evaluate(plan, model, tokenizer, [load_suite(suite)], neutral="calibration", neutral_tokens=256)
    code, out, err = cli(capsys, "eval", "--artifact", str(tmp_path / "out"), "--suite", str(suite),
                         "--neutral", "calibration", "--neutral-tokens", "256", "--json", str(tmp_path / "a.json"))
    assert code == 0, err
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["subject"].startswith("weights export")
    assert data["neutral"]["kl_mean"] == pytest.approx(hooked.neutral.kl_mean, rel=1e-3, abs=1e-7)
    np.testing.assert_allclose([p["value"] for p in data["suites"][0]["steered"]["per_prompt"]],
                               hooked.suites[0].steered.values, atol=1e-4)


def test_export_with_suites_records_the_exports_own_evaluation_in_manifest_and_card(saved, tmp_path):
    """`export(..., suites=...)` evaluates the written merged checkpoint (not the hooks) against the base."""
    from steer.export.checkpoint import export

    model, tokenizer, directory, sae_dir, _ = saved
    plan = steer.compile(steer.parse_spec("add feature 4 by 1.5 site resid_post.1", sae=[str(sae_dir)]), model,
                         tokenizer=tokenizer)
    suite = load_suite(write(tmp_path / "gap.yaml", GAP_SUITE))
    manifest = export(plan, model, tokenizer, "weights", tmp_path / "out", base=directory, suites=[suite], eval_split="dev")
    recorded = json.loads((tmp_path / "out" / "steer_manifest.json").read_text())["evaluation"]
    assert recorded == manifest["evaluation"] and recorded["split"] == "dev"
    # the same numbers from the hooked plan, computed here on their own: log P(A) - log P(B) per dev prompt
    hooked = [alone_logprobs(model, tokenizer, p.text, plan) for p in suite.prompts if p.split == "dev"]
    a = [tokenizer.convert_tokens_to_ids(t) for t in suite.scoring.a]
    b = [tokenizer.convert_tokens_to_ids(t) for t in suite.scoring.b]
    gaps = [float(torch.logsumexp(lp[a], 0) - torch.logsumexp(lp[b], 0)) for lp in hooked]
    assert recorded["suites"][0]["steered"]["score"] == pytest.approx(np.mean(np.abs(gaps)), rel=1e-3)
    assert recorded["neutral"]["kl_mean"] > 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Measured effect" in card and "tiny-gap" in card


def test_export_card_shows_the_edited_features_firing_rates_before_and_after(saved, tmp_path):
    """The edit card and manifest give each edited feature's firing rate (f > 0, each row's first position left
    out) base → edited on the neutral text and each suite's prompts. Reference, written out here: the site's
    activation from a forward hook of the test's own, encoded by the full SAE; the edited activation by the
    scale formula x + (s − 1)·f_i(x)·d_i, encoded again. Feature 3 is suppressed 100% and feature 5 by 50%."""
    from steer.export.checkpoint import export
    from steer.sae import load_sae

    model, tokenizer, directory, _, root = saved
    # encoder columns along the decoder rows (d_i · e_i = 1.5), as in trained SAEs; not 1, which would leave an
    # ablated feature's pre-activation at exactly 0 and its sign to rounding
    sae = random_sae(site="resid_post.1")
    sae.W_enc = (1.5 * sae.W_dec / (sae.W_dec ** 2).sum(1, keepdim=True)).T.contiguous()
    sae_dir = save_sae(sae, root / "dual-sae")
    sae = load_sae(str(sae_dir))
    factors = {3: 0.0, 5: 0.5}
    plan = steer.compile(steer.parse_spec("suppress feature 3 by 100%; suppress feature 5 by 50%", site="resid_post.1",
                                          sae=[str(sae_dir)]), model, tokenizer=tokenizer)
    suite = load_suite(write(tmp_path / "gap.yaml", GAP_SUITE))
    manifest = export(plan, model, tokenizer, "pack", tmp_path / "out", base=directory, suites=[suite], eval_split="dev")
    recorded = {(r["rows"], r["feature"]): r for r in manifest["evaluation"]["firing"]}

    def rates(rows):
        counts, positions = {k: [0, 0] for k in factors}, 0
        for row in rows:
            seen = []
            handle = model.model.layers[1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
            with torch.no_grad():
                model(torch.tensor([row]))
            handle.remove()
            x = seen[0][0, 1:].float()                                        # positions 1.. (the sink left out)
            f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
            positions += x.shape[0]
            for k, s in factors.items():
                x = x + (s - 1.0) * f[:, k:k + 1] * sae.W_dec[k]                # every edit reads f(x) of the input
            f_edited = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
            for k in factors:
                counts[k][0] += int((f[:, k] > 0).sum())
                counts[k][1] += int((f_edited[:, k] > 0).sum())
        return {k: (b / positions, e / positions) for k, (b, e) in counts.items()}, positions

    neutral = neutral_text(tokenizer, "default").rows.tolist()
    prompts = [tokenizer(p.text).input_ids for p in suite.select("dev")]
    reference = {}
    for name, rows in (("neutral text", neutral), ("tiny-gap (dev)", prompts)):
        expected, positions = rates(rows)
        reference[name] = expected
        for k, (base, edited) in expected.items():
            r = recorded[(name, k)]
            assert (r["site"], r["positions"]) == ("resid_post.1", positions)
            assert r["base"] == pytest.approx(base, rel=1e-3) and r["edited"] == pytest.approx(edited, rel=1e-3, abs=1e-6)
        assert expected[3][0] > 0.05 and expected[3][1] < expected[3][0] / 2  # it fired; suppressed, it fires less
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Edited features' firing rates" in card
    base3, edited3 = recorded[("neutral text", 3)]["base"], recorded[("neutral text", 3)]["edited"]
    assert re.search(rf"\| resid_post.1 \| 3 \| {100 * base3:.2f}% → {100 * edited3:.2f}% \|", card)
    means = {name: [100 * np.mean([v[side] for v in ref.values()]) for side in (0, 1)] for name, ref in reference.items()}
    assert (f"All 2 together, mean rate: neutral text {means['neutral text'][0]:.2f}% → {means['neutral text'][1]:.2f}%; "
            f"tiny-gap (dev) {means['tiny-gap (dev)'][0]:.2f}% → {means['tiny-gap (dev)'][1]:.2f}%.") in card


def test_footprint_reads_every_feature_at_every_site_and_nothing_moves_upstream(saved, tmp_path):
    """`firing_rates(..., saes)` reads each given site's whole dictionary base vs edited. Reference, written out
    here: forward hooks of the test's own on blocks 0-2, the edit's formula x + (s − 1)·f_3(x)·d_3 applied by
    hand at block 1, every SAE encoding in full. Block 0 is upstream of the edit: nothing there may move. The
    export records the plan's own SAE's footprint in the manifest and on the card."""
    from steer.evaluate.firing import firing_rates
    from steer.export.checkpoint import export
    from steer.models.adapters import adapter_for
    from steer.sae import load_sae

    model, tokenizer, directory, _, root = saved
    edited_sae = random_sae(site="resid_post.1", seed=7)
    edited_sae.W_enc = (1.5 * edited_sae.W_dec / (edited_sae.W_dec ** 2).sum(1, keepdim=True)).T.contiguous()
    sae_dir = save_sae(edited_sae, root / "footprint-sae")
    edited_sae = load_sae(str(sae_dir))
    saes = {0: random_sae(site="resid_post.0", seed=3), 1: edited_sae, 2: random_sae(site="resid_post.2", seed=5)}
    plan = steer.compile(steer.parse_spec("suppress feature 3 by 100%", site="resid_post.1", sae=[str(sae_dir)]),
                         model, tokenizer=tokenizer)
    adapter = adapter_for(model)
    by_site = {adapter.parse_site(f"resid_post.{layer}", model): sae for layer, sae in saes.items()}
    rows = neutral_text(tokenizer, "default").rows.tolist()
    _, prints = firing_rates(plan, model, {"neutral text": rows}, by_site)

    def encode(sae, x):
        return torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)

    def counts(edit: bool):
        total = {layer: torch.zeros(24) for layer in saes}
        for row in rows:
            seen = {}

            def hook(layer):
                def fn(_m, _a, out):
                    x = out[0] if isinstance(out, tuple) else out
                    if edit and layer == 1:
                        x = x - encode(edited_sae, x)[..., 3:4] * edited_sae.W_dec[3]   # factor 0: (0 − 1)·f·d
                    seen[layer] = x
                    return (x, *out[1:]) if isinstance(out, tuple) else x
                return fn
            handles = [model.model.layers[layer].register_forward_hook(hook(layer)) for layer in saes]
            with torch.no_grad():
                model(torch.tensor([row]))
            for h in handles:
                h.remove()
            for layer, sae in saes.items():
                total[layer] += (encode(sae, seen[layer][0, 1:].float()) > 0).sum(0)   # the sink left out
        return total

    base, edited = counts(False), counts(True)
    positions = sum(len(r) - 1 for r in rows)
    found = {p.site: p for p in prints}
    assert list(found) == ["resid_post.0", "resid_post.1", "resid_post.2"]
    for layer in saes:
        p = found[f"resid_post.{layer}"]
        assert (p.positions, p.d_sae, p.rows) == (positions, 24, "neutral text")
        assert p.l0_base == pytest.approx(float(base[layer].sum()) / positions, rel=1e-3)
        assert p.l0_edited == pytest.approx(float(edited[layer].sum()) / positions, rel=1e-3)
        change = (edited[layer] - base[layer]).abs()
        assert abs(p.moved - int((change > 0).sum())) <= 1
        for feature, b, e in p.largest:
            assert b == pytest.approx(float(base[layer][feature]) / positions, abs=2 / positions)
            assert e == pytest.approx(float(edited[layer][feature]) / positions, abs=2 / positions)
            assert change[feature] >= change.sort(descending=True).values[len(p.largest) - 1] - 2
    assert found["resid_post.0"].moved == 0 and found["resid_post.0"].largest == ()   # upstream: untouched
    assert found["resid_post.0"].l0_edited == found["resid_post.0"].l0_base
    assert found["resid_post.1"].largest[0][0] == 3 and found["resid_post.1"].largest[0][2] < found["resid_post.1"].largest[0][1]
    assert found["resid_post.2"].moved > 0                                            # downstream: it spreads

    suite = load_suite(write(tmp_path / "gap.yaml", GAP_SUITE))
    manifest = export(plan, model, tokenizer, "pack", tmp_path / "out", base=directory, suites=[suite], eval_split="dev")
    recorded = {(r["site"], r["rows"]): r for r in manifest["evaluation"]["footprint"]}
    assert set(recorded) == {("resid_post.1", "neutral text"), ("resid_post.1", "tiny-gap (dev)")}
    neutral = recorded[("resid_post.1", "neutral text")]
    assert neutral["l0_base"] == pytest.approx(found["resid_post.1"].l0_base, rel=1e-3)
    assert neutral["largest"][0]["feature"] == 3
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Footprint at every SAE site" in card
    assert re.search(rf"\| resid_post.1 \| neutral text \({positions} positions\) \| {neutral['l0_base']:.2f} → ", card)


def test_sweep_writes_one_row_per_grid_point_and_a_png(saved, capsys, tmp_path):
    import matplotlib.image

    suite = write(tmp_path / "gap.yaml", GAP_SUITE)
    out = tmp_path / "sweep"
    code, stdout, err = cli(capsys, "sweep", str(spec_file(saved)), "--param", "edits[0].factor=0:1:0.5",
                            "--param", "edits[0].feature=3,7", "--suite", str(suite), "--neutral", "calibration",
                            "--neutral-tokens", "256", "-o", str(out), "--no-progress")
    assert code == 0, err
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(float(r["edits[0].factor"]), int(r["edits[0].feature"])) for r in rows] == [
        (0.0, 3), (0.0, 7), (0.5, 3), (0.5, 7), (1.0, 3), (1.0, 7)]
    for r in rows:  # factor 1 is the identity: no side effect, same score as the base
        if float(r["edits[0].factor"]) == 1.0:
            assert float(r["kl_mean"]) == 0.0 and float(r["tiny-gap.change_pct"]) == 0.0
    document = json.loads((out / "sweep.json").read_text())
    assert len(document["rows"]) == 6 and document["target"] == "tiny-gap"
    points = [(r["kl_mean"], r["tiny-gap"]) for r in document["rows"]]
    for i in document["pareto"]:  # no point has both lower KL and a lower (better) score
        assert not any(k < points[i][0] and s < points[i][1] for k, s in points)
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(out / "sweep.png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_tune_runs_trials_and_writes_a_spec_that_parses(saved, capsys, tmp_path):
    suite = write(tmp_path / "gap.yaml", GAP_SUITE)
    chosen = tmp_path / "out" / "chosen.yaml"
    code, out, err = cli(capsys, "tune", str(spec_file(saved)), "--suite", str(suite), "--trials", "5",
                         "--candidates", "3,7,11", "--param", "edits[0].factor=0:1", "--max-kl", "10",
                         "--neutral", "calibration", "--neutral-tokens", "256", "-o", str(chosen),
                         "--json", str(tmp_path / "t.json"), "--no-progress")
    assert code == 0, err
    trials = json.loads((tmp_path / "t.json").read_text())["trials"]
    assert len(trials) == 5
    spec = steer.spec.load_spec_file(chosen)
    assert spec.edits and all(e.op == "scale" and e.feature in (3, 7, 11) and 0 <= e.amount <= 1 for e in spec.edits)
    assert Path(spec.sae[0]).is_absolute() or (chosen.parent / spec.sae[0]).is_dir()  # still points at the SAE
    best = json.loads((tmp_path / "t.json").read_text())["chosen"]
    assert trials[best]["score"] == min(t["score"] for t in trials)  # max-kl 10: the lowest score wins


def test_tune_searches_project_out_past_full_removal_and_scale_within_zero_to_one():
    """`steer tune`'s default ranges: a projection's fraction may pass 1 (the component removed, then partly
    reversed: the worked example ships 1.15), up to 1.5 or the spec's own fraction; a scale factor stays in [0, 1]."""
    from steer.evaluate.tune import default_ranges
    from steer.spec.yaml_io import load_spec_text

    spec = load_spec_text(textwrap.dedent("""\
        model: tiny
        sae: some-sae
        edits:
          - {project_out: d.safetensors:u, fraction: 1.0, site: writers}
          - {project_out: d.safetensors:u, fraction: 1.8, site: writers}
          - {scale: 3, factor: 0.5, site: resid_post.1}
        """), "spec.yaml", base_dir=".")
    ranges = {r.path: (r.low, r.high) for r in default_ranges(spec)}
    assert ranges == {"edits[0].amount": (0.0, 1.5), "edits[1].amount": (0.0, 1.8), "edits[2].amount": (0.0, 1.0)}


def test_sweep_and_tune_draw_the_front_under_keep_constraints(saved, capsys, tmp_path):
    """--keep SUITE>=P% / kl<=X: sweep marks the points that miss a bound and draws the front among the rest;
    tune scores the kept suite every trial and chooses only a trial that meets every bound. Feasibility is
    recomputed here from the written numbers and the bound's formula."""
    gap = write(tmp_path / "gap.yaml", GAP_SUITE)
    explicit = write(tmp_path / "explicit.yaml", EXPLICIT_SUITE)
    out = tmp_path / "sweep"
    code, stdout, err = cli(capsys, "sweep", str(spec_file(saved)), "--param", "edits[0].factor=0:1:0.25",
                            "--param", "edits[0].feature=3,7", "--suite", str(gap), "--suite", str(explicit),
                            "--keep", "tiny-explicit>=100%", "--keep", "kl<=0.02", "--neutral", "calibration",
                            "--neutral-tokens", "256", "-o", str(out), "--no-progress")
    assert code == 0, err
    document = json.loads((out / "sweep.json").read_text())
    base_kept = document["base"]["tiny-explicit"]["score"]
    rows = document["rows"]
    ok = [i for i, r in enumerate(rows) if r["tiny-explicit"] >= base_kept and r["kl_mean"] <= 0.02]
    assert [r["feasible"] for r in rows] == [int(i in ok) for i in range(len(rows))]
    assert ok and set(document["pareto"]) <= set(ok)
    for i in document["pareto"]:  # no feasible point dominates a front point
        assert not any(rows[j]["kl_mean"] < rows[i]["kl_mean"] and rows[j]["tiny-gap"] < rows[i]["tiny-gap"] for j in ok)
    assert "misses one of tiny-explicit>=100%, kl<=0.02" in stdout and "under the constraints" in stdout
    marked = [line for line in stdout.splitlines() if line.startswith(("x edits", "* edits", "  edits"))]
    assert len(marked) == len(rows)
    for line, r in zip(marked, rows):  # each missing row names the bounds it misses, and only those
        missed = [name for name, miss in (("tiny-explicit>=100%", r["tiny-explicit"] < base_kept),
                                          ("kl<=0.02", r["kl_mean"] > 0.02)) if miss]
        assert line.endswith(f"misses {', '.join(missed)}") if missed else "misses" not in line, line

    code, stdout, err = cli(capsys, "sweep", str(spec_file(saved)), "--param", "edits[0].factor=0,1",
                            "--suite", str(gap), "--keep", "age>=90%", "--neutral", "calibration",
                            "--neutral-tokens", "256", "-o", str(tmp_path / "s2"), "--no-progress")
    assert code == 2 and "not evaluated here" in err and err.count("\n") == 1

    code, stdout, err = cli(capsys, "tune", str(spec_file(saved)), "--suite", str(gap), "--trials", "6",
                            "--param", "edits[0].factor=0:1", "--keep", f"{explicit}>=100%".replace(str(explicit), "tiny-explicit"),
                            "--max-kl", "10", "--neutral", "calibration", "--neutral-tokens", "256",
                            "--json", str(tmp_path / "t.json"), "--no-progress")
    assert code == 2 and "tiny-explicit" in err  # a --keep suite must be loadable: a name that is neither shipped nor a file
    code, stdout, err = cli(capsys, "tune", str(spec_file(saved)), "--suite", str(gap), "--trials", "6",
                            "--param", "edits[0].factor=0:1", "--keep", f"{explicit}>=100%", "--max-kl", "10",
                            "--neutral", "calibration", "--neutral-tokens", "256", "--json", str(tmp_path / "t.json"),
                            "--no-progress")
    assert code == 0, err
    tuning = json.loads((tmp_path / "t.json").read_text())
    base_kept = tuning["base_kept"]["tiny-explicit"]
    feasible = [t for t in tuning["trials"] if t["kept"]["tiny-explicit"] >= base_kept and t["kl"] <= 10]
    assert [t["feasible"] for t in tuning["trials"]] == [t in feasible for t in tuning["trials"]]
    chosen = tuning["trials"][tuning["chosen"]]
    if feasible:
        assert chosen in feasible and chosen["score"] == min(t["score"] for t in feasible)
    assert "kept: tiny-explicit base" in stdout

    # a bound on one of the suite's secondary numbers (here its lean, an absolute bound between the first sweep's
    # values, so some rows meet it and some do not): the rows carry that number, and feasibility follows it
    leans = sorted(r["tiny-explicit.signed"] for r in document["rows"])
    bound = (leans[len(leans) // 2 - 1] + leans[len(leans) // 2]) / 2
    assert leans[0] < bound < leans[-1]
    code, stdout, err = cli(capsys, "sweep", str(spec_file(saved)), "--param", "edits[0].factor=0:1:0.25",
                            "--param", "edits[0].feature=3,7", "--suite", str(gap), "--suite", str(explicit),
                            "--keep", f"tiny-explicit:signed<={bound!r}", "--neutral", "calibration",
                            "--neutral-tokens", "256", "-o", str(tmp_path / "s3"), "--no-progress")
    assert code == 0, err
    rows = json.loads((tmp_path / "s3" / "sweep.json").read_text())["rows"]
    assert [r["feasible"] for r in rows] == [int(r["tiny-explicit.signed"] <= bound) for r in rows]
    assert 0 < sum(r["feasible"] for r in rows) < len(rows)
    assert f"misses tiny-explicit:signed<={bound:g}" in stdout
    code, stdout, err = cli(capsys, "tune", str(spec_file(saved)), "--suite", str(gap), "--trials", "6",
                            "--param", "edits[0].factor=0:1", "--keep", f"{explicit}:signed<={bound!r}",
                            "--max-kl", "10", "--neutral", "calibration", "--neutral-tokens", "256",
                            "--json", str(tmp_path / "t2.json"), "--no-progress")
    assert code == 0, err
    tuning = json.loads((tmp_path / "t2.json").read_text())
    assert tuning["base_kept"] == {"tiny-explicit:signed": pytest.approx(document["base"]["tiny-explicit"]["signed"])}
    for t in tuning["trials"]:
        assert t["feasible"] == (t["kept"]["tiny-explicit:signed"] <= bound and t["kl"] <= 10)
    assert "kept: tiny-explicit:signed base" in stdout
    code, stdout, err = cli(capsys, "sweep", str(spec_file(saved)), "--param", "edits[0].factor=0,1",
                            "--suite", str(explicit), "--keep", "tiny-explicit:lean<=0", "--neutral", "calibration",
                            "--neutral-tokens", "256", "-o", str(tmp_path / "s4"), "--no-progress")
    assert code == 2 and "no secondary number 'lean'" in err and err.count("\n") == 1
    assert not (tmp_path / "s4").exists()


def test_tune_combines_candidates_across_sites(saved, capsys, tmp_path):
    """Two SAEs at two depths, one candidate group each: trials may include features of both sites in one edit,
    and such a trial's score is what the spec it wrote scores when compiled and evaluated again."""
    model, tokenizer, directory, _, root = saved
    sae_dirs = [save_sae(random_sae(site=site, seed=3 + n), tmp_path / f"sae{n}")
                for n, site in enumerate(("resid_post.0", "resid_post.2"))]
    spec = write(tmp_path / "multi.yaml", f"model: {directory}\nsae: [{sae_dirs[0]}, {sae_dirs[1]}]\n"
                                          "edits:\n  - ablate: 3\n    site: resid_post.0\n")
    suite = write(tmp_path / "stereo.yaml", GAP_SUITE.replace(
        "  correlate: share\n", "  correlate: share\n  headline: stereotype\n  midpoint: 40\n"))
    code, out, err = cli(capsys, "tune", str(spec), "--suite", str(suite), "--trials", "8", "--candidates",
                         "resid_post.0:3,7", "--candidates", "resid_post.2:5,9", "--max-kl", "10", "--neutral",
                         "calibration", "--neutral-tokens", "256", "--json", str(tmp_path / "t.json"), "--no-progress")
    assert code == 0, err
    trials = json.loads((tmp_path / "t.json").read_text())["trials"]
    both = [t for t in trials if t["spec"] and {"resid_post.0", "resid_post.2"} <= set(re.findall(r"resid_post\.\d", t["spec"]))]
    assert both, "no trial combined the two sites"
    again = steer.spec.load_spec_file(write(tmp_path / "again.yaml", both[0]["spec"]))
    plan = steer.compile(again, model)
    assert {str(s.site) for s in plan.sites} == {"resid_post.0", "resid_post.2"}
    rescored = score_suite(model, tokenizer, load_suite_text(suite.read_text(), str(suite)), plan, split="dev")
    assert rescored.score == pytest.approx(both[0]["score"], abs=1e-5)


# -- bad input: one line, exit 2 -------------------------------------------------


BAD_SUITES = {
    "missing_scoring": ("name: x\nprompts: [a b]\n", "x.yaml:1", "missing `scoring`"),
    "empty_prompts": ("name: x\nscoring: {rule: keyword_rate, keywords: [a]}\nprompts: []\n", "x.yaml:3: prompts", "empty"),
    "unknown_rule": ("name: x\nscoring:\n  rule: bleu\nprompts: [a]\n", "x.yaml:3: scoring.rule", "unknown scoring rule"),
    "bad_type": ("name: x\nchat: yes please\nscoring: {rule: keyword_rate, keywords: [a]}\nprompts: [a]\n",
                 "x.yaml:2: chat", "true or false"),
    "unknown_key": ("name: x\nscoring: {rule: keyword_rate, keywords: [a]}\nprompt: [a]\n", "x.yaml:3: prompt",
                    "unknown key"),
    "no_name": ("scoring: {rule: keyword_rate, keywords: [a]}\nprompts: [a]\n", "x.yaml:1", "missing `name`"),
    "placeholder_without_fill": ("name: x\nscoring: {rule: logprob_gap, a: [h], b: [s]}\ntemplates:\n  - The {job}\n",
                                 "x.yaml:4: templates[0]", "has no `fill`"),
    "answer_missing": ("name: x\nscoring: {rule: exact_match}\nprompts:\n  - {text: q}\n", "x.yaml:4: prompts[0]",
                       "needs an `answer`"),
    "malformed_yaml": ("name: x\nscoring: {rule: [\n", "x.yaml:", "malformed YAML"),
    "multi_token_set": ("name: x\nscoring: {rule: logprob_gap, a: [he], b: [s]}\nprompts: [The cook]\n",
                        "x.yaml: scoring.a", "2 tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD_SUITES))
def test_bad_suite_file_is_one_line_naming_file_and_field_exit_2(saved, capsys, tmp_path, case):
    text, where, what = BAD_SUITES[case]
    bad = tmp_path / "x.yaml"
    bad.write_text(text)
    code, out, err = cli(capsys, "eval", str(spec_file(saved)), "--suite", str(bad), "--neutral", "calibration",
                         "--neutral-tokens", "256")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("steer: error: "), err
    assert where in err and what in err, err


@pytest.mark.parametrize("param, what", [
    ("edits[3].factor=0:1:0.5", "has 1 edit"),
    ("edits[0].strength=1,2", "its amount is `factor`"),
    ("edits[0].factor=1:0:0.5", "does not go from"),
    ("edits[0].factor=-1,0.5", "must be ≥ 0"),
    ("edits[0].colour=1,2", "unknown edit field"),
    ("edits[0]factor=1", "unknown parameter path"),
])
def test_bad_sweep_param_is_one_line_exit_2(saved, capsys, tmp_path, param, what):
    code, out, err = cli(capsys, "sweep", str(spec_file(saved)), "--param", param, "--suite", "age",
                         "-o", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and what in err and "--param" in err, err
    assert not (tmp_path / "o").exists()


MIXED = """
edits:
  - {project_out: gender/erasure.safetensors:u0, fraction: 1.0, site: writers}
  - {scale: 3, factor: 0.5, site: resid_post.3}
  - {scale: 7, factor: 0.5, site: resid_post.7}
  - {clamp: 9, to: 2.0, site: resid_post.7}
"""


@pytest.mark.parametrize("path, amounts", [
    ("edits[1:3].factor", [1.0, 0.25, 0.25, 2.0]),
    ("edits[2:3].amount", [1.0, 0.5, 0.25, 2.0]),
    ("edits[:1].fraction", [0.25, 0.5, 0.5, 2.0]),
    ("edits[3:].to", [1.0, 0.5, 0.5, 0.25]),
    ("edits[1].factor", [1.0, 0.25, 0.5, 2.0]),
])
def test_sweep_param_slices_set_only_the_edits_they_name(path, amounts):
    """A mixed spec (a direction removed, then features scaled): ``edits[1:3]`` reaches the scaled features alone,
    as Python's slice would (START included, STOP not)."""
    from steer.evaluate.sweep import set_param
    from steer.spec import load_spec_text

    spec = load_spec_text(MIXED, base_dir="edits")
    assert [e.amount for e in set_param(spec, path, 0.25).edits] == amounts
    assert [e.amount for e in spec.edits] == [1.0, 0.5, 0.5, 2.0]  # the spec itself is not changed


@pytest.mark.parametrize("path, what", [
    ("edits[1:].factor", "edits[3] is clamp; its amount is `to`"),
    ("edits[5:].factor", "edits[5:] selects no edit; the spec has 4"),
    ("edits[2:1].factor", "selects no edit"),
    ("edits[1:x].factor", "unknown parameter path"),
])
def test_bad_sweep_param_slice_says_what(path, what):
    from steer.errors import SpecError
    from steer.evaluate.sweep import set_param
    from steer.spec import load_spec_text

    with pytest.raises(SpecError, match=re.escape(what)):
        set_param(load_spec_text(MIXED, base_dir="edits"), path, 0.25)


@pytest.mark.parametrize("paths, clash", [
    (["edits[*].factor", "edits[1:].factor"], "edits[1].factor"),      # the first edit a second one reaches
    (["edits[1:3].amount", "edits[2].factor"], "edits[2].factor"),     # an amount's key and `amount` are one field
    (["edits[:2].fraction", "edits[0].amount"], "edits[0].amount"),
])
def test_sweep_params_that_set_one_field_twice_are_refused(paths, clash):
    """Two parameters reaching the same edit's field would each overwrite the other at every grid point."""
    from steer.errors import SpecError
    from steer.evaluate.sweep import Param, check_disjoint
    from steer.spec import load_spec_text

    spec = load_spec_text(MIXED, base_dir="edits")
    with pytest.raises(SpecError, match=re.escape(f"both set {clash}")):
        check_disjoint(spec, [Param(p, (0.25,)) for p in paths])
    check_disjoint(spec, [Param("edits[0].site", ("writers",)), Param("edits[1:3].factor", (0.25,)),
                          Param("edits[3].to", (1.0,)), Param("edits[*].scope", ("all",))])  # disjoint: accepted


def test_overlapping_sweep_params_stop_the_cli_before_anything_is_written(saved, capsys, tmp_path):
    code, out, err = cli(capsys, "sweep", str(spec_file(saved)), "--param", "edits[*].factor=0.5,1",
                         "--param", "edits[0:].factor=0,0.5", "--suite", "age", "-o", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "both set edits[0].factor" in err, err
    assert not (tmp_path / "o").exists()


def test_unknown_suite_name_lists_the_shipped_ones(saved, capsys):
    code, out, err = cli(capsys, "eval", str(spec_file(saved)), "--suite", "gender")
    assert code == 2 and "gender-occupation" in err and err.count("\n") == 1


# -- shipped suites on the real default model ---------------------------------------------


def test_shipped_suites_parse_with_the_figures_they_cite():
    assert set(shipped_suites()) >= {"gender-occupation", "age", "capability"}
    gender = load_suite("gender-occupation")
    shares = {v: x for p in gender.prompts for k, v, x in p.data if k == "share_women"}
    assert 30 <= len(shares) <= 40
    assert shares["nurse"] > 80 and shares["electrician"] < 5  # the figures sit beside the right occupations
    assert "Bureau of Labor Statistics" in gender.source and "2023" in gender.source
    assert len(gender.select("dev")) > 50 and len(gender.select("held_out")) > 50
    assert not {p.text for p in gender.select("dev")} & {p.text for p in gender.select("held_out")}
    # the side-effect suites have disjoint halves too, large enough that one capability question is under 1%
    for name, least in (("age", 90), ("capability", 101)):
        suite = load_suite(name)
        dev, held = suite.select("dev"), suite.select("held_out")
        assert len(dev) >= least and len(held) >= least and not {p.text for p in dev} & {p.text for p in held}
        assert len(dev) + len(held) == len(suite.prompts)  # every prompt is in exactly one half
    assert not any(re.search(r"\b(he|she|his|her|him|hers)\b", p.text, re.I) for p in load_suite("age").prompts)
    assert gender.scoring.headline == "stereotype" and gender.scoring.midpoint == 50
    explicit = load_suite("gender-explicit")
    assert explicit.scoring.headline == "accuracy" and explicit.scoring.better == "higher"
    dev, held = explicit.select("dev"), explicit.select("held_out")
    assert len(dev) >= 200 and len(held) >= 200 and not {p.text for p in dev} & {p.text for p in held}
    for split in (dev, held):  # both genders stated equally often, each with both kinds of occupation
        assert sum(p.expect == "female" for p in split) == sum(p.expect == "male" for p in split)
    assert any(p.text.startswith("My sister") and "welder" in p.text and p.expect == "female" for p in explicit.prompts)


@pytest.mark.default_model
def test_shipped_suites_run_on_the_default_model(default_model):
    import dataclasses

    model, tokenizer = default_model
    gender = score_suite(model, tokenizer, load_suite("gender-occupation"), split="dev")
    assert gender.score > 0.3 and gender.extras["stereotype"] > 0.3  # male-held jobs lean "he" more than female-held
    assert gender.extras["r_share_women"] < -0.5  # SmolLM2 mirrors the labour statistics
    explicit = load_suite("gender-explicit")
    stated = score_suite(model, tokenizer, dataclasses.replace(explicit, prompts=explicit.select("dev")[::4]))
    assert stated.score > 0.65  # the stated gender's pronoun mostly wins on the unedited model
    for name in ("age", "capability"):
        suite = load_suite(name)
        result = score_suite(model, tokenizer, dataclasses.replace(suite, prompts=suite.prompts[::4]))
        assert result.n == len(suite.prompts[::4]) and result.score > 0
    capability = load_suite("capability")
    assert score_suite(model, tokenizer, dataclasses.replace(capability, prompts=capability.prompts[:12])).score >= 0.75
