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
"""Prompts per forward pass / generate call."""


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
    """Score ``suite`` (its prompts in ``split``) on ``model``, under ``plan`` if given."""
    prompts = suite.select(split)
    texts = [p.text for p in prompts]
    rule = suite.scoring.rule
    extras: dict[str, float | None] = {}
    outputs: tuple[str, ...] = ()
    if rule == "logprob_gap":
        a = token_set_ids(tokenizer, suite.scoring.a, f"{suite.path}: scoring.a")
        b = token_set_ids(tokenizer, suite.scoring.b, f"{suite.path}: scoring.b")
        if set(a) & set(b):
            raise SuiteError("the two token sets share a token under this tokenizer", where=f"{suite.path}: scoring")
        values = []
        for start in range(0, len(texts), batch_size):
            logp = next_token_logprobs(model, tokenizer, texts[start:start + batch_size], plan, chat=suite.chat)  # (B, V)
            values += (logp[:, a].logsumexp(-1) - logp[:, b].logsumexp(-1)).tolist()
        score, extras = logprob_scores(suite.scoring, prompts, values)
    else:
        outputs = tuple(_generate(model, tokenizer, texts, plan, suite, batch_size))
        if rule == "keyword_rate":
            pattern = keyword_pattern(suite.scoring.keywords)
            values = [float(pattern.search(o) is not None) for o in outputs]
        else:
            values = [float(answer_matches(o, p.answers, suite.scoring.match)) for o, p in zip(outputs, prompts)]
        score = sum(values) / len(values)
    return SuiteResult(suite=suite.name, rule=rule, better=suite.scoring.better, split=split, score=float(score),
                       prompts=tuple(texts), values=tuple(float(v) for v in values), extras=extras, outputs=outputs,
                       headline=suite.scoring.headline if rule == "logprob_gap" else "")


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
    it would alone. One hook context covers the batch, with the padded prompt
    as the prompt (``scope``). A row's generation ends at its EOS token.
    """
    encoded = [prompt_ids(tokenizer, [t], chat=chat)["input_ids"][0].tolist() for t in texts]
    shared = _common_prefix(encoded)
    rows = [e[shared:] for e in encoded]
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    suffix = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)             # (B, S)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    mask = torch.cat([mask.new_ones(len(rows), shared), mask], dim=1)                             # (B, P+S)
    positions = ((mask.cumsum(-1) - 1).clamp(min=0))[:, shared:]                                 # (B, S)
    keep = last_logit_only(model)
    cache_arg = cache_keyword(model)
    stop = _eos_ids(model, tokenizer)
    generated: list[list[int]] = [[] for _ in rows]
    with applied(model, plan, prompt_length=shared + width) if plan is not None else nullcontext():
        cache = None
        if shared:
            cache = cache_of(model(input_ids=suffix.new_tensor([encoded[0][:shared]]), use_cache=True))
            cache.batch_repeat_interleave(len(rows))
        out = model(input_ids=suffix, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{cache_arg: cache}, **keep)
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)                          # (B, V)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        step_logits = out.logits[:, -1]
        for step in range(new_tokens):
            token = step_logits.argmax(-1)                                                         # (B,)
            done |= torch.isin(token, stop)
            for i in range(len(rows)):
                if not done[i]:
                    generated[i].append(int(token[i]))
            if bool(done.all()) or step == new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                        use_cache=True, **{cache_arg: cache_of(out)}, **keep)
            step_logits = out.logits[:, -1]
    return logprobs.cpu(), generated


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
