"""scale (factor s ≥ 0): "suppress i by 80%" is s = 0.2, ablate s = 0, amplify s > 1.

delta = (s − 1) · f_i(x) · d_i  (times the SAE's normalisation scale sigma, 1 without one).
Nonlinear in x for relu/jumprelu features: no exact weight lowering exists.
"""

from steer.ops.base import Operation, register

SCALE = register(Operation(
    name="scale",
    reads="feature",
    writes=True,
    coefficient=lambda s, f, sigma: (s - 1.0) * f * sigma,
    formula="(s − 1)·f_i(x)·d_i",
))
