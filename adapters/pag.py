"""Perturbed-attention guidance (PAG, Ahn et al. 2024): the prompt's prediction with chosen self-attention layers
replaced by identity (each query reads only its own value), and the step pushed away from it, as diffusers'
``StableDiffusionXLPAGPipeline`` computes it: ``uncond + g * (cond - uncond) + s_t * (cond - perturbed)``
(``cond + s_t * (cond - perturbed)`` without classifier-free guidance).

PAG acts through two channels: the guidance channel (its term asks the loop for the prompt's rows again, perturbed,
and adds ``s_t * (cond - perturbed)``) and the attention channel (a processor on each chosen self-attention layer that
gives the perturbed rows the identity attention and every other row the processor it replaced, untouched).

Example:
    >>> from sdxl_control.adapters.pag import PAG
    >>> PAG(scale=3.0).layers
    ('mid',)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..base.errors import ConditionError
from ..protocol.attach import ProcessorPatch
from ..protocol.attention import attention_layers
from ..protocol.conditions import Attachment, Condition, PrepareContext, Prepared, Stage
from ..protocol.guidance import GuidanceStep, GuidanceTerm, TermOrder
from ..protocol.rows import call_rows

if TYPE_CHECKING:
    from ..records.infotext import Infotext

__all__ = ["PAG", "PAGTerm", "PerturbedSelfAttnProcessor", "pag_layers", "pag_scale_at"]

# diffusers' adaptive scale counts down from this timestep whatever the scheduler's training steps (pag_utils.py).
_ADAPTIVE_ORIGIN = 1000.0


def pag_layers(unet: Any, layers: tuple[str, ...], where: str = "this UNet") -> dict[str, Any]:
    """The self-attention layers of ``unet`` that ``layers`` name, by processor name, as diffusers'
    ``PAGMixin._set_pag_attn_processor`` finds them: each entry a regular expression searched in the module names of
    the attention modules that are not cross-attention, except a match whose last dotted parts are both the same
    number (``blocks.1`` does not take ``blocks.10``'s ... ``.1``); an entry that matches nothing is an error naming it
    and ``where`` (the UNet searched).

    Example:
        >>> sorted(pag_layers(unet, ("mid",)))[:1]  # doctest: +SKIP
        ['mid_block.attentions.0.transformer_blocks.0.attn1.processor']
    """
    from diffusers.models.attention_processor import Attention

    def fake_integral_match(layer: str, name: str) -> bool:  # diffusers' is_fake_integral_match
        layer, name = layer.split(".")[-1], name.split(".")[-1]
        return layer.isnumeric() and name.isnumeric() and layer == name

    self_attention = {
        name: module
        for name, module in attention_layers(unet).items()
        if isinstance(module, Attention) and not module.is_cross_attention
    }
    found: dict[str, Any] = {}
    for layer in layers:
        try:
            pattern = re.compile(layer)
        except re.error as exc:
            raise ConditionError(f"PAG layer {layer!r} is not a regular expression ({exc})") from None
        matched = {
            name: module
            for name, module in self_attention.items()
            if pattern.search(name.removesuffix(".processor"))
            and not fake_integral_match(layer, name.removesuffix(".processor"))
        }
        if not matched:
            raise ConditionError(
                f"Cannot find PAG layer to set attention processor for: {layer!r} in {where} (PAG layers are regular "
                "expressions searched in the self-attention layers' names, e.g. 'mid', 'down_blocks.2', "
                "'up_blocks.0.attentions.0')"
            )
        found.update(matched)
    return found


def pag_scale_at(scale: float, adaptive_scale: float, timestep: float) -> float:
    """PAG's scale at scheduler timestep ``timestep`` (999...0): diffusers' ``_get_pag_scale``, ``scale`` falling by
    ``adaptive_scale`` per timestep below 1000, never below 0.

    Example:
        >>> pag_scale_at(3.0, 0.01, 900.0), pag_scale_at(3.0, 0.01, 500.0), pag_scale_at(3.0, 0.0, 10.0)
        (2.0, 0.0, 3.0)
    """
    if adaptive_scale <= 0:
        return scale
    return max(0.0, scale - adaptive_scale * (_ADAPTIVE_ORIGIN - timestep))


class PerturbedSelfAttnProcessor:
    """A self-attention layer's processor under PAG: the rows of the UNet call flagged perturbed
    (:func:`~sdxl_control.protocol.rows.call_rows`) get the identity attention, ``to_out(to_v(x))`` (diffusers'
    ``PAGIdentitySelfAttnProcessor2_0``'s perturbed path, with its group norm, residual and output rescale); the other
    rows go through the processor it replaced (``inner``). A call without perturbed rows is ``inner``'s alone.

    Example:
        >>> unet.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(
        ...     PerturbedSelfAttnProcessor(AttnProcessor2_0()))  # doctest: +SKIP
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        rows = call_rows()
        if rows is None or not rows.any_perturbed:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch = hidden_states.shape[0]
        if len(rows) != batch:
            raise ConditionError(f"PAG: the UNet call states {len(rows)} rows but its attention gets {batch}")
        plain = [i for i, flag in enumerate(rows.perturbed) if not flag]
        perturbed = [i for i, flag in enumerate(rows.perturbed) if flag]
        # The loop puts the perturbed rows last (diffusers' [uncond, cond, perturbed]): slices, no copies, then.
        in_order = plain + perturbed == list(range(batch))

        def part(tensor: Any, index: list[int]) -> Any:
            if not isinstance(tensor, torch.Tensor) or tensor.ndim == 0 or tensor.shape[0] != batch:
                return tensor
            if in_order:
                return tensor[index[0] : index[-1] + 1]
            return tensor[torch.tensor(index, device=tensor.device)]

        outputs = []
        if plain:
            outputs.append(
                self.inner(
                    attn,
                    part(hidden_states, plain),
                    part(encoder_hidden_states, plain),
                    part(attention_mask, plain),
                    part(temb, plain),
                    *args,
                    **kwargs,
                )  # fmt: skip
            )
        outputs.append(_identity_attention(attn, part(hidden_states, perturbed), part(temb, perturbed)))
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        if not in_order:
            out = out[torch.tensor(plain + perturbed, device=out.device).argsort()]
        return out


def _identity_attention(attn: Any, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
    """Self-attention whose attention matrix is the identity: each token's output is its own value, projected —
    diffusers' ``PAGIdentitySelfAttnProcessor2_0``, perturbed path (models/attention_processor.py)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    image = hidden_states.ndim == 4
    if image:
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    out = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
    if image:
        out = out.transpose(-1, -2).reshape(batch, channels, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


@dataclass
class PAGTerm(GuidanceTerm):
    """PAG's guidance term: ``guided + s_t * (cond - perturbed)``, ``s_t`` from :func:`pag_scale_at` at the step's
    timestep. It adds to the guidance (after APG's, before CFG rescale, which diffusers' PAG pipelines measure against
    the unperturbed prompt's prediction).

    Example:
        >>> PAGTerm(3.0).perturbs
        True
    """

    scale: float
    adaptive_scale: float = 0.0
    order: ClassVar[TermOrder] = TermOrder.ADD
    perturbs: ClassVar[bool] = True

    def combine(self, step: GuidanceStep) -> torch.Tensor:
        if step.perturbed is None:
            raise ConditionError("PAG's term got no perturbed prediction")
        return step.guided + pag_scale_at(self.scale, self.adaptive_scale, step.timestep) * (step.cond - step.perturbed)


class _Swapped(Attachment):
    def __init__(self, patch: ProcessorPatch) -> None:
        self.patch = patch

    def detach(self) -> None:
        self.patch.restore()


@dataclass(frozen=True, eq=False)
class _Ready(Prepared):
    condition: PAG

    def attach(self, unet: Any, stage: Stage) -> Attachment:
        if any(isinstance(m.processor, PerturbedSelfAttnProcessor) for m in attention_layers(unet).values()):
            # One perturbed copy of the prompt's rows serves every term: two PAGs would each push from the union.
            raise ConditionError(
                "PAG is given twice: the perturbed prediction is one, with every perturbed layer at once; give one PAG "
                "with all its layers (layers=['mid', 'up_blocks.0'])"
            )
        # The processors found now (a fast path's fused ones, say) are what the perturbed ones wrap and give back.
        layers = pag_layers(unet, self.condition.layers)
        return _Swapped(
            ProcessorPatch(unet, {name: PerturbedSelfAttnProcessor(m.processor) for name, m in layers.items()})
        )

    def guidance_term(self, stage: Stage) -> GuidanceTerm | None:
        return PAGTerm(self.condition.scale, self.condition.adaptive_scale)


@dataclass(frozen=True, kw_only=True)
class PAG(Condition):
    """Perturbed-attention guidance: ``scale`` is diffusers' ``pag_scale`` (default 3.0; 0: absent), ``adaptive_scale``
    its ``pag_adaptive_scale`` (the scale falls by it per timestep below 1000, to 0), ``layers`` its
    ``pag_applied_layers`` (regular expressions searched in the self-attention layers' names: ``"mid"``,
    ``"down_blocks.2"``, ``"up_blocks.0.attentions.0"``). With a guidance scale of 1 or less it acts alone, as
    diffusers' pipeline does without classifier-free guidance: ``cond + s_t * (cond - perturbed)``.

    Each step where it acts costs one more UNet row per image (three with classifier-free guidance).

    Example:
        >>> PAG(scale=2.0, layers=("mid", "up_blocks.0")).kind
        'pag'
    """

    scale: float = 3.0
    adaptive_scale: float = 0.0
    layers: tuple[str, ...] = ("mid",)

    kind: ClassVar[str] = "pag"
    supported_stages: ClassVar[Stage] = Stage.BOTH

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", (self.layers,))
        elif isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        super().__post_init__()
        if self.scale < 0:
            raise ConditionError(f"PAG scale is 0 (absent) or more, got {self.scale}")
        if self.adaptive_scale < 0:
            raise ConditionError(f"PAG adaptive_scale is 0 or more, got {self.adaptive_scale}")
        if not self.layers:
            raise ConditionError("PAG needs at least one layer (default 'mid')")

    def prepare(self, ctx: PrepareContext) -> Prepared:
        # A layer that names nothing is refused here, before anything runs, in every stage PAG applies to.
        for stage, unet in ctx.stages.items():
            if stage in self.stage:
                pag_layers(unet, self.layers, f"the {stage.label}'s UNet")
        return _Ready(self)

    def infotext(self) -> Infotext:
        """Forge's built-in PAG items (``pagi_*``, extensions-builtin/sd_forge_perturbed_attention) where they mean the
        same: Forge perturbs every self-attention of the middle block (diffusers' ``"mid"``) in the base model, and has
        no adaptive scale (its ``pagi_attenuation`` is another schedule: 0 here). Otherwise a ``PAG`` item holding this
        condition's settings as JSON, which no other tool reads."""
        from ..records.infotext import Infotext

        if self.layers == ("mid",) and self.adaptive_scale == 0 and self.stage is Stage.BASE:
            return Infotext(fields={"pagi_enabled": True, "pagi_scale": self.scale, "pagi_attenuation": 0.0,
                                    "pagi_start_step": self.window.start, "pagi_end_step": self.window.end})  # fmt: skip
        own = {"scale": self.scale, "adaptive_scale": self.adaptive_scale, "layers": list(self.layers),
               "window": [self.window.start, self.window.end], "stage": self.stage.label}  # fmt: skip
        return Infotext(fields={"PAG": json.dumps(own)})
