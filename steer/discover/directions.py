"""Steering directions from contrasting prompt sets (mean difference, as ActAdd/CAA/repeng).

``mean_difference(model, tok, positive, negative, site)`` is the mean activation
at ``site`` over the positive texts' tokens minus that over the negative texts'
tokens (each text's first token, an attention sink, left out). The result is a
raw vector in the model's activation space; use it with ``add``/``steer``
(``units: norm`` makes its strength comparable across models) or
``project_out``. Never changes the model.
"""

from __future__ import annotations

import torch

from steer.models.adapters import adapter_for
from steer.models.capture import capture


def mean_activation(model, tokenizer, texts: list[str], site) -> torch.Tensor:
    adapter = adapter_for(model)
    site = adapter.parse_site(str(site), model)
    total, count = None, 0
    with torch.no_grad(), capture(model, [site]) as acts:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
            model(ids)
            tokens = acts[site].pop()[0, 1:].double()  # (T-1, d)
            total = tokens.sum(0) if total is None else total + tokens.sum(0)
            count += tokens.shape[0]
    return (total / count).float().cpu()


def mean_difference(model, tokenizer, positive: list[str], negative: list[str], site) -> torch.Tensor:
    return mean_activation(model, tokenizer, positive, site) - mean_activation(model, tokenizer, negative, site)
