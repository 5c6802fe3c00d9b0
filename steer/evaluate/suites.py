"""Behaviour suites: YAML files of prompts plus one scoring rule, read into frozen values.

A suite says what to measure about a model's behaviour, not how steer runs it
(that is `steer.evaluate.scoring`). Users write their own; steer ships
``gender-occupation``, ``age`` and ``capability`` (``steer/data/suites/``), and
`load_suite` takes a shipped name or a path::

    name: gender-occupation
    description: He/she gap after occupation templates
    chat: false                 # true: wrap each prompt in the tokenizer's chat template
    prefix: ""                  # text put before every prompt (few-shot examples)
    scoring:
      rule: logprob_gap         # logprob_gap | keyword_rate | exact_match
      a: [" he", " He", " his", " him"]
      b: [" she", " She", " her"]
      labels: [male, female]
      correlate: share_women    # Pearson r of the per-value signed gap with this fill field
      headline: stereotype      # mean_abs (default) | stereotype (with midpoint) | accuracy (with expect)
      midpoint: 50              # stereotype: fill values below vs above it
    templates:
      - {text: "The {occupation} said that", split: dev}
      - {text: "I asked the {occupation} whether", split: held_out}
    fill:
      occupation:
        - {value: nurse, share_women: 88, split: dev}
        - {value: carpenter, share_women: 3, split: held_out}
    prompts:                    # plain prompts too (exact_match needs them, with answers)
      - {text: "Q: What is the capital of France?\\nA:", answer: Paris}

**Rules.** ``logprob_gap``: per prompt, ``log P(A) − log P(B)`` of the next
token, P(set) the summed probability of its tokens (each entry must be one
token). Its ``headline`` picks the score:

- ``mean_abs`` (default): mean |gap| (lower = less lean either way); also the
  mean signed gap and, with ``correlate``, Pearson's r of each fill value's
  mean signed gap with that value's number.
- ``stereotype`` (needs ``correlate: FIELD`` and ``midpoint: M``): how much the
  fill value moves the gap, kept apart from the model's overall lean. With
  g_v each fill value's mean signed gap, ``stereotype = mean(g_v : x_v < M) −
  mean(g_v : x_v > M)`` (values at exactly M count in neither); score =
  |stereotype| (lower is better); also the signed stereotype, the
  least-squares slope of g_v against x_v (per 100 units of x), the mean
  signed gap (the lean), mean |gap| and r.
- ``accuracy`` (needs ``expect`` on every prompt): ``expect: LABEL`` on a
  template or fill value (one of ``labels``) says which set should win; score =
  share of prompts where it does (gap > 0 for the first label, < 0 for the
  second; higher is better); also the mean margin (the gap signed towards the
  expected set) and the accuracy per label. ``keyword_rate``: generate ``max_new_tokens``
greedily; score = fraction of outputs containing any keyword (whole words,
case-insensitive). ``exact_match``: generate greedily, keep the first line;
score = fraction whose normalised text equals (``match: equals``) or starts
with (``match: prefix``, the default; a whole-word prefix) a normalised
answer. ``better`` (lower | higher) says which way is good: lower for
logprob_gap and keyword_rate, higher for exact_match unless the file says so.

**Splits.** Templates, fill values and prompts may carry ``split: dev`` or
``split: held_out``. A prompt belongs to ``dev`` when its marked parts are all
dev, to ``held_out`` when they are all held out; a prompt mixing both belongs
only to ``all``; an unmarked prompt belongs to every split. So the held-out
half of a template × occupation suite is the held-out templates filled with the
held-out occupations: nothing used to choose an edit on ``dev`` is in it.

Every mistake — a missing field, an empty prompt list, an unknown rule or key,
a bad type, a placeholder with no fill — is a one-line `SuiteError` naming the
file, the line and the field. Never touches a model (token sets are checked
against a tokenizer when scored).
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from steer.errors import SpecError, SteerError
from steer.spec.yaml_io import kind_of, LineMapping, parse_yaml, show

RULES: tuple[str, ...] = ("logprob_gap", "keyword_rate", "exact_match")
SPLITS: tuple[str, ...] = ("dev", "held_out")
SELECTABLE_SPLITS: tuple[str, ...] = ("all", "dev", "held_out")
BETTER: tuple[str, ...] = ("lower", "higher")
MATCHES: tuple[str, ...] = ("prefix", "equals")
TOP_KEYS: tuple[str, ...] = ("name", "description", "source", "chat", "prefix", "scoring", "prompts", "templates", "fill")
SCORING_KEYS: dict[str, tuple[str, ...]] = {
    "logprob_gap": ("rule", "better", "a", "b", "labels", "correlate", "headline", "midpoint"),
    "keyword_rate": ("rule", "better", "keywords", "max_new_tokens"),
    "exact_match": ("rule", "better", "max_new_tokens", "match"),
}
DEFAULT_BETTER: dict[str, str] = {"logprob_gap": "lower", "keyword_rate": "lower", "exact_match": "higher"}
HEADLINES: tuple[str, ...] = ("mean_abs", "stereotype", "accuracy")
"""logprob_gap's headline scores (see the module docstring)."""
HEADLINE_BETTER: dict[str, str] = {"mean_abs": "lower", "stereotype": "lower", "accuracy": "higher"}
HEADLINE_MEANING: dict[str, str] = {
    "mean_abs": "mean |log-prob gap|", "stereotype": "|stereotype gap|", "accuracy": "expected-set accuracy",
    "keyword_rate": "keyword rate", "exact_match": "exact-match accuracy",
}
"""What a result's score is, by logprob_gap headline or by rule: the one wording for reports, sweeps and cards."""
DEFAULT_NEW_TOKENS: dict[str, int] = {"keyword_rate": 32, "exact_match": 8}
MAX_NEW_TOKENS = 512
SHIPPED_PACKAGE = "steer.data"
SHIPPED_DIR = "suites"


class SuiteError(SteerError):
    """A suite file that cannot be read or does not validate."""


@dataclass(frozen=True)
class Prompt:
    text: str
    """The full prompt (the suite's prefix included; the chat template is applied when scored)."""
    split: str = "any"
    """dev, held_out, any (unmarked: in every split) or mixed (only in `all`)."""
    answers: tuple[str, ...] = ()
    """exact_match: the accepted answers."""
    fill: tuple[tuple[str, str], ...] = ()
    """The (placeholder, value) pairs a template was filled with."""
    data: tuple[tuple[str, str, float], ...] = ()
    """(field, fill value, number): numbers attached to the fill values (e.g. share_women), for `correlate`."""
    expect: str | None = None
    """logprob_gap ``accuracy``: the label of the token set that should win (from the template or a fill value)."""

    def in_split(self, split: str) -> bool:
        return split == "all" or self.split == "any" or self.split == split


@dataclass(frozen=True)
class Scoring:
    rule: str
    """logprob_gap, keyword_rate or exact_match."""
    better: str
    """lower or higher: which way the score is good."""
    a: tuple[str, ...] = ()
    """logprob_gap: the first token set (each entry one token)."""
    b: tuple[str, ...] = ()
    """logprob_gap: the second token set."""
    labels: tuple[str, str] = ("a", "b")
    """logprob_gap: names of the two sets, for reports."""
    correlate: str | None = None
    """logprob_gap: a numeric fill field; report Pearson r of the per-value signed gap with it."""
    headline: str = "mean_abs"
    """logprob_gap: the score — mean_abs, stereotype or accuracy (module docstring)."""
    midpoint: float | None = None
    """logprob_gap ``stereotype``: fill values whose `correlate` number is below it vs above it."""
    keywords: tuple[str, ...] = ()
    """keyword_rate: the words looked for."""
    max_new_tokens: int = 0
    """keyword_rate / exact_match: greedy tokens generated per prompt."""
    match: str = "prefix"
    """exact_match: prefix (whole-word prefix) or equals, after normalising."""


@dataclass(frozen=True)
class Suite:
    name: str
    scoring: Scoring
    prompts: tuple[Prompt, ...]
    description: str = ""
    source: str = ""
    """Where the suite's figures come from (a citation), if any."""
    chat: bool = False
    """Wrap prompts in the tokenizer's chat template (when it has one)."""
    path: str = "<memory>"
    """The file it was read from, for error messages."""

    def select(self, split: str = "all") -> tuple[Prompt, ...]:
        if split not in SELECTABLE_SPLITS:
            raise SuiteError(f"unknown split {split!r}; allowed: {', '.join(SELECTABLE_SPLITS)}", where="--split")
        chosen = tuple(p for p in self.prompts if p.in_split(split))
        if not chosen:
            raise SuiteError(f"no prompts in split {split!r}", where=f"suite {self.name} ({self.path})")
        return chosen

    @property
    def has_split(self) -> bool:
        """Whether any prompt is marked dev or held_out (else every split is the whole suite)."""
        return any(p.split != "any" for p in self.prompts)


# -- finding suites ------------------------------------------------------------


def shipped_suites() -> tuple[str, ...]:
    """Names of the suites steer ships (``steer/data/suites/*.yaml``)."""
    folder = resources.files(SHIPPED_PACKAGE).joinpath(SHIPPED_DIR)
    return tuple(sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")))


def load_suite(name_or_path: str | os.PathLike | Suite) -> Suite:
    """A shipped suite by name, or a suite file (.yaml / .yml / .json)."""
    if isinstance(name_or_path, Suite):
        return name_or_path
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.exists() and text in shipped_suites():
        shipped = resources.files(SHIPPED_PACKAGE).joinpath(SHIPPED_DIR, f"{text}.yaml")
        return load_suite_text(shipped.read_text(encoding="utf-8"), f"suite {text}")
    if not path.is_file():
        hint = f"; shipped suites: {', '.join(shipped_suites())}"
        raise SuiteError(("not a file" if path.exists() else "no such suite file or shipped suite") + hint, where=text)
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"cannot read the suite file: {exc}", where=text) from None
    return load_suite_text(content, text)


def load_suites(names) -> tuple[Suite, ...]:
    """Several suites; two with the same name are an error (reports key them by name)."""
    suites = tuple(load_suite(n) for n in names)
    seen: dict[str, str] = {}
    for s in suites:
        if s.name in seen:
            raise SuiteError(f"two suites are named {s.name!r} ({seen[s.name]} and {s.path})", where="--suite")
        seen[s.name] = s.path
    return suites


# -- reading -------------------------------------------------------------------


def _line(node: Any, key: Any = None) -> int:
    if key is not None and isinstance(node, LineMapping):
        return node.key_lines.get(key, node.line)
    return getattr(node, "line", 1)


class _Reader:
    """Reads one suite file; every error names ``source:line: field``."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, message: str, node: Any, key: Any = None, field: str | None = None) -> SuiteError:
        where = f"{self.source}:{_line(node, key)}"
        return SuiteError(message, where=f"{where}: {field}" if field else where)

    def mapping(self, node: Any, allowed: tuple[str, ...], field: str, what: str) -> dict:
        if not isinstance(node, dict):
            raise self.fail(f"{what} must be a mapping, got {kind_of(node)}", node, field=field)
        for key in node:
            if key not in allowed:
                raise self.fail(f"unknown key {show(key)} in {what}; allowed: {', '.join(allowed)}", node, key,
                                f"{field}.{key}" if field else str(key))
        return node

    def string(self, node: dict, key: str, field: str, *, required: bool = False, empty: bool = False) -> str | None:
        if key not in node:
            if required:
                raise self.fail(f"missing `{key}`", node, field=field.rpartition(".")[0] or None)
            return None
        value = node[key]
        if not isinstance(value, str) or (not empty and not value.strip()):
            raise self.fail(f"`{key}` must be a non-empty string, got {show(value)}", node, key, field)
        return value

    def strings(self, node: dict, key: str, field: str, *, required: bool = False) -> tuple[str, ...]:
        if key not in node:
            if required:
                raise self.fail(f"missing `{key}` (a non-empty list of strings)", node, field=field.rpartition(".")[0] or None)
            return ()
        value = node[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(f"`{key}` must be a non-empty list of strings, got {kind_of(value)}", node, key, field)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                line_node = _ItemLine(value, i)
                raise self.fail(f"`{key}` entries must be non-empty strings, got {show(item)}", line_node, field=f"{field}[{i}]")
        return tuple(value)

    def split(self, node: dict, field: str) -> str | None:
        if "split" not in node:
            return None
        value = node["split"]
        if value not in SPLITS:
            raise self.fail(f"`split` must be {' or '.join(SPLITS)}, got {show(value)}", node, "split", f"{field}.split")
        return value

    def items(self, node: dict, key: str, field: str) -> list:
        value = node[key]
        if not isinstance(value, list):
            raise self.fail(f"`{key}` must be a list, got {kind_of(value)}", node, key, field)
        if not value:
            raise self.fail(f"`{key}` is empty: give at least one", node, key, field)
        return value


class _ItemLine:
    """Stands in for a list item when reporting its line."""

    def __init__(self, sequence: Any, index: int):
        lines = getattr(sequence, "item_lines", None)
        self.line = lines[index] if lines and index < len(lines) else getattr(sequence, "line", 1)


def load_suite_text(text: str, source: str = "<text>") -> Suite:
    """Read a suite from YAML (or JSON) text; ``source`` names it in errors."""
    try:
        data = parse_yaml(text, source)
    except SpecError as exc:  # malformed YAML, with its line
        raise SuiteError(exc.message, where=exc.where) from None
    r = _Reader(source)
    if data is None:
        raise SuiteError(f"empty suite file; expected a mapping with keys {', '.join(TOP_KEYS)}", where=f"{source}:1")
    r.mapping(data, TOP_KEYS, "", "a suite")
    name = r.string(data, "name", "name", required=True)
    description = r.string(data, "description", "description", empty=True) or ""
    citation = r.string(data, "source", "source", empty=True) or ""
    prefix = r.string(data, "prefix", "prefix", empty=True) or ""
    chat = data.get("chat", False)
    if not isinstance(chat, bool):
        raise r.fail(f"`chat` must be true or false, got {show(chat)}", data, "chat", "chat")
    if "scoring" not in data:
        raise r.fail(f"missing `scoring` (a mapping with `rule`: {', '.join(RULES)})", data)
    scoring = _read_scoring(r, data["scoring"], data)
    if "prompts" not in data and "templates" not in data:
        raise r.fail("a suite needs `prompts` or `templates` (with `fill`)", data)
    prompts: list[Prompt] = []
    if "prompts" in data:
        prompts += _read_prompts(r, data, scoring, prefix)
    if "templates" in data:
        prompts += _read_templates(r, data, scoring, prefix)
    elif "fill" in data:
        raise r.fail("`fill` is only used with `templates`", data, "fill", "fill")
    _check_unique(r, prompts, data)
    if scoring.correlate is not None and not any(key == scoring.correlate for p in prompts for key, _, _ in p.data):
        raise r.fail(f"`correlate: {scoring.correlate}` names no numeric field of the fill values", data["scoring"],
                     "correlate", "scoring.correlate")
    if scoring.headline == "accuracy":
        missing = next((p for p in prompts if p.expect is None), None)
        if missing is not None:
            raise r.fail(f"`headline: accuracy` needs `expect` on every prompt; {show(missing.text)} has none",
                         data["scoring"], "headline", "scoring.headline")
    elif any(p.expect is not None for p in prompts):
        raise r.fail("`expect` is only used with `headline: accuracy`", data["scoring"], field="scoring")
    if scoring.headline == "stereotype":
        numbers = {number for p in prompts for key, _, number in p.data if key == scoring.correlate}
        if not (any(x < scoring.midpoint for x in numbers) and any(x > scoring.midpoint for x in numbers)):
            raise r.fail(f"`midpoint: {scoring.midpoint:g}` must have fill values on both sides of it",
                         data["scoring"], "midpoint", "scoring.midpoint")
    return Suite(name=name, scoring=scoring, prompts=tuple(prompts), description=description.strip(),
                 source=citation.strip(), chat=chat, path=source)


def _read_scoring(r: _Reader, node: Any, top: dict) -> Scoring:
    if not isinstance(node, dict):
        raise r.fail(f"`scoring` must be a mapping with `rule`, got {kind_of(node)}", top, "scoring", "scoring")
    if "rule" not in node:
        raise r.fail(f"`scoring` needs `rule`: one of {', '.join(RULES)}", node, field="scoring")
    rule = node["rule"]
    if rule not in RULES:
        raise r.fail(f"unknown scoring rule {show(rule)}; allowed: {', '.join(RULES)}", node, "rule", "scoring.rule")
    r.mapping(node, SCORING_KEYS[rule], "scoring", f"a {rule} scoring")
    better = node.get("better", DEFAULT_BETTER[rule])
    if better not in BETTER:
        raise r.fail(f"`better` must be lower or higher, got {show(better)}", node, "better", "scoring.better")
    if rule == "logprob_gap":
        a = r.strings(node, "a", "scoring.a", required=True)
        b = r.strings(node, "b", "scoring.b", required=True)
        common = sorted(set(a) & set(b))
        if common:
            raise r.fail(f"token {common[0]!r} is in both sets", node, "b", "scoring.b")
        labels = r.strings(node, "labels", "scoring.labels") or ("a", "b")
        if len(labels) != 2:
            raise r.fail(f"`labels` names the two sets: give 2, got {len(labels)}", node, "labels", "scoring.labels")
        correlate = r.string(node, "correlate", "scoring.correlate")
        headline = node.get("headline", "mean_abs")
        if headline not in HEADLINES:
            raise r.fail(f"unknown headline {show(headline)}; allowed: {', '.join(HEADLINES)}", node, "headline",
                         "scoring.headline")
        better = node.get("better", HEADLINE_BETTER[headline])
        if better not in BETTER:
            raise r.fail(f"`better` must be lower or higher, got {show(better)}", node, "better", "scoring.better")
        midpoint = node.get("midpoint")
        if headline == "stereotype":
            if correlate is None:
                raise r.fail("`headline: stereotype` needs `correlate: FIELD` (the fill number it splits on)", node,
                             "headline", "scoring.headline")
            if isinstance(midpoint, bool) or not isinstance(midpoint, (int, float)):
                raise r.fail(f"`headline: stereotype` needs `midpoint`, a number, got {show(midpoint)}", node,
                             "midpoint" if "midpoint" in node else "headline", "scoring.midpoint")
            midpoint = float(midpoint)
        elif midpoint is not None:
            raise r.fail("`midpoint` is only used with `headline: stereotype`", node, "midpoint", "scoring.midpoint")
        return Scoring(rule, better, a=a, b=b, labels=(labels[0], labels[1]), correlate=correlate, headline=headline,
                       midpoint=midpoint)
    new_tokens = node.get("max_new_tokens", DEFAULT_NEW_TOKENS[rule])
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or not 1 <= new_tokens <= MAX_NEW_TOKENS:
        raise r.fail(f"`max_new_tokens` must be an integer from 1 to {MAX_NEW_TOKENS}, got {show(new_tokens)}",
                     node, "max_new_tokens", "scoring.max_new_tokens")
    if rule == "keyword_rate":
        return Scoring(rule, better, keywords=r.strings(node, "keywords", "scoring.keywords", required=True),
                       max_new_tokens=new_tokens)
    match = node.get("match", "prefix")
    if match not in MATCHES:
        raise r.fail(f"`match` must be {' or '.join(MATCHES)}, got {show(match)}", node, "match", "scoring.match")
    return Scoring(rule, better, max_new_tokens=new_tokens, match=match)


def _read_prompts(r: _Reader, top: dict, scoring: Scoring, prefix: str) -> list[Prompt]:
    items = r.items(top, "prompts", "prompts")
    out = []
    for i, item in enumerate(items):
        field = f"prompts[{i}]"
        if isinstance(item, str):
            item = {"text": item}
            node: Any = _ItemLine(items, i)
        else:
            node = item
            r.mapping(item, ("text", "answer", "split", "expect"), field, "a prompt")
        if not isinstance(item, dict) or "text" not in item or not isinstance(item["text"], str) or not item["text"].strip():
            raise r.fail(f"a prompt needs non-empty `text`, got {show(item.get('text') if isinstance(item, dict) else item)}",
                         node, field=field)
        answers = r.strings(item, "answer", f"{field}.answer") if isinstance(node, dict) else ()
        if scoring.rule == "exact_match" and not answers:
            raise r.fail("exact_match needs an `answer` (a string or a list of accepted strings) for every prompt",
                         node, field=field)
        if scoring.rule != "exact_match" and answers:
            raise r.fail(f"`answer` is only used by exact_match, not {scoring.rule}", node, "answer", f"{field}.answer")
        split = r.split(item, field) if isinstance(node, dict) else None
        expect = _expect(r, item, field, scoring) if isinstance(node, dict) else None
        out.append(Prompt(text=prefix + item["text"], split=split or "any", answers=answers, expect=expect))
    return out


def _read_templates(r: _Reader, top: dict, scoring: Scoring, prefix: str) -> list[Prompt]:
    if scoring.rule == "exact_match":
        raise r.fail("exact_match needs `prompts` with answers; templates carry none", top, "templates", "templates")
    items = r.items(top, "templates", "templates")
    fill = _read_fill(r, top, scoring)
    used: set[str] = set()
    out: list[Prompt] = []
    for i, item in enumerate(items):
        field = f"templates[{i}]"
        if isinstance(item, str):
            item, node = {"text": item}, _ItemLine(items, i)
        else:
            node = item
            r.mapping(item, ("text", "split", "expect"), field, "a template")
        text = item.get("text") if isinstance(item, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise r.fail(f"a template needs non-empty `text`, got {show(text)}", node, field=field)
        names = _placeholders(r, text, node, field)
        for name in names:
            if name not in fill:
                known = ", ".join(fill) or "none"
                raise r.fail(f"placeholder {{{name}}} has no `fill` entry (fill has: {known})", node, field=field)
        used.update(names)
        template_split = r.split(item, field) if isinstance(node, dict) else None
        template_expect = _expect(r, item, field, scoring) if isinstance(node, dict) else None
        combos: list[list[tuple[str, _FillValue]]] = [[]]
        for name in names:
            combos = [c + [(name, v)] for c in combos for v in fill[name]]
        for combo in combos:
            marks = {m for m in [template_split] + [v.split for _, v in combo] if m is not None}
            split = "any" if not marks else marks.pop() if len(marks) == 1 else "mixed"
            values = {name: v.value for name, v in combo}
            expects = {e for e in [template_expect] + [v.expect for _, v in combo] if e is not None}
            if len(expects) > 1:
                raise r.fail(f"the prompt {show(text.format(**values))} is expected to be both "
                             f"{' and '.join(sorted(expects))} (its template and fill values disagree)", node, field=field)
            out.append(Prompt(
                text=prefix + text.format(**values), split=split,
                fill=tuple((name, v.value) for name, v in combo),
                data=tuple((k, v.value, x) for _, v in combo for k, x in v.data),
                expect=expects.pop() if expects else None,
            ))
    unused = [name for name in fill if name not in used]
    if unused:
        raise r.fail(f"`fill.{unused[0]}` is not used by any template", top["fill"], unused[0], f"fill.{unused[0]}")
    return out


@dataclass(frozen=True)
class _FillValue:
    value: str
    split: str | None
    data: tuple[tuple[str, float], ...]
    expect: str | None = None


def _expect(r: _Reader, node: dict, field: str, scoring: Scoring) -> str | None:
    """A template's or fill value's ``expect``: one of the scoring's two labels."""
    if "expect" not in node:
        return None
    value = node["expect"]
    if scoring.rule != "logprob_gap" or value not in scoring.labels:
        allowed = " or ".join(scoring.labels) if scoring.rule == "logprob_gap" else "nothing (logprob_gap only)"
        raise r.fail(f"`expect` must be {allowed}, got {show(value)}", node, "expect", f"{field}.expect")
    return value


def _read_fill(r: _Reader, top: dict, scoring: Scoring) -> dict[str, list[_FillValue]]:
    if "fill" not in top:
        return {}
    node = top["fill"]
    if not isinstance(node, dict):
        raise r.fail(f"`fill` must map each placeholder to a list of values, got {kind_of(node)}", top, "fill", "fill")
    fill: dict[str, list[_FillValue]] = {}
    for name, values in node.items():
        field = f"fill.{name}"
        if not isinstance(name, str) or not name.isidentifier():
            raise r.fail(f"placeholder names are identifiers, got {show(name)}", node, name, field)
        if not isinstance(values, list) or not values:
            raise r.fail(f"`{field}` must be a non-empty list of values", node, name, field)
        out = []
        for i, item in enumerate(values):
            at = f"{field}[{i}]"
            if isinstance(item, str) and item.strip():
                out.append(_FillValue(item, None, ()))
                continue
            if not isinstance(item, dict) or not isinstance(item.get("value"), str) or not item["value"].strip():
                raise r.fail("a fill value is a string or a mapping with a string `value`", item if isinstance(item, dict)
                             else _ItemLine(values, i), field=at)
            data = []
            for key, x in item.items():
                if key in ("value", "split", "expect"):
                    continue
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    raise r.fail(f"`{key}` must be a number (fields beside value, split and expect are data), got "
                                 f"{show(x)}", item, key, f"{at}.{key}")
                data.append((str(key), float(x)))
            out.append(_FillValue(item["value"], r.split(item, at), tuple(data), _expect(r, item, at, scoring)))
        fill[name] = out
    return fill


def _placeholders(r: _Reader, text: str, node: Any, field: str) -> list[str]:
    names: list[str] = []
    try:
        for _, name, spec, conversion in string.Formatter().parse(text):
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                raise r.fail(f"placeholders are plain names like {{occupation}}, got {{{name}}} (write {{{{ }}}} for a "
                             "literal brace)", node, field=field)
            if name not in names:
                names.append(name)
    except ValueError as exc:
        raise r.fail(f"bad template text: {exc} (write {{{{ and }}}} for literal braces)", node, field=field) from None
    return names


def _check_unique(r: _Reader, prompts: list[Prompt], top: dict) -> None:
    seen: set[str] = set()
    for p in prompts:
        if p.text in seen:
            raise r.fail(f"the prompt {show(p.text)} appears twice; each prompt is scored once", top)
        seen.add(p.text)


__all__ = [
    "HEADLINE_MEANING", "HEADLINES", "Prompt", "RULES", "SPLITS", "Scoring", "Suite", "SuiteError", "load_suite", "load_suite_text", "load_suites",
    "shipped_suites",
]
