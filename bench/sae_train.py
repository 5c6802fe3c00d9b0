"""SAE training throughput (tokens/s) with and without the activation cache, and where the time goes.

    python bench/sae_train.py [--model M] [--site S] [--width W] [--k K] [--tokens N] [--epochs E] [--threads T]
    python bench/sae_train.py --sites resid_post.3,resid_post.7,resid_post.10,resid_post.16 [--tokens N]

With ``--sites`` (a multi-site run, `steer.train.train_saes`) it prints instead
the **multi-site training tokens/s** — N distinct tokens over (one model pass
reading every site + one SAE pass per site, as the recipe's one epoch) — against
the **bare model pass to the deepest site** (`SiteReader` alone, nothing
stored), and their ratio (the issue's target: ≥ 0.8).

Measures, on the real trainer's parts:
- the **model**: `SiteReader` passes (the model run only up to the site) over N
  corpus tokens → model tokens/s;
- the **SAE**: `train_sae` on those N cached activations, timed over its steps
  (no model, no set-up) → SAE tokens/s;
and prints
- streaming (no cache, ``epochs: 1``): every token costs a model pass and a step;
- cached (``epochs: E``): one model pass per distinct token, E steps per token;
- the fraction of the time spent in the model vs the SAE in each case.

Timings on a shared 2-core machine are noisy; the ratios are what to read.
On a loaded machine, set ``OMP_WAIT_POLICY=PASSIVE``: OpenMP's spinning
threads otherwise make small tensor ops 10-100x slower.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import steer
from steer.data.corpus import open_corpus, token_sequences
from steer.models.adapters import adapter_for
from steer.train import TrainConfig, train_sae
from steer.train.activations import SiteReader, stream_activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--site", default="resid_post.10")
    parser.add_argument("--corpus", default="default")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=24576, help="distinct tokens to time (default 24576)")
    parser.add_argument("--epochs", type=int, default=6, help="passes over the cache in the cached case (default 6)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (on a busy shared machine, try 1)")
    parser.add_argument("--sites", default=None, help="comma-separated sites: time a multi-site run (see above)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sites:
        multi_site(args)
        return

    model, tokenizer = steer.load_model(args.model)
    site = adapter_for(model).parse_site(args.site, model)
    reader = SiteReader(model, site)
    rows = token_sequences(open_corpus(args.corpus).documents("train", 0.05), tokenizer, 128)

    reader(next(iter(token_sequences(open_corpus(args.corpus).documents("train", 0.05), tokenizer, 128)))[None])  # warm-up
    start = time.perf_counter()
    chunks, n = [], 0
    for acts, _ in stream_activations(rows, reader, model_batch_size=16, skip_first=1):
        chunks.append(acts)
        n += acts.shape[0]
        if n >= args.tokens:
            break
    model_time = time.perf_counter() - start
    activations = torch.cat(chunks)
    model_rate = n / model_time

    config = TrainConfig(model=args.model, site=args.site, width=args.width, k=args.k, batch_size=args.batch_size,
                         tokens=(n // args.batch_size) * args.batch_size, stats_tokens=args.batch_size, device="cpu",
                         checkpoint_every=10**9)
    step_times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:  # steps only: timed from the end of step 1 to the end of the last
        train_sae(config, f"{tmp}/sae", activations=activations, progress=False,
                  callback=lambda info: step_times.append(time.perf_counter()))
    sae_rate = (len(step_times) - 1) * args.batch_size / (step_times[-1] - step_times[0])

    per_token_model, per_token_sae = 1 / model_rate, 1 / sae_rate
    streaming = 1 / (per_token_model + per_token_sae)
    e = args.epochs
    cached = e / (per_token_model + e * per_token_sae)
    print(f"model {args.model} to {site}, SAE width {args.width} k {args.k}, batch {args.batch_size}, "
          f"{n:,} distinct tokens, {torch.get_num_threads()} threads")
    print(f"  model pass (to the site)      {model_rate:10.0f} tok/s")
    print(f"  SAE steps (from activations)  {sae_rate:10.0f} tok/s")
    print(f"  streaming, no cache           {streaming:10.0f} tok/s trained   "
          f"model {100 * per_token_model / (per_token_model + per_token_sae):.0f}% / SAE "
          f"{100 * per_token_sae / (per_token_model + per_token_sae):.0f}% of the time")
    print(f"  cached, {e} epochs             {cached:10.0f} tok/s trained   "
          f"model {100 * per_token_model / (per_token_model + e * per_token_sae):.0f}% / SAE "
          f"{100 * e * per_token_sae / (per_token_model + e * per_token_sae):.0f}% of the time   "
          f"(×{cached / streaming:.1f} vs streaming; epochs after the first: {sae_rate:.0f} tok/s)")


def _rows(corpus: str, tokenizer, n: int) -> list[torch.Tensor]:
    rows = []
    for row in token_sequences(open_corpus(corpus).documents("train", 0.05), tokenizer, 128):
        rows.append(row)
        if len(rows) * 127 >= n:
            return rows
    return rows


def _sae_seconds(activations: torch.Tensor, args, model_name: str, site: str) -> float:
    """Seconds for one pass of SAE steps over ``activations`` (timed from the end of step 1, scaled to all steps)."""
    steps = activations.shape[0] // args.batch_size
    config = TrainConfig(model=model_name, site=site, width=args.width, k=args.k, batch_size=args.batch_size,
                         tokens=steps * args.batch_size, stats_tokens=args.batch_size, device="cpu",
                         checkpoint_every=10**9)
    times: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        train_sae(config, f"{tmp}/sae", activations=activations, progress=False,
                  callback=lambda info: times.append(time.perf_counter()))
    return (times[-1] - times[0]) * steps / (len(times) - 1)


def multi_site(args) -> None:
    from steer.train.activations import ActivationCache, SitesReader, depth

    model, tokenizer = steer.load_model(args.model)
    adapter = adapter_for(model)
    sites = [adapter.parse_site(name, model) for name in args.sites.split(",")]
    deepest = max(sites, key=depth)
    rows = _rows(args.corpus, tokenizer, args.tokens)
    bare, every = SiteReader(model, deepest), SitesReader(model, sites)
    bare(rows[0][None])  # warm-up

    start = time.perf_counter()
    n = sum(acts.shape[0] for acts, _ in stream_activations(rows, bare, model_batch_size=16, skip_first=1))
    bare_time = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:  # the multi-site pass, writing the float16 caches as a run does
        caches = {s: ActivationCache(f"{tmp}/{s}.npy", n, model.config.hidden_size, dtype="float16") for s in sites}
        start = time.perf_counter()
        for acts, consumed in stream_activations(rows, every, model_batch_size=16, skip_first=1):
            for s in sites:
                caches[s].append(acts[s], consumed)
        for cache in caches.values():
            cache.flush()
        pass_time = time.perf_counter() - start
        activations = {s: torch.from_numpy(caches[s].array[: caches[s].filled]).float() for s in sites}
    sae_times = {s: _sae_seconds(activations[s], args, args.model, str(s)) for s in sites}

    total = pass_time + sum(sae_times.values())
    print(f"model {args.model}, sites {', '.join(map(str, sites))} (deepest {deepest}), SAE width {args.width} k "
          f"{args.k}, batch {args.batch_size}, {n:,} distinct tokens, one SAE pass each, {torch.get_num_threads()} threads")
    print(f"  bare model pass to {deepest}          {n / bare_time:8.0f} tok/s")
    print(f"  model pass reading all {len(sites)} sites     {n / pass_time:8.0f} tok/s (with the float16 cache writes)")
    for s, t in sae_times.items():
        print(f"  SAE steps at {str(s):<18}      {n / t:8.0f} tok/s")
    print(f"  multi-site training                {n / total:8.0f} tok/s = {bare_time / total:.2f} x the bare pass "
          f"(target >= 0.8); model {100 * pass_time / total:.0f}% / SAEs {100 * (total - pass_time) / total:.0f}% "
          f"of the time")


if __name__ == "__main__":
    main()
