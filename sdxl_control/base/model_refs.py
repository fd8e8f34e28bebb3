"""References to models that presets, recipes, jobs and :meth:`Generator.from_pretrained` name: one frozen value with
one JSON form, and a reader for the forms earlier versions wrote.

Example:
    >>> ref = ModelRef("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors")
    >>> ref.to_json()
    {'source': 'ByteDance/SDXL-Lightning', 'weight_name': 'sdxl_lightning_4step_unet.safetensors'}
    >>> ModelRef.parse(["ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors"], "a UNet") == ref
    True
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError

__all__ = ["ModelRef"]


@dataclass(frozen=True)
class ModelRef:
    """A model file: ``source`` is a hub id, a local folder or a local file; ``weight_name`` names the file inside a
    repo or folder that holds several (SDXL-Lightning's UNet checkpoints, say).

    Its JSON form is ``{"source": ..., "weight_name": ...}`` (``weight_name`` left out when there is none). Recipes
    record a local ``source`` by name and content, as every local file (see :func:`sdxl_control.base.files.portable`).

    Example:
        >>> ModelRef("unet.safetensors").to_json()
        {'source': 'unet.safetensors'}
    """

    source: str
    weight_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise InvalidRequestError(
                f"a model reference needs a source (a hub id, folder or file), got {self.source!r}"
            )
        if self.weight_name is not None and (not isinstance(self.weight_name, str) or not self.weight_name):
            raise InvalidRequestError(f"a model reference's weight_name is a file name, got {self.weight_name!r}")

    def to_json(self) -> dict[str, str]:
        out = {"source": self.source}
        if self.weight_name is not None:
            out["weight_name"] = self.weight_name
        return out

    @classmethod
    def parse(cls, value: Any, what: str) -> ModelRef | None:
        """``value`` as a reference: ``None``; a :class:`ModelRef`; its JSON form; a path or hub id; or the
        ``[repo, file]`` pair that recipes and jobs of 0.1 wrote. Anything else is refused, naming ``what``."""
        if value is None or isinstance(value, ModelRef):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls(os.fspath(value))
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value):
            return cls(value[0], value[1])
        if (
            isinstance(value, Mapping)
            and isinstance(value.get("source"), str)
            and set(value) <= {"source", "weight_name"}
        ):
            return cls(value["source"], value.get("weight_name"))
        raise InvalidRequestError(
            f'{what} should be a path or hub id, or {{"source": ..., "weight_name": ...}}, got {value!r:.120}'
        )
