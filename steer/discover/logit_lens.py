"""Which output tokens a feature's decoder direction promotes and suppresses (the logit lens on ``W_dec``).

For feature i with decoder row ``d_i`` the score of token t is

    logit_t(d_i) = W_U[t] · (g ⊙ c(d_i))

where ``W_U`` is the unembedding (``lm_head``), ``g`` the final norm's
elementwise gain (RMSNorm's ``weight``; Gemma's ``1 + weight``; LayerNorm's
``weight``) and ``c`` centres the direction when the final norm is a LayerNorm
(GPT-2, NeoX subtract the mean before scaling; RMSNorm does not).

Why the gain and not the whole norm: the final norm divides every token's
stream by its own RMS, a positive scalar that depends on the token, not on the
feature — it changes no ranking, so it is left out, and a score reads as "logit
change per unit of the direction, before the token's 1/RMS". The gain, in
contrast, re-weights coordinates differently for every direction (SmolLM2's
final-norm weights range over an order of magnitude), so leaving it out would
rank tokens by a product the model never computes. (Arad et al. 2025 apply the
full norm to ``W_dec``; with RMSNorm that gives the same ranking as this.) The
norm's bias (LayerNorm) is the same for every feature and is left out too.

Never changes the model or the SAE.
"""

from __future__ import annotations

import torch
from torch import nn

from steer.models.adapters import adapter_for, hidden_size

CHUNK = 256
"""Features per matmul: ``CHUNK × vocab`` floats at a time, not ``d_sae × vocab``."""


def final_norm_gain(model: nn.Module) -> tuple[torch.Tensor, bool]:
    """``(g [d], centres)``: the final norm's elementwise gain, and whether it subtracts the mean first.

    The gain is measured by running the norm itself on ``±v`` with ``v`` of mean
    0 (alternating ±1): any ``norm(x) = g ⊙ c(x) / rms(c(x)) + b`` gives
    ``(norm(v) − norm(−v)) / 2 = g ⊙ v / rms(v)`` — so RMSNorm, Gemma's
    ``1 + weight`` and LayerNorm are all read the same way, without knowing
    their classes. An odd ``d`` needs a second probe (``v`` rolled by one) for
    the coordinate the first leaves at 0. Centring is LayerNorm's.
    """
    norm = model.get_submodule(adapter_for(model).final_norm)
    param = next(model.parameters())
    d = hidden_size(model)
    v = torch.ones(d, dtype=torch.float64)
    v[1::2] = -1.0
    if d % 2:
        v[-1] = 0.0
    probes = [v] if d % 2 == 0 else [v, v.roll(1)]
    gain = torch.zeros(d, dtype=torch.float64)
    with torch.no_grad():
        for probe in probes:
            x = torch.stack([probe, -probe]).to(dtype=param.dtype, device=param.device)    # (2, d)
            plus, minus = norm(x).double().cpu()
            rms = probe.pow(2).mean().sqrt()
            nonzero = probe != 0
            gain[nonzero] = ((plus - minus) / 2 * rms / probe.where(nonzero, 1.0))[nonzero]
    return gain.float(), isinstance(norm, nn.LayerNorm)


def unembedding(model: nn.Module) -> torch.Tensor:
    """``W_U [vocab, d]`` (the lm_head weight; tied or not)."""
    return model.get_submodule(adapter_for(model).unembedding).weight


@torch.no_grad()
def logit_lens(model: nn.Module, directions: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` promoted and suppressed tokens of each direction ``[n, d]``.

    Returns ``(promoted_ids, promoted_values, suppressed_ids, suppressed_values)``,
    each ``[n, k]``, values in logits per unit of direction (see the module
    docstring); promoted descending, suppressed ascending (most negative first).
    """
    gain, centres = final_norm_gain(model)
    W_U = unembedding(model).detach().float().cpu()          # (V, d)
    k = min(k, W_U.shape[0])
    outputs: list[list[torch.Tensor]] = [[], [], [], []]
    for start in range(0, directions.shape[0], CHUNK):
        d = directions[start : start + CHUNK].detach().float().cpu()   # (c, d)
        if centres:
            d = d - d.mean(dim=-1, keepdim=True)
        logits = (d * gain) @ W_U.T                                   # (c, V)
        top = logits.topk(k, dim=-1)
        bottom = logits.topk(k, dim=-1, largest=False)
        for bucket, tensor in zip(outputs, (top.indices, top.values, bottom.indices, bottom.values)):
            bucket.append(tensor)
    empty = (torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k))
    return tuple(torch.cat(b) if b else empty[i % 2] for i, b in enumerate(outputs))  # type: ignore[return-value]


def token_text(tokenizer, token_id: int) -> str:
    """One token as text, as it reads inside a decoded string (a leading space kept)."""
    return tokenizer.decode([int(token_id)])
