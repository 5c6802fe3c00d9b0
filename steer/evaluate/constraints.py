"""Constraints on what an edit may cost, for sweeps and tuning: "keep gender-explicit ≥ 95% of base", "KL ≤ 0.05".

Written as ``NAME OP VALUE`` (spaces optional), repeatable as ``--keep``:

    gender-explicit>=95%     a suite's steered score ≥ 95% of its base score (relative, by the %)
    capability>=0.6          a suite's steered score ≥ 0.6 (absolute)
    age<=0.5                 ... ≤ 0.5
    kl<=0.05                 mean KL(base‖steered) on neutral text, nats/token
    ppl<=3%                  perplexity change on neutral text, in % (a % here is the change itself)
    gender-explicit:accuracy_female>=95%
                             one of a suite's secondary numbers (``SUITE:KEY``; the keys are
                             `steer.evaluate.scoring.extra_names`): each stated gender's own
                             accuracy, the lean (``signed``), the margin ... — relative to its base
                             value with a %, else absolute

``OP`` is ``>=`` or ``<=`` (``≥``/``≤`` too). A point or trial is *feasible*
when every constraint holds; sweeps and tuning draw the Pareto front, and
tuning chooses, among feasible ones only, and say which constraint binds when
none is. Never touches a model: it reads `Report` s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from steer.errors import SteerError

SIDE_EFFECTS: tuple[str, ...] = ("kl", "ppl")
"""Constraint names that are not suites: mean KL on neutral text, perplexity change in %."""
_FORM = re.compile(r"^\s*(?P<name>[^<>=≤≥\s]+)\s*(?P<op>>=|<=|≥|≤)\s*(?P<value>[-+]?[0-9.eE+-]+)\s*(?P<pct>%?)\s*$")


@dataclass(frozen=True)
class Constraint:
    name: str
    """A suite name, ``kl`` or ``ppl``."""
    op: str
    """``>=`` or ``<=``."""
    value: float
    relative: bool = False
    """A suite bound given in % of the base score."""
    key: str | None = None
    """A secondary number of the suite (``SUITE:KEY``) instead of its headline score."""

    @property
    def label(self) -> str:
        """What is bounded: the suite (its headline), ``SUITE:KEY``, ``kl`` or ``ppl``."""
        return f"{self.name}:{self.key}" if self.key else self.name

    def __str__(self) -> str:
        return f"{self.label}{self.op}{self.value:g}{'%' if self.relative or self.name == 'ppl' else ''}"

    def bound(self, report) -> float:
        """The limit on the measured value, for ``report``'s base."""
        if self.relative:
            return self.value / 100.0 * self.number(report.suite(self.name).base)
        return self.value

    def measured(self, report) -> float:
        if self.name == "kl":
            return report.neutral.kl_mean
        if self.name == "ppl":
            return report.neutral.ppl_change_pct
        return self.number(report.suite(self.name).steered)

    def number(self, result) -> float:
        """The bounded number of one `SuiteResult` (base or steered): its headline score or secondary number."""
        if self.key is None:
            return result.score
        value = result.extras.get(self.key)
        if value is None:  # a label with no prompts in this split, or a correlation of constant values
            raise SteerError(f"{result.suite} has no {self.key} on its {result.split} prompts", where=f"--keep {self}")
        return value

    def violation(self, report) -> float:
        """0 when the constraint holds, else by how much it misses (in the measured value's units)."""
        gap = self.measured(report) - self.bound(report)
        return max(0.0, -gap if self.op == ">=" else gap)

    def describe(self, report) -> str:
        state = "holds" if self.violation(report) == 0 else "MISSED"
        return f"{self} {state} (measured {self.measured(report):.4g}, bound {self.bound(report):.4g})"


def parse_constraint(text: str) -> Constraint:
    """``NAME>=VALUE[%]`` or ``NAME<=VALUE[%]`` (module docstring)."""
    match = _FORM.match(text)
    if not match:
        raise SteerError("write NAME>=VALUE or NAME<=VALUE, e.g. gender-explicit>=95% or kl<=0.05", where=f"--keep {text}")
    name, op, pct = match["name"], {"≥": ">=", "≤": "<="}.get(match["op"], match["op"]), bool(match["pct"])
    try:
        value = float(match["value"])
    except ValueError:
        raise SteerError(f"{match['value']!r} is not a number", where=f"--keep {text}") from None
    if name == "kl" and (pct or op != "<=" or value < 0):
        raise SteerError("kl takes an upper bound in nats/token, e.g. kl<=0.05", where=f"--keep {text}")
    if name == "ppl" and op != "<=":
        raise SteerError("ppl takes an upper bound on the perplexity change in %, e.g. ppl<=3%", where=f"--keep {text}")
    name, colon, key = name.rpartition(":") if ":" in name else (name, "", None)
    if colon and (not name or not key or name in SIDE_EFFECTS):
        raise SteerError("write SUITE:KEY for one of a suite's secondary numbers, e.g. gender-explicit:accuracy_female"
                         ">=95%", where=f"--keep {text}")
    return Constraint(name, op, value, relative=pct and name not in SIDE_EFFECTS, key=key)


def constraint_suites(constraints) -> list[str]:
    """The suites the constraints name (they must be evaluated too)."""
    return [c.name for c in constraints if c.name not in SIDE_EFFECTS]


def resolve(constraints, suites, where: str) -> tuple[Constraint, ...]:
    """The constraints with each suite named as the report names it: a constraint may name a suite by its name or
    by the file it was loaded from; one that names no suite in ``suites`` is an error."""
    import dataclasses

    from steer.evaluate.scoring import extra_names

    by_key = {key: s for s in suites for key in (s.name, s.path)}
    out = []
    for c in constraints:
        if c.name in SIDE_EFFECTS:
            out.append(c)
            continue
        suite = by_key.get(c.name)
        if suite is None:
            raise SteerError(f"the constraint names suite {c.name!r}, which is not evaluated here "
                             f"({', '.join(s.name for s in suites)}); add it with --suite", where=where)
        if c.key is not None and c.key not in (names := extra_names(suite)):
            raise SteerError(f"{suite.name} has no secondary number {c.key!r}; it has "
                             f"{', '.join(names) or 'none'}", where=f"--keep {c}")
        out.append(dataclasses.replace(c, name=suite.name))
    return tuple(out)


def feasible(constraints, report) -> bool:
    return all(c.violation(report) == 0 for c in constraints)


def binding(constraints, reports) -> str:
    """Which constraint rules out the most points, with its closest measured value: for "none is feasible"."""
    if not constraints or not reports:
        return ""
    missed = {str(c): [r for r in reports if c.violation(r) > 0] for c in constraints}
    worst = max(constraints, key=lambda c: len(missed[str(c)]))
    closest = min(reports, key=worst.violation)
    return (f"{worst} binds: missed by {len(missed[str(worst)])} of {len(reports)}; closest "
            f"{worst.measured(closest):.4g} against a bound of {worst.bound(closest):.4g}")


__all__ = ["Constraint", "SIDE_EFFECTS", "binding", "resolve", "constraint_suites", "feasible", "parse_constraint"]
