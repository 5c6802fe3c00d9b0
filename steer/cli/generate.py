"""`steer generate`: steered (and with --compare, unsteered) continuations of a prompt."""

from __future__ import annotations

import json
import shutil
import textwrap

from steer.generate import Sampling, generate
from steer.models import DEFAULT_MODEL, load_model
from steer.plan import compile
from steer.spec import parse_spec

HELP_SPEC = "a spec file (.yaml/.yml/.json) or DSL text, e.g. 'suppress feature 4312 by 80%%; monitor feature 55 above 1'"


def register(commands) -> None:
    p = commands.add_parser(
        "generate", help="generate with an edit applied (and without, with --compare)",
        description="Generate a continuation of PROMPT with the edits of --spec applied by exact hooks. "
                    "With --compare, also without them, same seed and sampling, side by side.",
    )
    p.add_argument("prompt", metavar="PROMPT", help="the prompt (wrapped in the chat template for instruct models)")
    p.add_argument("--spec", required=True, help=HELP_SPEC)
    add_model_arguments(p)
    p.add_argument("--compare", action="store_true", help="also generate without the edit, side by side")
    p.add_argument("--max-new-tokens", type=int, default=Sampling.max_new_tokens, metavar="N", help="tokens to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=Sampling.temperature, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=Sampling.top_p, help="nucleus sampling mass (default %(default)s)")
    p.add_argument("--seed", type=int, default=Sampling.seed, help="sampling seed, shared by both columns (default %(default)s)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of columns")
    p.set_defaults(run=run)


def add_model_arguments(p) -> None:
    p.add_argument("--model", help=f"registry name, HF directory, GGUF file or hub id (default: the spec's, else {DEFAULT_MODEL})")
    p.add_argument("--sae", action="append", help="SAE directory or file (repeat for several sites; default: the spec's)")
    p.add_argument("--site", help="site the edits apply at, e.g. resid_post.15 (default: the spec's or the SAE's)")


def run(args) -> int:
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    spec = parse_spec(args.spec, model=args.model, sae=args.sae, site=args.site)
    model, tokenizer = load_model(spec.model or DEFAULT_MODEL)
    plan = compile(spec, model, tokenizer=tokenizer)
    chat = not args.no_chat
    steered = generate(model, tokenizer, [args.prompt], plan, sampling, chat=chat)[0]
    unsteered = generate(model, tokenizer, [args.prompt], None, sampling, chat=chat)[0] if args.compare else None
    if args.json:
        print(json.dumps({"prompt": args.prompt, "plan": plan.describe(), "steered": steered, "unsteered": unsteered}, indent=2))
    elif unsteered is None:
        print(steered)
    else:
        print(plan.describe())
        print(side_by_side(("unsteered", unsteered), ("steered", steered)))
    return 0


def side_by_side(left: tuple[str, str], right: tuple[str, str]) -> str:
    width = max(30, (shutil.get_terminal_size((120, 24)).columns - 3) // 2)
    columns = []
    for title, text in (left, right):
        lines = [title, "-" * len(title)]
        for paragraph in text.splitlines() or [""]:
            lines += textwrap.wrap(paragraph, width) or [""]
        columns.append(lines)
    height = max(map(len, columns))
    rows = [f"{(columns[0] + [''] * height)[i]:<{width}} | {(columns[1] + [''] * height)[i]}" for i in range(height)]
    return "\n".join(rows)
