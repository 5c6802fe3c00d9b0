"""Which lowering targets can express which site edits, for one error message that helps.

Each target answers ``check(site_edit, site, config) -> reason | None``. When an
edit has no lowering for the chosen target, the error lists every failing edit
with its reason and the targets that would take it (hooks and pack take all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from steer.errors import SteerError
from steer.models.adapters import Site
from steer.plan.ir import Plan, SiteEdit
from steer.spec.edit import Edit


class LoweringError(SteerError):
    """An edit that the chosen target cannot express (or only approximately, when that is refused)."""


class Unlowerable(Exception):
    """Raised by a target's per-edit rule: why this edit has no lowering there."""


@dataclass
class EditLowering:
    """How one edit of the spec was lowered, across all its sites."""

    index: int
    edit: Edit
    kind: str = "exact"
    """exact | approximate."""
    sites: list[str] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    note: str = ""


Rule = Callable[[SiteEdit, Site, EditLowering], "list[str] | None"]


def lower_each(plan: Plan, target: str, config: dict, rule: Rule) -> list[EditLowering]:
    """Apply ``rule`` to every site edit; every `Unlowerable` is gathered into one `LoweringError`.

    ``rule`` returns the names of what it changed, or None when the edit changes
    no output (monitor); it may set ``kind``/``note`` on the edit's lowering.
    """
    lowerings: dict[int, EditLowering] = {}
    failures: dict[int, tuple[Edit, str]] = {}
    for sp in plan.sites:
        for se in sp.edits:
            low = lowerings.setdefault(se.index, EditLowering(se.index, se.edit))
            try:
                changed = rule(se, sp.site, low)
            except Unlowerable as exc:
                failures.setdefault(se.index, (se.edit, str(exc)))
                continue
            if changed is None:
                low.note = low.note or "changes no output; monitoring needs hooks"
                continue
            low.sites.append(str(sp.site))
            low.tensors.extend(t for t in changed if t not in low.tensors)
    if failures:
        raise LoweringError(describe_failures(target, failures, plan, config), where=f"target {target}")
    return [lowerings[i] for i in sorted(lowerings)]


def _checks():
    from steer.lower.adapter import check_adapter
    from steer.lower.cvec import check_cvec
    from steer.lower.weights import check_weights

    return {"weights": check_weights, "adapter": check_adapter, "cvec": check_cvec}


TARGETS: tuple[str, ...] = ("weights", "adapter", "cvec", "pack")


def targets_taking(index: int, plan: Plan, config: dict) -> list[str]:
    """The artifact targets that lower every site of edit ``index`` (pack always does)."""
    takers = []
    for name, check in _checks().items():
        if all(check(se, sp.site, config) is None for sp in plan.sites for se in sp.edits if se.index == index):
            takers.append(name)
    return takers + ["pack"]


def describe_failures(target: str, failures: dict, plan: Plan, config: dict) -> str:
    """``failures``: edit index → (edit, reason)."""
    parts = []
    for index, (edit, reason) in sorted(failures.items()):
        others = [t for t in targets_taking(index, plan, config) if t != target]
        parts.append(f"edits[{index}] ({edit.describe_target()}): {reason}; targets that take it: {', '.join(others)}")
    return f"{len(failures)} edit(s) have no {target} lowering — " + " | ".join(parts)
