"""The VisSTG network and its parts.

Submodules are imported lazily so that ``import visstg.model.backbone`` (or a Hydra ``_target_``
naming one part) does not pull in every other part.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ResNetFPN": "backbone",
    "ReferenceEncoder": "graph",
    "GraphBuilder": "graph",
    "build_graph": "graph",
    "pixels_to_maps": "graph",
    "EdgeNodeConv": "gnn",
    "SpatialTemporalGNN": "gnn",
    "VisSTG": "visstg",
    "VisSTGCriterion": "criterion",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
