"""The trainable TopK / BatchTopK autoencoder, and its conversion to a `steer.sae.SAE`.

Math (Gao et al. 2024; Bussmann et al. 2024 for BatchTopK), on inputs already
scaled by the trainer (``x̃ = x·c``)::

    pre = relu((x̃ - b_dec) W_enc + b_enc)                  # (B, W)
    topk:      keep the k largest of each row                 # (B, k) values + indices
    batchtopk: keep the k·B largest of the whole batch
    x̂ = Σ_kept f_i · W_dec[i] + b_dec                         # sparse decode (embedding_bag)
    loss = FVU(x̂, x̃) + auxk_alpha · AuxK

AuxK: the residual ``e = x̃ - x̂`` is reconstructed from the ``d_in/2`` largest
pre-activations of the *dead* features only, its FVU scaled by
``min(1, n_dead / k_aux)``; it gives dead features a gradient.

Decoder rows are kept at unit norm: the gradient component along each row is
removed before the optimizer step and the rows are renormalised after it.

`to_sae` folds the input scale back out (decoder rows stay unit-norm, feature
activations come out in the model's units): a topk SAE stays SAELens ``topk``;
a batchtopk SAE becomes ``jumprelu`` with one threshold θ/c for every feature.
This module never reads data, never writes files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from steer.sae import SAE


@dataclass
class StepOutput:
    loss: torch.Tensor
    fvu: torch.Tensor
    auxk: torch.Tensor
    l0: float
    fired: torch.Tensor
    """(W,) bool: features that fired anywhere in the batch."""
    min_kept: float
    """Smallest kept activation (the batchtopk threshold estimate for this batch)."""


class TopKAutoencoder(nn.Module):
    def __init__(self, d_in: int, width: int, k: int, batch_topk: bool = False, *, generator: torch.Generator | None = None):
        super().__init__()
        self.d_in, self.width, self.k, self.batch_topk = d_in, width, k, batch_topk
        W_dec = torch.randn(width, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)                       # (W, d) unit rows
        self.W_enc = nn.Parameter(W_dec.t().clone())           # (d, W) tied at init
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.k_aux = max(1, min(d_in // 2, width))

    # -- encode / decode ---------------------------------------------------------
    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)  # (B, W)

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept activations as flat ``(values, features, offsets)``: token b's are ``[offsets[b]:offsets[b+1]]``."""
        B = pre.shape[0]
        if not self.batch_topk:
            top = pre.topk(self.k, dim=-1, sorted=False)                # (B, k)
            offsets = torch.arange(0, B * self.k + 1, self.k, device=pre.device)
            return top.values.reshape(-1), top.indices.reshape(-1), offsets
        flat = pre.reshape(-1).topk(min(self.k * B, pre.numel()), sorted=False)
        tokens, features = flat.indices // self.width, flat.indices % self.width
        order = torch.argsort(tokens, stable=True)
        counts = torch.bincount(tokens, minlength=B)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return flat.values[order], features[order], offsets

    def decode(self, values: torch.Tensor, features: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        bags = F.embedding_bag(features, self.W_dec, offsets[:-1], mode="sum", per_sample_weights=values)  # (B, d)
        return bags + self.b_dec

    # -- one training forward ----------------------------------------------------
    def forward(self, x: torch.Tensor, dead: torch.Tensor | None = None, auxk_alpha: float = 0.0) -> StepOutput:
        """Loss and metrics for a batch ``x (B, d)``; ``dead (W,)`` bool marks features fed by AuxK."""
        pre = self.pre_activation(x)
        values, features, offsets = self.select(pre)
        x_hat = self.decode(values, features, offsets)
        total_variance = (x - x.mean(0)).pow(2).sum().clamp(min=1e-12)
        error = x - x_hat
        fvu = error.pow(2).sum() / total_variance
        auxk = x.new_zeros(())
        if auxk_alpha > 0 and dead is not None and bool(dead.any()):
            n_dead = int(dead.sum())
            k_aux = min(self.k_aux, n_dead)
            dead_pre = torch.where(dead, pre, pre.new_zeros(()))   # (B, W)
            top = dead_pre.topk(k_aux, dim=-1, sorted=False)
            B = x.shape[0]
            aux_offsets = torch.arange(0, B * k_aux + 1, k_aux, device=x.device)
            e_hat = F.embedding_bag(top.indices.reshape(-1), self.W_dec, aux_offsets[:-1], mode="sum",
                                    per_sample_weights=top.values.reshape(-1))
            scale = min(1.0, n_dead / self.k_aux)
            auxk = scale * (e_hat - error.detach()).pow(2).sum() / total_variance
        fired = torch.zeros(self.width, dtype=torch.bool, device=x.device)
        fired[features[values > 0]] = True
        return StepOutput(
            loss=fvu + auxk_alpha * auxk, fvu=fvu.detach(), auxk=auxk.detach(),
            l0=float((values > 0).sum()) / x.shape[0], fired=fired,
            min_kept=float(values.detach().min()) if values.numel() else 0.0,
        )

    # -- decoder constraint --------------------------------------------------------
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the part of W_dec's gradient that would change the rows' norms."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)

    # -- export --------------------------------------------------------------------
    @torch.no_grad()
    def to_sae(self, *, input_scale: float, threshold: float | None = None, **sae_fields) -> SAE:
        """The inference SAE in model units (see the module docstring); ``threshold`` is batchtopk's θ."""
        c = float(input_scale)
        common = dict(
            W_enc=self.W_enc.detach().cpu().float().clone(),
            W_dec=self.W_dec.detach().cpu().float().clone(),
            b_enc=(self.b_enc.detach().cpu().float() / c),
            b_dec=(self.b_dec.detach().cpu().float() / c),
            apply_b_dec_to_input=True, normalize_activations="none", **sae_fields,
        )
        if not self.batch_topk:
            return SAE(architecture="topk", k=self.k, **common)
        if threshold is None:
            raise ValueError("a batchtopk SAE needs its threshold to become a jumprelu SAE")
        return SAE(architecture="jumprelu", threshold=torch.full((self.width,), threshold / c), **common)
