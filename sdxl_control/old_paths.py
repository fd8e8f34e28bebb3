"""The module paths of release 0.2, kept working for one release: ``import sdxl_control.generator`` gives the module
that now lives at ``sdxl_control.passes.generator`` (the same module object, so a name patched through either path is
patched for both) and warns once with its new path.

The modules moved into layers (see the layer map in the documentation); only the package's ``__init__`` installs this
finder, and no module of sdxl-control imports an old path (``tests/test_layers.py`` checks it).

Example:
    >>> import importlib, warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     old = importlib.import_module("sdxl_control.spec")
    >>> old is importlib.import_module("sdxl_control.jobs.spec")
    True
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from importlib.abc import Loader

__all__ = ["MOVED", "install"]

# old path (under sdxl_control.) -> new path; removed in the release after 0.3. The old ``sdxl_control.weights`` is
# now the package of that layer, which answers the old module's names itself.
MOVED = {
    "errors": "base.errors", "validation": "base.validation", "files": "base.files", "model_refs": "base.model_refs",
    "defaults": "base.defaults", "caches": "base.caches", "preprocessors.images": "base.images",
    "infotext": "records.infotext", "recipe": "records.recipe",
    "checkpoints": "weights.checkpoints", "hub": "weights.hub", "storage": "weights.storage",
    "conversion": "weights.conversion", "model_folders": "weights.model_folders",
    "inventory": "weights.inventory", "sdxl_configs": "weights.sdxl_configs", "clip_vocab": "weights.clip_vocab",
    "conditions": "protocol.conditions", "attach": "protocol.attach", "attention": "protocol.attention",
    "text": "protocol.text", "emphasis": "protocol.emphasis", "schedule": "protocol.schedule",
    "guidance": "protocol.guidance", "fast": "protocol.fast",
    "models": "engine.models", "vae": "engine.vae", "start": "engine.start", "loop": "engine.loop",
    "step_cache": "engine.step_cache", "preview": "engine.preview", "upscale": "engine.upscale",
    "devices": "engine.devices",
    "generator": "passes.generator", "detailer": "passes.detailer",
    "spec": "jobs.spec", "resolvers": "jobs.resolvers", "runner": "jobs.runner", "batch": "jobs.batch",
    "ray_batch": "jobs.ray_batch", "png_import": "jobs.png_import",
    "sheet": "cli.sheet",
}  # fmt: skip


class _OldPath:
    """Finds an old module path and loads it as the module at its new path (a meta path finder and its loader; not
    derived from importlib.abc, whose import would cost the command line's ``--help`` time)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        old = fullname.removeprefix("sdxl_control.")
        if old == fullname or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, cast("Loader", self))

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = f"sdxl_control.{MOVED[spec.name.removeprefix('sdxl_control.')]}"
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the release after 0.3", FutureWarning, 3)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The module at the new path is already executed. The import system has just given it the old path's spec:
        it gets its own back (``importlib.reload`` and ``importlib.resources`` read it)."""
        found = importlib.machinery.PathFinder.find_spec(module.__name__, _parent_path(module.__name__))
        if found is not None:
            module.__spec__ = found


def _parent_path(name: str) -> Sequence[str] | None:
    parent = sys.modules.get(name.rpartition(".")[0])
    return getattr(parent, "__path__", None)


def install() -> None:
    """Answer the old paths (once per process)."""
    if not any(isinstance(finder, _OldPath) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldPath())
