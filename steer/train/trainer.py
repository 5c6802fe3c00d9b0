"""`train_sae`: a recipe + a corpus (or activations) in, a SAELens v6 SAE directory out.

The run, top to bottom:

1. **prepare** — validate the corpus and the site before loading anything
   heavy, load the model (or take the caller's), open the activation source
   (`steer.train.sources`), and either resume from the work directory's
   checkpoint or initialise: b_dec at the geometric median (or mean) of a
   sample, inputs scaled so their mean distance from that point is sqrt(d_in).
2. **step** (`train_step`) — Adam on FVU + AuxK, decoder rows held at unit
   norm, the learning rate warmed up and decayed linearly (`learning_rate`).
3. **metrics** — a tqdm bar with live loss / FVU / L0 / dead %, dead features
   tracked by tokens since they last fired (`DeadFeatures`).
4. **checkpoint** — every ``checkpoint_every`` steps and on Ctrl-C (the first
   Ctrl-C stops after the current step; a second aborts), written atomically
   into the work directory ``.<out>.train/`` beside the output; rerunning the
   same command resumes and ends with the same tokens seen.
5. **finish** — the batchtopk threshold and the feature statistics (density,
   max, p99) on ``stats_tokens`` training activations, then `steer.sae.save_sae`
   (SAELens v6 + ``sparsity.safetensors`` + ``feature_stats.safetensors``), and
   the work directory is removed.

Data-parallel: run the same command under ``accelerate launch``; each process
reads every world-th token row and the gradients are averaged by accelerate's
DDP wrapper. Only the main process prints, checkpoints and saves.

Never modifies the caller's model (hooks only, removed after every pass) and
never writes outside ``out`` and its work directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steer.data.state_file import load_state, save_state
from steer.sae import SAE, save_sae
from steer.train.autoencoder import StepOutput, TopKAutoencoder
from steer.train.config import TRAINER_VERSION, TrainConfig, TrainError, recipe_hash
from steer.train.activations import ActivationCache
from steer.train.sources import INIT_SAMPLE, CachedSource, StreamingSource, distinct_activations, fill_caches, tensor_source
from steer.train.statistics import feature_statistics

CHECKPOINT = "checkpoint.safetensors"
"""The resume checkpoint: tensors + JSON structure, never a pickle (`steer.data.state_file`)."""
ACTIVATIONS = "activations"
"""Subdirectory of a multi-site run's work directory holding every site's activation cache."""
KEY = "key"
"""File in it naming the activations it holds (`activations_key`)."""
RECIPE_HASH = "recipe_hash"
"""File in the work directory naming the recipe whose checkpoint and activation cache it holds."""


@dataclass
class StepInfo:
    """What a ``callback`` sees after each step."""

    step: int
    """Steps done (1-based after the first step)."""
    tokens_seen: int
    metrics: dict[str, float]


@dataclass
class TrainResult:
    path: Path
    sae: SAE
    tokens_seen: int
    metrics: dict[str, float] = field(default_factory=dict)
    """Final FVU / L0 / dead fraction on the statistics sample, wall time, steps."""


def train_sae(
    config: TrainConfig, out: str | os.PathLike, *, model=None, tokenizer=None, activations: torch.Tensor | None = None,
    progress: bool = True, callback: Callable[[StepInfo], None] | None = None, resume: bool = True,
    overwrite: bool = False, work_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Train an SAE as ``config`` says and save it to ``out``; see the module docstring.

    ``model``/``tokenizer``: use these instead of loading ``config.model``.
    ``activations``: an ``(N, d_in)`` tensor to train on instead of a model and corpus.
    ``resume``: continue from the checkpoint in the work directory if there is one.
    """
    if len(config.site_names) > 1:
        raise TrainError(f"the recipe names {len(config.site_names)} sites; `train_saes` trains one SAE per site")
    started = time.monotonic()
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise TrainError("exists and is not empty; choose another -o or pass --overwrite", where=str(out))
    work = Path(work_dir) if work_dir is not None else out.parent / f".{out.name}.train"
    accelerator = _accelerator(config)
    checkpoint = _start_work(config, work, accelerator, resume)
    opened = _open_source(config, work, accelerator, model, tokenizer, activations, checkpoint, progress)
    run = _prepare(config, work, accelerator, opened, checkpoint, progress)
    run.started = started  # the wall time includes loading the model and caching activations
    _fit(run, accelerator, callback, progress)
    result = _finish(run, accelerator, out, overwrite, _wall(run))
    if accelerator.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
    return result


def train_saes(
    config: TrainConfig, out: str | os.PathLike, *, model=None, tokenizer=None, progress: bool = True,
    callback: Callable[[str, StepInfo], None] | None = None, resume: bool = True, overwrite: bool = False,
    work_dir: str | os.PathLike | None = None, only: Sequence[str] | None = None,
) -> list[TrainResult]:
    """One SAE per site of ``config.site_names``, all from one model pass; saved as ``out/<site>/``.

    The pass runs the model up to the deepest site over ``tokens / epochs`` corpus tokens and caches every site's
    activations (float16) in the work directory; then each site's SAE trains on its cache exactly as a one-site
    cached run would (its own checkpoints; ``callback(site, info)`` after each step). An interrupted run resumes:
    the cache where it stopped, finished SAEs are kept, the SAE in training from its checkpoint.
    """
    started = time.monotonic()
    out = Path(out).expanduser().resolve()
    work = Path(work_dir) if work_dir is not None else out.parent / f".{out.name}.train"
    resuming = resume and _work_recipe(work) == recipe_hash(config)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite and not resuming:
        raise TrainError("exists and is not empty; choose another -o or pass --overwrite", where=str(out))
    accelerator = _accelerator(config)
    _start_work(config, work, accelerator, resume, keep=ACTIVATIONS)
    rank, world = accelerator.process_index, accelerator.num_processes
    corpus, model, tokenizer, device = _open_model(config, accelerator, model, tokenizer)
    from steer.models.adapters import adapter_for, hidden_size
    from steer.train.activations import SitesReader

    sites = [adapter_for(model).parse_site(name, model) for name in config.site_names]
    d_in = hidden_size(model)
    caches = {site: ActivationCache(work / ACTIVATIONS / f"{site}.rank{rank}.npy", distinct_activations(config, world),
                                    d_in, dtype="float16") for site in sites}
    fill_caches(config, corpus, tokenizer, SitesReader(model, sites), caches, rank=rank, world=world, device=device,
                progress=progress and accelerator.is_main_process)
    cache_wall = time.monotonic() - started
    results = []
    for site in sites:
        if only is not None and str(site) not in only:
            continue
        site_config = config.replace(site=str(site))
        target = out / str(site)
        if resuming and (target / "cfg.json").is_file():
            results.append(_finished(target))
            continue
        site_work = work / str(site)
        checkpoint = _start_work(site_config, site_work, accelerator, resume)
        opened = (CachedSource(site_config, caches[site], rank=rank, world=world), d_in, str(site), config.model)
        run = _prepare(site_config, site_work, accelerator, opened, checkpoint, progress)
        step_callback = None if callback is None else (lambda info, site=str(site): callback(site, info))
        _fit(run, accelerator, step_callback, progress)
        shared = {"sites": [str(s) for s in sites], "recipe": config.to_dict(), "recipe_hash": recipe_hash(config),
                  "model_pass_wall_time_s": round(cache_wall, 1)}
        results.append(_finish(run, accelerator, target, overwrite, _wall(run), multi_site=shared))
        if accelerator.is_main_process:
            shutil.rmtree(site_work, ignore_errors=True)
    if accelerator.is_main_process and only is None:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _finished(path: Path) -> TrainResult:
    """A TrainResult for an SAE an earlier, interrupted run of the same recipe already saved."""
    from steer.sae import load_sae

    sae = load_sae(path)
    training = sae.metadata.get("steer_training", {})
    metrics = {**training.get("final_metrics_on_training_sample", {}), "wall_time_s": training.get("wall_time_s", 0.0),
               "steps": training.get("steps", 0)}
    return TrainResult(path=path, sae=sae, tokens_seen=training.get("tokens_seen", 0), metrics=metrics)


# -- prepare -------------------------------------------------------------------------


@dataclass
class _Run:
    config: TrainConfig
    work: Path
    source: object
    autoencoder: TopKAutoencoder
    optimizer: torch.optim.Optimizer
    wrapped: torch.nn.Module
    input_scale: float
    dead: "DeadFeatures"
    step: int = 0
    wall_before: float = 0.0
    site: str | None = None
    model_name: str | None = None
    last: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator

    return Accelerator(cpu=config.device == "cpu")


def _device(config: TrainConfig, accelerator) -> torch.device:
    return torch.device(config.device) if config.device not in (None, "cpu") else accelerator.device


def _start_work(config: TrainConfig, work: Path, accelerator, resume: bool, keep: str | None = None) -> dict | None:
    """The work directory made ready for ``config``: its checkpoint (resume) or a clean start; the checkpoint or None.

    ``keep``: a subdirectory (the multi-site activation cache) kept through a clean start when it was filled for the
    same activations (`activations_key`), so that changing only how the SAEs train does not rerun the model.
    """
    world = accelerator.num_processes
    if config.batch_size % world:
        raise TrainError(f"batch_size {config.batch_size} is not divisible by the {world} data-parallel processes")
    checkpoint = _load_checkpoint(work, config) if resume else None
    same_recipe = resume and _work_recipe(work) == recipe_hash(config)  # e.g. a cache filled before any checkpoint
    if accelerator.is_main_process and work.exists() and checkpoint is None and not same_recipe:
        kept = work / keep if keep else None
        reusable = kept is not None and resume and _read(kept / KEY) == activations_key(config, world)
        for child in work.iterdir() if reusable else [work]:  # a stale or unwanted run: start clean
            if child != kept:
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    work.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (work / RECIPE_HASH).write_text(recipe_hash(config))
        if keep:
            (work / keep).mkdir(exist_ok=True)
            (work / keep / KEY).write_text(activations_key(config, world))
    return checkpoint


def activations_key(config: TrainConfig, world: int) -> str:
    """What the cached activations depend on: model, sites, corpus and its split, sequence shape, count, processes."""
    fields = ("model", "site", "sites", "corpus", "text_field", "held_out", "context_size", "skip_first")
    payload = json.dumps({"trainer": TRAINER_VERSION, "distinct": distinct_activations(config, world), "world": world,
                          **{name: getattr(config, name) for name in fields}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _prepare(config, work, accelerator, opened, checkpoint, progress) -> _Run:
    source, d_in, site, model_name = opened
    device = _device(config, accelerator)
    generator = torch.Generator().manual_seed(config.seed)
    autoencoder = TopKAutoencoder(d_in, config.width, config.k, config.architecture == "batchtopk", generator=generator)
    if checkpoint is None:
        input_scale = _initialise(autoencoder, source.sample(INIT_SAMPLE), config)
    else:
        autoencoder.load_state_dict(checkpoint["autoencoder"])
        input_scale = checkpoint["input_scale"]
    autoencoder.to(device)
    # fused: one kernel for all parameters (on the CPU the per-tensor loop was a sixth of a step)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=config.learning_rate, betas=(0.9, 0.999), fused=True)
    wrapped, optimizer = accelerator.prepare(autoencoder, optimizer)
    dead = DeadFeatures(config.width, config.dead_tokens, device)
    run = _Run(config, work, source, autoencoder, optimizer, wrapped, input_scale, dead, site=site, model_name=model_name)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        dead.since_fired = checkpoint["since_fired"].to(device)
        run.step, run.wall_before, run.last = checkpoint["step"], checkpoint["wall_time"], checkpoint["metrics"]
        torch.set_rng_state(checkpoint["rng"])
        if progress and accelerator.is_main_process:
            print(f"steer: resuming from step {run.step} of {config.steps} ({run.step * config.batch_size:,} tokens seen) "
                  f"in {work}", file=sys.stderr)
    return run


def _open_model(config, accelerator, model, tokenizer):
    """``(corpus, model, tokenizer, device)``: the corpus checked non-empty before the model loads."""
    from steer.data.corpus import first_document, open_corpus
    from steer.models import load_model

    corpus = open_corpus(config.corpus, text_field=config.text_field)
    first_document(corpus, "train", config.held_out)     # an empty corpus fails before the model loads
    if model is None:
        model, tokenizer = load_model(config.model, device=str(_device(config, accelerator)))
    elif tokenizer is None:
        raise TrainError("a model was given without its tokenizer")
    return corpus, model, tokenizer, next(model.parameters()).device


def _open_source(config, work, accelerator, model, tokenizer, activations, checkpoint, progress):
    """``(source, d_in, site, model_name)``: batches from a tensor, or from the model over the corpus."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if activations is not None:
        return tensor_source(activations, config, rank, world), activations.shape[1], None, None
    from steer.models.adapters import adapter_for, hidden_size
    from steer.train.activations import SiteReader

    corpus, model, tokenizer, model_device = _open_model(config, accelerator, model, tokenizer)
    site = adapter_for(model).parse_site(config.site, model)
    reader = SiteReader(model, site)
    if config.epochs > 1:
        cache = ActivationCache(work / f"activations.rank{rank}.npy", distinct_activations(config, world), hidden_size(model))
        fill_caches(config, corpus, tokenizer, reader, {site: cache}, rank=rank, world=world, device=model_device,
                    progress=progress and accelerator.is_main_process)
        source = CachedSource(config, cache, rank=rank, world=world)
    else:
        state = (checkpoint or {}).get("source", {})
        source = StreamingSource(config, corpus, tokenizer, reader, rank=rank, world=world, device=model_device,
                                 rows_consumed=state.get("rows_consumed", 0), passes=state.get("passes", 0))
    return source, hidden_size(model), str(site), config.model


@torch.no_grad()
def _initialise(autoencoder: TopKAutoencoder, sample: torch.Tensor, config: TrainConfig) -> float:
    """Set b_dec from the sample; return the input scale c with E‖x·c − b_dec‖ = sqrt(d_in)."""
    sample = sample.double()
    if config.b_dec_init == "geometric_median":
        centre = geometric_median(sample)
    elif config.b_dec_init == "mean":
        centre = sample.mean(0)
    else:
        centre = torch.zeros(sample.shape[1], dtype=sample.dtype)
    scale = 1.0
    if config.scale_inputs:
        mean_norm = float((sample - centre).norm(dim=1).mean())
        scale = math.sqrt(sample.shape[1]) / mean_norm if mean_norm > 0 else 1.0
    autoencoder.b_dec.copy_((centre * scale).float())
    return scale


def geometric_median(points: torch.Tensor, iterations: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm, started at the mean."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp(min=eps)
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        if float((updated - median).norm()) < eps * float(median.norm().clamp(min=1.0)):
            return updated
        median = updated
    return median


# -- step ----------------------------------------------------------------------------


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up over the first ``warmup`` of steps, flat, linear decay to 0 over the last ``decay``."""
    steps, peak = config.steps, config.learning_rate
    warmup, decay = round(config.warmup * steps), round(config.decay * steps)
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if decay and step >= steps - decay:
        return peak * (steps - step) / decay
    return peak


class DeadFeatures:
    """Tokens since each feature last fired; dead = more than ``dead_tokens``."""

    def __init__(self, width: int, dead_tokens: int, device):
        self.since_fired = torch.zeros(width, dtype=torch.long, device=device)
        self.dead_tokens = dead_tokens

    def mask(self) -> torch.Tensor:
        return self.since_fired > self.dead_tokens

    def update(self, fired: torch.Tensor, tokens: int) -> None:
        self.since_fired += tokens
        self.since_fired[fired] = 0


def train_step(run: _Run, accelerator, batch: torch.Tensor) -> StepOutput:
    """One optimizer step on ``batch (b, d)`` (this process's share of the global batch)."""
    config, ae = run.config, run.autoencoder
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(run.step, config)
    x = batch.to(ae.W_dec.device) * run.input_scale
    output = run.wrapped(x, run.dead.mask(), config.auxk_alpha)
    run.optimizer.zero_grad(set_to_none=True)
    accelerator.backward(output.loss)
    ae.project_decoder_grad()
    run.optimizer.step()
    ae.normalize_decoder()
    fired = output.fired
    if accelerator.num_processes > 1:
        fired = accelerator.reduce(fired.long(), reduction="sum") > 0
    run.dead.update(fired, config.batch_size)
    run.step += 1
    return output


# -- the loop ------------------------------------------------------------------------


def _fit(run: _Run, accelerator, callback, progress: bool) -> None:
    from tqdm.auto import tqdm

    config = run.config
    show = progress and accelerator.is_main_process
    bar = tqdm(total=config.steps, initial=run.step, unit="step", desc=f"training SAE {config.width}×k{config.k}",
               disable=not show, dynamic_ncols=True)
    try:
        with _stop_on_ctrl_c() as stop_requested:
            for batch in run.source.batches(run.step):
                output = train_step(run, accelerator, batch)
                run.last = _metrics(run, output)
                bar.update(1)
                bar.set_postfix({"loss": f"{run.last['loss']:.4f}", "fvu": f"{run.last['fvu']:.3f}",
                                 "L0": f"{run.last['l0']:.1f}", "dead": f"{100 * run.last['dead_fraction']:.1f}%"},
                                refresh=False)
                if callback is not None:
                    callback(StepInfo(run.step, run.step * config.batch_size, dict(run.last)))
                if stop_requested():
                    raise KeyboardInterrupt
                if run.step % config.checkpoint_every == 0 and run.step < config.steps:
                    _save_checkpoint(run, accelerator)
    except _Aborted:
        raise  # mid-step: the state may be half-updated, so the last periodic checkpoint stands
    except KeyboardInterrupt:
        _save_checkpoint(run, accelerator)
        if show:
            print(f"\nsteer: interrupted at step {run.step}; checkpoint saved in {run.work} — rerun the same command "
                  "to resume", file=sys.stderr)
        raise
    finally:
        bar.close()


def _metrics(run: _Run, output: StepOutput) -> dict[str, float]:
    return {"loss": float(output.loss.detach()), "fvu": float(output.fvu), "auxk": float(output.auxk), "l0": output.l0,
            "dead_fraction": float(run.dead.mask().float().mean()), "min_kept": output.min_kept,
            "lr": run.optimizer.param_groups[0]["lr"]}


class _Aborted(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, without writing a checkpoint."""


@contextlib.contextmanager
def _stop_on_ctrl_c():
    """The first SIGINT asks the loop to stop after the current step; a second one raises at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum, frame):
        if requested.is_set():
            raise _Aborted
        requested.set()
        print("\nsteer: stopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


# -- checkpoints ---------------------------------------------------------------------


def _save_checkpoint(run: _Run, accelerator) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    state = {
        "recipe": run.config.to_dict(), "recipe_hash": recipe_hash(run.config), "step": run.step,
        "tokens_seen": run.step * run.config.batch_size, "autoencoder": run.autoencoder.state_dict(),
        "optimizer": run.optimizer.state_dict(), "input_scale": run.input_scale, "since_fired": run.dead.since_fired.cpu(),
        "source": run.source.state(), "rng": torch.get_rng_state(), "metrics": run.last, "wall_time": _wall(run),
    }
    save_state(run.work / CHECKPOINT, state, error=TrainError)


def _wall(run: _Run) -> float:
    """Training wall time so far, across resumed runs (model and SAE; not the final statistics)."""
    return run.wall_before + time.monotonic() - run.started


def _work_recipe(work: Path) -> str | None:
    return _read(work / RECIPE_HASH)


def _load_checkpoint(work: Path, config: TrainConfig) -> dict | None:
    path = work / CHECKPOINT
    if not path.is_file():
        if (work / "checkpoint.pt").is_file():
            raise TrainError("holds a pickled checkpoint.pt from an older steer, which is not read (unpickling can run "
                             "code); pass --restart to start over", where=str(work))
        return None
    state = load_state(path, error=TrainError)  # a truncated or foreign file: one line, rather than train from it
    if state.get("recipe_hash") != recipe_hash(config):
        changed = sorted(k for k, v in config.to_dict().items() if state.get("recipe", {}).get(k) != v)
        raise TrainError(
            f"holds a checkpoint of a different recipe (changed: {', '.join(changed) or 'trainer version'}); "
            "rerun with the same settings to resume, or pass --restart to start over", where=str(work),
        )
    return state


# -- finish --------------------------------------------------------------------------


def _finish(run: _Run, accelerator, out: Path, overwrite: bool, wall: float, multi_site: dict | None = None) -> TrainResult:
    config, ae = run.config, run.autoencoder
    sample = run.source.sample(config.stats_tokens)
    batches = list(sample.split(config.batch_size // accelerator.num_processes))
    threshold = _batchtopk_threshold(ae, batches, run.input_scale) if ae.batch_topk else None
    training = {
        "recipe": config.to_dict(), "recipe_hash": recipe_hash(config), "tokens_seen": run.step * config.batch_size,
        "steps": run.step, "input_scale": run.input_scale, "wall_time_s": round(wall, 1),
        "batchtopk_threshold": threshold, "held_out_rule": "sha256(document text)[:8] mod 10000 < held_out*10000",
        "processes": accelerator.num_processes,
    }
    if multi_site is not None:
        training["multi_site_run"] = multi_site
    sae = ae.to_sae(input_scale=run.input_scale, threshold=threshold, site=run.site, model_name=run.model_name,
                    metadata={"context_size": config.context_size, "dataset_path": config.corpus, "prepend_bos": False,
                              "exclude_special_tokens": False, "steer_training": training})
    stats, sample_metrics = feature_statistics(sae, batches)
    sae.feature_stats = stats
    training["final_metrics_on_training_sample"] = {k: round(v, 6) for k, v in sample_metrics.items()}
    path = save_sae(sae, out, overwrite=overwrite) if accelerator.is_main_process else out
    accelerator.wait_for_everyone()
    return TrainResult(path=path, sae=sae, tokens_seen=run.step * config.batch_size,
                       metrics={**sample_metrics, "wall_time_s": wall, "steps": run.step})


@torch.no_grad()
def _batchtopk_threshold(ae: TopKAutoencoder, batches, input_scale: float) -> float:
    """θ (in the scaled input space): the mean over batches of the smallest activation batchtopk keeps."""
    minima = []
    for x in batches:
        pre = ae.pre_activation(x.to(ae.W_dec.device) * input_scale)
        tokens, features, _ = ae.select(pre)
        values = pre[tokens, features]
        positive = values[values > 0]
        if positive.numel():
            minima.append(float(positive.min()))
    return sum(minima) / len(minima) if minima else 0.0
