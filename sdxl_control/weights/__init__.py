"""Layer 2, weights on disk and in memory: checkpoint files and their keys (:mod:`.checkpoints`, :mod:`.conversion`,
:mod:`.sdxl_configs`), the hub and model folders (:mod:`.hub`, :mod:`.model_folders`), what is present and what is
missing (:mod:`.inventory`), how weights are stored (:mod:`.storage`) and patched exactly (:mod:`.patches`).

``sdxl_control.weights`` was the patches module until release 0.2; its names are still answered here for one
release (import them from :mod:`sdxl_control.weights.patches`).
"""

from __future__ import annotations

import warnings
from typing import Any

_PATCH_NAMES = ("LowRankDelta", "WeightDelta", "WeightPatch")


def __getattr__(name: str) -> Any:
    if name not in _PATCH_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import patches

    warnings.warn(f"{__name__}.{name} moved to {__name__}.patches.{name}", FutureWarning, 2)
    return getattr(patches, name)
