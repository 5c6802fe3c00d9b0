"""`steer compile`, `steer export` and `steer verify`: artifacts for unmodified inference stacks."""

from __future__ import annotations

from steer.cli.generate import HELP_SPEC, add_model_arguments
from steer.lower.targets import TARGETS
from steer.models import DEFAULT_MODEL, load_model
from steer.plan import compile as compile_plan
from steer.spec import parse_spec

TARGET_HELP = "; ".join(f"{name}: {target.help}" for name, target in TARGETS.items())


def register(commands) -> None:
    p = commands.add_parser("compile", help=f"compile a spec into an artifact ({', '.join(TARGETS)})",
                            description="Compile SPEC into a deployable artifact, measure its fidelity against the hooked "
                                        "reference, and write it atomically with a manifest and an edit card.")
    p.add_argument("spec", metavar="SPEC", help=HELP_SPEC)
    p.add_argument("--target", required=True, choices=list(TARGETS), help=TARGET_HELP)
    _common(p)
    p.set_defaults(run=run_compile)

    e = commands.add_parser("export", help="compile a spec into a merged checkpoint (= compile --target weights)",
                            description="Write a standard Hugging Face checkpoint with the edits merged into the weights.")
    e.add_argument("spec", metavar="SPEC", help=HELP_SPEC)
    _common(e)
    e.set_defaults(run=run_compile, target="weights")

    v = commands.add_parser("verify", help="re-check an artifact: file hashes and fidelity against the hooked reference",
                            description="Re-hash an artifact's files against its manifest and compare it with the hooked "
                                        "reference. Exits 1 if a hash differs or an exact lowering is not exact.")
    v.add_argument("directory", metavar="DIR", help="an artifact directory written by steer compile/export")
    v.add_argument("--spec", help="compile this spec as the reference instead of the artifact's embedded pack")
    v.set_defaults(run=run_verify)


def _common(p) -> None:
    add_model_arguments(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--allow-approximate", action="store_true",
                   help="accept approximate lowerings, e.g. a graft of scale/clamp into weights (their fidelity is "
                        "reported); a spec's `max_kl` accepts them only up to a measured mean KL")
    p.add_argument("--suite", action="append", default=[], metavar="NAME_OR_FILE",
                   help="also evaluate the artifact against the base on this behaviour suite (repeatable; see `steer "
                        "eval`) and record the numbers in the manifest and the edit card")
    p.add_argument("--eval-split", choices=("all", "dev", "held_out"), default="all",
                   help="which prompts of the suites to evaluate on (default %(default)s)")


def run_compile(args) -> int:
    from steer.export.checkpoint import export

    spec = parse_spec(args.spec, model=args.model, sae=args.sae, site=args.site)
    base = spec.model or DEFAULT_MODEL
    model, tokenizer = load_model(base)
    plan = compile_plan(spec, model, tokenizer=tokenizer)
    manifest = export(plan, model, tokenizer, args.target, args.output, base=base, overwrite=args.overwrite,
                      allow_approximate=args.allow_approximate, suites=args.suite, eval_split=args.eval_split)
    print(f"wrote {args.output} ({args.target})")
    for e in manifest["edits"]:
        print(f"  edits[{e['index']}] {e['edit']}: {e['lowering']}" + (f" — {e['note']}" if e["note"] else ""))
    for note in manifest["notes"]:
        print(f"  note: {note}")
    if manifest["fidelity"]:
        from steer.verify.fidelity import Fidelity

        print("  " + Fidelity(**manifest["fidelity"]).describe())
    cvec = manifest.get("llamacpp_fidelity")
    if cvec:
        print(f"  llama.cpp vs hooks over {cvec['tokens']} positions: mean KL {cvec['kl']:.4g} (quantisation alone "
              f"{cvec['kl_unedited']:.4g}), top-1 {100 * cvec['top1']:.1f}% — {'pass' if cvec['passes'] else 'FAIL'} "
              f"({cvec['rule']})")
    evaluation = manifest.get("evaluation")
    if evaluation:
        n = evaluation["neutral"]
        print(f"  vs base on neutral text: KL {n['kl_mean']} nats/token, perplexity {n['ppl_change_pct']:+}%, "
              f"top-1 {100 * n['top1']:.2f}%")
        for s in evaluation["suites"]:
            print(f"  {s['suite']} ({evaluation['split']} split): {s['base']['score']} → {s['steered']['score']}"
                  + ("" if s["change_pct"] is None else f" ({s['change_pct']:+}%)"))
    return 0


def run_verify(args) -> int:
    from steer.verify.artifact import verify_artifact

    verdict = verify_artifact(args.directory, spec=args.spec)
    for line in verdict.lines:
        print(line)
    print("verified" if verdict.ok else "verification FAILED")
    return 0 if verdict.ok else 1
