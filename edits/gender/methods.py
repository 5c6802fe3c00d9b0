"""The worked example's comparison of methods (README "Worked example"), chosen on dev, reported held out.

Every method is fitted and tuned without the **held-out** halves of `gender-occupation` and `gender-explicit`
(on their dev halves; (b) also on a discovery set that shares nothing with the suite, with the `age` suite as a
guard), then measured once on those held-out halves, with the same neutral text (KL, perplexity) and the held-out halves
of the `age` and `capability` suites as side-effect checks (a fit or choice may guard their dev halves only):

(a) one SAE feature (`--single`: a spec with one `project_out` of a feature, e.g. the top attributed one);
(b) the attributed multi-site SAE edit (`--spec`: `edits/gender/features.yaml`, chosen by
    `edits/gender/choose.py` and a dev sweep of its factor);
(c) abliteration-style: the mean difference of last-token activations at one site, female-typed minus
    male-typed occupation prompts (dev), projected out of every writer (`site writers`: exact in weights);
(c⊥) the same direction made orthogonal to the explicit-gender direction (explicitly female minus male
    subjects, gender-explicit dev) before it is projected out: only the part of the stereotype direction
    that the stated-gender signal does not share;
(d) LEACE (EleutherAI's `concept-erasure`, `pip install concept-erasure --no-deps`) at one site, fitted on
    the dev prompts' last-token activations with the occupation's typing as the concept, applied at every
    position by a forward hook (an affine map: no steer artifact);
(e) a learned erasure (`--erasure`, repeatable: a spec `steer features erase` wrote, or
    `edits/gender/erasure.yaml`, row (e'')): directions fitted by gradient descent so that removing them from every
    write makes each template's pronoun gap the same for every occupation of the fitting sets (the dev half,
    the discovery set, `edits/gender/fit-occupations.yaml`), keeping the dev gender-explicit margins and, with
    `--hold`, the dev halves of age and capability (exact in weights);
(f) an erasure plus SAE features attributed on what it leaves (`--combined`: `choose.py --base` wrote it; the
    shipped `edits/gender-occupation.yaml`; exact as hooks and as a pack).

Prints one markdown table. Run: ``python edits/gender/methods.py [--spec FILE] [--single FILE] [--site L]``
(about 10 minutes on 2 cores). Writes the fitted directions to ``--out`` (default out/gender-methods/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import steer
from steer.evaluate.report import evaluate, measure_baseline
from steer.evaluate.suites import load_suite
from steer.models.adapters import adapter_for
from steer.models.capture import capture

SUITES = ("gender-occupation", "gender-explicit", "age", "capability")


def last_token_activations(model, tokenizer, texts: list[str], site: str) -> torch.Tensor:
    """(N, d) activations at ``site`` of each text's last token (no chat template, as the suites score)."""
    parsed = adapter_for(model).parse_site(site, model)
    rows = []
    with torch.no_grad(), capture(model, [parsed]) as acts:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
            model(ids)
            rows.append(acts[parsed].pop()[0, -1].double().cpu())
    return torch.stack(rows)


def stereotype_data(model, tokenizer, site: str):
    """Dev gender-occupation prompts: activations and z = 1 for occupations mostly held by women."""
    share = {p: next(n for f, _, n in p.data if f == "share_women") for p in load_suite("gender-occupation").select("dev")}
    prompts = [p for p, n in share.items() if n != 50]
    x = last_token_activations(model, tokenizer, [p.text for p in prompts], site)
    z = torch.tensor([float(share[p] > 50) for p in prompts], dtype=torch.float64)
    return x, z


def explicit_direction(model, tokenizer, site: str) -> torch.Tensor:
    prompts = load_suite("gender-explicit").select("dev")
    female = [p.text for p in prompts if p.expect == "female"]
    male = [p.text for p in prompts if p.expect == "male"]
    return (last_token_activations(model, tokenizer, female, site).mean(0)
            - last_token_activations(model, tokenizer, male, site).mean(0))


class Leace:
    """A fitted LEACE eraser applied to one site's output at every position, as a forward hook."""

    def __init__(self, model, site: str, x: torch.Tensor, z: torch.Tensor):
        from concept_erasure import LeaceFitter

        fitter = LeaceFitter(x.shape[1], 1, dtype=torch.float64)
        fitter.update(x, z[:, None])
        self.eraser = fitter.eraser
        self.module = model.get_submodule(adapter_for(model).layers)[adapter_for(model).parse_site(site, model).layer]

    def __enter__(self):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            erased = self.eraser(hidden.double()).to(hidden.dtype)
            return (erased, *output[1:]) if isinstance(output, tuple) else erased
        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def row(name: str, report, lower_is_better=("gender-occupation", "age")) -> dict:
    cells = {"method": name, "KL": report.neutral.kl_mean, "ppl %": report.neutral.ppl_change_pct}
    for s in report.suites:
        base, steered = s.base.score, s.steered.score
        cells[s.name] = (base, steered, s.change_pct)
    return cells


def main(argv=None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--spec", help="(b): the multi-site SAE spec steer tune chose on dev")
    args.add_argument("--single", help="(a): a one-feature spec")
    args.add_argument("--erasure", action="append", default=[],
                      help="(e): a learned-erasure spec (steer features erase wrote it); repeat for several rows")
    args.add_argument("--combined", action="append", default=[],
                      help="(f): an erasure plus the features attributed on what it leaves (choose.py --base wrote "
                           "it; the shipped edits/gender-occupation.yaml); repeatable")
    args.add_argument("--site", default="resid_post.10", help="where (c), (c⊥) and (d) read their directions")
    args.add_argument("--split", default="held_out")
    args.add_argument("--out", default="out/gender-methods")
    args.add_argument("--methods", default="a,b,c,c⊥,d,e,f", help="which rows to measure (default all: a,b,c,c⊥,d,e,f)")
    args = args.parse_args(argv)
    for path in filter(None, [args.single, args.spec, *args.erasure, *args.combined]):
        steer.parse_spec(path)  # every spec is read before minutes of measuring, so a bad one fails at once
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = steer.load_model("smollm2-135m-instruct")
    baseline = measure_baseline(model, tokenizer)
    suites = [load_suite(s) for s in SUITES]
    for s in suites:  # cache the base scores before any hook is installed
        baseline.suite(model, tokenizer, s, args.split)

    x, z = stereotype_data(model, tokenizer, args.site)
    stereotype = x[z == 1].mean(0) - x[z == 0].mean(0)
    explicit = explicit_direction(model, tokenizer, args.site)
    e = explicit / explicit.norm()
    orthogonal = stereotype - (stereotype @ e) * e
    cosine = float(stereotype @ e / stereotype.norm())
    save_file({"stereotype": stereotype.float(), "explicit": explicit.float(), "orthogonal": orthogonal.float()},
              str(out / "directions.safetensors"))
    print(f"at {args.site}: cos(stereotype, explicit-gender direction) = {cosine:.3f}; "
          f"the orthogonal part keeps {float(orthogonal.norm() / stereotype.norm()):.2f} of the norm")

    rows = []

    def run(name, plan=None):
        report = evaluate(plan, model, tokenizer, suites, baseline=baseline, split=args.split, subject=name,
                          steered_model=None if plan is not None else model)
        rows.append(row(name, report))
        print(json.dumps({k: v for k, v in rows[-1].items()}, default=str), flush=True)

    directions = out / "directions.safetensors"
    wanted = set(args.methods.split(","))
    for key, label, spec in (("a", "(a) one SAE feature", args.single), ("b", "(b) attributed multi-site SAE edit", args.spec),
                             *(("e", f"(e) learned erasure, out of all writers: {path}", path) for path in args.erasure),
                             *(("f", f"(f) erasure + features attributed on what it leaves: {path}", path)
                               for path in args.combined)):
        if spec and key in wanted:
            run(label, steer.compile(steer.parse_spec(spec), model, tokenizer=tokenizer))
    if "c" in wanted:
        run("(c) mean-difference, out of all writers",
            steer.compile(f"project out direction {directions}:stereotype site writers", model, tokenizer=tokenizer))
    if "c⊥" in wanted:
        run("(c⊥) its part ⟂ explicit gender, out of all writers",
            steer.compile(f"project out direction {directions}:orthogonal site writers", model, tokenizer=tokenizer))
    if "d" in wanted:
        try:
            with Leace(model, args.site, x, z):
                run(f"(d) LEACE at {args.site}")
        except ImportError:
            print("(d) skipped: concept-erasure is not installed (pip install concept-erasure --no-deps)")

    print(f"\n| method ({args.split}) | stereotype (base → edited) | gender-explicit accuracy | KL | perplexity "
          "| age mean abs gap | capability |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        g, x_, a, c = (r[s] for s in SUITES)
        print(f"| {r['method']} | {g[0]:.3f} → {g[1]:.3f} ({g[2]:+.0f}%) | {x_[1]:.1%} ({100 * x_[1] / x_[0]:.0f}% of "
              f"base {x_[0]:.1%}) | {r['KL']:.4f} | {r['ppl %']:+.2f}% | {a[2]:+.1f}% | {c[2]:+.1f}% |")
    return 0


if __name__ == "__main__":
    from steer.errors import SteerError

    try:
        raise SystemExit(main())
    except SteerError as exc:
        raise SystemExit(f"error: {exc}") from None
