"""Weight-channel deltas kept applied from one job to the next: what a :class:`~sdxl_control.jobs.runner.Runner` holds
so that a LoRA set used by consecutive jobs is read, multiplied out and added to the weights once, not once per job.

A direct :meth:`Generator.run <sdxl_control.passes.generator.Generator.run>` adds every condition's deltas at the steps
where it acts and takes them out after the call. With a :class:`KeptWeights` (a Runner sets it as the generator's
``kept_weights`` for the length of each of its runs) a call instead leaves in force the deltas of the conditions
that can stay, and the next call that brings the same ones finds them applied: it neither prepares those conditions
again nor patches anything. They come off exactly (every weight bit-identical to before) when a call brings another
set, on :meth:`KeptWeights.release` (the Runner's ``close``, a failed job, other models or settings).

A condition's deltas on a stage can stay when

* it says what they depend on (:meth:`Condition.resident_key <sdxl_control.protocol.conditions.Condition.resident_key>`:
  a LoRA's value and its file), and
* it acts at every step of the stage (a LoRA with a window, such as ``window=(0, 0.5)``, is fused at its window's
  first step and taken out at its last, per call, as without a Runner), and
* every condition before it that brings deltas to the stage's models can stay as well: deltas are summed in the
  order they come, so kept ones must come first for the weights to hold the very bits a direct call makes.

The images are bit-identical to a direct call's (tested). Kept deltas are in force while the next call's other
conditions prepare and attach; that changes nothing, as none of them reads a stage model's weight values there (only
configs and shapes).

Example:
    >>> kept = KeptWeights()
    >>> kept.held()
    []
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..protocol.conditions import Condition, PrepareContext, Prepared, Stage, acts

if TYPE_CHECKING:
    from ..protocol.schedule import StageSchedule
    from ..weights.patches import WeightDelta, WeightPatch
    from .models import StageModels

__all__ = ["KeptWeights"]


@dataclass
class _Kept:
    key: Hashable
    patches: list[WeightPatch] = field(default_factory=list)


@dataclass
class _StageKept:
    models: tuple[Any, ...]  # the stage's UNet and text encoders the patches are on
    kept: list[_Kept] = field(default_factory=list)


class _InForce(Prepared):
    """A prepared condition whose deltas on ``stages`` are already applied: it brings none there, the rest is its own."""

    def __init__(self, ready: Prepared, stages: frozenset[Stage]) -> None:
        self.ready, self.stages = ready, stages

    def attach(self, unet: Any, stage: Stage) -> Any:
        return self.ready.attach(unet, stage)

    def prompt_edit(self, stage: Stage) -> Any:
        return self.ready.prompt_edit(stage)

    def weight_deltas(self, stage: Stage) -> Mapping[str, Mapping[str, WeightDelta]]:
        return {} if stage in self.stages else self.ready.weight_deltas(stage)


class KeptWeights:
    """The weight patches kept in force between calls, by stage, with the prepared conditions that made them.

    Example:
        >>> runner = Runner(device="cuda")                 # doctest: +SKIP
        >>> for job in jobs_with_one_lora: runner.run(job)  # doctest: +SKIP
        >>> runner.close()  # the LoRA comes off: every weight as before the first job  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._stages: dict[Stage, _StageKept] = {}
        self._ready: dict[tuple[Hashable, Hashable], Prepared] = {}  # (key, what prepare saw) -> prepared value

    def held(self) -> list[tuple[Stage, Hashable]]:
        """The (stage, key) of every condition whose deltas are in force, in the order they were applied."""
        return [(stage, k.key) for stage, held in self._stages.items() for k in held.kept]

    def prepare(
        self, conditions: Sequence[Condition], context: PrepareContext, plans: Sequence[Any]
    ) -> list[tuple[Condition, Prepared]]:
        """``conditions`` prepared for a call running ``plans`` (each with ``models`` and ``schedule``): kept ones
        taken from the last call, the deltas that can stay applied now (those of the last call taken out first where
        they differ), and those conditions' values bringing no deltas to the stages they are applied on. If applying
        fails, everything kept is taken out before the error propagates."""
        keys = [c.resident_key() for c in conditions]
        seen = (tuple(context.stages), context.device, context.dtype)
        prepared = []
        for condition, key in zip(conditions, keys, strict=True):
            ready = self._ready.get((key, seen)) if key is not None else None
            prepared.append((condition, ready if ready is not None else condition.prepare(context)))
        in_force: dict[int, set[Stage]] = {}
        try:
            for plan in plans:
                models: StageModels = plan.models
                wanted = _can_stay(prepared, keys, models.stage, plan.schedule)
                self._settle(models, [(keys[i], prepared[i]) for i in wanted])
                for i in wanted:
                    in_force.setdefault(i, set()).add(models.stage)
        except BaseException:
            self.release()
            raise
        for i in in_force:
            self._ready[(keys[i], seen)] = prepared[i][1]
        held = {key for _, key in self.held()}
        self._ready = {k: v for k, v in self._ready.items() if k[0] in held}  # only what may be asked for again
        return [(c, _InForce(ready, frozenset(in_force[i])) if i in in_force else ready)
                for i, (c, ready) in enumerate(prepared)]  # fmt: skip

    def release(self) -> None:
        """Take every kept delta out (the weights bit-identical to before the first), last applied first."""
        errors: list[BaseException] = []
        for stage in reversed(list(self._stages)):
            try:
                self._release_stage(stage)
            except BaseException as exc:  # take the other stages' out too; report after
                errors.append(exc)
        self._ready.clear()
        if errors:
            raise errors[0]

    def _release_stage(self, stage: Stage) -> None:
        held = self._stages.pop(stage, None)
        if held is None:
            return
        for kept in reversed(held.kept):
            for patch in reversed(kept.patches):
                patch.restore()

    def _settle(self, models: StageModels, wanted: list[tuple[Hashable, tuple[Condition, Prepared]]]) -> None:
        from ..protocol.attach import fitted_patch
        from ..protocol.text import encoder_patch

        owners = (models.unet, *(e.model for e in models.text_encoders))
        held = self._stages.get(models.stage)
        if (
            held is not None
            and len(held.models) == len(owners)
            and all(a is b for a, b in zip(held.models, owners, strict=True))
            and [k.key for k in held.kept] == [key for key, _ in wanted]
        ):
            return
        self._release_stage(models.stage)
        if not wanted:
            return
        held = self._stages[models.stage] = _StageKept(owners)
        for key, (condition, ready) in wanted:
            kept = _Kept(key)
            held.kept.append(kept)  # before patching: what is applied is taken out again if the next patch fails
            deltas = ready.weight_deltas(models.stage)
            # In the order a direct call adds them: the UNet's at the stage's first step, after the prompt's encoders.
            for encoder in models.text_encoders:
                if deltas.get(encoder.component):
                    kept.patches.append(encoder_patch(encoder, deltas[encoder.component]))
            if models.stage in condition.stage and deltas.get("unet"):
                kept.patches.append(fitted_patch(models.unet, deltas["unet"], type(condition).__name__))


def _can_stay(
    prepared: Sequence[tuple[Condition, Prepared]], keys: Sequence[Hashable | None], stage: Stage,
    schedule: StageSchedule,
) -> list[int]:  # fmt: skip
    """The indices of the conditions whose deltas on ``stage`` can stay applied (see the module's rules)."""
    steps = range(schedule.first_index, schedule.first_index + len(schedule.timesteps))
    out = []
    for i, (condition, ready) in enumerate(prepared):
        deltas = ready.weight_deltas(stage)
        # The UNet's deltas count on the stages the condition works on, the encoders' on every stage (as a call adds
        # them: see Generator._stage_inputs).
        brings = any(v for k, v in deltas.items() if k != "unet" or stage in condition.stage)
        if not brings:
            continue
        acting = [acts(condition.scale, condition.window, index, schedule.total) for index in steps]
        if not any(acting):
            continue  # never added while this stage denoises (scale 0, a window elsewhere)
        if keys[i] is None or not all(acting):
            break  # it comes and goes, so the ones after it cannot stay without changing the order of the sums
        out.append(i)
    return out
