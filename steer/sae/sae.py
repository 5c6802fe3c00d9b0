"""The one SAE type every format reader produces and every backend reads from.

Shapes follow SAELens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
``b_enc [d_sae]``, ``b_dec [d_in]``, ``threshold [d_sae]`` (jumprelu only).

Encode: ``h = (n(x) - b_dec·apply_b_dec_to_input) W_enc + b_enc`` then the
activation; decode: ``n⁻¹(f W_dec + b_dec)``, where ``n`` is the input
normalisation (SAELens' ``normalize_activations``). Every normalisation here is
affine per token, ``n(x) = (x - mu) / sigma``, so a feature-space change ``δ``
becomes ``sigma · δ`` in the model's activation space; `normalize` returns
``(x̃, mu, sigma)`` for exactly that use.

This module never reads or writes files (see `steer.sae.formats`) and never
touches a model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from steer.errors import SAEError

Architecture = Literal["relu", "jumprelu", "topk"]
ARCHITECTURES: tuple[str, ...] = ("relu", "jumprelu", "topk")

Normalization = Literal["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"]
NORMALIZATIONS: tuple[str, ...] = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")

LAYER_NORM_EPS = 1e-5  # SAELens' epsilon for normalize_activations="layer_norm"


@dataclass(eq=False)
class SAE:
    W_enc: torch.Tensor
    """Encoder, ``[d_in, d_sae]``."""
    W_dec: torch.Tensor
    """Decoder, ``[d_sae, d_in]``; row i is feature i's direction ``d_i``."""
    b_enc: torch.Tensor
    """Encoder bias, ``[d_sae]``."""
    b_dec: torch.Tensor
    """Decoder bias, ``[d_in]``."""
    architecture: Architecture = "relu"
    """relu (SAELens "standard"), jumprelu, or topk."""
    threshold: torch.Tensor | None = None
    """JumpReLU threshold ``[d_sae]``: a feature fires where its pre-activation exceeds it."""
    k: int | None = None
    """TopK: the number of features kept per token."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAELens default; Gemma Scope: false)."""
    normalize_activations: Normalization = "none"
    """Input normalisation as SAELens defines it."""
    norm_scaling_factor: float | None = None
    """For expected_average_only_in when the factor was not folded into the weights: x̃ = x·c."""
    site: str | None = None
    """Where the SAE reads, as written in its file (canonical site, SAELens hook or HF path)."""
    model_name: str | None = None
    """The model the SAE was trained on, as its config names it."""
    feature_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-feature statistics ``[d_sae]`` (e.g. ``p99``, ``max``, ``density``) when known."""
    metadata: dict = field(default_factory=dict)
    """Everything else the source config held, kept so a re-save loses nothing."""
    source: str | None = None
    """Where this SAE was read from (for messages)."""

    def __post_init__(self) -> None:
        where = self.source
        tensors = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise SAEError(f"{name} is {type(t).__name__}, expected a tensor", where=where)
            if not t.is_floating_point():
                raise SAEError(f"{name} has dtype {t.dtype}, expected a floating-point dtype", where=where)
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) > 1:
            listing = ", ".join(f"{n} {t.dtype}" for n, t in tensors.items())
            raise SAEError(f"mixed dtypes ({listing}); all SAE tensors must share one dtype", where=where)
        if self.W_enc.dim() != 2:
            raise SAEError(f"W_enc has shape {tuple(self.W_enc.shape)}, expected [d_in, d_sae]", where=where)
        d_in, d_sae = self.W_enc.shape
        expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
        for name, shape in expected.items():
            t = tensors.get(name)
            if t is not None and tuple(t.shape) != shape:
                raise SAEError(
                    f"{name} has shape {tuple(t.shape)}, expected {list(shape)} "
                    f"(W_enc is [d_in={d_in}, d_sae={d_sae}])",
                    where=where,
                )
        if self.architecture not in ARCHITECTURES:
            raise SAEError(f"unknown architecture {self.architecture!r}; allowed: {', '.join(ARCHITECTURES)}", where=where)
        if self.architecture == "jumprelu" and self.threshold is None:
            raise SAEError("architecture jumprelu needs a threshold tensor", where=where)
        if self.architecture == "topk":
            if self.k is None or not (1 <= int(self.k) <= d_sae):
                raise SAEError(f"topk needs k in 1..d_sae={d_sae}, got {self.k!r}", where=where)
            self.k = int(self.k)
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEError(
                f"unknown normalize_activations {self.normalize_activations!r}; allowed: {', '.join(NORMALIZATIONS)}",
                where=where,
            )
        for name, t in self.feature_stats.items():
            if tuple(t.shape) != (d_sae,):
                raise SAEError(f"feature statistic {name!r} has shape {tuple(t.shape)}, expected [{d_sae}]", where=where)

    # -- sizes -------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    # -- the math ----------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
        """``(x̃, mu, sigma)`` with ``x̃ = (x - mu) / sigma``; mu, sigma per token ``(..., 1)`` or scalars."""
        kind = self.normalize_activations
        if kind == "constant_norm_rescale":
            sigma = x.norm(dim=-1, keepdim=True) / math.sqrt(self.d_in)
            return x / sigma, 0.0, sigma
        if kind == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            centred = x - mu
            sigma = centred.std(dim=-1, keepdim=True) + LAYER_NORM_EPS
            return centred / sigma, mu, sigma
        if kind == "expected_average_only_in" and self.norm_scaling_factor is not None:
            c = float(self.norm_scaling_factor)
            return x * c, 0.0, 1.0 / c
        return x, 0.0, 1.0

    def pre_activation(self, x_normalized: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activation of already-normalised input, ``(..., d_sae)``."""
        if self.apply_b_dec_to_input:
            x_normalized = x_normalized - self.b_dec
        return x_normalized @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The activation function on a full ``(..., d_sae)`` pre-activation."""
        if self.architecture == "relu":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``f(x)``, ``(..., d_sae)``."""
        x_normalized, _, _ = self.normalize(x)
        return self.activate(self.pre_activation(x_normalized))

    def decode(self, f: torch.Tensor, mu: torch.Tensor | float = 0.0, sigma: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Reconstruction in the model's space: ``(f W_dec + b_dec)·sigma + mu``."""
        return (f @ self.W_dec + self.b_dec) * sigma + mu

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        x_normalized, mu, sigma = self.normalize(x)
        return self.decode(self.activate(self.pre_activation(x_normalized)), mu, sigma)

    def select(self, feature_ids) -> "SAE":
        """An SAE of only these features, in this order (encoder columns, decoder rows, thresholds).

        Exact for relu/jumprelu, whose features are computed independently; a
        topk feature depends on all others' pre-activations, so it refuses.
        """
        if self.architecture == "topk":
            raise SAEError("a topk SAE cannot be sliced: a feature's activation depends on every pre-activation", where=self.source)
        ids = torch.as_tensor(list(feature_ids), dtype=torch.long)
        return SAE(
            W_enc=self.W_enc[:, ids].contiguous(), W_dec=self.W_dec[ids].contiguous(), b_enc=self.b_enc[ids].contiguous(),
            b_dec=self.b_dec.clone(), architecture=self.architecture,
            threshold=None if self.threshold is None else self.threshold[ids].contiguous(),
            apply_b_dec_to_input=self.apply_b_dec_to_input, normalize_activations=self.normalize_activations,
            norm_scaling_factor=self.norm_scaling_factor, site=self.site, model_name=self.model_name,
            feature_stats={n: t[ids].contiguous() for n, t in self.feature_stats.items()},
            metadata={"selected_from": self.source, "feature_ids": [int(i) for i in ids]}, source=self.source,
        )

    # -- identity ----------------------------------------------------------
    def content_hash(self) -> str:
        """sha256 over the tensors and the settings that change the math."""
        h = hashlib.sha256()
        settings = (self.architecture, self.k, self.apply_b_dec_to_input, self.normalize_activations, self.norm_scaling_factor)
        h.update(repr(settings).encode())
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            t = getattr(self, name)
            if t is not None:
                h.update(name.encode())
                h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "SAE":
        """A copy with tensors moved/cast (never mutates self)."""
        def move(t):
            return None if t is None else t.to(dtype=dtype if dtype is not None else t.dtype, device=device)

        return SAE(
            W_enc=move(self.W_enc), W_dec=move(self.W_dec), b_enc=move(self.b_enc), b_dec=move(self.b_dec),
            architecture=self.architecture, threshold=move(self.threshold), k=self.k,
            apply_b_dec_to_input=self.apply_b_dec_to_input, normalize_activations=self.normalize_activations,
            norm_scaling_factor=self.norm_scaling_factor, site=self.site, model_name=self.model_name,
            feature_stats={n: t.to(device=device) for n, t in self.feature_stats.items()},
            metadata=dict(self.metadata), source=self.source,
        )
