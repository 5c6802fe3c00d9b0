"""An 8-point sweep on the default model: point by point (as before rows) vs the points as rows of one batch.

    python bench/sweep.py                      # edits/weddings.yaml over 8 strengths, gender-occupation + capability
    python bench/sweep.py --suite age --neutral-tokens 512 --batch-rows 128

Both runs are `steer.evaluate.sweep.run_sweep` end to end (each measures its own baseline), one after the other in
this process: ``batch_rows=0`` — each point's plan alone, 64 prompts / 4 neutral rows a pass, the path sweeps took
before rows — and ``batch_rows=N`` — prompts × points and neutral rows × points as rows of shared passes through
per-row plans. It prints wall and CPU time (this process, all threads) of each and the ratio, where the time goes
(each suite and the neutral text, by wall time, for both paths), the load average around the runs (the machine may
be shared), and the largest difference between the two runs' numbers (they must agree within float tolerance).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "edits" / "weddings.yaml"))
    parser.add_argument("--param", default="edits[0].strength=0.05:0.4:0.05", help="the sweep's grid (8 points)")
    parser.add_argument("--suite", action="append", help="default: gender-occupation and capability")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--neutral-tokens", type=int, default=1024)
    parser.add_argument("--batch-rows", type=int, default=None, help="default: steer's (BATCH_ROWS)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()

    import torch

    import steer
    import steer.evaluate.report as report
    import steer.plan as compile_module
    from steer.evaluate.scoring import BATCH_ROWS
    from steer.evaluate.sweep import parse_param, run_sweep
    from steer.spec import load_spec_file

    if args.threads:
        torch.set_num_threads(args.threads)
    batch_rows = args.batch_rows or BATCH_ROWS
    suites = args.suite or ["gender-occupation", "capability"]
    spec = load_spec_file(args.spec)
    params = [parse_param(args.param)]
    model, tokenizer = steer.load_model(spec.model or "smollm2-135m-instruct")

    spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # part → [wall, cpu]

    def timed(name_of, function):
        def wrapper(*a, **k):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return function(*a, **k)
            finally:
                cell = spent[name_of(a, k)]
                cell[0] += time.perf_counter() - wall
                cell[1] += time.process_time() - cpu
        return wrapper

    suite_name = lambda a, k: f"suite {a[2].name}"  # noqa: E731 — score_suite(model, tokenizer, suite, ...)
    report.score_suite = timed(suite_name, report.score_suite)
    report.score_suite_rows = timed(suite_name, report.score_suite_rows)
    report.neutral_effect = timed(lambda a, k: "neutral text (steered)", report.neutral_effect)
    report.neutral_effects = timed(lambda a, k: "neutral text (steered)", report.neutral_effects)
    report._row_logprobs = timed(lambda a, k: "  neutral: its forward passes", report._row_logprobs)
    compile_module.compile = timed(lambda a, k: "compile (norm units calibrate)", compile_module.compile)

    print(f"{args.spec}: {args.param}; suites {', '.join(suites)} ({args.split}); {args.neutral_tokens} neutral "
          f"tokens; torch threads {torch.get_num_threads()}; batch_rows {batch_rows}")
    results, times, parts = {}, {}, {}
    load_before = os.getloadavg()
    for label, rows in (("point by point", 0), ("rows", batch_rows)):
        spent.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        results[label] = run_sweep(spec, model, tokenizer, params, suites, split=args.split,
                                   neutral_tokens=args.neutral_tokens, progress=False, batch_rows=rows)
        times[label] = (time.perf_counter() - wall, time.process_time() - cpu)
        parts[label] = {k: tuple(v) for k, v in spent.items()}
        print(f"  {label:<15} wall {times[label][0]:7.1f} s   CPU {times[label][1]:7.1f} s", flush=True)
    load_after = os.getloadavg()
    (w0, c0), (w1, c1) = times["point by point"], times["rows"]
    n = len(results["rows"].points)
    print(f"{n} points: rows are {w0 / w1:.2f}× faster by wall time ({w0:.1f} s → {w1:.1f} s), {c0 / c1:.2f}× by CPU "
          f"time ({c0:.1f} s → {c1:.1f} s); target ≥ 3× by wall time: {'met' if w0 / w1 >= 3 else 'MISSED'}")
    print(f"load average (1, 5, 15 min) before {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}, "
          f"after {load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f} on {os.cpu_count()} CPUs")
    print("\nwhere the time goes (wall s / CPU s; the baseline's own passes included):")
    names = sorted(set(parts["point by point"]) | set(parts["rows"]))
    print(f"  {'part':<32} {'point by point':>18} {'rows':>18} {'ratio':>7}")
    for name in names:
        a, b = parts["point by point"].get(name, (0, 0)), parts["rows"].get(name, (0, 0))
        ratio = f"{a[0] / b[0]:.2f}×" if b[0] else "—"
        print(f"  {name:<32} {a[0]:8.1f} / {a[1]:7.1f} {b[0]:8.1f} / {b[1]:7.1f} {ratio:>7}")

    worst = {"kl_mean": 0.0, "ppl_change_pct": 0.0, "score": 0.0, "outputs differing": 0}
    for ra, rb in zip(results["point by point"].reports, results["rows"].reports):
        worst["kl_mean"] = max(worst["kl_mean"], abs(ra.neutral.kl_mean - rb.neutral.kl_mean))
        worst["ppl_change_pct"] = max(worst["ppl_change_pct"], abs(ra.neutral.ppl_change_pct - rb.neutral.ppl_change_pct))
        for sa, sb in zip(ra.suites, rb.suites):
            worst["score"] = max(worst["score"], abs(sa.steered.score - sb.steered.score))
            worst["outputs differing"] += sum(x != y for x, y in zip(sa.steered.outputs, sb.steered.outputs))
    print("\nlargest |difference| between the two runs: " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
