"""The demo's decoder: every active user's continuations as rows of one forward call per step, each exactly as alone.

A `Request` is one user's generation: three continuations of the prompt (unsteered, steered, and the KL
reference: the unsteered model fed the steered tokens; see `steer.demo.engine`). `Scheduler` runs one thread that
owns the model's forward passes: `Scheduler.run` queues a request and yields its snapshots; at every step the
thread feeds every pending continuation of every active request as one row of one forward call (`decode_rows`),
then samples each row with its own generator, computes each request's KL and hands each request its snapshot.
A request that joins is prefilled first (`prefill_rows`: its prompt, in calls of its own); one that ends or whose
reader goes away (`Scheduler.run`'s generator closed) is dropped between steps.

**Exactness** — each user gets, bit for bit, what the same request gets alone (greedy and sampled tokens, KL,
monitor read-outs). Three things make a row's numbers independent of the other rows:

* *Own keys and values, own attention.* Continuations differ in length, and padding them to one length would
  change the order of the attention's sums. So each keeps its keys and values in its own buffers (`RowCache`),
  and during a decode call the model's attention implementation is `rows_attention`: the projections, MLPs and
  head run batched, and each row attends to its own keys and values only. For the plain softmax attention of
  ``sdpa`` and ``eager`` models this is two batched products over the rows with equally many keys, which give
  each row the same bits however many rows share them (measured; transformers' sdpa kernel does not, so it is
  not used for this); anything else (a logit soft-cap, attention sinks, ...) is the model's own attention
  function called on each row alone. Each row is at its own positions (``position_ids``), and `steer.applied`
  takes one prompt length per row (scope, monitors).
* *Batch-invariant products.* A row of a batched linear layer comes out the same whatever the other rows are,
  provided the batch has a multiple of `ROW_MULTIPLE` rows: measured on this CPU's MKL kernels, every row of an
  (M×K)·(K×N) product equals its row in any other product whose M is a multiple of 4 (or ≥ 12, at any position),
  while for other small M the rows of the last partial group of four are summed in another order. The decode
  batch is padded with idle rows to that multiple — one user too (three rows and one idle row).
* *One plan object per row.* `steer.applied` runs one site hook per distinct Plan over its rows; every row
  carries its own copy of its plan, so a hook's products see that one row, alone or not.

The prefill calls are the same alone or not (each row of one request alone), so only decoding is shared. The
two "measured" properties are the CPU kernels' (MKL on AVX2 here), not promises of torch: on other kernels (another
BLAS, a GPU) tests/test_demo_batch.py, which checks the whole claim on four tiny architectures and the default
model, is what says whether they hold.

Prefill uses the model's own attention and KV cache (then copied into the row buffers), so masks, sliding
windows and every architecture's attention details are the model's; a decode row attends to its whole buffer
(the last ``sliding_window`` keys on a sliding-window layer, as transformers' own cache keeps them).
"""

from __future__ import annotations

import copy
import queue
import sys
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from steer.generate import Sampling, cache_keyword, cache_of, last_logit_only
from steer.lower.hooks import applied
from steer.ops import OPERATIONS
from steer.plan.ir import Plan

ROW_MULTIPLE = 4
"""A decode call's rows are padded with idle rows to a multiple of this (see the module docstring)."""

ROWS_ATTENTION = "steer_rows"
"""The attention implementation name `rows_attention` is registered under (transformers' AttentionInterface)."""


# -- one continuation, one request ---------------------------------------------------------------------------------

class Continuation:
    """One continuation of the prompt, fed step by step: serially through its own transformers KV cache
    (`feed`), or as a row of a batch through its `RowCache` (`prefill_rows`, `decode_rows`)."""

    def __init__(self, prompt: torch.Tensor, plan: Plan | None, monitor_index: int | None, seed: int,
                 max_new_tokens: int):
        self.plan = plan
        self.row_plan = copy.copy(plan) if plan is not None else None  # its own object: a site hook sees this row alone
        self.monitor_index = monitor_index
        self.prompt_length = prompt.shape[1]
        self.capacity = self.prompt_length + max_new_tokens + 1  # every position it can feed
        self.pending: torch.Tensor | None = prompt  # (1, T) ids not fed yet
        self.length = 0  # positions fed so far
        self.cache = None  # the serial path's transformers cache, or the batched path's RowCache
        self.logits: torch.Tensor | None = None  # (V,) next-token logits after the last feed
        self.tokens: list[int] = []
        self.finished = False
        self.activations: list[float] = []  # monitored f_J at every fed position, prompt included
        self.generator = torch.Generator().manual_seed(seed)

    def feed(self, model) -> None:
        """The serial path: run the pending ids alone (the caller holds the engine's lock: hooks live only inside
        this call)."""
        past = self.length
        mask = torch.ones(1, past + self.pending.shape[1], dtype=torch.long)
        steering = applied(model, self.plan, prompt_length=self.prompt_length) if self.plan else nullcontext()
        with torch.no_grad(), steering as run:
            out = model(input_ids=self.pending, attention_mask=mask, use_cache=True,
                        **{cache_keyword(model): self.cache}, **last_logit_only(model))
        self.cache = cache_of(out)
        read = run.activations(self.monitor_index)[0, past:] if self.monitor_index is not None else None
        self.fed(out.logits[0, -1].float(), read)

    def fed(self, logits: torch.Tensor, activations: torch.Tensor | None) -> None:
        """Record a feed of the pending ids: the next-token logits and the monitor's values at the fed positions."""
        self.length += self.pending.shape[1]
        self.logits = logits
        if self.monitor_index is not None:
            self.activations.extend(activations.tolist())
        self.pending = None

    def accept(self, token: int, eos: set[int], max_new_tokens: int) -> None:
        self.tokens.append(token)
        self.finished = token in eos or len(self.tokens) >= max_new_tokens
        if not self.finished or (self.monitor_index is not None and token not in eos):
            self.pending = torch.tensor([[token]])  # when finished: fed once more only to read the monitor

    def generated_activations(self) -> tuple[float, ...]:
        return tuple(self.activations[self.prompt_length:])


@dataclass(frozen=True)
class Snapshot:
    """A request's state after one step (what a `Frame` is made of)."""

    unsteered_tokens: tuple[int, ...]
    steered_tokens: tuple[int, ...]
    kl: tuple[float, ...]
    unsteered_activations: tuple[float, ...]
    steered_activations: tuple[float, ...]


class Request:
    """One user's generation: the unsteered, steered and reference continuations, the KL so far, and the
    per-step rule that advances them (sample, extend the KL, feed the reference the steered token)."""

    def __init__(self, prompt: torch.Tensor, steered_plan: Plan | None, unsteered_plan: Plan | None,
                 monitor_index: int | None, sampling: Sampling, eos: set[int]):
        n = sampling.max_new_tokens
        self.steered = Continuation(prompt, steered_plan, monitor_index, sampling.seed, n)
        self.unsteered = Continuation(prompt, unsteered_plan, 0 if monitor_index is not None else None, sampling.seed, n)
        self.reference = Continuation(prompt, None, None, sampling.seed, n)
        self.sampling, self.eos = sampling, eos
        self.kl: list[float] = []
        # the scheduler's
        self.frames: queue.SimpleQueue = queue.SimpleQueue()
        self.released = threading.Event()  # set once the scheduler will run nothing more for it
        self.cancelled = False
        self.failed = False

    def feeding(self) -> list[Continuation]:
        return [c for c in (self.unsteered, self.steered, self.reference) if c.pending is not None]

    def advance(self, fed: list[Continuation]) -> None:
        """After the continuations ``fed`` were fed: the KL of this step, the next tokens, the reference's input."""
        unsteered, steered, reference = self.unsteered, self.steered, self.reference
        if reference in fed:
            self.kl.append(kl_divergence(reference.logits, steered.logits))
        for c in (unsteered, steered):
            if c in fed and not c.finished:
                c.accept(next_token(c.logits, self.sampling, c.generator), self.eos, self.sampling.max_new_tokens)
        if reference in fed and steered.tokens and not steered.finished:
            reference.pending = torch.tensor([[steered.tokens[-1]]])

    def snapshot(self) -> Snapshot:
        return Snapshot(tuple(self.unsteered.tokens), tuple(self.steered.tokens), tuple(self.kl),
                        self.unsteered.generated_activations(), self.steered.generated_activations())


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Greedy at temperature 0; else temperature then nucleus (top-p) sampling."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p ‖ q) in nats between the softmax distributions of two logit vectors."""
    log_p = torch.log_softmax(p_logits.double(), dim=-1)
    log_q = torch.log_softmax(q_logits.double(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum())


# -- rows of one batch --------------------------------------------------------------------------------------------

class RowCache:
    """One continuation's keys and values: per layer, ``(1, H_kv, capacity, D)`` buffers and how much is filled."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], row: int, capacity: int):
        self.keys, self.values, self.lengths = [], [], []
        for keys, values in layers:
            filled = keys.shape[2]
            size = max(capacity, filled + 1)
            k = keys.new_empty(1, keys.shape[1], size, keys.shape[3])
            v = values.new_empty(1, values.shape[1], size, values.shape[3])
            k[:, :, :filled] = keys[row: row + 1]
            v[:, :, :filled] = values[row: row + 1]
            self.keys.append(k)
            self.values.append(v)
            self.lengths.append(filled)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``(1, H_kv, T, D)`` at the end of a layer's buffers; the layer's keys and values so far."""
        start, end = self.lengths[layer], self.lengths[layer] + keys.shape[2]
        if end > self.keys[layer].shape[2]:  # past the capacity asked for: grow (not expected)
            for buffers in (self.keys, self.values):
                old = buffers[layer]
                grown = old.new_empty(1, old.shape[1], 2 * end, old.shape[3])
                grown[:, :, :start] = old[:, :, :start]
                buffers[layer] = grown
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


_current = threading.local()  # .step: the `_RowsStep` of the decode call running in this thread


class _RowsStep:
    """One decode call's rows: their caches (None: an idle row) and the model's own attention implementation."""

    def __init__(self, caches: list[RowCache | None], implementation: str):
        self.caches = caches
        self.implementation = implementation
        self._functions: dict[type, object] = {}

    def function(self, module):
        """The model's own attention function for ``module`` (its modelling file's eager one for ``eager``)."""
        kind = type(module)
        if kind not in self._functions:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            name = self.implementation
            if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
                self._functions[kind] = ALL_ATTENTION_FUNCTIONS[name]
            else:
                self._functions[kind] = sys.modules[kind.__module__].eager_attention_forward
        return self._functions[kind]

    def attend(self, module, query, key, value, kwargs):
        """Each row's keys and values appended to its cache; its attention over them, alone (see `_grouped`)."""
        layer = module.layer_idx
        window = kwargs.get("sliding_window")
        seen: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for i, cache in enumerate(self.caches):
            if cache is None:
                seen.append(None)
                continue
            keys, values = cache.append(layer, key[i: i + 1], value[i: i + 1])
            if window and keys.shape[2] > window:
                keys, values = keys[:, :, -window:], values[:, :, -window:]
            seen.append((keys, values))
        if query.shape[2] == 1 and self.implementation in ("sdpa", "eager") and all(
                value is None or value is False or name in _PLAIN for name, value in kwargs.items()):
            return self._grouped(query, seen, kwargs.get("scaling")), None
        attend = self.function(module)
        positions = kwargs.get("position_ids")
        outputs: list[torch.Tensor | None] = []
        for i, row in enumerate(seen):
            if row is None:
                outputs.append(None)
                continue
            row_kwargs = dict(kwargs)
            if isinstance(positions, torch.Tensor) and positions.dim() == 2 and positions.shape[0] == len(seen):
                row_kwargs["position_ids"] = positions[i: i + 1]
            outputs.append(attend(module, query[i: i + 1], *row, None, **row_kwargs)[0])
        idle = torch.zeros_like(next(o for o in outputs if o is not None))
        return torch.cat([idle if o is None else o for o in outputs]), None

    @staticmethod
    def _grouped(query, seen, scaling):
        """Plain softmax attention of one query token per row (what sdpa and eager compute, with no mask: a decode
        token sees all its keys), for the rows with equally many keys at once: ``softmax(q·kᵀ·scale) · v`` as two
        batched products. Measured on the CPU kernels, a row's result does not depend on how many rows share the
        products (transformers' sdpa kernel does not have that property, hence not it). Grouped-query heads: the
        g query heads of a key head are its g rows. ``(B, 1, H, D)``, like transformers' attention functions."""
        batch, heads, _, dim = query.shape
        out = query.new_zeros(batch, 1, heads, dim)
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(seen):
            if row is not None:
                groups.setdefault(row[0].shape[2], []).append(i)
        scale = scaling if scaling is not None else dim ** -0.5
        for rows in groups.values():
            keys = torch.cat([seen[i][0] for i in rows])  # (G, H_kv, L, D)
            values = torch.cat([seen[i][1] for i in rows])
            index = torch.tensor(rows, device=query.device)
            q = query.index_select(0, index).view(len(rows), keys.shape[1], -1, dim)  # (G, H_kv, g, D)
            weights = torch.softmax(torch.matmul(q, keys.transpose(-1, -2)) * scale, dim=-1, dtype=torch.float32)
            heads_out = torch.matmul(weights.to(query.dtype), values)  # (G, H_kv, g, D)
            out.index_copy_(0, index, heads_out.reshape(len(rows), 1, heads, dim))
        return out


_PLAIN = frozenset({"dropout", "scaling", "position_ids", "sliding_window", "use_cache", "cache_position", "is_causal"})
"""Attention keywords that leave a decode token's plain softmax attention as it is (dropout is 0 in eval mode; the
window is applied to the keys; a single query token is causal by itself)."""


def rows_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention implementation of a decode call (`decode_rows`): each row attends to its own `RowCache`."""
    step = getattr(_current, "step", None)
    if step is None:
        raise RuntimeError(f"the {ROWS_ATTENTION!r} attention runs only inside steer.demo.batch.decode_rows")
    return step.attend(module, query, key, value, kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ROWS_ATTENTION, rows_attention)


_register()


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers KV cache, each ``(B, H_kv, L, D)``."""
    cache = getattr(cache, "self_attention_cache", cache)
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _steering(model, rows: list[Continuation | None], prompt_length):
    plans = [c.row_plan if c is not None else None for c in rows]
    return applied(model, plans, prompt_length=prompt_length) if any(p is not None for p in plans) else nullcontext()


def prefill_rows(model, rows: list[Continuation]) -> None:
    """Feed the prompt of rows that share it (one request's, nothing fed yet): each row in a call of its own, with
    the model's own attention and KV cache, copied into the row's `RowCache`. (Batched, transformers' attention
    kernels give rows with the same input different last bits; a row alone is what the serial path computed, so an
    identity edit still gives identical columns.) A row with no plan reuses the call of a row whose plan writes
    nothing (a monitor): the same logits and keys, bit for bit."""
    plain = None  # (logits, layers) of a call that wrote nothing
    for c in rows:
        if c.row_plan is None and plain is not None:
            logits, layers = plain
            c.cache = RowCache(layers, 0, c.capacity)
            c.fed(logits, None)
            continue
        ids = c.pending.to(next(model.parameters()).device)
        steering = applied(model, c.row_plan, prompt_length=ids.shape[1]) if c.row_plan is not None else nullcontext()
        with torch.no_grad(), steering as run:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                        **{cache_keyword(model): None}, **last_logit_only(model))
        layers = _cache_layers(cache_of(out))
        logits = out.logits[0, -1].float()
        c.cache = RowCache(layers, 0, c.capacity)
        c.fed(logits, run.activations(c.monitor_index)[0] if c.monitor_index is not None else None)
        if c.row_plan is None or not _writes(c.row_plan):
            plain = (logits, layers)


def _writes(plan: Plan) -> bool:
    return any(OPERATIONS[e.op].writes for site in plan.sites for e in site.edits)


def decode_rows(model, rows: list[Continuation]) -> None:
    """Feed one pending token of each row (any lengths, prefilled) in one call, each row exactly as alone (see the
    module docstring); the batch is padded with idle rows to a multiple of `ROW_MULTIPLE`."""
    device = next(model.parameters()).device
    padded: list[Continuation | None] = list(rows) + [None] * (-len(rows) % ROW_MULTIPLE)
    tokens = [int(c.pending[0, -1]) for c in rows]
    ids = torch.tensor([[tokens[i] if c is not None else tokens[0]] for i, c in enumerate(padded)], device=device)
    positions = torch.tensor([[c.length] if c is not None else [0] for c in padded], device=device)
    config = model.config
    own = config._attn_implementation
    step = _RowsStep([c.cache if c is not None else None for c in padded], own)
    prompts = [c.prompt_length if c is not None else 0 for c in padded]
    _current.step = step
    config._attn_implementation = ROWS_ATTENTION
    try:
        with torch.no_grad(), _steering(model, padded, prompts) as run:
            out = model(input_ids=ids, position_ids=positions, use_cache=False, **last_logit_only(model))
    finally:
        config._attn_implementation = own
        _current.step = None
    logits = out.logits[:, -1].float()
    for i, c in enumerate(rows):
        c.fed(logits[i], run[i].activations(c.monitor_index)[0, c.length:] if c.monitor_index is not None else None)


# -- the scheduler ------------------------------------------------------------------------------------------------

_END = object()


class Scheduler:
    """One thread that owns the model's forward passes and steps every active request together.

    It holds ``lock`` (the engine's model lock) for each forward call only; the thread starts with the first
    request and ends after ``idle_s`` seconds without one."""

    def __init__(self, model, lock: threading.Lock, *, idle_s: float = 2.0):
        self.model, self.lock, self.idle_s = model, lock, idle_s
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._active: list[Request] = []
        self._thread: threading.Thread | None = None

    def run(self, request: Request) -> Iterator[Snapshot]:
        """Queue ``request`` and yield its snapshot after each of its steps. Closing the generator drops the
        request; the close returns once the scheduler runs nothing more for it (at most the step under way)."""
        with self._cond:
            self._inbox.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="steer-demo-decoder", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            while True:
                item = request.frames.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled = True
            with self._cond:
                self._cond.notify()
            request.released.wait()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self._active:
                        if not self._cond.wait(self.idle_s) and not self._inbox and not self._active:
                            self._thread = None
                            return
                    new, self._inbox = self._inbox, []
                for request in new:
                    if request.cancelled:
                        request.released.set()
                    elif self._step([request], prefill_rows):
                        self._active.append(request)
                self._active = [r for r in self._active if self._keep(r)]
                if self._active:
                    self._step(self._active, decode_rows)
                    self._active = [r for r in self._active if self._keep(r)]
        except BaseException as exc:  # never leave a reader waiting
            with self._cond:
                stranded, self._inbox, self._active, self._thread = self._inbox + self._active, [], [], None
            for request in stranded:
                request.frames.put(exc)
                request.released.set()
            raise

    def _step(self, requests: list[Request], feed) -> bool:
        """One forward call over every pending continuation of ``requests``, then each request's step."""
        fed = [r.feeding() for r in requests]
        try:
            with self.lock:
                feed(self.model, [c for continuations in fed for c in continuations])
        except Exception as exc:  # noqa: BLE001 — the call failed for all of them: each reader gets the error
            for request in requests:
                request.failed = True
                request.frames.put(exc)
                request.released.set()
            return False
        for request, continuations in zip(requests, fed):
            request.advance(continuations)
            request.frames.put(request.snapshot())
        return True

    @staticmethod
    def _keep(request: Request) -> bool:
        if request.failed:
            return False
        if request.cancelled or not request.feeding():
            if not request.cancelled:
                request.frames.put(_END)
            request.released.set()
            return False
        return True
