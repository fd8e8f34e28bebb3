"""Guidance: how the model's predictions for one step are batched and combined.

A :class:`Guidance` (classifier-free guidance, or none) lays out the step's batch and combines its predictions.
Guidance conditions (PAG, APG, CFG rescale...) act on that combination through the guidance channel: a condition's
``Prepared.guidance_term(stage)`` gives a :class:`GuidanceTerm`, which the loop asks at every step where the condition
acts (:func:`~sdxl_control.protocol.conditions.acts`) — and only there, so a term with scale 0 or a window that holds
no step leaves the step exactly as without it. A term may ask for one more prediction: the prompt's, with the
self-attention of chosen layers perturbed (:attr:`GuidanceTerm.perturbs`; the loop adds those rows to the UNet's
batch, see :mod:`sdxl_control.protocol.rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Protocol

import torch

from ..base.stages import Stage

__all__ = [
    "Guidance", "ClassifierFreeGuidance", "NoGuidance", "guidance_for", "GuidanceStep", "GuidanceTerm", "TermOrder",
    "CFGRescale", "guided_step", "ExtraRows", "Blend",
]  # fmt: skip


class Guidance(Protocol):
    """``copies`` is how many times the latents are stacked per forward; ``combine`` turns that back into one.
    ``split`` gives the unconditional prediction (``None`` without guidance) and the prompt's (its parts combined
    as the guidance weighs them, without the scale); ``conditional`` does the latter for parts predicted apart.

    Example:
        >>> guidance_for(5.0, unet).copies  # doctest: +SKIP
        2
    """

    @property
    def copies(self) -> int: ...

    def combine(self, prediction: torch.Tensor) -> torch.Tensor: ...

    def split(self, prediction: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]: ...

    def conditional(self, uncond: torch.Tensor | None, parts: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class NoGuidance:
    """One forward pass per step, prediction used as is (guidance scale <= 1, distilled models).

    Example:
        >>> NoGuidance().combine(torch.ones(1)).item()
        1.0
    """

    copies: ClassVar[int] = 1

    def combine(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction

    def split(self, prediction: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        return None, prediction

    def conditional(self, uncond: torch.Tensor | None, parts: torch.Tensor) -> torch.Tensor:
        return parts


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """``uncond + scale * (cond - uncond)`` on a ``[uncond, cond]`` batch (CFG rescale is the :class:`CFGRescale` term).

    With composable prompts (A1111's ``AND``), the batch is ``[uncond, cond_1, ..., cond_k]`` and ``weights`` gives
    each part's weight: ``uncond + sum_i (cond_i - uncond) * (weight_i * scale)``, summed in order as A1111's
    ``combine_denoised``; :meth:`conditional` is the parts' prediction without the scale, ``uncond + sum_i weight_i *
    (cond_i - uncond)`` (what a rescale measures against).

    Example:
        >>> ClassifierFreeGuidance(5.0).combine(torch.tensor([0.0, 1.0])).item()
        5.0
        >>> ClassifierFreeGuidance(2.0, weights=(1.0, 0.5)).combine(torch.tensor([0.0, 1.0, 2.0])).item()
        4.0
    """

    scale: float
    weights: tuple[float, ...] = (1.0,)

    @property
    def copies(self) -> int:
        return 1 + len(self.weights)

    def combine(self, prediction: torch.Tensor) -> torch.Tensor:
        if self.weights == (1.0,):
            uncond, cond = prediction.chunk(2)
            return uncond + self.scale * (cond - uncond)
        uncond, *conds = prediction.chunk(self.copies)
        guided = uncond.clone()
        for part, weight in zip(conds, self.weights, strict=True):
            guided += (part - uncond) * (weight * self.scale)
        return guided

    def split(self, prediction: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        uncond, parts = prediction.tensor_split([prediction.shape[0] // self.copies])
        return uncond, self.conditional(uncond, parts)

    def conditional(self, uncond: torch.Tensor | None, parts: torch.Tensor) -> torch.Tensor:
        if self.weights == (1.0,):
            return parts
        assert uncond is not None
        cond = uncond.clone()
        for part, weight in zip(parts.chunk(len(self.weights)), self.weights, strict=True):
            cond += (part - uncond) * weight
        return cond


def rescaled(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """CFG rescale (Lin et al., arXiv 2305.08891; diffusers' ``rescale_noise_cfg``): ``guided`` brought towards the
    standard deviation of ``cond`` (per sample), by ``rescale`` (0: unchanged, 1: fully)."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    return rescale * (guided * (std_cond / std_guided)) + (1.0 - rescale) * guided


def guidance_for(scale: float, unet: Any, weights: tuple[float, ...] = (1.0,)) -> Guidance:
    """CFG when it changes anything: scale above 1 and a UNet without a built-in guidance embedding; composable
    prompt parts (``weights``, see :class:`ClassifierFreeGuidance`) always, as A1111 combines them at any scale."""
    if weights != (1.0,):
        return ClassifierFreeGuidance(scale, tuple(weights))
    if scale > 1.0 and getattr(unet.config, "time_cond_proj_dim", None) is None:
        return ClassifierFreeGuidance(scale)
    return NoGuidance()


class TermOrder(IntEnum):
    """Where a guidance term acts in the combination: ``BLEND`` weighs predictions of its own rows into the
    unconditional and conditional predictions before anything combines them (regional prompts: see :class:`Blend`),
    ``REPLACE`` computes the combination anew from those (APG; one such term per step), ``ADD`` adds to it (PAG),
    ``FINISH`` reshapes the sum (CFG rescale, measured after every addition as diffusers' PAG pipelines do). Terms of
    one order act in the order the conditions were given."""

    BLEND = -1
    REPLACE = 0
    ADD = 1
    FINISH = 2


@dataclass(frozen=True)
class ExtraRows:
    """Rows a guidance term adds to the UNet's batch at the steps it acts, one per image: the latents read with
    ``hidden`` (1, tokens, width) and ``pooled`` (1, width) in place of the prompt's; ``negative``: rows of the
    negative prompt's kind (they read what conditions prepared for the negative prompt, and its time ids).

    Example:
        >>> ExtraRows(torch.zeros(1, 77, 2048), torch.zeros(1, 1280)).negative
        False
    """

    hidden: torch.Tensor
    pooled: torch.Tensor
    negative: bool = False


@dataclass(frozen=True)
class Blend:
    """What a ``BLEND`` term weighs in: per-pixel ``weight`` (broadcastable to the predictions) and its prediction of the
    prompt's kind ``cond``; ``uncond`` (with ``uncond_weight``) for the negative prompt's, if it has one. The loop
    averages, per pixel, the request's own prediction (weight 1 everywhere) with every acting blend's:
    ``sum(w * p) / (1e-37 + sum(w))``, as ComfyUI averages a list of conditionings (``comfy/samplers.py``).

    Example:
        >>> Blend(torch.ones(1, 1, 8, 8), torch.zeros(1, 4, 8, 8)).uncond is None
        True
    """

    weight: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    uncond_weight: torch.Tensor | None = None


@dataclass(frozen=True)
class GuidanceStep:
    """What a guidance term sees of one step: ``uncond`` (``None`` without classifier-free guidance) and ``cond``,
    the prompt's prediction (its parts combined as the guidance weighs them); ``perturbed``, the prompt's prediction
    with perturbed self-attention, where a term asked for it; ``guided``, the combination so far; ``scale``, the
    request's guidance scale; ``timestep``, the scheduler's timestep (999...0); ``index`` of ``total`` steps of the
    whole schedule.

    Example:
        >>> step = GuidanceStep(0, 4, 999.0, Stage.BASE, 5.0, torch.zeros(1), torch.ones(1), torch.full((1,), 5.0))
        >>> CFGRescale(0.5).combine(step).shape
        torch.Size([1])
    """

    index: int
    total: int
    timestep: float
    stage: Stage
    scale: float
    uncond: torch.Tensor | None
    cond: torch.Tensor
    guided: torch.Tensor
    perturbed: torch.Tensor | None = None
    # The predictions of the term's own rows (GuidanceTerm.rows), one tensor per ExtraRows, in order.
    extra: tuple[torch.Tensor, ...] = ()


class GuidanceTerm:
    """The guidance channel: one condition's change to how a step's predictions are combined.

    A term lives for one stage of one call (``Prepared.guidance_term`` makes it), so it may keep state between steps
    (APG's momentum). The loop calls :meth:`combine` only at the steps where the condition acts.

    Example:
        >>> class Stronger(GuidanceTerm):                                # doctest: +SKIP
        ...     order = TermOrder.ADD
        ...     def combine(self, step): return step.guided + 0.1 * (step.cond - step.uncond)
    """

    order: ClassVar[TermOrder] = TermOrder.ADD
    # Whether the term reads ``GuidanceStep.perturbed``: the loop then adds the prompt's rows again, perturbed.
    perturbs: ClassVar[bool] = False

    def rows(self) -> tuple[ExtraRows, ...]:
        """Rows of its own the term needs predicted at the steps it acts (``GuidanceStep.extra``); none by default."""
        return ()

    def blend(self, step: GuidanceStep) -> Blend:
        """A ``BLEND`` term's weighed predictions (see :class:`Blend`); only ``BLEND`` terms are asked."""
        raise NotImplementedError(f"{type(self).__name__} is not a BLEND term")

    def combine(self, step: GuidanceStep) -> torch.Tensor:
        """The step's combination, from ``step.guided`` (the combination so far); ``BLEND`` terms are not asked."""
        raise NotImplementedError(f"{type(self).__name__} does not combine")


@dataclass
class CFGRescale(GuidanceTerm):
    """CFG rescale as a term (diffusers' ``guidance_rescale``): the request's ``guidance_rescale`` acts through it,
    after every other term, measured against the prompt's own prediction; nothing without classifier-free guidance.

    Example:
        >>> CFGRescale(0.7).order
        <TermOrder.FINISH: 2>
    """

    rescale: float
    order: ClassVar[TermOrder] = TermOrder.FINISH

    def combine(self, step: GuidanceStep) -> torch.Tensor:
        if step.uncond is None or self.rescale <= 0.0:
            return step.guided
        return rescaled(step.guided, step.cond, self.rescale)


def guided_step(
    guidance: Guidance,
    prediction: torch.Tensor,
    terms: list[GuidanceTerm],
    *,
    perturbed: torch.Tensor | None = None,
    extra: list[tuple[torch.Tensor, ...]] | None = None,
    index: int = 0,
    total: int = 1,
    timestep: float = 0.0,
    stage: Stage = Stage.BASE,
    scale: float = 1.0,
) -> torch.Tensor:
    """One step's combined prediction: ``guidance.combine`` alone where no term acts (so that a step without them is
    the same, bit for bit), else the terms in their :class:`TermOrder` on what it gives. ``perturbed`` holds the
    prompt's parts predicted with perturbed self-attention (in the parts' order), when a term asked for them;
    ``extra`` each term's own rows' predictions (in the order of ``terms``)."""
    if not terms:
        return guidance.combine(prediction)
    own = dict(zip(map(id, terms), extra or [()] * len(terms), strict=True))
    replacing = [t for t in terms if t.order is TermOrder.REPLACE]
    if len(replacing) > 1:
        from ..base.errors import ConditionError

        raise ConditionError(
            f"{' and '.join(type(t).__name__ for t in replacing)} each compute the guidance anew: give one of them"
        )

    def at(uncond: torch.Tensor | None, cond: torch.Tensor, guided: torch.Tensor, term: GuidanceTerm) -> GuidanceStep:
        return GuidanceStep(index, total, timestep, stage, scale, uncond, cond, guided,
                            None if perturbed is None else guidance.conditional(uncond, perturbed),
                            own[id(term)])  # fmt: skip

    uncond, cond = guidance.split(prediction)
    blending = [t for t in terms if t.order is TermOrder.BLEND]
    if blending:
        uncond, cond = _blended(uncond, cond, [t.blend(at(uncond, cond, cond, t)) for t in blending])
        prediction = cond if uncond is None else torch.cat([uncond, cond])
        if guidance.copies != (1 if uncond is None else 2):
            from ..base.errors import ConditionError

            raise ConditionError("a prompt of several AND parts cannot be blended with regional prompts: join them")
    guided = guidance.combine(prediction)
    for term in sorted((t for t in terms if t.order is not TermOrder.BLEND), key=lambda t: t.order):  # stable sort
        guided = term.combine(at(uncond, cond, guided, term))
    return guided


def _blended(
    uncond: torch.Tensor | None, cond: torch.Tensor, blends: list[Blend]
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The request's predictions (weight 1 everywhere) averaged per pixel with the blends', ComfyUI's rule: its sums
    start at 0 with counts of 1e-37, so a pixel no weight covers is 0 (here the request's own always does)."""

    def average(base: torch.Tensor, weighed: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        total, count = base.clone(), torch.ones_like(base) + 1e-37
        for weight, value in weighed:
            total += value * weight
            count += weight
        return total / count

    cond = average(cond, [(b.weight, b.cond) for b in blends])
    negatives = [(b.uncond_weight if b.uncond_weight is not None else b.weight, b.uncond) for b in blends
                 if b.uncond is not None]  # fmt: skip
    if uncond is not None and negatives:
        uncond = average(uncond, negatives)  # type: ignore[arg-type]
    return uncond, cond
