"""The worked example's feature selection (README "Worked example", step 2): attributed features that hold up.

Reads two `steer features attribute --contrast gender-explicit --json` rankings over the same shipped SAEs, one
on the discovery set (`edits/gender/discovery-occupations.yaml`: occupations and templates the suite does not
use) and one on `gender-occupation`'s dev half, and keeps a feature when, **in both**:

- it carries the stereotype (``a > 0``) and touches the stated-gender target much less (``c < q·a``, ``--q``);
- it never fires at a prompt's first token (``at_first`` false: an edit of it would act at the attention sink);

and its estimated side effect on neutral text is small (``|Δloss| ≤ --max-cost`` nats/token, the ranking's
``cost``, measured on steer's calibration text, not on the BBC text that KL and perplexity are scored on); and,
per ``--guard`` ranking (a suite that must not move, e.g. `steer features attribute --suite age --split all`),
it carries much less of that suite's target than of the stereotype (``|a_guard| < --guard-q · a`` in both
rankings, attributions in the suites' own units). A guarded suite is then no longer an independent check of the
edit: it helped choose it.
Agreement across two prompt sets is what removes the features that only name the dev occupations: a feature
ranked on the dev half alone lost most of its effect on held-out prompts (−45% dev, −16% held out).

Writes a spec that scales every kept feature by one ``--factor``, to be swept on dev (`steer sweep --param
edits[*].factor=...`) under the constraints. Run: ``python edits/gender/choose.py DISCOVERY.json DEV.json -o
SPEC.yaml``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def kept(rows: list[dict], q: float) -> dict[tuple[str, int], dict]:
    return {(r["site"], r["feature"]): r for r in rows
            if r["attribution"] > 0 and r["contrast"] < q * r["attribution"] and not r["at_first"]}


def main(argv=None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("discovery", help="attribution JSON on the discovery set")
    args.add_argument("dev", help="attribution JSON on gender-occupation's dev half")
    args.add_argument("--q", type=float, default=0.5, help="keep c < q·a in both rankings (default %(default)s)")
    args.add_argument("--max-cost", type=float, default=0.001,
                      help="keep |Δloss| ≤ this (nats/token, default %(default)s)")
    args.add_argument("--guard", action="append", default=[], metavar="JSON",
                      help="an attribution JSON of a suite that must not move; repeatable")
    args.add_argument("--guard-q", type=float, default=0.5,
                      help="keep |a_guard| < this × a in both rankings (default %(default)s)")
    args.add_argument("--factor", type=float, default=0.0, help="the scale factor written (default %(default)s)")
    args.add_argument("-o", "--output", required=True, help="the spec to write (YAML)")
    args = args.parse_args(argv)
    discovery = json.loads(Path(args.discovery).read_text())
    dev = json.loads(Path(args.dev).read_text())
    for doc, name in ((discovery, args.discovery), (dev, args.dev)):
        if doc.get("contrast") != "gender-explicit" or any("at_first" not in r or r.get("cost") is None
                                                           for r in doc["rows"]):
            raise SystemExit(f"{name}: need a ranking with --contrast gender-explicit and --cost (steer ≥ this one)")
    a, b = kept(discovery["rows"], args.q), kept(dev["rows"], args.q)
    chosen = [r for k, r in a.items() if k in b and abs(r["cost"]) <= args.max_cost]  # cost: the same in both
    for path in args.guard:
        guard = {(r["site"], r["feature"]): r["attribution"] for r in json.loads(Path(path).read_text())["rows"]}
        chosen = [r for r in chosen if abs(guard.get((r["site"], r["feature"]), 0.0))
                  < args.guard_q * min(r["attribution"], b[(r["site"], r["feature"])]["attribution"])]
    sites = sorted({r["site"] for r in chosen}, key=lambda s: int(s.rsplit(".", 1)[1]))
    spec = {"name": "gender-occupation",
            "description": f"Scale {len(chosen)} attributed stereotype features at {len(sites)} depths to one factor.",
            "model": "smollm2-135m-instruct", "sae": [f"default:{s}" for s in sites],
            "edits": [{"scale": r["feature"], "factor": args.factor, "site": r["site"]} for r in chosen]}
    Path(args.output).write_text(yaml.safe_dump(spec, sort_keys=False))
    per_site = {s: sum(r["site"] == s for r in chosen) for s in sites}
    print(f"kept {len(chosen)} features ({', '.join(f'{s}: {n}' for s, n in per_site.items())}); "
          f"Σa discovery {sum(r['attribution'] for r in chosen):.3f} of {discovery['metric']:.3f}, "
          f"dev {sum(b[(r['site'], r['feature'])]['attribution'] for r in chosen):.3f} of {dev['metric']:.3f}; "
          f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
