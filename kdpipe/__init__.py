"""kdpipe: knowledge distillation as a two-stage pipeline.

Stage one runs a teacher once over a data set and writes everything students need into a
chunked Zarr store; stage two trains any number of students from that store, teacher-free.

For your own training loop (``kdpipe.api``)::

    store = kdpipe.open_store("stores/digits")
    training = store.training(method="cat_kd", student="resnet8")
    kdpipe.methods.get("cat_kd")        # a method's registry entry: options, defaults, sources
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kdpipe.errors import KdpipeError
from kdpipe.version import __version__

if TYPE_CHECKING:
    from kdpipe import methods
    from kdpipe.api import Batch, Store, StudentTraining, open_store

__all__ = ["__version__", "KdpipeError", "open_store", "Store", "StudentTraining", "Batch", "methods"]

# The public API is imported on first use: `import kdpipe` (and the CLI's --help) stays light.
_LAZY = {"open_store": "kdpipe.api", "Store": "kdpipe.api", "StudentTraining": "kdpipe.api", "Batch": "kdpipe.api"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "methods":
        return importlib.import_module("kdpipe.methods")
    raise AttributeError(f"module 'kdpipe' has no attribute {name!r}")
