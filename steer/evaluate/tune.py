"""Search an edit's parameters to co-minimise a suite's target score and the KL on neutral text (Optuna TPE).

What is searched, per trial (Optuna's multi-objective TPE sampler, seeded):

- **ranges** ``PATH=LOW:HIGH`` (`steer.evaluate.sweep` paths: ``edits[0].factor``,
  ``edits[*].strength``, ...), floats, or integers for ``feature`` fields.
  Without ``--param``: the amount of every ``scale`` and ``project_out`` edit
  in [0, 1] and of every ``add`` edit between 0 and twice its strength;
- **candidate features** ``12,57,301``: ``edits[0]`` is the template — a
  trial applies it (same op, amount, modifiers) to each included candidate;
  the spec's other edits stay. Groups ``SITE:12,57`` (one per SAE given)
  search across depths: a trial includes any subset of every group's
  candidates, so the chosen edit may combine features of several sites. A
  trial that includes no candidate is the unedited model.

The two objectives are the target suite's score on ``split`` (default
``dev``, so the held-out half stays for the report; minimised when lower is
better, else maximised) and the mean KL(base‖steered) on neutral text. The
**chosen** trial is the one with the best score among those with KL ≤
``max_kl`` that meet every ``constraints`` bound (``--keep
gender-explicit>=95%``: the constrained suites are scored every trial and fed
to the sampler as Optuna constraints), ties to the lower KL; if none meets
them, the one missing the fewest, lowest KL, flagged, naming the binding
constraint. The printed front is drawn among the trials meeting ``--keep``. `write_chosen` writes it as canonical YAML, with relative
SAE and direction paths rewritten to stay valid from the output file's folder.

**Batches of trials** (``batch_trials`` N > 1, Optuna's ask-and-tell): the
first `STARTUP_TRIALS` trials — TPE's random start-up, which does not look at
results — are asked for together and are exactly the trials sequential TPE
draws; after that N trials are asked for at once, each sampled from the trials
completed before the batch (Optuna's constant liar stands in for the pending
ones), then all N are evaluated as rows of shared forward passes
(`steer.evaluate.report.evaluate_many`) and told. Unlike sequential TPE (N =
1, `study.optimize`), which refits its model after every trial, the model is
refitted once per batch, so for the same seed the trials after the start-up
differ; for a given seed and N the trials are the same on every run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from steer.errors import SpecError, SteerError
from steer.evaluate.constraints import SIDE_EFFECTS, Constraint, binding, constraint_suites, resolve
from steer.evaluate.report import NEUTRAL_TOKENS, Report, evaluate, evaluate_many, measure_baseline
from steer.evaluate.scoring import BATCH_ROWS
from steer.evaluate.suites import load_suite, load_suites
from steer.evaluate.sweep import parse_number, pareto_front, set_param
from steer.export.atomic import write_text_atomic
from steer.ops import OPERATIONS
from steer.spec.edit import Spec

DEFAULT_MAX_KL = 0.05
BATCH_TRIALS = 4
"""Trials asked for at once after the start-up (``--batch-trials``; 1: sequential TPE)."""
STARTUP_TRIALS = 10
"""TPE's random start-up trials (Optuna's ``n_startup_trials`` default): the first batch when trials are batched."""


@dataclass(frozen=True)
class Range:
    path: str
    low: float
    high: float
    integer: bool = False


def parse_range(text: str) -> Range:
    """``PATH=LOW:HIGH``."""
    where = f"--param {text}"
    path, eq, value = text.partition("=")
    parts = value.split(":")
    numbers = [parse_number(p.strip()) for p in parts]
    if not eq or not path.strip() or len(parts) != 2 or None in numbers:
        raise SpecError("write PATH=LOW:HIGH (e.g. edits[0].factor=0:1)", where=where)
    low, high = numbers
    if not low < high:
        raise SpecError(f"LOW must be below HIGH, got {low} and {high}", where=where)
    path = path.strip()
    integer = path.endswith("feature")
    if integer and not all(isinstance(n, int) for n in numbers):
        raise SpecError("a feature range takes integers", where=where)
    return Range(path, float(low), float(high), integer)


def parse_candidates(texts: list[str]) -> dict[str | None, tuple[int, ...]]:
    """``["12,57"]`` → {None: (12, 57)}; ``["resid_post.10:12,57", "resid_post.15:3"]`` → per site."""
    groups: dict[str | None, tuple[int, ...]] = {}
    for text in texts:
        site, colon, ids = text.rpartition(":") if ":" in text else (None, "", text)
        try:
            features = tuple(int(i) for i in ids.split(","))
        except ValueError:
            raise SpecError("candidates are feature ids: 12,57,301 (or SITE:12,57 per SAE)", where=f"--candidates {text}") from None
        if any(f < 0 for f in features) or len(set(features)) != len(features):
            raise SpecError("feature ids are distinct integers ≥ 0", where=f"--candidates {text}")
        key = site or None
        if key in groups:
            raise SpecError("the same site is given twice", where=f"--candidates {text}")
        groups[key] = features
    if None in groups and len(groups) > 1:
        raise SpecError("with several groups, name each one's site: SITE:12,57", where="--candidates")
    return groups


def default_ranges(spec: Spec) -> list[Range]:
    ranges = []
    for i, edit in enumerate(spec.edits):
        rule = OPERATIONS[edit.op].tune_range  # each op says what `steer tune` searches by default
        bounds = rule(edit.amount) if rule is not None else None
        if bounds is not None:
            ranges.append(Range(f"edits[{i}].amount", *bounds))
    return ranges


@dataclass(frozen=True)
class Trial:
    number: int
    params: dict
    spec: Spec | None
    """None: no candidate included (the unedited model)."""
    score: float
    kl: float
    ppl_change_pct: float
    report: Report | None
    violations: tuple[float, ...] = ()
    """Per constraint of the tuning, by how much this trial misses it (0: holds)."""
    kept: dict | None = None
    """What each suite bound reads, steered, by `Constraint.label` (a suite's score, or ``SUITE:KEY``)."""

    @property
    def feasible(self) -> bool:
        return not any(self.violations)


@dataclass(frozen=True)
class Tuning:
    suite: str
    better: str
    split: str
    max_kl: float
    base_score: float
    trials: tuple[Trial, ...]
    constraints: tuple[Constraint, ...] = ()
    """``--keep`` bounds besides ``max_kl``; a trial is feasible when it meets them and KL ≤ max_kl."""
    base_kept: dict | None = None
    """The same for the base model."""

    def meets(self, t: Trial) -> bool:
        return t.kl <= self.max_kl and t.feasible

    @property
    def front(self) -> list[Trial]:
        """The Pareto front (score vs KL) of the trials that meet the ``--keep`` constraints."""
        ok = [t for t in self.trials if t.feasible]
        return [ok[i] for i in pareto_front([(t.kl, t.score) for t in ok], self.better)]

    @property
    def chosen(self) -> Trial:
        """The best score among trials meeting every bound; if none does, the one missing them least (lowest KL)."""
        within = [t for t in self.trials if self.meets(t)]
        sign = 1.0 if self.better == "lower" else -1.0
        if within:
            return min(within, key=lambda t: (sign * t.score, t.kl, t.number))
        return min(self.trials, key=lambda t: (sum(1 for v in t.violations if v), t.kl, sign * t.score, t.number))

    @property
    def chosen_meets_bound(self) -> bool:
        return self.meets(self.chosen)


def tune(spec: Spec, model, tokenizer, suite, *, trials: int, ranges: list[Range] | None = None,
         candidates: dict[str | None, tuple[int, ...]] | None = None, max_kl: float = DEFAULT_MAX_KL, seed: int = 0,
         split: str = "dev", sae=None, neutral="default", neutral_tokens: int = NEUTRAL_TOKENS,
         constraints=(), progress: bool = True, batch_rows: int = BATCH_ROWS,
         batch_trials: int = BATCH_TRIALS) -> Tuning:
    """``trials`` Optuna trials over ``ranges`` / ``candidates``; ``constraints`` (`Constraint` s, e.g. keep a
    preservation suite ≥ 95% of base) are evaluated every trial, steer the sampler (Optuna's constraints_func)
    and decide the front and the choice. ``batch_trials`` > 1 asks for that many trials at once and evaluates
    them as rows of shared passes (module docstring); ``batch_rows``: rows per forward pass (0: one trial's
    model at a time)."""
    try:
        import optuna
    except ImportError:
        raise SteerError("tuning needs Optuna: pip install optuna (or steer[evaluate])", where="steer tune") from None
    from tqdm.auto import tqdm

    from steer.plan import compile as compile_plan

    if trials < 1:
        raise SteerError(f"--trials must be ≥ 1, got {trials}", where="--trials")
    if batch_trials < 1:
        raise SteerError(f"--batch-trials must be ≥ 1, got {batch_trials}", where="--batch-trials")
    if batch_rows < 0:
        raise SteerError(f"--batch-rows must be ≥ 0 (0: one trial at a time), got {batch_rows}", where="--batch-rows")
    if not max_kl > 0:
        raise SteerError(f"--max-kl must be > 0, got {max_kl}", where="--max-kl")
    suite = load_suite(suite)
    suite.select(split)
    candidates = candidates or {}
    ranges = list(ranges) if ranges else default_ranges(spec)
    if candidates and (spec.edits[0].feature is None):
        raise SpecError("with --candidates, edits[0] is the template and must target a feature", where="edits[0]")
    if not ranges and not candidates:
        raise SpecError("nothing to tune: give --param PATH=LOW:HIGH or --candidates", where="--param")
    for r in ranges:  # a bad path fails now, not in trial 17
        set_param(spec, r.path, int(r.low) if r.integer else r.low)

    kept = load_suites(constraint_suites(constraints))
    constraints = resolve(constraints, kept, "--keep")
    if suite.name in {k.name for k in kept}:
        raise SteerError(f"the target suite {suite.name!r} cannot also be a --keep constraint", where="--keep")
    for k in kept:
        k.select(split)
    suites = [suite, *kept]
    baseline = measure_baseline(model, tokenizer, suites, neutral=neutral, neutral_tokens=neutral_tokens, split=split)
    base = baseline.suite(model, tokenizer, suite, split)
    bounded = [c for c in constraints if c.name not in SIDE_EFFECTS]  # shown per trial: what each bound reads
    base_results = {k.name: baseline.suite(model, tokenizer, k, split) for k in kept}
    base_kept = {c.label: c.number(base_results[c.name]) for c in bounded}
    better = suite.scoring.better
    done: list[Trial] = []
    bar = tqdm(total=trials, desc="tune", unit="trial", disable=not progress)

    def sample(trial) -> Spec | None:
        trial_spec = spec
        for r in ranges:
            value = (trial.suggest_int(r.path, int(r.low), int(r.high)) if r.integer
                     else trial.suggest_float(r.path, r.low, r.high))
            trial_spec = set_param(trial_spec, r.path, value)
        if candidates:
            trial_spec = _with_candidates(trial, trial_spec, candidates)
        return trial_spec

    calibration = {} if batch_rows else None  # `feature`/`norm` units calibrate once for every trial

    def compiled(trial, trial_spec: Spec):
        try:
            return compile_plan(trial_spec, model, sae, tokenizer=tokenizer, calibration_cache=calibration)
        except SteerError as exc:
            raise type(exc)(exc.message, where=f"trial {trial.number} {dict(trial.params)}: {exc.where}") from None

    def finish(trial, trial_spec: Spec | None, report: Report | None) -> Trial:
        if trial_spec is None:  # the unedited model meets every relative bound at 100%
            result = Trial(trial.number, dict(trial.params), None, base.score, 0.0, 0.0, None,
                           tuple(0.0 for _ in constraints), dict(base_kept))
        else:
            result = Trial(trial.number, dict(trial.params), trial_spec, report.suites[0].steered.score,
                           report.neutral.kl_mean, report.neutral.ppl_change_pct, report,
                           tuple(c.violation(report) for c in constraints),
                           {c.label: c.number(report.suite(c.name).steered) for c in bounded})
        bounds = {str(c): v for c, v in zip(constraints, result.violations)}
        bounds[f"kl<={max_kl:g}"] = result.kl - max_kl  # ≤ 0: met (Optuna's convention)
        if hasattr(trial, "set_constraint"):  # Optuna ≥ 5
            for key, value in bounds.items():
                trial.set_constraint(key, value)
        else:
            trial.set_user_attr("constraints", list(bounds.values()))
        done.append(result)
        bar.update(1)
        return result

    def objective(trial) -> tuple[float, float]:
        trial_spec = sample(trial)
        report = None
        if trial_spec is not None:
            report = evaluate(compiled(trial, trial_spec), model, tokenizer, suites, baseline=baseline, split=split,
                              batch_rows=batch_rows)
        result = finish(trial, trial_spec, report)
        return result.score, result.kl

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    options = {"seed": seed, "n_startup_trials": STARTUP_TRIALS}  # Optuna's default start-up, named: batches align to it
    if batch_trials > 1:
        options["constant_liar"] = True  # pending trials of a batch count as bad guesses, so a batch spreads out
    if hasattr(optuna.trial.Trial, "set_constraint"):
        sampler = optuna.samplers.TPESampler(**options)
    else:
        sampler = optuna.samplers.TPESampler(**options, constraints_func=lambda t: t.user_attrs["constraints"])
    study = optuna.create_study(directions=["minimize" if better == "lower" else "maximize", "minimize"], sampler=sampler)
    try:
        if batch_trials == 1:
            study.optimize(objective, n_trials=trials, catch=())
        else:
            while len(done) < trials:
                # the first batch is TPE's random start-up (drawn as sequential TPE draws it); then batch_trials at once
                size = STARTUP_TRIALS if not done else batch_trials
                asked = [study.ask() for _ in range(min(size, trials - len(done)))]
                specs = [sample(trial) for trial in asked]
                edited = [i for i, trial_spec in enumerate(specs) if trial_spec is not None]
                plans = [compiled(asked[i], specs[i]) for i in edited]
                reports = dict(zip(edited, evaluate_many(plans, model, tokenizer, suites, baseline=baseline,
                                                         split=split, batch_rows=batch_rows)))
                for i, trial in enumerate(asked):
                    result = finish(trial, specs[i], reports.get(i))
                    study.tell(trial, (result.score, result.kl))
    finally:
        bar.close()
    return Tuning(suite=suite.name, better=better, split=split, max_kl=max_kl, base_score=base.score, trials=tuple(done),
                  constraints=constraints, base_kept=base_kept)


def _with_candidates(trial, spec: Spec, candidates: dict[str | None, tuple[int, ...]]) -> Spec | None:
    """The spec with ``edits[0]`` applied to every candidate the trial includes — candidates of every site group
    together, so one edit can combine features at several depths (each edit keeps its site)."""
    edits = []
    for site in sorted(candidates, key=str):
        template = spec.edits[0] if site is None else dataclasses.replace(spec.edits[0], site=site)
        for f in candidates[site]:
            if trial.suggest_categorical(f"use {site + ':' if site else ''}{f}", [False, True]):
                edits.append(dataclasses.replace(template, feature=f))
    edits += list(spec.edits[1:])
    return dataclasses.replace(spec, edits=tuple(edits)) if edits else None


# -- output --------------------------------------------------------------------


def describe(tuning: Tuning) -> str:
    from steer.spec.dsl import format_edit

    kept = list(tuning.base_kept or {})
    under = f" under {', '.join(str(c) for c in tuning.constraints)}" if tuning.constraints else ""
    lines = [f"{len(tuning.trials)} trials on {tuning.suite} ({tuning.split} split); base score {tuning.base_score:.4g} "
             f"({tuning.better} is better)"]
    lines += [f"  kept: {name} base {score:.4g}" for name, score in (tuning.base_kept or {}).items()]
    lines += ["", f"Pareto front (score vs KL on neutral text){under}:",
              f"  {'trial':>5} {'score':>9} {'KL':>9} {'ppl':>8} " + "".join(f"{n[:16]:>17}" for n in kept) + "  edits"]
    for t in tuning.front:
        edits = "; ".join(format_edit(e) for e in t.spec.edits) if t.spec else "(no edit)"
        scores = "".join(f"{(t.kept or {}).get(n, float('nan')):>17.4g}" for n in kept)
        lines.append(f"  {t.number:>5} {t.score:>9.4g} {t.kl:>9.4g} {t.ppl_change_pct:>+7.2f}% {scores}  {edits}")
    if not tuning.front:
        lines.append("  (no trial meets the constraints)")
    c = tuning.chosen
    bounds = ", ".join([f"KL ≤ {tuning.max_kl:g}"] + [str(k) for k in tuning.constraints])
    if tuning.chosen_meets_bound:
        rule = f"best score with {bounds}"
    else:
        reports = [t.report for t in tuning.trials if t.report is not None]
        binds = binding(tuning.constraints, reports) if any(not t.feasible for t in tuning.trials) else ""
        rule = f"no trial met {bounds}: the one missing fewest bounds, lowest KL" + (f"; {binds}" if binds else "")
    lines += ["", f"chosen: trial {c.number} ({rule}): score {c.score:.4g}, KL {c.kl:.4g}, ppl {c.ppl_change_pct:+.2f}%"
              + "".join(f", {n} {(c.kept or {}).get(n, float('nan')):.4g}" for n in kept)]
    return "\n".join(lines)


def as_dict(tuning: Tuning) -> dict:
    from steer.spec.yaml_io import dump_spec

    front = {t.number for t in tuning.front}
    return {
        "suite": tuning.suite, "better": tuning.better, "split": tuning.split, "max_kl": tuning.max_kl,
        "constraints": [str(c) for c in tuning.constraints], "base_kept": tuning.base_kept,
        "base_score": tuning.base_score, "chosen": tuning.chosen.number,
        "trials": [{"number": t.number, "params": t.params, "score": t.score, "kl": t.kl,
                    "ppl_change_pct": t.ppl_change_pct, "pareto": t.number in front, "kept": t.kept,
                    "feasible": t.feasible and t.kl <= tuning.max_kl,
                    "spec": dump_spec(t.spec) if t.spec else None} for t in tuning.trials],
    }


def write_chosen(spec: Spec, path) -> Path:
    """Write ``spec`` as YAML at ``path`` (atomically), relative paths kept valid from its folder."""
    from steer.spec.yaml_io import dump_spec

    path = Path(path)
    write_text_atomic(path, dump_spec(relocate(spec, path.parent)))
    return path


def relocate(spec: Spec, directory) -> Spec:
    """``spec`` with relative SAE paths and direction files that exist (from the spec's folder or the working
    directory) rewritten relative to ``directory``; names that are not local paths stay as they are."""
    directory = Path(directory).resolve()

    def moved(entry: str) -> str:
        if Path(entry).is_absolute():
            return entry
        for base in (Path(spec.base_dir) if spec.base_dir else None, Path.cwd()):
            if base is not None and (base / entry).exists():
                return os.path.relpath((base / entry).resolve(), directory)
        return entry

    edits = []
    for edit in spec.edits:
        if edit.direction is not None:
            file, _, key = edit.direction.rpartition(":")
            edit = dataclasses.replace(edit, direction=f"{moved(file)}:{key}")
        edits.append(edit)
    return dataclasses.replace(spec, sae=tuple(moved(s) for s in spec.sae), edits=tuple(edits), base_dir=str(directory))
