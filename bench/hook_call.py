"""Cost of one site-hook call at a decode step, batch 1: steer's grouped hook vs the per-edit loop it replaced.

Prints µs per call of `SiteHook.on_output` at ``(1, 1, 576)`` (SmolLM2-135M's width) for 4, 16 and 64 edits
at one site, for two edit mixes:

* ``suppress`` — "suppress feature i by 80%" × E (the mix bench/hooks.py generates with);
* ``mixed``    — scale, clamp, add, project_out and cap in turn, every third with a ``when`` condition and
  every fourth scoped to generation tokens.

and, beside each, the same call through ``loop_coefficients`` — written out here: the per-edit Python loop
steer's hook ran before it was grouped by operation (one coefficient, ``where`` and column write per edit).
Both are checked to give the same delta first. The SAE is a random ReLU SAE of width 4096 (the plan slices
it to the edited features, as steer does); the model a 1-layer Llama of width 576, since only the hook runs.

Method: best of 5 blocks of calls after a warm-up (the least-disturbed estimate on a shared machine), with
torch's thread count set by ``--threads`` (default 1: a decode step's hook is far too small for two).
Targets (issue 12): ≤ 25 µs for 4 suppress edits, and 64 edits within 2× of 4 edits of the same mix.

Run: ``python bench/hook_call.py``. Measures only; writes nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

import steer
from steer.lower.hooks import SiteHook, SteeringRun
from steer.ops import OPERATIONS
from steer.sae import SAE

D, D_SAE = 576, 4096


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def sae() -> SAE:
    g = torch.Generator().manual_seed(1)
    return SAE(W_enc=torch.randn(D, D_SAE, generator=g) / D**0.5, W_dec=torch.randn(D_SAE, D, generator=g) / D**0.5,
               b_enc=0.1 * torch.randn(D_SAE, generator=g), b_dec=0.1 * torch.randn(D, generator=g),
               architecture="relu", site="resid_post.0")


def spec(mix: str, n: int, directions: str) -> str:
    if mix == "suppress":
        return "; ".join(f"suppress feature {7 * i} by 80%" for i in range(n))
    lines = []
    for i in range(n):
        kind = i % 5
        line = [f"scale feature {7 * i} by 0.5", f"clamp feature {7 * i} to 1.5", f"add feature {7 * i} by 2",
                f"project out direction {directions}:v{i % 4}", f"cap direction {directions}:v{i % 4} at 0.5"][kind]
        if i % 3 == 2 and kind in (0, 1, 2):
            line += f" when feature {7 * i + 1} above 0.1"
        if i % 4 == 3:
            line += " scope generation"
        lines.append(line)
    return "; ".join(lines)


def loop_coefficients(hook: SiteHook, x: torch.Tensor) -> torch.Tensor:
    """The per-edit loop steer's hook ran before (in the grouped hook's column order), written out here."""
    f = sigma = proj = None
    x_norm, _, sigma = hook.sae.normalize(x)
    f = hook.sae.activate(hook.sae.pre_activation(x_norm))
    if hook.directions is not None:
        proj = x @ hook.directions
    if isinstance(sigma, torch.Tensor):
        sigma = sigma[..., 0]
    generated = hook.run.positions >= hook.run.prompt_length
    C = x.new_zeros(x.shape[:-1] + (len(hook.writers),))
    for j, e in enumerate(hook.writers):
        op = OPERATIONS[e.op]
        read = f[..., e.read_slot] if op.reads == "feature" else proj[..., e.read_slot] if op.reads == "projection" else None
        c = op.coefficient(e.amount, read, sigma)
        if e.when_slot is not None:
            c = torch.where(f[..., e.when_slot] > e.when_above, c, 0.0)
        if e.scope != "all":
            c = torch.where(generated if e.scope == "generation" else ~generated, c, 0.0)
        C[..., j] = c
    return C


def per_call_us(fn, x, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(100):
            fn(x)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                fn(x)
            best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    m, dictionary = model(), sae()
    with tempfile.TemporaryDirectory() as tmp:
        directions = str(Path(tmp) / "dirs.safetensors")
        save_file({f"v{k}": torch.randn(D, generator=torch.Generator().manual_seed(10 + k)) for k in range(4)}, directions)
        print(f"one hook call at (1,1,{D}), relu SAE width {D_SAE}, torch {torch.__version__}, {args.threads} thread(s)")
        print(f"{'mix':<9} {'edits':>5} {'grouped µs':>11} {'loop µs':>9} {'loop/grouped':>13}")
        results = {}
        for mix in ("suppress", "mixed"):
            for n in (4, 16, 64):
                plan = steer.compile(spec(mix, n, directions), m, dictionary)
                site = plan.sites[0]
                run = SteeringRun(plan, prompt_length=10)
                run.positions = torch.tensor([12])  # a decode step past the prompt
                hook = SiteHook(site, run, torch.float32, torch.device("cpu"))
                x = torch.randn(1, 1, D)
                write = torch.stack([e.write for e in hook.writers])  # (E, d), as the loop used them
                with torch.no_grad():
                    grouped = hook.delta(x)
                    looped = loop_coefficients(hook, x) @ write
                torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-5)
                new = per_call_us(lambda v: hook.on_output(None, (), v), x, args.repeats)
                old = per_call_us(lambda v: v + loop_coefficients(hook, v) @ write, x, args.repeats)
                results[mix, n] = new
                print(f"{mix:<9} {n:>5} {new:>11.1f} {old:>9.1f} {old / new:>12.2f}x")
    four = results["suppress", 4]
    ratios = {mix: results[mix, 64] / results[mix, 4] for mix in ("suppress", "mixed")}
    print(f"targets: 4 suppress edits {four:.1f} µs (≤ 25: {'met' if four <= 25 else 'MISSED'}); 64 edits / 4 edits of "
          f"the same mix: suppress {ratios['suppress']:.2f}×, mixed {ratios['mixed']:.2f}× (≤ 2×: "
          f"{'met' if max(ratios.values()) <= 2 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
