"""How an edit's amount is written: the readers of amounts and the verbs that start an edit.

An amount arrives as a YAML scalar (int, float, str, ...) or a DSL word (str).
Strings are read with decimal arithmetic so "80%" is exactly 0.8 and
suppressing by it gives exactly 0.2. Each operation module (`steer.ops.<op>`)
says which reader its amount uses and which sugar verbs it has; the spec
reader and the DSL read them from the registry.

Never imports torch or anything above `steer.errors`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, DecimalException

_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def decimal(value: object) -> Decimal | None:
    """A finite number as a Decimal, or None. Accepts int, float and numeric strings (YAML reads 1e-3 as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        number = Decimal(repr(value))
    elif isinstance(value, str) and _NUMBER.fullmatch(value):
        number = Decimal(value)
    else:
        return None
    return number if math.isfinite(float(number)) else None


def read_fraction(value: object) -> Decimal | None:
    """``P%`` or a plain fraction."""
    if isinstance(value, str) and value.endswith("%"):
        percent = decimal(value[:-1])
        return None if percent is None else percent / 100
    return decimal(value)


def read_suppress(value: object) -> Decimal | None:
    """Suppress by ``P%`` (or by a fraction in [0, 1]): the scale factor 1 − P/100."""
    fraction = read_fraction(value)
    if fraction is None or not 0 <= fraction <= 1:
        return None
    return 1 - fraction


def read_amplify(value: object) -> Decimal | None:
    """Amplify by ``Kx`` or ``K``: the scale factor K."""
    if isinstance(value, str) and value.endswith("x"):
        value = value[:-1]
    return decimal(value)


@dataclass(frozen=True)
class Amount:
    """How one verb reads its amount, and what to tell the user when it cannot."""

    expected: str
    """What the amount must look like, for error messages ("a number", ...)."""
    parse: Callable[[object], Decimal | None]

    def read(self, value: object) -> float | None:
        try:
            number = self.parse(value)
        except DecimalException:  # a percentage too large to divide
            return None
        return None if number is None else float(number)


NUMBER = Amount("a number", decimal)
FRACTION = Amount("a percentage like 50% or a fraction like 0.5", read_fraction)
SUPPRESS = Amount("a percentage from 0% to 100% (like 80%) or a fraction from 0 to 1", read_suppress)
AMPLIFY = Amount("a factor like 2x or 2", read_amplify)


@dataclass(frozen=True)
class Slider:
    """The demo's control for a verb: a slider and the DSL line it stands for."""

    label: str
    minimum: float
    maximum: float
    step: float
    default: float
    template: str
    """The DSL line; ``{i}`` is the feature id, ``{s}`` the slider's value."""


@dataclass(frozen=True)
class Verb:
    """A word that starts an edit: an operation's own name or sugar for it."""

    op: str
    """The canonical op it becomes."""
    amount_key: str | None
    """The YAML key (DSL: the clause word) of its amount; None: it takes none."""
    amount: Amount | None = None
    """How to read the amount."""
    fixed: float | None = None
    """The amount of a verb that takes none (ablate: 0)."""
    required: bool = True
    """Whether the amount must be given."""
    slider: Slider | None = None
    """How the demo offers this verb on a feature (None: not offered)."""


__all__ = ["AMPLIFY", "Amount", "FRACTION", "NUMBER", "SUPPRESS", "Slider", "Verb", "decimal"]
