"""The artifact targets: one interface, one registry (`TARGETS`), and the per-edit lowering loop they share.

A target is one module of `steer.lower` (``weights``, ``adapter``, ``cvec``, ``pack``) holding a `Target`
subclass, registered with `register` when `steer.lower` is imported. A target says:

- **what it accepts** — ``check(site_edit, site, config)`` → an `Outcome`: exact, approximate (with why),
  refused (with the named reason) or nothing (a read-out it drops). The equivalence matrix
  (tests/test_matrix.py) reads these declarations, with the target's ``exact_kl`` / ``approximate_kl``
  tolerances, as each cell's expected result;
- **write** — lower the plan and write the artifact's own files into a directory (`Written`);
- **load** — the written artifact as something `steer.evaluate` can run (`Loaded`), or a `SteerError` saying
  why it runs outside transformers;
- **verify** — re-measure the artifact against the hooked reference into a `Verdict`.

Everything around the artifact — the atomic directory, the embedded pack, the manifest, the edit card,
suites — is the same for every target and lives in `steer.export.checkpoint`; the CLI, the exporter,
`steer verify`, `steer eval` and the demo look targets up here and never dispatch on their names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Literal

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


OutcomeKind = Literal["exact", "approximate", "refused", "nothing"]


@dataclass(frozen=True)
class Outcome:
    """What a target declares it does with one site edit."""

    kind: OutcomeKind
    reason: str = ""
    """Why it is approximate or refused."""


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


def outcome_of(rule: Callable[[SiteEdit, Site, EditLowering], object], se: SiteEdit, site: Site) -> Outcome:
    """A target's `Outcome` for one site edit, by running its lowering rule on it (nothing is written)."""
    low = EditLowering(se.index, se.edit)
    try:
        changed = rule(se, site, low)
    except Unlowerable as exc:
        return Outcome("refused", str(exc))
    if changed is None:
        return Outcome("nothing", "changes no output")
    return Outcome("approximate", low.note) if low.kind == "approximate" else Outcome("exact")


# -- what a target writes, loads and verifies ---------------------------------------------------

@dataclass
class Written:
    """What `Target.write` reports."""

    lowerings: list[EditLowering]
    notes: list[str] = field(default_factory=list)
    fidelity: object | None = None
    """`steer.verify.fidelity.Fidelity` against the hooked reference, when the target measures it in transformers."""
    manifest: dict = field(default_factory=dict)
    """Target-specific manifest entries (e.g. ``llamacpp_fidelity``, ``rounding``)."""


@dataclass
class Loaded:
    """An artifact ready to evaluate: a steered model (weights, adapter) or a plan for the hooks (pack)."""

    model: object | None = None
    plan: Plan | None = None


@dataclass
class WriteOptions:
    base: str
    """The base model's name or path, as the spec gives it."""
    base_dir: Path | None
    """Its checkpoint directory (None for targets that do not read the base's files)."""
    allow_approximate: bool = False


class Target:
    """One artifact target. Subclasses set the class attributes and implement the four methods."""

    name: ClassVar[str]
    help: ClassVar[str]
    """One line for `steer compile --help` and the demo."""
    reads_base_files: ClassVar[bool] = False
    """The artifact is made from (and must be checked against) the base checkpoint's files."""
    hub_relation: ClassVar[str | None] = None
    """The model card's ``base_model_relation``: one of the four the Hub knows (adapter / merge / quantized /
    finetune). Set it: for a card that names a ``base_model`` but no relation the Hub infers one from the repo's
    files, and a repo it cannot place is listed as a finetune."""
    hub_library: ClassVar[str | None] = None
    """The model card's ``library_name``: the library that loads the artifact (None: none the Hub knows)."""
    verify_needs_model: ClassVar[bool] = True
    """`verify` compares against the hooked base model (False: the file hashes are the whole check)."""
    manifest_keys: ClassVar[tuple[str, ...]] = ()
    """Manifest keys this target fills (present, as None, in every manifest of this target)."""
    exact_kl: ClassVar[float] = 1e-6
    """An exact lowering's max per-token KL(hooks ‖ artifact) (the verification contract, DESIGN §7)."""
    approximate_kl: ClassVar[float | None] = None
    """The mean KL an approximate lowering of this target stays within on the tiny models (None: none declared)."""

    writes_unchanged: ClassVar[bool] = True
    """A plan that changes no output (only read-outs) still makes an artifact (False: refused as empty)."""

    def check(self, se: SiteEdit, site: Site, config: dict) -> Outcome:
        raise NotImplementedError

    def outcome(self, plan: Plan, config: dict) -> Outcome:
        """What this target declares it makes of the whole plan: refused if any site edit is (the first reason),
        else approximate if any is, exact if anything changes, and for read-outs only: exact where the target
        writes an unchanged artifact, refused otherwise."""
        outcomes = [self.check(se, sp.site, config) for sp in plan.sites for se in sp.edits]
        for kind in ("refused", "approximate"):
            found = [o for o in outcomes if o.kind == kind]
            if found:
                return found[0]
        if any(o.kind == "exact" for o in outcomes) or self.writes_unchanged:
            return Outcome("exact")
        return Outcome("refused", f"no edit changes the model's outputs: an empty {self.name} artifact is refused")

    def write(self, plan: Plan, model, tokenizer, out: Path, options: WriteOptions) -> Written:
        raise NotImplementedError

    def load(self, directory: Path, manifest: dict) -> Loaded:
        raise NotImplementedError

    def verify(self, directory: Path, manifest: dict, model, tokenizer, plan: Plan, verdict) -> None:
        raise NotImplementedError


TARGETS: dict[str, Target] = {}
"""Every artifact target by name, in registration order (`steer.lower` registers them)."""


def register(target: Target) -> Target:
    if target.name in TARGETS:
        raise RuntimeError(f"target {target.name!r} registered twice")
    TARGETS[target.name] = target
    return target


def get_target(name: str, where: str = "--target") -> Target:
    if name not in TARGETS:
        raise SteerError(f"unknown target {name!r}; allowed: {', '.join(TARGETS)}", where=where)
    return TARGETS[name]


def targets_taking(index: int, plan: Plan, config: dict) -> list[str]:
    """The artifact targets that lower every site of edit ``index``."""
    return [name for name, target in TARGETS.items()
            if all(target.check(se, sp.site, config).kind != "refused"
                   for sp in plan.sites for se in sp.edits if se.index == index)]


def describe_failures(target: str, failures: dict, plan: Plan, config: dict) -> str:
    """``failures``: edit index → (edit, reason)."""
    parts = []
    for index, (edit, reason) in sorted(failures.items()):
        others = [t for t in targets_taking(index, plan, config) if t != target]
        parts.append(f"{edit.where(index)}: {reason}; targets that take it: {', '.join(others)}")
    return f"{len(failures)} edit(s) have no {target} lowering — " + " | ".join(parts)


def refuse_approximate(target: str, lowerings: list[EditLowering], fidelity, max_kl: float | None) -> str | None:
    """`LoweringError` unless every approximate lowering is accepted by ``max_kl`` (the spec's), judged on
    ``fidelity`` (None: not measured yet, so only "no approximate edits" passes); the acceptance note, if any."""
    approximate = [low for low in lowerings if low.kind != "exact"]
    if not approximate:
        return None
    listing = "; ".join(f"{low.edit.where(low.index)}: {low.note}" for low in approximate)
    if max_kl is None:
        measured = f" (measured: {fidelity.describe()})" if fidelity else ""
        raise LoweringError(f"approximate lowering refused — {listing}{measured}; pass --allow-approximate to accept it, "
                            "or set `max_kl` in the spec to accept it when its measured mean KL(hooks‖artifact) "
                            "per token is at most that", where=f"target {target}")
    if fidelity is None:
        return None
    if fidelity.kl_mean > max_kl:
        raise LoweringError(f"approximate lowering refused — measured mean KL(hooks‖artifact) {fidelity.kl_mean:.4g} "
                            f"nats/token on the calibration text is above the spec's max_kl {max_kl:g} ({listing}; "
                            f"{fidelity.describe()}); nothing was written", where=f"target {target}")
    return (f"approximate lowering accepted by the spec's max_kl {max_kl:g}: measured mean KL(hooks‖artifact) "
            f"{fidelity.kl_mean:.4g} nats/token")
