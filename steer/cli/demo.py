"""`steer demo`: the Gradio page comparing steered and unsteered outputs (`steer.demo.app`)."""

from __future__ import annotations

from steer.demo.engine import Limits
from steer.models import DEFAULT_MODEL


def register(commands) -> None:
    p = commands.add_parser(
        "demo", help="serve the Gradio demo: steered vs unsteered side by side, monitor, KL, export",
        description="Serve a web page that generates with and without an edit list side by side (same seed and "
                    "sampling), colours tokens by a monitored feature, shows the per-step KL between the two, searches "
                    "the feature atlas and exports the edits with their verify report. With several SAEs (one per "
                    "site) an edit line picks one with `site SITE`. Needs the `demo` extra.",
    )
    p.add_argument("--model", help=f"registry name or HF directory (default: {DEFAULT_MODEL})")
    p.add_argument("--sae", action="append", metavar="PATH_OR_NAME",
                   help="an SAE directory or file, or `default` / `default:SITE` (a shipped SAE); repeat for one SAE per "
                        "site, each read at the site its config names; the first one's site is where edit lines without "
                        "`site` apply (default: every shipped SAE of the default model, `default` first, or the one "
                        "default SAE where none ship)")
    p.add_argument("--atlas", metavar="FILE", action="append",
                   help="feature atlas for the search panel (repeatable: each is matched to the SAE it was built for), "
                        "or `none` (default: a default SAE's own atlas, built in the background on first use)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=4, metavar="N",
                   help="generations that run at once, interleaved token by token (default %(default)s); more wait in the queue")
    p.add_argument("--max-waiting", type=int, default=64, metavar="N",
                   help="requests that may wait for a free slot (default %(default)s); past that a user is told the "
                        "queue is full")
    p.add_argument("--max-new-tokens", type=int, default=Limits.max_new_tokens, metavar="N",
                   help="most tokens a user may ask for (default %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens, metavar="N",
                   help="longest prompt in tokens, chat template included (default %(default)s)")
    p.set_defaults(run=run)


def run(args) -> int:
    from steer.demo.app import serve
    from steer.errors import SteerError

    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--max-prompt-tokens", args.max_prompt_tokens)):
        if value < 1:
            raise SteerError(f"must be ≥ 1, got {value}", where=flag)
    if not 0 < args.port < 65536:
        raise SteerError(f"must be in 1..65535, got {args.port}", where="--port")
    serve(model=args.model, sae=args.sae, atlas=args.atlas, host=args.host, port=args.port, concurrency=args.concurrency,
          max_waiting=args.max_waiting,
          limits=Limits(max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens))
    return 0
