"""``sdxl-control serve --ray``: the same app as a Ray Serve application, for more than one device or machine.

Two deployments:

- the **ingress** (one replica, no GPU): the very app :func:`~sdxl_control.serve.app.create_app` makes, every route
  as on one machine, on a :class:`RayJobService` instead of the local job service. It translates and resolves each
  request, then hands the resolved job to
- the **models** deployment: one replica per GPU (``gpus_per_replica``, one by default where the cluster has GPUs),
  each one :class:`~sdxl_control.jobs.runner.Runner` behind a local
  :class:`~sdxl_control.serve.service.JobService`, one job at a time (``max_ongoing_requests=1``). Its replicas scale
  between ``min_replicas`` and ``max_replicas`` on the requests each has running or waiting for it
  (``target_ongoing_requests``, Ray Serve's autoscaling signal); the requests no replica can take yet wait in the
  ingress's queue, at most ``max_queued_requests`` (the server's ``--queue-size``): one more is refused with 503 and
  ``Retry-After``, as on one machine.

Each job is sent with its base model's source as Ray Serve's multiplexed model id, so it goes to a replica that
already holds that model where one is free (a replica holds the one model set its Runner keeps, and says so to
Serve's router; a job for another model goes to the replica holding the fewest, which then switches).

The replica running a job streams its progress (step, live preview) back to the ingress while it runs, so
``/sdapi/v1/progress`` answers from the ingress at once. Interrupt and skip cancel the running jobs' requests: each
replica stops its job at the next step, and the ingress answers with what it made so far, as on one machine. A
client that goes away cancels its request the same way. One ingress replica knows the jobs it sent (the default:
one); with several, each reports and stops its own.

Example:
    >>> from sdxl_control.jobs.resolvers import TinyResolver
    >>> app = application(ServeConfig(resolver=TinyResolver(), device="cpu"), RayOptions(max_replicas=2))  # doctest: +SKIP
    >>> serve.run(app, name="sdxl-control", route_prefix="/")                                      # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..base.errors import InvalidRequestError
from .app import ServeConfig
from .service import JobCancelledError, Outcome, Progress, ServerBusyError, Ticket

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ..jobs.spec import ResolvedJob

__all__ = ["RayOptions", "RayJobService", "RayTicket", "application", "serve_on_ray", "APP_NAME", "MODELS"]

log = logging.getLogger(__name__)

APP_NAME = "sdxl-control"
INGRESS, MODELS = "sdxl-control-ingress", "sdxl-control-models"
PROGRESS_EVERY_S = 0.25  # how often a replica looks at its job's progress (and streams it when it changed)


@dataclass(frozen=True)
class RayOptions:
    """How ``serve --ray`` deploys: the cluster's ``address`` (None: a local Ray runtime, ``"auto"``: the running
    cluster), the model replicas' bounds (``max_replicas`` None: one replica per GPU of the cluster, at least
    ``min_replicas``) and scaling target (requests running or waiting per replica), the queue of requests no replica
    can take yet (None: the server's ``--queue-size``), each replica's GPUs (None: one where the cluster has GPUs,
    else none) and CPUs, and the HTTP proxy's host and port. The last four are Ray Serve's autoscaling pace: how long
    the load must stay above (below) the target before a replica is added (removed), how often the load is reported,
    and over how long a window it is averaged (Ray's defaults but the delays; a test makes them short).

    Example:
        >>> RayOptions(max_replicas=4).autoscaling(gpus_in_cluster=0)["max_replicas"]
        4
        >>> RayOptions().autoscaling(gpus_in_cluster=8, gpus_per_replica=1)["max_replicas"]
        8
    """

    address: str | None = None
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 1.0
    max_queued_requests: int | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0
    host: str = "127.0.0.1"
    port: int = 8000
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 300.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= (self.max_replicas or self.min_replicas):
            raise InvalidRequestError(
                f"--min-replicas {self.min_replicas} / --max-replicas {self.max_replicas}: need 1 <= min <= max"
            )
        if self.target_ongoing_requests <= 0:
            raise InvalidRequestError(f"--target-ongoing-requests must be > 0, got {self.target_ongoing_requests}")

    def autoscaling(self, gpus_in_cluster: float, gpus_per_replica: float = 1.0) -> dict[str, Any]:
        """Ray Serve's ``autoscaling_config``: replicas by the requests each has running or waiting."""
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": self.min_replicas,
            "max_replicas": self.most_replicas(gpus_in_cluster, gpus_per_replica),
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
        }

    def most_replicas(self, gpus_in_cluster: float, gpus_per_replica: float = 1.0) -> int:
        """``max_replicas``, or one replica per GPU of the cluster (at least ``min_replicas``)."""
        if self.max_replicas is not None:
            return self.max_replicas
        per_gpu = int(gpus_in_cluster // gpus_per_replica) if gpus_per_replica > 0 else 0
        return max(self.min_replicas, per_gpu)


@dataclass
class RayTicket(Ticket):
    """A job sent to the model replicas. Its replica streams its ``progress`` while it runs; cancelling it cancels its
    Serve request (queued: dropped; running: the replica stops it at its next step). ``replica`` is the one that
    answered; ``stop`` says why the ingress stopped it (``"interrupt"``, ``"skip"``)."""

    response: Any = None
    progress: Progress | None = None
    replica: str | None = None
    stop: str | None = None
    started: float = 0.0

    def cancel(self, reason: str = "client") -> None:
        super().cancel(reason)
        if self.response is not None:
            self.response.cancel()


@dataclass(frozen=True)
class _Answer:
    """What a replica sends back last: the outcome (its images with their recipes), and who ran it."""

    outcome: Outcome
    replica: str
    model: str


class RayJobService:
    """The ingress's job service (:class:`~sdxl_control.serve.service.JobService`'s interface): each job goes to the
    model replicas through ``handle`` (a Serve handle to the models deployment), routed by its base model's source;
    the replica running it streams its progress back, then its outcome.

    Example:
        >>> service = RayJobService(serve.get_deployment_handle(MODELS, APP_NAME))       # doctest: +SKIP
        >>> service.submit(job).result(timeout=60).result.images[0].size                   # doctest: +SKIP
        (64, 64)
    """

    def __init__(self, handle: Any, *, seconds_per_job: float = 30.0, replicas: int = 1) -> None:
        self.handle = handle
        self.seconds_per_job = seconds_per_job  # Retry-After's estimate until a job has been timed
        self.replicas = replicas
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._tickets: dict[int, RayTicket] = {}
        self._closed = False

    def submit(self, job: ResolvedJob, label: str = "txt2img") -> RayTicket:
        """Send ``job`` to a replica holding its model. A full queue raises :class:`ServerBusyError` through the
        ticket's future (Serve refuses a request when it routes it, after this returns)."""
        with self._lock:
            if self._closed:
                raise ServerBusyError("the server is shutting down", retry_after=round(self.seconds_per_job))
            ticket = RayTicket(next(self._ids), job, label)
            self._tickets[ticket.id] = ticket
        ticket.future.set_running_or_notify_cancel()  # only this service ends it (an asyncio wrapper cannot cancel it)
        streaming = self.handle.options(multiplexed_model_id=job.base, stream=True)
        ticket.response = streaming.run.remote(job, label)
        threading.Thread(target=self._wait, args=(ticket,), name=f"sdxl-control-ray-{ticket.id}", daemon=True).start()
        return ticket

    def _wait(self, ticket: RayTicket) -> None:
        from ray.serve.exceptions import BackPressureError

        outcome: Outcome | BaseException | None = None
        try:
            for item in ticket.response:  # progress while it runs, then the answer
                if isinstance(item, Progress):
                    ticket.started = ticket.started or time.monotonic()
                    ticket.progress = item
                else:
                    outcome, ticket.replica = item.outcome, item.replica
        except BackPressureError as exc:
            outcome = ServerBusyError(
                f"the queue is full ({exc.message}): try again later", retry_after=self._retry_after(exc)
            )
        except BaseException as exc:  # the job's own error (a RayTaskError is also an instance of its cause)
            outcome = exc
        finally:
            with self._lock:
                self._tickets.pop(ticket.id, None)
        if ticket.stop is not None and not isinstance(outcome, Outcome):
            # stopped by interrupt / skip (not finished first): what it made so far, as the local service answers
            outcome = Outcome(
                None,
                interrupted=ticket.stop == "interrupt",
                skipped=ticket.stop == "skip",
                preview=ticket.progress.current_image if ticket.progress is not None else None,
                seconds=time.monotonic() - ticket.started if ticket.started else 0.0,
            )
        elif ticket.cancelled.is_set() and not isinstance(outcome, Outcome):
            outcome = JobCancelledError("the client went away")
        elif outcome is None:
            outcome = JobCancelledError("the model replica ended without an answer")
        if isinstance(outcome, Outcome):
            if outcome.seconds > 0 and ticket.stop is None:
                self.seconds_per_job = 0.7 * self.seconds_per_job + 0.3 * outcome.seconds
            ticket.future.set_result(outcome)
        else:
            ticket.future.set_exception(outcome)

    def _retry_after(self, exc: Any) -> int:
        if exc.retry_after_s is not None:
            return max(1, round(exc.retry_after_s))
        return max(1, round(self.queued() * self.seconds_per_job / max(self.replicas, 1)))

    def queued(self) -> int:
        """Jobs this ingress has sent that are waiting or running."""
        with self._lock:
            return len(self._tickets)

    def _running(self) -> list[RayTicket]:
        """The jobs a replica runs now, oldest first."""
        with self._lock:
            return [ticket for ticket in self._tickets.values() if ticket.progress is not None]

    def progress(self) -> Progress:
        """The oldest running job's progress as its replica last streamed it, with ``job_count`` the jobs waiting
        or running; none running: all zero."""
        with self._lock:
            count = len(self._tickets)
        running = self._running()
        now = running[0].progress if running else None
        if now is None:
            return Progress(job_count=count)
        ticket = running[0]
        return replace(
            now,
            job_count=count,
            interrupted=ticket.stop == "interrupt",
            skipped=ticket.stop == "skip",
        )

    def interrupt(self) -> None:
        """Stop the running jobs at their next step (A1111's Interrupt): each ends with what it made so far;
        queued ones run as usual."""
        self._stop("interrupt")

    def skip(self) -> None:
        """As :meth:`interrupt` (A1111's Skip, which goes on to the next of a job's batches; a job here is one)."""
        self._stop("skip")

    def _stop(self, why: str) -> None:
        for ticket in self._running():
            ticket.stop = ticket.stop or why
            ticket.response.cancel()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs and cancel those sent (queued ones are dropped, running ones stop at their next step)."""
        with self._lock:
            self._closed = True
            tickets = list(self._tickets.values())
        for ticket in tickets:
            ticket.cancel()
        deadline = None if timeout is None else time.monotonic() + timeout
        for ticket in tickets:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ticket.future.exception(left)
            except Exception:  # a timeout: the replica ends it on its own
                pass


class ModelReplica:
    """One model replica's state: one Runner behind a local job service (so a job runs, reports progress and stops
    here as it does on one machine), and what it loaded and ran (its own counters: :meth:`served`)."""

    def __init__(self, config: ServeConfig) -> None:
        from ..jobs.runner import Runner
        from .service import JobService

        self.service = JobService(
            Runner(device=config.device),
            queue_size=2,  # Serve sends one job at a time; a stopped job may still be ending when the next comes
            preview_every=config.preview_every,
            preview_decoder=config.preview_decoder,
            progress_bar=config.progress_bar,
        )
        self.loaded: list[str] = []
        self.jobs: Counter[str] = Counter()
        self.stopped = 0

    def name(self) -> str:
        from ray import serve

        try:
            return f"{serve.get_replica_context().replica_id.unique_id}:{os.getpid()}"
        except Exception:  # outside a replica (a unit test of this class)
            return f"local:{os.getpid()}"

    async def run_job(self, model: str, job: ResolvedJob, label: str) -> AsyncIterator[Progress | _Answer]:
        """Run ``job`` here: its progress at once, then each time it changes (at most every
        :data:`PROGRESS_EVERY_S`), then its answer. Cancelled (its client went away, or the ingress stopped it): the job stops at its next step."""
        ticket = self.service.submit(job, label)
        waiting = asyncio.wrap_future(ticket.future)
        waiting.add_done_callback(lambda done: done.cancelled() or done.exception())  # read, even if nobody waits
        try:
            yield self.service.progress()  # it is here: from now on the ingress counts it as running
            shown: tuple[int, int] | None = None
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=PROGRESS_EVERY_S)
                now = self.service.progress()
                if now.sampling_steps and (now.sampling_step, id(now.current_image)) != shown:
                    shown = (now.sampling_step, id(now.current_image))
                    yield now
            outcome = waiting.result()
        finally:
            if not waiting.done():  # cancelled: stop the job, never its future (the worker thread ends it)
                ticket.cancel()
                self.stopped += 1
        self.jobs[model] += 1
        yield _Answer(outcome, self.name(), model)

    def served(self) -> dict[str, Any]:
        """What this replica loaded (the models Serve was told it holds, in order), the jobs it ran by model, and
        how many were stopped before their end (interrupted, skipped, or their client gone)."""
        return {"replica": self.name(), "loaded": list(self.loaded), "jobs": dict(self.jobs), "stopped": self.stopped}


def application(config: ServeConfig, options: RayOptions | None = None) -> Any:
    """The Serve application (ingress + models) serving ``config``: give it to ``serve.run``."""
    from ray import serve

    options = options or RayOptions()
    import ray

    in_cluster = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    gpus = options.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if in_cluster else 0.0
    most = options.most_replicas(in_cluster, gpus)
    env = {name: os.environ[name] for name in _forwarded_env() if name in os.environ}

    class Models(ModelReplica):
        @serve.multiplexed(max_num_models_per_replica=1)
        async def hold(self, model: str) -> str:
            # The Runner loads a job's models on its first job and keeps them; what Serve needs here is the model
            # this replica holds (its router sends that model's jobs here), and one at a time, as the Runner does.
            self.loaded.append(model)
            return model

        async def run(self, job: ResolvedJob, label: str) -> AsyncIterator[Progress | _Answer]:
            model = await self.hold(serve.get_multiplexed_model_id() or job.base)
            async for item in self.run_job(model, job, label):
                yield item

    models = serve.deployment(
        name=MODELS,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": gpus, "runtime_env": {"env_vars": env}},
        max_ongoing_requests=1,  # one job at a time per device; more wait in the ingress's bounded queue
        max_queued_requests=options.max_queued_requests or config.queue_size,
        autoscaling_config=options.autoscaling(in_cluster, gpus),
        graceful_shutdown_timeout_s=30,
    )(Models)

    @serve.ingress()
    class Ingress:
        def __init__(self, config: ServeConfig, handle: Any, replicas: int) -> None:
            self.config, self.handle, self.replicas = config, handle, replicas

        def __serve_build_asgi_app__(self) -> Any:
            from .app import create_app

            self.service = RayJobService(self.handle, replicas=self.replicas)
            return create_app(self.config, service=self.service)

        def __del__(self) -> None:  # the replica stops: its jobs are cancelled, as one machine's server does
            service = getattr(self, "service", None)
            if service is not None:
                service.close(timeout=10)

    ingress = serve.deployment(
        name=INGRESS, ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}}, max_ongoing_requests=1000
    )(Ingress)
    return ingress.bind(config, models.bind(config), most)


def _forwarded_env() -> tuple[str, ...]:
    from ..jobs.ray_batch import FORWARDED_ENV

    return FORWARDED_ENV


def serve_on_ray(config: ServeConfig, options: RayOptions, *, stop: threading.Event | None = None) -> int:
    """Deploy :func:`application` (starting a local Ray runtime unless ``options.address`` names a cluster or Ray is
    already initialised) and serve until ``stop`` is set or the process is interrupted (Ctrl-C, SIGTERM); then shut
    down the runtime it started, or delete only this application from a cluster it joined."""
    import signal

    try:
        import ray
        from ray import serve
    except ImportError:
        raise InvalidRequestError("--ray needs Ray Serve: pip install 'sdxl-control[serve-ray]'") from None
    stop = stop or threading.Event()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=options.address, include_dashboard=False)
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        serve.run(application(config, options), name=APP_NAME, route_prefix="/")
        log.info("serving on http://%s:%d (Ray Serve)", options.host, options.port)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        if started_here:  # our own runtime: all of it goes
            serve.shutdown()
            ray.shutdown()
        else:  # a cluster's: only this application, whatever else it serves
            serve.delete(APP_NAME)
    return 0
