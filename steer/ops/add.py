"""add (strength α): steer along a feature's decoder row or any given vector.

delta = α · d  — constant per token, so it lowers exactly into a writer bias.
"""

from steer.ops.base import Operation, register

ADD = register(Operation(
    name="add",
    reads="nothing",
    writes=True,
    coefficient=lambda a, _read, _sigma: a,
    formula="α·d_i",
))
