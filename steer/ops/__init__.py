"""The edit operations of DESIGN §5, one module each, registered in `OPERATIONS` (see `steer.ops.base`).

Adding an operation: write ``steer/ops/<op>.py`` (vocabulary, coefficient, lowering primitive) and import it
below; the spec reader, DSL, compiler, tuning, demo and artifact targets pick it up from the registry.
"""

from steer.ops.base import OPERATIONS, Operation, Primitive, dsl_verbs, sugar_verbs, yaml_verbs
# registration order is the order users see them listed in
from steer.ops import scale, clamp, add, project_out, cap, monitor  # noqa: F401, I001  (registers them)

__all__ = ["OPERATIONS", "Operation", "Primitive", "dsl_verbs", "sugar_verbs", "yaml_verbs"]
