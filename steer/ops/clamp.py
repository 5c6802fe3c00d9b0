"""clamp (value v): pin feature i to v (Goodfire "pin"), everywhere or where it is active.

delta = (v − f_i(x)) · d_i where the condition holds (times sigma).
"""

from steer.ops.base import Operation, register

CLAMP = register(Operation(
    name="clamp",
    reads="feature",
    writes=True,
    coefficient=lambda v, f, sigma: (v - f) * sigma,
    formula="(v − f_i(x))·d_i",
))
