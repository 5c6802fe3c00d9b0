"""Edit specs as frozen values: what the user asked for, nothing resolved yet.

A `Spec` names a model, zero or more SAEs, a default site and scope, and a tuple
of `Edit`s. Each `Edit` is one operation of DESIGN §5 on one target (an SAE
feature id or a direction reference ``FILE.safetensors:KEY``) with one amount
whose meaning depends on the operation:

The operations, their amounts (YAML key, default, sign), the units and
targets they take live in their own modules (`steer.ops.<op>`, registered in
`steer.ops.OPERATIONS`); `Edit` checks a value against that vocabulary.
(`feature` units need a feature target.) Modifiers: ``when`` is ``always``
(default), ``active`` (the edit's own feature f_i(x) > 0) or a `Condition`
``{feature: j, above: t}``; ``scope`` is all / prompt / generation (None: the
spec's default); ``site`` overrides the spec's / SAE's site.

Values here are validated for what can be checked without a model or SAE
(signs, ranges, which fields an op takes). Resolving against a model and an SAE
(feature id < d_sae, site exists, units calibrated) is the compiler's job
(`steer.plan`); its errors name an edit by `Edit.where`, which leads with the
file and line the edit was read from (`Edit.origin`), like the readers' own
errors. Never mutate a Spec: build a new one with `dataclasses.replace`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Union

from steer.errors import SpecError
from steer.ops import OPERATIONS

Op = str
"""An operation name: a key of `steer.ops.OPERATIONS` (its module holds the vocabulary and semantics)."""
OPS: tuple[str, ...] = tuple(OPERATIONS)

Units = Literal["raw", "feature", "norm"]
UNITS: tuple[str, ...] = ("raw", "feature", "norm")

Scope = Literal["all", "prompt", "generation"]
SCOPES: tuple[str, ...] = ("all", "prompt", "generation")


@dataclass(frozen=True)
class Condition:
    """Apply an edit only at tokens where feature ``feature`` is above ``above``."""

    feature: int
    """The SAE feature id read at the edit's site."""
    above: float
    """The edit applies where f_feature(x) > above."""


When = Union[Literal["always", "active"], Condition]


@dataclass(frozen=True)
class Edit:
    op: Op
    """An operation of `steer.ops.OPERATIONS` (scale, clamp, add, project_out, cap, monitor, ...)."""
    feature: int | None = None
    """Target SAE feature id (exactly one of feature / direction)."""
    direction: str | None = None
    """Target direction ``FILE.safetensors:KEY`` (a 1-D tensor of size d_model), relative to the spec file."""
    amount: float | None = None
    """The op's amount: factor, value, strength, fraction, cap or threshold (the op's `amount_key`)."""
    when: When = "always"
    """always, active (own feature > 0), or Condition(feature, above)."""
    units: Units = "raw"
    """raw; feature = multiples of the feature's p99 activation; norm = fraction of the mean residual norm."""
    scope: Scope | None = None
    """all, prompt or generation tokens; None takes the spec's scope."""
    site: str | None = None
    """Override the site (canonical, SAELens hook name or HF module path)."""
    origin: str | None = field(default=None, compare=False, repr=False)
    """Where the edit was written: ``FILE:LINE`` (a YAML spec's edit item, a DSL file's line) or ``line N`` (DSL
    text); None for an edit built in Python. Not part of the edit's value: ignored by ==, hash, repr and dumps;
    kept by `dataclasses.replace`."""

    def __post_init__(self) -> None:
        where = f"edit {self.describe_target()}"
        if self.op not in OPS:
            raise SpecError(f"unknown operation {self.op!r}; allowed: {', '.join(OPS)}", where="edit")
        if (self.feature is None) == (self.direction is None):
            raise SpecError("give exactly one target: a feature id or a direction FILE:KEY", where=where)
        if self.feature is not None:
            if isinstance(self.feature, bool) or not isinstance(self.feature, int) or self.feature < 0:
                raise SpecError(f"feature must be an integer ≥ 0, got {self.feature!r}", where=where)
        op = OPERATIONS[self.op]
        if self.direction is not None:
            if not op.directions:
                raise SpecError(f"{self.op} needs a feature target, not a direction", where=where)
            check_direction_ref(self.direction, where)
        amount = self.amount if self.amount is not None else op.default
        key = op.amount_key
        if amount is None:
            raise SpecError(f"{self.op} needs `{key}`", where=where)
        if not _is_finite_number(amount):
            raise SpecError(f"`{key}` must be a finite number, got {amount!r}", where=where)
        if op.nonnegative and amount < 0:
            raise SpecError(f"`{key}` must be ≥ 0, got {amount!r}", where=where)
        object.__setattr__(self, "amount", float(amount))
        if self.units not in UNITS:
            raise SpecError(f"unknown units {self.units!r}; allowed: {', '.join(UNITS)}", where=where)
        if self.units not in op.units:
            raise SpecError(f"{self.op} takes units {', '.join(op.units)}, not {self.units!r}", where=where)
        if self.units == "feature" and self.feature is None:
            raise SpecError("units `feature` need a feature target", where=where)
        if self.scope is not None and self.scope not in SCOPES:
            raise SpecError(f"unknown scope {self.scope!r}; allowed: {', '.join(SCOPES)}", where=where)
        if isinstance(self.when, Condition):
            c = self.when
            if isinstance(c.feature, bool) or not isinstance(c.feature, int) or c.feature < 0:
                raise SpecError(f"when.feature must be an integer ≥ 0, got {c.feature!r}", where=where)
            if not _is_finite_number(c.above):
                raise SpecError(f"when.above must be a finite number, got {c.above!r}", where=where)
            object.__setattr__(self, "when", Condition(c.feature, float(c.above)))
        elif self.when not in ("always", "active"):
            raise SpecError(f"`when` must be always, active or {{feature: J, above: T}}, got {self.when!r}", where=where)
        if self.when == "active" and self.feature is None:
            raise SpecError("`when: active` needs a feature target", where=where)
        if not op.takes_when and self.when != "always":
            raise SpecError(f"{self.op} takes no `when` (its `{key}` is the threshold)", where=where)

    def describe_target(self) -> str:
        return f"{self.op} feature {self.feature}" if self.feature is not None else f"{self.op} direction {self.direction}"

    def where(self, index: int) -> str:
        """How errors about this edit, the spec's ``edits[index]``, name it: ``spec.yaml:12: edits[3] (scale
        feature 5)`` where the edit was read from text (`origin`), ``edits[3] (scale feature 5)`` otherwise."""
        label = f"edits[{index}] ({self.describe_target()})"
        return f"{self.origin}: {label}" if self.origin else label


def _is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def check_direction_ref(ref: str, where: str) -> None:
    """A direction reference is ``FILE:KEY`` with a non-empty file and key."""
    if not isinstance(ref, str) or ":" not in ref:
        raise SpecError(f"direction must be FILE:KEY (a safetensors file and a tensor name), got {ref!r}", where=where)
    path, _, key = ref.rpartition(":")
    if not path or not key:
        raise SpecError(f"direction must be FILE:KEY (a safetensors file and a tensor name), got {ref!r}", where=where)


@dataclass(frozen=True)
class Spec:
    edits: tuple[Edit, ...]
    """The edits; all edits at one site read the same x and their deltas add up."""
    model: str | None = None
    """Model registry name, local HF directory, GGUF file or hub id."""
    sae: tuple[str, ...] = ()
    """SAE paths or names (one per site); feature edits use the SAE at their site."""
    site: str | None = None
    """Default site, needed when the SAE's config names none."""
    scope: Scope = "all"
    """Default scope for edits that give none."""
    name: str | None = None
    """A short label (used in reports and export names)."""
    description: str | None = None
    """Free text: why this edit exists."""
    max_kl: float | None = None
    """Accept approximate lowerings (a graft, a LoRA without the writer's bias) whose measured mean KL(hooks ‖ artifact)
    per token on steer's calibration text is at most this many nats; None: refuse them unless --allow-approximate."""
    base_dir: str | None = field(default=None, compare=False)
    """Directory relative paths resolve against (the spec file's); not serialised."""

    def __post_init__(self) -> None:
        if not isinstance(self.edits, tuple):
            object.__setattr__(self, "edits", tuple(self.edits))
        if isinstance(self.sae, str):
            object.__setattr__(self, "sae", (self.sae,))
        elif not isinstance(self.sae, tuple):
            object.__setattr__(self, "sae", tuple(self.sae))
        if not self.edits:
            raise SpecError("a spec needs at least one edit", where="edits")
        for i, e in enumerate(self.edits):
            if not isinstance(e, Edit):
                raise SpecError(f"edit {i} is {type(e).__name__}, expected an Edit", where="edits")
        if self.scope not in SCOPES:
            raise SpecError(f"unknown scope {self.scope!r}; allowed: {', '.join(SCOPES)}", where="scope")
        if self.max_kl is not None:
            if not _is_finite_number(self.max_kl) or self.max_kl < 0:
                raise SpecError(f"`max_kl` must be a number ≥ 0 (nats per token), got {self.max_kl!r}", where="max_kl")
            object.__setattr__(self, "max_kl", float(self.max_kl))

    def scope_of(self, edit: Edit) -> str:
        return edit.scope if edit.scope is not None else self.scope
