"""How often the edited features fire, base vs edited: the edit card's evidence that an edit acts on its features.

For every SAE feature a plan reads at a site (the features it edits, and ``when`` conditions), `firing_rates`
gives the share of token positions where ``f_i(x) > 0``, on the base model and on the edited one, over each
named set of token rows (the neutral text, a suite's prompts). The first position of every row is left out:
it is the attention sink, whose residual norm is ~100x every other's, and no feature there says anything
about the text. The edited side is the plan's hooks on the base model — the reference semantics every artifact
is verified against — and its activation is read *after* the edit at that site (a capture registered inside
`steer.applied` sees the steered value, `steer.models.capture`), then encoded by the same SAE. A suppressed
feature therefore reads its remaining firing rate, and a feature the edit should leave alone shows whether it
did.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from steer.lower.hooks import applied
from steer.models.capture import capture

BATCH = 8
"""Rows per forward pass."""


@dataclass(frozen=True)
class FiringRate:
    site: str
    feature: int
    rows: str
    """Which token rows (``neutral``, a suite's name)."""
    positions: int
    base: float
    """Share of positions where the feature fires on the base model."""
    edited: float

    def as_dict(self) -> dict:
        """For the manifest: the rates to 4 significant digits (exports stay byte-reproducible)."""
        return {"site": self.site, "feature": self.feature, "rows": self.rows, "positions": self.positions,
                "base": float(f"{self.base:.4g}"), "edited": float(f"{self.edited:.4g}")}


def firing_rates(plan, model, row_sets: dict[str, list[list[int]]]) -> list[FiringRate]:
    """Firing rates of every feature ``plan`` reads, base ``model`` vs ``model`` under ``plan``, on each of
    ``row_sets`` (name → token id lists)."""
    sites = [sp for sp in plan.sites if sp.reader is not None]
    if not sites:
        return []
    out = []
    for name, rows in row_sets.items():
        base = _counts(model, sites, rows, None)
        edited = _counts(model, sites, rows, plan)
        positions = sum(max(len(r) - 1, 0) for r in rows)
        for sp in sites:
            for slot, feature in enumerate(sp.reader.feature_ids):
                out.append(FiringRate(site=str(sp.site), feature=int(feature), rows=name, positions=positions,
                                      base=float(base[sp.site][slot]) / max(positions, 1),
                                      edited=float(edited[sp.site][slot]) / max(positions, 1)))
    return out


def _counts(model, sites, rows: list[list[int]], plan) -> dict:
    """Per site, ``(F,)`` counts of positions (first of each row left out) where each read feature fires."""
    counts = {sp.site: torch.zeros(len(sp.reader.feature_ids), dtype=torch.long) for sp in sites}
    device = next(model.parameters()).device
    for start in range(0, len(rows), BATCH):
        chunk = rows[start:start + BATCH]
        width = max(len(r) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):  # right padding: positions stay 0..len-1, padded ones are masked out below
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        with torch.no_grad(), (applied(model, plan) if plan is not None else nullcontext()), \
                capture(model, [sp.site for sp in sites]) as acts:
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
        keep = mask.bool().clone()
        keep[:, 0] = False  # the attention sink
        for sp in sites:
            x = acts[sp.site][0].float().cpu()
            sae = sp.reader.sae
            f = sae.encode(x.to(sae.W_enc.dtype))
            if sp.reader.gather is not None:
                f = f[..., sp.reader.gather]
            counts[sp.site] += ((f > 0) & keep[..., None]).sum(dim=(0, 1))
    return counts


def firing_lines(rates: list[FiringRate]) -> list[str]:
    """The edit card's table: one line per (site, feature), a base → edited column per row set."""
    if not rates:
        return []
    positions = {r.rows: r.positions for r in rates}  # one count per row set, in order
    by_feature: dict = {}
    for r in rates:
        by_feature.setdefault((r.site, r.feature), {})[r.rows] = r
    lines = ["## Edited features' firing rates", "",
             "Share of token positions (each row's first, the attention sink, left out) where the feature fires "
             "(f > 0), base → edited (the hooked reference, which the artifact reproduces: see Measured fidelity), "
             "read after the edit at its site.", "",
             "| site | feature | " + " | ".join(f"{s} ({n} positions)" for s, n in positions.items()) + " |",
             "| --- | --- | " + " | ".join("---" for _ in positions) + " |"]
    for (site, feature), row in by_feature.items():
        lines.append(f"| {site} | {feature} | " + " | ".join(
            f"{100 * row[s].base:.2f}% → {100 * row[s].edited:.2f}%" for s in positions) + " |")
    return [*lines, ""]
