"""cap (c): cap the projection of x on û at c (Neuronpedia PROJECTION_CAP).

delta = −max(0, x·û − c) · û  — nonlinear in x: hooks only.
"""

import torch

from steer.ops.base import Operation, Primitive, register

CAP = register(Operation(
    name="cap",
    reads="projection",
    coefficient=lambda c, proj, _sigma: -torch.relu(proj - c),
    formula="−max(0, x·û − c)·û",
    lowers_to=Primitive.NONLINEAR,
    amount_key="at",
    example="cap direction {direction} at 0.1 site resid_post.1",
    dsl_verb="cap",
    dsl_word="at",
    help="cap the projection on the unit direction at C",
    units=("raw", "norm"),
    directions=True,
))
