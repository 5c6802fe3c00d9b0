"""Record the activation at sites during a forward pass, or rewrite it (for measurements).

``with capture(model, [site]) as acts: model(ids)`` leaves ``acts[site]`` a
list of ``(B, T, d)`` tensors, one per forward call. Hooks registered after
steering hooks on the same module see the steered value, which is what the tests
and calibration want. `capture` never changes an activation.

``with rewritten(model, site, fn): model(ids)`` replaces the site's ``(B, T, d)``
activation by ``fn(x)`` — for measurements that splice something in (an SAE's
reconstruction, a zero ablation, a probe delta); edits go through
`steer.applied`. Hooks are removed on exit in both.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from steer.models.adapters import Site, adapter_for


def site_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual-stream tensor a block receives (first positional arg or hidden_states)."""
    return args[0] if args else kwargs["hidden_states"]


def output_tensor(output) -> torch.Tensor:
    """The residual-stream tensor a module returns (a tensor, or a tuple's first item)."""
    return output if isinstance(output, torch.Tensor) else output[0]


@contextmanager
def capture(model: nn.Module, sites):
    adapter = adapter_for(model)
    records: dict[Site, list[torch.Tensor]] = {site: [] for site in sites}
    handles = []
    try:
        for site in sites:
            module, where = adapter.site_module(model, site)
            store = records[site]
            if where == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, kwargs, store=store: store.append(site_tensor(args, kwargs).detach().clone()),
                    with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(
                    lambda _m, _args, out, store=store: store.append(output_tensor(out).detach().clone())))
        yield records
    finally:
        for h in handles:
            h.remove()


@contextmanager
def rewritten(model: nn.Module, site: Site, fn):
    """Inside the block, the activation at ``site`` is ``fn(x)`` (a new tensor, same shape) in every forward call."""
    module, where = adapter_for(model).site_module(model, site)
    if where == "output":
        def hook(_module, _args, output):
            new = fn(output_tensor(output))
            return new if isinstance(output, torch.Tensor) else (new, *output[1:])
        handle = module.register_forward_hook(hook)
    else:
        def hook(_module, args, kwargs):
            new = fn(site_tensor(args, kwargs))
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
