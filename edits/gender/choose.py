"""The worked example's feature selection (README "Worked example", step 2): attributed features that hold up.

Reads two or more `steer features attribute --contrast gender-explicit --json` rankings over the same shipped SAEs,
e.g. one on the discovery set (`edits/gender/discovery-occupations.yaml`: occupations and templates the suite does
not use) and one on `gender-occupation`'s dev half, and keeps a feature when, **in every one**:

- it carries the stereotype (``a > 0``) and touches the stated-gender target much less (``c < q·a``, ``--q``);
- it never fires at a prompt's first token (``at_first`` false: an edit of it would act at the attention sink);

and its estimated side effect on neutral text is small (``|Δloss| ≤ --max-cost`` nats/token, the ranking's
``cost``, measured on steer's calibration text, not on the BBC text that KL and perplexity are scored on); and,
per ``--guard`` ranking (a suite that must not move, e.g. `steer features attribute --suite age --split all`),
it carries much less of that suite's target than of the stereotype (``|a_guard| < --guard-q · a`` in every
ranking, attributions in the suites' own units). A guarded suite is then no longer an independent check of the
edit: it helped choose it.
Agreement across prompt sets is what removes the features that only name the dev occupations: a feature
ranked on the dev half alone lost most of its effect on held-out prompts (−45% dev, −16% held out).

Writes a spec that scales every kept feature by one ``--factor``, to be swept on dev (`steer sweep --param
edits[*].factor=...`) under the constraints. Run: ``python edits/gender/choose.py DISCOVERY.json DEV.json -o
SPEC.yaml`` (more rankings after the first two: each must agree too). The rankings may be taken on an edited
model (``steer features attribute --under SPEC``, or ``--model`` its exported merged weights): the features then
carry what that edit leaves, and ``--base SPEC`` writes them after that edit's own (README, step 7).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def kept(rows: list[dict], q: float) -> dict[tuple[str, int], dict]:
    return {(r["site"], r["feature"]): r for r in rows
            if r["attribution"] > 0 and r["contrast"] < q * r["attribution"] and not r["at_first"]}


def with_base(spec: dict, base_path: str, out_dir: Path) -> dict:
    """``spec`` with the edits of the spec file ``base_path`` first; their direction files re-pointed from the
    written spec's directory, its SAEs after the base's own. A feature the base already edits at the same site is
    left out: edits at one site add their deltas, so a second ``scale`` of it would not set its factor."""
    from steer.evaluate.tune import relocate
    from steer.spec.yaml_io import edit_to_dict, load_spec_file

    base = relocate(load_spec_file(base_path), out_dir)  # its local files, re-pointed from the written spec
    edits = []
    for edit in base.edits:
        entry = edit_to_dict(edit)
        if edit.site is None and base.site is not None:  # the base's defaults, written out on its own edits
            entry["site"] = base.site
        if base.scope_of(edit) != "all":
            entry["scope"] = base.scope_of(edit)
        edits.append(entry)
    saes = list(base.sae) + [s for s in spec["sae"] if s not in base.sae]
    edited = {(e.site or base.site, e.feature) for e in base.edits if e.feature is not None}
    added = [e for e in spec["edits"] if (e["site"], e["scale"]) not in edited]
    if len(added) < len(spec["edits"]):
        print(f"left out {len(spec['edits']) - len(added)} features the base already edits")
    if not added:
        raise SystemExit("every chosen feature is already edited by the base spec: nothing to add")
    first = (base.description or base.name or "the base edit").rstrip(".")
    return {**spec, "description": f"{first}; then scale {len(added)} attributed stereotype features to one factor.",
            "sae": saes, "edits": edits + added}


def main(argv=None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("rankings", nargs="+", metavar="RANKING",
                      help="attribution JSONs, at least two (e.g. the discovery set, then gender-occupation's dev half)")
    args.add_argument("--q", type=float, default=0.5, help="keep c < q·a in every ranking (default %(default)s)")
    args.add_argument("--max-cost", type=float, default=0.001,
                      help="keep |Δloss| ≤ this (nats/token, default %(default)s)")
    args.add_argument("--guard", action="append", default=[], metavar="JSON",
                      help="an attribution JSON of a suite that must not move; repeatable")
    args.add_argument("--guard-q", type=float, default=0.5,
                      help="keep |a_guard| < this × a in every ranking (default %(default)s)")
    args.add_argument("--factor", type=float, default=0.0, help="the scale factor written (default %(default)s)")
    args.add_argument("--base", metavar="SPEC",
                      help="the edit the rankings were taken under (attribute --under SPEC): its edits come first "
                           "in the written spec, the features' after (sweep them with edits[N:].factor)")
    args.add_argument("-o", "--output", required=True, help="the spec to write (YAML)")
    args = args.parse_args(argv)
    if len(args.rankings) < 2:
        raise SystemExit("give at least two rankings: agreement across prompt sets is what this choice rests on")
    docs = [json.loads(Path(path).read_text()) for path in args.rankings]
    for doc, name in zip(docs, args.rankings):
        if doc.get("contrast") != "gender-explicit" or any("at_first" not in r or r.get("cost") is None
                                                           for r in doc["rows"]):
            raise SystemExit(f"{name}: need a ranking with --contrast gender-explicit and --cost (steer ≥ this one)")
    kept_in = [kept(doc["rows"], args.q) for doc in docs]
    first = kept_in[0]
    chosen = [r for k, r in first.items()
              if all(k in other for other in kept_in[1:]) and abs(r["cost"]) <= args.max_cost]  # cost: the same in all
    for path in args.guard:
        guard = {(r["site"], r["feature"]): r["attribution"] for r in json.loads(Path(path).read_text())["rows"]}
        chosen = [r for r in chosen if abs(guard.get((r["site"], r["feature"]), 0.0))
                  < args.guard_q * min(k[(r["site"], r["feature"])]["attribution"] for k in kept_in)]
    sites = sorted({r["site"] for r in chosen}, key=lambda s: int(s.rsplit(".", 1)[1]))
    spec = {"name": "gender-occupation",
            "description": f"Scale {len(chosen)} attributed stereotype features at {len(sites)} depths to one factor.",
            "model": "smollm2-135m-instruct", "sae": [f"default:{s}" for s in sites],
            "edits": [{"scale": r["feature"], "factor": args.factor, "site": r["site"]} for r in chosen]}
    if args.base:
        spec = with_base(spec, args.base, Path(args.output).parent)
    Path(args.output).write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    per_site = {s: sum(r["site"] == s for r in chosen) for s in sites}
    print(f"kept {len(chosen)} features ({', '.join(f'{s}: {n}' for s, n in per_site.items())}); "
          "Σa " + ", ".join(f"{Path(path).stem} {sum(k[(r['site'], r['feature'])]['attribution'] for r in chosen):.3f}"
                           f" of {doc['metric']:.3f}" for path, doc, k in zip(args.rankings, docs, kept_in))
          + f"; wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
