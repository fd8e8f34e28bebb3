"""Schedulers by name, and the split of one schedule between the base and the refiner."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import diffusers
import torch

from ..base.defaults import SCHEDULER_ALIASES, SCHEDULERS
from ..base.errors import InvalidRequestError

__all__ = [
    "SCHEDULERS", "make_scheduler", "scheduler_name", "scheduler_spec", "check_schedule", "StageSchedule",
    "split_schedule",
]  # fmt: skip


def make_scheduler(
    model_config: Any,
    name: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    seeds: Sequence[int] | None = None,
) -> Any:
    """A fresh scheduler built from a model's scheduler config.

    ``name`` is a key of :data:`SCHEDULERS` or any diffusers scheduler class name; ``None`` keeps the model's own.
    ``seeds`` (one per image) seed a scheduler that draws its own noise: DPM++ SDE's Brownian trees, one per image as
    A1111 seeds them, unless ``overrides`` name its ``noise_sampler_seed`` (unseeded, diffusers draws a random one).
    """
    config = dict(model_config)
    cls_name = config.get("_class_name", "EulerDiscreteScheduler")
    extra: dict[str, Any] = {}
    if name is not None:
        cls_name, extra = scheduler_spec(name)
    cls = getattr(diffusers, cls_name)
    extra = {**extra, **(overrides or {})}
    from .prediction import check_zero_snr

    check_zero_snr(cls_name, name, {**config, **extra})
    if seeds is not None and "noise_sampler_seed" in inspect.signature(cls.__init__).parameters:
        extra.setdefault("noise_sampler_seed", list(seeds))
    try:
        return cls.from_config(config, **extra)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"scheduler {cls_name} refuses these options ({exc})") from None


def scheduler_name(name: str) -> str:
    """Our name for a scheduler as A1111 or ComfyUI users write it ("DPM++ 2M Karras", "euler_ancestral"); other
    names as given.

    Example:
        >>> scheduler_name("DPM++ 2M Karras"), scheduler_name("Euler a"), scheduler_name("heun")
        ('dpmpp_2m_karras', 'euler_a', 'heun')
    """
    folded = name.strip().casefold()
    if folded in SCHEDULER_ALIASES:
        return SCHEDULER_ALIASES[folded]
    return folded if folded in SCHEDULERS else name


def scheduler_spec(name: str) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, config overrides) of a scheduler name, or an error listing the names."""
    name = scheduler_name(name)
    if name in SCHEDULERS:
        return SCHEDULERS[name]
    if name.endswith("Scheduler") and hasattr(diffusers, name):
        return name, {}
    from ..base.samplers import SAMPLERS, SCHEDULES

    for schedule in SCHEDULES:
        sampler = name.removesuffix(f"_{schedule}")
        if sampler != name and sampler in SAMPLERS:
            others = [
                n for n in SCHEDULERS if n.startswith(f"{sampler}_") and n.removeprefix(f"{sampler}_") in SCHEDULES
            ]
            instead = f"{sampler!r} or one of {', '.join(others)}" if others else f"{sampler!r} (it runs its own)"
            raise InvalidRequestError(
                f"scheduler {name!r}: diffusers' {SAMPLERS[sampler][0]} takes no {schedule} schedule; use {instead}"
            )
    known = f"a sampler ({', '.join(SAMPLERS)}) with an optional schedule ({', '.join(f'_{s}' for s in SCHEDULES)})"
    if (why := _not_runnable(name)) is not None:  # a sampler the tools have, which diffusers cannot run exactly
        raise InvalidRequestError(f"scheduler {name!r}: {why}; use {known} or a diffusers class name")
    close = difflib.get_close_matches(name, list(SCHEDULERS), n=1) or difflib.get_close_matches(
        name.casefold(), list(SCHEDULER_ALIASES), n=1
    )
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise InvalidRequestError(f"unknown scheduler {name!r}{hint}: use {known} or a diffusers class name")


def _not_runnable(name: str) -> str | None:
    """Why an A1111 or ComfyUI sampler name (with its schedule, as A1111's old labels had it) has no scheduler here,
    as the PNG import lists it; ``None`` for a name neither tool has."""
    from ..base.samplers import COMFYUI_UNEXPRESSIBLE, tool_scheduler

    if name.strip() in COMFYUI_UNEXPRESSIBLE:
        return f"ComfyUI's {name.strip()} cannot run here exactly: {COMFYUI_UNEXPRESSIBLE[name.strip()]}"
    ours, why = tool_scheduler("A1111", name, None)
    if ours is None and not why.startswith("A1111 sampler"):  # that one: a name A1111 does not have
        return f"A1111's {name.strip()} cannot run here exactly: {why}"
    return None


def check_schedule(name: str | None, overrides: Mapping[str, Any], timesteps: Sequence[int] | None) -> None:
    """Refuse, before any model loads, an explicit ``timesteps`` list a scheduler cannot take: diffusers' set_timesteps
    of some classes has no ``timesteps``, and the DPM-Solver ones refuse it with a sigma schedule."""
    if not timesteps or name is None:
        return
    cls_name, extra = scheduler_spec(name)
    options = {**extra, **overrides}
    takes = "timesteps" in inspect.signature(getattr(diffusers, cls_name).set_timesteps).parameters
    sigma_schedule = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if options.get(k)]
    if not takes or sigma_schedule:
        why = f"its {sigma_schedule[0]} places the sigmas itself" if takes else f"{cls_name} takes no timestep list"
        raise InvalidRequestError(
            f"timesteps {list(timesteps)[:8]} with scheduler {name!r}: {why}; leave out the timesteps, or use a scheduler "
            "that takes them (euler, heun, dpmpp_2m, lcm, tcd)"
        )


@dataclass(frozen=True)
class StageSchedule:
    """The timesteps one stage runs, where they sit in the whole schedule, and its scheduler (already set).

    Schedulers are set up on the host and ``timesteps`` stay there: the scheduler only looks values up with them, and
    the loop hands the UNet one device copy, so no step ever reads a device tensor back (each read would stall the
    host until the device's queue drains).

    Example:
        >>> base, refiner = split_schedule(make_scheduler(cfg), make_scheduler(cfg), 30, 0.8)  # doctest: +SKIP
        >>> len(base.timesteps), refiner.first_index                                                 # doctest: +SKIP
        (24, 24)
    """

    scheduler: Any
    timesteps: torch.Tensor
    first_index: int
    total: int


def _set(scheduler: Any, steps: int, timesteps: tuple[int, ...] | None) -> torch.Tensor:
    if timesteps is not None:
        scheduler.set_timesteps(device="cpu", timesteps=list(timesteps))
    else:
        scheduler.set_timesteps(steps, device="cpu")
    return scheduler.timesteps


def split_schedule(
    base_scheduler: Any,
    refiner_scheduler: Any | None,
    steps: int,
    switch: float | None,
    timesteps: tuple[int, ...] | None = None,
    strength: float = 1.0,
) -> tuple[StageSchedule, StageSchedule | None]:
    """Split one ``steps``-long schedule at fraction ``switch`` exactly as diffusers' denoising_end/start do.

    ``timesteps`` gives an explicit schedule instead of ``steps``. The base keeps timesteps ``>= cutoff`` and the refiner, with a scheduler of its own set to the same schedule,
    takes those ``< cutoff`` (one more for second-order schedulers, so no step is cut between its two halves).
    ``strength`` below 1 enters the schedule part way, as diffusers' image-to-image pipelines do: the first
    ``steps - int(steps * strength)`` steps are skipped, and step indices (what windows and prompt segments count)
    start at the entry, so a window covers the steps actually run.
    """
    all_base = _set(base_scheduler, steps, timesteps)
    count = len(timesteps) if timesteps is not None else steps
    skip = max(count - min(int(count * strength), count), 0) * base_scheduler.order
    if skip >= len(all_base):
        raise InvalidRequestError(
            f"strength={strength} with {steps} steps runs no step: raise the strength or add steps"
        )
    # A known first index spares the scheduler its search for the first timestep.
    if hasattr(base_scheduler, "set_begin_index"):
        base_scheduler.set_begin_index(skip)
    entered = all_base[skip:]
    if refiner_scheduler is None or switch is None:
        return StageSchedule(base_scheduler, entered, 0, len(entered)), None
    train_steps = base_scheduler.config.num_train_timesteps
    cutoff = int(round(train_steps - switch * train_steps))
    n_base = int((entered >= cutoff).sum())

    all_refiner = _set(refiner_scheduler, steps, timesteps)
    n_refiner = int((all_refiner < cutoff).sum())
    if refiner_scheduler.order == 2 and n_refiner % 2 == 0:
        n_refiner += 1
    if n_base == 0 or n_refiner == 0:
        raise InvalidRequestError(
            f"refiner_switch={switch} with {steps} steps"
            f"{f' and strength={strength}' if strength < 1 else ''} leaves the {'base' if n_base == 0 else 'refiner'} "
            "no step: move the switch point or add steps"
        )
    start = len(all_refiner) - n_refiner
    if hasattr(refiner_scheduler, "set_begin_index"):
        refiner_scheduler.set_begin_index(start)
    total = len(entered)
    return (
        StageSchedule(base_scheduler, entered[:n_base], 0, total),
        StageSchedule(refiner_scheduler, all_refiner[start:], start - skip, total),
    )
