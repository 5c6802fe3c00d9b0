"""The Plan: the compiled, resolved form of a spec — the only thing backends see.

A Plan is a tuple of `SitePlan`s, one per edited site. Each holds

* a `FeatureReader`: the SAE slice the site needs (only the features that are
  edited, monitored or used as a ``when`` condition — a narrow SAE of width F;
  for topk the whole SAE, since a topk feature depends on every pre-activation),
* ``directions`` ``(d, P)``: the unit vectors whose projections ``x·û`` some
  edit reads (project_out, cap),
* its `SiteEdit`s, each with its amount already in raw units, which read slot it
  uses, its write vector ``(d,)``, its condition and scope.

All tensors are fp32 on the CPU; `steer.lower.hooks` casts them once per use.
Backends never reach back into the spec or the SAE file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from steer.models.adapters import Site
from steer.ops import OPERATIONS
from steer.sae.sae import SAE
from steer.spec.edit import Edit, Spec


@dataclass(frozen=True, eq=False)
class FeatureReader:
    sae: SAE
    """The slice to encode with: width F for relu/jumprelu; the full SAE for topk."""
    feature_ids: tuple[int, ...]
    """The SAE feature id of each read slot."""
    gather: torch.Tensor | None
    """topk only: indices of feature_ids in the full SAE's output, ``(F,)``."""
    sae_hash: str
    """Content hash of the full SAE the slice came from."""


@dataclass(frozen=True, eq=False)
class SiteEdit:
    index: int
    """Position of the edit in spec.edits."""
    edit: Edit
    """The edit as the user wrote it (for reports)."""
    amount: float
    """The op's amount in raw units."""
    read_slot: int | None
    """Feature slot (feature-reading ops) or direction slot (projection ops)."""
    write: torch.Tensor | None
    """The delta's direction ``(d,)``: d_i, û or the given vector; None for monitor."""
    when_slot: int | None = None
    """Feature slot of the condition, or None (always)."""
    when_above: float = 0.0
    """The condition holds where f[when_slot] > when_above."""
    scope: str = "all"
    note: str = ""
    """How the amount was resolved (units), for the plan report."""

    @property
    def op(self) -> str:
        return self.edit.op

    @property
    def changes_nothing(self) -> bool:
        """The delta is zero whatever the input: a read-out (monitor), or a constant or linear op whose amount
        makes its coefficient 0 (add 0, scale by 1, project out 0%). Nonlinear ops (clamp, cap) never count."""
        op = OPERATIONS[self.op]
        if not op.writes:
            return True
        if op.reads == "nothing" or op.linear:
            return float(op.coefficient(self.amount, 1.0, 1.0)) == 0.0
        return False


@dataclass(frozen=True, eq=False)
class SitePlan:
    site: Site
    reader: FeatureReader | None
    directions: torch.Tensor | None
    """``(d, P)`` unit columns read as x·û, or None."""
    edits: tuple[SiteEdit, ...]


@dataclass(frozen=True, eq=False)
class Plan:
    spec: Spec
    model_type: str
    n_layers: int
    hidden_size: int
    sites: tuple[SitePlan, ...]
    saes: tuple[tuple[str, str], ...] = field(default=())
    """(source, content hash) of each SAE used."""

    @property
    def changes_nothing(self) -> bool:
        """Every edit's delta is zero (`SiteEdit.changes_nothing`): the plan is the unedited model, so the
        evaluation scores it as the base itself (exactly 0 change, whatever the batch shapes)."""
        return all(e.changes_nothing for sp in self.sites for e in sp.edits)

    @property
    def needs_positions(self) -> bool:
        return any(e.scope != "all" for sp in self.sites for e in sp.edits)

    def describe(self) -> str:
        lines = [f"plan for {self.model_type} ({self.n_layers} layers, d={self.hidden_size}):"]
        for sp in self.sites:
            reads = f"reads {len(sp.reader.feature_ids)} SAE feature(s)" if sp.reader else "reads no SAE"
            lines.append(f"  {sp.site}: {reads}")
            for e in sp.edits:
                scope = "" if e.scope == "all" else f", {e.scope} tokens"
                cond = "" if e.when_slot is None else f", when f[{sp.reader.feature_ids[e.when_slot]}] > {e.when_above:g}"
                note = f"  [{e.note}]" if e.note else ""
                lines.append(f"    #{e.index} {e.edit.describe_target()} amount={e.amount:g}{cond}{scope}{note}")
        return "\n".join(lines)
