"""Attention couple: regional prompts blended inside the UNet's cross-attention, as Forge Couple (after laksjdjf's
cgem156 node) computes it.

On every cross-attention (``attn2``) layer, for the prompt's rows only (AND parts and PAG's perturbed copies included;
the negative rows are left as they are), the text attention becomes ``sum_j w_j(p) * attention(q, ctx_j)``: ``ctx_0``
is the request's prompt, ``ctx_j`` each acting region's prompt (encoded as the request reads its prompt). The weights
are the regions' masks (times each region's ``scale``, Forge's per-region weight) normalised per pixel at the output
size, then brought to each layer's size as Forge's ``get_mask`` does (nearest, the latent size halved with ceiling).
The request's prompt weighs 1 where no acting region covers a pixel and 0 elsewhere: when the regions cover the whole
image it is Forge's zero base mask exactly; Forge's "background" line is a region over the whole image with its
weight as ``scale``. Overlapping regions share a pixel in proportion to their weights. The pooled embedding and time
ids stay the prompt's.

Example:
    >>> Region("a red-haired woman", box=(0.0, 0.0, 0.5, 1.0), mode="attention")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..base.errors import ConditionError
from ..base.images import load_image
from ..protocol.attach import PatchedBranches, ProcessorPatch
from ..protocol.attention import AttentionBranch, BranchedAttnProcessor, _heads, attention_layers
from ..protocol.conditions import Attachment, PrepareContext, Prepared, Stage
from ..protocol.rows import call_rows

if TYPE_CHECKING:
    from .regions import Region

__all__ = ["CoupleBranch", "layer_size", "prepare_couple", "region_weight"]

log = logging.getLogger(__name__)


def region_weight(region: Region, size: tuple[int, int]) -> torch.Tensor:
    """The region's mask at the output ``size`` (width, height) as (H, W) float32, times its ``scale``.

    A box is Forge Couple's Advanced mapping: ``[int(H*y0):int(H*y1), int(W*x0):int(W*x1)] = weight``. A mask is
    Forge's Mask mode: grey levels / 255 (white = 1), resized to the output size with nearest neighbours when its
    size differs (said in the log). An empty one (nothing inside) is refused.
    """
    width, height = size
    if region.box is not None:
        x0, y0, x1, y1 = region.box
        weight = torch.zeros(height, width)
        weight[int(height * y0) : int(height * y1), int(width * x0) : int(width * x1)] = 1.0
        if not weight.any():
            raise ConditionError(
                f"the Region {region.prompt!r} box {region.box} holds no pixel of the {width}x{height} image: "
                "make it larger"
            )
    else:
        image = region.mask if isinstance(region.mask, Image.Image) else load_image(region.mask, "region mask")
        image = image.convert("L")
        if image.size != (width, height):
            log.info("region mask of %r is %dx%d: resized (nearest) to the output size %dx%d",
                     region.prompt, *image.size, width, height)  # fmt: skip
            image = image.resize((width, height), Image.Resampling.NEAREST)
        weight = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width).float() / 255.0
        if not weight.any():
            name = region.mask if isinstance(region.mask, str) else "given"
            raise ConditionError(
                f"the Region {region.prompt!r} mask {name} is empty (all black) at {width}x{height}: "
                "white marks the region"
            )
    return weight * float(region.scale)


def _repeat_div(value: int, times: int) -> int:
    for _ in range(times):
        value = math.ceil(value / 2)
    return value


def layer_size(latent: tuple[int, int], queries: int) -> tuple[int, int]:
    """The (height, width) of a layer with ``queries`` image tokens in a UNet whose input latent is ``latent``
    (height, width): the latent halved (with ceiling) as often as the token count says — Forge Couple's ``get_mask``."""
    height, width = latent
    times = math.ceil(math.log2(math.sqrt(height * width / queries)))
    return _repeat_div(height, times), _repeat_div(width, times)


@dataclass(eq=False)
class CoupleBranch(AttentionBranch):
    """One region's prompt on one cross-attention layer. ``key`` and ``value`` hold the region's prompt hidden states
    (1, tokens, width): the layer projects them with its own ``to_k`` / ``to_v`` at each call (the weight channel may
    change those). ``weight`` is the region's mask times its scale at the output size (H, W); ``latent`` the UNet
    input's (height, width); ``batch`` and ``guided`` the prepared layout (which rows are the prompt's).

    The live branches of a layer replace the prompt rows' text attention together (:meth:`replace_text`).
    """

    weight: torch.Tensor = field(default_factory=lambda: torch.ones(1, 1))
    latent: tuple[int, int] = (1, 1)
    batch: int = 1
    guided: bool = True
    _blend_cache: dict[Any, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    replaces_text = True

    @classmethod
    def replace_text(
        cls, group: list[AttentionBranch], query: torch.Tensor, text: torch.Tensor, attn: Any
    ) -> torch.Tensor:
        regions = [b for b in group if isinstance(b, CoupleBranch)]
        first = regions[0]
        prompt_rows = first.prompt_rows(text.shape[0])
        if not prompt_rows:
            return text
        weights = first.blend(regions, text.shape[1]).to(text.device)  # (regions + 1, queries, 1), float32
        index = torch.tensor(prompt_rows, device=text.device)
        own = query[index]
        blended = text[index].float() * weights[0]
        for branch, weight in zip(regions, weights[1:], strict=True):
            blended = blended + branch.attend_prompt(own, attn).float() * weight
        if len(prompt_rows) == text.shape[0]:
            return blended.to(text.dtype)
        out = text.clone()
        out[index] = blended.to(text.dtype)
        return out

    def prompt_rows(self, batch: int) -> list[int]:
        """The rows of the running call that are the prompt's (every row when unguided)."""
        rows = call_rows()
        source = rows.source if rows is not None else tuple(range(batch))
        if len(source) != batch:
            raise ConditionError(f"an attention couple layer got {batch} rows for a call of {len(source)}")
        first = self.batch if self.guided else 0
        return [i for i, s in enumerate(source) if s >= first]

    def blend(self, regions: list[CoupleBranch], queries: int) -> torch.Tensor:
        """Per-pixel weights of [the prompt, region 1, ...] at a layer of ``queries`` tokens: normalised at the output
        size, then taken to the layer's size by nearest neighbours (Forge Couple's ``get_mask``)."""
        key = (tuple(id(b) for b in regions), queries)
        if key not in self._blend_cache:
            masks = torch.stack([b.weight for b in regions])  # (k, H, W)
            total = masks.sum(dim=0)
            base = (total == 0).to(masks.dtype)  # the prompt fills what no acting region covers
            stacked = torch.cat([base[None], masks])
            stacked = stacked / stacked.sum(dim=0, keepdim=True)
            size = layer_size(self.latent, queries)
            small = F.interpolate(stacked[:, None], size=size, mode="nearest")
            self._blend_cache[key] = small.reshape(len(regions) + 1, queries, 1)
        return self._blend_cache[key]

    def attend_prompt(self, query: torch.Tensor, attn: Any) -> torch.Tensor:
        """attention(query, the region's prompt) through the layer's own projections, (rows, tokens, width)."""
        context = self.key.to(query.dtype)
        if hasattr(attn, "to_kv"):  # fused projections (sdxl_control.protocol.fast)
            key, value = attn.to_kv(context).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(context), attn.to_v(context)
        rows = query.shape[0]
        key, value = key.expand(rows, -1, -1), value.expand(rows, -1, -1)
        out = F.scaled_dot_product_attention(query, _heads(key, attn), _heads(value, attn), dropout_p=0.0)
        return out.transpose(1, 2).reshape(rows, -1, query.shape[1] * query.shape[-1]).to(query.dtype)


class CouplePrepared(Prepared):
    """A region's prompt hidden states per stage, and its weight map, ready to join every cross-attention layer."""

    def __init__(self, name: str, contexts: dict[Stage, torch.Tensor], weight: torch.Tensor, ctx: PrepareContext):
        self.name, self.contexts, self.weight = name, contexts, weight
        width, height = ctx.size
        self.latent = (height // 8, width // 8)
        self.batch, self.guided = ctx.batch_size, ctx.guided

    def attach(self, unet: Any, stage: Stage) -> Attachment:
        context = self.contexts[stage]
        layers = attention_layers(unet)
        replacements, branches = {}, []
        for name in layers:
            if not name.endswith("attn2.processor"):
                continue
            branch = CoupleBranch(self.name, context, context, 1.0, active=False, weight=self.weight,
                                  latent=self.latent, batch=self.batch, guided=self.guided)  # fmt: skip
            branches.append(branch)
            replacements[name] = BranchedAttnProcessor(layers[name].processor, [branch])
        return PatchedBranches(ProcessorPatch(unet, replacements), branches)


def prepare_couple(region: Region, ctx: PrepareContext) -> Prepared:
    """``region`` (``mode="attention"``) ready to attach: its prompt encoded by each stage it acts in, its weight map
    at the output size."""
    if region.negative_prompt is not None:
        raise ConditionError(
            f"the Region {region.prompt!r} has a negative_prompt, which attention couple does not read (it leaves the "
            "negative prompt's rows as they are, as Forge Couple does): drop it, or use mode='masked'"
        )
    weight = region_weight(region, ctx.size)
    contexts = {
        stage: ctx.encode_prompt(region.prompt, stage)[0].to(ctx.device, ctx.dtype)
        for stage in (Stage.BASE, Stage.REFINER)
        if stage in region.stage and stage in ctx.stages
    }
    return CouplePrepared(f"region {region.prompt!r}", contexts, weight.to(ctx.device), ctx)
