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

The same two passes also give the edit's `Footprint` at every SAE site of the model (`footprint_saes`: the
plan's own SAEs in full and, on the default model, every SAE shipped with steer): each site's whole dictionary
read base vs edited. Upstream of the first edited site nothing may move; downstream it shows how far the edit
spreads beyond the features it names.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

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


TOP_MOVES = 3
"""Features named per site and row set in a footprint: those whose firing rate the edit moved most."""


@dataclass(frozen=True)
class Footprint:
    """What an edit does to *every* feature of one SAE site: the site's whole dictionary read base vs edited.

    At a site before the first edited one it must read no change at all (the edit is causal); at the edited
    sites and after them it shows how far the edit spreads beyond the features it names."""
    site: str
    rows: str
    positions: int
    d_sae: int
    l0_base: float
    """Mean number of features firing per position, base model (a top-k SAE's is k by construction: there the
    moves show which features took the slots an edit freed)."""
    l0_edited: float
    moved: int
    """Features whose firing count changed at all."""
    largest: tuple[tuple[int, float, float], ...]
    """(feature, base rate, edited rate) of the features that moved most, largest change first."""

    def as_dict(self) -> dict:
        """For the manifest, 4 significant digits."""
        return {"site": self.site, "rows": self.rows, "positions": self.positions, "d_sae": self.d_sae,
                "l0_base": float(f"{self.l0_base:.4g}"), "l0_edited": float(f"{self.l0_edited:.4g}"),
                "moved": self.moved,
                "largest": [{"feature": f, "base": float(f"{b:.4g}"), "edited": float(f"{e:.4g}")}
                            for f, b, e in self.largest]}


def firing_rates(plan, model, row_sets: dict[str, list[list[int]]],
                 saes: dict | None = None) -> tuple[list[FiringRate], list[Footprint]]:
    """Firing rates of every feature ``plan`` reads, base ``model`` vs ``model`` under ``plan``, on each of
    ``row_sets`` (name → token id lists); with ``saes`` (site → full SAE), also the edit's `Footprint` at each of
    those sites, from the same two passes per row set."""
    sites = [sp for sp in plan.sites if sp.reader is not None]
    encoders = {("read", sp.site): (sp.site, _encoder(sp.reader.sae, sp.reader.gather)) for sp in sites}
    for site, sae in (saes or {}).items():
        encoders[("all", site)] = (site, _encoder(sae))
    rates, prints = [], []
    if not encoders:
        return rates, prints
    for name, rows in row_sets.items():
        base = _counts(model, encoders, rows, None)
        edited = _counts(model, encoders, rows, plan)
        positions = sum(max(len(r) - 1, 0) for r in rows)
        per = max(positions, 1)
        for sp in sites:
            for slot, feature in enumerate(sp.reader.feature_ids):
                rates.append(FiringRate(site=str(sp.site), feature=int(feature), rows=name, positions=positions,
                                        base=float(base[("read", sp.site)][slot]) / per,
                                        edited=float(edited[("read", sp.site)][slot]) / per))
        for site in saes or {}:
            before, after = base[("all", site)], edited[("all", site)]
            change = (after - before).abs()
            order = [int(i) for i in torch.argsort(change, descending=True, stable=True)[:TOP_MOVES] if change[i] > 0]
            prints.append(Footprint(
                site=str(site), rows=name, positions=positions, d_sae=int(before.numel()),
                l0_base=float(before.sum()) / per, l0_edited=float(after.sum()) / per,
                moved=int((change > 0).sum()),
                largest=tuple((i, float(before[i]) / per, float(after[i]) / per) for i in order)))
    return rates, prints


def _counts(model, encoders: dict, rows: list[list[int]], plan) -> dict:
    """Per key of ``encoders`` (key → (site, activations → features)), the count of positions (first of each row
    left out) where each feature fires, on ``model`` as it is (``plan`` None) or under ``plan``'s hooks."""
    counts: dict = {}
    sites = list(dict.fromkeys(site for site, _ in encoders.values()))
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
                capture(model, sites) as acts:
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
        keep = mask.bool().clone()
        keep[:, 0] = False  # the attention sink
        for key, (site, encode) in encoders.items():
            f = encode(acts[site][0].float().cpu())
            fired = ((f > 0) & keep[..., None]).sum(dim=(0, 1))
            counts[key] = fired if key not in counts else counts[key] + fired
    return counts


def footprint_saes(plan, model) -> dict:
    """Site → full SAE for every site the footprint covers: the SAEs the plan was compiled from (reloaded in full
    from their files) and, when ``model`` is the default model, every SAE shipped with steer."""
    from steer.models.adapters import adapter_for
    from steer.models.loading import DEFAULT_MODEL, registry_name
    from steer.sae.shipped import shipped_available, shipped_sites
    from steer.saes import load_sae

    adapter = adapter_for(model)
    saes: dict = {}
    if registry_name(model) == DEFAULT_MODEL and shipped_available():
        for site in shipped_sites():
            saes[adapter.parse_site(site, model)] = load_sae(f"default:{site}")
    loaded = {str(sae.source) for sae in saes.values()}
    for source, _ in plan.saes:
        if source in loaded or not Path(source).exists():  # a shipped one, already read; or an in-memory SAE
            continue
        sae = load_sae(source)
        site = next((sp.site for sp in plan.sites if sp.reader is not None and sae.site is not None
                     and adapter.parse_site(sae.site, model) == sp.site), None)
        if site is not None:
            saes.setdefault(site, sae)
    return dict(sorted(saes.items()))  # by layer


def _encoder(sae, gather=None):
    """Activations → features of ``sae`` (a full SAE, or a plan's slice with ``gather`` putting its columns in the
    plan's feature order)."""
    def encode(x: torch.Tensor) -> torch.Tensor:
        f = sae.encode(x.to(sae.W_enc.dtype))
        return f[..., gather] if gather is not None else f
    return encode


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
             f"All {len(by_feature)} together, mean rate: " + "; ".join(
                 f"{name} {100 * _mean(rates, name, 'base'):.2f}% → {100 * _mean(rates, name, 'edited'):.2f}%"
                 for name in positions) + ".", "",
             "| site | feature | " + " | ".join(f"{s} ({n} positions)" for s, n in positions.items()) + " |",
             "| --- | --- | " + " | ".join("---" for _ in positions) + " |"]
    for (site, feature), row in by_feature.items():
        lines.append(f"| {site} | {feature} | " + " | ".join(
            f"{100 * row[s].base:.2f}% → {100 * row[s].edited:.2f}%" for s in positions) + " |")
    return [*lines, ""]


def _mean(rates: list[FiringRate], rows: str, side: str) -> float:
    values = [getattr(r, side) for r in rates if r.rows == rows]
    return sum(values) / len(values)


def footprint_lines(prints: list[Footprint]) -> list[str]:
    """The edit card's table of the edit's footprint at every SAE site given, one line per (site, row set)."""
    if not prints:
        return []
    lines = ["## Footprint at every SAE site", "",
             "Each site's whole dictionary read base → edited (each row's first position left out): the mean number "
             "of features firing per position (L0), how many features' firing rates moved at all, and the "
             f"{TOP_MOVES} that moved most. A site before the first edited one must show no change.", "",
             "| site | rows | L0 | features moved | largest moves (feature: base → edited) |",
             "| --- | --- | --- | --- | --- |"]
    for p in prints:
        moves = ", ".join(f"{f}: {100 * b:.2f}% → {100 * e:.2f}%" for f, b, e in p.largest) or "none"
        lines.append(f"| {p.site} | {p.rows} ({p.positions} positions) | {p.l0_base:.2f} → {p.l0_edited:.2f} | "
                     f"{p.moved} of {p.d_sae} | {moves} |")
    return [*lines, ""]
