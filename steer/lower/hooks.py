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

Never registers a hook outside the edited sites; never mutates the Plan.
"""

from __future__ import annotations

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
        self.prompt_length = prompt_length
        self.positions: torch.Tensor | None = None  # (T,) positions of the current forward call
        self._monitored: dict[int, torch.Tensor] = {}  # edit index → (B, L)
        self._thresholds = {e.index: e.amount for sp in plan.sites for e in sp.edits if not OPERATIONS[e.op].writes}

    def activations(self, edit_index: int) -> torch.Tensor:
        """``(B, L)``: f_i(x) of monitor edit ``edit_index`` at each position seen so far."""
        if edit_index not in self._thresholds:
            raise KeyError(f"edit {edit_index} is not a monitor edit (monitor edits: {sorted(self._thresholds)})")
        return self._monitored[edit_index]

    def fired(self, edit_index: int) -> torch.Tensor:
        """``(B, L)`` bool: where the monitored feature is above its threshold."""
        return self.activations(edit_index) > self._thresholds[edit_index]

    # called by the hooks
    def _on_base_forward(self, _module, args, kwargs):
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("inputs_embeds")
        length = tokens.shape[1]
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if self.prompt_length is None:
            self.prompt_length = past + length
        self.positions = torch.arange(past, past + length)

    def _record(self, edit_index: int, values: torch.Tensor) -> None:
        start = 0 if self.positions is None else int(self.positions[0])
        end = start + values.shape[1]
        held = self._monitored.get(edit_index)
        if held is None or held.shape[0] != values.shape[0]:
            held = values.new_zeros(values.shape[0], 0)
        if held.shape[1] < end:
            held = torch.cat([held, held.new_zeros(held.shape[0], end - held.shape[1])], dim=1)
        held[:, start:end] = values.detach()
        self._monitored[edit_index] = held


class SiteHook:
    """The hook of one site; tensors cast once to the model's dtype and device."""

    def __init__(self, site_plan: SitePlan, run: SteeringRun, dtype: torch.dtype, device: torch.device):
        self.run = run
        reader = site_plan.reader
        self.sae = reader.sae.to(dtype=dtype, device=device) if reader else None
        self.gather = reader.gather.to(device) if reader and reader.gather is not None else None
        self.directions = site_plan.directions.to(dtype=dtype, device=device) if site_plan.directions is not None else None
        self.edits = site_plan.edits
        self.writers = [e for e in self.edits if e.write is not None]
        self.write = torch.stack([e.write for e in self.writers]).to(dtype=dtype, device=device) if self.writers else None  # (E, d)
        self.coefficient = [OPERATIONS[e.op].coefficient for e in self.writers]
        self.reads = [OPERATIONS[e.op].reads for e in self.writers]
        self.monitors = [e for e in self.edits if not OPERATIONS[e.op].writes]  # read-outs
        self.scoped = any(e.scope != "all" for e in self.edits)

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The summed delta of the site's edits at x ``(B,T,d)``, or None if nothing writes."""
        C = self.coefficients(x)
        return None if C is None else C @ self.write  # (B,T,E) @ (E,d) → (B,T,d)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(B,T,E)``: each writing edit's coefficient at x (the graft fit's target), or None if nothing writes."""
        f = sigma = proj = None
        if self.sae is not None:
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
        if isinstance(sigma, torch.Tensor):
            sigma = sigma[..., 0]  # (B,T)
        generated = (self.run.positions >= self.run.prompt_length).to(x.device) if self.scoped else None  # (T,)
        C = x.new_zeros(x.shape[:-1] + (len(self.writers),))  # (B,T,E)
        for j, (e, coefficient, reads) in enumerate(zip(self.writers, self.coefficient, self.reads)):
            read = f[..., e.read_slot] if reads == "feature" else proj[..., e.read_slot] if reads == "projection" else None
            c = coefficient(e.amount, read, sigma)
            if e.when_slot is not None:
                c = torch.where(f[..., e.when_slot] > e.when_above, c, 0.0)
            if e.scope != "all":
                c = torch.where(generated if e.scope == "generation" else ~generated, c, 0.0)
            C[..., j] = c
        return C

    def on_output(self, _module, _args, output):
        x = output_tensor(output)
        delta = self.delta(x)
        if delta is None:
            return None
        steered = x + delta
        return steered if isinstance(output, torch.Tensor) else (steered, *output[1:])

    def on_input(self, _module, args, kwargs):
        x = site_tensor(args, kwargs)
        delta = self.delta(x)
        if delta is None:
            return None
        if args:
            return (x + delta, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x + delta}


@contextmanager
def applied(model: nn.Module, plan: Plan, *, prompt_length: int | None = None):
    """Apply ``plan`` to ``model`` inside the block; yields a `SteeringRun`."""
    adapter = adapter_for(model)
    if (plan.hidden_size, plan.n_layers) != (hidden_size(model), adapter.n_layers(model)):
        raise ValueError(
            f"plan was compiled for d={plan.hidden_size}, {plan.n_layers} layers; "
            f"this model has d={hidden_size(model)}, {adapter.n_layers(model)} layers"
        )
    param = next(model.parameters())
    run = SteeringRun(plan, prompt_length)
    handles = []
    try:
        if plan.needs_positions or any(sp.reader and any(not OPERATIONS[e.op].writes for e in sp.edits) for sp in plan.sites):
            base = model.get_submodule(adapter.base)
            handles.append(base.register_forward_pre_hook(run._on_base_forward, with_kwargs=True))
        for site_plan in plan.sites:
            module, where = adapter.site_module(model, site_plan.site)
            hook = SiteHook(site_plan, run, param.dtype, param.device)
            if where == "output":
                handles.append(module.register_forward_hook(hook.on_output))
            else:
                handles.append(module.register_forward_pre_hook(hook.on_input, with_kwargs=True))
        yield run
    finally:
        for handle in handles:
            handle.remove()
