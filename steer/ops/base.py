"""What an edit operation is, and the one registry of them.

An `Operation` knows its reference semantics (DESIGN §5) as a *coefficient*:
every op's delta at a site is ``coefficient · w`` for one write vector ``w``
(the feature's decoder row ``d_i``, a unit direction ``û`` or a given vector),
so the hook sums all edits at a site as one ``(B,T,E) @ (E,d)`` product. Each
op module registers itself here once; a second registration of a name is an
error. Lowerings to artifacts live in ``steer.lower`` (one module per target).

Never import a backend here: ops state semantics, backends consume them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

Reads = Literal["feature", "projection", "nothing"]


@dataclass(frozen=True)
class Operation:
    name: str
    reads: Reads
    """feature: the edit's own f_i(x); projection: x·û; nothing: a constant."""
    writes: bool
    """False for monitor, which changes nothing."""
    coefficient: Callable[..., torch.Tensor | float]
    """``coefficient(amount, read, sigma)`` → (B,T) or scalar; ``read`` is f_i(x) or x·û, (B,T)."""
    formula: str
    """The DESIGN §5 delta, for reports and help text."""


OPERATIONS: dict[str, Operation] = {}


def register(op: Operation) -> Operation:
    if op.name in OPERATIONS:
        raise RuntimeError(f"operation {op.name!r} registered twice")
    OPERATIONS[op.name] = op
    return op
