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
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..base.defaults import DRAFT_DECODER
from ..base.errors import SdxlControlError

if TYPE_CHECKING:
    from PIL import Image

    from ..engine.loop import ProgressEvent
    from ..jobs.runner import Runner
    from ..jobs.spec import ResolvedJob
    from ..records.recipe import Result

__all__ = ["JobService", "Ticket", "Outcome", "Progress", "ServerBusyError", "JobCancelledError"]

log = logging.getLogger(__name__)


class ServerBusyError(SdxlControlError):
    """The queue is full: the client should come back after ``retry_after`` seconds (HTTP 503 + Retry-After)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JobCancelledError(SdxlControlError):
    """The job was cancelled (its client went away, or the server is stopping) before it made an image."""


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


@dataclass
class Ticket:
    """A job in the queue or running: its ``future`` resolves to an :class:`Outcome` or raises the job's error."""

    id: int
    job: ResolvedJob
    label: str
    future: Future[Outcome] = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Drop the job if it is still queued; stop it at its next step if it runs."""
        self.cancelled.set()

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


class JobService:
    """One worker thread running queued jobs on ``runner``, at most ``queue_size`` waiting; previews every
    ``preview_every`` steps, decoded by ``preview_decoder`` (the colours of the latents where its weights are
    missing). ``on_job`` is told of each job's end (the server's log line).

    Example:
        >>> service = JobService(Runner(device="cpu"), queue_size=2)                        # doctest: +SKIP
        >>> service.progress().job_count
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
        self._queue: queue.Queue[Ticket | None] = queue.Queue(maxsize=queue_size)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
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
        ticket = Ticket(next(self._ids), job, label)
        with self._lock:
            if self._closed:
                raise ServerBusyError("the server is shutting down", retry_after=int(self.seconds_per_job))
            try:
                self._queue.put_nowait(ticket)
            except queue.Full:
                waiting = self._queue.qsize() + (self._running is not None)
                raise ServerBusyError(
                    f"the queue is full ({self.queue_size} jobs waiting): try again later",
                    retry_after=max(1, round(waiting * self.seconds_per_job)),
                ) from None
        return ticket

    def queued(self) -> int:
        """Jobs waiting or running."""
        return self._queue.qsize() + (self._running is not None)

    def interrupt(self) -> None:
        """Stop the running job at its next step (A1111's Interrupt); queued jobs run as usual."""
        if self._running is not None:
            self._interrupt.set()

    def skip(self) -> None:
        """Stop the running job at its next step, as A1111's Skip (which goes on to the next of a job's ``n_iter``
        batches; a job here is one batch)."""
        if self._running is not None:
            self._skip.set()

    def progress(self) -> Progress:
        """The running job's progress (an idle server: all zero, ``job_count`` 0)."""
        with self._lock:
            state = self._state
            count = self._queue.qsize() + (self._running is not None)
        if self._running is None:
            return Progress(job_count=count)
        elapsed = time.monotonic() - self._started
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

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, cancel the queued ones, stop the running one at its next step and wait for the worker."""
        with self._lock:
            self._closed = True
        while True:
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket is not None:
                ticket.future.set_exception(JobCancelledError("the server is shutting down"))
        if self._running is not None:
            self._running.cancel()
        self._queue.put(None)
        self._worker.join(timeout)

    # -- the worker -----------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            ticket = self._queue.get()
            if ticket is None:
                return
            if ticket.cancelled.is_set():  # its client went away while it waited
                ticket.future.set_exception(JobCancelledError("cancelled while queued"))
                continue
            ticket.future.set_running_or_notify_cancel()
            outcome: Outcome | BaseException
            try:
                outcome = self._run(ticket)
                ticket.future.set_result(outcome)
            except BaseException as exc:  # the job's error goes to its client; the worker lives on
                outcome = exc
                ticket.future.set_exception(exc)
            finally:
                with self._lock:
                    self._running, self._state = None, Progress()
                self._interrupt.clear()
                self._skip.clear()
            if isinstance(outcome, Outcome) and outcome.seconds > 0:
                self.seconds_per_job = 0.7 * self.seconds_per_job + 0.3 * outcome.seconds
            if self.on_job is not None:
                try:
                    self.on_job(ticket, outcome)
                except Exception:  # a log line must not stop the worker
                    log.exception("reporting job %d", ticket.id)

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
        with self._lock:
            self._running, self._started = ticket, started
            self._state = Progress(job=ticket.label, job_count=1, job_timestamp=time.strftime("%Y%m%d%H%M%S"))
        previews = Previews(show, every=self.preview_every, decoder=self.preview_decoder, then=step)
        try:
            result = self.runner.run(ticket.job, progress=previews, progress_bar=self.progress_bar)
        except _Stop:
            if ticket.cancelled.is_set():
                raise JobCancelledError("cancelled while it ran") from None
            return Outcome(
                None,
                interrupted=self._interrupt.is_set(),
                skipped=self._skip.is_set(),
                preview=last[0] if last else None,
                seconds=time.monotonic() - started,
            )
        return Outcome(result, preview=last[0] if last else None, seconds=time.monotonic() - started)


def _replace(state: Progress, **changes: Any) -> Progress:
    import dataclasses

    return dataclasses.replace(state, **changes)
