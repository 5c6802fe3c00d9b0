"""project_out (fraction p): remove a unit direction û from the stream (abliteration).

delta = −p · (x·û) · û  — linear, so it lowers exactly into orthogonalised writers or a rank-1 LoRA.
"""

from steer.ops.amounts import FRACTION
from steer.ops.base import Operation, Primitive, register

PROJECT_OUT = register(Operation(
    name="project_out",
    reads="projection",
    coefficient=lambda p, proj, _sigma: -p * proj,
    formula="−p·(x·û)·û",
    lowers_to=Primitive.PROJECTION,
    amount_key="fraction",
    example="project out direction {direction} site writers",
    dsl_verb="project out",
    dsl_word="by",
    help="remove P of the stream's component along the unit direction (default 100%)",
    amount=FRACTION,
    default=1.0,
    nonnegative=True,
    directions=True,
    # past 1 the component is removed and part of it reversed (the worked example ships 1.15): searched up to 1.5,
    # or the spec's own fraction if it is larger
    tune_range=lambda amount: (0.0, max(1.5, amount)),
    linear=True,
))
