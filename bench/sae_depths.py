"""Where the default model's residual stream changes with depth: how the shipped SAEs' sites were chosen.

    python bench/sae_depths.py [--model M] [--corpus broad] [--rows 64]

One full forward pass over ``rows`` 128-token rows of the corpus's training
split, then per block L (resid_post.L): the mean residual norm (raw, and
around the coordinate-wise median, since SmolLM2 has a few massive-activation
dimensions), the linear CKA between resid_post.L and the block before it (how
much the block changed the representation; 1 = a linear re-scaling), and the
logit-lens CE (final norm + unembedding applied at L: how far L is from the
output). Prints one row per block.

Measured (64 rows, broad corpus): CKA drops to 0.43 at block 2 and to 0.84/0.64
at blocks 9/10, stays >= 0.97 from 11 to 18; the lens CE peaks at 21.2 at
block 16 and falls from 19 on (20.0 at 18, 11.0 at 24, 5.9 at 28) while the
norm triples (189 at 17, 739 at 28): an early phase (0-2), a low-level plateau
(3-8), a mid-stack transition (9-10), an abstract plateau (11-18) and the
prediction phase (19-29). The shipped sites: 3 and 7 (the ends of the first
plateau), 10 (after the transition), 16 (the end of the abstract plateau,
furthest from the output); the prediction phase is not covered, its cost being
the reason (README "Shipped SAEs").
"""

from __future__ import annotations

import argparse

import torch

import steer
from steer.data.corpus import open_corpus, token_sequences


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(0), b - b.mean(0)
    return float((a.T @ b).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--corpus", default="broad")
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()

    model, tokenizer = steer.load_model(args.model)
    rows = []
    for row in token_sequences(open_corpus(args.corpus).documents("train", 0.05), tokenizer, 128):
        rows.append(row)
        if len(rows) == args.rows:
            break
    ids = torch.stack(rows)                                                        # (R, 128)
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states  # embeddings + blocks
        flat = [h[:, 1:].reshape(-1, h.shape[-1]).double() for h in hidden]       # position 0 left out
        labels = ids[:, 2:].reshape(-1)
        print(f"{'block':>5} {'norm':>8} {'norm-med':>9} {'CKA prev':>9} {'lens CE':>8}")
        for block in range(1, len(hidden)):
            x = flat[block]
            logits = model.lm_head(model.model.norm(hidden[block][:, 1:-1])).reshape(-1, model.config.vocab_size)
            ce = float(torch.nn.functional.cross_entropy(logits.float(), labels))
            centred = (x - x.median(0).values).norm(dim=1).mean()
            print(f"{block - 1:>5} {float(x.norm(dim=1).mean()):8.1f} {float(centred):9.1f} "
                  f"{linear_cka(flat[block - 1], x):9.3f} {ce:8.2f}")


if __name__ == "__main__":
    main()
