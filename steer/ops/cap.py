"""cap (c): cap the projection of x on û at c (Neuronpedia PROJECTION_CAP).

delta = −max(0, x·û − c) · û
"""

import torch

from steer.ops.base import Operation, register

CAP = register(Operation(
    name="cap",
    reads="projection",
    writes=True,
    coefficient=lambda c, proj, _sigma: -torch.relu(proj - c),
    formula="−max(0, x·û − c)·û",
))
