"""Which stage a condition acts on and in which part of the steps: values every layer speaks of (the A1111 text
records windows, the stage configs are per stage), so they live on the ground floor; the protocol
(:mod:`sdxl_control.protocol.conditions`) gives them their meaning.

Example:
    >>> Stage.parse("refiner") in Stage.BOTH, Window(0.2, 1.0).contains(step=0, total=10)
    (True, False)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import ConditionError

__all__ = ["Stage", "Window"]


class Stage(enum.Flag):
    """Which model(s) of the two-stage pipeline a condition applies to.

    Example:
        >>> Stage.BASE in Stage.BOTH
        True
    """

    BASE = enum.auto()
    REFINER = enum.auto()
    BOTH = BASE | REFINER

    @property
    def label(self) -> str:
        return {Stage.BASE: "base", Stage.REFINER: "refiner", Stage.BOTH: "both"}[self]

    @classmethod
    def parse(cls, value: Stage | str) -> Stage:
        if isinstance(value, Stage):
            return value
        try:
            return {"base": cls.BASE, "refiner": cls.REFINER, "both": cls.BOTH}[value]
        except KeyError:
            raise ConditionError(f"unknown stage {value!r}: use 'base', 'refiner' or 'both'") from None


@dataclass(frozen=True)
class Window:
    """The part of the denoising schedule, as fractions of all steps, in which a condition acts.

    A step ``i`` of ``n`` is inside when ``i / n >= start`` and ``(i + 1) / n <= end`` — the rule diffusers uses for
    ``control_guidance_start`` / ``control_guidance_end``, so results match it. Fractions refer to the whole
    schedule, base and refiner steps together.

    Example:
        >>> Window(0.0, 0.5).contains(step=4, total=10)
        True
        >>> Window(0.0, 0.5).contains(step=5, total=10)
        False
    """

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.start < self.end <= 1.0):
            raise ConditionError(f"a step window needs 0 <= start < end <= 1, got ({self.start}, {self.end})")

    def contains(self, step: int, total: int) -> bool:
        return step / total >= self.start and (step + 1) / total <= self.end

    @classmethod
    def of(cls, value: Window | tuple[float, float] | list[float]) -> Window:
        if isinstance(value, Window):
            return value
        if (
            not isinstance(value, (tuple, list))
            or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise ConditionError(f"a step window is (start, end), two fractions of the schedule, got {value!r}")
        return cls(float(value[0]), float(value[1]))
