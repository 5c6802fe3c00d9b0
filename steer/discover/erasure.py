"""Learned erasure: a subspace whose removal from every write takes away what a suite's fill does to its gap.

Feature edits act only where the edited features fire, and the features that carry
a stereotype name particular occupations: chosen on some occupations, they miss
others (README "Worked example": 181 attributed features carried 30% of the held-out
stereotype even when ablated outright). A *direction* removed from every write to
the residual stream acts on every token, and a mean difference is the wrong one
(it removes stated gender with the stereotype: README, rows (c) and (c⊥)). This
module *fits* the direction: an orthonormal ``Q`` (``d × r``) such that the edit

    every write w (the embedding output, attn_out.L and mlp_out.L of every layer):  w ← w − p·Q Qᵀ w

(``p`` = ``fraction``, 1 by default; above 1 past full removal) — exactly ``project_out`` of
each column of ``Q``, fraction ``p``, at site ``writers``, which
lowers into merged weights and rank-1 adapters — minimises, by gradient descent
through the model (Adam on an unconstrained ``W``, ``Q`` its QR factor):

- **spread** of the target: prompts that differ only in the value of the suite's
  ``correlate`` fill field (the same template, another occupation) form a group;
  the loss is the mean over groups of the variance of their gaps. That is *all*
  the fill does to the next token, not only the headline's contrast of the two
  sides of the midpoint (which a shuffle of occupations could meet);
- **lean** (weight ``lean_weight``, 0 by default): the mean over the same groups of the
  squared shift of the group's mean gap. The spread does not see a template's gaps all
  moving together, and a fit left free to move them shifted the pronoun after some
  templates for every subject, stated ones too ("Mr. Novak, a blacksmith, answered
  that": he → she);
- **shortfall** of the ``keep`` suites (accuracy headline, e.g. ``gender-explicit``):
  ``mean relu(min(t₀, cap) − t)`` over a minibatch drawn from all their prompts,
  ``t`` a prompt's margin toward its expected set and ``t₀`` the same without the
  edit, so a stated gender may win by more but not by less (up to ``cap`` nats).
  Per prompt, so a side that gains cannot pay for one that loses, as it can in an
  accuracy or a mean margin; but only on the templates kept, hence more than one;
- **hold** (optional suites of any rule, e.g. ``age``, ``capability``): the mean
  ``KL(base ‖ edited)`` of the next token at the end of each of their prompts, plus, for
  prompts of ``logprob_gap`` suites, the mean squared shift of their gap (a KL over the
  whole vocabulary can stay small while the two token sets a gap compares move);
- **KL** on neutral text: the mean next-token ``KL(base ‖ edited)``.

``loss = spread + lean_weight · lean + keep_weight · shortfall + hold_weight · (hold + hold_gap) + kl_weight · KL``,
on minibatches
drawn with a seeded generator (the same arguments give the same ``Q`` on the same
machine). The first column starts at the *first* target's contrast direction
(its headline's per-prompt weights applied to last-token activations at
``resid_post.⌊n/3⌋``: for gender-occupation, the direction row (c) of the README
removes); the others at seeded random directions. The start matters: on
SmolLM2-135M the discovery set's contrast direction (cosine −0.14 with the
suite's) costs KL 3.9 nats/token when removed, against 0.2 for the suite's, and a
fit started there still sat at spread 1.03 and KL 0.052 after 32 steps — so put
the suite whose contrast direction is cleanest first. ``init`` (a previous fit's
directions) replaces that start for its columns: a fit can be continued, or widened
to a higher rank around directions already found.

This is distributed-alignment-style search (Geiger et al.) for a linear
concept-erasure edit, fitted on behaviour instead of on a linear probe as LEACE
is. It generalises only as far as its prompts do: fit it on suites and splits
that the held-out check never sees, and on as many occupations and templates as
you have (in the worked example, adding a second fitting set of 40 occupations
and 6 templates went with held-out removal rising from 36% to 47%, though the
holds changed too). A ``hold`` protects the held prompts more than the
behaviour: holding the age suite's dev templates kept them within 0.2% while its
held-out templates moved 7.7%; adding the gap shift to the hold and a second set
of age templates brought that to +1.9%. And the suites that check it are not
the whole behaviour: fits that went on to −60% held out with every suite bound
met had the stated gender win less often on apposition prompts of our own
("Mr. Novak, a blacksmith, answered that": he → she), and the ``lean`` term
traded most of the removal for part of that back. A second ``keep`` suite of
stated-gender templates (appositions among them) stopped it — held out, the
female-subject margin moved −6% where it had moved −30% — and the removal
stopped near −50% with it (README "Worked example", "Going further").
"""

from __future__ import annotations

import random
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from steer.discover.attribution import batch_gaps, padded_batch, suite_gaps, target_weights
from steer.errors import SteerError
from steer.evaluate.scoring import logprob_scores, token_set_ids
from steer.evaluate.suites import Prompt, Suite, load_suite
from steer.generate import last_logit_only
from steer.models.adapters import Site, adapter_for, hidden_size
from steer.models.capture import capture, rewritten

KEEP_CAP = 3.0
"""nats: a keep prompt's margin need not exceed this, even where it did before the edit."""


@dataclass(frozen=True)
class Erasure:
    directions: torch.Tensor          # (d, r) float32, orthonormal columns
    history: tuple[dict, ...]         # per step: spread, shortfall, kl, loss
    before: dict                      # suite label (`labels`) -> headline score without the edit (fitting split)
    after: dict                       # ... with it

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"u0": û₀, ...}``: one unit direction per key, as `project_out direction FILE:KEY` reads them."""
        return {f"u{i}": self.directions[:, i].contiguous() for i in range(self.directions.shape[1])}


# -- the objective's parts ---------------------------------------------------------------


def fill_groups(suite: Suite, prompts: tuple[Prompt, ...]) -> list[list[int]]:
    """Indices of ``prompts`` grouped by everything but the value of the suite's ``correlate`` field: a group is
    one template (and any other fill) across the fill values. Groups of one are dropped (no spread)."""
    field = suite.scoring.correlate
    if suite.scoring.rule != "logprob_gap" or not field:
        raise SteerError(f"an erasure target needs a logprob_gap suite with `correlate:` (the fill whose effect is "
                         f"erased); {suite.name} has none", where=suite.path)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        value = next((v for key, v, _ in p.data if key == field), None)
        if value is None:
            raise SteerError(f"prompt {p.text!r} has no `{field}` value", where=suite.path)
        groups.setdefault(p.text.replace(value, "\0"), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def labels(suites: list[Suite]) -> list[str]:
    """One distinct label per suite for the before/after scores: its name, or where two suites share a name, the
    name with the suite's path (and its place in the list where the paths are the same too)."""
    names = [s.name for s in suites]
    out = [n if names.count(n) == 1 else f"{n} ({s.path})" for n, s in zip(names, suites)]
    return [x if out.count(x) == 1 else f"{x} #{i + 1}" for i, x in enumerate(out)]


def spread(groups: list[torch.Tensor]) -> torch.Tensor:
    """Mean over groups (each a tensor of gaps) of the group's population variance."""
    return torch.stack([g.var(unbiased=False) for g in groups]).mean()


def margins(suite: Suite, prompts: tuple[Prompt, ...], gaps: torch.Tensor) -> torch.Tensor:
    """Each prompt's margin toward its expected set: ``+gap`` where set ``a`` is expected, else ``−gap``."""
    a_label = suite.scoring.labels[0]
    sign = torch.tensor([1.0 if p.expect == a_label else -1.0 for p in prompts], dtype=gaps.dtype)
    return sign * gaps


def shortfall(edited: torch.Tensor, base: torch.Tensor, cap: float = KEEP_CAP) -> torch.Tensor:
    return torch.relu(base.clamp(max=cap) - edited).mean()


@contextmanager
def removed(model, q: torch.Tensor, fraction: float = 1.0):
    """Inside the block, every write to the stream loses ``fraction`` of its component in span(q) (``q``
    orthonormal ``(d, r)``; gradients flow to ``q``): ``project_out``'s ``−p·(x·û)·û`` per column, past full
    removal when ``fraction`` > 1."""
    def project(x):
        basis = q.to(x.dtype)
        return x - fraction * ((x @ basis) @ basis.T)

    with ExitStack() as stack:
        for site in adapter_for(model).writer_sites(model):
            stack.enter_context(rewritten(model, site, project))
        yield


def read_erasure(path, d_model: int | None = None) -> torch.Tensor:
    """The directions ``u0, u1, …`` (consecutive keys from ``u0``) of an erasure file `Erasure.tensors` wrote, as
    ``(d_model, k)`` float32; each checked as a direction of a spec is (`read_direction`), never unpickled.
    ``d_model`` None: the length of ``u0``, which every other direction must share."""
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    from steer.plan.compile import read_direction

    path = Path(path)
    where = f"erasure file {path}"
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if d_model is None and "u0" in keys:
                d_model = int(f.get_slice("u0").get_shape()[-1])
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, IndexError):
        keys = set()  # read_direction names the problem
    count = 0
    while f"u{count}" in keys:
        count += 1
    return torch.stack([read_direction(path, f"u{i}", d_model or 0, where) for i in range(max(count, 1))], dim=1)


# -- fitting -----------------------------------------------------------------------------------


class _Target:
    def __init__(self, tokenizer, suite: Suite, split: str):
        self.suite, self.prompts = suite, suite.select(split)
        self.a = token_set_ids(tokenizer, suite.scoring.a, f"{suite.path}: scoring.a")
        self.b = token_set_ids(tokenizer, suite.scoring.b, f"{suite.path}: scoring.b")

    def gaps(self, model, tokenizer, indices: list[int]) -> torch.Tensor:
        device = next(model.parameters()).device
        ids, mask, positions = padded_batch(tokenizer, [self.prompts[i].text for i in indices], self.suite.chat, device)
        return batch_gaps(model, ids, mask, positions, self.a, self.b).cpu()

    def score(self, model, tokenizer) -> float:
        return logprob_scores(self.suite.scoring, self.prompts, suite_gaps(model, tokenizer, self.suite, self.prompts))[0]


def contrast_direction(model, tokenizer, target: _Target) -> torch.Tensor:
    """The target headline's weights applied to last-token activations at resid_post.⌊n/3⌋ (the difference of the
    two sides' mean activations, as the headline contrasts them)."""
    adapter = adapter_for(model)
    site = Site(adapter.n_layers(model) // 3, "resid_post")
    prompts = target.prompts
    weights = target_weights(target.suite, prompts, suite_gaps(model, tokenizer, target.suite, prompts))
    total = None
    device = next(model.parameters()).device
    with torch.no_grad(), capture(model, [site]) as acts:
        for p, w in zip(prompts, weights):
            model(tokenizer(p.text, return_tensors="pt").input_ids.to(device))
            row = w * acts[site].pop()[0, -1].double().cpu()
            total = row if total is None else total + row
    return total.float()


def learn_erasure(model, tokenizer, targets, *, keep=(), hold=(), split: str = "dev",
                  neutral: torch.Tensor | None = None, rank: int = 1, steps: int = 60, lr: float = 0.03,
                  keep_weight: float = 1.0, kl_weight: float = 20.0, hold_weight: float = 20.0, lean_weight: float = 0.0,
                  groups_per_step: int = 4, keep_per_step: int = 48, hold_per_step: int = 32,
                  neutral_per_step: int = 2, seed: int = 0, init: torch.Tensor | None = None, average_last: int = 0,
                  fraction: float = 1.0, log=None) -> Erasure:
    """Fit the erasure (module docstring) on the ``split`` prompts of ``targets`` (suites or names, each with a
    ``correlate`` field), of ``keep`` (accuracy-headline suites or names, or one; optional) and of ``hold`` (suites of any rule
    whose next-token distribution at each prompt's end must not move: the mean ``KL(base ‖ edited)`` there,
    weighted ``hold_weight``, and for ``logprob_gap`` suites the squared shift of the gap), with ``neutral`` token
    rows ``(N, T)`` for the KL term (optional). ``init`` ``(d, k)``, ``k ≤ rank``, starts the first ``k`` columns
    (a previous fit's ``directions``). ``average_last`` > 0 returns, instead of the last step's ``Q``, the top
    ``rank`` eigenvectors of the mean projector ``Q Qᵀ`` over the last ``average_last`` steps (iterate averaging, as
    in stochastic weight averaging, done on projectors: the edit depends on ``Q Qᵀ`` only, so signs and rotations
    within the subspace cannot cancel). ``fraction`` (> 0, default 1) is the share of the component removed while
    fitting, as the spec's ``project_out`` fraction will apply it: fit at the fraction the edit ships at (above 1
    the component is removed and part of it reversed). ``log(step, parts)`` is called after every step."""
    if rank < 1 or steps < 0 or lr <= 0 or not 0 <= average_last <= steps or not 0 < fraction < float("inf"):
        raise SteerError(f"rank must be ≥ 1, steps ≥ 0, lr > 0, 0 ≤ average_last ≤ steps and fraction > 0 (finite); got "
                         f"rank={rank}, steps={steps}, lr={lr}, average_last={average_last}, fraction={fraction}",
                         where="erasure")
    width = hidden_size(model)
    if init is not None and (init.ndim != 2 or init.shape[0] != width or not 1 <= init.shape[1] <= rank
                             or not torch.isfinite(init).all() or bool((init.norm(dim=0) == 0).any())):
        raise SteerError(f"the starting directions must be {width} × k with 1 ≤ k ≤ rank ({rank}), finite and "
                         f"non-zero; got {tuple(init.shape)}", where="erasure")
    targets = [_Target(tokenizer, load_suite(t), split) for t in targets]
    if not targets:
        raise SteerError("give at least one target suite", where="erasure")
    pool = [(t, g) for t in targets for g in fill_groups(t.suite, t.prompts)]
    if not pool:
        raise SteerError(f"no target prompts in split {split} differ only in their fill value", where="erasure")
    keep = [] if keep is None else [keep] if isinstance(keep, (str, Suite)) else list(keep)
    kept = [_Target(tokenizer, load_suite(k), split) for k in keep]
    for k in kept:
        if k.suite.scoring.headline != "accuracy":
            raise SteerError(f"a keep suite needs an accuracy headline (prompts with an expected set); {k.suite.name} "
                             f"has {k.suite.scoring.headline or k.suite.scoring.rule}", where=k.suite.path)
    held = [(suite, p) for suite in map(load_suite, hold) for p in suite.select(split)]
    settings = _Settings(rank, steps, lr, keep_weight, kl_weight, hold_weight, lean_weight, groups_per_step,
                         keep_per_step, hold_per_step, neutral_per_step, seed, None if init is None else init.float().cpu(),
                         average_last, fraction)
    params = list(model.parameters())
    frozen = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        return _fit(model, tokenizer, targets, pool, kept, held, neutral, settings, log)
    finally:
        for p, flag in zip(params, frozen):
            p.requires_grad_(flag)


@dataclass(frozen=True)
class _Settings:
    rank: int
    steps: int
    lr: float
    keep_weight: float
    kl_weight: float
    hold_weight: float
    lean_weight: float
    groups_per_step: int
    keep_per_step: int
    hold_per_step: int
    neutral_per_step: int
    seed: int
    init: torch.Tensor | None
    average_last: int
    fraction: float


def mean_subspace(projector: torch.Tensor, rank: int, like: torch.Tensor) -> torch.Tensor:
    """The ``rank`` leading eigenvectors (``d × rank``, float32, orthonormal) of a mean of projectors, each signed
    to point the way the matching column of ``like`` does (the eigenvectors' signs are arbitrary)."""
    values, vectors = torch.linalg.eigh(projector.double())
    top = vectors[:, values.argsort(descending=True)[:rank]].float()
    signs = torch.sign((top * like.to(top)).sum(0))
    return top * torch.where(signs == 0, torch.ones_like(signs), signs)


def _end_logprobs(model, tokenizer, pairs: list) -> torch.Tensor:
    """``(N, V)`` next-token log-probs at the end of each ``(suite, prompt)`` (its suite's chat formatting)."""
    device = next(model.parameters()).device
    rows = [None] * len(pairs)
    for chat in {suite.chat for suite, _ in pairs}:
        at = [i for i, (suite, _) in enumerate(pairs) if suite.chat == chat]
        ids, mask, positions = padded_batch(tokenizer, [pairs[i][1].text for i in at], chat, device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **last_logit_only(model)).logits
        out = torch.log_softmax(logits[:, -1].double(), -1)
        for j, i in enumerate(at):
            rows[i] = out[j]
    return torch.stack(rows).cpu()


def _gap_sets(tokenizer, held: list) -> dict:
    """``{suite path: (set a ids, set b ids)}`` for the held ``logprob_gap`` suites (read once, before the steps)."""
    return {suite.path: tuple(torch.tensor(token_set_ids(tokenizer, tokens, f"{suite.path}: scoring.{key}"))
                              for key, tokens in (("a", suite.scoring.a), ("b", suite.scoring.b)))
            for suite, _ in held if suite.scoring.rule == "logprob_gap"}


def _gap_shift(sets: dict, pairs: list, base: torch.Tensor, edited: torch.Tensor) -> torch.Tensor | None:
    """Mean squared change of the gap (log P(set a) − log P(set b)) over the pairs of ``logprob_gap`` suites (their
    token sets in ``sets``), from their end-of-prompt log-probs; None when no pair has a gap."""
    rows = []
    for i, (suite, _) in enumerate(pairs):
        if suite.path in sets:
            a, b = sets[suite.path]
            gap = [row[a].logsumexp(0) - row[b].logsumexp(0) for row in (base[i], edited[i])]
            rows.append((gap[1] - gap[0]) ** 2)
    return torch.stack(rows).mean() if rows else None


def _kl(base: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(base ‖ edited)`` over rows of log-probs (last dimension)."""
    return (base.exp() * (base - edited)).sum(-1).mean()


def _fit(model, tokenizer, targets, pool, kept, held, neutral, settings: _Settings, log) -> Erasure:
    rng = random.Random(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    start = torch.randn(hidden_size(model), settings.rank, generator=generator)
    if settings.init is None:
        start[:, 0] = contrast_direction(model, tokenizer, targets[0])
    else:
        start[:, :settings.init.shape[1]] = settings.init
    start = 3.0 * start / start.norm(dim=0, keepdim=True)
    weights = torch.nn.Parameter(start)
    optimiser = torch.optim.Adam([weights], lr=settings.lr)
    keep_pool = [(k, i) for k in kept for i in range(len(k.prompts))]
    with torch.no_grad():
        # the keep prompts are scored once, for the margins and the `before` scores (the worked example's keep
        # sets hold 4,800 prompts: minutes on 2 cores)
        keep_gaps = {id(k): suite_gaps(model, tokenizer, k.suite, k.prompts) for k in kept}
        base_keep = {id(k): margins(k.suite, k.prompts, torch.tensor(keep_gaps[id(k)], dtype=torch.float64))
                     for k in kept}
        base_lean = {(id(target), tuple(group)): target.gaps(model, tokenizer, group).double().mean()
                     for target, group in pool} if settings.lean_weight > 0 else {}
    gap_sets = _gap_sets(tokenizer, held)
    names = labels([t.suite for t in targets + kept])
    before = {name: logprob_scores(t.suite.scoring, t.prompts, keep_gaps[id(t)])[0] if id(t) in keep_gaps
              else t.score(model, tokenizer) for name, t in zip(names, targets + kept)}
    history = []
    projector = None  # the sum of Q Qᵀ over the averaged steps
    for step in range(settings.steps):
        q = torch.linalg.qr(weights)[0]
        parts = {}
        with removed(model, q, settings.fraction):
            chosen = rng.sample(pool, min(settings.groups_per_step, len(pool)))
            gaps = [target.gaps(model, tokenizer, group) for target, group in chosen]
            parts["spread"] = spread(gaps)
            loss = parts["spread"]
            if base_lean:
                parts["lean"] = torch.stack([(g.double().mean() - base_lean[id(target), tuple(group)]) ** 2
                                             for g, (target, group) in zip(gaps, chosen)]).mean()
                loss = loss + settings.lean_weight * parts["lean"]
            if keep_pool:
                drawn = rng.sample(keep_pool, min(settings.keep_per_step, len(keep_pool)))
                edited, base = [], []
                for k in kept:
                    indices = [i for j, i in drawn if j is k]
                    if indices:
                        edited.append(margins(k.suite, tuple(k.prompts[i] for i in indices),
                                              k.gaps(model, tokenizer, indices)))
                        base.append(base_keep[id(k)][indices])
                parts["shortfall"] = shortfall(torch.cat(edited), torch.cat(base))
                loss = loss + settings.keep_weight * parts["shortfall"]
        if held and settings.hold_weight > 0:
            pairs = rng.sample(held, min(settings.hold_per_step, len(held)))
            with torch.no_grad():
                base = _end_logprobs(model, tokenizer, pairs)
            with removed(model, q, settings.fraction):
                edited = _end_logprobs(model, tokenizer, pairs)
            parts["hold"] = _kl(base, edited)
            loss = loss + settings.hold_weight * parts["hold"]
            shift = _gap_shift(gap_sets, pairs, base, edited)
            if shift is not None:
                parts["hold_gap"] = shift
                loss = loss + settings.hold_weight * shift
        if neutral is not None and settings.kl_weight > 0:
            rows = neutral[rng.sample(range(neutral.shape[0]), min(settings.neutral_per_step, neutral.shape[0]))]
            rows = rows.to(next(model.parameters()).device)
            with torch.no_grad():
                base = torch.log_softmax(model(input_ids=rows).logits.double(), -1)
            with removed(model, q, settings.fraction):
                edited = torch.log_softmax(model(input_ids=rows).logits.double(), -1)
            parts["kl"] = _kl(base, edited).cpu()
            loss = loss + settings.kl_weight * parts["kl"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step >= settings.steps - settings.average_last:
            q_now = torch.linalg.qr(weights.detach())[0].double()
            projector = q_now @ q_now.T if projector is None else projector + q_now @ q_now.T
        record = {"step": step, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
        history.append(record)
        if log is not None:
            log(step, record)
    q = torch.linalg.qr(weights.detach())[0].float()
    if projector is not None:
        q = mean_subspace(projector / settings.average_last, settings.rank, like=q)
    with torch.no_grad(), removed(model, q, settings.fraction):
        after = {name: t.score(model, tokenizer) for name, t in zip(names, targets + kept)}
    return Erasure(directions=q, history=tuple(history), before=before, after=after)
