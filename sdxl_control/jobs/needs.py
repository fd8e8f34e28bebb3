"""What a job loads, computed one way for every question: what a run checks before loading (the Runner), what
``batch --check`` and the page's opening status report, what a preset needs (``sdxl-control models``). Each need is
stated by the code that loads it (the stages', the decoders', each condition's), so the answer is what loading would
look for.

Example:
    >>> needs = model_needs("stabilityai/stable-diffusion-xl-base-1.0", None)
    >>> needs[0].source
    'stabilityai/stable-diffusion-xl-base-1.0'
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from ..base.stages import Stage
from ..weights.inventory import ModelNeed, unique, weights_need

if TYPE_CHECKING:
    from ..base.model_refs import ModelRef
    from ..passes.request import GenerationRequest
    from ..protocol.conditions import Condition


__all__ = ["job_needs", "model_needs", "run_needs"]


def model_needs(
    base: str | os.PathLike[str], refiner: str | os.PathLike[str] | None, unet: ModelRef | None = None, *,
    decoder: str | None = None, vae: str | None = None, conditions: Iterable[Condition] = (),
) -> list[ModelNeed]:  # fmt: skip
    """Every model a run on these stages loads, with this draft ``decoder``, ``vae`` and ``conditions`` (each once)."""
    from ..engine.models import stage_needs
    from ..engine.vae import DECODER_FILES, VAE_FILES

    needs = stage_needs(base, Stage.BASE, unet=unet)
    if refiner is not None:
        needs += stage_needs(refiner, Stage.REFINER)
    if decoder is not None:
        needs.append(weights_need("draft decoder", decoder, DECODER_FILES))
    if vae is not None:
        needs.append(weights_need("VAE", vae, list(VAE_FILES)))
    for condition in conditions:
        needs += condition.model_needs()
    return unique(needs)


def run_needs(
    request: GenerationRequest, base: str | os.PathLike[str], refiner: str | os.PathLike[str] | None,
    unet: ModelRef | None = None,
) -> list[ModelNeed]:  # fmt: skip
    """Every model a run of ``request`` on these models loads: the stages, the draft decoder, the conditions'."""
    return model_needs(
        base, refiner, unet, decoder=request.decoder, vae=request.vae, conditions=request.conditions
    )  # fmt: skip


class _Job(Protocol):
    """A resolved job or a batch's job: a request and the models it runs on."""

    @property
    def request(self) -> GenerationRequest: ...
    @property
    def base(self) -> str: ...
    @property
    def refiner(self) -> str | None: ...
    @property
    def unet(self) -> ModelRef | None: ...


def job_needs(jobs: Iterable[_Job]) -> list[ModelNeed]:
    """Every model ``jobs`` load (each once), found the way loading finds them: what ``batch --check`` reports."""
    return unique(need for job in jobs for need in run_needs(job.request, job.base, job.refiner, job.unet))
