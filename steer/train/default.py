"""The default SAE: SmolLM2-135M-Instruct at resid_post.10, trained on first use and cached.

``default_sae()`` returns the directory of the SAE that the default recipe
(``configs/smollm2-135m-resid_post.10.yaml``) produces, training it the first
time (≈ 15–20 min on 2 CPU cores, with a progress bar; an interrupted run
resumes) under ``$STEER_CACHE/saes/<recipe name>-<recipe hash>`` (default
``~/.cache/steer``). A changed recipe or trainer version gets a new hash, so
a stale SAE is never returned for a new recipe.

Never trains when the cached directory is complete; never writes outside the
cache. Processes that need it at once share one training: the first takes a
lock file beside the target, the others wait for it (POSIX ``flock``).
"""

from __future__ import annotations

import fcntl
import sys
from pathlib import Path

from steer.models.loading import cache_root
from steer.train.config import TrainError, load_recipe, recipe_hash

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_RECIPE = CONFIGS / "smollm2-135m-resid_post.10.yaml"
"""The CPU recipe; ``…-gpu.yaml`` beside it is the larger one for a GPU."""


def default_sae(recipe: str | Path = DEFAULT_RECIPE, *, progress: bool = True) -> Path:
    """The cached SAE directory for ``recipe`` (default: the default recipe), training it if missing."""
    recipe = Path(recipe)
    if not recipe.is_file():
        raise TrainError(
            "the default SAE recipe is not there; steer finds configs/ beside its package, so install it from a "
            "checkout (`pip install -e .`) or pass a recipe path", where=str(recipe),
        )
    config = load_recipe(recipe)
    target = cache_root() / "saes" / f"{recipe.stem}-{recipe_hash(config)}"
    if (target / "cfg.json").is_file():
        return target
    from steer.train.trainer import train_sae

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        # two first uses at once (a test run and a demo): one trains, the other waits for it and reads its result
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"steer: waiting for another process that is training the default SAE into {target}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "cfg.json").is_file():
            return target
        if progress:
            print(f"steer: training the default SAE ({recipe.name}) into {target} — once; rerun to resume if interrupted",
                  file=sys.stderr)
        return train_sae(config, target, progress=progress).path
