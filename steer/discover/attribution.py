"""Causal feature discovery: which SAE features, at which depths, drive a suite's score (attribution patching).

For a ``logprob_gap`` suite (`steer.evaluate.suites`) the *target* is its
headline score written as a differentiable function of the per-prompt gaps
``g_p = log P(A) − log P(B)`` of the next token, linear around the clean run:

- ``stereotype``: ``sign(s) · s`` with ``s = mean_v∈low(ḡ_v) − mean_v∈high(ḡ_v)``
  (ḡ_v a fill value's mean gap): the |stereotype| score itself;
- ``accuracy``: the mean margin toward the expected set (the accuracy is a
  step function; its margin is what moves it);
- ``mean_abs``: ``mean_p sign(g_p) · g_p``, the mean |gap|.

So ``m = Σ_p w_p g_p`` with weights fixed from the clean run. One forward and
one backward pass give ``∂m/∂x_t`` at every given site at once: each site's
activation is replaced by ``x + z`` with ``z`` a zero leaf tensor, so values are
unchanged and gradients flow through every path (an earlier site's gradient
includes the paths through later sites). A feature's **attribution** at a site is

    a_i = Σ_p Σ_t f_i(x_pt) · σ_pt · (d_i · ∂m/∂x_pt)

(σ the SAE's input scale, as the hooks use it): the first-order change of
``m`` when the feature is zeroed is ``−a_i`` — zeroing is what ``ablate``
(``scale`` by 0) does, keeping the SAE's error term. ``a_i > 0``: the feature
carries the score (removing it lowers a stereotype, or a preservation margin).
Features of every site are ranked together, largest ``a_i`` first.

**Contrast** (``contrast=`` a second suite, e.g. ``gender-explicit``): each
feature's attribution to the contrast suite's target is computed the same way,
and features are ranked by *selectivity* ``a_i / |m| − |c_i| / |m_c|`` — the
share of the target score the feature carries minus the share of the contrast
score it touches either way: features that drive the stereotype prompts but not
the stated-gender ones come first.

**Verification** (`verify_attribution`): the top N are ablated for real, one at a
time, under `steer.applied`; each row gets the true change of ``m`` (same
weights) beside the estimate ``−a_i``, and the true change of the suite's
headline score. Exact where ``m`` is linear in the feature (a linear model
past the site); a correlation elsewhere (attention and MLP nonlinearities,
and the SAE's own encoder for topk SAEs, whose other features re-rank).

**The first token is left out** (``include_first=False``, the default): in
these models the first position is an attention sink whose residual norm is
about 100× every other's (SmolLM2-135M at resid_post.16: ≈ 22,650 against ≈ 200),
and an SAE trained on it spends features on it alone that fire on nothing else.
Their activation × gradient there is large for *every* target, and ablating
one does move a stereotype score — by breaking the sink: measured on the shipped
SAEs, the four features attribution ranked first with the first token included
(resid_post.16/2317 and 3623, resid_post.3/4009 and 3148) fire only at position
0, and ablating resid_post.16/2317 alone costs KL 0.61 nats/token on neutral
text. A feature's attribution therefore sums over positions ≥ 1 of each prompt
(the first *real* token under left padding). And because an edit acts at every
position, a feature that fires at *any* prompt's first token — not only the
sink-only ones — is flagged (``at_first``) and ranked after every other: editing
it edits the sink too. Measured on the shipped SAEs: the 100 most selective
stereotype features of a discovery set, ablated together, cost KL 4.4
nats/token with the 17 that fire at a first token among them, and 0.10 without.

**Under an edit** (``under=`` a compiled `Plan`, ``steer features attribute --under SPEC``): every pass runs
with the edit's hooks in place, so the target, the features and their gradients are those of the edited model —
what a second edit would be chosen on, to remove what the first one leaves. A feature edit of the ranking then
adds to that edit (the worked example's row (f): a learned erasure, then the features that carry what it
leaves). Tested against the same ranking on weights with the edit merged by hand. Verification ablates each
feature on top of the edit (the ablation's hooks after the edit's at a shared site).

**Side-effect estimate** (``neutral=`` token rows): the same patching on the mean
next-token loss of neutral text gives each feature's ``cost``, the first-order
change of that loss (nats/token) if it were zeroed: what editing it is likely to
cost outside the target, before any edit is run.

Designed to extend to transcoders and cross-layer graphs: an attribution is a
``(site, feature) → number`` table from one backward pass; a transcoder adds a
reader (its encoder input) and a writer (its decoder output) per site.

Never changes the model: hooks are removed on exit.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch

from steer.errors import SteerError
from steer.evaluate.scoring import logprob_scores, token_set_ids
from steer.evaluate.suites import Prompt, Suite, load_suite
from steer.generate import last_logit_only, prompt_ids

BATCH = 32
"""Prompts per forward/backward pass."""


@dataclass(frozen=True)
class FeatureAttribution:
    site: str
    feature: int
    attribution: float
    """a_i: the target's first-order drop if the feature were zeroed (the estimate of the ablation is −a_i)."""
    contrast: float | None = None
    """c_i: the same for the contrast suite's target (None without one)."""
    selectivity: float | None = None
    """a_i/|m| − |c_i|/|m_c| (contrast mode): what the ranking sorts by."""
    at_first: bool = False
    """The feature fires at some prompt's first token (the attention sink). An edit acts at every position, so
    editing it edits the sink too; such features rank after every other (module docstring)."""
    cost: float | None = None
    """Estimated change of the mean next-token loss (nats/token) on neutral text if the feature were zeroed:
    the edit's side effect to first order (None when not asked for)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Attribution:
    suite: Suite
    """The target suite (its headline is the target)."""
    split: str
    metric: float
    """The target m on the clean model (the suite's headline in its differentiable form)."""
    rows: tuple[FeatureAttribution, ...]
    """Every feature at every site, ranked (selectivity in contrast mode, else attribution), best first."""
    contrast_suite: Suite | None = None
    contrast_metric: float | None = None

    def top(self, n: int) -> list[FeatureAttribution]:
        return list(self.rows[:n])


# -- the target as a linear form of the gaps ------------------------------------------


def target_weights(suite: Suite, prompts: tuple[Prompt, ...], gaps: list[float]) -> list[float]:
    """``w_p`` with ``m = Σ w_p g_p`` equal to the suite's headline (module docstring) at these gaps."""
    scoring = suite.scoring
    n = len(prompts)
    if scoring.rule != "logprob_gap":
        raise SteerError(f"attribution needs a logprob_gap suite (a log-prob target); {suite.name} is {scoring.rule}",
                         where=suite.path)
    if scoring.headline == "accuracy":
        a_label = scoring.labels[0]
        return [(1.0 if p.expect == a_label else -1.0) / n for p in prompts]
    if scoring.headline == "stereotype":
        groups: dict[tuple[str, float], list[int]] = {}
        for i, p in enumerate(prompts):
            for key, value, number in p.data:
                if key == scoring.correlate:
                    groups.setdefault((value, number), []).append(i)
        low = [g for (_, x), g in groups.items() if x < scoring.midpoint]
        high = [g for (_, x), g in groups.items() if x > scoring.midpoint]
        if not low or not high:
            raise SteerError(f"this split of {suite.name} has no fill values on one side of the midpoint",
                             where=suite.path)
        weights = [0.0] * n
        for members in low:
            for i in members:
                weights[i] += 1.0 / (len(low) * len(members))
        for members in high:
            for i in members:
                weights[i] -= 1.0 / (len(high) * len(members))
        stereotype = sum(w * g for w, g in zip(weights, gaps))
        sign = 1.0 if stereotype >= 0 else -1.0
        return [sign * w for w in weights]
    return [(1.0 if g >= 0 else -1.0) / n for g in gaps]


# -- one pass: gaps, and gradients at the sites -------------------------------------------


def padded_batch(tokenizer, texts: list[str], chat: bool, device):
    """Left-padded ``(ids, mask, positions)`` for ``texts``; positions count real tokens only."""
    encoded = [prompt_ids(tokenizer, [t], chat=chat)["input_ids"][0].tolist() for t in texts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)              # (B, T)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)    # (B, T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def batch_gaps(model, ids, mask, positions, a: list[int], b: list[int]) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   **last_logit_only(model)).logits[:, -1].double()                                  # (B, V)
    logp = torch.log_softmax(logits, dim=-1)
    return logp[:, a].logsumexp(-1) - logp[:, b].logsumexp(-1)                                       # (B,)


def suite_gaps(model, tokenizer, suite: Suite, prompts, plan=None, *, batch_size: int = BATCH,
               under=None) -> list[float]:
    """The per-prompt gaps (no gradient), under ``plan`` if given; with ``under`` too, ``plan``'s hooks run after
    ``under``'s (an ablation on top of an edit)."""
    from steer.lower.hooks import applied

    a = token_set_ids(tokenizer, suite.scoring.a, f"{suite.path}: scoring.a")
    b = token_set_ids(tokenizer, suite.scoring.b, f"{suite.path}: scoring.b")
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            ids, mask, positions = padded_batch(tokenizer, [p.text for p in prompts[start:start + batch_size]], suite.chat, device)
            with ExitStack() as stack:
                for each in (under, plan):
                    if each is not None:
                        stack.enter_context(applied(model, each, prompt_length=ids.shape[1]))
                out += batch_gaps(model, ids, mask, positions, a, b).tolist()
    return out


def site_attributions(model, tokenizer, saes: dict, suite: Suite, prompts, weights: list[float], *,
                      batch_size: int = BATCH, include_first: bool = False,
                      first_firing: dict | None = None, under=None) -> dict[str, torch.Tensor]:
    """``{site: (d_sae,)}`` float64 attributions ``a_i`` of ``m = Σ w_p g_p`` (module docstring) for every SAE,
    summed over every real token but each prompt's first (the attention sink) unless ``include_first``. With
    ``first_firing`` (site → bool ``(d_sae,)``), also marks there every feature that fires at a first token; with
    ``under`` (a Plan), on the edited model."""
    a = token_set_ids(tokenizer, suite.scoring.a, f"{suite.path}: scoring.a")
    b = token_set_ids(tokenizer, suite.scoring.b, f"{suite.path}: scoring.b")
    param, adapter_sites, here, totals = _prepared(model, saes)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask, positions = padded_batch(tokenizer, [p.text for p in chunk], suite.chat, param.device)
        w = torch.tensor(weights[start:start + len(chunk)], dtype=torch.float64, device=param.device)
        valid = mask.bool() if include_first else mask.bool() & (positions > 0)
        features = _accumulate(model, here, adapter_sites, lambda: (w * batch_gaps(model, ids, mask, positions, a, b)).sum(),
                               valid, totals, under=under, prompt_length=ids.shape[1])
        if first_firing is not None:
            first = (mask.bool() & (positions == 0))[..., None]
            for name, f in features.items():
                fired = ((f > 0) & first).any(dim=0).any(dim=0).cpu()
                first_firing[name] = fired if name not in first_firing else first_firing[name] | fired
    return totals


def loss_costs(model, saes: dict, rows: torch.Tensor, *, batch_size: int = 8, under=None) -> dict[str, torch.Tensor]:
    """``{site: (d_sae,)}`` estimated change of the mean next-token loss (nats/token) on the token ``rows``
    ``(N, T)`` if each feature were zeroed: ``−Σ_t f_i(x_t) σ_t (d_i · ∂L/∂x_t)`` with ``L`` the mean loss, by
    the same attribution patching (each row's first position left out of the sum, as for the target)."""
    param, adapter_sites, here, totals = _prepared(model, saes)
    predictions = rows.shape[0] * (rows.shape[1] - 1)
    for start in range(0, rows.shape[0], batch_size):
        ids = rows[start:start + batch_size].to(param.device)

        def loss():
            logits = model(input_ids=ids).logits[:, :-1].double()
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                     reduction="sum") / predictions
        valid = torch.ones_like(ids, dtype=torch.bool)
        valid[:, 0] = False
        _accumulate(model, here, adapter_sites, loss, valid, totals, under=under)
    return {name: -t for name, t in totals.items()}


def _prepared(model, saes: dict):
    """(a parameter, site name → Site, the SAEs in the model's dtype and device, zeroed float64 totals per site)."""
    param = next(model.parameters())
    adapter_sites = {name: _parse_site(model, name) for name in saes}
    here = {name: sae.to(dtype=param.dtype, device=param.device) for name, sae in saes.items()}
    totals = {name: torch.zeros(sae.d_sae, dtype=torch.float64) for name, sae in saes.items()}
    return param, adapter_sites, here, totals


def _accumulate(model, here: dict, adapter_sites: dict, objective, valid: torch.Tensor, totals: dict, *,
                under=None, prompt_length: int | None = None) -> dict:
    """One forward and backward pass of the scalar ``objective()`` with every site spliced (``x + z``, ``z`` a
    zero leaf); adds ``Σ_t f_i σ_t (d_i · ∂objective/∂x_t)`` over ``valid`` ``(B, T)`` positions into ``totals``
    per site, and returns each site's features ``(B, T, d_sae)``. With ``under`` (a Plan), its hooks go in first:
    at a site it shares, the splice (and the SAE) read the edited activation."""
    from steer.lower.hooks import applied
    from steer.models.capture import rewritten

    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def splice(x, name):
        z = torch.zeros_like(x, requires_grad=True)  # x + z: same values; ∂m/∂z = ∂m/∂x, through every path
        seen[name] = (x.detach(), z)
        return x + z

    with ExitStack() as stack, torch.enable_grad():
        if under is not None:
            stack.enter_context(applied(model, under, prompt_length=prompt_length))
        for name, site in adapter_sites.items():
            stack.enter_context(rewritten(model, site, lambda x, name=name: splice(x, name)))
        objective().backward()
    features = {}
    with torch.no_grad():
        for name, sae in here.items():
            x, z = seen[name]
            f = sae.encode(x)                                                                           # (B, T, d_sae)
            _, _, sigma = sae.normalize(x)
            sigma = sigma if isinstance(sigma, torch.Tensor) else torch.full_like(x[..., :1], float(sigma))
            along = (z.grad * sigma) @ sae.W_dec.T                                                      # (B, T, d_sae)
            totals[name] += (f * along * valid[..., None]).sum(dim=(0, 1)).double().cpu()
            features[name] = f
    return features


def _parse_site(model, name: str):
    from steer.models.adapters import adapter_for

    return adapter_for(model).parse_site(str(name), model)


# -- the ranking ------------------------------------------------------------------------


def attribute(model, tokenizer, saes, suite, *, split: str = "dev", contrast=None, batch_size: int = BATCH,
              include_first: bool = False, neutral: torch.Tensor | None = None, under=None) -> Attribution:
    """Attributions of ``suite``'s target on its ``split`` prompts to every feature of ``saes`` (a list of SAEs,
    each read at the site its config names, or a ``{site: SAE}`` mapping), ranked across sites; with
    ``contrast`` (a suite), ranked by selectivity against that suite's target. Each prompt's first token (the
    attention sink, module docstring) counts only with ``include_first``; without it, features that fire at a
    first token rank after all others. With ``neutral`` (token rows ``(N, T)``), each row also carries its
    `loss_costs` estimate. With ``under`` (a compiled `Plan`), everything is measured on the edited model (module
    docstring)."""
    saes = _by_site(saes)
    suite = load_suite(suite)
    prompts = suite.select(split)
    gaps = suite_gaps(model, tokenizer, suite, prompts, under, batch_size=batch_size)
    weights = target_weights(suite, prompts, gaps)
    metric = sum(w * g for w, g in zip(weights, gaps))
    first_firing: dict = {}
    scores = site_attributions(model, tokenizer, saes, suite, prompts, weights, batch_size=batch_size,
                               include_first=include_first, first_firing=first_firing, under=under)
    other, other_metric, other_scores = None, None, None
    if contrast is not None:
        other = load_suite(contrast)
        other_prompts = other.select(split)
        other_gaps = suite_gaps(model, tokenizer, other, other_prompts, under, batch_size=batch_size)
        other_weights = target_weights(other, other_prompts, other_gaps)
        other_metric = sum(w * g for w, g in zip(other_weights, other_gaps))
        other_scores = site_attributions(model, tokenizer, saes, other, other_prompts, other_weights,
                                         batch_size=batch_size, include_first=include_first,
                                         first_firing=first_firing, under=under)
    costs = loss_costs(model, saes, neutral, under=under) if neutral is not None else None
    rows = []
    for site, values in scores.items():
        sink = first_firing[site].tolist()
        cost = costs[site].tolist() if costs is not None else None
        for i, value in enumerate(values.tolist()):
            extra = {"at_first": bool(sink[i]), "cost": cost[i] if cost is not None else None}
            if other_scores is None:
                rows.append(FeatureAttribution(site, i, value, **extra))
            else:
                c = float(other_scores[site][i])
                selectivity = value / max(abs(metric), 1e-12) - abs(c) / max(abs(other_metric), 1e-12)
                rows.append(FeatureAttribution(site, i, value, c, selectivity, **extra))
    key = (lambda r: -r.selectivity) if other_scores is not None else (lambda r: -r.attribution)
    rows.sort(key=lambda r: (r.at_first and not include_first, key(r), r.site, r.feature))
    return Attribution(suite=suite, split=split, metric=metric, rows=tuple(rows), contrast_suite=other,
                       contrast_metric=other_metric)


def _by_site(saes) -> dict:
    if isinstance(saes, dict):
        return dict(saes)
    out = {}
    for sae in saes:
        if sae.site is None:
            raise SteerError("the SAE's config names no site", where=sae.source or "sae")
        if str(sae.site) in out:
            raise SteerError(f"two SAEs read the same site {sae.site}; give one per site", where=sae.source or "sae")
        out[str(sae.site)] = sae
    if not out:
        raise SteerError("give at least one SAE", where="--sae")
    return out


# -- checking the estimate against real ablations -------------------------------------------------


@dataclass(frozen=True)
class Verified:
    row: FeatureAttribution
    estimate: float
    """−a_i: the first-order change of the target when the feature is zeroed."""
    true: float
    """The measured change of the same target (weights of the clean run) with the feature ablated by steer's hooks."""
    score_change: float
    """The measured change of the suite's headline score."""


def verify_attribution(model, tokenizer, attribution: Attribution, saes, n: int, *,
                       batch_size: int = BATCH, under=None) -> list[Verified]:
    """Ablate each of the top ``n`` features alone (``scale`` by 0 at its site, error term kept) and measure; with
    ``under`` (the Plan the attribution was taken under), on top of that edit."""
    from steer.plan import compile as compile_plan
    from steer.spec import parse_spec

    saes = _by_site(saes)
    suite = attribution.suite
    prompts = suite.select(attribution.split)
    clean = suite_gaps(model, tokenizer, suite, prompts, batch_size=batch_size, under=under)
    weights = target_weights(suite, prompts, clean)
    clean_score, _ = logprob_scores(suite.scoring, prompts, clean)
    out = []
    for row in attribution.top(n):
        spec = parse_spec(f"ablate feature {row.feature} site {row.site}")
        plan = compile_plan(spec, model, saes[row.site])
        gaps = suite_gaps(model, tokenizer, suite, prompts, plan, batch_size=batch_size, under=under)
        score, _ = logprob_scores(suite.scoring, prompts, gaps)
        true = sum(w * (g - g0) for w, g, g0 in zip(weights, gaps, clean))
        out.append(Verified(row, -row.attribution, true, score - clean_score))
    return out


__all__ = ["Attribution", "FeatureAttribution", "Verified", "attribute", "loss_costs", "site_attributions",
           "suite_gaps", "target_weights", "verify_attribution"]
