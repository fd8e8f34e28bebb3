"""LoRA conditions: community SDXL LoRAs (kohya/A1111 and diffusers/peft formats), several at once with weights.

A LoRA is the weight channel's plainest user: its deltas are fused into the weights it targets while it acts — no
per-step cost — and taken out bit for bit when its window closes; text-encoder parts are fused while the prompt of
those steps is encoded. Reading the many published key layouts is the job of
:func:`sdxl_control.weights.conversion.lora_deltas`.

Example:
    >>> from sdxl_control.adapters.lora import LoRA
    >>> conditions = [LoRA("pixel-art-xl.safetensors", scale=0.8), LoRA("ByteDance/SDXL-Lightning",
    ...               weight_name="sdxl_lightning_4step_lora.safetensors")]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..base.errors import CheckpointError, ConditionError, IncompatibleModelError
from ..base.files import addnet_hash
from ..protocol.conditions import Condition, PrepareContext, Prepared, Stage
from ..records.infotext import Infotext, safe_name
from ..weights.checkpoints import read_safetensors
from ..weights.conversion import lora_deltas
from ..weights.hub import resolve_in, resolve_source
from ..weights.inventory import ModelNeed, weights_need
from ..weights.patches import LowRankDelta

__all__ = ["LoRA"]


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: LoRAs are read from .safetensors files only")
    state = read_safetensors(path)
    if not state:
        raise CheckpointError(f"{path} holds no tensors: an empty or unfinished LoRA file")
    return state


class _LoRAPrepared(Prepared):
    def __init__(self, deltas: dict[Stage, dict[str, dict[str, LowRankDelta]]]) -> None:
        self.deltas = deltas

    def weight_deltas(self, stage: Stage) -> dict[str, dict[str, LowRankDelta]]:
        return self.deltas.get(stage, {})


@dataclass(frozen=True)
class LoRA(Condition):
    """A LoRA file with its weight (``scale``); stack as many as you like.

    ``source`` is a ``.safetensors`` path, or a hub id / local folder with ``weight_name`` naming the file in it.
    Works on the base by default; ``stage="refiner"`` or ``"both"`` for LoRAs trained on the refiner.

    Example:
        >>> LoRA("ByteDance/SDXL-Lightning", weight_name="sdxl_lightning_4step_lora.safetensors")  # doctest: +SKIP
    """

    source: str
    weight_name: str | None = None

    kind: ClassVar[str] = "lora"
    supported_stages: ClassVar[Stage] = Stage.BOTH
    path_fields: ClassVar[tuple[str, ...]] = ("source",)
    model_fields: ClassVar[Mapping[str, str]] = {"source": "loras"}

    def infotext(self) -> Infotext:
        # As A1111 writes extra networks: a prompt tag, and the file's hash under "Lora hashes".
        file = self.file()
        name = safe_name(file.stem)
        return Infotext(tags=(f"<lora:{name}:{self.scale:g}>",), fields={"Lora hashes": {name: addnet_hash(file)[:12]}})

    def model_needs(self) -> tuple[ModelNeed, ...]:
        if self.weight_name is None:
            return (weights_need("LoRA", self.source, ["*.safetensors"]),)
        return (weights_need("LoRA", self.source, [self.weight_name]),)

    def file(self) -> Path:
        if self.weight_name is None:
            path = resolve_source(self.source, allow=["*.safetensors"])
            if path.is_dir():
                raise ConditionError(f"{self.source} is a folder: pass weight_name= the LoRA file in it")
            return path
        return resolve_in(self.source, self.weight_name)

    def resident_key(self) -> Hashable:
        # Its deltas are its file's, weighed by scale; the file's size and time tell an edited file from the last one.
        stat = self.file().stat()
        return (self, stat.st_size, stat.st_mtime_ns)

    def prepare(self, ctx: PrepareContext) -> Prepared:
        path = self.file()
        state = _read(path)
        deltas = {}
        for stage, unet in ctx.stages.items():
            if stage in self.stage:
                try:
                    deltas[stage] = lora_deltas(state, unet.config, self.scale, ctx.device)
                except IncompatibleModelError as exc:
                    raise IncompatibleModelError(f"{path}: {exc}") from None
                _check_fit(deltas[stage].get("unet", {}), unet, f"{path} ({stage.label} UNet)")
        return _LoRAPrepared(deltas)


def _check_fit(deltas: dict[str, LowRankDelta], unet: Any, what: str) -> None:
    """Refuse a LoRA that does not fit before anything runs (rather than at its window's first step)."""
    parameters = dict(unet.named_parameters())
    for name, delta in deltas.items():
        target = parameters.get(name)
        if target is None or target.shape != delta.shape:
            found = "no such weight" if target is None else f"the weight is {tuple(target.shape)}"
            raise IncompatibleModelError(
                f"{what}: LoRA does not fit this UNet at {name}: {tuple(delta.shape)}, {found}"
            )
