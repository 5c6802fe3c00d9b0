"""The edit operations of DESIGN §5, one module each, registered in `OPERATIONS` (see `steer.ops.base`).

Adding an operation: write ``steer/ops/<op>.py`` (vocabulary, coefficient, lowering primitive) and import it
below; the spec reader, DSL, compiler, tuning, demo and artifact targets pick it up from the registry.
"""

from steer.ops.base import OPERATIONS, Operation, Primitive, dsl_verbs, sugar_verbs, yaml_verbs

# isort: off
from steer.ops import scale, clamp, add, project_out, cap, monitor  # noqa: F401  (registers them, in the order users see)
# isort: on

__all__ = ["OPERATIONS", "Operation", "Primitive", "dsl_verbs", "sugar_verbs", "yaml_verbs"]
