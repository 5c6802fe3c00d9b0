"""Causal discovery by attribution patching (steer.discover.attribution, `steer features attribute`).

The attribution a_i is checked three ways on a tiny random Llama, independently of the code under test:
against a central finite difference of the target through steer's own `scale` hook (a_i is the derivative of
the target along the feature's own contribution, s = 1 ± ε, in float64); against real ablations, which it
matches closely where the model is linear in the feature (decoder rows scaled down, so every ablation is a
small perturbation) and correlates with otherwise; and the target it differentiates equals the suite's headline
score written out here (|stereotype|, the accuracy margin, mean |gap|).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import steer
from steer.cli.main import main
from steer.discover.attribution import attribute, suite_gaps, target_weights, verify_attribution
from steer.evaluate.suites import load_suite_text
from steer.sae import SAE, save_sae
from tests.conftest import VOCAB, random_sae, save_tiny, tiny_model, tiny_tokenizer
from tests.test_evaluate import EXPLICIT_SUITE, GAP_SUITE

STEREOTYPE_SUITE = GAP_SUITE.replace("  correlate: share\n", "  correlate: share\n  headline: stereotype\n  midpoint: 40\n")
SITES = ("resid_post.0", "resid_post.2")


def saes(scale: float = 1.0, dtype=torch.float32) -> list[SAE]:
    out = []
    for n, site in enumerate(SITES):
        s = random_sae(site=site, d_sae=24, seed=1 + n)
        out.append(SAE(W_enc=s.W_enc.to(dtype), W_dec=(scale * s.W_dec).to(dtype), b_enc=s.b_enc.to(dtype),
                       b_dec=s.b_dec.to(dtype), architecture="relu", site=site))
    return out


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama"), tiny_tokenizer()


def target_by_hand(suite, gaps: list[float]) -> float:
    """The suite's headline, from the gaps, as the suites module defines it (written out independently)."""
    prompts = suite.select("all")
    if suite.scoring.headline == "stereotype":
        by_job: dict[tuple[str, float], list[float]] = {}
        for p, g in zip(prompts, gaps):
            (_, job, share), = p.data
            by_job.setdefault((job, share), []).append(g)
        low = [np.mean(v) for (_, x), v in by_job.items() if x < suite.scoring.midpoint]
        high = [np.mean(v) for (_, x), v in by_job.items() if x > suite.scoring.midpoint]
        return abs(np.mean(low) - np.mean(high))
    if suite.scoring.headline == "accuracy":
        return float(np.mean([g if p.expect == "male" else -g for p, g in zip(prompts, gaps)]))
    return float(np.mean(np.abs(gaps)))


@pytest.mark.parametrize("text", [STEREOTYPE_SUITE, EXPLICIT_SUITE, GAP_SUITE], ids=["stereotype", "accuracy", "mean_abs"])
def test_the_target_is_the_suites_headline_in_linear_form(tiny, text):
    model, tokenizer = tiny
    suite = load_suite_text(text, "t.yaml")
    prompts = suite.select("all")
    gaps = suite_gaps(model, tokenizer, suite, prompts)
    weights = target_weights(suite, prompts, gaps)
    assert sum(w * g for w, g in zip(weights, gaps)) == pytest.approx(target_by_hand(suite, gaps), abs=1e-6)
    result = attribute(model, tokenizer, saes(), suite, split="all")
    assert result.metric == pytest.approx(target_by_hand(suite, gaps), abs=1e-5)
    assert len(result.rows) == 2 * 24 and {r.site for r in result.rows} == set(SITES)
    assert_ranked(result.rows, lambda r: r.attribution)


def assert_ranked(rows, key):
    """Features that never fire at a prompt's first token first, then the others; each part best first."""
    flags = [r.at_first for r in rows]
    assert flags == sorted(flags)
    for part in (False, True):
        values = [key(r) for r in rows if r.at_first == part]
        assert values == sorted(values, reverse=True)


def test_attribution_is_the_derivative_along_each_features_own_contribution(tiny):
    """a_i = d m / d ε of the target with feature i's contribution scaled by (1 + ε) at its site — a central
    finite difference through steer's `scale` hook (float64 model), at both sites at once (one backward pass)."""
    model, tokenizer = tiny
    model = tiny_model("llama").double()
    suite = load_suite_text(STEREOTYPE_SUITE, "t.yaml")
    prompts = suite.select("all")
    dictionaries = saes(dtype=torch.float64)
    # include_first: the hooks' `scale` acts at every position, the first one included
    result = attribute(model, tokenizer, dictionaries, suite, split="all", include_first=True)
    clean = suite_gaps(model, tokenizer, suite, prompts)
    weights = target_weights(suite, prompts, clean)
    by_key = {(r.site, r.feature): r.attribution for r in result.rows}
    def central(sae, feature, eps):
        m = []
        for s in (1 + eps, 1 - eps):
            plan = steer.compile(steer.parse_spec(f"scale feature {feature} by {s!r} site {sae.site}"), model, sae)
            gaps = suite_gaps(model, tokenizer, suite, prompts, plan)
            m.append(sum(w * g for w, g in zip(weights, gaps)))
        return (m[0] - m[1]) / (2 * eps)

    # the plan's slices are float32, so steps stay ≥ 5e-3; Richardson's (4 D(ε/2) − D(ε)) / 3 cancels the ε² term
    for sae in dictionaries:
        for feature in (0, 5, 17):
            derivative = (4 * central(sae, feature, 5e-3) - central(sae, feature, 1e-2)) / 3
            assert by_key[(sae.site, feature)] == pytest.approx(derivative, rel=2e-4, abs=1e-6), (sae.site, feature)


def scaled_after_first(sae, feature: int, s: float):
    """A site rewrite written here: feature ``feature``'s contribution f·σ·d scaled by ``s`` at every position but
    each row's first (one unpadded row per pass, so position 0 is the first token)."""
    def fn(x):
        _, _, sigma = sae.normalize(x)
        contribution = sae.encode(x)[..., feature, None] * sigma * sae.W_dec[feature]
        contribution[:, 0] = 0
        return x + (s - 1) * contribution
    return fn


def test_each_prompts_first_token_is_left_out_unless_asked(tiny):
    """By default a_i is the derivative along feature i's contribution at every position but each prompt's first
    (the attention sink): checked by a central difference through a hook written here, which scales the
    contribution f_i·σ·d_i by (1 + ε) at positions ≥ 1 only (one prompt per pass: no padding, position 0 is the
    first token)."""
    from steer.models.adapters import adapter_for
    from steer.models.capture import rewritten

    model, tokenizer = tiny
    model = tiny_model("llama").double()
    suite = load_suite_text(STEREOTYPE_SUITE, "t.yaml")
    prompts = suite.select("all")
    dictionaries = saes(dtype=torch.float64)
    default = {(r.site, r.feature): r.attribution for r in attribute(model, tokenizer, dictionaries, suite, split="all").rows}
    with_first = {(r.site, r.feature): r.attribution
                  for r in attribute(model, tokenizer, dictionaries, suite, split="all", include_first=True).rows}
    weights = target_weights(suite, prompts, suite_gaps(model, tokenizer, suite, prompts))

    def target(sae, feature, s):
        with rewritten(model, adapter_for(model).parse_site(sae.site, model), scaled_after_first(sae, feature, s)):
            gaps = suite_gaps(model, tokenizer, suite, prompts, batch_size=1)
        return sum(w * g for w, g in zip(weights, gaps))

    differs = 0
    for sae in dictionaries:
        for feature in (0, 5, 17, 3, 11):
            def central(eps, sae=sae, feature=feature):
                return (target(sae, feature, 1 + eps) - target(sae, feature, 1 - eps)) / (2 * eps)
            derivative = (4 * central(5e-3) - central(1e-2)) / 3  # Richardson, as above
            assert default[(sae.site, feature)] == pytest.approx(derivative, rel=2e-4, abs=2e-4), (sae.site, feature)
            differs += abs(with_first[(sae.site, feature)] - default[(sae.site, feature)]) > 1e-3 * abs(derivative)
    assert differs >= 2  # the first token does carry attribution in this model: leaving it out is not vacuous


def test_estimates_match_real_ablations_where_linear_and_correlate_otherwise(tiny):
    model, tokenizer = tiny
    suite = load_suite_text(STEREOTYPE_SUITE, "t.yaml")
    # decoder rows scaled by 0.01: every ablation is a small perturbation, the target ~linear in each feature
    small = saes(scale=0.01)
    # include_first: the verifying ablation acts at every position, the first one included
    checked = verify_attribution(model, tokenizer, attribute(model, tokenizer, small, suite, split="all",
                                                             include_first=True), small, 12)
    estimate, true = np.array([v.estimate for v in checked]), np.array([v.true for v in checked])
    assert np.abs(estimate - true).max() <= 0.05 * np.abs(true).max()
    assert np.corrcoef(estimate, true)[0, 1] > 0.999
    # full-size features: a first-order estimate of a nonlinear network, still correlated with the truth
    full = saes()
    checked = verify_attribution(model, tokenizer, attribute(model, tokenizer, full, suite, split="all",
                                                             include_first=True), full, 48)
    estimate, true = np.array([v.estimate for v in checked]), np.array([v.true for v in checked])
    r = np.corrcoef(estimate, true)[0, 1]
    print(f"\nfull-size features: Pearson r(estimate, true ablation) = {r:.3f} over 48")
    assert r > 0.5
    # the headline score change is the real |stereotype| change, measured here with the hook directly
    v = checked[0]
    plan = steer.compile(steer.parse_spec(f"ablate feature {v.row.feature} site {v.row.site}"), model,
                         full[SITES.index(v.row.site)])
    before = target_by_hand(suite, suite_gaps(model, tokenizer, suite, suite.select("all")))
    after = target_by_hand(suite, suite_gaps(model, tokenizer, suite, suite.select("all"), plan))
    assert v.score_change == pytest.approx(after - before, abs=1e-5)


def test_contrast_ranks_by_selectivity(tiny):
    model, tokenizer = tiny
    target = load_suite_text(STEREOTYPE_SUITE, "t.yaml")
    keep = load_suite_text(EXPLICIT_SUITE, "e.yaml")
    result = attribute(model, tokenizer, saes(), target, split="all", contrast=keep)
    alone = {(r.site, r.feature): r.attribution for r in attribute(model, tokenizer, saes(), keep, split="all").rows}
    for r in result.rows:
        assert r.contrast == pytest.approx(alone[(r.site, r.feature)], rel=1e-6, abs=1e-9)
        expected = r.attribution / abs(result.metric) - abs(r.contrast) / abs(result.contrast_metric)
        assert r.selectivity == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert_ranked(result.rows, lambda r: r.selectivity)


def test_features_firing_at_a_first_token_are_flagged_and_ranked_last(tiny):
    """at_first: the feature fires (f > 0) at the first token of some target or contrast prompt, each prompt run
    alone here and its site read by a hook of the test's own. Those rank after every other feature, since an edit
    of them acts at the attention sink too; with include_first the ranking is by attribution alone."""
    from steer.generate import prompt_ids

    model, tokenizer = tiny
    target = load_suite_text(STEREOTYPE_SUITE, "t.yaml")
    keep = load_suite_text(EXPLICIT_SUITE, "e.yaml")
    dictionaries = saes()
    fired = {site: torch.zeros(24, dtype=torch.bool) for site in SITES}
    for suite in (target, keep):
        for prompt in suite.select("all"):
            seen = {}
            handles = [model.model.layers[int(site.rsplit(".", 1)[1])].register_forward_hook(
                lambda m, a, out, site=site: seen.__setitem__(site, out[0] if isinstance(out, tuple) else out))
                for site in SITES]
            with torch.no_grad():
                model(prompt_ids(tokenizer, [prompt.text], chat=suite.chat)["input_ids"])
            for h in handles:
                h.remove()
            for sae in dictionaries:
                x = seen[sae.site][0, 0]
                fired[sae.site] |= torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc) > 0
    result = attribute(model, tokenizer, dictionaries, target, split="all", contrast=keep)
    assert {(r.site, r.feature): r.at_first for r in result.rows} == \
        {(site, i): bool(fired[site][i]) for site in SITES for i in range(24)}
    assert 0 < sum(r.at_first for r in result.rows) < len(result.rows)  # both kinds occur: the order is tested
    assert_ranked(result.rows, lambda r: r.selectivity)
    plain = attribute(model, tokenizer, dictionaries, target, split="all", contrast=keep, include_first=True)
    assert [r.selectivity for r in plain.rows] == sorted((r.selectivity for r in plain.rows), reverse=True)


def test_cost_is_the_derivative_of_the_neutral_loss_along_each_feature(tiny):
    """cost_i = the first-order change of the mean next-token loss on neutral rows if feature i were zeroed: minus
    the derivative of that loss (cross-entropy written out here) with the feature's contribution scaled by
    (1 + ε) at every position but each row's first, by a central difference through a hook of the test's own."""
    from steer.models.adapters import adapter_for
    from steer.models.capture import rewritten

    model = tiny_model("llama").double()
    _, tokenizer = tiny
    suite = load_suite_text(STEREOTYPE_SUITE, "t.yaml")
    dictionaries = saes(dtype=torch.float64)
    rows = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    result = attribute(model, tokenizer, dictionaries, suite, split="all", neutral=rows)
    cost = {(r.site, r.feature): r.cost for r in result.rows}

    def loss(sae, feature, s):
        with torch.no_grad(), rewritten(model, adapter_for(model).parse_site(sae.site, model),
                                        scaled_after_first(sae, feature, s)):
            logp = torch.log_softmax(model(rows).logits[:, :-1], dim=-1)
        return float(-logp.gather(-1, rows[:, 1:, None]).mean())

    checked = 0
    for sae in dictionaries:
        for feature in (0, 5, 17, 3):
            def central(eps, sae=sae, feature=feature):
                return (loss(sae, feature, 1 + eps) - loss(sae, feature, 1 - eps)) / (2 * eps)
            # Llama's RMSNorm computes in float32 even in a float64 model (loss noise ~1e-7, ~2e-5 in a difference
            # over 0.02): steps of 0.01 and 0.02, and Richardson's extrapolation cancels the ε² term
            derivative = (4 * central(0.01) - central(0.02)) / 3
            assert cost[(sae.site, feature)] == pytest.approx(-derivative, rel=1e-3, abs=3e-5), (sae.site, feature)
            checked += abs(derivative) > 1e-4
    assert checked >= 4  # the loss does move along these features: the comparison is not of zeros


def test_cli_attribute_ranks_across_sites_and_verifies(tmp_path, capsys):
    model, tokenizer, model_dir = save_tiny("llama", tmp_path / "model")
    paths = [str(save_sae(dataclasses.replace(s, source=None), tmp_path / s.site.replace(".", "_"))) for s in saes()]
    suite = tmp_path / "stereo.yaml"
    suite.write_text(STEREOTYPE_SUITE)
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(EXPLICIT_SUITE)
    args = ["features", "attribute", "--suite", str(suite), "--sae", paths[0], "--sae", paths[1], "--model", model_dir,
            "--split", "all", "--top", "5", "--verify", "3", "--contrast", str(explicit), "--json", str(tmp_path / "a.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    document = json.loads((tmp_path / "a.json").read_text())
    assert len(document["rows"]) == 5 and len(document["verified"]) == 3
    assert {r["site"] for r in document["rows"]} <= set(SITES)
    assert "verified by ablation" in out and "selectivity" in out
    for v in document["verified"]:
        assert math.isclose(v["estimate"], -v["attribution"])

    bad = tmp_path / "words.yaml"
    bad.write_text("name: w\nscoring: {rule: keyword_rate, keywords: [a]}\nprompts: [The cook]\n")
    assert main(["features", "attribute", "--suite", str(bad), "--sae", paths[0], "--model", model_dir]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a logprob_gap suite" in err


def merged_projection(model, u: torch.Tensor):
    """A copy of ``model`` with ``u`` (unit) removed from every write to the residual stream, merged by hand: the
    embedding rows and the o_proj / down_proj outputs multiplied by P = I − u uᵀ (tiny Llama: no biases)."""
    import copy

    merged = copy.deepcopy(model)
    P = torch.eye(u.numel(), dtype=torch.float64) - torch.outer(u, u).double()
    with torch.no_grad():
        embed = merged.model.embed_tokens.weight
        embed.copy_((embed.double() @ P).to(embed.dtype))
        for layer in merged.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                assert linear.bias is None
                linear.weight.copy_((P @ linear.weight.double()).to(linear.weight.dtype))
    return merged


def test_attribution_under_an_edit_equals_attribution_on_the_edited_weights(tiny, tmp_path):
    """``under=`` a compiled project-out-of-every-writer: the metric, every attribution, contrast, cost and the
    verified ablations equal those of a model with the projection merged into its weights by hand."""
    from safetensors.torch import save_file

    model, tokenizer = tiny
    g = torch.Generator().manual_seed(7)
    u = torch.randn(model.config.hidden_size, generator=g)
    u = u / u.norm()
    save_file({"u0": u}, str(tmp_path / "u.safetensors"))
    spec = steer.parse_spec(f"project out direction {tmp_path / 'u.safetensors'}:u0 site writers")
    plan = steer.compile(spec, model)
    merged = merged_projection(model, u)
    suite = load_suite_text(STEREOTYPE_SUITE, "t.yaml")
    contrast = load_suite_text(EXPLICIT_SUITE, "e.yaml")
    neutral = torch.randint(3, VOCAB, (4, 12), generator=g)
    hooked = attribute(model, tokenizer, saes(), suite, split="all", contrast=contrast, neutral=neutral, under=plan)
    reference = attribute(merged, tokenizer, saes(), suite, split="all", contrast=contrast, neutral=neutral)
    plain = attribute(model, tokenizer, saes(), suite, split="all", contrast=contrast, neutral=neutral)
    assert hooked.metric == pytest.approx(reference.metric, rel=1e-4, abs=1e-6)
    assert hooked.contrast_metric == pytest.approx(reference.contrast_metric, rel=1e-4, abs=1e-6)
    assert abs(plain.metric - reference.metric) > 1e-3  # the edit does change what is measured
    got = {(r.site, r.feature): r for r in hooked.rows}
    for r in reference.rows:
        h = got[(r.site, r.feature)]
        assert h.attribution == pytest.approx(r.attribution, rel=1e-3, abs=1e-5), (r.site, r.feature)
        assert h.contrast == pytest.approx(r.contrast, rel=1e-3, abs=1e-5)
        assert h.cost == pytest.approx(r.cost, rel=1e-3, abs=1e-6)
        assert h.at_first == r.at_first
    checked = verify_attribution(model, tokenizer, hooked, saes(), 3, under=plan)
    expected = verify_attribution(merged, tokenizer, reference, saes(), 3)
    by_key = {(v.row.site, v.row.feature): v for v in expected}
    for v in checked:
        e = by_key.get((v.row.site, v.row.feature))
        if e is not None:  # the top 3 of both rankings hold the same features unless two tie to float noise
            assert v.true == pytest.approx(e.true, rel=1e-3, abs=1e-5)
            assert v.score_change == pytest.approx(e.score_change, rel=1e-3, abs=1e-5)
    assert sum((v.row.site, v.row.feature) in by_key for v in checked) >= 2


def test_cli_attribute_under_a_spec(tmp_path, capsys):
    """`--under SPEC` ranks on the edited model: the JSON's rows are the Python API's under the compiled spec."""
    from safetensors.torch import save_file

    model, tokenizer, model_dir = save_tiny("llama", tmp_path / "model")
    paths = [str(save_sae(dataclasses.replace(s, source=None), tmp_path / s.site.replace(".", "_"))) for s in saes()]
    suite = tmp_path / "stereo.yaml"
    suite.write_text(STEREOTYPE_SUITE)
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    save_file({"u0": u / u.norm()}, str(tmp_path / "u.safetensors"))
    spec = tmp_path / "edit.yaml"
    spec.write_text("edits:\n  - {project_out: u.safetensors:u0, fraction: 0.8, site: writers}\n")
    assert main(["features", "attribute", "--suite", str(suite), "--sae", paths[0], "--sae", paths[1],
                 "--model", model_dir, "--split", "all", "--top", "6", "--cost", "none", "--under", str(spec),
                 "--json", str(tmp_path / "a.json")]) == 0
    assert f"under {spec}" in capsys.readouterr().out
    document = json.loads((tmp_path / "a.json").read_text())
    expected = attribute(model, tokenizer, saes(), load_suite_text(STEREOTYPE_SUITE, "t.yaml"), split="all",
                         under=steer.compile(str(spec), model))
    assert document["under"] == str(spec)
    assert document["metric"] == pytest.approx(expected.metric, rel=1e-5)
    assert [(r["site"], r["feature"]) for r in document["rows"]] == [(r.site, r.feature) for r in expected.top(6)]
    plain = attribute(model, tokenizer, saes(), load_suite_text(STEREOTYPE_SUITE, "t.yaml"), split="all")
    assert plain.metric != pytest.approx(expected.metric, rel=1e-3)

    bad = tmp_path / "bad.yaml"
    bad.write_text("edits:\n  - {project_out: missing.safetensors:u0, fraction: 1.0, site: writers}\n")
    assert main(["features", "attribute", "--suite", str(suite), "--sae", paths[0], "--model", model_dir,
                 "--under", str(bad)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.safetensors" in err
