"""The `steer` command line: one subcommand per job, each a thin layer over the Python API.

A user mistake (`SteerError`) prints one line ``steer: error: WHERE: WHAT`` and
exits 2 with no traceback; argparse's own usage errors also exit 2. A bug in
steer still shows its traceback: hiding it would help no one.
"""

from __future__ import annotations

import argparse
import os
import sys

from steer.errors import SteerError


COMMAND_MODULES = {  # subcommand → the module that registers it (imported only when needed)
    "generate": "generate", "sae": "sae", "compile": "artifacts", "export": "artifacts", "verify": "artifacts",
    "demo": "demo", "features": "features", "eval": "evaluate", "sweep": "evaluate", "tune": "evaluate",
}
LIGHT = {("features", "show"), ("features", "search")}
"""Commands that read only an SQLite file: they skip importing torch/transformers (seconds) so they answer at once."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` the parser of that one subcommand's module (fast: no other imports)."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="steer",
        description="Compile SAE feature edits into exact hooks and deployable artifacts.",
    )
    parser.add_argument("--version", action="version", version=f"steer {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = [COMMAND_MODULES[only]] if only in COMMAND_MODULES else list(dict.fromkeys(COMMAND_MODULES.values()))
    for name in names:
        importlib.import_module(f"steer.cli.{name}").register(commands)
    return parser


def _version() -> str:
    from steer import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    light = tuple(argv[:2]) in LIGHT and "-h" not in argv and "--help" not in argv
    parser = build_parser(only=argv[0] if light else None)
    args = parser.parse_args(argv)
    if not light:
        _quiet_libraries()
    try:
        return args.run(args) or 0
    except SteerError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # one line, always
        print(f"steer: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("steer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `steer features search x | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141


def _quiet_libraries() -> None:
    """transformers' per-load progress bars and advisories drown the one answer a command prints."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
