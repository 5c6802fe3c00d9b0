"""Run a behaviour suite on a model (optionally under a Plan) and score it by the suite's rule.

The rules are defined in `steer.evaluate.suites`; here is how each is computed:

- ``logprob_gap`` — one forward pass per batch of prompts, left-padded with
  the attention mask and position ids counted from each prompt's first real
  token (so padding changes nothing). At the last position:
  ``gap = logsumexp(log_softmax(z)[A]) − logsumexp(log_softmax(z)[B])``.
- ``keyword_rate`` / ``exact_match`` — greedy decoding (argmax, a row stops
  at EOS) from the same batches, one hook context per batch so ``scope`` sees
  the batch's prompt as the prompt: what ``model.generate`` with greedy
  settings gives for each prompt alone.

`run_prompts` runs the tokens all prompts of a batch share (a few-shot prefix,
a chat template's system turn) once, repeating its KV cache over the batch:
on 2 CPU cores the prompts' shared few-shot prefix was most of the work.

**Several plans at once** (`score_suite_rows`, for sweeps, tuning and
evaluation): the rows of a forward pass are prompts × plans, plan-major,
through per-row plans (``steer.applied(model, [plan, ...])``; a None row is
the unedited model), so each row computes what it computes alone and the
numbers are `score_suite`'s for each plan within float tolerance. The shared
prefix runs once per plan (one row each) and its KV cache is repeated over
that plan's prompts. ``batch_rows`` bounds the rows of one pass: a chunk is a
block of plans × a block of prompts (as many prompts as fit beside every
plan; fewer plans when not even one prompt each fits).

The steered side is ``model`` under ``plan`` (hooks, exact), or any model-like
object with no plan (an exported checkpoint, a PEFT model). Never changes the
model: hooks live only inside each batch's context.
"""

from __future__ import annotations

import math
import re
import unicodedata
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from steer.evaluate.suites import HEADLINE_MEANING, Prompt, Scoring, Suite, SuiteError
from steer.generate import cache_keyword, cache_of, last_logit_only, prompt_ids, stop_ids
from steer.lower.hooks import applied

BATCH = 64
"""Prompts per forward pass / generate call (one plan at a time)."""
BATCH_ROWS = 256
"""Rows (prompt × plan) per forward pass when several plans run as rows (``--batch-rows``)."""


@dataclass(frozen=True)
class SuiteResult:
    suite: str
    rule: str
    better: str
    split: str
    score: float
    """mean |gap| (logprob_gap), keyword rate or exact-match accuracy."""
    prompts: tuple[str, ...]
    values: tuple[float, ...]
    """Per prompt: the signed gap, or 1.0/0.0 for a keyword hit / a correct answer."""
    extras: dict[str, float | None] = field(default_factory=dict)
    """Secondary numbers, by headline (`logprob_extras`): e.g. ``signed`` (mean signed gap), ``r_<field>``."""
    outputs: tuple[str, ...] = ()
    """Generated text per prompt (keyword_rate, exact_match)."""
    headline: str = ""
    """logprob_gap: the headline score (mean_abs, stereotype, accuracy); else empty."""

    @property
    def meaning(self) -> str:
        """What ``score`` is, in words."""
        return HEADLINE_MEANING[self.headline or self.rule]

    @property
    def n(self) -> int:
        return len(self.values)

    def as_dict(self, *, details: bool = False) -> dict:
        out = {"suite": self.suite, "rule": self.rule, "meaning": self.meaning, "better": self.better, "split": self.split,
               "prompts": self.n, "score": self.score, **self.extras}
        if details:
            out["per_prompt"] = [
                {"prompt": p, "value": v, **({"output": o} if self.outputs else {})}
                for p, v, o in zip(self.prompts, self.values, self.outputs or [None] * self.n)
            ]
        return out


def score_suite(model, tokenizer, suite: Suite, plan=None, *, split: str = "all", batch_size: int = BATCH) -> SuiteResult:
    """Score ``suite`` (its prompts in ``split``) on ``model``, under ``plan`` if given (one plan, ``batch_size``
    prompts per pass)."""
    prompts = suite.select(split)
    texts = [p.text for p in prompts]
    if suite.scoring.rule == "logprob_gap":
        a, b = _token_sets(tokenizer, suite)
        values = []
        for start in range(0, len(texts), batch_size):
            logp = next_token_logprobs(model, tokenizer, texts[start:start + batch_size], plan, chat=suite.chat)  # (B, V)
            values += (logp[:, a].logsumexp(-1) - logp[:, b].logsumexp(-1)).tolist()
        return _result(suite, split, prompts, values)
    return _result(suite, split, prompts, None, tuple(_generate(model, tokenizer, texts, plan, suite, batch_size)))


def score_suite_rows(model, tokenizer, suite: Suite, plans, *, split: str = "all",
                     batch_rows: int = BATCH_ROWS) -> list[SuiteResult]:
    """`score_suite` under each of ``plans`` (Plan or None), prompts × plans run as the rows of shared forward
    passes of at most ``batch_rows`` rows (module docstring)."""
    plans = list(plans)
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    if not plans:
        return []
    prompts = suite.select(split)
    texts = [p.text for p in prompts]
    rule = suite.scoring.rule
    a, b = _token_sets(tokenizer, suite) if rule == "logprob_gap" else (None, None)
    new_tokens = 0 if rule == "logprob_gap" else suite.scoring.max_new_tokens
    per_prompt = max(1, min(len(texts), batch_rows // len(plans)))   # prompts per chunk
    per_plan = max(1, min(len(plans), batch_rows // per_prompt))     # plans per chunk
    values: list[list] = [[] for _ in plans]
    for first in range(0, len(plans), per_plan):
        chunk = plans[first:first + per_plan]
        for start in range(0, len(texts), per_prompt):
            part = texts[start:start + per_prompt]
            logp, tokens = run_prompt_rows(model, tokenizer, part, chunk, chat=suite.chat, new_tokens=new_tokens)
            for j in range(len(chunk)):
                rows = slice(j * len(part), (j + 1) * len(part))
                if rule == "logprob_gap":
                    values[first + j] += (logp[rows][:, a].logsumexp(-1) - logp[rows][:, b].logsumexp(-1)).tolist()
                else:
                    values[first + j] += tokenizer.batch_decode(tokens[rows], skip_special_tokens=True)
    if rule == "logprob_gap":
        return [_result(suite, split, prompts, v) for v in values]
    return [_result(suite, split, prompts, None, tuple(v)) for v in values]


def _token_sets(tokenizer, suite: Suite) -> tuple[list[int], list[int]]:
    a = token_set_ids(tokenizer, suite.scoring.a, f"{suite.path}: scoring.a")
    b = token_set_ids(tokenizer, suite.scoring.b, f"{suite.path}: scoring.b")
    if set(a) & set(b):
        raise SuiteError("the two token sets share a token under this tokenizer", where=f"{suite.path}: scoring")
    return a, b


def _result(suite: Suite, split: str, prompts: tuple[Prompt, ...], gaps: list[float] | None,
            outputs: tuple[str, ...] = ()) -> SuiteResult:
    """The result from the per-prompt signed gaps (logprob_gap) or the generated outputs (the other rules)."""
    rule = suite.scoring.rule
    extras: dict[str, float | None] = {}
    if rule == "logprob_gap":
        values = gaps
        score, extras = logprob_scores(suite.scoring, prompts, values)
    else:
        if rule == "keyword_rate":
            pattern = keyword_pattern(suite.scoring.keywords)
            values = [float(pattern.search(o) is not None) for o in outputs]
        else:
            values = [float(answer_matches(o, p.answers, suite.scoring.match)) for o, p in zip(outputs, prompts)]
        score = sum(values) / len(values)
    return SuiteResult(suite=suite.name, rule=rule, better=suite.scoring.better, split=split, score=float(score),
                       prompts=tuple(p.text for p in prompts), values=tuple(float(v) for v in values), extras=extras,
                       outputs=outputs, headline=suite.scoring.headline if rule == "logprob_gap" else "")


def extra_names(suite: Suite) -> tuple[str, ...]:
    """The secondary numbers `logprob_scores` reports for ``suite`` (what a ``SUITE:KEY`` ``--keep`` bound may name),
    read off `logprob_scores` itself on placeholder gaps; other rules have none."""
    if suite.scoring.rule != "logprob_gap" or not suite.prompts:
        return ()
    return tuple(logprob_scores(suite.scoring, suite.prompts, [0.0] * len(suite.prompts))[1])


def logprob_scores(scoring: Scoring, prompts: tuple[Prompt, ...], gaps: list[float]) -> tuple[float, dict]:
    """``(score, extras)`` of a logprob_gap suite from its per-prompt signed gaps, by the scoring's headline
    (the formulas are in `steer.evaluate.suites`)."""
    n = len(gaps)
    mean_abs, signed = sum(abs(g) for g in gaps) / n, sum(gaps) / n
    extras: dict[str, float | None] = {}
    if scoring.headline == "accuracy":
        a_label, b_label = scoring.labels
        toward = [g if p.expect == a_label else -g for p, g in zip(prompts, gaps)]  # > 0: the expected set wins
        extras["margin"] = sum(toward) / n
        for label in scoring.labels:
            wins = [t > 0 for p, t in zip(prompts, toward) if p.expect == label]
            extras[f"accuracy_{label}"] = sum(wins) / len(wins) if wins else None
        extras["signed"] = signed
        return sum(t > 0 for t in toward) / n, extras
    field_name = scoring.correlate
    if scoring.headline == "stereotype":
        by_value = per_value_means(prompts, gaps, field_name)  # [(x_v, g_v)]
        low = [g for x, g in by_value if x < scoring.midpoint]
        high = [g for x, g in by_value if x > scoring.midpoint]
        stereotype = sum(low) / len(low) - sum(high) / len(high)
        extras["stereotype"] = stereotype
        extras[f"slope_{field_name}"] = 100.0 * _slope([x for x, _ in by_value], [g for _, g in by_value])
        extras["signed"] = signed
        extras["mean_abs"] = mean_abs
        extras[f"r_{field_name}"] = correlation_with(prompts, gaps, field_name)
        return abs(stereotype), extras
    extras["signed"] = signed
    if field_name:
        extras[f"r_{field_name}"] = correlation_with(prompts, gaps, field_name)
    return mean_abs, extras


# -- running prompts: one shared-prefix, left-padded batch ------------------------


@torch.no_grad()
def run_prompts(model, tokenizer, texts: list[str], plan=None, *, chat: bool = False,
                new_tokens: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """``(N, V)`` float32 next-token log-probs after each text, and up to ``new_tokens`` greedy tokens each.

    The tokens all prompts share at the start (a few-shot prefix, a chat
    template's system turn) are run once and their KV cache repeated over the
    batch; the rest is left-padded *after* that prefix, with the attention mask
    and position ids counted over real tokens only, so each row computes what
    it would alone. The hooks see the padded prompt as the prompt (``scope``).
    A row's generation ends at its EOS token.
    """
    return run_prompt_rows(model, tokenizer, texts, [plan], chat=chat, new_tokens=new_tokens)


@torch.no_grad()
def run_prompt_rows(model, tokenizer, texts: list[str], plans, *, chat: bool = False,
                    new_tokens: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """`run_prompts` under each of ``plans`` (Plan or None) at once: ``(P·N, V)`` log-probs and P·N token lists,
    row ``j·N + i`` being text i under ``plans[j]``. The shared prefix runs as one row per plan, its KV cache
    repeated over the texts; one plan (or the same Plan object throughout) is the single-plan hook path."""
    plans = list(plans)
    encoded = [prompt_ids(tokenizer, [t], chat=chat)["input_ids"][0].tolist() for t in texts]
    shared = _common_prefix(encoded)
    rows = [e[shared:] for e in encoded] * len(plans)                                             # plan-major
    n = len(rows)
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    suffix = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)             # (B, S)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    mask = torch.cat([mask.new_ones(n, shared), mask], dim=1)                                     # (B, P+S)
    positions = ((mask.cumsum(-1) - 1).clamp(min=0))[:, shared:]                                 # (B, S)
    keep = last_logit_only(model)
    cache_arg = cache_keyword(model)
    stop = _eos_ids(model, tokenizer)
    generated: list[list[int]] = [[] for _ in rows]
    prompt_length = shared + width  # the padded prompt, for scope
    cache = None
    if shared:  # its own hook context: this call's batch is one row per plan
        with _hooked(model, plans, prompt_length):
            cache = cache_of(model(input_ids=suffix.new_tensor([encoded[0][:shared]] * len(plans)), use_cache=True))
        cache.batch_repeat_interleave(len(texts))
    with _hooked(model, [p for p in plans for _ in texts], prompt_length):
        out = model(input_ids=suffix, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_arg: cache}, **keep)
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)                          # (B, V)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        step_logits = out.logits[:, -1]
        for step in range(new_tokens):
            token = step_logits.argmax(-1)                                                         # (B,)
            done |= torch.isin(token, stop)
            for i in range(n):
                if not done[i]:
                    generated[i].append(int(token[i]))
            if bool(done.all()) or step == new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                        use_cache=True, **{cache_arg: cache_of(out)}, **keep)
            step_logits = out.logits[:, -1]
    return logprobs.cpu(), generated


def _hooked(model, plans: list, prompt_length: int):
    """The hook context for a batch whose row i runs under ``plans[i]``: none when every row is unedited, the
    single-plan path when every row has the same Plan, else per-row plans."""
    if all(p is None for p in plans):
        return nullcontext()
    if all(p is plans[0] for p in plans):
        return applied(model, plans[0], prompt_length=prompt_length)
    return applied(model, plans, prompt_length=prompt_length)


def next_token_logprobs(model, tokenizer, texts: list[str], plan=None, *, chat: bool = False) -> torch.Tensor:
    """``(N, V)`` float32 log-softmax of the next token after each text."""
    return run_prompts(model, tokenizer, texts, plan, chat=chat)[0]


def _common_prefix(encoded: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own."""
    limit = min(len(e) for e in encoded) - 1
    n = 0
    while n < limit and all(e[n] == encoded[0][n] for e in encoded):
        n += 1
    return n if len(encoded) > 1 else 0


def _eos_ids(model, tokenizer) -> torch.Tensor:
    return torch.tensor(stop_ids(model, tokenizer), dtype=torch.long, device=next(model.parameters()).device)


def token_set_ids(tokenizer, tokens: tuple[str, ...], where: str) -> list[int]:
    """The token id of each entry; an entry that is not exactly one token is an error."""
    ids = []
    for text in tokens:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise SuiteError(f"{text!r} is {len(encoded)} tokens for this tokenizer ({encoded}); each entry of a token "
                             "set must be exactly one token", where=where)
        ids.append(encoded[0])
    return ids


# -- generation rules ----------------------------------------------------------


def _generate(model, tokenizer, texts: list[str], plan, suite: Suite, batch_size: int) -> list[str]:
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        _, tokens = run_prompts(model, tokenizer, texts[start:start + batch_size], plan, chat=suite.chat,
                                new_tokens=suite.scoring.max_new_tokens)
        out += tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return out


def keyword_pattern(keywords: tuple[str, ...]) -> re.Pattern:
    """Any keyword as a whole word (or phrase), case-insensitive."""
    alternatives = "|".join(re.escape(k.strip()) for k in keywords)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


ARTICLES = ("the", "a", "an")


def normalise(text: str) -> str:
    """Compatibility-normalised, case-folded, punctuation to spaces, whitespace collapsed, a leading article dropped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c if c.isalnum() or c.isspace() else " " for c in text)
    words = text.split()
    if len(words) > 1 and words[0] in ARTICLES:
        words = words[1:]
    return " ".join(words)


def answer_matches(output: str, answers: tuple[str, ...], match: str) -> bool:
    """Whether the output's first line, normalised, equals / starts with (whole words) a normalised answer."""
    lines = output.strip().splitlines()
    said = normalise(lines[0] if lines else "")
    for answer in answers:
        want = normalise(answer)
        if said == want or (match == "prefix" and said.startswith(want + " ")):
            return True
    return False


# -- correlation ---------------------------------------------------------------


def per_value_means(prompts: tuple[Prompt, ...], values: list[float], field_name: str) -> list[tuple[float, float]]:
    """``(number, mean value)`` for each fill value that carries ``field_name``, in order of first appearance."""
    groups: dict[tuple[str, float], list[float]] = {}
    for p, v in zip(prompts, values):
        for key, value, number in p.data:
            if key == field_name:
                groups.setdefault((value, number), []).append(v)
    return [(number, sum(g) / len(g)) for (_, number), g in groups.items()]


def correlation_with(prompts: tuple[Prompt, ...], values: list[float], field_name: str) -> float | None:
    """Pearson r between each fill value's mean signed gap and its ``field_name`` number (None if < 3 values)."""
    pairs = per_value_means(prompts, values, field_name)
    return pearson([x for x, _ in pairs], [y for _, y in pairs])


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)
