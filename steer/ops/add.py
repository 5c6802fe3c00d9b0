"""add (strength α): steer along a feature's decoder row or any given vector.

delta = α · d  — constant per token, so it lowers exactly into a writer bias or a control vector.
"""

from steer.ops.amounts import NUMBER, Slider, Verb
from steer.ops.base import Operation, Primitive, register

ADD = register(Operation(
    name="add",
    reads="nothing",
    coefficient=lambda a, _read, _sigma: a,
    formula="α·d_i",
    lowers_to=Primitive.CONSTANT,
    amount_key="strength",
    example="add direction {direction} by 2 site resid_post.1",
    dsl_verb="add",
    dsl_word="by",
    help="add A × the feature's decoder row (or the direction)",
    units=("raw", "feature", "norm"),
    directions=True,
    sugar={"steer": Verb("add", "by", NUMBER, slider=Slider(
        "strength (× the feature's p99 activation)", -12, 12, 0.5, 4, "steer feature {i} by {s:+g} units feature"))},
    tune_range=lambda amount: tuple(sorted((0.0, 2.0 * amount))) if amount != 0 else None,
))
