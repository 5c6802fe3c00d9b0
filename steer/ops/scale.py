"""scale (factor s ≥ 0): "suppress i by 80%" is s = 0.2, ablate s = 0, amplify s > 1.

delta = (s − 1) · f_i(x) · d_i  (times the SAE's normalisation scale sigma, 1 without one).
Nonlinear in x for relu/jumprelu features: no exact weight lowering exists (a graft approximates it).
"""

from steer.ops.amounts import AMPLIFY, SUPPRESS, Slider, Verb
from steer.ops.base import Operation, Primitive, register

SCALE = register(Operation(
    name="scale",
    reads="feature",
    coefficient=lambda s, f, sigma: (s - 1.0) * f * sigma,
    formula="(s − 1)·f_i(x)·d_i",
    lowers_to=Primitive.FEATURE,
    amount_key="factor",
    example="scale feature {feature} by 0.2 site resid_post.1",
    dsl_verb="scale",
    dsl_word="by",
    help="multiply the feature by F ≥ 0",
    nonnegative=True,
    sugar={
        "suppress": Verb("scale", "by", SUPPRESS, slider=Slider(
            "suppress by (%)", 0, 100, 5, 80, "suppress feature {i} by {s:g}%")),
        "ablate": Verb("scale", None, fixed=0.0, slider=Slider(
            "(no amount: the feature is set to 0)", 0, 0, 1, 0, "ablate feature {i}")),
        "amplify": Verb("scale", "by", AMPLIFY, slider=Slider("factor (×)", 1, 10, 0.5, 2, "amplify feature {i} by {s:g}x")),
    },
    tune_range=lambda _amount: (0.0, 1.0),
    linear=True,
))
