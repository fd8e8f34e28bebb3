"""Step caching (DeepCache, Ma et al. 2023): the UNet's deep features change slowly from step to step, so only
every ``interval``-th step computes the whole UNet; the steps between reuse the deep blocks' outputs from the last
whole step and compute only the shallow path around the skip connection of one ``branch``.

The branch numbers the skip connections from the outside in, three per resolution level (SDXL has three levels:
branches 0-8). Branch 0, DeepCache's SDXL setting, keeps only the first convolution, the last up block's last
ResNet and the output layers fresh: a cached step costs a few per cent of a whole one. A higher branch keeps more of
the UNet fresh, closer to the uncached image and slower.

Which modules a cached step reuses is fixed by the branch: the down blocks deeper than its level, the mid block, the
up blocks deeper than its level, and within its level the layers at or beyond the branch (down side) or beyond it
(up side, counted from the output). Each such module, outermost first, returns what it returned at the last whole
step. The same UNet modules are reused whatever conditions are attached, so:

* ControlNet residuals are added to the skip connections after the down blocks (in diffusers' UNet), every step:
  they act fresh on the shallow path and through the reused deep features of the last whole step;
* attention branches (IP-Adapter, FaceID, InstantID, PuLID) and weight patches (LoRA) inside reused modules act as
  at the last whole step; a condition whose window opens on a cached step reaches the deep blocks at the next whole
  step;
* prompt edits (PhotoMaker) and the prompt's own embeddings likewise.

All of this is DeepCache's own behaviour (its ``DeepCacheSDHelper`` wraps the same modules of a diffusers
pipeline's UNet); the tests show this implementation equal to it. Steps are counted per stage from the stage's
first step: the reference counts the position of the timestep in the scheduler's schedule, which is the same except
for second-order schedulers, whose schedule repeats timesteps.

Example:
    >>> gen.generate("a lighthouse", steps=30, step_cache=3)   # whole UNet at steps 0, 3, 6, ...  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..base.errors import InvalidRequestError

__all__ = ["StepCache", "cached_steps", "reused_modules"]

LAYERS_PER_LEVEL = 3  # DeepCache's numbering: branch = level * 3 + layer


@dataclass(frozen=True)
class StepCache:
    """Reuse the UNet's deep features for ``interval - 1`` of every ``interval`` steps, computing the shallow path
    of skip connection ``branch`` fresh (see the module's documentation).

    Example:
        >>> StepCache(interval=3).whole(4), StepCache(interval=3).whole(6)
        (False, True)
    """

    interval: int
    branch: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise InvalidRequestError(f"step_cache must be a whole number of steps >= 1, got {self.interval!r}")
        if isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 0:
            raise InvalidRequestError(f"step_cache_branch must be a whole number >= 0, got {self.branch!r}")

    def whole(self, step: int) -> bool:
        """Whether step ``step`` of a stage (counted from 0) computes the whole UNet."""
        return step % self.interval == 0


def reused_modules(unet: Any, branch: int) -> list[torch.nn.Module]:
    """The outermost modules of ``unet`` whose outputs a cached step reuses for ``branch``, in no particular order."""
    level, layer = divmod(branch, LAYERS_PER_LEVEL)
    levels = len(unet.down_blocks)
    if level >= levels:
        raise InvalidRequestError(
            f"step_cache_branch {branch} is beyond this UNet's {levels * LAYERS_PER_LEVEL} skip branches "
            f"(0-{levels * LAYERS_PER_LEVEL - 1})"
        )
    reused: list[torch.nn.Module] = [unet.mid_block]
    for i, block in enumerate(unet.down_blocks):
        if i > level or (i == level and layer == 0):
            reused.append(block)
        elif i == level:
            resnets, attentions = list(block.resnets), list(getattr(block, "attentions", None) or [])
            reused += [m for j, m in enumerate(resnets) if j >= layer]
            reused += [m for j, m in enumerate(attentions) if j >= layer]
            if block.downsamplers is not None and len(resnets) >= layer:
                reused += list(block.downsamplers)
    for i, block in enumerate(unet.up_blocks):
        depth = levels - 1 - i  # up blocks counted from the output, as the skip connections they close
        if depth > level:
            reused.append(block)
        elif depth == level:
            resnets, attentions = list(block.resnets), list(getattr(block, "attentions", None) or [])
            last = len(resnets) - 1
            reused += [m for j, m in enumerate(resnets) if last - j > layer]
            reused += [m for j, m in enumerate(attentions) if last - j > layer]
    return reused


class _Reuse:
    """Replaces each reused module's ``forward`` (an instance attribute, removed again on exit) with one that runs
    and remembers on whole steps and answers from memory on cached steps."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.whole = True
        self._memory: dict[int, Any] = {}
        self._replaced: list[tuple[torch.nn.Module, Any]] = []
        try:
            for module in modules:
                own = module.__dict__.get("forward")  # an instance-level forward someone else set, kept
                self._replaced.append((module, own))
                module.forward = self._wrap(module, own or module.forward)
        except BaseException:
            self.remove()
            raise

    def _wrap(self, module: torch.nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        key = id(module)

        def forward_or_recall(*args: Any, **kwargs: Any) -> Any:
            if self.whole or key not in self._memory:
                self._memory[key] = forward(*args, **kwargs)
            return self._memory[key]

        return forward_or_recall

    def remove(self) -> None:
        while self._replaced:
            module, own = self._replaced.pop()
            if own is None:
                del module.forward
            else:
                module.forward = own
        self._memory.clear()


class _Steps:
    def __init__(self, cache: StepCache | None, reuse: _Reuse | None) -> None:
        self._cache, self._reuse = cache, reuse

    def at(self, step: int) -> None:
        """Say which step of the stage the next UNet call computes."""
        if self._cache is not None and self._reuse is not None:
            self._reuse.whole = self._cache.whole(step)


@contextmanager
def cached_steps(unet: Any, cache: StepCache | None) -> Iterator[_Steps]:
    """Inside the block, ``unet`` reuses its deep features as ``cache`` says (``None`` or an interval of 1: never);
    call ``.at(step)`` before each UNet call. On exit the modules are as before and the memory is freed."""
    reuse = _Reuse(reused_modules(unet, cache.branch)) if cache is not None and cache.interval > 1 else None
    try:
        yield _Steps(cache, reuse)
    finally:
        if reuse is not None:
            reuse.remove()
