"""Where training batches come from: a tensor, an on-disk activation cache, or a live model stream.

Every source hands out the batches of global steps ``start, start+1, …`` as
``(batch_size / world, d)`` float32 tensors for this process, can give a sample
for initialisation and for the final statistics, and reports the state a
checkpoint needs to resume it:

- `TensorSource` (activations given in memory) and `CachedSource` (the model
  run once over ``tokens / epochs`` corpus tokens by `fill_caches`,
  activations kept in a memmap — one per site when a run trains several
  sites' SAEs from the same pass) are *exact* on resume: the batch of step s
  is fixed by the seed (epoch e visits the rows in ``randperm(N, seed + e)``
  order).
- `StreamingSource` runs the model as training goes, through a shuffling
  buffer. On resume it skips the token rows it had already read; the
  activations that sat in its buffer at the interruption are not replayed.
  When the corpus runs out it starts over (a message says so).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from steer.data.corpus import Corpus, token_sequences
from steer.models.adapters import Site
from steer.train.activations import ActivationCache, ShuffleBuffer, SiteReader, SitesReader, stream_activations
from steer.train.config import TrainConfig, TrainError

INIT_SAMPLE = 16384
"""Activations used to initialise b_dec and the input scale."""


class TensorSource:
    """Batches drawn from an ``(N, d)`` tensor (or cache), a fresh permutation per epoch."""

    def __init__(self, rows, n_rows: int, config: TrainConfig, rank: int = 0, world: int = 1):
        self.rows_of = rows  # callable: LongTensor of row indices → (n, d)
        self.n = n_rows
        self.config, self.rank, self.world = config, rank, world
        if self.n < config.batch_size:
            raise TrainError(f"only {self.n} activations for a batch_size of {config.batch_size}; give more tokens or a smaller batch_size")

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.config.seed * 1000 + epoch))

    def batches(self, start_step: int) -> Iterator[torch.Tensor]:
        B = self.config.batch_size
        per_epoch = self.n // B  # a partial batch at an epoch's end is skipped
        local = B // self.world
        epoch, permutation = -1, None
        for step in range(start_step, self.config.steps):
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                permutation = self._permutation(epoch)
            first = (step % per_epoch) * B + self.rank * local
            yield self.rows_of(permutation[first : first + local])

    def sample(self, n: int) -> torch.Tensor:
        return self.rows_of(self._permutation(-1)[: min(n, self.n)])

    def state(self) -> dict:
        return {}


def tensor_source(activations: torch.Tensor, config: TrainConfig, rank: int = 0, world: int = 1) -> TensorSource:
    acts = activations.detach().float().cpu()
    if acts.dim() != 2:
        raise TrainError(f"activations must be (N, d_in), got shape {tuple(acts.shape)}")
    return TensorSource(lambda idx: acts[idx], acts.shape[0], config, rank, world)


class CachedSource(TensorSource):
    """Batches from an `ActivationCache` this process filled (``fill_caches``): its own shard, reshuffled each epoch."""

    def __init__(self, config: TrainConfig, cache: ActivationCache, *, rank: int, world: int):
        self.cache = cache
        super().__init__(lambda idx: self.cache.rows(idx), cache.filled, config, rank, world)
        self.local_batch = config.batch_size // world

    def batches(self, start_step: int) -> Iterator[torch.Tensor]:
        # the permutation is over this process's own cache: each process draws its local batch from its shard
        B = self.local_batch
        per_epoch = self.n // B
        epoch, permutation = -1, None
        for step in range(start_step, self.config.steps):
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                permutation = self._permutation(epoch)
            first = (step % per_epoch) * B
            yield self.rows_of(permutation[first : first + B])

    def state(self) -> dict:
        return {"cached": self.cache.filled}


def distinct_activations(config: TrainConfig, world: int) -> int:
    """Activations each process caches: ``tokens / epochs`` over the data-parallel processes."""
    return -(-config.tokens // config.epochs) // world


FLUSH_EVERY = 32
"""Model batches between flushes of the caches while filling (what an interruption can lose)."""


def fill_caches(config: TrainConfig, corpus: Corpus, tokenizer, reader: SitesReader, caches: dict[Site, ActivationCache],
                *, rank: int, world: int, device, progress: bool) -> None:
    """One model pass over the corpus's training split fills every site's cache (resuming where they stopped).

    A cache left short by a corpus that ran out gets its capacity lowered to what it holds (a message says so).
    """
    from tqdm.auto import tqdm

    sites = list(caches)
    resume = min(sites, key=lambda site: caches[site].filled)  # caches flushed apart by a crash: redo from the least full
    for site in sites:
        caches[site].filled, caches[site].rows_consumed = caches[resume].filled, caches[resume].rows_consumed
    lead = caches[resume]
    if lead.complete:
        return
    rows = token_sequences(corpus.documents("train", config.held_out), tokenizer, config.context_size)
    bar = tqdm(total=lead.capacity, initial=lead.filled, unit="tok", dynamic_ncols=True, disable=not progress,
               desc=f"caching activations at {len(sites)} site{'s' * (len(sites) > 1)}")
    try:
        for batches, (acts, consumed) in enumerate(stream_activations(
                rows, reader, model_batch_size=config.model_batch_size, skip_first=config.skip_first, rank=rank,
                world=world, skip_rows=lead.rows_consumed, device=device), start=1):
            acts = acts if isinstance(acts, dict) else {sites[0]: acts}
            before = lead.filled
            for site in sites:
                caches[site].append(acts[site], consumed)
            bar.update(lead.filled - before)
            if lead.complete:
                break
            if batches % FLUSH_EVERY == 0:
                for cache in caches.values():
                    cache.flush()
    finally:
        for cache in caches.values():
            cache.flush()
        bar.close()
    if not lead.complete:
        print(f"steer: the corpus's training split gave {lead.filled} of the {lead.capacity} distinct activations "
              f"asked for; training repeats them", file=sys.stderr)
        for cache in caches.values():
            cache.capacity = cache.filled


class StreamingSource:
    """Activations straight from the model, mixed in a shuffling buffer; the corpus is cycled when it runs out."""

    def __init__(self, config: TrainConfig, corpus: Corpus, tokenizer, reader: SiteReader, *, rank: int, world: int,
                 device, rows_consumed: int = 0, passes: int = 0):
        self.config, self.corpus, self.tokenizer, self.reader = config, corpus, tokenizer, reader
        self.rank, self.world, self.device = rank, world, device
        self.rows_consumed, self.passes = rows_consumed, passes
        self.buffer = ShuffleBuffer(config.buffer_size // world, torch.Generator().manual_seed(config.seed + 7919 * rank + 1))
        self._stream = self._activations()

    def _activations(self) -> Iterator[torch.Tensor]:
        c = self.config
        while True:
            rows = token_sequences(self.corpus.documents("train", c.held_out), self.tokenizer, c.context_size)
            produced = False
            for acts, consumed in stream_activations(rows, self.reader, model_batch_size=c.model_batch_size,
                                                     skip_first=c.skip_first, rank=self.rank, world=self.world,
                                                     skip_rows=self.rows_consumed, device=self.device):
                self.rows_consumed = consumed
                produced = True
                yield acts
            if not produced and self.rows_consumed == 0:
                raise TrainError(f"the corpus {self.corpus.spec!r} gives no full {c.context_size}-token sequence for this process")
            self.passes += 1
            self.rows_consumed = 0
            print(f"steer: corpus exhausted; starting pass {self.passes + 1} over it", file=sys.stderr)

    def _fill(self) -> None:
        while not self.buffer.full:
            self.buffer.add(next(self._stream))

    def batches(self, start_step: int) -> Iterator[torch.Tensor]:
        local = self.config.batch_size // self.world
        ready = torch.empty(0, self.reader_dim())
        for _ in range(start_step, self.config.steps):
            while ready.shape[0] < local:
                self._fill()
                ready = torch.cat([ready, self.buffer.drain(keep=self.buffer.capacity // 2)])
            batch, ready = ready[:local], ready[local:]
            yield batch

    def reader_dim(self) -> int:
        from steer.models.adapters import hidden_size

        return hidden_size(self.reader.model)

    def sample(self, n: int) -> torch.Tensor:
        """Activations held in the buffer (filled first), topped up from the stream to ``n``."""
        self._fill()
        held = torch.cat(self.buffer.held)
        while held.shape[0] < n:
            held = torch.cat([held, next(self._stream)])
        return held[torch.randperm(held.shape[0], generator=torch.Generator().manual_seed(self.config.seed))][:n]

    def state(self) -> dict:
        return {"rows_consumed": self.rows_consumed, "passes": self.passes}
