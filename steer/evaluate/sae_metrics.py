"""How good an SAE is, measured the way the field measures it, on text it was not trained on.

For each sequence of held-out text (the corpus's held-out documents by the
rule in `steer.data.corpus`, packed into rows of the training context size),
three full forward passes of the model:

- **clean** — the model as is; the site's activations x are recorded;
- **spliced** — x replaced by the SAE's reconstruction ``x̂`` (the error term
  dropped) at every position the SAE was trained on (positions ≥ ``skip_first``;
  the attention-sink position 0 keeps its own activation);
- **zero-ablated** — x replaced by 0 at those positions.

Reported: **FVU** ``Σ‖x − x̂‖² / Σ‖x − x̄‖²`` (x̄ the mean over the evaluated
tokens), **L0** (mean active features per token), **dead** (features that
never fire on these tokens; the SAE's own training-time density is shown too
when its file has one), **delta LM loss** = CE(spliced) − CE(clean) and
**CE loss recovered** = (CE(zero) − CE(spliced)) / (CE(zero) − CE(clean)).
CE is the mean next-token cross-entropy (nats/token) of the predictions made
at the spliced positions.

Never changes the model (hooks only, removed after each pass) or the SAE.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from steer.errors import SAEError
from steer.models.adapters import Site, adapter_for
from steer.models.capture import capture, rewritten
from steer.sae import SAE
from steer.saes import load_sae
from steer.train.statistics import feature_statistics

DEFAULT_TOKENS = 16384
DEFAULT_HELD_OUT = 0.05
DEFAULT_CONTEXT = 128


@dataclass(frozen=True)
class SAEMetrics:
    fvu: float
    l0: float
    dead_fraction: float
    """Features that never fired on the evaluated tokens."""
    dead_fraction_training: float | None
    """Features with zero density in the SAE's stored feature statistics (None when it has none)."""
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    delta_lm_loss: float
    ce_loss_recovered: float
    tokens: int
    """Tokens whose activations were evaluated."""
    sequences: int
    context_size: int
    corpus: str
    split: str
    held_out: float
    site: str
    model: str
    sae: str
    d_sae: int
    architecture: str

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_sae(
    sae: SAE | str | os.PathLike, *, model=None, tokenizer=None, corpus: str | None = None, site: str | None = None,
    tokens: int | None = None, held_out: float | None = None, split: str = "held_out", batch_size: int = 8,
) -> SAEMetrics:
    """Evaluate ``sae`` (an SAE or a path); defaults come from the SAE's training record (see module docstring).

    ``model`` may be a loaded model (then pass ``tokenizer``) or a name/path.
    """
    from steer.data.corpus import first_document, open_corpus, token_sequences
    from steer.models import load_model

    sae = sae if isinstance(sae, SAE) else load_sae(sae)
    record = sae.metadata.get("steer_training", {}).get("recipe", {})
    corpus_spec = corpus or sae.metadata.get("dataset_path") or record.get("corpus") or "default"
    held_out = held_out if held_out is not None else record.get("held_out", DEFAULT_HELD_OUT)
    context = int(sae.metadata.get("context_size") or record.get("context_size") or DEFAULT_CONTEXT)
    skip_first = int(record.get("skip_first", 1))
    tokens = tokens or DEFAULT_TOKENS
    text = open_corpus(corpus_spec, text_field=record.get("text_field", "text"))
    first_document(text, split, held_out)

    model_name = model if isinstance(model, str) else None
    if model is None or isinstance(model, str):
        model_name = model_name or sae.model_name
        if model_name is None:
            raise SAEError("the SAE's config names no model; pass --model", where=sae.source or "sae")
        model, tokenizer = load_model(model_name)
    elif tokenizer is None:
        raise SAEError("a model was given without its tokenizer", where="evaluate_sae")
    site_name = site or sae.site
    if site_name is None:
        raise SAEError("the SAE's config names no site; pass --site", where=sae.source or "sae")
    parsed = adapter_for(model).parse_site(site_name, model)
    param = next(model.parameters())
    if sae.d_in != param.shape[-1] and sae.d_in != model.config.hidden_size:
        raise SAEError(f"SAE d_in is {sae.d_in} but the model's hidden size is {model.config.hidden_size}", where=sae.source)
    sae_on_model = sae.to(dtype=param.dtype, device=param.device)

    rows_needed = max(1, -(-tokens // (context - skip_first)))
    rows = []
    for row in token_sequences(text.documents(split, held_out), tokenizer, context):
        rows.append(row)
        if len(rows) == rows_needed:
            break
    if not rows:
        raise SAEError(f"the {split} split of corpus {corpus_spec!r} has no full {context}-token sequence", where="eval")

    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    predictions = 0
    activations = []
    for start in range(0, len(rows), batch_size):
        ids = torch.stack(rows[start : start + batch_size]).to(param.device)   # (B, T)
        with torch.inference_mode():
            with capture(model, [parsed]) as records:
                ce["clean"] += _ce_sum(model(input_ids=ids, use_cache=False).logits, ids, skip_first)
            x = records[parsed][0]
            activations.append(x[:, skip_first:].reshape(-1, x.shape[-1]).float().cpu())
            with _replaced(model, parsed, lambda x: sae_on_model.reconstruct(x), skip_first):
                ce["spliced"] += _ce_sum(model(input_ids=ids, use_cache=False).logits, ids, skip_first)
            with _replaced(model, parsed, torch.zeros_like, skip_first):
                ce["zero"] += _ce_sum(model(input_ids=ids, use_cache=False).logits, ids, skip_first)
        predictions += ids.shape[0] * (ids.shape[1] - 1 - skip_first)
    ce = {name: total / predictions for name, total in ce.items()}
    _, quality = feature_statistics(sae.to(dtype=torch.float32), activations)
    density = sae.feature_stats.get("density")
    return SAEMetrics(
        fvu=quality["fvu"], l0=quality["l0"], dead_fraction=quality["dead_fraction"],
        dead_fraction_training=None if density is None else float((density <= 0).float().mean()),
        ce_clean=ce["clean"], ce_spliced=ce["spliced"], ce_zero=ce["zero"], delta_lm_loss=ce["spliced"] - ce["clean"],
        ce_loss_recovered=(ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]) if ce["zero"] != ce["clean"] else float("nan"),
        tokens=int(quality["tokens"]), sequences=len(rows), context_size=context, corpus=corpus_spec, split=split,
        held_out=held_out, site=str(parsed), model=str(model_name or getattr(model.config, "_name_or_path", "model")),
        sae=str(sae.source or "<memory>"), d_sae=sae.d_sae, architecture=sae.architecture,
    )


def _ce_sum(logits: torch.Tensor, ids: torch.Tensor, skip_first: int) -> float:
    """Summed next-token CE of the predictions made at positions ≥ skip_first."""
    pred = logits[:, skip_first:-1].float()                 # (B, T-1-skip, V)
    target = ids[:, skip_first + 1 :]
    return float(F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum"))


def _replaced(model, site: Site, replace, skip_first: int):
    """Inside the block, the site's activation at positions ≥ skip_first is ``replace(x)``."""
    def swap(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, skip_first:] = replace(x[:, skip_first:]).to(x.dtype)
        return out

    return rewritten(model, site, swap)


def format_metrics(m: SAEMetrics) -> str:
    dead_training = "" if m.dead_fraction_training is None else f"; {100 * m.dead_fraction_training:.1f}% by its training statistics"
    lines = [
        f"SAE {m.sae} ({m.architecture}, d_sae {m.d_sae}) at {m.site} of {m.model}",
        f"on {m.tokens:,} tokens ({m.sequences} sequences × {m.context_size}) of the {m.split.replace('_', '-')} split of "
        f"corpus {m.corpus} (held_out {m.held_out:g})",
        f"  FVU                  {m.fvu:.4f}",
        f"  L0                   {m.l0:.1f}",
        f"  dead features        {100 * m.dead_fraction:.1f}% (never fired on these tokens{dead_training})",
        f"  CE clean             {m.ce_clean:.4f} nats/token",
        f"  CE spliced           {m.ce_spliced:.4f}",
        f"  CE zero-ablated      {m.ce_zero:.4f}",
        f"  delta LM loss        {m.delta_lm_loss:+.4f} nats/token",
        f"  CE loss recovered    {100 * m.ce_loss_recovered:.1f}%",
    ]
    return "\n".join(lines)
