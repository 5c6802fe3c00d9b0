"""Which lowering targets can express which site edits, for one error message that helps.

Each target answers ``check(site_edit, site, config) -> reason | None``. When an
edit has no lowering for the chosen target, the error lists every failing edit
with its reason and the targets that would take it (hooks and pack take all).
"""

from __future__ import annotations

from steer.plan.ir import Plan


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
