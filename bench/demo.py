"""What the demo's side-by-side decoding costs, and what concurrent users get from one model: before and after
batching the users' continuations as rows of one forward call per step (issue 14, item 2).

On the real default model and its default SAE, greedy, ``--new-tokens`` per continuation:

* ``generate`` — HF ``generate`` under one ``steer.applied`` context (the steered column alone, hooks installed
  once), exactly ``--new-tokens`` steps: the reference cost of one decode step;
* ``before, K users`` — `DemoEngine` with ``batched=False``, the earlier path: K threads at once, each a different
  edit; every request feeds its three KV-cached continuations (unsteered, steered, and the unsteered model on the
  steered prefix for the KL) one forward call each per step, hooks installed and removed at every call under the
  engine's lock, so the users' forward calls queue behind one another;
* ``after, K users`` — `DemoEngine` (batched, `steer.demo.batch`): the same K requests; one scheduler thread feeds
  every active continuation of every user as a row of one forward call per step.

Both run in the same process on the same engine (``engine.batched`` switched), configurations interleaved over
``--rounds`` (medians). Rates are aggregate decode steps per second: the sum over users of each request's decode
steps (its longer column: a demo continuation may end early at its end of turn), over the wall time from the
barrier until the last user is done (prefills included). The table shows the process CPU time beside the wall
time: on a shared machine, wall time measures the neighbours too. It ends with the ratios after/before per K and
the verdict against the targets (≥ 4× at 16 users; no slower at 1 user), and checks that the two paths gave the
same greedy tokens.

Run: ``python bench/demo.py`` (24 new tokens, 2 rounds) or ``--quick`` (8 new tokens, 1 round); ``--threads 1`` on
a shared machine (torch's OpenMP threads stall at every barrier whenever a neighbour holds a core). Only measures.
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--users", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--quick", action="store_true", help="8 new tokens, 1 round")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 on a shared machine whose cores are busy")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.rounds = 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    from steer.demo.engine import DemoEngine
    from steer.generate import Sampling, generate, prompt_ids
    from steer.lower.hooks import applied

    engine = DemoEngine.load()
    live = [int(i) for i in (engine.sae.feature_stats["p99"] > 0).nonzero()[:, 0]]
    users = max(args.users)
    edits = [f"steer feature {f} by 4 units feature" for f in live[:: max(1, len(live) // users)][:users]]
    sampling = Sampling(max_new_tokens=args.new_tokens)
    plan = engine.plan(engine.edits(edits[0]))
    generate(engine.model, engine.tokenizer, [PROMPT], plan, Sampling(max_new_tokens=2))  # warm-up
    for batched in (False, True):
        engine.batched = batched
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

    def steps(frame) -> int:  # decode rounds: the longer column
        return max(len(frame.unsteered_tokens), len(frame.steered_tokens))

    outputs: dict[tuple[bool, int], list] = {}

    def run_users(k: int, batched: bool):
        engine.batched = batched
        barrier = threading.Barrier(k)

        def one(edit):
            barrier.wait()
            start = time.perf_counter()
            frame = engine.generate(PROMPT, edit, sampling)
            return frame, time.perf_counter() - start

        with ThreadPoolExecutor(k) as pool:
            results = list(pool.map(one, edits[:k]))
        outputs[(batched, k)] = [(f.unsteered_tokens, f.steered_tokens) for f, _ in results]
        return results

    rows: dict[str, list[tuple[float, float, float, float]]] = {}  # name → (steps/s, wall s, CPU s, latency s)
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        done, wall, cpu = timed(hf_generate)
        rows.setdefault("generate (steered only)", []).append((done / wall, wall, cpu, wall))
        for k in args.users:
            for batched in ((False, True) if r % 2 == 0 else (True, False)):
                results, wall, cpu = timed(lambda k=k, batched=batched: run_users(k, batched))
                total = sum(steps(f) for f, _ in results)
                latency = statistics.mean(t for _, t in results)
                name = f"{'after' if batched else 'before'}, {k} user{'s' if k > 1 else ''}"
                rows.setdefault(name, []).append((total / wall, wall, cpu, latency))
    load_after = os.getloadavg()[0]

    def median(name, i):
        return statistics.median(v[i] for v in rows[name])

    print(f"default model, up to {n} new tokens, greedy, median of {args.rounds} round(s), "
          f"torch threads {torch.get_num_threads()}, load average {load_before:.1f} → {load_after:.1f}")
    print("steps/s: decode steps per second over all users together (generate: one forward call per step; before: "
          "three calls per user per step; after: one call per step for all users)")
    print(f"{'configuration':26} {'steps/s':>8} {'wall s':>8} {'CPU s':>8} {'latency s':>10} {'CPU ms/step':>12}")
    for name in rows:
        rate, wall, cpu, latency = (median(name, i) for i in range(4))
        print(f"{name:26} {rate:8.2f} {wall:8.2f} {cpu:8.2f} {latency:10.2f} {1e3 * cpu / (rate * wall):12.1f}")
    print()
    print(f"{'users':>5} {'before steps/s':>15} {'after steps/s':>14} {'ratio':>7} {'CPU ratio':>10}")
    ratios = {}
    for k in args.users:
        before, after = f"before, {k} user{'s' if k > 1 else ''}", f"after, {k} user{'s' if k > 1 else ''}"
        ratio = median(after, 0) / median(before, 0)
        # CPU ratio: CPU seconds per step before / after (what the work costs, whatever the neighbours do)
        cpu_ratio = (median(before, 2) / (median(before, 0) * median(before, 1))) / (
            median(after, 2) / (median(after, 0) * median(after, 1)))
        ratios[k] = ratio
        print(f"{k:5} {median(before, 0):15.2f} {median(after, 0):14.2f} {ratio:6.2f}× {cpu_ratio:9.2f}×")
    same = all(outputs[(False, k)] == outputs[(True, k)] for k in args.users)
    print(f"same greedy tokens before and after: {'yes' if same else 'NO'}")
    verdicts = []
    if 16 in ratios:
        verdicts.append(f"16 users {ratios[16]:.2f}× (target ≥ 4×: {'PASS' if ratios[16] >= 4 else 'MISS'})")
    if 1 in ratios:
        verdicts.append(f"1 user {ratios[1]:.2f}× (target ≥ 1×: {'PASS' if ratios[1] >= 1 else 'MISS'})")
    if verdicts:
        print("verdict: " + "; ".join(verdicts))

    ids = engine.prompt_tokens(PROMPT)
    repeats = 200
    start = time.perf_counter()
    for _ in range(repeats):
        with applied(engine.model, plan):
            pass
    enter_exit = (time.perf_counter() - start) / repeats
    with torch.no_grad():
        _, step, _ = timed(lambda: engine.model(ids[:, :1]))
    print(f"steer.applied enter+exit: {1e3 * enter_exit:.3f} ms per call "
          f"({100 * enter_exit / step:.1f}% of one 1-token forward pass, {1e3 * step:.1f} ms)")


if __name__ == "__main__":
    main()
