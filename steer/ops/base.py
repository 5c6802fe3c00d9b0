"""What an edit operation is, and the one registry of them.

An `Operation` is everything steer knows about one operation of DESIGN §5, in
its own module (`steer.ops.<op>`):

- its **vocabulary**: the YAML key and DSL verb, sugar verbs (suppress, ablate,
  amplify, steer), the amount's YAML key, reader, default and sign rule, the
  units it takes, whether it takes a direction target or a `when`, its help
  text, and the range `steer tune` searches by default;
- its **reference semantics** as a *coefficient*: every op's delta at a site
  is ``coefficient · w`` for one write vector ``w`` (the feature's decoder row
  ``d_i``, a unit direction ``û`` or a given vector), so the hook sums all
  edits at a site as one ``(B,T,E) @ (E,d)`` product;
- what it **lowers to**, as one of a few lowering primitives (`Primitive`),
  which the artifact targets (`steer.lower`) accept or refuse.

`register` is the one place an operation enters `OPERATIONS`; a second
registration of a name (or of a verb another op already uses) is an error.
The spec reader, the DSL, the compiler, tuning and the demo read the vocabulary
from here; no other module names an operation.

Never import a backend or the spec here: ops state semantics, everything
else consumes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import torch

from steer.ops.amounts import NUMBER, Amount, Slider, Verb

Reads = Literal["feature", "projection", "nothing"]


class Primitive(Enum):
    """What an operation's delta is, as the artifact targets see it."""

    CONSTANT = "a constant vector added at a point of the stream"
    """delta = α·w whatever x is: a writer bias, a control vector."""
    PROJECTION = "a rank-1 linear map of the stream"
    """delta = −p·(x·û)·û: orthogonalised writers, a rank-1 LoRA."""
    FEATURE = "a nonlinear function of a feature"
    """delta = c(f_i(x))·d_i: hooks exactly; a graft approximately."""
    NONLINEAR = "a nonlinear function of a projection"
    """delta = c(x·û)·û (a cap): hooks only."""
    NOTHING = "no change (a read-out)"
    """monitor: hooks record it; every target drops it."""


@dataclass(frozen=True)
class Operation:
    name: str
    """The canonical name: the YAML verb key and the ``op`` of an `Edit`."""
    reads: Reads
    """feature: the edit's own f_i(x); projection: x·û; nothing: a constant."""
    coefficient: Callable[..., torch.Tensor | float]
    """``coefficient(amount, read, sigma)`` → (B,T) or scalar; ``read`` is f_i(x) or x·û, (B,T)."""
    formula: str
    """The DESIGN §5 delta, for reports and help text."""
    lowers_to: Primitive
    """What the delta is, for the artifact targets."""
    amount_key: str
    """The YAML key of its amount (`factor`, `to`, `strength`, ...)."""
    dsl_verb: str
    """The DSL's canonical verb (``project out`` for project_out)."""
    dsl_word: str
    """The DSL clause word before the amount (`by`, `to`, `at`, `above`)."""
    help: str
    """One line for help texts: what the amount means."""
    example: str
    """A DSL edit showing the op at its natural site, with ``{feature}`` / ``{direction}`` (``FILE:KEY``) to fill
    in: the equivalence matrix (tests/test_matrix.py) lowers it to every target on every tiny architecture."""
    amount: Amount = NUMBER
    """How its amount is read (YAML and DSL)."""
    default: float | None = None
    """The amount when none is given (None: required)."""
    nonnegative: bool = False
    """The amount must be ≥ 0."""
    units: tuple[str, ...] = ("raw",)
    """The strength units it takes (`raw`, `feature`, `norm`)."""
    directions: bool = False
    """It takes a direction ``FILE:KEY`` as its target, not only a feature."""
    takes_when: bool = True
    """It takes a ``when`` condition."""
    sugar: dict[str, Verb] | None = None
    """Other verbs that become this op (suppress, ablate, amplify for scale; steer for add)."""
    slider: Slider | None = None
    """How the demo offers the op's own verb on a feature (None: not offered)."""
    tune_range: Callable[[float], tuple[float, float] | None] | None = None
    """The range `steer tune` searches the amount in by default, from the spec's amount (None: not searched)."""
    linear: bool = False
    """``coefficient(a, r, σ) = coefficient(a, 1, σ) · r``: the hook folds the factor into the write vector."""

    @property
    def writes(self) -> bool:
        """False for a read-out (monitor), which changes nothing."""
        return self.lowers_to is not Primitive.NOTHING

    @property
    def verb(self) -> Verb:
        """The op's own verb (its YAML key and DSL verb)."""
        return Verb(self.name, self.amount_key, self.amount, required=self.default is None, slider=self.slider)

    def verbs(self) -> dict[str, Verb]:
        """The YAML verbs: its own name, then its sugar."""
        return {self.name: self.verb, **(self.sugar or {})}


OPERATIONS: dict[str, Operation] = {}
"""Every operation by name, in registration order."""


def register(op: Operation) -> Operation:
    if op.name in OPERATIONS:
        raise RuntimeError(f"operation {op.name!r} registered twice")
    taken = {verb: other.name for other in OPERATIONS.values() for verb in [*other.verbs(), other.dsl_verb]}
    for verb in [*op.verbs(), op.dsl_verb]:
        if verb in taken and verb != op.name:
            raise RuntimeError(f"verb {verb!r} of {op.name!r} is already {taken[verb]!r}'s")
    for verb in (op.sugar or {}).values():
        if verb.op != op.name:
            raise RuntimeError(f"sugar of {op.name!r} becomes {verb.op!r}")
    OPERATIONS[op.name] = op
    return op


def yaml_verbs() -> dict[str, Verb]:
    """Every YAML verb key: each op's name, then the sugar."""
    canonical = {name: op.verb for name, op in OPERATIONS.items()}
    sugar = {word: verb for op in OPERATIONS.values() for word, verb in (op.sugar or {}).items()}
    return {**canonical, **sugar}


def sugar_verbs() -> dict[str, Verb]:
    return {word: verb for op in OPERATIONS.values() for word, verb in (op.sugar or {}).items()}


def dsl_verbs() -> dict[str, Verb]:
    """Every DSL verb: each op's DSL verb (with its clause word), then the sugar."""
    out: dict[str, Verb] = {}
    for op in OPERATIONS.values():
        out[op.dsl_verb] = Verb(op.name, op.dsl_word, op.amount, required=op.default is None, slider=op.slider)
        out.update(op.sugar or {})
    return out


__all__ = ["OPERATIONS", "Operation", "Primitive", "dsl_verbs", "register", "sugar_verbs", "yaml_verbs"]
