"""The reference lowering: runtime hooks that apply a Plan exactly (DESIGN §5–6).

``with steer.applied(model, plan) as run: model.generate(...)`` installs one
hook per edited site and removes every hook on exit, also after an exception,
leaving the model bit-identical (hooks never touch parameters).

Per token, a site's hook computes only what its edits read: the encoder
columns of the edited features (``|F|·d`` multiply-adds, not ``d_sae·d``; a topk
SAE needs its full pre-activation to know the rank), and ``x·û`` for projection
edits. Every edit's delta is ``coefficient · write-vector``, so all edits at a
site — which all read the same original x — are summed as one product::

    C = coefficients (B,T,E)  →  x + C @ W   with W the write vectors (E,d)

Scope: the first forward pass inside the context is the prompt; a token is a
*generation* token when its position (KV-cache length + offset, so padded
coordinates in a left-padded batch) is at or past the prompt's length. This is
the same with or without a KV cache. Open one context per prompt (batch) when a
spec uses ``scope: prompt|generation``, or pass ``prompt_length``.

Monitor edits record f_i(x) per token position in ``run.activations(i)``.

Per-row plans: ``steer.applied(model, [plan_0, None, plan_2, ...])`` — one entry per batch row — steers row i by
its own plan (None: unedited), exactly as that row alone under ``steer.applied(model, plan_i)``. At each site, the
rows are grouped by plan: each distinct plan's `SiteHook` (the same vectorised computation as above) runs once on
its rows only (``x.index_select`` → steer → ``index_copy``), so a site costs nothing for the rows that do not edit
it, and the Python loop is over the distinct plans, not rows or edits. Scope counts positions in the batch's padded
coordinates (the prompt is the padded width), which classifies every row's tokens as it does alone. It yields a
`RowsRun`; ``run[i]`` is row i's `RowRun`, whose monitor read-outs drop the row's left padding (taken from the first
call's ``attention_mask``), so they equal the row's read-outs alone.

Rows at different positions (``prompt_length=[P_0, P_1, ...]``, one per row): each row's positions are its own —
the call's ``position_ids`` (B, T), or KV-cache length + offset when it passes none — and its token at position p is
a generation token when p ≥ P_i. Monitors record each row at its own positions (a token the call's 2-D
``attention_mask`` masks out, a pad, is not recorded). This is how rows whose prompts and histories differ in
length — each with its own KV cache, no padding (`steer.demo.batch`) — are steered in one forward call.

Never registers a hook outside the edited sites; never mutates the Plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from steer.models.adapters import adapter_for, hidden_size
from steer.models.capture import output_tensor, site_tensor
from steer.ops import OPERATIONS
from steer.plan.ir import Plan, SitePlan


class SteeringRun:
    """What one `applied` context saw: positions for scope, monitored activations."""

    def __init__(self, plan: Plan, prompt_length: int | None):
        self.plan = plan
        self.prompt_length = prompt_length  # or, per row (set by `RowsRun`): a (B, 1) tensor
        self.positions: torch.Tensor | None = None  # (T,) positions of the current forward call, on the model's device
        # — or (B, T), each row's own (per-row prompt lengths); then `valid` (B, T) marks the tokens to record
        self.valid: torch.Tensor | None = None
        self._monitored: dict[int, torch.Tensor] = {}  # edit index → (B, capacity) buffer
        self._filled: dict[int, int] = {}  # edit index → positions recorded so far
        self._row_filled: dict[int, torch.Tensor] = {}  # edit index → (B,) per row, when positions are per row
        self._thresholds = {e.index: e.amount for sp in plan.sites for e in sp.edits if not OPERATIONS[e.op].writes}

    def activations(self, edit_index: int) -> torch.Tensor:
        """``(B, L)``: f_i(x) of monitor edit ``edit_index`` at each position seen so far."""
        if edit_index not in self._thresholds:
            raise KeyError(f"edit {edit_index} is not a monitor edit (monitor edits: {sorted(self._thresholds)})")
        return self._monitored[edit_index][:, : self._filled[edit_index]]

    def fired(self, edit_index: int) -> torch.Tensor:
        """``(B, L)`` bool: where the monitored feature is above its threshold."""
        return self.activations(edit_index) > self._thresholds[edit_index]

    # called by the hooks
    def _on_base_forward(self, _module, args, kwargs):
        self.positions, self.prompt_length = _positions(args, kwargs, self.prompt_length)

    def _record(self, edit_index: int, values: torch.Tensor) -> None:
        """Write ``values`` (B, T) at the current positions; the buffer doubles when full, so a decode step
        copies one column, not the whole history."""
        if self.positions is not None and self.positions.dim() == 2:
            self._record_rows(edit_index, values)
            return
        start = 0 if self.positions is None else int(self.positions[0])
        end = start + values.shape[1]
        held = self._monitored.get(edit_index)
        if held is None or held.shape[0] != values.shape[0]:
            held = values.new_zeros(values.shape[0], max(end, 64))
            self._filled[edit_index] = 0
        elif held.shape[1] < end:
            grown = held.new_zeros(held.shape[0], max(end, 2 * held.shape[1]))
            grown[:, : held.shape[1]] = held
            held = grown
        held[:, start:end] = values.detach()
        self._monitored[edit_index] = held
        self._filled[edit_index] = max(self._filled.get(edit_index, 0), end)

    def _record_rows(self, edit_index: int, values: torch.Tensor) -> None:
        """`_record` with per-row positions (B, T): row b's values go to its own columns; tokens not `valid` go to a
        spare last column (so a pad never overwrites a real position), outside what `activations` shows."""
        positions = self.positions
        seen = positions if self.valid is None else positions.masked_fill(~self.valid, -1)
        ends = seen.max(dim=1).values + 1  # (B,) each row's end after this call
        end = int(ends.max())
        held = self._monitored.get(edit_index)
        if held is None or held.shape[0] != values.shape[0]:
            held = values.new_zeros(values.shape[0], max(end, 64) + 1)
            self._row_filled[edit_index] = torch.zeros_like(ends)
        elif held.shape[1] - 1 < end:
            grown = held.new_zeros(held.shape[0], max(end, 2 * (held.shape[1] - 1)) + 1)
            grown[:, : held.shape[1] - 1] = held[:, :-1]
            held = grown
        spare = held.shape[1] - 1
        index = positions if self.valid is None else torch.where(self.valid, positions, spare)
        held.scatter_(1, index, values.detach())
        self._monitored[edit_index] = held
        self._row_filled[edit_index] = torch.maximum(self._row_filled[edit_index], ends)
        self._filled[edit_index] = int(self._row_filled[edit_index].max())


def _positions(args: tuple, kwargs: dict, prompt_length: int | None) -> tuple[torch.Tensor, int]:
    """The positions ``(T,)`` of a base-model forward call (KV-cache length + offset), and the prompt's length:
    ``prompt_length``, or past + T when it is None (the first call is the prompt)."""
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("inputs_embeds")
    length = tokens.shape[1]
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
    if prompt_length is None:
        prompt_length = past + length
    return torch.arange(past, past + length, device=tokens.device), prompt_length


class RowRun:
    """Row i of a per-row `applied` context: its plan and its monitor read-outs, as if it had run alone.

    ``activations(e)`` is ``(1, L)`` — the row's positions without its left padding — like a batch-of-one
    `SteeringRun`'s; a row whose plan is None monitors nothing."""

    def __init__(self, rows: RowsRun, row: int, run: SteeringRun | None, slot: int):
        self._rows, self.row, self._run, self._slot = rows, row, run, slot

    @property
    def plan(self) -> Plan | None:
        return None if self._run is None else self._run.plan

    def activations(self, edit_index: int) -> torch.Tensor:
        """``(1, L)``: f_i(x) of this row's monitor edit ``edit_index`` at each of its positions seen so far."""
        if self._run is None:
            raise KeyError(f"row {self.row} has no plan (None): it monitors nothing")
        read = self._run.activations(edit_index)[self._slot: self._slot + 1]
        if self._rows.row_prompt is not None:  # per-row positions: the row's own columns, up to its own end
            return read[:, : int(self._run._row_filled[edit_index][self._slot])]
        pad = self._rows.padding[self.row] if self._rows.padding is not None else 0
        return read[:, pad:]

    def fired(self, edit_index: int) -> torch.Tensor:
        """``(1, L)`` bool: where the monitored feature is above its threshold."""
        return self.activations(edit_index) > self._run._thresholds[edit_index]


class RowsRun(Sequence):
    """What one per-row `applied` context saw: ``run[i]`` is row i's `RowRun`.

    Rows that share a Plan object share one `SteeringRun` (``groups``: (run, rows), in order of first row).
    ``prompt_length``: one for the batch (positions in padded coordinates), or one per row (each row's own
    positions; see the module docstring)."""

    def __init__(self, plans: Sequence[Plan | None], prompt_length: int | Sequence[int] | None):
        self.plans = tuple(plans)
        self.row_prompt: torch.Tensor | None = None  # (B,) per-row prompt lengths
        if prompt_length is not None and not isinstance(prompt_length, int):
            lengths = [int(n) for n in prompt_length]
            if len(lengths) != len(self.plans):
                raise ValueError(f"per-row prompt lengths: {len(lengths)} for {len(self.plans)} row(s); give one per row")
            self.row_prompt = torch.tensor(lengths)
            prompt_length = None
        self.prompt_length = prompt_length
        self.positions: torch.Tensor | None = None
        self.padding: list[int] | None = None  # each row's leading masked positions, from the first call
        by_plan: dict[int, tuple[SteeringRun, list[int]]] = {}
        for i, plan in enumerate(self.plans):
            if plan is not None:
                by_plan.setdefault(id(plan), (SteeringRun(plan, prompt_length), []))[1].append(i)
        self.groups = list(by_plan.values())
        group_of = {i: (run, rows.index(i)) for run, rows in self.groups for i in rows}
        self.rows = tuple(RowRun(self, i, *group_of.get(i, (None, 0))) for i in range(len(self.plans)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    # called by the base model's pre-hook
    def _on_base_forward(self, _module, args, kwargs):
        self.positions, self.prompt_length = _positions(args, kwargs, self.prompt_length)
        if self.row_prompt is not None:
            self._per_row(kwargs)
            return
        if self.padding is None:
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == len(self.plans):
                self.padding = (mask.cumsum(-1) == 0).sum(-1).tolist()  # leading zeros: left padding
            else:
                self.padding = [0] * len(self.plans)
        for run, _rows in self.groups:
            run.positions, run.prompt_length = self.positions, self.prompt_length

    def _per_row(self, kwargs) -> None:
        """Each row's own positions (B, T): the call's ``position_ids``, else the cache positions; the tokens its 2-D
        ``attention_mask`` keeps."""
        batch, length = len(self.plans), self.positions.shape[0]
        given = kwargs.get("position_ids")
        if isinstance(given, torch.Tensor) and given.dim() == 2 and given.shape[1] == length:
            positions = given.to(self.positions.device).expand(batch, length)
        else:
            positions = self.positions.expand(batch, length)
        mask = kwargs.get("attention_mask")
        valid = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch:
            valid = mask[:, -length:].to(positions.device).bool()
        self.positions, self.padding = positions, [0] * batch
        prompt = self.row_prompt.to(positions.device)
        for run, rows in self.groups:
            index = torch.tensor(rows, device=positions.device)
            run.positions = positions.index_select(0, index)
            run.prompt_length = prompt.index_select(0, index)[:, None]  # (B_g, 1)
            run.valid = None if valid is None else valid.index_select(0, index)


class _Installed:
    """``on_output`` / ``on_input`` for a hook with ``steer(x) -> x' | None``."""

    def on_output(self, _module, _args, output):
        x = output_tensor(output)
        steered = self.steer(x)
        if steered is None:
            return None
        return steered if isinstance(output, torch.Tensor) else (steered, *output[1:])

    def on_input(self, _module, args, kwargs):
        x = site_tensor(args, kwargs)
        steered = self.steer(x)
        if steered is None:
            return None
        if args:
            return (steered, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": steered}


class _Group:
    """The writing edits of one operation at a site: one coefficient expression for all of them.

    A linear op (``coefficient(a, r, σ) = k·r``) with a constant σ is *folded*: its factors k go into its
    rows of the write matrix once, and a call only reads r."""

    def __init__(self, name: str, edits: list, dtype, device, sigma: float | None, reads_width: int | None):
        op = OPERATIONS[name]
        self.coefficient, self.reads = op.coefficient, op.reads
        self.width = len(edits)
        self.amounts = torch.tensor([e.amount for e in edits], dtype=dtype, device=device)      # (G,)
        slots = [e.read_slot for e in edits]
        self.slots = torch.tensor(slots, device=device) if self.reads != "nothing" else None   # (G,)
        self.all_slots = slots == list(range(reads_width or -1))  # reads every slot in order: no gather
        constant_sigma = sigma if op.reads == "feature" else 1.0  # projection coefficients carry no σ
        self.fold = None
        if op.linear and constant_sigma is not None:
            self.fold = torch.as_tensor(self.coefficient(self.amounts, torch.ones_like(self.amounts), constant_sigma),
                                        dtype=dtype)  # (G,)

    def read(self, f, proj):
        source = f if self.reads == "feature" else proj
        return source if self.all_slots else source.index_select(-1, self.slots)  # (B,T,G)


class SiteHook(_Installed):
    """The hook of one site; tensors cast once to the model's dtype and device.

    The writing edits are grouped by operation; each group's coefficients are one expression over its
    read slots (``coefficient(amounts (G,), reads (B,T,G), sigma)``), conditions one ``where`` over all
    edits, scope one mask, and the delta one ``(B,T,E) @ (E,d)`` product.
    """

    def __init__(self, site_plan: SitePlan, run: SteeringRun, dtype: torch.dtype, device: torch.device):
        self.run = run
        reader = site_plan.reader
        self.sae = reader.sae.to(dtype=dtype, device=device) if reader else None
        self.gather = reader.gather.to(device) if reader and reader.gather is not None else None
        self.directions = site_plan.directions.to(dtype=dtype, device=device) if site_plan.directions is not None else None
        self.edits = site_plan.edits
        self.monitors = [e for e in self.edits if not OPERATIONS[e.op].writes]  # read-outs
        self.encoder = self._folded_encoder()
        self.sigma = sigma = self._constant_sigma()  # None: per-token, from SAE.normalize at each call
        writers = [e for e in self.edits if e.write is not None]
        names = list(dict.fromkeys(e.op for e in writers))  # group order: first appearance
        ordered = [e for name in names for e in writers if e.op == name]
        self.writers = ordered
        widths = {"feature": self.sae.d_sae if self.sae is not None and self.gather is None else None,
                  "projection": self.directions.shape[1] if self.directions is not None else None, "nothing": None}
        self.groups = [_Group(name, [e for e in ordered if e.op == name], dtype, device, sigma,
                              widths[OPERATIONS[name].reads]) for name in names]
        self.write = torch.stack([e.write for e in ordered]).to(dtype=dtype, device=device) if ordered else None  # (E, d)
        # folded groups' factors live in their write rows; `fold` restores the coefficients for coefficients()
        self.fold = None
        if ordered and any(g.fold is not None for g in self.groups):
            self.fold = torch.cat([g.fold if g.fold is not None else torch.ones(g.width, dtype=dtype, device=device)
                                   for g in self.groups])  # (E,)
            self.write = self.write * self.fold[:, None]
        # coefficients() answers in the plan's order of writing edits (the graft fits by it)
        self.order = torch.tensor([ordered.index(e) for e in writers], device=device) if ordered else None
        conditioned = [e.when_slot is not None for e in ordered]
        self.when = None
        if any(conditioned):
            slots = torch.tensor([e.when_slot if e.when_slot is not None else 0 for e in ordered], device=device)
            above = torch.tensor([e.when_above for e in ordered], dtype=dtype, device=device)
            self.when = (slots, above, torch.tensor(conditioned, device=device))                # (E,) each
        self.scoped = any(e.scope != "all" for e in ordered)
        if self.scoped:
            self.on_prompt = torch.tensor([e.scope != "generation" for e in ordered], device=device)  # (E,)
            self.on_generation = torch.tensor([e.scope != "prompt" for e in ordered], device=device)

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The summed delta of the site's edits at x ``(B,T,d)``, or None if nothing writes."""
        C = self._grouped(x)
        return None if C is None else C @ self.write  # (B,T,E) @ (E,d) → (B,T,d)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(B,T,E)``: each writing edit's coefficient at x, in the plan's order (the graft fit's target)."""
        C = self._grouped(x)
        if C is None:
            return None
        if self.fold is not None:
            C = C * self.fold
        return C.index_select(-1, self.order)

    def _folded_encoder(self):
        """``(W^T (F,d), b_enc, c)`` for the fused encoder ``linear(c·x − b_dec, W^T, b_enc)`` when the SAE's input
        scale c is a constant (none, or an expected_average factor); None for per-token normalisation, which
        takes the general path."""
        sae = self.sae
        if sae is None or sae.normalize_activations not in ("none", "expected_average_only_in"):
            return None
        c = 1.0
        if sae.normalize_activations == "expected_average_only_in" and sae.norm_scaling_factor is not None:
            c = float(sae.norm_scaling_factor)
        return sae.W_enc.T.contiguous(), sae.b_enc, c

    def _constant_sigma(self) -> float | None:
        """The SAE's output scale σ when it is the same for every token, else None."""
        if self.sae is None:
            return 1.0
        if self.sae.normalize_activations == "none":
            return 1.0
        if self.sae.normalize_activations == "expected_average_only_in":
            factor = self.sae.norm_scaling_factor
            return 1.0 if factor is None else 1.0 / float(factor)
        return None

    def _grouped(self, x: torch.Tensor) -> torch.Tensor | None:
        f = sigma = proj = None
        if self.sae is not None:
            if self.encoder is not None:
                sigma = self.sigma
                weight, bias, c = self.encoder
                x_in = x * c if c != 1.0 else x  # x̃, as SAE.normalize gives it
                if self.sae.apply_b_dec_to_input:
                    x_in = x_in - self.sae.b_dec
                f = self.sae.activate(torch.nn.functional.linear(x_in, weight, bias))  # (B,T,F)
            else:
                x_norm, _, sigma = self.sae.normalize(x)
                f = self.sae.activate(self.sae.pre_activation(x_norm))  # (B,T,F) — (B,T,d_sae) for topk
            if self.gather is not None:
                f = f[..., self.gather]
            for e in self.monitors:
                self.run._record(e.index, f[..., e.read_slot])
        if self.write is None:
            return None
        if self.directions is not None:
            proj = x @ self.directions  # (B,T,P)
        parts = []
        for g in self.groups:
            read = None if g.slots is None else g.read(f, proj)  # (B,T,G)
            c = read if g.fold is not None else g.coefficient(g.amounts, read, sigma)  # sigma: a float, or (B,T,1)
            parts.append(c.expand(*x.shape[:-1], g.width) if c.dim() < 3 else c)
        C = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (B,T,E)
        if self.when is not None:
            slots, above, conditioned = self.when
            C = torch.where(~conditioned | (f.index_select(-1, slots) > above), C, 0.0)
        if self.scoped:
            generated = (self.run.positions >= self.run.prompt_length)[..., None]  # (T,1), or (B,T,1) per row
            C = C * torch.where(generated, self.on_generation, self.on_prompt)  # (T,E) or (B,T,E) mask
        return C

    def steer(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x + delta`` (one fused ``addmm``), or None if nothing writes."""
        C = self._grouped(x)
        if C is None:
            return None
        return torch.addmm(x.reshape(-1, x.shape[-1]), C.reshape(-1, C.shape[-1]), self.write).view(x.shape)


class RowsHook(_Installed):
    """One site's hook under per-row plans: each distinct plan's `SiteHook` steers only its own rows.

    ``parts``: (hook, rows) per distinct plan editing the site, rows disjoint. A part covering the whole batch in
    order runs on x itself (the single-plan path); others on ``x.index_select(0, rows)``, written back with
    ``index_copy``. Every part reads the original x."""

    def __init__(self, parts: list[tuple[SiteHook, list[int]]], batch: int, device: torch.device):
        self.batch = batch
        self.parts = [(hook, None if rows == list(range(batch)) else torch.tensor(rows, device=device))
                      for hook, rows in parts]

    def steer(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.shape[0] != self.batch:
            raise ValueError(f"per-row plans: {self.batch} plan(s) for a batch of {x.shape[0]} row(s); pass one plan "
                             "(or None) per row")
        out = None
        for hook, rows in self.parts:
            if rows is None:  # the only part: every row, in order
                return hook.steer(x)
            steered = hook.steer(x.index_select(0, rows))
            if steered is not None:
                if out is None:
                    out = x.clone()
                out.index_copy_(0, rows, steered)
        return out


def _needs_clock(plan: Plan) -> bool:
    """Whether the plan's hooks read positions (a scope) or record them (a monitor)."""
    return plan.needs_positions or any(sp.reader and any(not OPERATIONS[e.op].writes for e in sp.edits)
                                       for sp in plan.sites)


def _rows_of(plans) -> tuple[Plan | None, ...]:
    if isinstance(plans, (str, bytes)) or not isinstance(plans, Sequence):
        raise TypeError(f"applied takes a Plan, or a sequence of Plan or None (one per batch row); got {type(plans).__name__}")
    if not plans:
        raise ValueError("applied: per-row plans must name at least one row")
    for i, plan in enumerate(plans):
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"applied: row {i}'s plan is a {type(plan).__name__}, not a Plan or None")
    return tuple(plans)


@contextmanager
def applied(model: nn.Module, plan: Plan | Sequence[Plan | None], *,
            prompt_length: int | Sequence[int] | None = None):
    """Apply ``plan`` to ``model`` inside the block; yields a `SteeringRun`.

    ``plan`` may be a sequence as long as the batch instead: row i gets ``plan[i]`` (None: unedited), exactly as
    if it ran alone; yields a `RowsRun` (``run[i]``: row i's read-outs). With per-row plans, ``prompt_length`` may
    be one per row: each row is then at its own positions (see the module docstring)."""
    adapter = adapter_for(model)
    per_row = not isinstance(plan, Plan)
    if not per_row and prompt_length is not None and not isinstance(prompt_length, int):
        raise TypeError("applied: per-row prompt lengths need per-row plans (a sequence of Plan or None)")
    plans = _rows_of(plan) if per_row else (plan,)
    for p in plans:
        if p is not None and (p.hidden_size, p.n_layers) != (hidden_size(model), adapter.n_layers(model)):
            raise ValueError(
                f"plan was compiled for d={p.hidden_size}, {p.n_layers} layers; "
                f"this model has d={hidden_size(model)}, {adapter.n_layers(model)} layers"
            )
    param = next(model.parameters())
    run = RowsRun(plans, prompt_length) if per_row else SteeringRun(plan, prompt_length)
    handles = []

    def install(module, where, hook):
        if where == "output":
            handles.append(module.register_forward_hook(hook.on_output))
        else:
            handles.append(module.register_forward_pre_hook(hook.on_input, with_kwargs=True))

    try:
        if any(p is not None and _needs_clock(p) for p in plans):
            base = model.get_submodule(adapter.base)
            handles.append(base.register_forward_pre_hook(run._on_base_forward, with_kwargs=True))
        if not per_row:
            for site_plan in plan.sites:
                module, where = adapter.site_module(model, site_plan.site)
                install(module, where, SiteHook(site_plan, run, param.dtype, param.device))
        else:
            sites: dict[tuple[int, str], tuple[nn.Module, str, list]] = {}  # hooked point → its parts
            for group_run, rows in run.groups:
                for site_plan in group_run.plan.sites:
                    module, where = adapter.site_module(model, site_plan.site)
                    parts = sites.setdefault((id(module), where), (module, where, []))[2]
                    parts.append((SiteHook(site_plan, group_run, param.dtype, param.device), rows))
            for module, where, parts in sites.values():
                install(module, where, RowsHook(parts, len(plans), param.device))
        yield run
    finally:
        for handle in handles:
            handle.remove()
