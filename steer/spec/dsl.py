"""The one-line edit language: ``suppress feature 4312 by 80%``.

One edit per line or per ``;``; blank lines and ``# comments`` are ignored::

    EDIT    := VERB TARGET CLAUSE*
    VERB    := scale | suppress | ablate | amplify | clamp | steer | add
             | project out | cap | monitor
    TARGET  := feature N | direction FILE:KEY
    CLAUSE  := by X | to X | at X | above X          (the verb's amount; see below)
             | units raw|feature|norm
             | when active | when always | when feature J above T
             | scope all|prompt|generation
             | site SITE

Keywords are lower case. N and J are integers ≥ 0; the other numbers are decimals
(``-2``, ``+4``, ``0.5``, ``1e-3``). The clauses come in any order, each at most once. The amount clause of each
verb, and what it means (``Verb.amount_key`` / ``Verb.amount``):

    scale          by F       multiply the feature by F ≥ 0
    suppress       by P%      scale by 1 − P/100 (or by a fraction: by 0.8 = by 80%)
    ablate         —          scale by 0
    amplify        by Kx      scale by K (or by K)
    clamp          to V       pin the feature to V
    steer, add     by ±A      add A times the feature's decoder row / the direction
    project out    by P%      remove fraction P/100 of the projection (or by a fraction; default all)
    cap            at C       cap the projection at C
    monitor        above T    record where the feature is above T (default 0)

A word holding spaces, ``;``, ``"`` or starting with ``#`` is written in double
quotes with JSON escapes (``site "my layer"``). `format_dsl` prints canonical
verbs (scale, clamp, add, project out, cap, monitor) and every number as
``repr(float)``, so ``parse_dsl(format_dsl(edits)) == edits`` exactly.

Errors are `SpecError`s naming the line, the offending word and what was
expected. This module only reads and prints text; the meaning of each field is
`steer.spec.edit`'s and the sugar is `steer.spec.yaml_io`'s, shared with YAML.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from steer.errors import SpecError
from steer.ops import OPERATIONS, dsl_verbs
from steer.ops.amounts import NUMBER, Verb
from steer.spec.edit import Condition, Edit
from steer.spec.yaml_io import MODIFIERS, build_edit, show

VERBS: dict[str, Verb] = dsl_verbs()
"""Each DSL verb, its amount's clause word, and how that amount reads — from the operation registry."""
CANONICAL_VERB: dict[str, str] = {op.name: op.dsl_verb for op in OPERATIONS.values()}
AMOUNT_WORDS: tuple[str, ...] = tuple(dict.fromkeys(op.dsl_word for op in OPERATIONS.values()))

_TOKEN = re.compile(
    r"""(?P<newline>\n)
      | (?P<space>[^\S\n]+)
      | (?P<comment>\#[^\n]*)
      | (?P<semicolon>;)
      | (?P<quoted>"(?:[^"\\\n]|\\[^\n])*")
      | (?P<word>[^\s;"]+)
      | (?P<bad>")""",
    re.VERBOSE,
)
_BARE = re.compile(r'[^\s;"#][^\s;"]*')
_FEATURE_ID = re.compile(r"[0-9]{1,100}")


@dataclass(frozen=True)
class _Word:
    text: str
    """As written (quotes included)."""
    value: str
    """As meant (quotes removed, escapes decoded)."""
    quoted: bool

    def is_keyword(self, keyword: str) -> bool:
        return not self.quoted and self.value == keyword


def _split(text: str, source: str | None) -> list[tuple[int, list[_Word]]]:
    """The text's edits as (line number, words), without comments and empty edits."""
    edits: list[tuple[int, list[_Word]]] = []
    words: list[_Word] = []
    line = start = 1
    for match in _TOKEN.finditer(text):
        kind, token = match.lastgroup, match.group()
        if kind in ("newline", "semicolon"):
            if words:
                edits.append((start, words))
            words = []
            line += kind == "newline"
            continue
        if kind == "bad":
            raise SpecError('unterminated quote `"`', where=_where(source, line))
        if kind not in ("quoted", "word"):
            continue
        if not words:
            start = line
        if kind == "word":
            words.append(_Word(token, token, False))
            continue
        try:
            value = json.loads(token)
        except ValueError:
            raise SpecError(f"bad quoted word {show(token)}: use JSON escapes", where=_where(source, line)) from None
        words.append(_Word(token, value, True))
    if words:
        edits.append((start, words))
    return edits


def _where(source: str | None, line: int) -> str:
    return f"{source}:{line}" if source else f"line {line}"


class _Reader:
    """The words of one edit, read left to right."""

    def __init__(self, words: list[_Word], where: str):
        self.words = words
        self.position = 0
        self.where = where

    def peek(self) -> _Word | None:
        return self.words[self.position] if self.position < len(self.words) else None

    def next(self, expected: str, after: str) -> _Word:
        word = self.peek()
        if word is None:
            raise SpecError(f"expected {expected} after `{after}`, got the end of the edit", where=self.where)
        self.position += 1
        return word

    def fail(self, expected: str, after: str, word: _Word) -> SpecError:
        return SpecError(f"expected {expected} after `{after}`, got {show(word.text)}", where=self.where)

    def feature_id(self, after: str) -> int:
        word = self.next("a feature id (an integer ≥ 0)", after)
        if word.quoted or not _FEATURE_ID.fullmatch(word.value):
            raise self.fail("a feature id (an integer ≥ 0)", after, word)
        return int(word.value)

    def number(self, after: str) -> float:
        word = self.next("a number", after)
        value = NUMBER.read(word.value)
        if value is None:
            raise self.fail("a number", after, word)
        return value


def _parse_edit(words: list[_Word], where: str) -> Edit:
    reader = _Reader(words, where)
    first = reader.next("a verb", "the start")  # never fails: an edit has at least one word
    name = first.value
    if first.is_keyword("project"):
        out = reader.next("`out`", "project")
        if not out.is_keyword("out"):
            raise reader.fail("`out`", "project", out)
        name = "project out"
    elif first.quoted or name not in VERBS:
        raise SpecError(f"unknown verb {show(first.text)}; expected one of {', '.join(VERBS)}", where=where)
    verb = VERBS[name]

    target_expected = "`feature N` or `direction FILE:KEY`"
    kind = reader.next(target_expected, name)
    target: dict[str, Any]
    if kind.is_keyword("feature"):
        target = {"feature": reader.feature_id("feature")}
    elif kind.is_keyword("direction"):
        target = {"direction": reader.next("a direction FILE:KEY", "direction").value}
    else:
        raise reader.fail(target_expected, name, kind)

    fields: dict[str, Any] = {"amount": verb.fixed}
    seen: set[str] = set()
    clauses = ((verb.amount_key,) if verb.amount_key else ()) + MODIFIERS
    while (word := reader.peek()) is not None:
        reader.position += 1
        clause = word.value if not word.quoted else None
        if clause in seen:
            raise SpecError(f"`{clause}` given twice", where=where)
        if clause is not None and clause == verb.amount_key:
            assert verb.amount is not None
            value = reader.next(verb.amount.expected, clause)
            fields["amount"] = verb.amount.read(value.value)
            if fields["amount"] is None:
                raise reader.fail(verb.amount.expected, clause, value)
        elif clause in AMOUNT_WORDS:
            takes = f"its amount with `{verb.amount_key}`" if verb.amount_key else "no amount"
            raise SpecError(f"{name} takes {takes}, not `{clause}`", where=where)
        elif clause == "when":
            fields["when"] = _read_when(reader)
        elif clause in ("units", "scope", "site"):
            fields[clause] = reader.next(f"a {clause}" if clause == "site" else f"the {clause}", clause).value
        else:
            allowed = ", ".join(f"`{c}`" for c in clauses if c not in seen)
            raise SpecError(f"unexpected {show(word.text)}; expected one of {allowed}", where=where)
        seen.add(clause)
    if verb.amount_key is not None and verb.required and verb.amount_key not in seen:
        assert verb.amount is not None
        raise SpecError(f"{name} needs `{verb.amount_key}` followed by {verb.amount.expected}", where=where)
    return build_edit(name, [({"op": verb.op, **target}, where), (fields, where)], origin=where)


def _read_when(reader: _Reader) -> str | Condition:
    expected = "`active`, `always` or `feature J above T`"
    word = reader.next(expected, "when")
    if word.is_keyword("active") or word.is_keyword("always"):
        return word.value
    if not word.is_keyword("feature"):
        raise reader.fail(expected, "when", word)
    feature = reader.feature_id("feature")
    above = reader.next("`above T`", f"when feature {feature}")
    if not above.is_keyword("above"):
        raise reader.fail("`above T`", f"when feature {feature}", above)
    return Condition(feature, reader.number("above"))


def parse_dsl(text: str, source: str | None = None) -> tuple[Edit, ...]:
    """The edits in ``text``, one per line or ``;``. ``source`` names the text in errors (default: ``line N``)."""
    return tuple(_parse_edit(words, _where(source, line)) for line, words in _split(text, source))


def _word(text: str) -> str:
    return text if _BARE.fullmatch(text) else json.dumps(text)


def format_edit(edit: Edit) -> str:
    """One edit as one canonical line."""
    verb = CANONICAL_VERB[edit.op]
    words = [verb]
    words += ["feature", str(edit.feature)] if edit.feature is not None else ["direction", _word(edit.direction or "")]
    words += [VERBS[verb].amount_key or "", repr(edit.amount)]
    if isinstance(edit.when, Condition):
        words += ["when", "feature", str(edit.when.feature), "above", repr(edit.when.above)]
    elif edit.when != "always":
        words += ["when", edit.when]
    if edit.units != "raw":
        words += ["units", edit.units]
    if edit.scope is not None:
        words += ["scope", edit.scope]
    if edit.site is not None:
        words += ["site", _word(edit.site)]
    return " ".join(words)


def format_dsl(edits: Iterable[Edit]) -> str:
    """The edits as canonical DSL, one per line: ``parse_dsl(format_dsl(edits)) == tuple(edits)``."""
    return "\n".join(format_edit(edit) for edit in edits)
