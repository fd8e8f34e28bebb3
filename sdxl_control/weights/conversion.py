"""Key conversion of published checkpoints into the loaded models' parameter names: kept apart from the runtime
code, which only ever sees ``{component: {parameter name: delta}}`` (the weight channel, see
:meth:`sdxl_control.Prepared.weight_deltas`).

* :func:`lora_deltas`: community LoRA files (kohya/A1111, diffusers, peft), through diffusers' own converter;
* :func:`numbered_lora_deltas`: the LoRA inside IP-Adapter FaceID checkpoints, which numbers attention layers;
* :func:`processor_lora_deltas`: LoRAs named after diffusers' old attention processors (PhotoMaker's);
* :func:`text_parameter`: CLIP parameter names as published LoRAs write them, for the installed transformers.

Example:
    >>> text_parameter({"encoder.layers.0.mlp.fc1.weight"}, "text_model.encoder.layers.0.mlp.fc1.weight")
    'encoder.layers.0.mlp.fc1.weight'
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from ..base.errors import IncompatibleModelError
from .patches import LowRankDelta

__all__ = ["COMPONENTS", "lora_deltas", "numbered_lora_deltas", "processor_lora_deltas", "text_parameter"]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


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
) -> dict[str, dict[str, LowRankDelta]]:
    """A community LoRA file (kohya/A1111, diffusers or peft layout) as deltas per component (``unet``,
    ``text_encoder``, ``text_encoder_2``): parameter name -> ``weight * alpha/r * up @ down``, its factors on
    ``device`` (the UNet's), multiplied out in float32 only while it is added (convolution LoRAs, LoCon, too)."""
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
    out: dict[str, dict[str, LowRankDelta]] = {}
    for component, modules in pairs.items():
        deltas = {}
        for module, pair in modules.items():
            if set(pair) != {"down", "up"}:
                raise IncompatibleModelError(
                    f"LoRA module {module} lacks its {'up' if 'down' in pair else 'down'} weight"
                )
            # The factors stay in the file's dtype (the file's own tensors, no copy on the CPU); the product is
            # taken in float32.
            down, up = pair["down"].to(device), pair["up"].to(device)
            rank = down.shape[0]
            scale = weight * module_alpha.get((component, module), rank) / rank
            deltas[f"{module}.weight"] = LowRankDelta(up, down, scale, torch.float32)
        if deltas:
            out[component] = deltas
    return out


_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


def _projection_weight(module: str, projection: str) -> str:
    # diffusers keeps an attention layer's output projection as the first of a list.
    return f"{module}.{projection}.0.weight" if projection == "to_out" else f"{module}.{projection}.weight"


def numbered_lora_deltas(
    weights: Mapping[str, torch.Tensor], unet: Any, scale: float, device: torch.device | str
) -> dict[str, LowRankDelta]:
    """``scale * up @ down`` for every attention projection an IP-Adapter FaceID checkpoint's LoRA covers
    (``<n>.to_q_lora.down.weight``...), keyed by UNet parameter name: the checkpoint numbers all attention layers in
    the UNet's processor order (0, 1, 2, ...). Scale 0 gives no deltas."""
    if scale == 0:
        return {}
    deltas = {}
    for index, name in enumerate(unet.attn_processors):
        module = name.removesuffix(".processor")
        for projection in _PROJECTIONS:
            down = weights.get(f"{index}.{projection}_lora.down.weight")
            up = weights.get(f"{index}.{projection}_lora.up.weight")
            if down is None or up is None:
                continue
            deltas[_projection_weight(module, projection)] = LowRankDelta(
                up.to(device), down.to(device), scale, torch.float32
            )
    return deltas


def processor_lora_deltas(
    lora: Mapping[str, torch.Tensor], unet: Any, scale: float, source: object
) -> dict[str, LowRankDelta]:
    """``scale * up @ down`` per UNet weight, from LoRA names of diffusers' old attention processors
    (``unet.<layer>.processor.to_q_lora.down.weight``); rank from the tensors, layers as the file lists them. Scale 0
    gives no deltas; a name this UNet lacks is refused, naming ``source``."""
    parameters = dict(unet.named_parameters())
    deltas = {}
    for key, down in lora.items():
        if not key.endswith("_lora.down.weight"):
            continue
        layer, _, projection = key.removeprefix("unet.").removesuffix("_lora.down.weight").rpartition(".processor.")
        target = _projection_weight(layer, projection)
        up = lora[key.replace("_lora.down.", "_lora.up.")]
        if target not in parameters:
            raise IncompatibleModelError(f"{source}: its LoRA names {target}, which this UNet does not have")
        deltas[target] = LowRankDelta(up, down, scale)
    if not deltas:
        raise IncompatibleModelError(f"{source}: no LoRA weights (unet.*.processor.*_lora.*)")
    return {} if scale == 0 else deltas


def text_parameter(names: set[str], key: str) -> str:
    """The parameter of a CLIP text model that ``key`` of a published LoRA names, among the model's ``names``."""
    # Published LoRAs name CLIP layers the transformers-4 way (text_model.encoder...); transformers 5 dropped that level.
    if key not in names and key.startswith("text_model.") and key.removeprefix("text_model.") in names:
        return key.removeprefix("text_model.")
    return key
