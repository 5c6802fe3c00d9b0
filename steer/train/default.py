"""The default SAEs: shipped pretrained in the package; any recipe trained on first use and cached.

``default_sae()`` returns the directory of the default model's default SAE as
shipped in ``steer/data/saes/`` (`steer.sae.shipped`; ``site=`` picks another
shipped depth) — it never trains. (A checkout that ships none falls back to
`ONE_SITE_RECIPE`, trained once.) ``configs/smollm2-135m-multidepth.yaml``
(`DEFAULT_RECIPE`) is the recipe that trained the shipped SAEs.

``default_sae(recipe)`` is the reproduction path: the SAE(s) ``recipe``
produces, trained the first time (with a progress bar; an interrupted run
resumes) under ``$STEER_CACHE/saes/<recipe name>-<recipe hash>`` (default
``~/.cache/steer``); for a multi-site recipe, the directory of ``site`` (default:
its first site) inside it. A changed recipe or trainer version gets a new hash,
so a stale SAE is never returned for a new recipe.

Never trains when the cached directory is complete; never writes outside the
cache. Processes that need it at once share one training: the first takes a
lock file beside the target, the others wait for it (POSIX ``flock``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from steer.export.atomic import job_lock
from steer.models.loading import cache_root
from steer.sae.shipped import shipped_available, shipped_sae_dir
from steer.train.config import TrainError, load_recipe, recipe_hash

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_RECIPE = CONFIGS / "smollm2-135m-multidepth.yaml"
"""The recipe that trained the shipped SAEs."""
ONE_SITE_RECIPE = CONFIGS / "smollm2-135m-resid_post.10.yaml"
"""The former one-site default: what ``default_sae()`` trains (once) in a checkout that ships no SAEs."""


def default_sae(recipe: str | Path | None = None, *, site: str | None = None, progress: bool = True) -> Path:
    """The shipped default SAE's directory (at ``site`` if given); with ``recipe``, that recipe's SAE, trained if missing."""
    if recipe is None and shipped_available():
        return shipped_sae_dir(site=site)
    recipe = Path(recipe if recipe is not None else ONE_SITE_RECIPE)
    if not recipe.is_file():
        raise TrainError("no such recipe file", where=str(recipe))
    config = load_recipe(recipe)
    target = cache_root() / "saes" / f"{recipe.stem}-{recipe_hash(config)}"
    multi = bool(config.sites)
    if multi and site is not None and site not in config.sites:
        raise TrainError(f"the recipe trains no SAE at {site}; its sites: {', '.join(config.sites)}", where=str(recipe))
    result = target / (site or config.sites[0]) if multi else target
    if (result / "cfg.json").is_file():
        return result
    from steer.train.trainer import train_sae, train_saes

    # two first uses at once (a test run and a demo): one trains, the other waits for it and reads its result
    with job_lock(target, waiting=f"waiting for another process that is training {recipe.name} into {target}"):
        if (result / "cfg.json").is_file():
            return result
        if progress:
            print(f"steer: training {recipe.name} into {target} — once; rerun to resume if interrupted", file=sys.stderr)
        if multi:
            train_saes(config, target, progress=progress)
        else:
            train_sae(config, target, progress=progress)
        return result
