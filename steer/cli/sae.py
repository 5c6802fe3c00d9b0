"""`steer sae …`: SAE files (inspect now; train and eval come with the SAE-training work)."""

from __future__ import annotations

from steer.sae import describe_sae, load_sae


def register(commands) -> None:
    p = commands.add_parser("sae", help="inspect SAE files", description="Work with SAE files.")
    sub = p.add_subparsers(dest="sae_command", metavar="SUBCOMMAND", required=True)
    inspect = sub.add_parser(
        "inspect", help="print an SAE's config, shapes, norms and architecture",
        description="Read an SAE (SAELens v5/v6 directory, Gemma Scope params.npz, sparsify directory) and describe it.",
    )
    inspect.add_argument("path", metavar="PATH", help="SAE directory or params.npz file")
    inspect.add_argument("--site", help="override the site the file names")
    inspect.set_defaults(run=run_inspect)


def run_inspect(args) -> int:
    print(describe_sae(load_sae(args.path, site=args.site)))
    return 0
