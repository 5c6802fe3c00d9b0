"""monitor (threshold): record where feature i fires; changes nothing.

delta = 0. The hook records f_i(x) per token; `fired` is f_i(x) > threshold. Every artifact drops it.
"""

from steer.ops.amounts import Slider
from steer.ops.base import Operation, Primitive, register

MONITOR = register(Operation(
    name="monitor",
    reads="feature",
    coefficient=lambda _t, _f, _sigma: 0.0,
    formula="0 (records f_i(x))",
    lowers_to=Primitive.NOTHING,
    amount_key="above",
    example="monitor feature {feature} site resid_post.1",
    dsl_verb="monitor",
    dsl_word="above",
    help="record where the feature is above T (default 0)",
    default=0.0,
    takes_when=False,
    slider=Slider("threshold (raw activation)", 0, 10, 0.5, 0, "monitor feature {i} above {s:g}"),
))
