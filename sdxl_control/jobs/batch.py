"""Batches: a job file (JSON Lines, one image request per line) run to a folder of PNGs plus ``results.jsonl``.

A job is written in the recipe's own format, so the recipe of any PNG, and what ``generate --dry-run`` prints, are
valid jobs. A job may also name a ``preset`` with its ``inputs`` and ``set`` (the ``--input`` and ``--set`` of the
command line), its ``models`` (``base``, ``refiner``, ``unet``), an ``id`` (default: its line number) and an
``output`` file name (default ``ID.png``). A job without a seed gets one derived from its id, so a retried or resumed
job makes the same image. Relative paths in a job are relative to the job file's folder; an input given as a URI
(``s3://...``, anything pyarrow reaches) is copied to this machine's cache.

The whole file is checked before any model loads. Jobs run grouped by their models, so a model is loaded once per
group; each finished image is written under a temporary name and renamed, so an interrupted batch leaves no
half-written file, and re-running it skips the jobs whose images exist.

Example:
    >>> jobs, problems = read_jobs("jobs.jsonl")                     # doctest: +SKIP
    >>> summary = run_batch(jobs, "out/")                            # doctest: +SKIP
    >>> summary.done, summary.failed, summary.skipped                # doctest: +SKIP
    (998, 2, 0)
"""

from __future__ import annotations

import collections.abc
import io
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..base.errors import SdxlControlError
from ..base.files import PathMode
from ..records.recipe import RecipeImage
from .job_file import Job, JobProblem, parse_job, read_jobs
from .outputs import Outputs, pending
from .remote_inputs import remote_inputs_peeked, trim_input_cache

if TYPE_CHECKING:
    import torch

    from ..passes.generator import Generator

__all__ = [
    "Job",
    "JobProblem",
    "Outputs",
    "BatchWorker",
    "BatchSummary",
    "read_jobs",
    "parse_job",
    "run_batch",
    "drive",
    "remote_inputs_peeked",
    "trim_input_cache",
]


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class BatchWorker:
    """Runs jobs one at a time into :class:`Outputs` through one :class:`~sdxl_control.jobs.runner.Runner`, which keeps
    the models of the last job loaded: the embedded runner uses one, and each Ray actor holds one.

    Example:
        >>> worker = BatchWorker(Outputs("out"), device="cpu")     # doctest: +SKIP
        >>> worker.run(job)["files"]                               # doctest: +SKIP
        ['fox-1.png']
    """

    def __init__(
        self,
        outputs: Outputs,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        recipe_paths: PathMode = "names",
        progress: Callable[[Any], None] | None = None,
    ) -> None:
        from .runner import Runner

        self.outputs = outputs
        self.runner = Runner(device=device, dtype=dtype, recipe_paths=recipe_paths, progress=progress)

    def generator(self, job: Job) -> Generator:
        """The loaded models for ``job``: reused when the previous job ran on the same ones."""
        return self.runner.generator(job.resolved)

    def run(self, job: Job, *, read_here: bool = False) -> dict[str, Any]:
        """Run ``job`` and write its images; the result line for ``results.jsonl`` (a failure is recorded in it,
        not raised: a batch goes on). ``read_here``: read the job's line again on this machine first (a worker
        elsewhere than the driver, where paths and remote inputs are this machine's to resolve)."""
        started = time.perf_counter()
        result: dict[str, Any] = {"id": job.id, "line": job.line, "files": [], "error": None}
        try:
            job = job.read_here() if read_here else job
            images = self.runner.run(job.resolved).images
            for image, name in zip(images, job.outputs, strict=True):
                self.outputs.write(name, _png(RecipeImage.wrap(image, {**image.recipe, "job": job.fingerprint})))
            result["files"] = list(job.outputs)
            result["job"] = job.fingerprint
            result["seeds"] = [image.recipe["seed"] for image in images]
        except SdxlControlError as exc:
            result.update(error=str(exc), error_kind=type(exc).__name__, exit_code=exc.exit_code)
        except Exception as exc:  # out of device memory, a bug this job's inputs hit: the job fails, not the batch
            result.update(error=f"{type(exc).__name__}: {exc}", error_kind=type(exc).__name__, exit_code=1)
        result["seconds"] = round(time.perf_counter() - started, 3)
        result["worker"] = f"{socket.gethostname()}:{os.getpid()}"
        return result


@dataclass
class BatchSummary:
    """What a batch did: jobs done now, failed, skipped as already complete; the result lines of this run.

    Example:
        >>> summary = run_batch(jobs, "out")                  # doctest: +SKIP
        >>> summary.done, summary.failed, summary.skipped     # doctest: +SKIP
        (10, 0, 2)
    """

    done: int = 0
    failed: int = 0
    skipped: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)


def drive(
    jobs: Sequence[Job],
    outputs: Outputs,
    run: Callable[[list[Job]], collections.abc.Generator[dict[str, Any], None, None]],  # not sdxl's Generator
    *,
    progress_bar: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> BatchSummary:
    """The driver's side of a batch, whatever runs the jobs: skip the complete ones (recording those whose result
    line an interruption lost), hand the rest in group order to ``run`` (a generator of result lines, closed when the
    batch ends or fails), record each result under a progress bar, and leave no temporary file behind."""
    todo, complete = pending(jobs, outputs)
    summary = BatchSummary()
    recorded = {(r.get("id"), r.get("job")) for r in outputs.results() if r.get("error") is None}
    for job in complete:
        summary.skipped += 1
        if (job.id, job.fingerprint) not in recorded:
            outputs.record({"id": job.id, "line": job.line, "files": list(job.outputs), "error": None,
                            "job": job.fingerprint, "seconds": None, "resumed": True})  # fmt: skip
    try:
        if todo:
            with closing(run(todo)) as results:
                for result in _bar(results, len(todo), progress_bar, len(complete)):
                    outputs.record(result)
                    summary.results.append(dict(result))
                    if result.get("error") is None:
                        summary.done += 1
                    else:
                        summary.failed += 1
                    if on_result is not None:
                        on_result(result)
    finally:
        with _interrupts_wait():  # a second Ctrl-C does not cut the cleaning up short
            outputs.remove_partials()  # a worker killed while writing leaves its temporary file
    return summary


@contextmanager
def _interrupts_wait() -> Iterator[None]:
    """Inside the block, Ctrl-C is held back and raised when it ends (main thread only; elsewhere as usual)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def run_batch(
    jobs: Sequence[Job],
    outputs: Outputs | str | os.PathLike[str],
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    recipe_paths: PathMode = "names",
    progress_bar: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[Any], None] | None = None,
) -> BatchSummary:
    """Run ``jobs`` in this process on one device, models loaded once per group; jobs whose images exist are skipped.

    ``on_result`` sees each result line as it is written; ``progress`` is passed to each generation (denoising
    steps, previews)."""
    outputs = outputs if isinstance(outputs, Outputs) else Outputs(outputs)
    worker = BatchWorker(outputs, device=device, dtype=dtype, recipe_paths=recipe_paths, progress=progress)
    return drive(jobs, outputs, lambda todo: (worker.run(job) for job in todo), progress_bar=progress_bar,
                 on_result=on_result)  # fmt: skip


def _bar(results: Iterator[dict[str, Any]], total: int, show: bool, skipped: int) -> Iterator[dict[str, Any]]:
    """Results as they come, under a progress bar over jobs with rate, ETA and failures."""
    from tqdm.auto import tqdm

    failed = 0
    with tqdm(total=total, unit="job", disable=not show, desc="batch", dynamic_ncols=True) as bar:
        if skipped:
            bar.write(f"{skipped} job(s) already complete: skipped")
        for result in results:
            failed += result.get("error") is not None
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(1)
            yield result
