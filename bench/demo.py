"""What the demo's side-by-side decoding costs, and what concurrent users get from one model.

On the real default model and default SAE, greedy, ``--new-tokens`` per continuation:

* ``generate`` — HF ``generate`` under one ``steer.applied`` context (the steered
  column alone, hooks installed once), exactly ``--new-tokens`` steps;
* ``demo, 1 user`` — `DemoEngine.generate`: three KV-cached continuations
  (unsteered, steered, and the unsteered model on the steered prefix for the
  KL), hooks installed and removed at every step under the engine's lock;
* ``demo, K users`` — K threads at once, each a different edit, interleaving step
  by step under the lock: aggregate decode steps/s and the mean latency.

A demo continuation may end early (end of turn), so rates are decode steps per
second (a demo step feeds up to three continuations). It prints them and their
ratio to ``generate``'s from one run (same process, configurations
interleaved over ``--rounds``; medians), and the cost of one ``applied``
enter/exit (what the per-step isolation adds). CPU time is shown beside wall
time: on a shared machine, wall time measures the neighbours too.

Run: ``python bench/demo.py`` (≈ 5 min on 2 cores) or ``--quick``. Only measures.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

PROMPT = "Tell me about your weekend."


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--users", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--quick", action="store_true", help="8 new tokens, 1 round, 4 users")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.rounds, args.users = 8, 1, [4]

    from steer.demo.engine import DemoEngine
    from steer.generate import Sampling, generate, prompt_ids
    from steer.lower.hooks import applied

    engine = DemoEngine.load()
    live = [int(i) for i in (engine.sae.feature_stats["p99"] > 0).nonzero()[:, 0]]
    edits = [f"steer feature {f} by 4 units feature" for f in live[:: max(1, len(live) // 16)][:16]]
    sampling = Sampling(max_new_tokens=args.new_tokens)
    plan = engine.plan(engine.edits(edits[0]))
    generate(engine.model, engine.tokenizer, [PROMPT], plan, Sampling(max_new_tokens=2))  # warm-up
    engine.generate(PROMPT, edits[0], Sampling(max_new_tokens=2))
    for e in edits:
        engine.plan(engine.edits(e))  # compile once, outside the timings

    inputs = prompt_ids(engine.tokenizer, [PROMPT])
    n = args.new_tokens

    def hf_generate():  # exactly n steps (min_new_tokens), steered, one applied context
        with torch.no_grad(), applied(engine.model, plan):
            engine.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, top_p=None,
                                  top_k=None, temperature=None, pad_token_id=engine.tokenizer.pad_token_id)
        return n

    def steps(frame) -> int:  # decode rounds: the longer column (each round feeds up to three continuations)
        return max(len(frame.unsteered_tokens), len(frame.steered_tokens))

    def users(k: int):
        barrier = threading.Barrier(k)

        def one(edit):
            barrier.wait()
            start = time.perf_counter()
            frame = engine.generate(PROMPT, edit, sampling)
            return steps(frame), time.perf_counter() - start

        with ThreadPoolExecutor(k) as pool:
            return list(pool.map(one, edits[:k]))

    rows: dict[str, list[tuple[float, float, float]]] = {}  # name → (steps/s, latency s, CPU s) per round
    for _ in range(args.rounds):
        done, wall, cpu = timed(hf_generate)
        rows.setdefault("generate (steered only)", []).append((done / wall, wall, cpu))
        frame, wall, cpu = timed(lambda: engine.generate(PROMPT, edits[0], sampling))
        rows.setdefault("demo, 1 user", []).append((steps(frame) / wall, wall, cpu))
        for k in args.users:
            results, wall, cpu = timed(lambda: users(k))
            latency = statistics.mean(t for _, t in results)
            rows.setdefault(f"demo, {k} users", []).append((sum(s for s, _ in results) / wall, latency, cpu))

    print(f"default model, up to {n} new tokens, greedy, median of {args.rounds} round(s), "
          f"torch threads {torch.get_num_threads()}")
    print("steps/s: decode steps per second over all users (generate: one forward per step; the demo: up to three)")
    print(f"{'configuration':28} {'steps/s':>8} {'latency s':>10} {'CPU s':>8} {'step cost vs generate':>22}")
    base = statistics.median(r[0] for r in rows["generate (steered only)"])
    for name, values in rows.items():
        rate, latency, cpu = (statistics.median(v[i] for v in values) for i in range(3))
        print(f"{name:28} {rate:8.1f} {latency:10.2f} {cpu:8.2f} {base / rate:22.2f}")

    ids = engine.prompt_tokens(PROMPT)
    repeats = 200
    start = time.perf_counter()
    for _ in range(repeats):
        with applied(engine.model, plan):
            pass
    enter_exit = (time.perf_counter() - start) / repeats
    with torch.no_grad():
        _, step, _ = timed(lambda: engine.model(ids[:, :1]))
    print(f"steer.applied enter+exit: {1e3 * enter_exit:.3f} ms per step "
          f"({100 * enter_exit / step:.1f}% of one 1-token forward pass, {1e3 * step:.1f} ms)")


if __name__ == "__main__":
    main()
