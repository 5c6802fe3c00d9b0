"""Contrastive feature discovery: which SAE features tell two prompt sets apart, and which of them steer.

``contrast(model, tokenizer, sae, prompts_a, prompts_b)`` returns `ContrastRow`s, best first:

1. **Per-prompt summary.** Each prompt's activation of every feature is
   summarised by its **max over the prompt's tokens** (position 0, the
   attention sink, left out). Max, not mean: a concept usually shows on a few
   tokens of a sentence ("bride", "wedding"), and the mean dilutes that by the
   sentence's length — two sets of sentences that differ in length or
   wording would rank features by length. ``summary="mean"`` is there for
   diffuse properties (style, language) that hold on every token.
2. **Activation ranking.** Per feature: the mean summary on each set, their
   difference (A − B), and the **AUROC** of telling A from B by the summary —
   ``P(s_a > s_b) + ½ P(s_a = s_b)``, the Mann–Whitney U over ``n_a·n_b``,
   computed from average ranks (ties share their mean rank). Features are
   ranked by ``|AUROC − ½|`` (how well one threshold separates the sets, in
   either direction), ties broken by ``|difference|`` in units of the
   feature's p99 activation (from the SAE's feature statistics; raw units when
   it has none) — so among perfect separators the one that moves most
   relative to its usual size comes first.
3. **Output score** (Arad, Mueller & Belinkov 2025, "SAEs Are Good for
   Steering – If You Select the Right Features"), for the top ``candidates``
   only, as it costs a forward pass each (batched into one): on a neutral
   prompt ("From my experience,"), add ``amplification × m`` times the
   feature's decoder row to the stream at the site at the last position,
   where ``m`` is the largest feature activation there (the paper's recipe
   amplifies the feature by 10× that maximum; the SAE error is kept, so this
   is exactly an addition); read the next-token distribution ``p`` and score
   ``(1 − r / V) · max_{t∈S} p_t`` with ``r`` the best rank (0-based, ties
   counted in the token's favour) of a token of ``S`` among the ``V`` vocabulary
   entries. ``S`` is the user's target tokens when given, else the feature's
   own top-20 logit-lens tokens (`steer.discover.logit_lens`) — "does steering
   along it make the model say what it writes?". Arad et al. found that keeping
   only features with a high output score makes SAE steering 2–3× more
   effective. ``rank_by="output"`` re-ranks the candidates by it.

Each row carries the feature's top promoted tokens: from an atlas of this SAE
when one is given (`steer.discover.atlas`), else from the logit lens directly.
Prompt files (`read_prompts`): one prompt per line (blank lines skipped), or
JSONL with a string or a ``text``/``prompt`` field per line.

Never changes the model (hooks only, removed after each pass) or the SAE.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from steer.errors import SteerError

NEUTRAL_PROMPT = "From my experience,"
"""The prompt Arad et al. steer on to measure a feature's output score."""
AMPLIFICATION = 10.0
"""Steering strength in multiples of the largest feature activation at the last position (Arad et al.: 10)."""
LENS_TOKENS = 20
"""A feature's own token set for the output score: its top logit-lens tokens (Arad et al.: 20)."""
SKIP_FIRST = 1

Summary = Literal["max", "mean"]


class PromptError(SteerError):
    """A prompt file that is missing, unreadable or empty, or a prompt too short to use."""


@dataclass(frozen=True)
class ContrastRow:
    feature: int
    auroc: float
    """P(summary on an A prompt > on a B prompt) + ½ P(equal): 1 = fires more on every A prompt, 0 = on every B one."""
    mean_a: float
    """Mean over A prompts of the per-prompt summary (max or mean over tokens)."""
    mean_b: float
    diff: float
    """mean_a − mean_b, raw activation units."""
    fired_a: float
    """Fraction of A prompts where the feature fires on some token."""
    fired_b: float
    output_score: float | None
    """Arad et al.'s output score; None when the feature was not among the scored candidates."""
    top_tokens: list[str]
    """The feature's top promoted output tokens."""

    def to_dict(self) -> dict:
        return asdict(self)


# -- prompts ----------------------------------------------------------------------------


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (a string, or an object with ``text``/``prompt``)."""
    path = Path(path).expanduser()
    where = str(path)
    if not path.exists():
        raise PromptError("no such prompt file", where=where)
    if not path.is_file():
        raise PromptError("is not a regular file; give a file with one prompt per line", where=where)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"is not UTF-8 text (byte {exc.start})", where=where) from None
    except OSError as exc:
        raise PromptError(f"cannot be read: {exc.strerror or exc}", where=where) from None
    prompts = []
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if jsonl:
            line = _jsonl_prompt(line, f"{path}:{number}")
        prompts.append(line.strip())
    if not prompts:
        raise PromptError("has no prompts (expected one per line)", where=where)
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PromptError(f"not JSON: {exc.msg}", where=where) from None
    if isinstance(row, dict):
        for key in ("text", "prompt"):
            if isinstance(row.get(key), str):
                return row[key]
        raise PromptError(f"no string 'text' or 'prompt' field (found: {', '.join(sorted(row)) or 'none'})", where=where)
    if isinstance(row, str):
        return row
    raise PromptError(f"expected a string or an object, found {type(row).__name__}", where=where)


# -- statistics -------------------------------------------------------------------------


def auroc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """AUROC of each column: ``a (n_a, F)`` positives vs ``b (n_b, F)`` negatives, ties counting ½.

    Mann–Whitney: rank all ``n_a + n_b`` values per column (tied values share
    their average rank), ``U = R_a − n_a(n_a+1)/2``, ``AUROC = U / (n_a n_b)``.
    """
    n_a, n_b = a.shape[0], b.shape[0]
    values = torch.cat([a, b]).double().T.contiguous()                  # (F, n)
    ordered = values.sort(dim=1).values
    below = torch.searchsorted(ordered, values, side="left")            # values strictly smaller
    up_to = torch.searchsorted(ordered, values, side="right")           # values ≤
    ranks = (below + up_to + 1).double() / 2                            # 1-based average ranks
    u = ranks[:, :n_a].sum(dim=1) - n_a * (n_a + 1) / 2
    return u / (n_a * n_b)


def prompt_summaries(model, tokenizer, sae, prompts: list[str], *, site, summary: Summary = "max",
                     batch_size: int = 16, where: str = "prompts") -> torch.Tensor:
    """``(n_prompts, d_sae)``: each prompt's max (or mean) activation of every feature over its tokens ≥ 1."""
    from steer.train.activations import SiteReader

    if summary not in ("max", "mean"):
        raise SteerError(f"unknown summary {summary!r}; allowed: max, mean", where="summary")
    param = next(model.parameters())
    sae_here = sae.to(dtype=param.dtype, device=param.device)
    reader = SiteReader(model, site)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    for number, ids in enumerate(encoded, start=1):
        if len(ids) <= SKIP_FIRST:
            raise PromptError(f"prompt {number} ({prompts[number - 1]!r}) is a single token; the first token of a "
                              "prompt is an attention sink and is left out, so give at least two", where=where)
    out = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        T = max(len(ids) for ids in chunk)
        # right padding: a causal model's earlier positions never see the pad tokens after them
        ids = torch.tensor([row + [pad] * (T - len(row)) for row in chunk], device=param.device)    # (B, T)
        lengths = torch.tensor([len(row) for row in chunk])
        with torch.inference_mode():
            f = sae_here.encode(reader(ids)[:, SKIP_FIRST:]).float().cpu()                        # (B, T-1, d_sae)
        valid = (torch.arange(T - SKIP_FIRST)[None, :] < (lengths - SKIP_FIRST)[:, None])[..., None]  # (B, T-1, 1)
        f = f * valid                                           # activations are ≥ 0: a zero never wins a max
        out.append(f.amax(dim=1) if summary == "max" else f.sum(dim=1) / valid.sum(dim=1))
    return torch.cat(out)


# -- output score -----------------------------------------------------------------------


def _added_at_last_position(model, site, deltas: torch.Tensor):
    """Inside the block, row b of the batch gets ``deltas[b]`` added to the site's activation at its last position."""
    from steer.models.capture import rewritten

    def add(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, -1] += deltas.to(x.dtype)
        return x

    return rewritten(model, site, add)


def output_scores(model, tokenizer, sae, features: list[int], token_sets: list[list[int]], *, site,
                  prompt: str = NEUTRAL_PROMPT, amplification: float = AMPLIFICATION) -> list[float]:
    """Arad et al.'s output score of each feature towards its token set (see the module docstring)."""
    from steer.models.capture import capture

    if not features:
        return []
    param = next(model.parameters())
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=param.device)        # (1, T)
    with torch.inference_mode(), capture(model, [site]) as records:
        model(input_ids=ids, use_cache=False)
    last = records[site][0][0, -1].to(sae.dtype)                                      # (d,)
    peak = float(sae.encode(last).max())
    strength = amplification * peak if peak > 0 else amplification                    # nothing fires: 10 raw units
    directions = sae.W_dec[torch.as_tensor(features)].to(dtype=param.dtype, device=param.device)     # (K, d)
    batch = ids.expand(len(features), -1)
    with torch.inference_mode(), _added_at_last_position(model, site, strength * directions):
        probs = torch.softmax(model(input_ids=batch, use_cache=False).logits[:, -1].double(), dim=-1).cpu()   # (K, V)
    scores = []
    for row, tokens in zip(probs, token_sets):
        chosen = row[torch.as_tensor(tokens, dtype=torch.long)]
        best = float(chosen.max())
        rank = int((row > best).sum())          # 0-based rank of the best token of the set
        scores.append((1 - rank / row.shape[0]) * best)
    return scores


def target_token_ids(tokenizer, targets: list[str]) -> list[int]:
    """Token ids for target words: the first token of each word, with and without a leading space."""
    ids: list[int] = []
    for word in targets:
        word = word.strip()
        if not word:
            continue
        for variant in (" " + word, word):
            encoded = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if encoded and encoded[0] not in ids:
                ids.append(encoded[0])
    if not ids:
        raise SteerError("no target tokens: give comma-separated words, e.g. --target-tokens 'bride,wedding'",
                         where="target tokens")
    return ids


# -- the whole thing --------------------------------------------------------------------


def contrast(model, tokenizer, sae, prompts_a: list[str], prompts_b: list[str], *, site=None, summary: Summary = "max",
             top: int = 20, candidates: int | None = None, target_tokens: list[str] | None = None, atlas=None,
             rank_by: Literal["activation", "output"] = "activation", amplification: float = AMPLIFICATION,
             neutral_prompt: str = NEUTRAL_PROMPT, batch_size: int = 16) -> list[ContrastRow]:
    """The ``top`` features that best tell ``prompts_a`` from ``prompts_b`` (see the module docstring).

    ``candidates`` (default ``top``): how many of the activation ranking get an
    output score (0: none). ``atlas``: an `Atlas` (or path) of this SAE to take
    the top tokens from. ``rank_by="output"`` orders the scored candidates by
    output score (the unscored rest keep the activation order after them).
    """
    from steer.discover.logit_lens import logit_lens, token_text
    from steer.models.adapters import adapter_for

    if not prompts_a or not prompts_b:
        raise PromptError("both prompt sets need at least one prompt", where="contrast")
    if rank_by not in ("activation", "output"):
        raise SteerError(f"unknown ranking {rank_by!r}; allowed: activation, output", where="rank by")
    site_name = site or sae.site
    if site_name is None:
        raise SteerError("the SAE's config names no site; pass --site", where=sae.source or "sae")
    parsed = adapter_for(model).parse_site(str(site_name), model)
    param = next(model.parameters())
    sae_here = sae.to(dtype=param.dtype, device=param.device)

    a = prompt_summaries(model, tokenizer, sae_here, prompts_a, site=parsed, summary=summary, batch_size=batch_size, where="prompts A")
    b = prompt_summaries(model, tokenizer, sae_here, prompts_b, site=parsed, summary=summary, batch_size=batch_size, where="prompts B")
    area = auroc(a, b)
    mean_a, mean_b = a.double().mean(0), b.double().mean(0)
    diff = mean_a - mean_b
    scale = sae.feature_stats.get("p99")
    scale = scale.double().clamp_min(1e-6) if scale is not None else torch.ones_like(diff)
    separation = (area - 0.5).abs()
    # lexicographic: |AUROC − ½| first, then |diff| in p99 units (stable sorts, least significant key first)
    order = torch.sort((diff / scale).abs(), descending=True, stable=True).indices
    order = order[torch.sort(separation[order], descending=True, stable=True).indices]
    chosen = order[: max(0, int(top))].tolist()

    n_scored = len(chosen) if candidates is None else min(int(candidates), len(chosen))
    scored = chosen[:n_scored]
    promoted_ids, _, _, _ = logit_lens(model, sae.W_dec[torch.as_tensor(chosen, dtype=torch.long)], k=LENS_TOKENS)
    lens = dict(zip(chosen, promoted_ids.tolist()))
    if target_tokens:
        targets = target_token_ids(tokenizer, target_tokens)
        token_sets = [targets] * len(scored)
    else:
        token_sets = [lens[i] for i in scored]
    scores = dict(zip(scored, output_scores(model, tokenizer, sae_here, scored, token_sets, site=parsed,
                                            prompt=neutral_prompt, amplification=amplification)))
    if rank_by == "output":
        chosen = sorted(scored, key=lambda i: -scores[i]) + chosen[n_scored:]

    cards = _atlas_tokens(atlas, sae, chosen)
    rows = []
    for i in chosen:
        tokens = cards.get(i) or [token_text(tokenizer, t) for t in lens[i][:8]]
        rows.append(ContrastRow(
            feature=i, auroc=float(area[i]), mean_a=float(mean_a[i]), mean_b=float(mean_b[i]), diff=float(diff[i]),
            fired_a=float((a[:, i] > 0).double().mean()), fired_b=float((b[:, i] > 0).double().mean()),
            output_score=scores.get(i), top_tokens=tokens,
        ))
    return rows


def _atlas_tokens(atlas, sae, features: list[int]) -> dict[int, list[str]]:
    """Top promoted tokens from an atlas of this SAE; {} without one. An atlas of another SAE is an error."""
    if atlas is None:
        return {}
    from steer.discover.atlas import Atlas, AtlasError

    atlas = atlas if isinstance(atlas, Atlas) else Atlas(atlas)
    if atlas.metadata.get("sae_hash") != sae.content_hash():
        raise AtlasError("was built for a different SAE than the one given (its sae_hash differs)",
                         where=f"atlas {atlas.path}")
    return {i: [t for t, _ in atlas.feature(i).promoted[:8]] for i in features}
