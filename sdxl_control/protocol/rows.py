"""Rows: which row of what a condition prepared each row of a UNet call reads.

Conditions prepare their per-row inputs once per call for the batch ``[negative] * n + [prompt] * n`` (``[prompt] * n``
without classifier-free guidance; see :attr:`~sdxl_control.protocol.conditions.PrepareContext.guided`): image
tokens, control images, attention keys and values. The loop's batch may hold more rows than that: one per part of a
prompt with several parts (``AND``, regional prompts), and, at steps where a guidance condition asks for it, a copy of
the prompt's rows whose self-attention is perturbed (PAG). :class:`Rows` maps each row of the batch to the prepared
row it reads, so that every condition serves any layout without knowing it.

The loop states the rows of each UNet call with :func:`calling`; code that runs inside the UNet (attention
processors) reads them with :func:`call_rows`. Between calls there are none (the prepared layout holds).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from ..base.errors import ConditionError

__all__ = ["Rows", "call_rows", "calling"]


@dataclass(frozen=True)
class Rows:
    """For each row of a batch, the prepared row it reads (``source``) and whether its self-attention is perturbed.

    ``prepared`` is how many rows the conditions prepared. A layout that reads every prepared row once, in order,
    without perturbation, is the identity: :meth:`gather` then hands back its input itself, so nothing changes for
    the plain ``[negative, prompt]`` batch, bit for bit.

    Example:
        >>> rows = Rows.of_parts(batch=1, parts=2, guided=True)     # [negative, part 1, part 2]
        >>> rows.source, rows.gather(torch.tensor([10, 20])).tolist()
        ((0, 1, 1), [10, 20, 20])
    """

    source: tuple[int, ...]
    prepared: int
    perturbed: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if any(not 0 <= s < self.prepared for s in self.source):
            raise ConditionError(f"rows {self.source} read outside the {self.prepared} prepared rows")
        if self.perturbed and len(self.perturbed) != len(self.source):
            raise ConditionError(f"{len(self.perturbed)} perturbation flags for {len(self.source)} rows")

    @classmethod
    def identity(cls, rows: int) -> Rows:
        return cls(tuple(range(rows)), rows)

    @classmethod
    def of_parts(cls, batch: int, parts: int, guided: bool) -> Rows:
        """The loop's batch ``[negative] * batch + [part_1] * batch + ... + [part_k] * batch``: every part reads
        the prompt's prepared rows."""
        if not guided:
            if parts != 1:
                raise ConditionError("a prompt of several parts needs classifier-free guidance")
            return cls.identity(batch)
        prompt = tuple(range(batch, 2 * batch))
        return cls(tuple(range(batch)) + prompt * parts, 2 * batch)

    @property
    def is_identity(self) -> bool:
        return not any(self.perturbed) and self.source == tuple(range(self.prepared))

    @property
    def any_perturbed(self) -> bool:
        return any(self.perturbed)

    def __len__(self) -> int:
        return len(self.source)

    def then(self, rows: Rows) -> Rows:
        """These rows read through ``rows`` (a layout of this one's rows): a call's rows composed with the loop's."""
        if rows.prepared != len(self):
            raise ConditionError(f"rows of {rows.prepared} rows cannot read a layout of {len(self)}")
        own = self.perturbed or (False,) * len(self)
        flags = tuple(own[s] or (bool(rows.perturbed) and rows.perturbed[i]) for i, s in enumerate(rows.source))
        return Rows(tuple(self.source[s] for s in rows.source), self.prepared, flags if any(flags) else ())

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s prepared rows (its first dimension) laid out as these rows; itself for the identity."""
        if tensor.shape[0] != self.prepared:
            raise ConditionError(f"{tensor.shape[0]} prepared rows given for a layout of {self.prepared}")
        if self.source == tuple(range(self.prepared)):
            return tensor
        return tensor[torch.tensor(self.source, device=tensor.device)]


_CURRENT: ContextVar[Rows | None] = ContextVar("sdxl_control_call_rows", default=None)


def call_rows() -> Rows | None:
    """The rows of the UNet call running now, as the loop stated them; ``None`` outside the loop's calls."""
    return _CURRENT.get()


@contextmanager
def calling(rows: Rows) -> Iterator[Rows]:
    """State ``rows`` for the UNet call made inside the block."""
    token = _CURRENT.set(rows)
    try:
        yield rows
    finally:
        _CURRENT.reset(token)
