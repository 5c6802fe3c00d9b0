"""What an edit does, base vs steered, in one report: side effects on neutral text and the suites' scores.

``evaluate(plan, model, tokenizer, suites)`` measures

- on **neutral text** — by default the first `NEUTRAL_TOKENS` tokens of the
  embedded BBC News corpus's held-out documents (the rule of
  `steer.data.corpus`, fraction `NEUTRAL_HELD_OUT`: the documents the default
  SAE never trained on), packed into rows of `NEUTRAL_CONTEXT` tokens; every
  next-token prediction in a row is compared — the per-token
  **KL(base ‖ steered)** in nats (mean and max), **perplexity** of the text
  under each model and its change in %, and **top-1 agreement**;
- each **suite**'s score (`steer.evaluate.scoring`) base and steered, and the
  relative change.

The steered side is ``model`` under ``plan`` (exact hooks) or, with
``steered_model``, another model with no plan (an exported checkpoint). The
neutral text is read as one prompt per row, so edits with ``scope:
generation`` do not act on it (they act in generation suites).

`Baseline` holds the base model's numbers so sweeps and tuning measure the base
once. `evaluate_many` evaluates several plans together: each suite's prompts ×
the plans (and the unedited model, where the baseline lacks that suite) and the
neutral rows × the plans run as rows of shared forward passes through per-row
plans (`steer.evaluate.scoring.score_suite_rows`), at most ``batch_rows`` rows
a pass (a neutral row, 128 tokens with full-vocabulary logits, counts as
`NEUTRAL_ROW_COST` rows); each plan's report is what `evaluate` gives for it
alone, within float tolerance. `evaluation_for_export` turns a `Report` into
the manifest's ``evaluation`` field and the edit card's lines. Never changes
the model.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from steer.errors import SteerError
from steer.evaluate.scoring import BATCH_ROWS, SuiteResult, score_suite, score_suite_rows
from steer.evaluate.suites import Suite, load_suites
from steer.lower.hooks import applied

NEUTRAL_TOKENS = 1024
"""Tokens of neutral text read by default (8 rows of 128: 1,016 next-token predictions)."""
NEUTRAL_CONTEXT = 128
NEUTRAL_HELD_OUT = 0.05
"""The default corpus's held-out fraction — the same rule and fraction the default SAE recipe trains with."""
NEUTRAL_BATCH = 4
"""Rows per forward pass, one plan at a time (a row's logits are 128 × vocabulary floats)."""
NEUTRAL_ROW_COST = 32
"""What a neutral row counts against ``batch_rows`` (a prompt row keeps one position's logits, a neutral row 127)."""


# -- neutral text --------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NeutralText:
    source: str
    """What the text is, for reports."""
    rows: torch.Tensor
    """``(R, T)`` token ids."""

    @property
    def predictions(self) -> int:
        return self.rows.shape[0] * (self.rows.shape[1] - 1)


def neutral_text(tokenizer, source="default", *, tokens: int = NEUTRAL_TOKENS, context: int = NEUTRAL_CONTEXT) -> NeutralText:
    """``source``: ``default`` (BBC held-out), ``calibration`` (steer's calibration text), a corpus path, or a list of texts."""
    from steer.data.corpus import open_corpus, token_sequences
    from steer.verify.fidelity import calibration_texts

    if tokens < 2 or context < 2:
        raise SteerError(f"neutral text needs at least 2 tokens per row, got tokens={tokens}, context={context}",
                         where="--neutral-tokens")
    context = min(context, tokens)
    if isinstance(source, (list, tuple)):
        documents, name = list(source), f"{len(source)} given texts"
    elif source == "calibration":
        documents, name = calibration_texts(), "steer's calibration text"
    elif source == "default":
        documents = open_corpus("default").documents("held_out", NEUTRAL_HELD_OUT)
        name = f"BBC News held-out documents (default corpus, held_out {NEUTRAL_HELD_OUT:g})"
    else:
        documents, name = open_corpus(source).documents("all"), f"corpus {source}"
    rows = []
    for row in token_sequences(documents, tokenizer, context):
        rows.append(row)
        if len(rows) * context >= tokens:
            break
    if not rows:
        raise SteerError(f"the neutral text has fewer than {context} tokens", where=f"neutral {name}")
    return NeutralText(source=name, rows=torch.stack(rows))


@torch.no_grad()
def _row_logprobs(model, rows: torch.Tensor, plan) -> torch.Tensor:
    """``(B, T-1, V)`` float32 next-token log-probs at each position but the last; ``plan`` a Plan, None, or one
    Plan-or-None per row."""
    ids = rows.to(next(model.parameters()).device)
    if isinstance(plan, list):
        plan = None if all(p is None for p in plan) else plan[0] if all(p is plan[0] for p in plan) else plan
    with applied(model, plan) if plan is not None else nullcontext():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


@dataclass(frozen=True)
class NeutralEffect:
    source: str
    predictions: int
    """Next-token predictions compared."""
    kl_mean: float
    """Mean per-token KL(base ‖ steered), nats."""
    kl_max: float
    top1: float
    """Fraction of predictions whose argmax agrees."""
    ppl_base: float
    ppl_steered: float

    @property
    def ppl_change_pct(self) -> float:
        return 100.0 * (self.ppl_steered / self.ppl_base - 1.0)

    def as_dict(self) -> dict:
        return {"source": self.source, "predictions": self.predictions, "kl_mean": self.kl_mean, "kl_max": self.kl_max,
                "top1": self.top1, "ppl_base": self.ppl_base, "ppl_steered": self.ppl_steered,
                "ppl_change_pct": self.ppl_change_pct}


# -- the base model's numbers, measured once ------------------------------------


@dataclass(eq=False)
class Baseline:
    neutral: NeutralText
    logprobs: torch.Tensor
    """``(R, T-1, V)`` the base model's next-token log-probs on the neutral rows."""
    suites: dict[tuple[str, str], SuiteResult] = field(default_factory=dict)
    """(suite name, split) → the base model's result."""

    def suite(self, model, tokenizer, suite: Suite, split: str) -> SuiteResult:
        key = (suite.name, split)
        if key not in self.suites:
            self.suites[key] = score_suite(model, tokenizer, suite, None, split=split)
        return self.suites[key]


def measure_baseline(model, tokenizer, suites=(), *, neutral="default", neutral_tokens: int = NEUTRAL_TOKENS,
                     split: str = "all") -> Baseline:
    text = neutral if isinstance(neutral, NeutralText) else neutral_text(tokenizer, neutral, tokens=neutral_tokens)
    parts = [_row_logprobs(model, text.rows[i:i + NEUTRAL_BATCH], None) for i in range(0, len(text.rows), NEUTRAL_BATCH)]
    baseline = Baseline(neutral=text, logprobs=torch.cat(parts))
    for suite in load_suites(suites):
        baseline.suite(model, tokenizer, suite, split)
    return baseline


def neutral_effect(baseline: Baseline, model, plan) -> NeutralEffect:
    """Compare ``model`` under ``plan`` with the baseline on its neutral rows."""
    rows = baseline.neutral.rows
    tally = _Tally()
    for i in range(0, len(rows), NEUTRAL_BATCH):
        steered = _row_logprobs(model, rows[i:i + NEUTRAL_BATCH], plan)            # (B, T-1, V)
        for j in range(steered.shape[0]):
            tally.add(baseline.logprobs[i + j], steered[j], rows[i + j, 1:])
    return tally.effect(baseline.neutral.source)


def unedited(plan) -> bool:
    """No plan, or one whose every delta is zero (`Plan.changes_nothing`: scale by 1, add 0, …): its rows are the
    base model's, so `evaluate_many` and `neutral_effects` take the base's numbers for it instead of running it as
    rows of other shapes (which agree only within float tolerance)."""
    return plan is None or plan.changes_nothing


def neutral_effects(baseline: Baseline, model, plans, *, batch_rows: int = BATCH_ROWS) -> list[NeutralEffect]:
    """`neutral_effect` of each of ``plans`` (Plan or None), the neutral rows × plans run as the rows of shared
    forward passes of at most ``batch_rows // NEUTRAL_ROW_COST`` rows (at least one)."""
    plans = list(plans)
    rows = baseline.neutral.rows
    R = len(rows)
    per_pass = max(1, batch_rows // NEUTRAL_ROW_COST)
    same = _Tally()  # an unedited plan's rows are the base's: its own log-probs, so exactly 0 change
    for r in range(R if any(unedited(plan) for plan in plans) else 0):
        same.add(baseline.logprobs[r], baseline.logprobs[r], rows[r, 1:])
    tallies = [same if unedited(plan) else _Tally() for plan in plans]
    pairs = [(j, r) for j in range(len(plans)) if not unedited(plans[j]) for r in range(R)]  # plan-major
    for start in range(0, len(pairs), per_pass):
        chunk = pairs[start:start + per_pass]
        steered = _row_logprobs(model, rows[[r for _, r in chunk]], [plans[j] for j, _ in chunk])
        for k, (j, r) in enumerate(chunk):
            tallies[j].add(baseline.logprobs[r], steered[k], rows[r, 1:])
    return [t.effect(baseline.neutral.source) for t in tallies]


class _Tally:
    """Running sums of one plan's neutral comparison, row by row in the rows' order (float64)."""

    def __init__(self):
        self.kl_sum, self.kl_max, self.agree, self.nll_base, self.nll_steered, self.n = 0.0, 0.0, 0, 0.0, 0.0, 0

    def add(self, base: torch.Tensor, steered: torch.Tensor, target: torch.Tensor) -> None:
        base_lp, lp = base.double(), steered.double()                                # (T-1, V)
        kl = (base_lp.exp() * (base_lp - lp)).sum(-1).clamp(min=0)                   # (T-1,)
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.agree += int((base_lp.argmax(-1) == lp.argmax(-1)).sum())
        self.nll_base -= float(base_lp.gather(-1, target[:, None]).sum())
        self.nll_steered -= float(lp.gather(-1, target[:, None]).sum())
        self.n += kl.numel()

    def effect(self, source: str) -> NeutralEffect:
        n = self.n
        return NeutralEffect(source=source, predictions=n, kl_mean=self.kl_sum / n, kl_max=self.kl_max,
                             top1=self.agree / n, ppl_base=math.exp(self.nll_base / n),
                             ppl_steered=math.exp(self.nll_steered / n))


# -- the report ----------------------------------------------------------------


@dataclass(frozen=True)
class SuiteComparison:
    base: SuiteResult
    steered: SuiteResult

    @property
    def name(self) -> str:
        return self.base.suite

    @property
    def change_pct(self) -> float | None:
        """Relative change of the score in % (None when the base score is 0)."""
        if self.base.score == 0:
            return None
        return 100.0 * (self.steered.score - self.base.score) / abs(self.base.score)

    def as_dict(self, *, details: bool = False) -> dict:
        base, steered = self.base.as_dict(details=details), self.steered.as_dict(details=details)
        head = {k: base.pop(k) for k in ("suite", "rule", "meaning", "better", "split", "prompts")}
        for k in ("suite", "rule", "meaning", "better", "split", "prompts"):
            steered.pop(k)
        return {**head, "base": base, "steered": steered, "change_pct": self.change_pct}


@dataclass(frozen=True)
class Report:
    subject: str
    """What was evaluated (the spec as DSL, or an artifact directory)."""
    model: str
    split: str
    neutral: NeutralEffect
    suites: tuple[SuiteComparison, ...]

    def suite(self, name: str) -> SuiteComparison:
        for s in self.suites:
            if s.name == name:
                return s
        raise KeyError(name)

    def as_dict(self, *, details: bool = False) -> dict:
        return {"subject": self.subject, "model": self.model, "split": self.split, "neutral": self.neutral.as_dict(),
                "suites": [s.as_dict(details=details) for s in self.suites]}

    def table(self) -> str:
        n = self.neutral
        lines = [
            f"{self.subject}  on {self.model}",
            f"neutral text: {n.source}, {n.predictions:,} next-token predictions",
            f"  KL(base‖steered)   {n.kl_mean:.4g} nats/token (max {n.kl_max:.3g})",
            f"  perplexity         {n.ppl_base:.3f} → {n.ppl_steered:.3f} ({n.ppl_change_pct:+.2f}%)",
            f"  top-1 agreement    {100 * n.top1:.2f}%",
        ]
        if self.suites:
            lines += ["", f"{'suite':<22} {'rule':<13} {'split':<9} {'n':>4}  {'base':>9} {'steered':>9} {'change':>8}"]
        for s in self.suites:
            change = "—" if s.change_pct is None else f"{s.change_pct:+.1f}%"
            b = s.base
            lines.append(f"{s.name:<22} {b.rule:<13} {b.split:<9} {b.n:>4}  {b.score:>9.4g} {s.steered.score:>9.4g} "
                         f"{change:>8}   ({b.meaning}, {b.better} is better)")
            for key in b.extras:
                lines.append(f"  {_extra_label(key):<44}  {_fmt(b.extras[key]):>9} {_fmt(s.steered.extras.get(key)):>9}")
        return "\n".join(lines)


def _extra_label(key: str) -> str:
    labels = {"signed": "mean signed gap (the lean)", "stereotype": "stereotype gap (signed)", "mean_abs": "mean |gap|",
              "margin": "mean margin toward the expected set"}
    if key in labels:
        return labels[key]
    if key.startswith("r_"):
        return f"Pearson r with {key[2:]}"
    if key.startswith("slope_"):
        return f"slope per 100 of {key[6:]}"
    if key.startswith("accuracy_"):
        return f"accuracy where {key[9:]} is expected"
    return key


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def evaluate(plan, model, tokenizer, suites=(), *, steered_model=None, baseline: Baseline | None = None,
             neutral="default", neutral_tokens: int = NEUTRAL_TOKENS, split: str = "all", subject: str | None = None,
             model_name: str | None = None, batch_rows: int = BATCH_ROWS) -> Report:
    """Base vs steered: ``model`` alone vs ``model`` under ``plan`` (or vs ``steered_model``).

    ``suites`` are Suites, shipped names or paths; ``baseline`` (from
    `measure_baseline`, same neutral text) saves measuring the base again.
    ``batch_rows`` > 0: passes of up to that many rows (`evaluate_many`); a suite the baseline lacks is scored on
    the base in passes of the same shapes as the steered model's, so an edit that changes nothing reads exactly
    0 change; 0: `NEUTRAL_BATCH` / `steer.evaluate.scoring.BATCH` per pass, as before rows.
    """
    if plan is not None and steered_model is not None:
        raise ValueError("give a plan (hooks on model) or a steered_model, not both")
    if baseline is None:
        baseline = measure_baseline(model, tokenizer, neutral=neutral, neutral_tokens=neutral_tokens)
    suites = load_suites(suites)
    if batch_rows and steered_model is None:
        for s in suites:
            if (s.name, split) not in baseline.suites:
                baseline.suites[(s.name, split)] = score_suite_rows(model, tokenizer, s, [None], split=split,
                                                                    batch_rows=batch_rows)[0]
        return evaluate_many([plan], model, tokenizer, suites, baseline=baseline, split=split,
                             subjects=[subject], model_name=model_name, batch_rows=batch_rows)[0]
    steered = steered_model if steered_model is not None else model
    comparisons = tuple(
        SuiteComparison(base=baseline.suite(model, tokenizer, s, split),
                        steered=score_suite(steered, tokenizer, s, plan, split=split))
        for s in suites
    )
    return Report(subject=_subject(plan, subject, "steered model"), model=_model_name(model, model_name),
                  split=split, neutral=neutral_effect(baseline, steered, plan), suites=comparisons)


def evaluate_many(plans, model, tokenizer, suites=(), *, baseline: Baseline, split: str = "all", subjects=None,
                  model_name: str | None = None, batch_rows: int = BATCH_ROWS, progress=None) -> list[Report]:
    """`evaluate` of each of ``plans`` (Plan or None) against ``baseline``, the plans run as rows of shared forward
    passes (module docstring); ``batch_rows`` < 1 evaluates them one after another as `evaluate` did before rows.
    ``progress(n)`` is called as parts of the work finish (``len(suites) + 1`` parts in all)."""
    plans, suites = list(plans), load_suites(suites)
    subjects = list(subjects) if subjects is not None else [None] * len(plans)
    if len(subjects) != len(plans):
        raise ValueError(f"{len(subjects)} subject(s) for {len(plans)} plan(s)")
    tick = progress or (lambda n: None)
    if batch_rows < 1:
        reports = []
        for plan, subject in zip(plans, subjects):
            reports.append(evaluate(plan, model, tokenizer, suites, baseline=baseline, split=split, subject=subject,
                                    model_name=model_name, batch_rows=0))
        tick(len(suites) + 1)
        return reports
    steered: dict[str, list[SuiteResult]] = {}
    edited = [j for j, plan in enumerate(plans) if not unedited(plan)]  # the others are scored as the base itself
    for s in suites:
        key = (s.name, split)
        base_row = [None] if key not in baseline.suites else []  # the base rides along as rows of the same passes
        rows = base_row + [plans[j] for j in edited]
        results = score_suite_rows(model, tokenizer, s, rows, split=split, batch_rows=batch_rows) if rows else []
        if base_row:
            baseline.suites[key] = results.pop(0)
        by_plan = dict(zip(edited, results))
        steered[s.name] = [by_plan.get(j, baseline.suites[key]) for j in range(len(plans))]
        tick(1)
    effects = neutral_effects(baseline, model, plans, batch_rows=batch_rows)
    tick(1)
    name = _model_name(model, model_name)
    return [Report(subject=_subject(plan, subject, "steered model"), model=name, split=split, neutral=effect,
                   suites=tuple(SuiteComparison(base=baseline.suites[(s.name, split)], steered=steered[s.name][i])
                                for s in suites))
            for i, (plan, subject, effect) in enumerate(zip(plans, subjects, effects))]


def _subject(plan, subject: str | None, otherwise: str) -> str:
    if subject is not None:
        return subject
    return _describe_plan(plan) if plan is not None else otherwise


def _model_name(model, model_name: str | None) -> str:
    return model_name or str(getattr(model.config, "_name_or_path", "") or "model")


def _describe_plan(plan) -> str:
    from steer.spec.dsl import format_edit

    return "; ".join(format_edit(e) for e in plan.spec.edits)


# -- for exports ----------------------------------------------------------------


def evaluation_for_export(report: Report) -> tuple[dict, list[str]]:
    """The manifest's ``evaluation`` field (numbers rounded to 4 significant digits, so exports stay
    byte-reproducible) and the edit card's markdown lines for ``report``."""
    data = _rounded(report.as_dict())
    n = data["neutral"]
    lines = [
        "## Measured effect", "",
        f"Base vs edited model, {report.split} split of each suite. Neutral text: {n['source']}, "
        f"{n['predictions']} next-token predictions: KL(base‖edited) mean {n['kl_mean']} nats/token (max {n['kl_max']}); "
        f"perplexity {n['ppl_base']} → {n['ppl_steered']} ({n['ppl_change_pct']:+}%); top-1 agreement "
        f"{100 * n['top1']:.2f}%.", "",
    ]
    if data["suites"]:
        lines += ["| suite | score | base | edited | change |", "| --- | --- | --- | --- | --- |"]
        for s in data["suites"]:
            change = "—" if s["change_pct"] is None else f"{s['change_pct']:+}%"
            meaning = s["meaning"].replace("|", "\\|")  # a literal bar inside a markdown table cell
            lines.append(f"| {s['suite']} | {meaning} ({s['better']} is better) | {s['base']['score']} | "
                         f"{s['steered']['score']} | {change} |")
            for key in s["base"]:
                if key != "score":
                    lines.append(f"| {s['suite']} | {_extra_label(key)} | {s['base'][key]} | {s['steered'].get(key)} | |")
        lines.append("")
    return data, lines


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
