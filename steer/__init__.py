"""steer: compile SAE feature edits into exact hooks and deployable artifacts.

The stable Python API is four names:

    model, tokenizer = steer.load_model("smollm2-135m-instruct")
    sae = steer.load_sae("saes/smollm2-l15", site="resid_post.15")
    plan = steer.compile("suppress feature 4312 by 80%", model, sae, tokenizer=tokenizer)
    with steer.applied(model, plan) as run:
        model.generate(...)

``steer.applied(model, [plan_0, None, ...])`` steers each batch row by its own plan (a `RowsRun`).

The pipeline reads top to bottom in the package: ``spec`` (what the user
asked) → ``plan`` (validated, resolved, SAE sliced) → ``lower`` (hooks; later
artifacts) → verify.
"""

from steer.errors import ModelError, SAEError, SpecError, SteerError

__version__ = "0.1.0"

# The names below import torch and transformers (seconds on a small machine), so they load on first
# use (PEP 562): `import steer.errors`, `steer --help` or `steer features show` stay fast.
_LAZY = {
    "SteeringRun": "steer.lower", "applied": "steer.lower", "load_model": "steer.models", "Plan": "steer.plan",
    "compile": "steer.plan", "SAE": "steer.sae", "load_sae": "steer.saes", "Edit": "steer.spec",
    "Spec": "steer.spec", "parse_spec": "steer.spec", "RowsRun": "steer.lower.hooks",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'steer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "SAE", "Edit", "ModelError", "Plan", "RowsRun", "SAEError", "Spec", "SpecError", "SteerError", "SteeringRun",
    "applied", "compile", "load_model", "load_sae", "parse_spec", "__version__",
]
