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


def build_parser() -> argparse.ArgumentParser:
    from steer.cli import artifacts, demo, evaluate, features, generate, sae

    parser = argparse.ArgumentParser(
        prog="steer",
        description="Compile SAE feature edits into exact hooks and deployable artifacts.",
    )
    parser.add_argument("--version", action="version", version=f"steer {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    generate.register(commands)
    sae.register(commands)
    artifacts.register(commands)
    demo.register(commands)
    features.register(commands)
    evaluate.register(commands)
    return parser


def _version() -> str:
    from steer import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
