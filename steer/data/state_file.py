"""Save and load nested training state (a model's and an optimizer's state dicts, counters, RNG states) without pickle.

``save_state(path, state)`` writes one safetensors file: every tensor of
``state`` under its path (``optimizer/state/0/exp_avg``), and the rest of the
structure as JSON in the file's ``__metadata__`` (``steer_state``), tensors
replaced by references. Dicts keep their key types (an optimizer's state is
keyed by ints), tuples stay tuples. ``load_state(path)`` rebuilds it. Nothing
is ever unpickled, so a checkpoint from anywhere runs no code; a damaged or
foreign file is a `SteerError` naming it. The file is written beside its name
and renamed into place (`steer.export.atomic.atomic_file`).

Holds: dict, list, tuple, str, int, float (also inf/NaN), bool, None, tensors.
Anything else is a `TypeError` at save time (a bug in the caller, not the user's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from steer.errors import SteerError

METADATA_KEY = "steer_state"
FORMAT = "steer state v1"


def save_state(path, state, *, error=SteerError) -> None:
    """Write ``state`` to the safetensors file ``path`` atomically (see the module docstring)."""
    from safetensors.torch import save_file

    from steer.export.atomic import atomic_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, "", tensors)
    metadata = {"format": FORMAT, METADATA_KEY: json.dumps(structure)}
    with atomic_file(path, what="checkpoint", error=error) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_state(path, *, error=SteerError):
    """The state saved by `save_state` at ``path``; ``error`` (a SteerError class) if it cannot be read."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT or METADATA_KEY not in metadata:
                raise error(f"not a steer state file (no {METADATA_KEY!r} metadata)", where=str(path))
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return _decode(json.loads(metadata[METADATA_KEY]), tensors)
    except SteerError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise error(f"cannot read {path.name}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                    where=str(path)) from None


def _encode(obj, at: str, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        key = at or "tensor"
        tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"tensor": key}
    if isinstance(obj, dict):
        return {"dict": [[_key(k), _encode(v, f"{at}/{k}" if at else str(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{at}/{i}" if at else str(i), tensors) for i, v in enumerate(obj)]
        return {"tuple" if isinstance(obj, tuple) else "list": items}
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return {"value": obj}
    raise TypeError(f"save_state cannot store {type(obj).__name__} at {at or 'the top'}")


def _key(k):
    if isinstance(k, bool) or not isinstance(k, (str, int)):
        raise TypeError(f"save_state stores dict keys that are str or int, not {type(k).__name__}")
    return [type(k).__name__, k]


def _decode(node, tensors: dict[str, torch.Tensor]):
    (kind, value), = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {(int(k) if t == "int" else str(k)): _decode(v, tensors) for (t, k), v in value}
    if kind == "list":
        return [_decode(v, tensors) for v in value]
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in value)
    if kind == "value":
        return value
    raise ValueError(f"unknown node {kind!r}")
