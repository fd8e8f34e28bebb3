"""LoRA conditions: community SDXL LoRAs (kohya/A1111 and diffusers/peft formats), several at once with weights.

A LoRA is fused into the weights it targets while its step window is active — no per-step cost — and removed by
putting the original parameter objects back, so the model is bit-identical afterwards. Text-encoder parts are
fused while the stage's prompt is encoded. Reading the many published key layouts is diffusers' converter's job.

Example:
    >>> from sdxl_control.adapters.lora import LoRA
    >>> conditions = [LoRA("pixel-art-xl.safetensors", scale=0.8), LoRA("ByteDance/SDXL-Lightning",
    ...               weight_name="sdxl_lightning_4step_lora.safetensors")]  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..conditions import Attachment, Condition, PrepareContext, Prepared, Stage, StepInfo
from ..errors import CheckpointError, ConditionError, IncompatibleModelError
from ..files import addnet_hash
from ..infotext import Infotext, safe_name
from ..inventory import ModelNeed, weights_need
from ..models import read_safetensors, resolve_in, resolve_source
from ..weights import WeightPatch

__all__ = ["LoRA", "lora_deltas"]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: LoRAs are read from .safetensors files only")
    state = read_safetensors(path)
    if not state:
        raise CheckpointError(f"{path} holds no tensors: an empty or unfinished LoRA file")
    return state


# After diffusers' converter, LoRA pairs come named in one of these layouts; each gives (module, down|up).
_KEY_LAYOUTS = [
    re.compile(r"(?P<module>.+)\.lora_(?P<which>A|B)\.weight$"),  # peft
    re.compile(
        r"(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_[qkv]|to_out)_lora\.(?P<which>down|up)\.weight$"
    ),  # legacy
    re.compile(r"(?P<module>.+)\.lora_linear_layer\.(?P<which>down|up)\.weight$"),
    re.compile(r"(?P<module>.+)\.lora\.(?P<which>down|up)\.weight$"),
]
# The legacy attention-processor names, per component: the UNet's to_out is a list, CLIP calls them *_proj.
_LEGACY_PROJ = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}


def _pair_key(key: str, component: str) -> tuple[str, str]:
    """(module, "down" | "up") of one LoRA weight name."""
    for pattern in _KEY_LAYOUTS:
        match = pattern.match(key)
        if match:
            module = match["module"]
            proj = match.groupdict().get("proj")
            if proj:
                module = f"{module}.{_LEGACY_PROJ['unet' if component == 'unet' else 'text'][proj]}"
            return module, {"A": "down", "B": "up"}.get(match["which"], match["which"])
    raise IncompatibleModelError(f"unrecognised LoRA weight name {key!r}")


def lora_deltas(
    state: dict[str, torch.Tensor], unet_config: Any, weight: float = 1.0, device: torch.device | str = "cpu"
) -> dict[str, dict[str, torch.Tensor]]:
    """Per component (``unet``, ``text_encoder``, ``text_encoder_2``): parameter name -> ``weight * alpha/r * up @ down``,
    computed in float32 on ``device`` (the UNet's: the products are as large as the weights they patch)."""
    from diffusers import StableDiffusionXLPipeline

    try:
        # The converter pops keys from the dict it is given.
        converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(state), unet_config=unet_config)
    except (ValueError, KeyError) as exc:
        raise IncompatibleModelError(f"not a LoRA layout diffusers knows ({exc})") from None
    pairs: dict[str, dict[str, dict[str, torch.Tensor]]] = {c: defaultdict(dict) for c in COMPONENTS}
    for key, value in converted.items():
        component, _, rest = key.partition(".")
        if component not in pairs:
            raise IncompatibleModelError(f"LoRA weight {key!r} targets no SDXL component")
        module, which = _pair_key(rest, component)
        pairs[component][module][which] = value
    module_alpha: dict[tuple[str, str], float] = {}
    for key, alpha in (alphas or {}).items():
        component, _, rest = key.removesuffix(".alpha").partition(".")
        module = _pair_key(rest, component)[0] if rest.endswith(".weight") else rest
        module_alpha[(component, module)] = float(alpha)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for component, modules in pairs.items():
        deltas = {}
        for module, pair in modules.items():
            if set(pair) != {"down", "up"}:
                raise IncompatibleModelError(
                    f"LoRA module {module} lacks its {'up' if 'down' in pair else 'down'} weight"
                )
            down, up = pair["down"].to(device, torch.float32), pair["up"].to(device, torch.float32)
            rank = down.shape[0]
            scale = weight * module_alpha.get((component, module), rank) / rank
            if down.ndim == 4:  # convolution LoRA (LoCon): a 1x1 up after a kxk down
                delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
            else:
                delta = up @ down
            deltas[f"{module}.weight"] = delta * scale
        if deltas:
            out[component] = deltas
    return out


class _LoRAAttachment(Attachment):
    """Fuses the deltas when the window opens and unfuses them when it closes (at most twice a call)."""

    def __init__(self, unet: Any, deltas: dict[str, torch.Tensor], source: str) -> None:
        self.unet, self.deltas, self.source = unet, deltas, source
        self.patch: WeightPatch | None = None

    def contribute(self, step: StepInfo, active: bool) -> None:
        if active and self.patch is None:
            try:
                self.patch = WeightPatch(self.unet, self.deltas)
            except (ValueError, AttributeError) as exc:
                raise IncompatibleModelError(f"{self.source} does not fit this UNet: {exc}") from None
        elif not active and self.patch is not None:
            self.patch.restore()
            self.patch = None

    def detach(self) -> None:
        if self.patch is not None:
            self.patch.restore()
            self.patch = None


class _LoRAPrepared(Prepared):
    def __init__(self, deltas: dict[Stage, dict[str, dict[str, torch.Tensor]]], source: str) -> None:
        self.deltas, self.source = deltas, source

    def attach(self, unet: Any, stage: Stage) -> Attachment:
        return _LoRAAttachment(unet, self.deltas[stage].get("unet", {}), self.source)

    def text_encoder_deltas(self, stage: Stage) -> dict[str, dict[str, torch.Tensor]]:
        return {k: v for k, v in self.deltas.get(stage, {}).items() if k != "unet"}


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
        return _LoRAPrepared(deltas, str(path))


def _check_fit(deltas: dict[str, torch.Tensor], unet: Any, what: str) -> None:
    """Refuse a LoRA that does not fit before anything runs (rather than at its window's first step)."""
    parameters = dict(unet.named_parameters())
    for name, delta in deltas.items():
        target = parameters.get(name)
        if target is None or target.shape != delta.shape:
            found = "no such weight" if target is None else f"the weight is {tuple(target.shape)}"
            raise IncompatibleModelError(
                f"{what}: LoRA does not fit this UNet at {name}: {tuple(delta.shape)}, {found}"
            )
