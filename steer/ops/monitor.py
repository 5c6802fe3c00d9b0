"""monitor (threshold): record where feature i fires; changes nothing.

delta = 0. The hook records f_i(x) per token; `fired` is f_i(x) > threshold.
"""

from steer.ops.base import Operation, register

MONITOR = register(Operation(
    name="monitor",
    reads="feature",
    writes=False,
    coefficient=lambda _t, _f, _sigma: 0.0,
    formula="0 (records f_i(x))",
))
