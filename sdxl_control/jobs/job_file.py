"""Job files: JSON Lines, one image request per line, in the recipe's own format (so a PNG's recipe and what
``generate --dry-run`` prints are valid jobs), read and checked whole before any model loads.

Example:
    >>> job = parse_job({"prompt": "a red fox", "seed": 3, "steps": 4}, line=1)
    >>> job.id, job.outputs
    ('1', ('1.png',))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.errors import InputError, InvalidRequestError, SdxlControlError
from ..base.files import Locator, PathMode, is_ref, portable
from ..base.model_refs import ModelRef
from ..base.validation import unknown_keys
from ..records.recipe import json_text
from .resolvers import HubResolver, Resolver
from .spec import JobSpec

if TYPE_CHECKING:
    from ..passes.generator import GenerationRequest
    from .spec import ResolvedJob
from .remote_inputs import fetched_input, is_uri

__all__ = ["JOB_KEYS", "Job", "JobProblem", "job_line", "parse_job", "read_jobs"]


# Keys a job has besides the request's fields (and, for a PNG's recipe, the recipe's record keys).
JOB_KEYS = frozenset({"id", "output", "preset", "inputs", "set", "models"})


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class JobProblem:
    """A job that cannot run, found while the file is read: its line, its id when it has one, what is wrong.

    Example:
        >>> str(JobProblem(4, "the job has unknown key(s) 'stesp'", "fox"))
        "line 4 (fox): the job has unknown key(s) 'stesp'"
    """

    line: int
    message: str
    id: str | None = None

    def __str__(self) -> str:
        return f"line {self.line}{f' ({self.id})' if self.id else ''}: {self.message}"


@dataclass(frozen=True)
class Job:
    """One checked line of a job file: the request, the models it runs on and the files it writes.

    ``keep`` is set for a PNG's recipe from a batch of several images: the batch is re-run (its arithmetic is what
    made the image) and only that image is kept.

    Example:
        >>> job = parse_job({"prompt": "a red fox", "seed": 3, "steps": 4}, line=1)
        >>> job.id, job.outputs
        ('1', ('1.png',))
    """

    id: str
    line: int
    request: GenerationRequest
    base: str
    refiner: str | None = None
    unet: ModelRef | None = None
    outputs: tuple[str, ...] = ()
    keep: int | None = None
    weight_storage: str | None = None
    fast: str | None = None
    offload: bool = False
    # The line as written and how it was read: a worker on another machine reads it again, where its paths are.
    data: Mapping[str, Any] = field(default_factory=dict, repr=False)
    folder: str = "."
    inputs_from: tuple[str, ...] = ()
    resolver: Resolver = field(default_factory=HubResolver)
    # The content hash of the job as resolved (request, files by content, models, outputs): an output is this job's
    # result only if it records the same.
    fingerprint: str = ""

    def read_here(self) -> Job:
        """This job read again on this machine: relative paths from the job file's folder as this machine sees it,
        remote inputs copied here (the driver's fingerprint kept: the job is the same)."""
        job = parse_job(self.data, self.line, folder=self.folder, inputs_from=self.inputs_from, resolver=self.resolver)
        return dataclasses.replace(job, fingerprint=self.fingerprint)

    @property
    def resolved(self) -> ResolvedJob:
        """This job as the :class:`~sdxl_control.jobs.runner.Runner` runs it."""
        from .spec import ResolvedJob

        return ResolvedJob(self.request, self.base, self.refiner, self.unet, self.keep, self.weight_storage,
                           self.fast, self.offload)  # fmt: skip

    @property
    def models(self) -> tuple[Any, ...]:
        """What loading the models depends on: jobs that share it share a loaded :class:`Generator`."""
        return (self.base, self.refiner, self.unet, self.weight_storage)

    @property
    def group(self) -> tuple[str, ...]:
        """The order jobs run in: by models, then by the condition models they load."""
        needs = sorted(str(n.source) for c in self.request.conditions for n in c.model_needs())
        return (json.dumps(self.models, default=str), *needs)


def _local(value: Any, folder: Path) -> Any:
    """``value`` (a path, or lists and mappings of them) as this machine reads it: a remote input (``s3://``,
    ``gs://``, ``file://``... anything pyarrow reaches) copied into the cache, a relative path made relative to
    ``folder`` (the job file's) where such a file or folder exists there."""
    if isinstance(value, str):
        if is_uri(value):
            return fetched_input(value)
        if value and not Path(value).expanduser().is_absolute() and (folder / value).exists():
            return str(folder / value)
        return value
    if isinstance(value, list):
        return [_local(v, folder) for v in value]
    if isinstance(value, dict) and not is_ref(value):  # a reference by content is found as a recipe's are
        return {k: _local(v, folder) for k, v in value.items()}
    return value


def _local_condition(settings: Any, folder: Path) -> Any:
    """A condition's settings with its path fields (model, image, mask...) read as :func:`_local` reads them."""
    from ..adapters import condition_class

    if not isinstance(settings, Mapping) or not isinstance(settings.get("kind"), str):
        return settings  # condition_from_settings says what is wrong with it
    try:
        paths = condition_class(settings["kind"]).path_fields
    except SdxlControlError:
        return settings
    return {k: _local(v, folder) if k in paths else v for k, v in settings.items()}


def _derived_seed(job_id: str) -> int:
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4], "big")


def parse_job(
    data: Any,
    line: int,
    *,
    folder: str | os.PathLike[str] = ".",
    inputs_from: Sequence[str | os.PathLike[str]] = (),
    resolver: Resolver | None = None,
) -> Job:
    """The job one line describes (already parsed from JSON); raises the error the line deserves.

    ``folder`` is the job file's (relative paths start there, and it is searched for the files a recipe names, as
    are ``inputs_from``); ``resolver`` finds the models (default: what the job names; ``TinyResolver`` for the tiny
    stand-ins).
    """
    from ..passes.request import GenerationRequest
    from ..records.recipe import RECORD_KEYS
    from .spec import resolve

    resolver = resolver or HubResolver()
    if not isinstance(data, Mapping):
        raise InvalidRequestError(f"a job is a JSON object, got {type(data).__name__}")
    root = Path(folder)
    job_id = data.get("id", str(line))
    if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
        raise InvalidRequestError(
            f"'id' must be a name of letters, digits, '.', '_' and '-' (it names the output file), got {job_id!r}"
        )
    locate = Locator([*inputs_from, root])
    request_fields = {f.name for f in fields(GenerationRequest)}
    is_recipe = "batch_seed" in data or isinstance(data.get("scheduler"), Mapping)
    allowed = {*request_fields, *RECORD_KEYS, "id", "output"} if is_recipe else {*request_fields, *JOB_KEYS}
    message = unknown_keys(data, allowed, "the job")
    if message:
        raise InvalidRequestError(message)
    if is_recipe:
        spec = JobSpec(recipe={k: v for k, v in data.items() if k not in ("id", "output")})
    else:
        spec = _job_spec(data, root, locate, _derived_seed(job_id))
    resolved = resolve(spec, resolver, locate=locate)
    keep = resolved.keep if resolved.keep is not None and resolved.request.num_images > 1 else None
    output = data.get("output", f"{job_id}.png")
    if not isinstance(output, str) or not output.lower().endswith(".png") or Path(output).name != output:
        raise InvalidRequestError(f"'output' is a file name ending in .png (no folder), got {output!r}")
    stem = output[: -len(".png")]
    count = 1 if keep is not None else resolved.request.num_images
    outputs = tuple(output if i == 0 else f"{stem}-{i}.png" for i in range(count))
    as_line = job_line(resolved.request, *resolved.models, weight_storage=resolved.weight_storage)
    described = {"job": as_line, "keep": keep, "outputs": outputs}
    fingerprint = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return Job(job_id, line, resolved.request, *resolved.models, outputs=outputs, keep=keep,
               weight_storage=resolved.weight_storage, fast=resolved.fast, offload=resolved.offload, data=dict(data),
               folder=str(root), inputs_from=tuple(map(str, inputs_from)), resolver=resolver,
               fingerprint=fingerprint)  # fmt: skip


def _job_spec(data: Mapping[str, Any], root: Path, locate: Locator, seed: int) -> JobSpec:
    """A plain job line as the one request path takes it: its paths read from the job file's folder, its recorded
    conditions rebuilt, its seed derived from its id when it gives none."""
    from ..adapters import condition_from_settings

    local = ("inputs", "models", "init_image", "mask", "upscaler", "embeddings")  # read from the job file's folder
    data = {**data, **{k: _local(data[k], root) for k in local if k in data}}
    # Files named by content (what --dry-run prints) are found as a recipe's are.
    found = ("init_image", "mask", "upscaler", "embeddings")
    data.update({k: locate.resolve(data[k], f"the job's {k}") for k in found if k in data})
    detailer = data.get("detailer")
    if isinstance(detailer, Mapping) and detailer.get("face_pack") is not None:
        data["detailer"] = {**detailer, "face_pack": locate.resolve(detailer["face_pack"], "the job's face pack")}
    if isinstance(data.get("preset"), str) and data["preset"].endswith(".json"):  # a preset file, not a name
        data["preset"] = _local(data["preset"], root)
    if not isinstance(data.get("prompt"), str):
        raise InvalidRequestError("the job has no 'prompt' (a string)")
    for key in ("inputs", "set", "models"):
        if not isinstance(data.get(key, {}), Mapping):
            raise InvalidRequestError(f"the job's {key!r} should be a JSON object, got {type(data[key]).__name__}")
    if "preset" in data and not isinstance(data["preset"], str):
        raise InvalidRequestError(f"the job's 'preset' names a preset or a preset file, got {data['preset']!r}")
    if not isinstance(data.get("conditions", []), list):
        raise InvalidRequestError("the job's 'conditions' should be a list of conditions, as a recipe records them")
    version = data.get("version") if isinstance(data.get("version"), str) else None
    conditions = tuple(
        condition_from_settings(_local_condition(c, root), locate, version) for c in data.get("conditions", [])
    )
    settings = {
        "seed": seed,
        **{k: v for k, v in data.items() if k not in JOB_KEYS and k not in ("prompt", "conditions")},
    }
    return JobSpec(data["prompt"], preset=data.get("preset"), inputs=data.get("inputs", {}), set=data.get("set", {}),
                   settings=settings, conditions=conditions, models=data.get("models", {}))  # fmt: skip


def job_line(
    request: GenerationRequest,
    base: Any,
    refiner: Any,
    unet: ModelRef | None,
    paths: PathMode = "names",
    weight_storage: str | None = None,
    *,
    fast: str | None = None,
    offload: bool = False,
) -> dict[str, Any]:
    """A job (one line of a job file) for ``request`` on these models: what ``generate --dry-run`` prints. How the
    models are kept (``weight_storage``, ``fast``, ``offload``) appears only where it is set."""
    unet_json = None if unet is None else unet.to_json()
    models = {"base": portable(base, paths), "refiner": portable(refiner, paths), "unet": portable(unet_json, paths)}
    if weight_storage is not None:
        models["weight_storage"] = weight_storage
    if fast is not None:
        models["fast"] = fast
    if offload:
        models["offload"] = True
    return {**request.settings(paths), "models": models}


def read_jobs(
    path: str | os.PathLike[str],
    *,
    inputs_from: Sequence[str | os.PathLike[str]] = (),
    resolver: Resolver | None = None,
) -> tuple[list[Job], list[JobProblem]]:
    """Every job of a job file, and every line that is not a runnable job (nothing is loaded to find out)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"job file {file}: cannot be read ({exc})") from None
    jobs: list[Job] = []
    problems: list[JobProblem] = []
    ids: dict[str, int] = {}
    files: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            data = json_text(raw, "the line")
        except InputError as exc:  # not JSON, or nested or sized to exhaust the reader
            problems.append(JobProblem(number, str(exc)))
            continue
        given_id = data.get("id") if isinstance(data, dict) else None
        try:
            job = parse_job(data, number, folder=file.parent, inputs_from=inputs_from, resolver=resolver)
        except SdxlControlError as exc:
            problems.append(JobProblem(number, str(exc), given_id if isinstance(given_id, str) else None))
            continue
        if job.id in ids:
            problems.append(JobProblem(number, f"the id {job.id!r} is also line {ids[job.id]}'s", job.id))
            continue
        clash = next((files[name] for name in job.outputs if name in files), None)
        if clash is not None:
            problems.append(JobProblem(number, f"writes a file line {clash} writes too ({job.outputs})", job.id))
            continue
        ids[job.id] = number
        files.update((name, number) for name in job.outputs)
        jobs.append(job)
    return jobs, problems
