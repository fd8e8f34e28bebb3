"""The same batch on a Ray cluster: each worker is an actor holding a :class:`~sdxl_control.jobs.batch.BatchWorker` (its
models loaded once), one GPU each by default, all writing to one folder every worker reaches.

The driver hands each worker one job at a time in group order, so a worker keeps its models while its jobs share
them, and a worker lost mid-job loses only that job's work: Ray restarts the actor and runs the job again. Each
worker reads its job's line again on its own machine, so relative paths and remote inputs resolve where the job
runs. Files are renamed into place only when whole, so a job run twice writes the same file once, and
``results.jsonl``, which only the driver writes, gets one line per job.

Example:
    >>> jobs, _ = read_jobs("jobs.jsonl")                            # doctest: +SKIP
    >>> run_batch_ray(jobs, "/shared/out", address="auto", workers=8)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

from ..base.errors import InvalidRequestError
from ..base.files import PathMode
from .batch import BatchSummary, BatchWorker, drive
from .job_file import Job
from .outputs import Outputs

if TYPE_CHECKING:
    import torch

__all__ = ["run_batch_ray"]

# What workers must see as the driver does: offline mode, the caches that hold models and what files were seen.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "SDXL_CONTROL_CACHE", "INSIGHTFACE_HOME")
TASK_RETRIES = 3


class RayWorker:
    """A Ray actor's state: a :class:`BatchWorker` writing to the batch's output folder.

    Example:
        >>> actor = ray.remote(num_gpus=1)(RayWorker).remote("/shared/out", None, None, "names")   # doctest: +SKIP
        >>> ray.get(actor.run.remote(job))["files"]                                             # doctest: +SKIP
        ['fox-1.png']
    """

    def __init__(self, target: str, device: str | None, dtype: torch.dtype | None, recipe_paths: PathMode) -> None:
        self.worker = BatchWorker(Outputs(target), device=device, dtype=dtype, recipe_paths=recipe_paths)

    def run(self, job: Job) -> dict[str, Any]:
        return self.worker.run(job, read_here=True)


def run_batch_ray(
    jobs: Sequence[Job],
    outputs: Outputs | str | os.PathLike[str],
    *,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    recipe_paths: PathMode = "names",
    progress_bar: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> BatchSummary:
    """Run ``jobs`` on Ray, writing to ``outputs`` (a folder every worker reaches, or a pyarrow filesystem URI).

    ``address`` is the cluster's (``"auto"``, ``"ray://head:10001"``); ``None`` starts a local Ray runtime. Workers
    take one GPU each when the cluster has GPUs (``gpus_per_worker`` changes it), and default to as many as fit.
    """
    try:
        import ray
    except ImportError:
        raise InvalidRequestError("--ray needs Ray: pip install 'sdxl-control[ray]'") from None
    outputs = outputs if isinstance(outputs, Outputs) else Outputs(outputs)
    target = outputs.target

    def on_ray(todo: list[Job]) -> Generator[dict[str, Any], None, None]:
        started_here = not ray.is_initialized()
        if started_here:
            env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
            ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        actors: list[Any] = []
        try:
            gpus = float(ray.cluster_resources().get("GPU", 0))
            per_gpu = gpus_per_worker if gpus_per_worker is not None else (1.0 if gpus else 0.0)
            count = workers or (int(gpus // per_gpu) if per_gpu else 1)
            if count < 1:
                raise InvalidRequestError(f"--workers must be at least 1, got {count}")
            actor = ray.remote(
                num_cpus=cpus_per_worker, num_gpus=per_gpu, max_restarts=-1, max_task_retries=TASK_RETRIES
            )(RayWorker)
            actors = [actor.remote(target, device, dtype, recipe_paths) for _ in range(min(count, len(todo)))]
            yield from _dispatch(ray, actors, todo)
        finally:
            for one in actors:
                ray.kill(one)
            if started_here:
                ray.shutdown()

    return drive(jobs, outputs, on_ray, progress_bar=progress_bar, on_result=on_result)


def _dispatch(ray: Any, actors: list[Any], todo: list[Job]) -> Any:
    """Results as workers finish them; each idle worker takes the next job in group order."""
    queue = list(reversed(todo))
    running: dict[Any, tuple[Any, Job]] = {}
    idle = list(actors)
    while queue or running:
        while idle and queue:
            worker, job = idle.pop(), queue.pop()
            running[worker.run.remote(job)] = (worker, job)
        ready, _ = ray.wait(list(running), num_returns=1)
        worker, job = running.pop(ready[0])
        idle.append(worker)
        try:
            yield ray.get(ready[0])
        except ray.exceptions.RayError as exc:  # the worker died more often than Ray retries a job
            yield {"id": job.id, "line": job.line, "files": [], "error": f"worker lost: {exc}",
                   "error_kind": type(exc).__name__, "exit_code": 1, "seconds": None}  # fmt: skip
