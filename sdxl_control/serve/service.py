"""The server's one worker: resolved jobs run one at a time on one :class:`~sdxl_control.jobs.runner.Runner`, in the
order they came, from a bounded queue; a full queue refuses at once (the HTTP layer answers 503 with ``Retry-After``)
rather than holding a thread per waiting client as A1111 does. A job still queued is dropped when its client goes
away or it is cancelled; a running one stops at its next step (:meth:`JobService.interrupt`, :meth:`Ticket.cancel`).
While a job runs, :meth:`JobService.progress` answers at once with its step and its latest live preview.

Example:
    >>> service = JobService(Runner(device="cpu"), queue_size=4)                 # doctest: +SKIP
    >>> ticket = service.submit(resolve(JobSpec("a fox"), TinyResolver()))       # doctest: +SKIP
    >>> ticket.result(timeout=60).result.images[0].size                          # doctest: +SKIP
    (128, 128)
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..base.defaults import DRAFT_DECODER
from ..base.errors import SdxlControlError

if TYPE_CHECKING:
    from PIL import Image

    from ..engine.loop import ProgressEvent
    from ..jobs.runner import Runner
    from ..jobs.spec import ResolvedJob
    from ..records.recipe import Result

__all__ = ["Jobs", "JobService", "Ticket", "Outcome", "Progress", "ServerBusyError", "JobCancelledError", "describe"]

log = logging.getLogger(__name__)


class ServerBusyError(SdxlControlError):
    """The queue is full: the client should come back after ``retry_after`` seconds (HTTP 503 + Retry-After)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JobCancelledError(SdxlControlError):
    """The job was cancelled (its client went away, or the server is stopping) before it made an image; ``reason``
    says which (``"client"``, ``"shutdown"`` or ``"cancelled"``)."""

    def __init__(self, message: str, reason: str = "cancelled") -> None:
        super().__init__(message)
        self.reason = reason


class _Stop(Exception):
    """Raised from the progress callback to end a running job at its next step."""


@dataclass(frozen=True)
class Outcome:
    """How a job ended: its ``result`` (``None`` when it was stopped before its last step), whether it was
    ``interrupted`` or ``skipped``, and the last live ``preview`` it made (what an interrupted job answers with, as
    A1111 answers an interrupted job with its image as far as it got)."""

    result: Result | None
    interrupted: bool = False
    skipped: bool = False
    preview: Image.Image | None = None
    seconds: float = 0.0


@dataclass(eq=False)
class Ticket:
    """A job in the queue or running: its ``future`` resolves to an :class:`Outcome` or raises the job's error
    (:class:`JobCancelledError` when it was cancelled). Cancelling it, or its ``future``, takes a queued job out of
    the queue at once (its place goes to the next client) and stops a running one at its next step."""

    id: int
    job: ResolvedJob
    label: str
    future: Future[Outcome] = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # The service that queued it (None for a ticket made elsewhere, e.g. by another service with this interface).
    service: JobService | None = field(default=None, repr=False)
    reason: str = field(default="", repr=False)

    def cancel(self, reason: str = "client") -> None:
        """Drop the job if it is still queued; stop it at its next step if it runs. ``reason`` is what its error
        says (``"client"``: its client went away; ``"shutdown"``: the server is stopping)."""
        if not self.cancelled.is_set():
            self.reason = reason
            self.cancelled.set()
        if self.service is not None:
            self.service._drop(self)

    def result(self, timeout: float | None = None) -> Outcome:
        return self.future.result(timeout)


@dataclass(frozen=True)
class Progress:
    """What ``GET /sdapi/v1/progress`` reports: the running job's share done (0..1), the estimated share of its time
    still to go relative to the time so far, its step, how many jobs are queued or running, and its latest preview."""

    progress: float = 0.0
    eta_relative: float = 0.0
    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    skipped: bool = False
    job_timestamp: str = "0"
    current_image: Image.Image | None = None
    text: str | None = None


_CANCELLED = {
    "client": "its client went away",
    "shutdown": "the server is shutting down",
    "cancelled": "it was cancelled",
}


def describe(ticket: Ticket, outcome: Outcome | BaseException) -> str:
    """The server's log line for a job that ended: ``job 3 txt2img: 4 images 1024x1024, 30 steps, 12.3 s``, or
    how it ended otherwise (refused, cancelled, interrupted, failed: why).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> job = NS(request=NS(num_images=4, size=(1024, 1024), steps=30, hires_steps=None, hires_scale=None))
        >>> describe(Ticket(3, job, "txt2img"), Outcome(result=NS(images=[1, 2, 3, 4]), seconds=12.34))
        'job 3 txt2img: 4 images 1024x1024, 30 steps, 12.3 s'
        >>> describe(Ticket(4, job, "txt2img"), ServerBusyError("the queue is full", retry_after=30))
        'job 4 txt2img: refused (the queue is full)'
    """
    request = ticket.job.request
    width, height = request.size
    steps = f"{request.steps} steps"
    if getattr(request, "hires_scale", None):
        steps += f" + {request.hires_steps or request.steps} hires steps"
    head = f"job {ticket.id} {ticket.label}"
    if isinstance(outcome, ServerBusyError):
        return f"{head}: refused ({outcome})"
    if isinstance(outcome, JobCancelledError):
        return f"{head}: cancelled ({outcome})"
    if isinstance(outcome, BaseException):
        return f"{head}: failed: {type(outcome).__name__}: {outcome}"
    if outcome.result is None:
        how = "interrupted" if outcome.interrupted else "skipped" if outcome.skipped else "stopped"
        return f"{head}: {how} after {outcome.seconds:.1f} s ({width}x{height}, {steps})"
    count = len(outcome.result.images)
    return f"{head}: {count} image{'s' * (count != 1)} {width}x{height}, {steps}, {outcome.seconds:.1f} s"


class Jobs(Protocol):
    """What the routes run jobs through: :class:`JobService` on one machine, a Ray-backed service across replicas
    (:class:`~sdxl_control.serve.ray_serve.RayJobService`). Both answer each submitted job through its ticket's future.

    Example:
        >>> app = create_app(config, service=RayJobService(handle))  # doctest: +SKIP
    """

    seconds_per_job: float

    def submit(self, job: ResolvedJob, label: str = "txt2img") -> Ticket: ...

    def queued(self) -> int: ...

    def interrupt(self) -> None: ...

    def skip(self) -> None: ...

    def progress(self) -> Progress: ...

    def close(self, timeout: float | None = None) -> None: ...


class JobService:
    """One worker thread running queued jobs on ``runner``, at most ``queue_size`` waiting besides the one running;
    previews every ``preview_every`` steps, decoded by ``preview_decoder`` (the colours of the latents where its
    weights are missing). ``on_job`` is told of each job's end, refused, cancelled, failed or done (the server's log
    line: :func:`describe`).

    Example:
        >>> service = JobService(Runner(device="cpu"), queue_size=2)                        # doctest: +SKIP
        >>> service.progress().job_count                                                   # doctest: +SKIP
        0
    """

    def __init__(
        self,
        runner: Runner,
        *,
        queue_size: int = 8,
        preview_every: int = 5,
        preview_decoder: str | None = DRAFT_DECODER,
        seconds_per_job: float = 30.0,
        on_job: Callable[[Ticket, Outcome | BaseException], None] | None = None,
        progress_bar: bool = True,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.runner = runner
        self.queue_size = queue_size
        self.preview_every, self.preview_decoder = preview_every, preview_decoder
        self.seconds_per_job = seconds_per_job  # Retry-After's estimate until a job has been timed
        self.on_job, self.progress_bar = on_job, progress_bar
        # One lock over the queue, the running ticket and its state: the worker, the routes' threads and the event
        # loop all take it, briefly. A deque (not queue.Queue) so a cancelled job leaves its place at once.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Ticket] = deque()
        self._ids = itertools.count(1)
        self._running: Ticket | None = None
        self._state = Progress()
        self._started = 0.0
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="sdxl-control-jobs", daemon=True)
        self._worker.start()

    # -- what the routes call -------------------------------------------------------------------------------------

    def submit(self, job: ResolvedJob, label: str = "txt2img") -> Ticket:
        """Queue ``job``; a full queue (or a closing server) raises :class:`ServerBusyError` at once."""
        ticket = Ticket(next(self._ids), job, label, service=self)
        with self._lock:
            waiting = len(self._waiting) + (self._running is not None)
            if self._closed:
                refused = ServerBusyError("the server is shutting down", retry_after=self._retry_after(1))
            elif len(self._waiting) >= self.queue_size:
                refused = ServerBusyError(
                    f"the queue is full ({self.queue_size} jobs waiting): try again later",
                    retry_after=self._retry_after(waiting),
                )
            else:
                self._waiting.append(ticket)
                self._wake.notify()
                refused = None
        if refused is not None:
            self._report(ticket, refused)
            raise refused
        # A caller may cancel the future itself (asyncio.wrap_future does when its awaiting task is cancelled).
        ticket.future.add_done_callback(_cancelled_through_future(ticket))
        return ticket

    def queued(self) -> int:
        """Jobs waiting or running."""
        with self._lock:
            return len(self._waiting) + (self._running is not None)

    def interrupt(self) -> None:
        """Stop the running job at its next step (A1111's Interrupt); queued jobs run as usual."""
        with self._lock:
            if self._running is not None:
                self._interrupt.set()

    def skip(self) -> None:
        """Stop the running job at its next step, as A1111's Skip (which goes on to the next of a job's ``n_iter``
        batches; a job here is one batch)."""
        with self._lock:
            if self._running is not None:
                self._skip.set()

    def progress(self) -> Progress:
        """The running job's progress (an idle server: all zero, ``job_count`` 0)."""
        with self._lock:
            state, running, started = self._state, self._running, self._started
            count = len(self._waiting) + (running is not None)
        if running is None:
            return Progress(job_count=count)
        elapsed = time.monotonic() - started
        eta = elapsed / state.progress - elapsed if state.progress > 0 else 0.0
        return Progress(
            progress=state.progress,
            eta_relative=eta,
            job=state.job,
            job_count=count,
            job_no=state.job_no,
            sampling_step=state.sampling_step,
            sampling_steps=state.sampling_steps,
            interrupted=self._interrupt.is_set(),
            skipped=self._skip.is_set(),
            job_timestamp=state.job_timestamp,
            current_image=state.current_image,
            text=state.text,
        )

    @property
    def closed(self) -> bool:
        """Whether the service refuses new jobs (:meth:`shutdown` or :meth:`close` was called)."""
        return self._closed

    def shutdown(self) -> None:
        """Refuse new jobs, cancel the queued ones and stop the running one at its next step, without waiting: each
        of their clients is answered (:class:`JobCancelledError`, reason ``"shutdown"``). Safe to call again."""
        with self._lock:
            self._closed = True
            dropped = list(self._waiting)
            self._waiting.clear()
            running = self._running
            self._wake.notify_all()
        for ticket in dropped:
            ticket.reason = ticket.reason or "shutdown"
            ticket.cancelled.set()
            self._settle(ticket, JobCancelledError(f"job {ticket.id} was cancelled: {_reason(ticket)}", "shutdown"))
        if running is not None:
            running.cancel("shutdown")

    def close(self, timeout: float | None = None) -> None:
        """:meth:`shutdown`, then wait (up to ``timeout`` seconds) for the worker to end."""
        self.shutdown()
        if self._worker is not threading.current_thread():
            self._worker.join(timeout)

    # -- the worker -----------------------------------------------------------------------------------------------

    def _retry_after(self, jobs: int) -> int:
        return max(1, round(max(jobs, 1) * self.seconds_per_job))

    def _drop(self, ticket: Ticket) -> None:
        """A cancelled ticket: out of the queue and answered if it waited there (a running one stops at its step)."""
        with self._lock:
            try:
                self._waiting.remove(ticket)
            except ValueError:
                return  # running (the worker answers it), or already done
        self._settle(ticket, JobCancelledError(f"job {ticket.id} was cancelled: {_reason(ticket)}", ticket.reason))

    def _settle(self, ticket: Ticket, outcome: Outcome | BaseException) -> None:
        """Answer ``ticket`` once (whoever comes first: the worker, a cancel, a shutdown) and report it."""
        try:
            if isinstance(outcome, BaseException):
                ticket.future.set_exception(outcome)
            else:
                ticket.future.set_result(outcome)
        except InvalidStateError:  # answered already, or its future was cancelled by its caller
            if not ticket.future.cancelled():
                return
        self._report(ticket, outcome)

    def _report(self, ticket: Ticket, outcome: Outcome | BaseException) -> None:
        if self.on_job is not None:
            try:
                self.on_job(ticket, outcome)
            except Exception:  # a log line must not stop the worker
                log.exception("reporting job %d", ticket.id)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if not self._waiting:
                    return  # closed, and nothing left
                ticket = self._waiting.popleft()
                if ticket.cancelled.is_set() or not ticket.future.set_running_or_notify_cancel():
                    runs = False  # cancelled through its future: answered already
                else:
                    runs = True
                    self._running, self._started = ticket, time.monotonic()
                    self._state = Progress(job=ticket.label, job_count=1, job_timestamp=time.strftime("%Y%m%d%H%M%S"))
                    # An interrupt that came while nothing ran (or for the last job) is not this job's.
                    self._interrupt.clear()
                    self._skip.clear()
            if not runs:
                self._report(
                    ticket, JobCancelledError(f"job {ticket.id}: {_reason(ticket)}", ticket.reason or "cancelled")
                )
                continue
            outcome: Outcome | BaseException
            try:
                outcome = self._run(ticket)
            except BaseException as exc:  # the job's error goes to its client; the worker lives on
                outcome = exc
            finally:
                with self._lock:
                    self._running, self._state = None, Progress()
            if isinstance(outcome, Outcome) and outcome.result is not None and outcome.seconds > 0:
                self.seconds_per_job = 0.7 * self.seconds_per_job + 0.3 * outcome.seconds
            self._settle(ticket, outcome)

    def _run(self, ticket: Ticket) -> Outcome:
        from ..engine.preview import Previews

        last: list[Image.Image] = []

        def show(image: Image.Image, event: ProgressEvent) -> None:
            last[:] = [image]
            with self._lock:
                self._state = _replace(self._state, current_image=image)

        def step(event: ProgressEvent) -> None:
            with self._lock:
                self._state = _replace(
                    self._state,
                    progress=min(1.0, (event.index + 1) / max(event.total, 1)),
                    sampling_step=event.step,
                    sampling_steps=event.steps,
                    text=f"{event.stage.label}: step {event.step} of {event.steps}",
                )
            if ticket.cancelled.is_set() or self._interrupt.is_set() or self._skip.is_set():
                raise _Stop()

        started = time.monotonic()
        previews = Previews(show, every=self.preview_every, decoder=self.preview_decoder, then=step)
        try:
            if ticket.cancelled.is_set():  # cancelled between leaving the queue and starting
                raise _Stop()
            # The Runner takes the kept LoRAs off on any error, so a stopped job leaves the models as they were.
            result = self.runner.run(ticket.job, progress=previews, progress_bar=self.progress_bar)
        except _Stop:
            if ticket.cancelled.is_set():
                raise JobCancelledError(
                    f"job {ticket.id} was stopped: {_reason(ticket)}", ticket.reason or "cancelled"
                ) from None
            return Outcome(
                None,
                interrupted=self._interrupt.is_set(),
                skipped=self._skip.is_set(),
                preview=last[0] if last else None,
                seconds=time.monotonic() - started,
            )
        return Outcome(result, preview=last[0] if last else None, seconds=time.monotonic() - started)


def _cancelled_through_future(ticket: Ticket) -> Callable[[Future[Outcome]], None]:
    def done(future: Future[Outcome]) -> None:
        if future.cancelled():
            ticket.cancel("cancelled")

    return done


def _reason(ticket: Ticket) -> str:
    return _CANCELLED.get(ticket.reason, ticket.reason or _CANCELLED["cancelled"])


def _replace(state: Progress, **changes: Any) -> Progress:
    import dataclasses

    return dataclasses.replace(state, **changes)
