"""IP-Adapter conditions: reference images (style, composition, faces) through extra cross-attention branches.

The published SDXL files load in their own formats (``image_proj.*`` / ``ip_adapter.*`` keys, safetensors or a
pickled ``.bin`` read with ``weights_only=True``); the image-projection key conversion is diffusers' own. Image
embeddings are computed once per call, or passed in (see :func:`encode_images`, :func:`save_embeddings`).

Example:
    >>> from sdxl_control.adapters.ip_adapter import IPAdapter
    >>> conditions = [IPAdapter.style("style.png", scale=0.8),
    ...               IPAdapter("plus-face", "face.png", scale=0.6, window=(0.0, 0.8))]  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from ..base.caches import PerModelCache, process_cached
from ..base.errors import CheckpointError, ConditionError, IncompatibleModelError, MissingWeightsError
from ..base.files import looks_like_hub_id, looks_local
from ..engine.devices import placement
from ..preprocessors import load_image
from ..protocol.attach import PatchedBranches, ProcessorPatch
from ..protocol.attention import AttentionBranch, BranchedAttnProcessor, attention_layers
from ..protocol.conditions import Attachment, Condition, PrepareContext, Prepared, Stage, Tokens
from ..records.infotext import Infotext, control_unit, model_label
from ..weights.checkpoints import check_safetensors, read_checkpoint, read_safetensors
from ..weights.hub import resolve_in, resolve_source
from ..weights.inventory import ModelNeed, pattern_for, weights_need
from ..weights.patches import WeightDelta
from ..weights.storage import compute_dtype

__all__ = [
    "IPAdapter",
    "IPAdapterVariant",
    "VARIANTS",
    "check_variant",
    "LAYER_PRESETS",
    "checkpoint_family",
    "encode_images",
    "save_embeddings",
    "load_embeddings",
]


@dataclass(frozen=True)
class IPAdapterVariant:
    """A published IP-Adapter: its weights file and image encoder inside the repo, and what it feeds the projection
    (the encoder's projected ``image_embeds``, or its penultimate ``hidden_states`` for the Resampler "plus" models).

    Example:
        >>> VARIANTS["plus-face"].encoder
        'models/image_encoder'
    """

    weights: str
    encoder: str
    uses_hidden_states: bool


REPO = "h94/IP-Adapter"
# A CLIP vision folder as transformers saves it.
ENCODER_FILES = ("config.json", "*.safetensors")
VARIANTS: dict[str, IPAdapterVariant] = {
    "sdxl": IPAdapterVariant("sdxl_models/ip-adapter_sdxl.safetensors", "sdxl_models/image_encoder", False),
    "vit-h": IPAdapterVariant("sdxl_models/ip-adapter_sdxl_vit-h.safetensors", "models/image_encoder", False),
    "plus": IPAdapterVariant("sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", "models/image_encoder", True),
    "plus-face": IPAdapterVariant(
        "sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors", "models/image_encoder", True
    ),
}
# InstantStyle's layer targeting, in diffusers' set_ip_adapter_scale notation: the style block only, the
# composition (layout) block only, or both. Layers not named get scale 0.
LAYER_PRESETS: dict[str, Any] = {
    "all": 1.0,
    "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    "composition": {"down": {"block_2": [0.0, 1.0]}},
    "style+composition": {"up": {"block_0": [0.0, 1.0, 0.0]}, "down": {"block_2": [0.0, 1.0]}},
}


@process_cached(4)
def _load_pickled(path: str, size: int, mtime_ns: int) -> Any:
    # Published FaceID and InstantID files are pickles: read once per process while unchanged.
    return read_checkpoint(Path(path))


def checkpoint_family(state: Mapping[str, Any]) -> str:
    """Which published method a checkpoint's top-level keys (nested dicts or flat ``prefix.key`` names) belong to, for
    error messages that name what was passed instead of what was expected.

    Example:
        >>> checkpoint_family({"id_adapter.latents": None, "id_adapter_attn_layers.1.id_to_k.weight": None})
        'PuLID'
    """
    heads = {str(k).partition(".")[0] for k in state}
    if heads & {"id_adapter", "id_adapter_attn_layers"}:
        return "PuLID"
    if heads & {"id_encoder", "lora_weights"}:
        return "PhotoMaker"
    if heads >= {"image_proj", "ip_adapter"}:
        proj = state["image_proj"] if isinstance(state.get("image_proj"), Mapping) else {
            k.partition(".")[2]: v for k, v in state.items() if str(k).startswith("image_proj.")
        }  # fmt: skip
        names = {str(k) for k in proj}
        if "proj.0.weight" in names:
            return (
                "IP-Adapter FaceID-PlusV2"
                if any(n.startswith("perceiver_resampler.") for n in names)
                else "IP-Adapter FaceID"
            )
        if "latents" in names:
            width = getattr(proj.get("proj_in.weight"), "shape", (0, 0))[1]
            # InstantID's Resampler reads one 512-d ArcFace embedding; IP-Adapter plus reads CLIP hidden states.
            return "InstantID" if width == 512 else "IP-Adapter plus"
        return "IP-Adapter"
    return "unknown"


def read_weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter checkpoint's ``image_proj`` and ``ip_adapter`` state dicts (treat as read-only)."""
    if path.suffix == ".safetensors":
        flat = read_safetensors(path)
        parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if head in parts:
                parts[head][rest] = value
    elif path.suffix == ".bin":
        stat = path.stat()
        parts = _load_pickled(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    else:
        raise CheckpointError(f"{path}: expected a .safetensors or .bin IP-Adapter file")
    if not isinstance(parts, dict) or not parts.get("image_proj") or not parts.get("ip_adapter"):
        family = checkpoint_family(parts) if isinstance(parts, dict) else "unknown"
        what = f"holds {family} weights" if family != "unknown" else "is not an IP-Adapter checkpoint"
        raise IncompatibleModelError(f"{path} {what} (no image_proj / ip_adapter weights)")
    return parts


def cross_layers(unet: Any) -> list[str]:
    return [name for name in attention_layers(unet) if name.endswith("attn2.processor")]


def check_fits(parts: Mapping[str, Mapping[str, torch.Tensor]], unet: Any, source: str) -> None:
    first = parts["ip_adapter"].get("1.to_k_ip.weight")
    if first is None:
        raise IncompatibleModelError(
            f"{source}: no ip_adapter.1.to_k_ip.weight: not an IP-Adapter attention checkpoint"
        )
    cross = first.shape[1]
    if cross != unet.config.cross_attention_dim:
        hint = " (an SD 1.5 IP-Adapter)" if cross == 768 else ""
        raise IncompatibleModelError(
            f"{source}: its image tokens are {cross}-wide{hint}, but this SDXL UNet's cross-attention takes "
            f"{unet.config.cross_attention_dim}"
        )
    layers = len(cross_layers(unet))
    found = sum(1 for k in parts["ip_adapter"] if k.endswith("to_k_ip.weight"))
    if found != layers:
        raise IncompatibleModelError(f"{source} has {found} attention layers, this UNet {layers}")


# The published CLIP vision towers IP-Adapters use, by depth: what a single file of one (ComfyUI's clip_vision folder)
# is read with, as ComfyUI tells them apart. ViT-L/14 (OpenAI), ViT-H/14 and ViT-bigG/14 (LAION), 224-pixel input.
VISION_CONFIGS: dict[int, dict[str, Any]] = {
    24: {"hidden_size": 1024, "intermediate_size": 4096, "projection_dim": 768, "hidden_act": "quick_gelu"},
    32: {"hidden_size": 1280, "intermediate_size": 5120, "projection_dim": 1024, "hidden_act": "gelu"},
    48: {"hidden_size": 1664, "intermediate_size": 8192, "projection_dim": 1280, "hidden_act": "gelu"},
}
VISION_COMMON: dict[str, Any] = {"num_attention_heads": 16, "image_size": 224, "patch_size": 14, "layer_norm_eps": 1e-5}


def _single_file_encoder(path: Path, dtype: torch.dtype) -> Any:
    """A CLIP vision tower kept as one file (the transformers weights, renamed), read with its published config."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        width = f.get_slice("vision_model.embeddings.patch_embedding.weight").get_shape()[0] if (
            "vision_model.embeddings.patch_embedding.weight" in keys
        ) else None  # fmt: skip
    depth = len({k.split(".")[3] for k in keys if k.startswith("vision_model.encoder.layers.")})
    published = VISION_CONFIGS.get(depth)
    if width is None or published is None or published["hidden_size"] != width:
        raise IncompatibleModelError(
            f"{path} is not one of the published CLIP vision towers in transformers' layout (ViT-L/14, ViT-H/14, "
            f"ViT-bigG/14; it has {depth} layers of width {width}): give its folder (config.json + model.safetensors)"
        )
    with init_empty_weights():
        model: Any = CLIPVisionModelWithProjection(
            CLIPVisionConfig(**VISION_COMMON, **published, num_hidden_layers=depth)
        )
    model.load_state_dict(load_file(str(path)), strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise IncompatibleModelError(f"{path} lacks {len(missing)} of the image encoder's weights ({missing[0]}, ...)")
    model.to(dtype)
    return model


@process_cached(4)
def clip_encoder(folder: str, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    path = Path(folder)
    model: Any
    if path.is_file():
        model = _single_file_encoder(path, dtype)
    elif not (path / "config.json").exists():
        raise MissingWeightsError(f"no CLIP image encoder at {path} (config.json + model.safetensors expected)")
    else:
        model = CLIPVisionModelWithProjection.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
    size = model.config.image_size
    processor = CLIPImageProcessor(size=size, crop_size=size)
    return model.to(device).eval().requires_grad_(False), processor


@torch.no_grad()
def encode_images(
    images: Sequence[Any],
    encoder_folder: str | os.PathLike[str],
    *,
    hidden_states: bool,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings, unconditional embeddings) of reference images, as an IP-Adapter's projection takes them.

    For "plus" models these are the encoder's penultimate hidden states and the unconditional ones those of an
    all-zero image; otherwise the projected embeddings and zeros.
    """  # fmt: skip
    model, processor = clip_encoder(str(encoder_folder), str(device), dtype)
    pixels = processor(images=[load_image(i, "reference image") for i in images], return_tensors="pt").pixel_values
    pixels = pixels.to(device, dtype)
    if hidden_states:
        cond = model(pixels, output_hidden_states=True).hidden_states[-2]
        uncond = model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        return cond, uncond
    cond = model(pixels).image_embeds
    return cond, torch.zeros_like(cond)


def save_embeddings(path: str | os.PathLike[str], cond: torch.Tensor, uncond: torch.Tensor, variant: str) -> None:
    """Keep a face's or style's embeddings to reuse without its images (``IPAdapter(..., embeddings=path)``)."""
    from safetensors.torch import save_file

    save_file(
        {"image_embeds": cond.contiguous(), "negative_image_embeds": uncond.contiguous()},
        str(path),
        {"variant": variant},
    )


def load_embeddings(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    from safetensors import safe_open

    check_safetensors(Path(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        return f.get_tensor("image_embeds"), f.get_tensor("negative_image_embeds"), meta.get("variant")


def layer_scales(unet: Any, layers: str | Mapping[str, Any]) -> dict[str, float]:
    """Scale per cross-attention layer name, expanding diffusers' block notation."""
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    config = LAYER_PRESETS.get(layers, None) if isinstance(layers, str) else dict(layers)
    if config is None:
        raise ConditionError(f"unknown layer preset {layers!r}: one of {', '.join(LAYER_PRESETS)} or a dict")
    (expanded,) = _maybe_expand_lora_scales(unet, [config], default_scale=0.0)
    out = {}
    for name in cross_layers(unet):
        scale = expanded if not isinstance(expanded, dict) else 0.0
        if isinstance(expanded, dict):
            for prefix, value in expanded.items():
                if name.startswith(prefix):
                    scale = value
        out[name] = float(scale)
    return out


class IPPrepared(Prepared):
    """Tokens ready to attach as one branch per targeted cross-attention layer, plus (FaceID) the LoRA ``deltas`` its
    checkpoint carries for the attention weights (the weight channel: added while the condition acts).

    ``weights`` hold each layer's ``<number>.to_k_ip.weight`` / ``to_v_ip.weight``, numbered 1, 3, 5, ... as the
    published files number cross-attention layers; keys and values are computed in the weights' precision and cast
    to the UNet's. ``branch`` makes each layer's branch (PuLID:
    :class:`~sdxl_control.protocol.attention.OrthogonalBranch`).

    Example:
        >>> IPPrepared("ip-adapter:plus", weights, tokens, scales, mask=None).attach(unet, Stage.BASE)  # doctest: +SKIP
    """

    def __init__(
        self, name: str, weights: Mapping[str, torch.Tensor], tokens: torch.Tensor, scales: dict[str, float], mask: Any,
        deltas: Mapping[str, WeightDelta] | None = None, branch: Callable[..., AttentionBranch] = AttentionBranch,
    ) -> None:  # fmt: skip
        self.name, self.weights, self.tokens, self.scales, self.mask = name, weights, tokens, scales, mask
        self.deltas, self.branch = deltas, branch

    @torch.no_grad()
    def attach(self, unet: Any, stage: Stage) -> Attachment:
        dtype = placement(unet)[1]
        layers = attention_layers(unet)
        replacements, branches = {}, []
        for index, layer in enumerate(cross_layers(unet)):
            scale = self.scales[layer]
            if scale == 0.0:
                continue  # as diffusers skips zero-scale layers: no compute, no change
            number = 2 * index + 1
            key_weight, value_weight = (self.weights[f"{number}.{n}.weight"] for n in ("to_k_ip", "to_v_ip"))
            key = F.linear(self.tokens.to(key_weight.dtype), key_weight).to(dtype)
            value = F.linear(self.tokens.to(value_weight.dtype), value_weight).to(dtype)
            branch = self.branch(self.name, key, value, scale, self.mask, active=False)
            branches.append(branch)
            replacements[layer] = BranchedAttnProcessor(layers[layer].processor, [branch])
        return PatchedBranches(ProcessorPatch(unet, replacements), branches)

    def weight_deltas(self, stage: Stage) -> Mapping[str, Mapping[str, WeightDelta]]:
        return {"unet": self.deltas} if self.deltas else {}


@dataclass(frozen=True)
class LoadedAdapter:
    """An IP-Adapter checkpoint ready on a device: its image projection, and its attention (and, for FaceID, LoRA)
    weights in the UNet's dtype. Kept per process, so repeated calls do not re-read or re-convert anything."""

    projection: Any
    weights: Mapping[str, torch.Tensor]


_LOADED: PerModelCache[LoadedAdapter] = PerModelCache(size=4)


def load_adapter(weights_file: Path, unet: Any, ctx: PrepareContext) -> LoadedAdapter:
    """Read, check and place an IP-Adapter/FaceID checkpoint for ``unet`` (cached while the file is unchanged)."""

    def build() -> LoadedAdapter:
        parts = read_weights(weights_file)
        check_fits(parts, unet, str(weights_file))
        projection = build_projection(parts["image_proj"], unet, weights_file, ctx)
        return LoadedAdapter(projection, {k: v.to(ctx.device, ctx.dtype) for k, v in parts["ip_adapter"].items()})

    return _LOADED.get(unet, weights_file, (str(ctx.device), ctx.dtype), build)


@dataclass(frozen=True)
class IPAdapter(Condition):
    """An IP-Adapter with its reference image(s).

    ``variant`` is what users know the published files as — ``"sdxl"`` (ViT-bigG encoder), ``"vit-h"``, ``"plus"``,
    ``"plus-face"`` — or a path to a weights file (then ``image_encoder`` names the CLIP vision folder). ``source`` is
    the repo holding the files (hub id or local copy of ``h94/IP-Adapter``). Several ``images`` are concatenated as
    extra tokens (``combine="concat"``, as diffusers and the reference do) or their embeddings averaged
    (``"average"``). ``layers`` targets blocks: ``"all"``, ``"style"``, ``"composition"``, ``"style+composition"``
    (InstantStyle) or a diffusers-style dict of per-block scales. ``mask`` (white = here) limits it to a region.
    ``embeddings`` takes a file from :func:`save_embeddings` instead of images.

    Example:
        >>> IPAdapter("plus-face", "face.png", scale=0.6, window=(0.0, 0.8))  # doctest: +SKIP
    """

    variant: str
    images: Any = None
    source: str = REPO
    image_encoder: str | None = None
    layers: str | Mapping[str, Any] = "all"
    mask: Any = None
    combine: Literal["concat", "average"] = "concat"
    embeddings: str | None = None

    kind: ClassVar[str] = "ip-adapter"
    supported_stages: ClassVar[Stage] = Stage.BASE
    unsupported_reason: ClassVar[str] = "SDXL IP-Adapters are trained for the base UNet's 2048-wide cross-attention"
    path_fields: ClassVar[tuple[str, ...]] = ("variant", "images", "source", "image_encoder", "mask", "embeddings")
    model_fields: ClassVar[Mapping[str, str]] = {"variant": "ipadapter", "image_encoder": "clip_vision"}
    aligned_fields: ClassVar[tuple[str, ...]] = ("mask",)

    def infotext(self) -> Infotext:
        # The ControlNet extension's modules: the ViT-bigG encoder for "sdxl", ViT-H for the others it publishes.
        module = "ip-adapter_clip_sdxl" if self.variant == "sdxl" else "ip-adapter_clip_sdxl_plus_vith"
        weights = self._files()[0]
        unit = control_unit(module if self.variant in VARIANTS else "ip-adapter-auto", model_label(weights, weights),
                            self.scale, self.window)  # fmt: skip
        return Infotext(units=(unit,))

    def model_needs(self) -> tuple[ModelNeed, ...]:
        encoder = (
            weights_need("IP-Adapter image encoder", self.image_encoder, ENCODER_FILES) if self.image_encoder else None
        )
        if self.variant in VARIANTS:
            v = VARIANTS[self.variant]
            weights = weights_need("IP-Adapter", self.source, [pattern_for(v.weights)])
            encoder = encoder or weights_need("IP-Adapter image encoder", self.source, [pattern_for(v.encoder)])
        else:
            weights = weights_need("IP-Adapter", self.variant, ["*.safetensors"])
        return (weights,) if encoder is None or self.embeddings is not None else (weights, encoder)

    @classmethod
    def style(cls, images: Any, scale: float = 1.0, **options: Any) -> IPAdapter:
        """InstantStyle: the ViT-bigG adapter on the style block only."""
        return cls("sdxl", images, scale=scale, layers="style", **options)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_variant(self.variant, VARIANTS, "IP-Adapter")
        if (self.images is None) == (self.embeddings is None):
            raise ConditionError("IPAdapter takes reference images or saved embeddings (one of the two)")

    def _files(self) -> tuple[Path, Path | None, bool]:
        if self.variant in VARIANTS:
            v = VARIANTS[self.variant]
            weights = resolve_in(self.source, v.weights)
            encoder = Path(self.image_encoder) if self.image_encoder else resolve_in(self.source, v.encoder)
            return weights, encoder, v.uses_hidden_states
        weights = resolve_source(self.variant, allow=["*.safetensors"])
        return (
            weights,
            Path(self.image_encoder) if self.image_encoder else None,
            "latents" in read_weights(weights)["image_proj"],
        )

    def prepare(self, ctx: PrepareContext) -> Prepared:
        unet = ctx.unet(Stage.BASE)
        weights_file, encoder, plus = self._files()
        adapter = load_adapter(weights_file, unet, ctx)
        projection = adapter.projection
        if self.embeddings is not None:
            cond, uncond, _ = load_embeddings(self.embeddings)
        else:
            if encoder is None:
                raise ConditionError(
                    f"{weights_file} is not a published variant: pass image_encoder= its CLIP vision folder"
                )
            images = self.images if isinstance(self.images, (list, tuple)) else [self.images]
            cond, uncond = encode_images(images, encoder, hidden_states=plus, device=str(ctx.device), dtype=ctx.dtype)
        _check_encoder_width(projection, cond, str(weights_file), encoder)
        if self.combine == "average":
            cond, uncond = cond.mean(0, keepdim=True), uncond.mean(0, keepdim=True)
        with torch.no_grad():
            positive = projection(cond.to(ctx.device, ctx.dtype))
            negative = projection(uncond.to(ctx.device, ctx.dtype)) if ctx.guided else None
        tokens = Tokens(positive, negative).batched(ctx.batch_size, ctx.guided)
        mask = region_mask(self.mask, ctx) if self.mask is not None else None
        scales = {k: v * self.scale for k, v in layer_scales(unet, self.layers).items()}
        return IPPrepared(f"ip-adapter:{self.variant}", adapter.weights, tokens, scales, mask)


def check_variant(variant: str, known: Mapping[str, Any], family: str) -> None:
    """Refuse a variant that is neither a published name nor a path (a typo such as "plusv3")."""
    if variant in known or looks_local(variant) or looks_like_hub_id(variant):
        return
    close = difflib.get_close_matches(variant, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConditionError(
        f"unknown {family} variant {variant!r}{hint}: one of {', '.join(known)}, or the path of a weights file"
    )


def build_projection(image_proj: Mapping[str, torch.Tensor], unet: Any, source: Path, ctx: PrepareContext) -> Any:
    """The image-projection model of a published checkpoint (diffusers' conversion of the reference layouts)."""
    # Built on empty weights (no random init to overwrite), which diffusers fills in the UNet's dtype as it reads it
    # from its first parameter: for a UNet kept in fp8 (sdxl_control.weights.storage) that would round the projection to
    # 8 bits, so there the projection is built in float32 and cast below.
    empty = compute_dtype(unet) is None
    try:
        projection = unet._convert_ip_adapter_image_proj_to_diffusers(dict(image_proj), low_cpu_mem_usage=empty)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise IncompatibleModelError(
            f"{source}: its image projection is not a known IP-Adapter layout ({exc})"
        ) from None
    return projection.to(ctx.device, ctx.dtype).eval()


def _check_encoder_width(projection: Any, embeds: torch.Tensor, weights: str, encoder: Path | None) -> None:
    expected = None
    if hasattr(projection, "image_embeds"):  # ImageProjection: projected CLIP embeddings
        expected = projection.image_embeds.in_features
    elif hasattr(projection, "proj_in"):  # Resampler: CLIP hidden states
        expected = projection.proj_in.in_features
    if expected is not None and embeds.shape[-1] != expected:
        raise IncompatibleModelError(
            f"{weights} expects {expected}-wide image embeddings but the image encoder {encoder} gives "
            f"{embeds.shape[-1]} (a ViT-H adapter needs the ViT-H encoder, 'sdxl' needs ViT-bigG)"
        )


def region_mask(mask: Any, ctx: PrepareContext, device: torch.device | str | None = None) -> torch.Tensor:
    """A region mask (white = here) at the output size as (1, H, W), binarised as diffusers' IPAdapterMaskProcessor
    does, on ``device`` (default: the call's)."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    width, height = ctx.size
    image = load_image(mask, "region mask").convert("L")
    tensor = IPAdapterMaskProcessor().preprocess([image], height=height, width=width)  # (1, 1, H, W), binarised
    return tensor[:, 0].to(ctx.device if device is None else device)  # downsampling repeats it over the batch
