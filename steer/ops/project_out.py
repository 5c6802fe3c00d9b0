"""project_out (fraction p): remove a unit direction û from the stream (abliteration).

delta = −p · (x·û) · û  — linear, so it lowers exactly into orthogonalised writers.
"""

from steer.ops.base import Operation, register

PROJECT_OUT = register(Operation(
    name="project_out",
    reads="projection",
    writes=True,
    coefficient=lambda p, proj, _sigma: -p * proj,
    formula="−p·(x·û)·û",
))
