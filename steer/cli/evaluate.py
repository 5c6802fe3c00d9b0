"""`steer eval`, `steer sweep` and `steer tune`: what an edit does to behaviour and side effects."""

from __future__ import annotations

import json
from pathlib import Path

from steer.cli.generate import HELP_SPEC, add_model_arguments
from steer.errors import SteerError

HELP_SUITE = ("a shipped suite (gender-occupation, gender-explicit, age, capability) or a suite file (.yaml); repeat for several")
HELP_KEEP = ("a constraint the Pareto front is drawn under, repeatable: SUITE>=95%% (of base), SUITE>=0.9, "
             "SUITE<=0.1, kl<=0.05 (nats/token), ppl<=3%% (perplexity change), SUITE:KEY>=95%% (a secondary "
             "number, e.g. gender-explicit:accuracy_female)")
HELP_SPLIT = "which prompts: dev, held_out or all (a suite without split marks uses all of them for every split)"
HELP_BATCH_ROWS = ("rows per forward pass when {what} run together as rows of one batch (prompts × {what}, through "
                   "per-row plans; a 128-token neutral-text row counts as 32): the memory budget (default "
                   "%(default)s; 0: one {one} at a time, as before rows). Same numbers either way, within float "
                   "tolerance")


def register(commands) -> None:
    from steer.evaluate.report import NEUTRAL_TOKENS
    from steer.evaluate.scoring import BATCH_ROWS
    from steer.evaluate.tune import BATCH_TRIALS, DEFAULT_MAX_KL

    e = commands.add_parser(
        "eval", help="base vs steered: suite scores, KL, perplexity and top-1 agreement on neutral text",
        description="Evaluate SPEC (hooks on the base model), or an exported artifact against its base model: each "
                    "suite's score base vs steered, and KL(base‖steered), perplexity change and top-1 agreement on "
                    "neutral text. Prints a table; --json writes every number.")
    e.add_argument("spec", metavar="SPEC", nargs="?", help=HELP_SPEC)
    e.add_argument("--artifact", metavar="DIR", help="evaluate an export (weights, adapter or pack) against the base "
                                                       "model its manifest names, instead of SPEC")
    e.add_argument("--suite", action="append", metavar="NAME_OR_FILE",
                   help=HELP_SUITE + " (default: all shipped suites)")
    e.add_argument("--split", default="all", choices=("all", "dev", "held_out"), help=HELP_SPLIT + " (default all)")
    e.add_argument("--json", metavar="OUT", help="also write the report, per-prompt values included, as JSON to OUT")
    e.add_argument("--batch-rows", type=_rows, default=BATCH_ROWS, metavar="N",
                   help=HELP_BATCH_ROWS.format(what="base and steered", one="model"))
    _model_and_text(e, NEUTRAL_TOKENS)
    e.set_defaults(run=run_eval)

    s = commands.add_parser(
        "sweep", help="evaluate a spec over a grid of parameter values; CSV, JSON and a plot",
        description="Run the suites over a grid of spec parameters and write OUTDIR/sweep.csv, sweep.json and "
                    "sweep.png (the target suite's score vs KL on neutral text, Pareto front marked).")
    s.add_argument("spec", metavar="SPEC", help=HELP_SPEC)
    s.add_argument("--param", action="append", required=True, metavar="PATH=START:STOP:STEP",
                   help="a spec field and its values, e.g. edits[0].factor=0:1:0.25, edits[*].strength=2,4,8, "
                        "edits[0].site=resid_post.8,resid_post.10; repeat for a product grid")
    s.add_argument("--suite", action="append", required=True, metavar="NAME_OR_FILE", help=HELP_SUITE)
    s.add_argument("--target", metavar="NAME", help="the suite plotted against KL (default: the first --suite)")
    s.add_argument("--split", default="dev", choices=("all", "dev", "held_out"), help=HELP_SPLIT + " (default dev)")
    s.add_argument("--keep", action="append", metavar="BOUND", help=HELP_KEEP)
    s.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory (written atomically)")
    s.add_argument("--overwrite", action="store_true", help="replace OUTDIR if it exists")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--batch-rows", type=_rows, default=BATCH_ROWS, metavar="N",
                   help=HELP_BATCH_ROWS.format(what="grid points", one="point"))
    _model_and_text(s, NEUTRAL_TOKENS)
    s.set_defaults(run=run_sweep)

    t = commands.add_parser(
        "tune", help="search strengths and candidate features for the best score at low KL (Optuna TPE)",
        description="Search edit parameters with Optuna's multi-objective TPE sampler to co-minimise the suite's "
                    "target score and KL on neutral text; print the Pareto front and write the chosen spec: the best "
                    "score among trials with KL ≤ --max-kl (else the lowest-KL trial).")
    t.add_argument("spec", metavar="SPEC", help=HELP_SPEC + "; with --candidates, edits[0] is the template")
    t.add_argument("--suite", required=True, metavar="NAME_OR_FILE", help="the target suite")
    t.add_argument("--trials", type=int, required=True, metavar="N", help="number of trials")
    t.add_argument("--candidates", action="append", metavar="IDS",
                   help="candidate features for edits[0], e.g. 12,57,301; with several SAEs one group per site, "
                        "SITE:12,57 (a trial may combine candidates of several sites)")
    t.add_argument("--param", action="append", metavar="PATH=LOW:HIGH",
                   help="a range to search, e.g. edits[0].factor=0:1 (default: scale/project_out amounts in [0, 1], "
                        "add strengths between 0 and twice the spec's)")
    t.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL, metavar="NATS",
                   help="KL bound for the chosen trial (default %(default)s nats/token)")
    t.add_argument("--keep", action="append", metavar="BOUND", help=HELP_KEEP + "; its suites are scored every trial")
    t.add_argument("--seed", type=int, default=0, help="sampler seed (default %(default)s)")
    t.add_argument("--split", default="dev", choices=("all", "dev", "held_out"), help=HELP_SPLIT + " (default dev)")
    t.add_argument("-o", "--output", metavar="FILE", help="write the chosen spec here as YAML (default: print it)")
    t.add_argument("--json", metavar="OUT", help="also write every trial as JSON to OUT")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--batch-trials", type=_trials, default=BATCH_TRIALS, metavar="N",
                   help="trials asked for at once and evaluated as rows of one batch (Optuna ask-and-tell; default "
                        "%(default)s). The first 10 trials, TPE's random start-up, are drawn together and are the "
                        "ones sequential TPE draws; after that each batch of N is sampled from the trials completed "
                        "before it (pending ones counted by Optuna's constant liar), so TPE refits once per batch "
                        "instead of after every trial and later trials differ from sequential TPE's. Deterministic "
                        "for a given --seed and N; 1 is sequential TPE")
    t.add_argument("--batch-rows", type=_rows, default=BATCH_ROWS, metavar="N",
                   help=HELP_BATCH_ROWS.format(what="trials", one="trial"))
    _model_and_text(t, NEUTRAL_TOKENS)
    t.set_defaults(run=run_tune)


def _rows(text: str) -> int:
    return _count(text, 0, "0 (one at a time) or more")


def _trials(text: str) -> int:
    return _count(text, 1, "at least 1")


def _count(text: str, least: int, what: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"expected an integer, {what}; got {text!r}")
    return value


def _model_and_text(p, neutral_tokens: int) -> None:
    add_model_arguments(p)
    p.add_argument("--neutral", default="default", metavar="CORPUS",
                   help="neutral text for KL/perplexity: default (held-out BBC News documents of the embedded corpus), "
                        "calibration (steer's calibration text), or a text/JSONL/parquet file or directory")
    p.add_argument("--neutral-tokens", type=int, default=neutral_tokens, metavar="N",
                   help="tokens of neutral text, in rows of 128 (default %(default)s)")


def _load(args):
    from steer.models import DEFAULT_MODEL, load_model
    from steer.spec import parse_spec

    spec = parse_spec(args.spec, model=args.model, sae=args.sae, site=args.site)
    model, tokenizer = load_model(spec.model or DEFAULT_MODEL)
    return spec, model, tokenizer, spec.model or DEFAULT_MODEL


def run_eval(args) -> int:
    from steer.evaluate.report import evaluate, measure_baseline
    from steer.evaluate.suites import load_suites, shipped_suites
    from steer.export.atomic import write_text_atomic

    suites = load_suites(args.suite or shipped_suites())
    for s in suites:
        s.select(args.split)
    if (args.spec is None) == (args.artifact is None):
        raise SteerError("give a SPEC or --artifact DIR (one of them)", where="steer eval")
    if args.artifact:
        plan, steered_model, model, tokenizer, name, subject = _artifact(args.artifact)
    else:
        from steer.plan import compile as compile_plan

        spec, model, tokenizer, name = _load(args)
        plan, steered_model, subject = compile_plan(spec, model, tokenizer=tokenizer), None, None
    check_suites_fit(model, tokenizer, suites, args.split)
    baseline = measure_baseline(model, tokenizer, neutral=args.neutral, neutral_tokens=args.neutral_tokens)
    report = evaluate(plan, model, tokenizer, suites, steered_model=steered_model, baseline=baseline, split=args.split,
                      subject=subject, model_name=name, batch_rows=args.batch_rows)
    print(report.table())
    if args.json:
        write_text_atomic(args.json, json.dumps(report.as_dict(details=True), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def check_suites_fit(model, tokenizer, suites, split: str) -> None:
    """Every prompt of the suites, with its new tokens, fits the model's context (else one line naming it)."""
    from steer.generate import check_prompt_fits

    for s in suites:
        check_prompt_fits(model, tokenizer, [p.text for p in s.select(split)], s.scoring.max_new_tokens, chat=s.chat,
                          where=f"suite {s.name} ({s.path})")


def _artifact(directory: str):
    """(plan, steered model, base model, tokenizer, base name, subject) for an export directory."""
    from steer.lower.targets import get_target
    from steer.models import load_model
    from steer.verify.artifact import read_manifest

    path = Path(directory)
    manifest = read_manifest(path)
    target = get_target(str(manifest.get("target")), where=f"{directory}: target")
    base = manifest["base_model"]["name"]
    loaded = target.load(path, manifest)  # before the base model: a target evaluate cannot run fails fast
    model, tokenizer = load_model(base)
    return loaded.plan, loaded.model, model, tokenizer, base, f"{target.name} export {directory}"


def run_sweep(args) -> int:
    from steer.evaluate.sweep import parse_param, run_sweep as sweep, write_sweep

    from steer.evaluate.constraints import binding, parse_constraint

    params = [parse_param(p) for p in args.param]
    constraints = [parse_constraint(k) for k in args.keep or []]
    spec, model, tokenizer, _ = _load(args)
    result = sweep(spec, model, tokenizer, params, args.suite, target=args.target, split=args.split,
                   neutral=args.neutral, neutral_tokens=args.neutral_tokens, constraints=constraints,
                   progress=not args.no_progress, batch_rows=args.batch_rows)
    write_sweep(result, args.output, overwrite=args.overwrite)
    front, ok = set(result.front), set(result.feasible)
    names = [s.name for s in result.reports[0].suites] if result.reports else []
    others = [n for n in names if n != result.target]
    print(f"{'':2}{'point':<40} {result.target[:16]:>16} {'KL':>9} {'ppl':>8}" + "".join(f" {n[:16]:>16}" for n in others))
    base = result.reports[0] if result.reports else None
    if base is not None:
        print(f"{'':2}{'(base)':<40} {base.suite(result.target).base.score:>16.4g} {0:>9.4g} {0:>+7.2f}%"
              + "".join(f" {base.suite(n).base.score:>16.4g}" for n in others))
    for i, (values, report) in enumerate(zip(result.points, result.reports)):
        mark = "* " if i in front else ("  " if i in ok else "x ")
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        missed = [str(c) for c in constraints if c.violation(report) > 0]
        print(f"{mark}{label:<40} {report.suite(result.target).steered.score:>16.4g} {report.neutral.kl_mean:>9.4g} "
              f"{report.neutral.ppl_change_pct:>+7.2f}%" + "".join(f" {report.suite(n).steered.score:>16.4g}" for n in others)
              + (f"  misses {', '.join(missed)}" if missed else ""))
    if constraints:
        print(f"x = misses one of {', '.join(str(c) for c in constraints)} (named on its row)"
              + ("" if ok else f"; no point meets them: {binding(constraints, result.reports)}"))
    print(f"* = Pareto front{' under the constraints' if constraints else ''}; wrote {args.output}/sweep.csv, "
          "sweep.json, sweep.png")
    return 0


def run_tune(args) -> int:
    from steer.evaluate.tune import as_dict, describe, parse_candidates, parse_range, tune, write_chosen
    from steer.export.atomic import write_text_atomic
    from steer.spec.yaml_io import dump_spec

    from steer.evaluate.constraints import parse_constraint

    ranges = [parse_range(p) for p in args.param or []]
    candidates = parse_candidates(args.candidates or [])
    constraints = [parse_constraint(k) for k in args.keep or []]
    spec, model, tokenizer, _ = _load(args)
    result = tune(spec, model, tokenizer, args.suite, trials=args.trials, ranges=ranges or None, candidates=candidates,
                  max_kl=args.max_kl, seed=args.seed, split=args.split, neutral=args.neutral,
                  neutral_tokens=args.neutral_tokens, constraints=constraints, progress=not args.no_progress,
                  batch_rows=args.batch_rows, batch_trials=args.batch_trials)
    print(describe(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(as_dict(result), indent=2) + "\n")
    chosen = result.chosen
    if chosen.spec is None:
        print("the chosen trial is the unedited model (no candidate included): no spec written")
        return 1
    if args.output:
        write_chosen(chosen.spec, args.output)
        print(f"wrote {args.output}")
    else:
        print(dump_spec(chosen.spec), end="")
    return 0
