"""SAE training throughput (tokens/s) with and without the activation cache, and where the time goes.

    python bench/sae_train.py [--model M] [--site S] [--width W] [--k K] [--tokens N] [--epochs E] [--threads T]

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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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


if __name__ == "__main__":
    main()
