"""`steer features …`: the feature atlas (index, show, search) and contrastive discovery (contrast).

Rendering lives here (the terminal is the CLI's business); what is computed
and stored is `steer.discover.atlas` and `steer.discover.contrast`.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

SAE_HELP = "SAE directory or file, or `default` / `default:SITE` (default: the default model's shipped SAE at resid_post.10)"
ATLAS_HELP = "atlas file made by `steer features index` (default: the default SAE's atlas, built on first use)"


def register(commands) -> None:
    p = commands.add_parser("features", help="find features: atlas (index, show, search), contrast, attribute, and learned erasure directions",
                            description="Find the SAE features worth editing.")
    sub = p.add_subparsers(dest="features_command", metavar="SUBCOMMAND", required=True)

    index = sub.add_parser(
        "index", help="build a feature atlas (stats, top contexts, top tokens) in SQLite",
        description="Run a corpus through the model and the SAE and store, per feature, its density, max and p99 "
                    "activation, its top activating contexts with per-token activations and its top promoted and "
                    "suppressed output tokens, in one SQLite file with a full-text index. Without -o the atlas is "
                    "cached under $STEER_CACHE/atlases/ (and reused when it is already there).",
    )
    index.add_argument("--model", help="model (default: the model the SAE's config names)")
    index.add_argument("--sae", help=SAE_HELP)
    index.add_argument("--site", help="override the site the SAE's config names")
    index.add_argument("--corpus", help="text file, JSONL, parquet, directory, dataset name or `default` "
                                        "(default: the SAE's training corpus, else the embedded BBC News)")
    index.add_argument("--text-field", default="text", help="JSONL/parquet field holding the text (default: text)")
    index.add_argument("--tokens", type=int, default=None, help="corpus tokens to read (default: 100000)")
    index.add_argument("-o", "--out", metavar="FILE", help="atlas file to write (default: the cache)")
    index.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    index.set_defaults(run=run_index)

    show = sub.add_parser("show", help="render one feature: stats, top tokens, top contexts",
                          description="Render a feature of an atlas: density, max and p99 activation, the output "
                                      "tokens it promotes and suppresses, and its top contexts with the tokens where "
                                      "it fires marked (shaded by activation on a terminal, ⟦bracketed⟧ otherwise).")
    show.add_argument("feature", metavar="ID", type=int, help="feature id")
    show.add_argument("--atlas", metavar="DB", help=ATLAS_HELP)
    show.add_argument("--contexts", type=int, default=8, metavar="N", help="contexts to show (default %(default)s)")
    show.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                      help="shade firing tokens with ANSI colours (auto: when stdout is a terminal)")
    show.set_defaults(run=run_show)

    search = sub.add_parser("search", help="find features by the tokens they fire on or promote, and their contexts",
                            description="Full-text search (BM25, stemmed) over each feature's firing tokens (weighted "
                                        "most), promoted tokens and context text; prints the best matches.")
    search.add_argument("text", metavar="TEXT", help="words to look for, e.g. 'wedding bride'")
    search.add_argument("--atlas", metavar="DB", help=ATLAS_HELP)
    search.add_argument("--limit", type=int, default=20, metavar="N", help="results (default %(default)s)")
    search.add_argument("--json", action="store_true", help="print the feature cards as JSON")
    search.set_defaults(run=run_search)

    contrast = sub.add_parser(
        "contrast", help="rank features by how differently they fire on two prompt sets, and by output score",
        description="Rank SAE features by how well they tell prompt set A from prompt set B (per-prompt max "
                    "activation; AUROC, mean difference), then score the top candidates by how much steering along "
                    "them moves the output towards target tokens (Arad et al. 2025's output score).",
    )
    contrast.add_argument("--a", required=True, metavar="FILE", help="prompt set A: one prompt per line, or JSONL")
    contrast.add_argument("--b", required=True, metavar="FILE", help="prompt set B: one prompt per line, or JSONL")
    contrast.add_argument("--model", help="model (default: the model the SAE's config names)")
    contrast.add_argument("--sae", help=SAE_HELP)
    contrast.add_argument("--site", help="override the site the SAE's config names")
    contrast.add_argument("--target-tokens", metavar="WORDS",
                          help="comma-separated words the output score measures steering towards "
                               "(default: each feature's own top logit-lens tokens)")
    contrast.add_argument("--top", type=int, default=20, metavar="N", help="features to list (default %(default)s)")
    contrast.add_argument("--candidates", type=int, default=None, metavar="N",
                          help="how many of the top features get an output score (default: all listed; 0: none)")
    contrast.add_argument("--summary", choices=("max", "mean"), default="max",
                          help="per-prompt summary of a feature over its tokens (default: max)")
    contrast.add_argument("--rank-by", choices=("activation", "output"), default="activation",
                          help="order by the activation ranking (default) or by output score")
    contrast.add_argument("--atlas", metavar="DB", help="atlas of this SAE for top tokens (default: the default "
                                                        "atlas when the SAE is the default one and it is built)")
    contrast.add_argument("--json", action="store_true", help="print the rows as JSON")
    contrast.set_defaults(run=run_contrast)

    attribute = sub.add_parser(
        "attribute", help="rank features at every given site by their causal effect on a suite's score",
        description="Attribution patching: one forward and one backward pass give every feature's activation × "
                    "gradient of the suite's headline score (|stereotype|, the accuracy margin or mean |gap|), at "
                    "every SAE's site; features are ranked across sites. --contrast SUITE ranks by selectivity: the "
                    "share of the target a feature carries minus the share of the contrast suite's score it touches. "
                    "--verify N ablates the top N for real and prints the true effect beside the estimate.")
    attribute.add_argument("--suite", required=True, metavar="NAME_OR_FILE",
                           help="the target: a logprob_gap suite (shipped name or file), e.g. gender-occupation")
    attribute.add_argument("--sae", action="append", metavar="SAE",
                           help=SAE_HELP + "; repeat, one per site, to rank across depths")
    attribute.add_argument("--contrast", metavar="NAME_OR_FILE",
                           help="a suite whose score must not move, e.g. gender-explicit")
    attribute.add_argument("--split", default="dev", choices=("all", "dev", "held_out"),
                           help="which prompts of the suites (default %(default)s)")
    attribute.add_argument("--model", help="model (default: the model the first SAE's config names)")
    attribute.add_argument("--top", type=int, default=20, metavar="N", help="features to list (default %(default)s)")
    attribute.add_argument("--verify", type=int, default=0, metavar="N",
                           help="ablate the top N one at a time and print the measured effect (default: none)")
    attribute.add_argument("--include-first", action="store_true",
                           help="also count each prompt's first token, the attention sink (default: left out, since "
                                "features that fire only there rank high for every target and ablating them breaks "
                                "the model rather than the concept; and features that fire at any first token rank last, "
                                "marked `sink`, since an edit of one acts there too)")
    attribute.add_argument("--cost", default="calibration", metavar="TEXT",
                           help="neutral text for each feature's side-effect estimate (the first-order change of the "
                                "mean next-token loss if it were zeroed): calibration (steer's calibration text, the "
                                "default; not the BBC text eval measures KL on), default, a corpus path, or none")
    attribute.add_argument("--under", metavar="SPEC",
                           help="measure on the model with this edit applied (its hooks): rank the features that carry "
                                "what the edit leaves, to add to it; --verify ablates on top of it")
    attribute.add_argument("--json", metavar="OUT", help="also write the listed rows (and verification) as JSON")
    attribute.set_defaults(run=run_attribute)

    erase = sub.add_parser(
        "erase", help="fit directions whose removal from every write erases what a suite's fill does to its gap",
        description="Learned erasure (steer.discover.erasure): gradient descent through the model fits r orthonormal "
                    "directions such that removing them from every write to the residual stream (project_out at site "
                    "`writers`: exact in merged weights and adapters) makes each template's gap the same for every "
                    "value of the target suite's `correlate` fill (e.g. every occupation), while the --keep suites' "
                    "margins do not shrink and the KL on neutral text stays small. Writes DIR/erasure.safetensors "
                    "(u0, u1, ...), the spec DIR/erasure.yaml and DIR/history.json.")
    erase.add_argument("--suite", required=True, action="append", metavar="NAME_OR_FILE",
                       help="a target: a logprob_gap suite with `correlate:` (repeat to fit on several; the "
                            "first one's contrast direction starts the fit)")
    erase.add_argument("--keep", action="append", default=[], metavar="NAME_OR_FILE",
                       help="an accuracy suite whose margins must not shrink, e.g. gender-explicit (repeat for several: "
                            "each prompt's margin counts on its own)")
    erase.add_argument("--hold", action="append", default=[], metavar="NAME_OR_FILE",
                       help="a suite (any rule) whose next-token distribution at each prompt's end must not move "
                            "(KL term; repeat for several), e.g. age, capability")
    erase.add_argument("--hold-weight", type=float, default=20.0, help="weight of the hold KL (default %(default)s)")
    erase.add_argument("--split", default="dev", choices=("all", "dev", "held_out"),
                       help="which prompts of the suites to fit on (default %(default)s)")
    erase.add_argument("--model", help="model (default: the default model)")
    erase.add_argument("--rank", type=int, default=1, help="directions to fit (default %(default)s)")
    erase.add_argument("--steps", type=int, default=60, help="Adam steps (default %(default)s)")
    erase.add_argument("--lr", type=float, default=0.03, help="Adam learning rate (default %(default)s)")
    erase.add_argument("--keep-weight", type=float, default=1.0, help="weight of the keep shortfall (default %(default)s)")
    erase.add_argument("--lean-weight", type=float, default=0.0, help="weight of the shift of each template's mean "
                       "gap (default %(default)s: free to move)")
    erase.add_argument("--kl-weight", type=float, default=20.0, help="weight of the neutral KL (default %(default)s)")
    erase.add_argument("--neutral", default="calibration", metavar="TEXT",
                       help="neutral text for the KL term: calibration (default; not the BBC text eval measures KL "
                            "on), default, a corpus path, or none")
    erase.add_argument("--seed", type=int, default=0, help="minibatch and start seed (default %(default)s)")
    erase.add_argument("--groups-per-step", type=int, default=4, metavar="N",
                       help="target template groups per step's minibatch (default %(default)s)")
    erase.add_argument("--keep-per-step", type=int, default=48, metavar="N",
                       help="keep prompts per step, drawn from all --keep suites (default %(default)s)")
    erase.add_argument("--hold-per-step", type=int, default=32, metavar="N",
                       help="hold prompts per step (default %(default)s)")
    erase.add_argument("--average-last", type=int, default=0, metavar="N",
                       help="return the mean subspace of the last N steps (top eigenvectors of the mean projector) "
                            "instead of the last step's (default %(default)s: the last step's)")
    erase.add_argument("--fraction", type=float, default=1.0, metavar="P",
                       help="the share of the component removed, while fitting and in the written spec (default "
                            "%(default)s; above 1 the component is removed and part of it reversed)")
    erase.add_argument("--init", metavar="FILE", help="start from a previous fit's erasure.safetensors (its u0, u1, "
                       "...; at most --rank of them): continue a fit, or widen it to a higher rank")
    erase.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory")
    erase.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    erase.set_defaults(run=run_erase)


# -- shared ---------------------------------------------------------------------------------


def _load_sae(spec: str | None):
    """``(sae, is_default)``; ``None``/``default`` is the default SAE (read from its files as the atlas is keyed)."""
    from steer import sae as sae_files
    from steer.saes import DEFAULT_SAE, default_sae_dir, is_default_name, load_sae

    if spec is None or (spec == DEFAULT_SAE and is_default_name(spec)):
        return sae_files.load_sae(default_sae_dir()), True
    return load_sae(spec), False


def _model_name(args, sae) -> str:
    from steer.models.loading import DEFAULT_MODEL

    return args.model or sae.model_name or DEFAULT_MODEL


def _open(atlas: str | None):
    from steer.discover.atlas import default_atlas, open_atlas, quick_default_atlas

    return open_atlas(atlas if atlas is not None else (quick_default_atlas() or default_atlas()))


# -- index ----------------------------------------------------------------------------------


def run_index(args) -> int:
    from steer.data.corpus import open_corpus
    from steer.discover.atlas import DEFAULT_TOKENS, AtlasError, atlas_path, build_atlas, build_params
    from steer.models import load_model

    if args.tokens is not None and args.tokens <= 0:
        raise AtlasError(f"must be positive, got {args.tokens}", where="--tokens")
    sae, _ = _load_sae(args.sae)
    corpus_spec = args.corpus or sae.metadata.get("dataset_path") or "default"
    corpus = open_corpus(corpus_spec, text_field=args.text_field)
    name = _model_name(args, sae)
    tokens = args.tokens or DEFAULT_TOKENS
    if args.site:
        import dataclasses

        sae = dataclasses.replace(sae, site=args.site)
    out = Path(args.out) if args.out else atlas_path(sae, build_params(sae, corpus_spec, model_name=name, tokens=tokens))
    if not args.out and out.is_file():
        print(f"{out}  (already built)")
        return 0
    if args.out and out.exists() and not args.overwrite:
        raise AtlasError("already exists; pass --overwrite to replace it", where=str(out))
    model, tokenizer = load_model(name)
    path = build_atlas(model, tokenizer, sae, corpus, tokens=tokens, out=out, progress=not args.quiet, model_name=name)
    print(path)
    return 0


# -- show -----------------------------------------------------------------------------------


def run_show(args) -> int:
    with _open(args.atlas) as atlas:
        card = atlas.feature(args.feature)
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        print(render_card(card, tokens_read=int(atlas.metadata.get("tokens_read", 0)), contexts=args.contexts, color=color))
    return 0


def render_card(card, *, tokens_read: int = 0, contexts: int = 8, color: bool = False) -> str:
    fired = f" ({round(card.density * tokens_read):,} of {tokens_read:,} tokens)" if tokens_read else ""
    lines = [
        f"feature {card.id}   density {100 * card.density:.3f}%{fired}   max {card.max_activation:.3f}   p99 {card.p99:.3f}",
        "promotes    " + "  ".join(f"{_visible(t)!s} {v:+.2f}" for t, v in card.promoted),
        "suppresses  " + "  ".join(f"{_visible(t)!s} {v:+.2f}" for t, v in card.suppressed),
    ]
    if not card.contexts:
        lines.append("never fired on the atlas's text: no contexts")
        return "\n".join(lines)
    lines.append(f"top contexts (peak activation; {'shaded' if color else '⟦marked⟧'} where it fires):")
    for context in card.contexts[:contexts]:
        lines.append(f"  {context.max_activation:8.3f}  {mark_context(context, color=color)}")
    return "\n".join(lines)


def mark_context(context, *, color: bool = False) -> str:
    """The context on one line, tokens where the feature fires marked: ANSI shades by activation, or ⟦brackets⟧."""
    peak = context.max_activation or 1.0
    parts = []
    for token, activation in zip(context.tokens, context.activations):
        text = _visible(token, quote=False)
        if activation <= 0:
            parts.append(text)
            continue
        core = text.lstrip(" ")
        lead = text[: len(text) - len(core)]
        if not core:  # a whitespace token: mark it as it is
            core, lead = text, ""
        if color:
            level = min(4, int(5 * activation / peak))
            parts.append(f"{lead}\033[1;30;48;5;{SHADES[level]}m{core}\033[0m")
        else:
            parts.append(f"{lead}⟦{core}⟧")
    return "…" + "".join(parts) + "…"


SHADES = (194, 157, 120, 83, 46)
"""256-colour greens, light to strong, for activation / peak in fifths."""


def _visible(token: str, quote: bool = True) -> str:
    text = token.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")
    return repr(text) if quote else text


# -- search ---------------------------------------------------------------------------------


def run_search(args) -> int:
    with _open(args.atlas) as atlas:
        cards = atlas.search(args.text, limit=args.limit)
        if args.json:
            from dataclasses import asdict

            print(json.dumps([asdict(c) for c in cards], indent=1))
            return 0
        if not cards:
            print(f"no feature matches {args.text!r}")
            return 0
        print(f"{'feature':>7}  {'density':>8}  {'max':>7}  {'fires on':<34}  promotes")
        for card in cards:
            fires = ", ".join(firing_tokens(card, 5))
            promotes = " ".join(_visible(t) for t, _ in card.promoted[:5])
            print(f"{card.id:>7}  {100 * card.density:7.3f}%  {card.max_activation:7.2f}  {_clip(fires, 34):<34}  {promotes}")
    return 0


def firing_tokens(card, n: int) -> list[str]:
    """The tokens a feature fires on most often (≥ half the peak) in its top contexts."""
    counts: Counter = Counter()
    for context in card.contexts:
        for token, activation in zip(context.tokens, context.activations):
            if activation > 0 and activation >= 0.5 * context.max_activation and token.strip():
                counts[token.strip()] += 1
    return [t for t, _ in counts.most_common(n)]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# -- contrast -------------------------------------------------------------------------------


def run_contrast(args) -> int:
    from steer.discover.contrast import contrast, read_prompts
    from steer.models import load_model

    prompts_a, prompts_b = read_prompts(args.a), read_prompts(args.b)  # bad files fail before any model work
    targets = [w for w in (args.target_tokens or "").split(",") if w.strip()] or None
    sae, is_default = _load_sae(args.sae)
    atlas = args.atlas
    if atlas is None and is_default and not args.model:
        atlas = _cached_default_atlas(sae)
    model, tokenizer = load_model(_model_name(args, sae))
    rows = contrast(model, tokenizer, sae, prompts_a, prompts_b, site=args.site, summary=args.summary, top=args.top,
                    candidates=args.candidates, target_tokens=targets, atlas=atlas, rank_by=args.rank_by)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
        return 0
    print(f"{len(prompts_a)} prompts A vs {len(prompts_b)} prompts B; per-prompt {args.summary} over tokens; "
          f"AUROC > 0.5: fires more on A")
    print(f"{'rank':>4} {'feature':>7} {'AUROC':>6} {'mean A':>8} {'mean B':>8} {'diff':>8} {'fired A/B':>10} "
          f"{'output':>7}  top tokens")
    for rank, r in enumerate(rows, start=1):
        output = "-" if r.output_score is None else f"{r.output_score:.3f}"
        tokens = " ".join(_visible(t) for t in r.top_tokens[:6])
        print(f"{rank:>4} {r.feature:>7} {r.auroc:6.3f} {r.mean_a:8.3f} {r.mean_b:8.3f} {r.diff:+8.3f} "
              f"{100 * r.fired_a:4.0f}%/{100 * r.fired_b:3.0f}% {output:>7}  {tokens}")
    return 0


def _cached_default_atlas(sae) -> str | None:
    """The default atlas's path if it is already built (contrast does not build it just for top tokens)."""
    from steer.discover.atlas import default_atlas_path

    path = default_atlas_path(sae)
    return str(path) if path.is_file() else None


# -- attribute ------------------------------------------------------------------------------


COST_TOKENS = 4096
"""Tokens of neutral text for `steer features attribute`'s side-effect estimate (32 rows of 128)."""


def run_attribute(args) -> int:
    from steer.discover.attribution import attribute, verify_attribution
    from steer.errors import SteerError
    from steer.evaluate.suites import load_suite
    from steer.export.atomic import write_text_atomic
    from steer.models import load_model
    from steer.plan import compile as compile_plan
    from steer.spec import parse_spec

    for flag, value in (("--top", args.top), ("--verify", args.verify)):
        if value < 0:
            raise SteerError(f"must be ≥ 0, got {value}", where=flag)
    suite = load_suite(args.suite)  # bad files fail before any model work
    contrast = load_suite(args.contrast) if args.contrast else None
    under = parse_spec(args.under) if args.under else None
    saes = [_load_sae(spec)[0] for spec in (args.sae or [None])]
    model, tokenizer = load_model(_model_name(args, saes[0]))
    if under is not None:
        under = compile_plan(under, model, tokenizer=tokenizer)
    neutral = None
    if args.cost != "none":
        from steer.evaluate.report import neutral_text
        neutral = neutral_text(tokenizer, args.cost, tokens=COST_TOKENS).rows
    result = attribute(model, tokenizer, saes, suite, split=args.split, contrast=contrast,
                       include_first=args.include_first, neutral=neutral, under=under)
    checked = (verify_attribution(model, tokenizer, result, saes, min(args.verify, len(result.rows)), under=under)
               if args.verify else [])
    if args.under:
        print(f"under {args.under}: every number below is of the edited model")
    print(f"{suite.name} ({args.split} split), target = {result.suite.scoring.headline} in differentiable form: "
          f"m = {result.metric:.4g}" + (f"; contrast {contrast.name}: m = {result.contrast_metric:.4g}" if contrast else ""))
    print("attribution a = Σ activation × gradient: zeroing the feature changes m by about −a"
          + ("; Δloss: the same estimate of the mean next-token loss on neutral text (nats/token)" if neutral is not None
             else ""))
    head = f"{'rank':>4} {'site':<16} {'feature':>7} {'a':>10}"
    if contrast:
        head += f" {'a(contrast)':>11} {'selectivity':>11}"
    if neutral is not None:
        head += f" {'Δloss':>10}"
    print(head)
    for rank, row in enumerate(result.top(args.top), start=1):
        line = f"{rank:>4} {row.site:<16} {row.feature:>7} {row.attribution:>10.4g}"
        if contrast:
            line += f" {row.contrast:>11.4g} {row.selectivity:>11.4g}"
        if neutral is not None:
            line += f" {row.cost + 0.0:>+10.3g}"  # + 0.0: a zero estimate prints as +0, not -0
        print(line + ("  sink" if row.at_first else ""))
    sinks = sum(r.at_first for r in result.rows)
    if sinks and not args.include_first:
        print(f"{sinks} features fire at some prompt's first token (the attention sink) and rank last, marked "
              "`sink`: an edit acts at every position, so editing one edits the sink too")
    if checked:
        print(f"\nverified by ablation (scale 0 at the site, error term kept), top {len(checked)}:")
        print(f"{'site':<16} {'feature':>7} {'estimate':>10} {'true':>10} {'score change':>13}")
        for v in checked:
            print(f"{v.row.site:<16} {v.row.feature:>7} {v.estimate:>10.4g} {v.true:>10.4g} {v.score_change:>+13.4g}")
    if args.json:
        document = {"suite": suite.name, "split": args.split, "under": args.under, "metric": result.metric,
                    "contrast": contrast.name if contrast else None, "contrast_metric": result.contrast_metric,
                    "rows": [r.to_dict() for r in result.top(args.top)],
                    "verified": [{**v.row.to_dict(), "estimate": v.estimate, "true": v.true,
                                  "score_change": v.score_change} for v in checked]}
        write_text_atomic(args.json, json.dumps(document, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


ERASE_NEUTRAL_TOKENS = 8192
ERASURE_FILE = "erasure.safetensors"


def run_erase(args) -> int:
    import dataclasses

    from safetensors.torch import save_file

    from steer.discover.erasure import learn_erasure, read_erasure
    from steer.errors import SteerError
    from steer.evaluate.suites import load_suite
    from steer.export.atomic import atomic_directory
    from steer.models import DEFAULT_MODEL, load_model
    from steer.spec import parse_spec
    from steer.spec.yaml_io import dump_spec

    per_step = (args.groups_per_step, args.keep_per_step, args.hold_per_step)
    if args.rank < 1 or args.steps < 1 or args.lr <= 0 or min(per_step) < 1 \
            or min(args.keep_weight, args.kl_weight, args.hold_weight, args.lean_weight) < 0 \
            or not 0 <= args.average_last <= args.steps or not 0 < args.fraction < float("inf"):
        raise SteerError("--rank, --steps and the --*-per-step sizes must be ≥ 1, --lr > 0, the weights ≥ 0, "
                         "0 ≤ --average-last ≤ --steps, --fraction > 0", where="steer features erase")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise SteerError("exists and is not an empty directory; pass --overwrite to replace it", where=str(out))
    suites = [load_suite(s) for s in args.suite]  # bad files fail before any model work
    keep = [load_suite(s) for s in args.keep]
    hold = [load_suite(s) for s in args.hold]
    init = read_erasure(args.init) if args.init else None
    if init is not None and init.shape[1] > args.rank:
        raise SteerError(f"has {init.shape[1]} directions, more than --rank {args.rank}", where=args.init)
    model_name = args.model or DEFAULT_MODEL
    model, tokenizer = load_model(model_name)
    neutral = None
    if args.neutral != "none":
        from steer.evaluate.report import neutral_text
        neutral = neutral_text(tokenizer, args.neutral, tokens=ERASE_NEUTRAL_TOKENS).rows

    def log(step, parts):
        print(f"step {step + 1:>3}/{args.steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in parts.items() if k != "step"),
              flush=True)

    result = learn_erasure(model, tokenizer, suites, keep=keep, hold=hold, split=args.split, neutral=neutral,
                           rank=args.rank, steps=args.steps, lr=args.lr, keep_weight=args.keep_weight,
                           kl_weight=args.kl_weight, hold_weight=args.hold_weight, lean_weight=args.lean_weight,
                           groups_per_step=args.groups_per_step, keep_per_step=args.keep_per_step,
                           hold_per_step=args.hold_per_step, seed=args.seed, init=init,
                           average_last=args.average_last, fraction=args.fraction, log=log)
    print(f"headline scores on the {args.split} split, without → with the erasure:")
    for name, before in result.before.items():
        print(f"  {name:<32} {before:.4f} → {result.after[name]:.4f}")
    fitted = ", ".join(s.name for s in suites) + (f"; keep {', '.join(s.name for s in keep)}" if keep else "") + \
        (f"; hold {', '.join(s.name for s in hold)}" if hold else "")
    by = "" if args.fraction == 1 else f" by {args.fraction * 100:g}%"
    edits = "; ".join(f"project out direction {ERASURE_FILE}:{key}{by} site writers" for key in result.tensors())
    spec = dataclasses.replace(parse_spec(edits), name=f"erase-{suites[0].name}", model=model_name,
                               description=f"Remove {args.rank} learned direction(s) from every write to the stream"
                               + ("." if args.fraction == 1 else f", {args.fraction:g} of the component."))
    settings = {"lr": args.lr, "keep_weight": args.keep_weight, "kl_weight": args.kl_weight,
                "hold_weight": args.hold_weight, "lean_weight": args.lean_weight, "neutral": args.neutral,
                "groups_per_step": args.groups_per_step, "keep_per_step": args.keep_per_step,
                "hold_per_step": args.hold_per_step, "average_last": args.average_last, "fraction": args.fraction}
    spec = (f"# Made by: steer features erase ({args.split} split of {fitted}; rank {args.rank}, {args.steps} steps, "
            f"seed {args.seed}{f', from {args.init}' if args.init else ''}).\n# Settings: "
            + ", ".join(f"{k} {v}" for k, v in settings.items()) + "\n" + dump_spec(spec))
    metadata = {"model": model_name, "made_by": "steer features erase", "suites": fitted, "split": args.split,
                "rank": str(args.rank), "steps": str(args.steps), "seed": str(args.seed),
                **{k: str(v) for k, v in settings.items()}}
    if args.init:
        metadata["init"] = args.init
    with atomic_directory(args.out, overwrite=args.overwrite, what="erasure output") as tmp:
        save_file(result.tensors(), str(tmp / ERASURE_FILE), metadata=metadata)
        (tmp / "erasure.yaml").write_text(spec, encoding="utf-8")
        (tmp / "history.json").write_text(json.dumps({"before": result.before, "after": result.after,
                                                      "history": list(result.history)}, indent=1) + "\n")
    print(f"wrote {args.out}/erasure.safetensors, erasure.yaml (the spec) and history.json")
    return 0

