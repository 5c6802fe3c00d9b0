"""Strength sweeps: evaluate a spec over a grid of parameter values; table, JSON and a behaviour-vs-KL plot.

A parameter is a path into the spec, set on a copy with `dataclasses.replace`
(specs are frozen and every replaced Edit is validated again):

    edits[0].factor  edits[1].strength  edits[*].fraction   the op's amount, by its YAML key (or `amount`)
    edits[1:].factor  edits[2:5].amount                      a slice of the edits (Python's: START included, STOP not)
    edits[0].feature  edits[0].site  edits[0].scope  edits[0].units
    edits[0].when.above  edits[0].when.feature
    site  scope                                              the spec's defaults

``edits[*]`` sets the field on every edit, ``edits[START:STOP]`` on that slice
(either end may be left out; e.g. ``edits[1:]`` every edit after a first one of
another op, whose amount has another name). Values: ``START:STOP:STEP`` (STOP
included when the steps land on it) or a comma list (``0.2,0.5,1`` or
``resid_post.8,resid_post.10``). The grid is the product of all parameters.

Each grid point is compiled (`steer.compile`, SAEs from the spec or ``sae``)
and evaluated against one `Baseline`, so the base model is measured once. The
points run together as rows of shared forward passes — prompts × points,
neutral rows × points, through per-row plans, at most ``batch_rows`` rows a
pass (`steer.evaluate.report.evaluate_many`), `POINTS_PER_ROW_BATCH` points
at a time (a point's plan may hold a whole topk encoder) — with the numbers
each point gets alone, within float tolerance; the calibration text that
``feature``/``norm`` units read is run once for all points, not once per
point's compile. ``batch_rows=0`` evaluates the points one after another, as
before rows.
`write_sweep` writes ``sweep.csv`` (one row per grid point), ``sweep.json``
(the same plus the base numbers and the Pareto front) and ``sweep.png`` — the
target suite's score against KL(base‖steered) on neutral text, each point
labelled by its values, the Pareto front (no other point has both a lower KL
and a better score) marked — into a directory written atomically. With
``constraints`` (``--keep gender-explicit>=95%``, ``--keep kl<=0.05``), the
front is drawn among the points that meet them all (`steer.evaluate.constraints`).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from steer.errors import SpecError, SteerError
from steer.evaluate.constraints import Constraint, feasible, resolve
from steer.evaluate.report import NEUTRAL_TOKENS, Baseline, Report, evaluate_many, measure_baseline
from steer.evaluate.scoring import BATCH_ROWS
from steer.evaluate.suites import load_suites
from steer.ops import OPERATIONS
from steer.spec.edit import Condition, Spec

MAX_POINTS = 10_000
POINTS_PER_ROW_BATCH = 32
"""Grid points compiled and evaluated together (the rows of their passes are chunked to ``batch_rows``)."""
EDIT_FIELDS: tuple[str, ...] = ("amount", "feature", "site", "scope", "units", "when.above", "when.feature")
SPEC_FIELDS: tuple[str, ...] = ("site", "scope")
INT_FIELDS: tuple[str, ...] = ("feature", "when.feature")
STR_FIELDS: tuple[str, ...] = ("site", "scope", "units")
_PATH = re.compile(r"edits\[(?P<index>\*|[0-9]+|[0-9]*:[0-9]*)\]\.(?P<field>[a-z_]+(?:\.[a-z_]+)?)|(?P<top>[a-z_]+)")


# -- parameters ----------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    path: str
    """Where in the spec: ``edits[0].factor``, ``edits[*].strength``, ``site``."""
    values: tuple
    """The grid's values for it."""


def parse_param(text: str) -> Param:
    """``PATH=START:STOP:STEP`` or ``PATH=V1,V2,...``."""
    where = f"--param {text}"
    path, eq, value = text.partition("=")
    path, value = path.strip(), value.strip()
    if not eq or not path or not value:
        raise SpecError("write PATH=START:STOP:STEP or PATH=V1,V2,... (e.g. edits[0].factor=0:1:0.25)", where=where)
    parts = value.split(":")
    if len(parts) == 3 and all(parse_number(p) is not None for p in parts):
        values = _range(*(parse_number(p) for p in parts), where=where)
    elif ":" in value:
        raise SpecError("a range is START:STOP:STEP, three numbers", where=where)
    else:
        values = tuple(_scalar(v.strip()) for v in value.split(","))
        if any(v == "" for v in values):
            raise SpecError("empty value in the list", where=where)
    return Param(path, values)


def parse_number(text: str) -> float | int | None:
    """An int, a finite float, or None."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _scalar(text: str):
    number = parse_number(text)
    return text if number is None else number


def _range(start, stop, step, *, where: str) -> tuple:
    if step == 0 or (stop - start) * step < 0:
        raise SpecError(f"step {step} does not go from {start} to {stop}", where=where)
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_POINTS:
        raise SpecError(f"{count} values; at most {MAX_POINTS}", where=where)
    if all(isinstance(v, int) for v in (start, stop, step)):
        return tuple(start + i * step for i in range(count))
    return tuple(round(start + i * step, 10) for i in range(count))


def set_param(spec: Spec, path: str, value) -> Spec:
    """A copy of ``spec`` with ``path`` set to ``value`` (validated like any spec)."""
    where = f"--param {path}={value}"
    match = _PATH.fullmatch(path)
    if match is None:
        raise SpecError(f"unknown parameter path; use edits[I].FIELD, edits[*].FIELD, edits[START:STOP].FIELD or one of {', '.join(SPEC_FIELDS)}",
                        where=where)
    if match["top"]:
        if match["top"] not in SPEC_FIELDS:
            raise SpecError(f"unknown spec field {match['top']!r}; a sweep can set {', '.join(SPEC_FIELDS)} "
                            "or edits[I].FIELD", where=where)
        return _replaced(where, lambda: dataclasses.replace(spec, **{match["top"]: _typed(match["top"], value, where)}))
    edits = list(spec.edits)
    for index in _indices(match["index"], len(edits), where):
        edits[index] = _set_edit_field(edits[index], index, match["field"], value, where)
    return dataclasses.replace(spec, edits=tuple(edits))


def _indices(index: str, count: int, where: str) -> range | list[int]:
    """The edits ``edits[INDEX]`` names (``*``, ``I`` or ``START:STOP``) in a spec of ``count`` edits."""
    if index == "*":
        return range(count)
    if ":" in index:
        start, _, stop = index.partition(":")
        indices = range(count)[slice(int(start) if start else None, int(stop) if stop else None)]
        if not indices:
            raise SpecError(f"edits[{index}] selects no edit; the spec has {count} (edits[0]..edits[{count - 1}])",
                            where=where)
        return indices
    if int(index) >= count:
        raise SpecError(f"the spec has {count} edit(s) (edits[0]..edits[{count - 1}])", where=where)
    return [int(index)]


def check_disjoint(spec: Spec, params: list[Param]) -> None:
    """Refuse two parameters that set the same field of the same edit (``edits[*].factor`` and
    ``edits[1:].factor``): one would silently overwrite the other at every grid point. An amount's own key
    (``factor``, ``strength``...) and ``amount`` are the same field."""
    amount_keys = {op.amount_key for op in OPERATIONS.values()} | {"amount"}
    owner: dict[tuple[int, str], str] = {}
    for param in params:
        match = _PATH.fullmatch(param.path)
        if match is None or match["top"]:
            continue  # set_param names a bad path; spec-level fields are checked by grid's duplicate test
        field = "amount" if match["field"] in amount_keys else match["field"]
        for index in _indices(match["index"], len(spec.edits), f"--param {param.path}"):
            if (index, field) in owner:
                raise SpecError(f"--param {owner[index, field]} and --param {param.path} both set edits[{index}]."
                                f"{match['field']}; give each edit's field in one parameter (e.g. edits[0].FIELD "
                                "and edits[1:].FIELD)", where="--param")
            owner[index, field] = param.path


def _set_edit_field(edit, index: int, name: str, value, where: str):
    amount_key = OPERATIONS[edit.op].amount_key
    if name in {op.amount_key for op in OPERATIONS.values()} or name == "amount":
        if name not in (amount_key, "amount"):
            raise SpecError(f"edits[{index}] is {edit.op}; its amount is `{amount_key}`, not `{name}`", where=where)
        name = "amount"
    if name not in EDIT_FIELDS:
        raise SpecError(f"unknown edit field {name!r}; allowed: {amount_key}, "
                        f"{', '.join(f for f in EDIT_FIELDS if f != 'amount')}", where=where)
    value = _typed(name, value, where)
    if name.startswith("when."):
        if not isinstance(edit.when, Condition):
            raise SpecError(f"edits[{index}] has no `when: {{feature, above}}` condition to set", where=where)
        key = name.partition(".")[2]
        when = dataclasses.replace(edit.when, **{key: value}) if key == "above" else Condition(value, edit.when.above)
        return _replaced(where, lambda: dataclasses.replace(edit, when=when))
    if name == "feature" and edit.feature is None:
        raise SpecError(f"edits[{index}] targets a direction, not a feature", where=where)
    return _replaced(where, lambda: dataclasses.replace(edit, **{name: value}))


def _typed(name: str, value, where: str):
    if name in INT_FIELDS:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{name} takes integers, got {value!r}", where=where)
    elif name in STR_FIELDS:
        if not isinstance(value, str):
            value = str(value)
    elif isinstance(value, str):
        raise SpecError(f"{name} takes numbers, got {value!r}", where=where)
    return value


def _replaced(where: str, build):
    try:
        return build()
    except SteerError as exc:
        raise SpecError(exc.message, where=where) from None


def grid(params: list[Param]) -> list[dict]:
    """Every combination of the parameters' values, in order (the last parameter varies fastest)."""
    paths = [p.path for p in params]
    if len(set(paths)) != len(paths):
        raise SpecError("a parameter is given twice", where="--param")
    points = [dict(zip(paths, combo)) for combo in itertools.product(*(p.values for p in params))]
    if len(points) > MAX_POINTS:
        raise SpecError(f"the grid has {len(points)} points; at most {MAX_POINTS}", where="--param")
    return points


def apply_values(spec: Spec, values: dict) -> Spec:
    for path, value in values.items():
        spec = set_param(spec, path, value)
    return spec


# -- Pareto front --------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]], better: str = "lower") -> list[int]:
    """Indices of the (KL, score) points no other point dominates (KL lower or equal, score at least as good,
    one strictly), by increasing KL; of identical points only the first."""
    sign = 1.0 if better == "lower" else -1.0
    keyed = [(kl, sign * score) for kl, score in points]
    front = []
    for i, (kl, s) in enumerate(keyed):
        if any(k2 <= kl and s2 <= s and (k2 < kl or s2 < s) for j, (k2, s2) in enumerate(keyed) if j != i):
            continue
        if (kl, s) in keyed[:i]:  # the same point again (e.g. two trials without an edit): listed once
            continue
        front.append(i)
    return sorted(front, key=lambda i: (keyed[i][0], keyed[i][1]))


# -- running -------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    spec: Spec
    params: tuple[Param, ...]
    target: str
    split: str
    points: tuple[dict, ...]
    reports: tuple[Report, ...]
    baseline: Baseline
    constraints: tuple[Constraint, ...] = ()
    """``--keep`` bounds (`steer.evaluate.constraints`): the front is drawn among the points meeting all of them."""

    @property
    def feasible(self) -> list[int]:
        """Indices of the points that meet every constraint."""
        return [i for i, r in enumerate(self.reports) if feasible(self.constraints, r)]

    @property
    def front(self) -> list[int]:
        """The Pareto front (target score vs KL) of the feasible points."""
        better = self.reports[0].suite(self.target).base.better if self.reports else "lower"
        ok = self.feasible
        points = [(self.reports[i].neutral.kl_mean, self.reports[i].suite(self.target).steered.score) for i in ok]
        return [ok[j] for j in pareto_front(points, better)]


def run_sweep(spec: Spec, model, tokenizer, params: list[Param], suites, *, target: str | None = None, split: str = "dev",
              sae=None, neutral="default", neutral_tokens: int = NEUTRAL_TOKENS, baseline: Baseline | None = None,
              constraints=(), progress: bool = True, batch_rows: int = BATCH_ROWS) -> Sweep:
    """Evaluate ``spec`` at every grid point of ``params`` on ``suites`` (the first is the target unless named);
    ``constraints`` (`Constraint` s) decide which points the Pareto front is drawn from. ``batch_rows``: rows per
    forward pass, the points run together as rows (0: one point after another)."""
    from tqdm.auto import tqdm

    from steer.plan import compile as compile_plan

    if importlib.util.find_spec("matplotlib") is None:  # fail before the grid runs, not when plotting
        raise SteerError("the sweep plot needs matplotlib: pip install matplotlib (or steer[evaluate])", where="steer sweep")
    if batch_rows < 0:
        raise SteerError(f"--batch-rows must be ≥ 0 (0: one point at a time), got {batch_rows}", where="--batch-rows")
    suites = load_suites(suites)
    if not suites:
        raise SteerError("a sweep needs at least one suite (the target behaviour)", where="--suite")
    names = [s.name for s in suites]
    target = target or names[0]
    if target not in names:
        raise SteerError(f"the target {target!r} is not one of the suites ({', '.join(names)})", where="--target")
    constraints = resolve(constraints, suites, "--keep")
    points = grid(params)
    check_disjoint(spec, params)
    specs = [apply_values(spec, p) for p in points]  # every bad value fails here, before any model work
    for s in suites:
        s.select(split)
    if baseline is None:  # with rows, the base's suite scores ride along as rows of the first points' passes
        baseline = measure_baseline(model, tokenizer, () if batch_rows else suites, neutral=neutral,
                                    neutral_tokens=neutral_tokens, split=split)
    reports: list[Report] = []
    group = POINTS_PER_ROW_BATCH if batch_rows else 1
    calibration = {} if batch_rows else None  # with rows, `feature`/`norm` units calibrate once for every point
    parts = len(suites) + 1  # evaluate_many's progress: one part per suite, one for the neutral text
    with tqdm(total=len(points), desc="sweep", unit="point", disable=not progress,
              bar_format="{l_bar}{bar}| {n:.3g}/{total} [{elapsed}<{remaining}]") as bar:
        for start in range(0, len(points), group):
            chunk = list(zip(points[start:start + group], specs[start:start + group]))
            plans = []
            for values, point_spec in chunk:
                try:
                    plans.append(compile_plan(point_spec, model, sae, tokenizer=tokenizer,
                                              calibration_cache=calibration))
                except SteerError as exc:
                    raise type(exc)(exc.message, where=f"{_label(values)}: {exc.where}" if exc.where
                                    else _label(values)) from None
            share = len(chunk) / parts
            reports += evaluate_many(plans, model, tokenizer, suites, baseline=baseline, split=split,
                                     subjects=[_label(values) for values, _ in chunk], batch_rows=batch_rows,
                                     progress=lambda n, share=share: bar.update(n * share))
    return Sweep(spec=spec, params=tuple(params), target=target, split=split, points=tuple(points),
                 reports=tuple(reports), baseline=baseline, constraints=tuple(constraints))


def _label(values: dict) -> str:
    return ", ".join(f"{path}={value}" for path, value in values.items())


# -- output --------------------------------------------------------------------


def sweep_rows(sweep: Sweep) -> list[dict]:
    """One flat row per grid point: the parameter values, side effects, each suite's score and extras."""
    front = set(sweep.front)
    rows = []
    for i, (values, report) in enumerate(zip(sweep.points, sweep.reports)):
        n = report.neutral
        row = dict(values)
        row.update(kl_mean=n.kl_mean, kl_max=n.kl_max, top1=n.top1, ppl_change_pct=n.ppl_change_pct)
        for s in report.suites:
            row[s.name] = s.steered.score
            row[f"{s.name}.change_pct"] = s.change_pct
            for key, value in s.steered.extras.items():
                row[f"{s.name}.{key}"] = value
        row["feasible"] = int(feasible(sweep.constraints, report))
        row["pareto"] = int(i in front)
        rows.append(row)
    return rows


def write_sweep(sweep: Sweep, out, *, overwrite: bool = False) -> Path:
    from steer.export.atomic import atomic_directory
    from steer.spec.yaml_io import dump_spec

    rows = sweep_rows(sweep)
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite, what="sweep output") as tmp:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
        (tmp / "sweep.csv").write_text(buffer.getvalue())
        base = {name[0]: result.as_dict() for name, result in sweep.baseline.suites.items() if name[1] == sweep.split}
        document = {
            "spec": dump_spec(sweep.spec), "params": [{"path": p.path, "values": list(p.values)} for p in sweep.params],
            "target": sweep.target, "split": sweep.split, "constraints": [str(c) for c in sweep.constraints],
            "neutral": {"source": sweep.baseline.neutral.source, "predictions": sweep.baseline.neutral.predictions},
            "base": base, "rows": rows, "pareto": sweep.front,
            "reports": [r.as_dict() for r in sweep.reports],
        }
        (tmp / "sweep.json").write_text(json.dumps(document, indent=2, allow_nan=False, default=_json_default) + "\n")
        plot_sweep(sweep, tmp / "sweep.png")
    return out


def _json_default(value):
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plot_sweep(sweep: Sweep, path: Path) -> None:
    """Target score vs KL, points labelled by their values, the Pareto front joined in red, the base as a star."""
    try:
        import matplotlib
    except ImportError:
        raise SteerError("the sweep plot needs matplotlib: pip install matplotlib (or steer[evaluate])",
                         where="sweep.png") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = [r.neutral.kl_mean for r in sweep.reports]
    score = [r.suite(sweep.target).steered.score for r in sweep.reports]
    base = sweep.reports[0].suite(sweep.target).base if sweep.reports else None
    front = sweep.front
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    ax.scatter(kl, score, color="0.45", s=22, zorder=2, label="grid points")
    ax.plot([kl[i] for i in front], [score[i] for i in front], color="tab:red", marker="o", ms=6, lw=1.5, zorder=3,
            label="Pareto front")
    if base is not None:
        ax.scatter([0.0], [base.score], marker="*", s=160, color="tab:blue", zorder=4, label="base (unedited)")
    for x, y, values in zip(kl, score, sweep.points):
        ax.annotate(", ".join(f"{_short(p)}={v:g}" if isinstance(v, (int, float)) else f"{_short(p)}={v}"
                              for p, v in values.items()),
                    (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="0.25")
    better = base.better if base is not None else "lower"
    ax.set_xlabel(f"KL(base ‖ steered) on neutral text, nats/token ({sweep.baseline.neutral.predictions} predictions)")
    ax.set_ylabel(f"{sweep.target}: {base.meaning if base else 'score'} ({better} is better)")
    ax.set_title(f"{sweep.target} ({sweep.split} split) vs side effect")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _short(path: str) -> str:
    return path.rpartition(".")[2] if path.startswith("edits[") else path
