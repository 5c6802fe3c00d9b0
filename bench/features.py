"""How fast `steer features show` and `steer features search` answer on the default atlas.

The issue asks for answers in under a second. This times, on the default
atlas (built on first use — minutes — then cached):

* **in process** — what a long-lived caller (the demo) pays per query:
  ``open_atlas`` + ``Atlas.feature(i)`` + the terminal rendering of
  `steer.cli.features` for ``--ids`` feature ids spread over the SAE, and
  ``Atlas.search(q)`` + rendering for ``--queries``; median and worst, wall
  time, each against the 1 s budget; and what finding the default atlas
  (no ``--atlas``: read the default SAE and hash it) adds;
* **as a command** — ``steer features show ID --atlas DB`` and ``steer
  features search Q --atlas DB`` as real processes (median of ``--runs``),
  beside ``python -c "import steer"``, the interpreter start plus steer's
  import (torch, transformers) that every steer command pays before it does
  anything.

Run: ``python bench/features.py`` (≈ 1 min once the atlas exists). Only reads
the atlas; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def process_seconds(args: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=50, help="feature ids to show (spread over the SAE)")
    parser.add_argument("--queries", default="football,oil prices,film music,election,mobile phone,bank,christmas,court",
                        help="comma-separated search queries")
    parser.add_argument("--runs", type=int, default=3, help="process runs per command")
    args = parser.parse_args()

    from steer.cli.features import render_card
    from steer.discover.atlas import default_atlas, open_atlas

    path = default_atlas()
    lookup = timed(default_atlas)  # what `show`/`search` without --atlas add: read the default SAE, hash it, find the file
    print(f"atlas {path} ({os.path.getsize(path) / 1e6:.1f} MB), load average {os.getloadavg()[0]:.2f}")
    with open_atlas(path) as atlas:
        n = len(atlas)
        ids = [round(i * (n - 1) / max(args.ids - 1, 1)) for i in range(args.ids)]
        tokens = int(atlas.metadata["tokens_read"])
    queries = [q for q in args.queries.split(",") if q]

    def show(i: int) -> None:
        with open_atlas(path) as atlas:
            render_card(atlas.feature(i), tokens_read=tokens)

    def search(q: str) -> None:
        with open_atlas(path) as atlas:
            for card in atlas.search(q, limit=20):
                render_card(card, tokens_read=tokens, contexts=1)

    show(ids[0])  # warm the page cache once, as any second query would find it
    show_times = [timed(lambda i=i: show(i)) for i in ids]
    search_times = [timed(lambda q=q: search(q)) for q in queries]
    print("\nin process (open + query + render), seconds:")
    for name, times in (("show", show_times), ("search", search_times)):
        median, worst = statistics.median(times), max(times)
        print(f"  {name:<7} n={len(times):<3} median {median:.4f}  worst {worst:.4f}  "
              f"worst/1s budget {worst:.3f}  {'OK' if worst < 1 else 'OVER'}")

    print(f"  finding the default atlas (no --atlas): {lookup:.4f}")

    base = process_seconds(["-c", "import steer"], args.runs)
    cli_show = process_seconds(["-m", "steer.cli.main", "features", "show", str(ids[len(ids) // 2]), "--atlas", str(path)], args.runs)
    cli_search = process_seconds(["-m", "steer.cli.main", "features", "search", queries[0], "--atlas", str(path)], args.runs)
    print(f"\nas a command (median of {args.runs} runs), seconds:")
    print(f"  python -c 'import steer'        {base:.3f}")
    print(f"  steer features show ID --atlas  {cli_show:.3f}  ({cli_show - base:+.3f} over the import; "
          f"import share {base / cli_show:.0%})")
    print(f"  steer features search Q --atlas {cli_search:.3f}  ({cli_search - base:+.3f} over the import; "
          f"import share {base / cli_search:.0%})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
