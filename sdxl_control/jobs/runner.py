"""The one place a resolved job runs, for every front-end: the command line, the page, a batch worker (and each Ray
actor, which holds one) translate what their user gave into a :class:`~sdxl_control.jobs.spec.JobSpec`, resolve it, and
hand the :class:`~sdxl_control.jobs.spec.ResolvedJob` to a :class:`Runner`.

Example:
    >>> from sdxl_control.jobs.spec import JobSpec, resolve
    >>> runner = Runner(device="cuda")                                                    # doctest: +SKIP
    >>> job = resolve(JobSpec("a lighthouse", settings={"seed": 7}, models={"offload": True}))  # doctest: +SKIP
    >>> runner.run(job).images[0].save("out.png")                                          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..base.files import PathMode
    from ..engine.loop import ProgressCallback
    from ..engine.residency import KeptWeights
    from ..passes.generator import Generator
    from ..protocol.fast import FastPath
    from ..records.recipe import Result
    from .spec import ResolvedJob

__all__ = ["Runner"]


class Runner:
    """Runs resolved jobs one at a time on one device, keeping the models of the last job loaded.

    It owns what every front-end used to do around :meth:`Generator.run <sdxl_control.passes.generator.Generator.run>`:
    the device and dtype (``None``: CUDA in fp16 when there is one, else the CPU in fp32), every missing model of a
    job said at once before anything loads, loading the job's models (again only when its base, refiner, UNet
    checkpoint or ``weight_storage`` change; the old ones and the process caches let go first), offloading
    (``job.offload``: the stage models kept in CPU memory, each on the device while it runs) and the fast path
    (``job.fast``, a level of :data:`~sdxl_control.base.defaults.FAST_LEVELS`), both switched without reloading, and
    keeping only image ``job.keep`` of a batch (a recipe's batch re-run to re-make one image). ``progress`` and
    ``progress_bar`` are what each run reports with, unless :meth:`run` is given others.

    A LoRA set that consecutive jobs use stays applied between them (see :mod:`sdxl_control.engine.residency`): the next
    job with the same LoRAs (files, scales, stages) neither reads nor adds them again, and its images are bit-identical
    to a direct :meth:`~sdxl_control.passes.generator.Generator.run`'s. A LoRA with a step window is added per job, as
    are those after it in the job's list. The kept ones come off exactly when a job brings another set, when the models,
    offloading or the fast path change, when a job fails, when :meth:`generator` hands the models out, and at
    :meth:`close`: after it every weight is bit-identical to before the first job.

    Nothing is imported or loaded until the first job (a page opens before torch is imported).

    Example:
        >>> from sdxl_control.jobs.spec import JobSpec, resolve
        >>> runner = Runner(device="cpu")
        >>> job = resolve(JobSpec("a red fox", settings={"seed": 3}, models={"fast": "layout"}))  # doctest: +SKIP
        >>> [image.recipe["seed"] for image in runner.run(job).images]                           # doctest: +SKIP
        [3]
    """

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        recipe_paths: PathMode = "names",
        progress: ProgressCallback | None = None,
        progress_bar: bool = False,
    ) -> None:
        self.device, self.dtype, self.variant = device, dtype, variant
        self.recipe_paths: PathMode = recipe_paths
        self.progress, self.progress_bar = progress, progress_bar
        self._lock = threading.Lock()  # one job at a time, whichever thread asks
        self._generator: Generator | None = None
        self._key: tuple[Any, ...] | None = None
        self._applied: tuple[bool, str] = (False, "off")  # (offloaded, fast level) in force on the loaded models
        self._kept: KeptWeights | None = None  # the LoRA deltas kept applied between jobs (made with the first job)

    def run(
        self,
        job: ResolvedJob,
        *,
        progress: ProgressCallback | None = None,
        progress_bar: bool | None = None,
        recipe_paths: PathMode | None = None,
    ) -> Result:
        """Run ``job`` on its models (loaded, offloaded and sped up as it asks); its images, only ``job.keep`` of
        them when it names one."""
        with self._lock:
            generator = self._prepared(job)
            if self._kept is None:
                from ..engine.residency import KeptWeights

                self._kept = KeptWeights()
            generator.kept_weights = self._kept
            try:
                result = generator.run(
                    job.request,
                    progress=progress if progress is not None else self.progress,
                    progress_bar=self.progress_bar if progress_bar is None else progress_bar,
                    recipe_paths=recipe_paths or self.recipe_paths,
                )
            except BaseException:
                self._kept.release()  # a failed job leaves the models as they were before the first
                raise
            finally:
                generator.kept_weights = None
        if job.keep is None:
            return result
        return dataclasses.replace(result, images=[result.images[job.keep]])

    def generator(self, job: ResolvedJob) -> Generator:
        """The loaded models for ``job``, offloaded and sped up as it asks: reused when the last job ran on the same
        models; without the LoRAs kept from the last job (the caller runs them as it likes)."""
        with self._lock:
            generator = self._prepared(job)
            self._release_kept()
            return generator

    def close(self) -> None:
        """Let the loaded models go (and the process caches that served them)."""
        from ..base.caches import clear_caches

        with self._lock:
            self._release_kept()
            if self._generator is not None:
                self._generator, self._key, self._applied = None, None, (False, "off")
                clear_caches()

    def _release_kept(self) -> None:
        """The kept LoRAs off the loaded models: every weight as before the first job."""
        if self._kept is not None:
            self._kept.release()

    def _device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        from ..engine.devices import default_device_and_dtype

        return default_device_and_dtype(self.device, self.dtype)

    def _prepared(self, job: ResolvedJob) -> Generator:
        from ..weights.inventory import ensure
        from .needs import run_needs

        ensure(run_needs(job.request, *job.models))  # every missing model in one message, before anything loads
        offload, level = bool(job.offload), job.fast or "off"
        fast = _fast_path(level, offload, job.weight_storage)  # a fast path that cannot apply is refused before loading
        device, dtype = self._device_and_dtype()
        key = (job.base, job.refiner, job.unet, job.weight_storage)
        if self._generator is None or key != self._key:
            from ..base.caches import clear_caches
            from ..passes.generator import Generator

            self._release_kept()  # other models: the kept LoRAs come off the old ones before they go
            if self._generator is not None:
                # The old set (its ControlNets, encoders, converted weights) goes first: two need not fit at once.
                self._generator, self._key, self._applied = None, None, (False, "off")
                clear_caches()
            # Offloaded models are loaded into CPU memory: loading them onto a small GPU first would not fit.
            self._generator = Generator.from_pretrained(
                job.base, job.refiner, device="cpu" if offload else device, dtype=dtype, variant=self.variant,
                unet=job.unet, weight_storage=job.weight_storage,
            )  # fmt: skip
            self._key, self._applied = key, (False, "off")
        generator = self._generator
        if (offload, level) != self._applied:
            # Patches must not outlive the parameters they were made on (fusing replaces projections): kept LoRAs off.
            self._release_kept()
            # Fused projections cannot follow offloading: the fast path comes off before moving, back on after.
            generator.set_fast_path(None)
            self._applied = (self._applied[0], "off")
            generator.set_offload(device if offload else None)
            self._applied = (offload, "off")
            generator.set_fast_path(fast)
            self._applied = (offload, level)
        return generator


def _fast_path(level: str, offload: bool, weight_storage: str | None) -> FastPath | None:
    """The fast path of ``level`` as it composes with offloading and fp8 storage (checked here, before loading)."""
    from ..passes.generator import _check_storage_and_fast
    from ..protocol.fast import FastPath

    # Fused projections can follow neither offloading nor fp8 storage's per-layer casts.
    fast = FastPath.level(level, fuse_qkv=not (offload or weight_storage))
    if fast is not None and weight_storage is not None:
        _check_storage_and_fast(fast, weight_storage)
    return fast
