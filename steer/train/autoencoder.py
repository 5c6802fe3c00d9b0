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

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from steer.sae import SAE

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


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


class _KeptPreActivation(torch.autograd.Function):
    """``v_n = (x[t_n] − b_dec)·W_enc[:, f_n] + b_enc[f_n]`` for the kept (token, feature) pairs only.

    The values come in already computed (from the no-grad dense pre-activation);
    the backward pass touches only the kept pairs — ``B·k·d`` multiply-adds
    instead of the dense ``B·W·d`` of autograd through ``x @ W_enc``.
    """

    @staticmethod
    def forward(ctx, values, x, W_enc, b_enc, b_dec, tokens, features):
        ctx.save_for_backward(x, W_enc, b_dec, tokens, features)
        return values

    @staticmethod
    def backward(ctx, grad):                                             # grad (N,)
        x, W_enc, b_dec, tokens, features = ctx.saved_tensors
        width = W_enc.shape[1]
        # G (W, B) with N entries, as CSR rows sorted by feature (a COO product runs a dense-sized kernel on the CPU)
        order = features.argsort(stable=True)
        rows = torch.zeros(width + 1, dtype=torch.long, device=grad.device)
        rows[1:] = torch.bincount(features, minlength=width).cumsum(0)
        G = torch.sparse_csr_tensor(rows, tokens[order], grad[order], (width, x.shape[0]), check_invariants=False)
        grad_W_enc = (G @ (x - b_dec)).t().contiguous()                  # (d, W)
        grad_b_enc = torch.zeros(width, dtype=grad.dtype, device=grad.device).index_add_(0, features, grad)
        grad_b_dec = -(W_enc @ grad_b_enc)
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None, None


class TopKAutoencoder(nn.Module):
    def __init__(self, d_in: int, width: int, k: int, batch_topk: bool = False, *, generator: torch.Generator | None = None):
        super().__init__()
        self.d_in, self.width, self.k, self.batch_topk = d_in, width, k, batch_topk
        W_dec = torch.randn(width, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)                       # (W, d) unit rows
        self.W_enc = nn.Parameter(W_dec.t().contiguous())      # (d, W) tied at init, row-major like its gradient
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.k_aux = max(1, min(d_in // 2, width))

    # -- encode / decode ---------------------------------------------------------
    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``relu((x - b_dec) W_enc + b_enc)``, ``(B, W)``, without a gradient (the kept entries get one in `forward`)."""
        with torch.no_grad():
            return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc).relu_()

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept entries as flat ``(tokens, features, offsets)``: token b's are ``[offsets[b]:offsets[b+1]]``."""
        B = pre.shape[0]
        if not self.batch_topk:
            features = pre.topk(self.k, dim=-1, sorted=False).indices.reshape(-1)     # (B·k,)
            tokens = torch.arange(B, device=pre.device).repeat_interleave(self.k)
            offsets = torch.arange(0, B * self.k + 1, self.k, device=pre.device)
            return tokens, features, offsets
        flat = pre.reshape(-1).topk(min(self.k * B, pre.numel()), sorted=False).indices
        flat = flat.sort().values                                                    # token-major order
        tokens, features = flat // self.width, flat % self.width
        offsets = torch.cat([tokens.new_zeros(1), torch.bincount(tokens, minlength=B).cumsum(0)])
        return tokens, features, offsets

    def kept_values(self, x: torch.Tensor, pre: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The kept pre-activations, with a sparse gradient into W_enc, b_enc and b_dec."""
        values = _KeptPreActivation.apply(pre[tokens, features], x, self.W_enc, self.b_enc, self.b_dec, tokens, features)
        return torch.relu(values)

    def decode(self, values: torch.Tensor, features: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        bags = F.embedding_bag(features, self.W_dec, offsets[:-1], mode="sum", per_sample_weights=values)  # (B, d)
        return bags + self.b_dec

    # -- one training forward ----------------------------------------------------
    def forward(self, x: torch.Tensor, dead: torch.Tensor | None = None, auxk_alpha: float = 0.0) -> StepOutput:
        """Loss and metrics for a batch ``x (B, d)``; ``dead (W,)`` bool marks features fed by AuxK."""
        pre = self.pre_activation(x)                                   # (B, W), no grad
        tokens, features, offsets = self.select(pre)
        values = self.kept_values(x, pre, tokens, features)            # (B·k,)
        x_hat = self.decode(values, features, offsets)
        total_variance = (x - x.mean(0)).pow(2).sum().clamp(min=1e-12)
        error = x - x_hat
        fvu = error.pow(2).sum() / total_variance
        auxk = x.new_zeros(())
        if auxk_alpha > 0 and dead is not None and bool(dead.any()):
            n_dead = int(dead.sum())
            k_aux = min(self.k_aux, n_dead)
            B = x.shape[0]
            aux_features = pre.masked_fill(~dead, 0.0).topk(k_aux, dim=-1, sorted=False).indices.reshape(-1)
            aux_tokens = torch.arange(B, device=x.device).repeat_interleave(k_aux)
            aux_values = self.kept_values(x, pre, aux_tokens, aux_features)
            aux_offsets = torch.arange(0, B * k_aux, k_aux, device=x.device)
            e_hat = F.embedding_bag(aux_features, self.W_dec, aux_offsets, mode="sum", per_sample_weights=aux_values)
            scale = min(1.0, n_dead / self.k_aux)
            auxk = scale * (e_hat - error.detach()).pow(2).sum() / total_variance
        active = values.detach() > 0
        fired = torch.zeros(self.width, dtype=torch.bool, device=x.device)
        fired[features[active]] = True
        return StepOutput(
            loss=fvu + auxk_alpha * auxk, fvu=fvu.detach(), auxk=auxk.detach(),
            l0=float(active.sum()) / x.shape[0], fired=fired,
            min_kept=float(values.detach()[active].min()) if bool(active.any()) else 0.0,
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
