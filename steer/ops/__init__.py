"""The edit operations of DESIGN §5, one module each, registered in `OPERATIONS`."""

from steer.ops.base import OPERATIONS, Operation
from steer.ops import add, cap, clamp, monitor, project_out, scale  # noqa: F401  (registers them)

__all__ = ["OPERATIONS", "Operation"]
