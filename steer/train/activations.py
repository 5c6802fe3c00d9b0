"""Activations at a site, for training: early-stopped model passes, a shuffling buffer, an on-disk cache.

- `SitesReader` runs a model only as far as the deepest of its sites:
  `steer.models.capture` records every site's tensor and a second hook on the
  deepest site's module raises a private exception, so the blocks after it
  never run (a 30-layer model read at layer 10 costs about a third of a full
  pass, and reading layers 3, 10 and 17 costs what layer 17 alone does).
  `SiteReader` is the one-site case. The caller's model is never modified;
  the hooks are removed when the pass ends.
- `stream_activations` turns token rows into activation rows ``(N, d)``,
  leaving out the first ``skip_first`` positions of each row, and shards rows
  over data-parallel processes (row i goes to process ``i % world``).
- `ShuffleBuffer` mixes activations from many sequences before they reach the
  SAE (fill to capacity, shuffle, hand out half).
- `ActivationCache` keeps activations in a memmap (float32; float16 for the
  several sites of a multi-site run) so that several epochs, and several
  sites' SAEs, cost one model pass; it records how much is filled, so an
  interrupted fill resumes.

Nothing here trains; nothing here writes outside the cache file it is given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from steer.export.atomic import write_text_atomic
from steer.models.adapters import Site, adapter_for
from steer.models.capture import capture


class _SiteReached(Exception):
    """Raised by the stop hook once the deepest site's activation is recorded (private: never escapes `SitesReader`)."""


_ORDER_IN_BLOCK = {"resid_pre": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3}


def depth(site: Site) -> tuple[int, int]:
    """Where ``site`` sits in the forward pass: later sites compare greater."""
    return site.layer, _ORDER_IN_BLOCK[site.kind]


class SitesReader:
    """``reader(input_ids) → {site: (B, T, d)}``: the activations at ``sites``, running the model only up to the deepest."""

    def __init__(self, model: nn.Module, sites: Sequence[Site]):
        if not sites:
            raise ValueError("SitesReader needs at least one site")
        self.model, self.sites = model, tuple(sites)
        self.deepest = max(self.sites, key=depth)
        self.module, self.where = adapter_for(model).site_module(model, self.deepest)

    def __call__(self, input_ids: torch.Tensor) -> dict[Site, torch.Tensor]:
        def stop(*_args, **_kwargs):
            raise _SiteReached

        with capture(self.model, self.sites) as records:  # capture's hooks are registered first, so they run first
            if self.where == "input":
                handle = self.module.register_forward_pre_hook(stop)
            else:
                handle = self.module.register_forward_hook(stop)
            try:
                with torch.inference_mode():
                    self.model(input_ids=input_ids, use_cache=False)
            except _SiteReached:
                pass
            finally:
                handle.remove()
        return {site: records[site][0] for site in self.sites}


class SiteReader(SitesReader):
    """``reader(input_ids) → (B, T, d)``: the activation at one ``site``, running the model only up to it."""

    def __init__(self, model: nn.Module, site: Site):
        super().__init__(model, [site])
        self.site = site

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().__call__(input_ids)[self.site]


def stream_activations(
    rows: Iterable[torch.Tensor], reader: SitesReader, *, model_batch_size: int, skip_first: int,
    rank: int = 0, world: int = 1, skip_rows: int = 0, device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor | dict[Site, torch.Tensor], int]]:
    """``(activations (n, d) float32 on cpu — a dict of them by site for a multi-site reader —, rows consumed so far
    by this process)`` per model pass.

    ``skip_rows``: rows of this process's shard to pass over without running the model (resume).
    """
    batch: list[torch.Tensor] = []
    consumed = 0
    for index, row in enumerate(rows):
        if index % world != rank:
            continue
        consumed += 1
        if consumed <= skip_rows:
            continue
        batch.append(row)
        if len(batch) == model_batch_size:
            yield _activations(reader, batch, skip_first, device), consumed
            batch = []
    if batch:
        yield _activations(reader, batch, skip_first, device), consumed


def _activations(reader: SitesReader, batch: list[torch.Tensor], skip_first: int, device):
    ids = torch.stack(batch).to(device)                       # (B, T)
    out = reader(ids)

    def flat(acts: torch.Tensor) -> torch.Tensor:             # (B, T, d) -> (B·(T - skip), d)
        acts = acts[:, skip_first:]
        return acts.reshape(-1, acts.shape[-1]).float().cpu()

    return {site: flat(acts) for site, acts in out.items()} if isinstance(out, dict) else flat(out)


class ShuffleBuffer:
    """Mixes activations: filled to ``capacity``, shuffled, and half handed out per refill."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity, self.generator = capacity, generator
        self.held: list[torch.Tensor] = []
        self.size = 0

    def add(self, activations: torch.Tensor) -> None:
        self.held.append(activations)
        self.size += activations.shape[0]

    @property
    def full(self) -> bool:
        return self.size >= self.capacity

    def drain(self, keep: int) -> torch.Tensor:
        """All held rows but ``keep`` of them, shuffled; the kept ones stay for mixing with the next fill."""
        everything = torch.cat(self.held) if len(self.held) > 1 else self.held[0]
        everything = everything[torch.randperm(everything.shape[0], generator=self.generator)]
        keep = min(keep, everything.shape[0])
        out, rest = everything[keep:], everything[:keep]
        self.held, self.size = ([rest] if keep else []), keep
        return out


class ActivationCache:
    """A ``(capacity, d)`` memmap (float32, or float16 for multi-site runs) plus a small JSON noting how many rows
    are filled."""

    def __init__(self, path: Path, capacity: int, d: int, dtype: str = "float32"):
        self.path, self.capacity, self.d = Path(path), capacity, d
        self.meta_path = self.path.with_suffix(".json")
        meta = self._meta()
        same = meta and meta.get("capacity") == capacity and meta.get("d") == d and meta.get("dtype", "float32") == dtype
        mode = "r+" if same and self.path.exists() else "w+"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.array = np.lib.format.open_memmap(self.path, mode=mode, dtype=np.dtype(dtype), shape=(capacity, d))
        self.filled = int(meta.get("filled", 0)) if mode == "r+" else 0
        self.rows_consumed = int(meta.get("rows_consumed", 0)) if mode == "r+" else 0

    def _meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return {}

    @property
    def complete(self) -> bool:
        return self.filled >= self.capacity

    def append(self, activations: torch.Tensor, rows_consumed: int) -> None:
        n = min(activations.shape[0], self.capacity - self.filled)
        self.array[self.filled : self.filled + n] = activations[:n].numpy()
        self.filled += n
        self.rows_consumed = rows_consumed

    def flush(self) -> None:
        self.array.flush()
        write_text_atomic(self.meta_path, json.dumps({"capacity": self.capacity, "d": self.d, "dtype": self.dtype,
                                                      "filled": self.filled, "rows_consumed": self.rows_consumed}),
                          what="activation cache")

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.array[np.sort(indices.numpy())]).float()
