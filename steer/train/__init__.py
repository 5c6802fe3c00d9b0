"""SAE training: recipes (`TrainConfig`, `load_recipe`), the trainer (`train_sae`) and the default SAE (`default_sae`).

    from steer.train import load_recipe, train_sae
    result = train_sae(load_recipe("configs/smollm2-135m-resid_post.10.yaml"), "saes/mine")
    steer.load_sae(result.path)

See `steer.train.trainer` for what a run does, `steer.train.config` for every
recipe field. Nothing here is imported by ``import steer``: training pulls in
accelerate and the corpus readers only when asked for.
"""

from steer.train.config import TrainConfig, TrainError, load_recipe, recipe_hash
from steer.train.default import DEFAULT_RECIPE, default_sae
from steer.train.trainer import StepInfo, TrainResult, train_sae

__all__ = [
    "DEFAULT_RECIPE", "StepInfo", "TrainConfig", "TrainError", "TrainResult", "default_sae", "load_recipe",
    "recipe_hash", "train_sae",
]
