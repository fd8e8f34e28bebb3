"""The denoising loop. Both stages run through :func:`denoise`; nothing else steps a scheduler."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..protocol.attach import attached
from ..protocol.conditions import Condition, Prepared, Residuals, Stage, StepInfo, acts
from ..protocol.guidance import ExtraRows, Guidance, GuidanceTerm, guided_step
from ..protocol.rows import Rows, calling
from ..protocol.schedule import StageSchedule
from .step_cache import StepCache, cached_steps

__all__ = ["StageInputs", "PromptSegment", "ProgressEvent", "ProgressCallback", "Repaint", "denoise"]


@dataclass(frozen=True)
class ProgressEvent:
    """Reported after every step: ``step`` of ``steps`` within the stage, ``index`` of ``total`` overall;
    ``latents`` is the noisy sample the schedule continues from, ``denoised`` the step's estimate of the finished
    latent (what previews show).

    Example:
        >>> gen.generate("...", progress=lambda e: print(e.stage.label, e.index + 1, "/", e.total))  # doctest: +SKIP
    """

    stage: Stage
    step: int
    steps: int
    index: int
    total: int
    timestep: float
    latents: torch.Tensor
    denoised: torch.Tensor


def _denoised(scheduler: Any, output: Any, latents: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """The step's estimate of the clean latent: the scheduler's own where it reports one (Euler, Heun, DDIM, LCM...);
    for the DPM-Solver/UniPC family, from the prediction at the step's noise level; else the noisy sample."""
    estimate = getattr(output, "pred_original_sample", None)
    if estimate is not None:
        return estimate
    index = getattr(scheduler, "step_index", None)
    to_alpha_sigma = getattr(scheduler, "_sigma_to_alpha_sigma_t", None)  # the family's own conversion
    if index and to_alpha_sigma is not None:
        alpha, sigma = to_alpha_sigma(scheduler.sigmas[index - 1])
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            return (latents - sigma * prediction) / alpha
        if kind == "v_prediction":
            return alpha * latents - sigma * prediction
        if kind == "sample":
            return prediction
    return output.prev_sample


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class PromptSegment:
    """The prompt's hidden states and pooled embedding, batched for the stage's guidance, that the UNet reads from step
    ``first`` (an index of the whole schedule) until the next segment's (the prompt channel's switch).

    ``uncond_hidden`` and ``uncond_pooled``, when given, are the negative prompt's rows at a length of their own: the
    UNet then runs them in a call apart from the prompt's rows (``hidden``, ``pooled``), A1111's way when their lengths
    differ and nothing pads them; the two calls' predictions are joined in the batch's order ``[uncond, cond...]``.

    Example:
        >>> PromptSegment(0, hidden, pooled)  # doctest: +SKIP
    """

    first: int
    hidden: torch.Tensor
    pooled: torch.Tensor
    uncond_hidden: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class Repaint:
    """Inpainting inside the loop, in one of the two ways diffusers does it. An inpainting UNet (9 input channels)
    reads ``extra`` — the mask and the masked image's latents, batched for the stage's guidance — beside the latents.
    A regular UNet gets the ``original`` image's latents put back outside ``mask`` (1: repaint) after every step,
    noised to the next step's level with ``noise`` (clean after the stage's last step), so only the masked area is
    repainted. ``mask`` is set for both kinds: the next stage repaints with it (:meth:`handed_over`).

    Example:
        >>> Repaint(mask=mask, original=image_latents, noise=noise)  # doctest: +SKIP
    """

    mask: torch.Tensor | None = None
    original: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    extra: torch.Tensor | None = None

    def handed_over(self, latents: torch.Tensor, generators: list[torch.Generator]) -> Repaint:
        """Inpainting in the next stage (the refiner, a regular UNet), as diffusers' inpainting pipeline does it when
        handed the base's latents (``denoising_start``): those latents are what is put back outside the mask, noised
        with fresh noise drawn from ``generators``."""
        from diffusers.utils.torch_utils import randn_tensor

        if self.mask is None:
            raise ValueError("a repaint without a mask has nothing to hand over")
        noise = randn_tensor(latents.shape, generator=generators, device=latents.device, dtype=latents.dtype)
        return Repaint(mask=self.mask, original=latents, noise=noise)

    def model_input(self, sample: torch.Tensor) -> torch.Tensor:
        return sample if self.extra is None else torch.cat([sample, self.extra], dim=1)

    def after_step(self, scheduler: Any, latents: torch.Tensor, next_timestep: torch.Tensor | None) -> torch.Tensor:
        if self.mask is None or self.original is None:  # an inpainting UNet reads the mask instead
            return latents
        original = self.original
        if next_timestep is not None:
            original = scheduler.add_noise(original, self.noise, next_timestep.reshape(1))
        return (1 - self.mask) * original + self.mask * latents


@dataclass(frozen=True)
class StageInputs:
    """Everything one stage needs, already encoded and batched for its guidance: the loop only steps.

    Example:
        >>> latents = denoise(StageInputs(Stage.BASE, unet, schedule, (PromptSegment(0, hidden, pooled),), ids, guidance),
        ...                   noise, generators=gens)  # doctest: +SKIP
    """

    stage: Stage
    unet: Any
    schedule: StageSchedule
    prompts: tuple[PromptSegment, ...]
    time_ids: torch.Tensor
    guidance: Guidance
    conditions: Sequence[tuple[Condition, Prepared]] = ()
    repaint: Repaint | None = None
    step_cache: StepCache | None = None
    # The batch's rows as the conditions prepared theirs (see :mod:`sdxl_control.protocol.rows`); None: the same.
    rows: Rows | None = None
    # Guidance terms of the request itself (CFG rescale), acting at every step after the conditions' own.
    terms: tuple[GuidanceTerm, ...] = ()


def _step_kwargs(scheduler: Any, generators: list[torch.Generator] | None) -> dict[str, Any]:
    accepts = set(inspect.signature(scheduler.step).parameters)
    return {"generator": generators} if "generator" in accepts and generators is not None else {}


def _predicted(
    unet: Any,
    model_input: torch.Tensor,
    timestep: torch.Tensor,
    prompt: PromptSegment,
    time_ids: torch.Tensor,
    residuals: Residuals | None,
    rows: Rows,
    layout: Rows | None,
) -> torch.Tensor:
    """The UNet's prediction for the step's batch, laid out as ``layout`` (rows of the stage's batch, with copies of
    the prompt's rows to perturb; ``None``: the batch itself): one call, or, when the segment holds the negative
    prompt's rows at a length of their own, two (the negative rows first), every other per-row input (time ids,
    residuals) split the same way. ``rows`` are the call's rows as the conditions prepared theirs, stated to the code
    that runs inside the UNet."""
    if layout is not None:
        model_input, time_ids = layout.gather(model_input), layout.gather(time_ids)
        if residuals is not None:
            residuals = Residuals(tuple(layout.gather(r) for r in residuals.down), layout.gather(residuals.mid))
    if prompt.uncond_hidden is None or prompt.uncond_pooled is None:
        hidden, pooled = prompt.hidden, prompt.pooled
        if layout is not None:
            hidden, pooled = layout.gather(hidden), layout.gather(pooled)
        calls = [(slice(None), hidden, pooled)]
    else:
        uncond = prompt.uncond_hidden.shape[0]
        hidden, pooled = prompt.hidden, prompt.pooled
        if layout is not None:  # the prompt's rows alone, read from the stage's rows after the negative ones
            own = Rows(tuple(s - uncond for s in layout.source[uncond:]), hidden.shape[0])
            hidden, pooled = own.gather(hidden), own.gather(pooled)
        calls = [(slice(None, uncond), prompt.uncond_hidden, prompt.uncond_pooled),
                 (slice(uncond, None), hidden, pooled)]  # fmt: skip
    predictions = []
    for part, hidden, pooled in calls:
        with calling(Rows(rows.source[part], rows.prepared, rows.perturbed[part])):
            predictions.append(
                unet(
                    model_input[part],
                    timestep,
                    encoder_hidden_states=hidden,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids[part]},
                    down_block_additional_residuals=None if residuals is None else [r[part] for r in residuals.down],
                    mid_block_additional_residual=None if residuals is None else residuals.mid[part],
                    return_dict=False,
                )[0]
            )
    return predictions[0] if len(predictions) == 1 else torch.cat(predictions)


def _contributed(live: Sequence[tuple[Condition, Any]], step: StepInfo) -> Residuals | None:
    """Every attached condition's contribution to ``step`` (asked whether it acts there: :func:`acts`), its
    residuals summed."""
    residuals: Residuals | None = None
    for condition, attachment in live:
        extra = attachment.contribute(step, acts(condition.scale, condition.window, step.index, step.total))
        if extra is not None:
            residuals = extra if residuals is None else residuals + extra
    return residuals


def _perturbed_layout(rows: int, uncond: int) -> Rows:
    """The stage's batch of ``rows`` rows, then its prompt's rows (after the ``uncond`` negative ones) again,
    perturbed: the batch of a step where a guidance term reads the perturbed prediction (diffusers' PAG batch
    ``[uncond, cond, cond]``)."""
    prompt = tuple(range(uncond, rows))
    return Rows(tuple(range(rows)) + prompt, rows, (False,) * rows + (True,) * len(prompt))


def _check_step_cache(terms: list[tuple[Condition, GuidanceTerm]], schedule: StageSchedule) -> None:
    """Refuse a term that perturbs the prompt's rows, or brings rows of its own, under step caching: a cached step
    answers the deep blocks (the mid block PAG perturbs by default) from the last whole step, whose batch held other
    rows where the term's window opens or closes, and no reference defines what those rows should read there. A term that acts at no step
    of the stage is absent, and allowed."""
    steps = range(schedule.first_index, schedule.first_index + len(schedule.timesteps))
    for condition, term in terms:
        if (term.perturbs or term.rows()) and any(acts(condition.scale, condition.window, i, schedule.total)
                                                  for i in steps):  # fmt: skip
            from ..base.errors import ConditionError

            what = "perturbs the prompt's self-attention" if term.perturbs else "adds rows of its own to the batch"
            raise ConditionError(
                f"{type(condition).__name__} {what} at its steps, and step_cache (--step-cache, DeepCache) reuses the "
                f"UNet's deep blocks between whole steps: give step_cache 1 with {type(condition).__name__}"
            )


@torch.no_grad()
def denoise(
    inputs: StageInputs,
    latents: torch.Tensor,
    *,
    generators: list[torch.Generator] | None = None,
    progress: ProgressCallback | None = None,
    progress_bar: bool = True,
) -> torch.Tensor:
    """Run one stage's part of the schedule on ``latents`` and return the result.

    Conditions are attached for the stage before the first step and detached after the last, also on error.
    """
    schedule = inputs.schedule
    scheduler = schedule.scheduler
    unet = inputs.unet
    copies = inputs.guidance.copies
    scale = float(getattr(inputs.guidance, "scale", 1.0))
    step_kwargs = _step_kwargs(scheduler, generators)
    steps = len(schedule.timesteps)
    segments, current = inputs.prompts, 0
    # The UNet gets device timesteps, copied once; the scheduler keeps stepping with the host ones.
    unet_timesteps = schedule.timesteps.to(inputs.time_ids.device, non_blocking=True)
    with (
        attached(inputs.conditions, unet, inputs.stage) as live,
        cached_steps(unet, inputs.step_cache) as cache,
        tqdm(total=steps, desc=inputs.stage.label, disable=not progress_bar, leave=False) as bar,
    ):
        terms = [(c, term) for c, p in inputs.conditions if (term := p.guidance_term(inputs.stage)) is not None]
        if inputs.step_cache is not None and inputs.step_cache.interval > 1:
            _check_step_cache(terms, schedule)
        for k, (t, unet_t) in enumerate(zip(schedule.timesteps, unet_timesteps, strict=True)):
            index = schedule.first_index + k
            while current + 1 < len(segments) and segments[current + 1].first <= index:
                current += 1
            prompt = segments[current]
            added = {"text_embeds": prompt.pooled, "time_ids": inputs.time_ids}
            sample = latents if copies == 1 else torch.cat([latents] * copies)
            sample = scheduler.scale_model_input(sample, t)
            rows = inputs.rows or Rows.identity(sample.shape[0])
            acting = [term for c, term in terms if acts(c.scale, c.window, index, schedule.total)]
            acting += inputs.terms
            own = [term.rows() for term in acting]
            cache.at(k)
            if any(own):  # terms with rows of their own (regional prompts): one batch of every row, see _own_rows
                guided = _own_rows(inputs, unet, unet_t, t, index, sample, prompt, rows, acting, own, live)
                output = scheduler.step(guided, t, latents, **step_kwargs, return_dict=True)
                latents = _stepped(inputs, scheduler, output, latents, guided, k, t, index, progress, bar)
                continue
            info = StepInfo(index, schedule.total, unet_t, inputs.stage, sample, prompt.hidden, added, copies > 1,
                            inputs.rows)  # fmt: skip
            residuals = _contributed(live, info)
            layout = None
            if any(term.perturbs for term in acting):
                layout = _perturbed_layout(sample.shape[0], sample.shape[0] // copies if copies > 1 else 0)
                rows = rows.then(layout)
            model_input = sample if inputs.repaint is None else inputs.repaint.model_input(sample)
            prediction = _predicted(unet, model_input, unet_t, prompt, inputs.time_ids, residuals, rows, layout)
            perturbed = None
            if layout is not None:
                prediction, perturbed = prediction.tensor_split([sample.shape[0]])
            guided = guided_step(inputs.guidance, prediction, acting, perturbed=perturbed, index=index,
                                 total=schedule.total, timestep=float(t), stage=inputs.stage, scale=scale)  # fmt: skip
            output = scheduler.step(guided, t, latents, **step_kwargs, return_dict=True)
            latents = _stepped(inputs, scheduler, output, latents, guided, k, t, index, progress, bar)
    return latents


def _stepped(
    inputs: StageInputs, scheduler: Any, output: Any, latents: torch.Tensor, guided: torch.Tensor, k: int,
    t: torch.Tensor, index: int, progress: ProgressCallback | None, bar: Any,
) -> torch.Tensor:  # fmt: skip
    """After the scheduler's step: progress, and inpainting's original put back; the latents the next step reads."""
    schedule = inputs.schedule
    steps = len(schedule.timesteps)
    bar.update()
    if progress is not None:
        denoised = _denoised(scheduler, output, latents, guided)
        progress(ProgressEvent(inputs.stage, k + 1, steps, index, schedule.total, float(t), output.prev_sample,
                               denoised))  # fmt: skip
    latents = output.prev_sample
    if inputs.repaint is not None:
        upcoming = schedule.timesteps[k + 1] if k + 1 < steps else None
        latents = inputs.repaint.after_step(scheduler, latents, upcoming)
    return latents


def _lcm_tokens(hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hidden states of several lengths brought to one by repeating each whole sequence (ComfyUI's way,
    comfy/conds.py: attention over a sequence repeated r times is attention over the sequence)."""
    lengths = {h.shape[1] for h in hidden}
    if len(lengths) == 1:
        return hidden
    target = math.lcm(*lengths)
    return [h.repeat(1, target // h.shape[1], 1) for h in hidden]


def _own_rows(
    inputs: StageInputs, unet: Any, unet_t: torch.Tensor, t: torch.Tensor, index: int, sample: torch.Tensor,
    prompt: PromptSegment, rows: Rows, acting: list[GuidanceTerm], own: list[tuple[ExtraRows, ...]],
    live: list[tuple[Condition, Any]],
) -> torch.Tensor:  # fmt: skip
    """A step where terms bring rows of their own: the stage's rows, the prompt's again if a term perturbs them, and
    each term's rows (one per image), in ONE batch whose conditions contribute for every row (a ControlNet reads each
    row's own prompt, as ComfyUI runs it per conditioning). Prompts of other lengths are repeated to a common one."""
    schedule, copies = inputs.schedule, inputs.guidance.copies
    batch = sample.shape[0]
    n = batch // copies
    uncond = n if copies > 1 else 0
    # Rows of the stage's batch each new row reads (the model input, the time ids, the prepared rows).
    source, flags = list(range(batch)), [False] * batch
    perturbs = any(term.perturbs for term in acting)
    if perturbs:
        source += list(range(uncond, batch))
        flags += [True] * (batch - uncond)
    if prompt.uncond_hidden is not None and prompt.uncond_pooled is not None:
        head, tail = _lcm_tokens([prompt.uncond_hidden, prompt.hidden])
        hidden_parts = [torch.cat([head, tail])]
        pooled_parts = [torch.cat([prompt.uncond_pooled, prompt.pooled])]
    else:
        hidden_parts, pooled_parts = [prompt.hidden], [prompt.pooled]
    if perturbs:
        hidden_parts.append(hidden_parts[0][uncond:])
        pooled_parts.append(pooled_parts[0][uncond:])
    for extras in own:
        for extra in extras:
            if extra.negative and not uncond:
                continue  # no negative prompt to weigh against without classifier-free guidance
            first = 0 if extra.negative else uncond
            source += list(range(first, first + n))
            flags += [False] * n
            hidden_parts.append(extra.hidden.expand(n, -1, -1).to(prompt.hidden))
            pooled_parts.append(extra.pooled.expand(n, -1).to(prompt.pooled))
    layout = Rows(tuple(source), batch, tuple(flags) if any(flags) else ())
    call_rows = rows.then(layout)
    model_sample = layout.gather(sample)
    hidden = torch.cat(_lcm_tokens(hidden_parts))
    added = {"text_embeds": torch.cat(pooled_parts), "time_ids": layout.gather(inputs.time_ids)}
    info = StepInfo(index, schedule.total, unet_t, inputs.stage, model_sample, hidden, added, copies > 1, call_rows)
    residuals = _contributed(live, info)
    model_input = sample if inputs.repaint is None else inputs.repaint.model_input(sample)
    with calling(call_rows):
        prediction = unet(
            layout.gather(model_input), unet_t, encoder_hidden_states=hidden, added_cond_kwargs=added,
            down_block_additional_residuals=None if residuals is None else list(residuals.down),
            mid_block_additional_residual=None if residuals is None else residuals.mid, return_dict=False,
        )[0]  # fmt: skip
    cut = [batch, batch - uncond if perturbs else 0]
    cut += [n for extras in own for extra in extras if uncond or not extra.negative]
    base, perturbed, *theirs = prediction.split(cut)
    per_term, at = [], 0
    for extras in own:
        count = sum(1 for extra in extras if uncond or not extra.negative)
        per_term.append(tuple(theirs[at : at + count]))
        at += count
    return guided_step(inputs.guidance, base, acting, perturbed=perturbed if perturbs else None, extra=per_term,
                       index=index, total=schedule.total, timestep=float(t), stage=inputs.stage,
                       scale=float(getattr(inputs.guidance, "scale", 1.0)))  # fmt: skip
