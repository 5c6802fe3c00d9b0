"""SAE training: recipes (`TrainConfig`, `load_recipe`), the trainer (`train_sae`, and `train_saes` for several
sites from one model pass) and the default SAE (`default_sae`: the shipped one, or a recipe's, trained once).

    from steer.train import load_recipe, train_sae, train_saes
    result = train_sae(load_recipe("configs/smollm2-135m-resid_post.10.yaml"), "saes/mine")
    steer.load_sae(result.path)
    results = train_saes(load_recipe("configs/smollm2-135m-multidepth.yaml"), "saes/depths")   # saes/depths/<site>/

See `steer.train.trainer` for what a run does, `steer.train.config` for every
recipe field. Nothing here is imported by ``import steer``: training pulls in
accelerate and the corpus readers only when asked for.
"""

from steer.train.config import TrainConfig, TrainError, load_recipe, recipe_hash
from steer.train.default import DEFAULT_RECIPE, default_sae
from steer.train.trainer import StepInfo, TrainResult, train_sae, train_saes

__all__ = [
    "DEFAULT_RECIPE", "StepInfo", "TrainConfig", "TrainError", "TrainResult", "default_sae", "load_recipe",
    "recipe_hash", "train_sae", "train_saes",
]
