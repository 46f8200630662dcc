"""kdpipe: knowledge distillation as a two-stage pipeline.

Stage one runs a teacher once over a data set and writes everything students need into a
chunked Zarr store; stage two trains any number of students from that store, teacher-free.
"""

__version__ = "0.1.0"

from kdpipe.errors import KdpipeError  # noqa: E402,F401
