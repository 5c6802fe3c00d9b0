"""Per-feature statistics of an SAE over activations: density, max, and p99 where the feature fires.

``p99`` is the 99th percentile (nearest rank) of a feature's activation over the
tokens where it is positive — what `feature` strength units mean in
`steer.plan.compile`. A feature that never fires gets density 0, max 0, p99 0.
Also the reconstruction metrics the trainer and ``steer sae eval`` report
(FVU, L0) from the same pass. Never changes the SAE.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from steer.sae import SAE

P99 = 0.99


@torch.no_grad()
def feature_statistics(sae: SAE, batches: Iterable[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``(feature_stats, metrics)`` over activation batches ``(n, d_in)``.

    feature_stats: ``density``, ``max``, ``p99`` (each ``[d_sae]``, float32).
    metrics: ``fvu`` (squared error over variance around the sample mean),
    ``l0`` (mean active features per token), ``dead_fraction`` (never fired),
    ``tokens``.
    """
    fired_features: list[torch.Tensor] = []
    fired_values: list[torch.Tensor] = []
    tokens = 0
    error = 0.0
    sum_x = None
    sum_sq = 0.0
    for x in batches:
        x = x.to(sae.dtype)
        f = sae.encode(x)                                       # (n, d_sae)
        x_hat = sae.decode(f)
        error += float((x - x_hat).double().pow(2).sum())
        sum_sq += float(x.double().pow(2).sum())
        sum_x = x.double().sum(0) if sum_x is None else sum_x + x.double().sum(0)
        tokens += x.shape[0]
        rows, features = torch.nonzero(f > 0, as_tuple=True)
        fired_features.append(features)
        fired_values.append(f[rows, features].float())
    if tokens == 0:
        raise ValueError("feature_statistics needs at least one activation")
    features = torch.cat(fired_features)
    values = torch.cat(fired_values)
    counts = torch.bincount(features, minlength=sae.d_sae)
    maxima = torch.zeros(sae.d_sae).scatter_reduce(0, features, values, reduce="amax", include_self=True)
    stats = {"density": counts.float() / tokens, "max": maxima, "p99": p99_by_feature(features, values, counts)}
    variance = sum_sq - float(sum_x.pow(2).sum()) / tokens
    metrics = {
        "fvu": error / max(variance, 1e-12),
        "l0": float(counts.sum()) / tokens,
        "dead_fraction": float((counts == 0).float().mean()),
        "tokens": tokens,
    }
    return stats, metrics


def p99_by_feature(features: torch.Tensor, values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Nearest-rank 99th percentile of each feature's values (0 where it has none)."""
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(features[order], stable=True)]  # by feature, then by value
    sorted_values = values[order]
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    rank = (torch.ceil(P99 * counts.double()).long() - 1).clamp(min=0)
    p99 = torch.zeros(counts.shape[0])
    has = counts > 0
    p99[has] = sorted_values[(starts + rank)[has]]
    return p99
