"""Lowerings of a Plan: hooks (the exact reference) and the artifact targets, one module each.

`steer.lower.targets` is the targets' interface and registry (`TARGETS`); importing this package registers
them in the order users see them listed: weights, adapter, cvec, pack.
"""

from steer.lower.hooks import SteeringRun, applied

# isort: off
from steer.lower import weights, adapter, cvec, pack  # noqa: F401  (registers the targets, in this order)
# isort: on

__all__ = ["SteeringRun", "applied"]
