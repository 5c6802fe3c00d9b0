"""`steer sae …`: SAE files — inspect, train (from a recipe and/or flags) and eval (on held-out text)."""

from __future__ import annotations

from steer.sae import describe_sae
from steer.saes import load_sae

# recipe fields offered as flags; their help is the field's docstring (steer.train.config)
TRAIN_FLAGS = (
    "model", "site", "sites", "width", "k", "corpus", "tokens", "architecture", "epochs", "batch_size", "lr", "text_field",
    "context_size", "held_out", "seed", "device", "checkpoint_every",
)


def register(commands) -> None:
    p = commands.add_parser("sae", help="inspect, train and evaluate SAEs", description="Work with SAE files.")
    sub = p.add_subparsers(dest="sae_command", metavar="SUBCOMMAND", required=True)
    inspect = sub.add_parser(
        "inspect", help="print an SAE's config, shapes, norms and architecture",
        description="Read an SAE (SAELens v5/v6 directory, Gemma Scope params.npz, sparsify directory) and describe it.",
    )
    inspect.add_argument("path", metavar="PATH", help="SAE directory or params.npz file")
    inspect.add_argument("--site", help="override the site the file names")
    inspect.set_defaults(run=run_inspect)
    _register_train(sub)
    _register_eval(sub)


def run_inspect(args) -> int:
    print(describe_sae(load_sae(args.path, site=args.site)))
    return 0


# -- train ------------------------------------------------------------------------------


def _register_train(sub) -> None:
    from steer.train.config import TrainConfig, allowed_values, field_help

    train = sub.add_parser(
        "train", help="train a TopK / BatchTopK SAE on a model's activations",
        description="Train an SAE from a recipe (--config) and/or flags (flags override the recipe) and save it in the "
                    "SAELens v6 layout with sparsity and feature statistics. Ctrl-C saves a checkpoint; rerunning the "
                    "same command resumes. Runs data-parallel under `accelerate launch`.",
    )
    train.add_argument("--config", metavar="FILE", help="recipe YAML (see configs/); its fields are the flags below")
    train.add_argument("-o", "--out", required=True, metavar="DIR", help="directory to write the SAE to")
    defaults = TrainConfig()
    docs = field_help()
    for name in TRAIN_FLAGS:
        flag = "--" + name.replace("_", "-")
        choices = allowed_values(name)
        kind = type(getattr(defaults, name)) if getattr(defaults, name) is not None else (float if name == "lr" else str)
        kind = str if kind is tuple else kind  # --sites a,b,c
        train.add_argument(flag, dest=name, type=None if choices else kind, choices=choices, default=None,
                           metavar=None if choices else name.upper(), help=f"{docs[name]} (default: {getattr(defaults, name)})")
    train.add_argument("--restart", action="store_true", help="ignore a checkpoint left by an interrupted run and start over")
    train.add_argument("--overwrite", action="store_true", help="replace an existing SAE in --out")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(run=run_train)


def run_train(args) -> int:
    from steer.train import TrainConfig, load_recipe, train_sae, train_saes

    overrides = {name: getattr(args, name) for name in TRAIN_FLAGS}
    config = load_recipe(args.config, **overrides) if args.config else TrainConfig().replace(**overrides)
    options = dict(resume=not args.restart, overwrite=args.overwrite, progress=not args.quiet)
    results = train_saes(config, args.out, **options) if config.sites else [train_sae(config, args.out, **options)]
    for result in results:
        m = result.metrics
        print(f"saved {result.path}  ({result.tokens_seen:,} tokens seen, {m['steps']} steps, {m['wall_time_s']:.0f} s)")
        print(f"  on {m.get('tokens', 0):,} training activations: FVU {m['fvu']:.4f}  L0 {m['l0']:.1f}  "
              f"dead {100 * m['dead_fraction']:.1f}%")
    return 0


# -- eval -------------------------------------------------------------------------------


def _register_eval(sub) -> None:
    ev = sub.add_parser(
        "eval", help="FVU, L0, dead %%, delta LM loss and CE recovered on held-out text",
        description="Evaluate an SAE on text it was not trained on: the held-out documents of the corpus (by default "
                    "the training corpus and held-out fraction its cfg.json records). Prints FVU, L0, dead features, "
                    "the LM loss with the reconstruction spliced in (error term dropped) minus the clean loss, and "
                    "the CE loss recovered versus zero-ablating the site.",
    )
    ev.add_argument("sae", metavar="SAE", help="SAE directory (any format steer reads)")
    ev.add_argument("--model", help="model (default: the model the SAE's config names)")
    ev.add_argument("--corpus", help="corpus (default: the SAE's training corpus, else the embedded default)")
    ev.add_argument("--site", help="override the site the SAE's config names")
    ev.add_argument("--tokens", type=int, default=None, help="held-out tokens to evaluate on (default: 16384)")
    ev.add_argument("--held-out", type=float, default=None, dest="held_out",
                    help="held-out fraction used at training (default: from the SAE's config, else 0.05)")
    ev.add_argument("--split", choices=("held_out", "all"), default="held_out",
                    help="held_out (default) or all of the corpus (for a corpus the SAE never saw)")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.set_defaults(run=run_eval)


def run_eval(args) -> int:
    import json

    from steer.evaluate.sae_metrics import evaluate_sae, format_metrics

    metrics = evaluate_sae(args.sae, model=args.model, corpus=args.corpus, site=args.site, tokens=args.tokens,
                           held_out=args.held_out, split=args.split)
    print(json.dumps(metrics.to_dict(), indent=2) if args.json else format_metrics(metrics))
    return 0
