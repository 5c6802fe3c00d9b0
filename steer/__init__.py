"""steer: compile SAE feature edits into exact hooks and deployable artifacts.

The stable Python API is four names:

    model, tokenizer = steer.load_model("smollm2-135m-instruct")
    sae = steer.load_sae("saes/smollm2-l15", site="resid_post.15")
    plan = steer.compile("suppress feature 4312 by 80%", model, sae, tokenizer=tokenizer)
    with steer.applied(model, plan) as run:
        model.generate(...)

The pipeline reads top to bottom in the package: ``spec`` (what the user
asked) → ``plan`` (validated, resolved, SAE sliced) → ``lower`` (hooks; later
artifacts) → verify.
"""

from steer.errors import ModelError, SAEError, SpecError, SteerError
from steer.lower import SteeringRun, applied
from steer.models import load_model
from steer.plan import Plan, compile
from steer.sae import SAE, load_sae
from steer.spec import Edit, Spec, parse_spec

__version__ = "0.1.0"

__all__ = [
    "SAE", "Edit", "ModelError", "Plan", "SAEError", "Spec", "SpecError", "SteerError", "SteeringRun",
    "applied", "compile", "load_model", "load_sae", "parse_spec", "__version__",
]
