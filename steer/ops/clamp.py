"""clamp (value v): pin feature i to v (Goodfire "pin"), everywhere or where it is active.

delta = (v − f_i(x)) · d_i where the condition holds (times sigma).
"""

from steer.ops.amounts import Slider
from steer.ops.base import Operation, Primitive, register

CLAMP = register(Operation(
    name="clamp",
    reads="feature",
    coefficient=lambda v, f, sigma: (v - f) * sigma,
    formula="(v − f_i(x))·d_i",
    lowers_to=Primitive.FEATURE,
    amount_key="to",
    example="clamp feature {feature} to 2 when active site resid_post.1",
    dsl_verb="clamp",
    dsl_word="to",
    help="pin the feature to V",
    units=("raw", "feature"),
    slider=Slider("value (× the feature's p99 activation)", 0, 10, 0.5, 2, "clamp feature {i} to {s:g} units feature"),
))
