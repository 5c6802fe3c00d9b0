"""spec + model + SAE(s) → Plan: validate everything against the model, slice the SAEs.

This is where user input meets the model, so every check that needs the model
or the SAE lives here and raises a one-line `SteerError` naming the edit
(`Edit.where`: the file and line it was written on, when read from text) and
field: feature id ≥ d_sae, SAE d_in ≠ hidden size, unknown or out-of-range
site, a feature edit at a site no SAE reads, a direction file or key that does
not exist or has the wrong size.

Strength units are resolved here, once, into raw amounts:
``feature`` = multiples of the feature's p99 activation over the tokens where it
fires (from the SAE's feature statistics when present, else measured on
steer's calibration text); ``norm`` = multiples of the mean residual norm at
the site over calibration tokens (the first token of each text, an attention
sink with an outsized norm, is left out).

Never mutates the spec, the model or the SAE.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

from steer.errors import SAEError, SpecError, SteerError
from steer.models.adapters import ArchitectureAdapter, Site, adapter_for, hidden_size
from steer.models.capture import capture
from steer.models.loading import DEFAULT_MODEL, registry_name
from steer.ops import OPERATIONS, Primitive
from steer.plan.ir import FeatureReader, Plan, SiteEdit, SitePlan
from steer.sae import SAE
from steer.saes import DEFAULT_SAE, load_sae
from steer.spec import Spec, parse_spec
from steer.spec.edit import Condition, Edit


def compile(spec, model: nn.Module, sae=None, *, tokenizer=None,  # noqa: A001 (the public name)
            calibration_cache: dict | None = None) -> Plan:
    """Compile ``spec`` (a Spec, a spec file path or DSL text) for ``model``.

    ``sae`` is an `SAE`, a path, or a list of them; when None the spec's ``sae``
    entries are loaded, and when the spec names none either, feature edits on
    the default model use its default SAE (`steer.saes.load_sae`: ``"default"``).
    ``tokenizer`` is needed only for ``feature``/``norm`` units that must be
    calibrated on text. ``calibration_cache``: a dict kept across compiles (a
    sweep's points, a tune's trials) so the calibration activations at a site
    are gathered once (keyed by model, tokenizer and site; the model must not
    change in between).
    """
    spec = parse_spec(spec)
    adapter = adapter_for(model)
    d_model = hidden_size(model)
    saes = _saes_by_site(spec, sae, adapter, model, d_model)
    calibration = _Calibration(model, tokenizer, saes, calibration_cache)

    by_site: dict[Site, list[tuple[int, Edit]]] = {}
    for index, edit in enumerate(spec.edits):
        for site in _edit_sites(index, edit, spec, saes, adapter, model):
            by_site.setdefault(site, []).append((index, edit))

    site_plans = tuple(
        _plan_site(site, by_site[site], saes.get(site), spec, d_model, calibration) for site in sorted(by_site)
    )
    used = {id(s): s for site, s in saes.items() if site in by_site}
    return Plan(
        spec=spec,
        model_type=model.config.model_type,
        n_layers=adapter.n_layers(model),
        hidden_size=d_model,
        sites=site_plans,
        saes=tuple((s.source or "<memory>", s.content_hash()) for s in used.values()),
    )


# -- SAEs and sites ----------------------------------------------------------

def _saes_by_site(spec: Spec, sae, adapter: ArchitectureAdapter, model, d_model: int) -> dict[Site, SAE]:
    given = sae if isinstance(sae, (list, tuple)) else ([] if sae is None else [sae])
    if not given:
        base = Path(spec.base_dir) if spec.base_dir else Path.cwd()
        given = [p if Path(p).is_absolute() or not (base / p).exists() else str(base / p) for p in spec.sae]
    if not given and registry_name(model) == DEFAULT_MODEL and any(_needs_sae(e) for e in spec.edits):
        given = [DEFAULT_SAE]  # feature edits on the default model with no SAE named: its default SAE
    saes: dict[Site, SAE] = {}
    for item in given:
        s = item if isinstance(item, SAE) else load_sae(item)
        where = f"sae {s.source or '<memory>'}"
        name = s.site or spec.site
        if name is None:
            raise SAEError("the SAE's config names no site; give `site:` in the spec or --site", where=where)
        site = adapter.parse_site(name, model)
        if s.d_in != d_model:
            raise SAEError(f"SAE d_in is {s.d_in} but the model's hidden size is {d_model}", where=where)
        if site in saes:
            raise SAEError(f"two SAEs read at site {site}; give one per site", where=where)
        saes[site] = s
    return saes


WRITERS = "writers"
"""Site set: every write to the residual stream — the embedding output (resid_pre.0) and
attn_out.L, mlp_out.L of every layer. project_out there is what orthogonalising all
writers does (Arditi et al.), so it lowers exactly into weights."""


def _edit_sites(index: int, edit: Edit, spec: Spec, saes: dict[Site, SAE], adapter, model) -> list[Site]:
    name = edit.site or spec.site
    if name != WRITERS:
        return [_edit_site(index, edit, spec, saes, adapter, model)]
    where = edit.where(index)
    if _needs_sae(edit):
        raise SpecError(f"site `{WRITERS}` takes a direction target, not an SAE feature (an SAE reads at one site)", where=where)
    return adapter.writer_sites(model)


def _edit_site(index: int, edit: Edit, spec: Spec, saes: dict[Site, SAE], adapter, model) -> Site:
    where = edit.where(index)
    name = edit.site or spec.site
    try:
        if name is not None:
            site = adapter.parse_site(name, model)
        elif len(saes) == 1:
            site = next(iter(saes))
        elif not saes:
            raise SpecError("no site: give `site:` (the edit or the spec) or an SAE whose config names one", where=where)
        else:
            raise SpecError(f"several SAEs ({', '.join(map(str, saes))}): say which site with `site:`", where=where)
    except SteerError as exc:
        raise type(exc)(exc.message, where=where) from None
    if _needs_sae(edit) and site not in saes:
        known = ", ".join(map(str, saes)) or "none"
        raise SpecError(f"feature edit at {site}, but no SAE reads there (SAE sites: {known})", where=where)
    return site


def _needs_sae(edit: Edit) -> bool:
    return edit.feature is not None or isinstance(edit.when, Condition)


# -- one site ----------------------------------------------------------------

def _plan_site(site: Site, edits, sae: SAE | None, spec: Spec, d_model: int, calibration: "_Calibration") -> SitePlan:
    # the features the hook must encode: edited (if the op reads them), monitored, or conditions
    read_ids: set[int] = set()
    for index, edit in edits:
        where = edit.where(index)
        for fid, field in ((edit.feature, "feature"), (getattr(edit.when, "feature", None), "when.feature")):
            if fid is not None and fid >= sae.d_sae:
                raise SpecError(f"{field} {fid} is out of range: the SAE has d_sae={sae.d_sae} (ids 0..{sae.d_sae - 1})", where=where)
        if edit.feature is not None and (OPERATIONS[edit.op].reads == "feature" or edit.when == "active"):
            read_ids.add(edit.feature)
        if isinstance(edit.when, Condition):
            read_ids.add(edit.when.feature)
    reader = _reader(sae, sorted(read_ids)) if read_ids else None
    slot = {fid: i for i, fid in enumerate(reader.feature_ids)} if reader else {}

    directions: list[torch.Tensor] = []
    site_edits = []
    for index, edit in edits:
        where = edit.where(index)
        op = OPERATIONS[edit.op]
        vector = sae.W_dec[edit.feature].float() if edit.feature is not None else _load_direction(edit.direction, spec, d_model, where)
        read_slot, write, note = None, vector, ""
        if op.reads == "feature":
            read_slot = slot[edit.feature]
        elif op.reads == "projection":
            norm = vector.norm()
            if not torch.isfinite(norm) or norm == 0:
                raise SpecError("the direction has zero or non-finite norm", where=where)
            write = vector / norm
            read_slot = len(directions)
            directions.append(write)
        amount, note = _raw_amount(edit, vector, site, calibration, where)
        when_slot, when_above = None, 0.0
        if edit.when == "active":
            when_slot = slot[edit.feature]
        elif isinstance(edit.when, Condition):
            when_slot, when_above = slot[edit.when.feature], edit.when.above
        site_edits.append(SiteEdit(
            index=index, edit=edit, amount=amount, read_slot=read_slot,
            write=write.contiguous() if op.writes else None,
            when_slot=when_slot, when_above=when_above, scope=spec.scope_of(edit), note=note,
        ))
    return SitePlan(
        site=site, reader=reader,
        directions=torch.stack(directions, dim=1).contiguous() if directions else None,
        edits=tuple(site_edits),
    )


def _reader(sae: SAE, ids: list[int]) -> FeatureReader:
    full = sae.to(dtype=torch.float32)
    if sae.architecture == "topk":  # a topk feature depends on every pre-activation
        return FeatureReader(sae=full, feature_ids=tuple(ids), gather=torch.tensor(ids), sae_hash=sae.content_hash())
    return FeatureReader(sae=full.select(ids), feature_ids=tuple(ids), gather=None, sae_hash=sae.content_hash())


def _load_direction(ref: str, spec: Spec, d_model: int, where: str) -> torch.Tensor:
    file, _, key = ref.rpartition(":")
    path = Path(file).expanduser()
    if not path.is_absolute() and spec.base_dir:
        path = Path(spec.base_dir) / path
    return read_direction(path, key, d_model, where)


def read_direction(path: Path, key: str, d_model: int, where: str) -> torch.Tensor:
    """Tensor ``key`` of the safetensors file ``path`` as a float32 vector ``[d_model]``, checked: a float dtype,
    that shape, finite (also after the cast) and a non-zero norm. Any unreadable, truncated or corrupt file is a
    `SpecError` naming the file and key; the file is never unpickled (safetensors holds no code)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise SpecError(f"direction file {str(path)!r} does not exist", where=where)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if key not in keys:
                raise SpecError(f"direction file {path} has no tensor {key!r}; it has: {', '.join(keys) or 'none'}", where=where)
            vector = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise SpecError(f"cannot read direction file {path} as safetensors: {_first_line(exc)}", where=where) from None
    if vector.dim() != 1 or vector.numel() != d_model or not vector.is_floating_point():
        raise SpecError(f"direction {key!r} in {path} has shape {tuple(vector.shape)} ({str(vector.dtype).removeprefix('torch.')}); "
                        f"expected a float vector [{d_model}]", where=where)
    vector64 = vector.double()
    if not torch.isfinite(vector64).all() or not torch.isfinite(vector.float()).all():
        raise SpecError(f"direction {key!r} in {path} has non-finite values (NaN or infinity, or too large for float32)",
                        where=where)
    if float(vector64.norm()) == 0.0:
        raise SpecError(f"direction {key!r} in {path} is all zeros: a direction needs a non-zero norm", where=where)
    return vector.float()


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]


def _raw_amount(edit: Edit, vector: torch.Tensor, site: Site, calibration: "_Calibration", where: str) -> tuple[float, str]:
    if edit.units == "raw":
        return edit.amount, ""
    if edit.units == "feature":
        p99 = calibration.feature_p99(site, edit.feature, where)
        return edit.amount * p99, f"{edit.amount:g} feature units × p99 {p99:.4g}"
    mean_norm = calibration.mean_norm(site, where)
    if OPERATIONS[edit.op].lowers_to is Primitive.CONSTANT:  # a delta of norm amount·mean_norm along the vector
        return edit.amount * mean_norm / float(vector.norm()), f"{edit.amount:g} × mean norm {mean_norm:.4g} / |d| {float(vector.norm()):.4g}"
    return edit.amount * mean_norm, f"{edit.amount:g} × mean norm {mean_norm:.4g}"


class _Calibration:
    """Activations on steer's calibration text, gathered once per compile and only if asked."""

    def __init__(self, model: nn.Module, tokenizer, saes: dict[Site, SAE], cache: dict | None = None):
        self.model, self.tokenizer, self.saes = model, tokenizer, saes
        self._acts: dict = {} if cache is None else cache

    def activations(self, site: Site, where: str) -> torch.Tensor:
        key = (id(self.model), id(self.tokenizer), site)
        if key not in self._acts:
            if self.tokenizer is None:
                raise SpecError("`feature`/`norm` units need calibration text: pass the tokenizer to steer.compile", where=where)
            texts = resources.files("steer.data").joinpath("calibration.txt").read_text().splitlines()
            rows = []
            with torch.no_grad(), capture(self.model, [site]) as acts:
                for text in filter(None, texts):
                    ids = self.tokenizer(text, return_tensors="pt").input_ids.to(self.model.device)
                    self.model(ids)
                    rows.append(acts[site].pop()[0, 1:].float().cpu())  # drop the first (sink) token
            self._acts[key] = torch.cat(rows)  # (N, d)
        return self._acts[key]

    def mean_norm(self, site: Site, where: str) -> float:
        return float(self.activations(site, where).norm(dim=-1).mean())

    def feature_p99(self, site: Site, feature: int, where: str) -> float:
        sae = self.saes[site]
        if "p99" in sae.feature_stats and float(sae.feature_stats["p99"][feature]) > 0:
            return float(sae.feature_stats["p99"][feature])
        acts = sae.to(dtype=torch.float32).encode(self.activations(site, where))[:, feature]
        active = acts[acts > 0]
        if active.numel() == 0:
            raise SpecError(f"feature {feature} never fires on the calibration text, so `feature` units are undefined; use raw units", where=where)
        return float(torch.quantile(active, 0.99))
