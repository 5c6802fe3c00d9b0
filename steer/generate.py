"""Generate text with and without a Plan: chat templates, left-padded batches, seeds.

`generate` opens one `steer.applied` context per call, so ``scope`` sees the
batch's (padded) prompt as the prompt. Sampling uses the same seed for every
call, so steered and unsteered runs differ only by the edit: an identity edit
gives identical text. Never keeps hooks installed after it returns.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steer.errors import SteerError
from steer.lower.hooks import applied
from steer.plan.ir import Plan


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    """How many tokens to generate (1..4096)."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples with this temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (0, 1]."""
    seed: int = 0
    """Seed for sampling; the same for steered and unsteered runs."""

    def __post_init__(self):
        if not 1 <= self.max_new_tokens <= 4096:
            raise SteerError(f"max-new-tokens must be in 1..4096, got {self.max_new_tokens}", where="--max-new-tokens")
        if self.temperature < 0:
            raise SteerError(f"temperature must be ≥ 0, got {self.temperature}", where="--temperature")
        if not 0 < self.top_p <= 1:
            raise SteerError(f"top-p must be in (0, 1], got {self.top_p}", where="--top-p")


def prompt_ids(tokenizer, prompts: list[str], *, chat: bool = True) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``; the chat template when the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        add_special = False  # the template already holds them
    else:
        texts, add_special = list(prompts), True
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special))
    finally:
        tokenizer.padding_side = side


CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""Config fields that name a model's context length, in the order transformers' configs use them."""


def context_length(model) -> int | None:
    """The longest sequence (prompt + new tokens) ``model`` was built for, from its config; None if it says none."""
    config = getattr(model, "config", None)
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompt_fits(model, tokenizer, prompts: list[str], max_new_tokens: int, *, chat: bool = True,
                      where: str = "PROMPT") -> None:
    """`SteerError` unless every prompt (as tokenized, with the chat template) plus ``max_new_tokens`` fits the model's
    context: past it a model either fails inside or silently writes nonsense, so say it before running."""
    limit = context_length(model)
    if limit is None:
        return
    for i, prompt in enumerate(prompts):
        n = prompt_ids(tokenizer, [prompt], chat=chat)["input_ids"].shape[1]
        if n + max_new_tokens > limit:
            which = where if len(prompts) == 1 else f"{where}, prompt {i + 1} ({prompt[:40]!r}…)"
            raise SteerError(f"the prompt is {n:,} tokens{' with the chat template' if chat else ''}; with "
                             f"{max_new_tokens} new tokens that is {n + max_new_tokens:,}, over the model's context of "
                             f"{limit:,} tokens: shorten it to at most {max(0, limit - max_new_tokens):,} tokens or ask "
                             "for fewer new tokens", where=which)


def cache_keyword(model) -> str:
    """The keyword a forward call takes its KV cache by: ``cache`` from transformers 5.24 (``past_key_values``
    is deprecated there, to be removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def last_logit_only(model) -> dict:
    """``logits_to_keep=1`` where the model's forward takes it (transformers ≥ 4.50): a caller that reads only the
    last position's logits skips the rest (a long prompt's would be T × vocab)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


def cache_of(output):
    """The KV cache a forward call returned, under either name (`cache_keyword`)."""
    cache = output.get("cache")
    return cache if cache is not None else output.get("past_key_values")


def _forward_parameters(model) -> set[str]:
    """The keyword arguments the underlying transformers model takes (through a PEFT wrapper, its base model's)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(inner.forward).parameters)


def stop_ids(model, tokenizer) -> list[int]:
    """The token ids that end a continuation, as ``model.generate`` decides: the generation config's
    ``eos_token_id`` (an id or a list), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [int(t) for t in (eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])]


def generate(model, tokenizer, prompts: list[str], plan: Plan | Sequence[Plan | None] | None = None,
             sampling: Sampling = Sampling(), *, chat: bool = True) -> list[str]:
    """The continuation of each prompt (new tokens only, special tokens dropped).

    ``plan`` may be one plan per prompt (None: unedited): each prompt is steered by its own, in one batch; greedy
    continuations equal each prompt's alone (sampled ones draw from one generator for the batch, so they differ)."""
    if not prompts or any(not p.strip() for p in prompts):
        raise SteerError("the prompt is empty", where="PROMPT")
    if plan is not None and not isinstance(plan, Plan):
        plan = list(plan)
        if len(plan) != len(prompts):
            raise ValueError(f"{len(plan)} plan(s) for {len(prompts)} prompt(s): pass one plan (or None) per prompt")
        if all(p is None for p in plan):
            plan = None
    check_prompt_fits(model, tokenizer, prompts, sampling.max_new_tokens, chat=chat)
    inputs = {k: v.to(model.device) for k, v in prompt_ids(tokenizer, prompts, chat=chat).items()}
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(sampling.seed)
    with torch.no_grad():
        if plan is None:
            out = model.generate(**inputs, **kwargs)
        else:
            with applied(model, plan):
                out = model.generate(**inputs, **kwargs)
    new = out[:, inputs["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
