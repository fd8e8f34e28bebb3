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
import contextvars
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..base.errors import InputError, InvalidRequestError, OutputError, SdxlControlError
from ..base.files import Locator, PathMode, is_ref, portable
from ..base.model_refs import ModelRef
from ..base.validation import unknown_keys
from ..records.recipe import RECIPE_KEY, RecipeImage, json_text
from .resolvers import HubResolver, Resolver
from .spec import JobSpec

if TYPE_CHECKING:
    import torch

    from ..passes.generator import GenerationRequest, Generator
    from .spec import ResolvedJob

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

RESULTS = "results.jsonl"
# Keys a job has besides the request's fields (and, for a PNG's recipe, the recipe's record keys).
JOB_KEYS = frozenset({"id", "output", "preset", "inputs", "set", "models"})
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PARTIAL = ".partial"
_URI = re.compile(r"[a-z][a-z0-9+.-]*://")
# A remote input smaller than this is read whole when peeked at, a larger one only its first _PEEK_BYTES.
_PEEK_WHOLE = 1 << 20
_PEEK_BYTES = 1 << 16
_PEEK_INTO: contextvars.ContextVar[Path | None] = contextvars.ContextVar("peek_into", default=None)
# The cache entries of remote inputs this process has read: never trimmed from under it.
_USED_INPUTS: set[Path] = set()


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
        if _URI.match(value):
            return _fetched(value)
        if value and not Path(value).expanduser().is_absolute() and (folder / value).exists():
            return str(folder / value)
        return value
    if isinstance(value, list):
        return [_local(v, folder) for v in value]
    if isinstance(value, dict) and not is_ref(value):  # a reference by content is found as a recipe's are
        return {k: _local(v, folder) for k, v in value.items()}
    return value


def _fetched(uri: str) -> str:
    """A remote file or folder copied whole into this machine's cache (once per URI, size and time); its path.

    Inside :func:`remote_inputs_peeked`, a stand-in is made instead, holding only the files' beginnings."""
    from ..base.files import cache_dir

    try:
        from pyarrow import fs as arrow_fs
    except ImportError:
        raise InputError(f"{uri}: a remote input needs pyarrow (pip install 'sdxl-control[ray]')") from None
    try:
        remote, path = arrow_fs.FileSystem.from_uri(uri)
        info = remote.get_file_info(path)
    except (ValueError, OSError) as exc:
        raise InputError(f"{uri}: not a filesystem pyarrow reaches ({exc})") from None
    if info.type == arrow_fs.FileType.NotFound:
        raise InputError(f"{uri}: no such file or folder")
    key = hashlib.sha256(f"{uri}\0{info.size}\0{info.mtime_ns}".encode()).hexdigest()[:20]
    peek_folder = _PEEK_INTO.get()
    target = (peek_folder or cache_dir() / "inputs") / key / info.base_name
    copied = not target.exists()
    if not copied:
        os.utime(target.parent)  # recently used: trimmed last
    else:
        staging = target.parent / f".{uuid.uuid4().hex[:12]}{_PARTIAL}"
        staging.mkdir(parents=True)
        try:
            if peek_folder is not None:
                _peek(remote, info, staging / info.base_name)
            elif info.type == arrow_fs.FileType.Directory:
                # pyarrow creates the subfolders it copies into, not the top one.
                (staging / info.base_name).mkdir()
                arrow_fs.copy_files(path, str(staging / info.base_name), source_filesystem=remote)
            else:
                with remote.open_input_stream(path) as stream, open(staging / info.base_name, "wb") as file:
                    shutil.copyfileobj(stream, file)
            os.replace(staging / info.base_name, target)
        except OSError as exc:
            raise InputError(f"{uri}: could not be copied here ({exc})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if peek_folder is None:
        _USED_INPUTS.add(target.parent)
        if copied:  # only a new copy can take the cache past its bound
            trim_input_cache()
    return str(target)


def _peek(remote: Any, info: Any, target: Path) -> None:
    """A stand-in for a remote file or folder: every file at its real size, holding its first bytes (the whole of a
    small file: a config, a small image) and zeros after them, written sparse."""
    from pyarrow import fs as arrow_fs

    if info.type == arrow_fs.FileType.Directory:
        entries = remote.get_file_info(arrow_fs.FileSelector(info.path, recursive=True))
        target.mkdir()
    else:
        entries = [info]
    for entry in entries:
        local = target if entry is info else target / Path(entry.path).relative_to(info.path)
        if entry.type == arrow_fs.FileType.Directory:
            local.mkdir(parents=True, exist_ok=True)
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        with remote.open_input_file(entry.path) as source, open(local, "wb") as file:
            file.write(source.read(entry.size if entry.size <= _PEEK_WHOLE else _PEEK_BYTES))
            file.truncate(entry.size)


@contextmanager
def remote_inputs_peeked() -> Iterator[None]:
    """Within it, reading a job copies no remote input: each is stat'ed and stands in as its files' beginnings (a
    small file whole, a large one's first 64 KiB: image headers, configs, weights' key tables), at their real sizes,
    in a temporary folder removed on leaving. What ``batch --check`` reads jobs with.

    Example:
        >>> with remote_inputs_peeked():                                     # doctest: +SKIP
        ...     jobs, problems = read_jobs("s3://bucket/jobs.jsonl")
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sdxl-control-peek-") as folder:
        token = _PEEK_INTO.set(Path(folder))
        try:
            yield
        finally:
            _PEEK_INTO.reset(token)


def trim_input_cache(limit: int | None = None) -> list[Path]:
    """Remove the least recently used copies of remote inputs until the cache holds at most ``limit`` bytes (default
    ``SDXL_CONTROL_INPUT_CACHE_GB``, 20 GiB), never one this process uses; what was removed.

    Example:
        >>> trim_input_cache(limit=0)                                       # doctest: +SKIP
        [PosixPath('/home/me/.cache/sdxl-control/inputs/3f2a.../photo.png')]
    """
    from ..base.files import cache_dir

    if limit is None:
        limit = int(float(os.environ.get("SDXL_CONTROL_INPUT_CACHE_GB", "20")) * 2**30)
    root = cache_dir() / "inputs"
    entries = []
    for entry in root.iterdir() if root.is_dir() else ():
        files = [p for p in entry.rglob("*") if p.is_file()]
        entries.append((entry.stat().st_mtime, sum(p.stat().st_size for p in files), entry))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, entry in sorted(entries):
        if total <= limit:
            break
        if entry in _USED_INPUTS:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        total -= size
    return removed


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

    local = ("inputs", "models", "init_image", "mask", "upscaler")  # read from the job file's folder
    data = {**data, **{k: _local(data[k], root) for k in local if k in data}}
    # Files named by content (what --dry-run prints) are found as a recipe's are.
    data.update({k: locate.resolve(data[k], f"the job's {k}") for k in ("init_image", "mask", "upscaler") if k in data})
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


class Outputs:
    """The folder a batch writes to: a local folder, or any filesystem pyarrow reaches (``s3://bucket/run``,
    ``gs://...``, ``file:///...``), so that workers on several machines write to one place.

    Files appear whole or not at all: each is written under a temporary name and then renamed.

    Example:
        >>> out = Outputs("out")              # doctest: +SKIP
        >>> out.write("a.png", png_bytes)     # doctest: +SKIP
        >>> out.exists("a.png")               # doctest: +SKIP
        True
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = os.fspath(target)
        self._fs: Any = None
        self._recorded: bytes | None = None  # results.jsonl as last written, on object stores
        if "://" in self.target:
            try:
                from pyarrow import fs as arrow_fs
            except ImportError:
                raise OutputError(
                    f"-o {self.target}: a filesystem URI needs pyarrow (pip install 'sdxl-control[ray]')"
                ) from None
            try:
                self._fs, self._root = arrow_fs.FileSystem.from_uri(self.target)
            except (ValueError, OSError) as exc:
                raise OutputError(f"-o {self.target}: not a filesystem pyarrow reaches ({exc})") from None
            self._fs.create_dir(self._root, recursive=True)
        else:
            self._root = str(Path(self.target).expanduser())
            if not Path(self._root).is_dir():
                if Path(self._root).exists() or not Path(self._root).parent.is_dir():
                    raise OutputError(f"-o {self.target}: not a folder, and its parent folder does not exist")
                Path(self._root).mkdir()
            if not os.access(self._root, os.W_OK):
                raise OutputError(f"-o {self.target}: the folder is not writable")

    def _path(self, name: str) -> str:
        return f"{self._root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        if self._fs is None:
            return os.path.isfile(self._path(name))
        from pyarrow import fs as arrow_fs

        return bool(self._fs.get_file_info(self._path(name)).type == arrow_fs.FileType.File)

    def read(self, name: str) -> bytes:
        if self._fs is None:
            return Path(self._path(name)).read_bytes()
        with self._fs.open_input_stream(self._path(name)) as stream:
            return bytes(stream.read())

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` whole: to a temporary name first, renamed when complete."""
        temporary = self._path(f".{name}.{uuid.uuid4().hex[:12]}{_PARTIAL}")
        try:
            if self._fs is None:
                with open(temporary, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, self._path(name))
            else:
                with self._fs.open_output_stream(temporary) as stream:
                    stream.write(data)
                self._fs.move(temporary, self._path(name))
        except BaseException as exc:  # Ctrl-C included: no temporary file is left behind when it can be helped
            self._discard(temporary)
            if isinstance(exc, OSError):
                raise OutputError(f"{self._path(name)}: could not be written ({exc})") from None
            raise

    def _discard(self, path: str) -> None:
        try:
            if self._fs is None:
                os.unlink(path)
            else:
                self._fs.delete_file(path)
        except OSError:
            pass

    def remove_partials(self) -> int:
        """Remove what writes cut short left behind (temporary files); how many."""
        if self._fs is None:
            names = [p.name for p in Path(self._root).glob(f".*{_PARTIAL}")]
            for name in names:
                Path(self._path(name)).unlink(missing_ok=True)
            return len(names)
        from pyarrow import fs as arrow_fs

        infos = self._fs.get_file_info(arrow_fs.FileSelector(self._root, allow_not_found=True))
        partial = [i.path for i in infos if i.base_name.startswith(".") and i.base_name.endswith(_PARTIAL)]
        for path in partial:
            self._fs.delete_file(path)
        return len(partial)

    def results(self) -> list[dict[str, Any]]:
        """The lines of ``results.jsonl`` so far (a line cut short by a crash is ignored)."""
        if not self.exists(RESULTS):
            return []
        out = []
        for raw in self.read(RESULTS).decode("utf-8", "replace").splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out

    def record(self, result: Mapping[str, Any]) -> None:
        """Add a line to ``results.jsonl`` (rewritten whole on object stores, which cannot append)."""
        line = json.dumps(result) + "\n"
        if self._fs is None:
            with open(self._path(RESULTS), "a", encoding="utf-8") as file:
                file.write(line)
                file.flush()
                os.fsync(file.fileno())
        else:
            # Only the driver records, so what it last wrote is the file: read once, not once per result.
            if self._recorded is None:
                self._recorded = self.read(RESULTS) if self.exists(RESULTS) else b""
            self._recorded += line.encode()
            self.write(RESULTS, self._recorded)


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


def made_by(outputs: Outputs, name: str, job: Job) -> bool:
    """Whether the file ``name`` is a whole PNG that ``job``, as it reads now, made: its recipe records the job's
    fingerprint (an edited job, a foreign, empty or cut-short file: not)."""
    if not outputs.exists(name):
        return False
    try:
        data = outputs.read(name)
        with Image.open(io.BytesIO(data)) as image:
            recipe = image.info.get(RECIPE_KEY)
            image.verify()  # every chunk's checksum, to the end: a file cut short fails here
        return isinstance(recipe, str) and json.loads(recipe).get("job") == job.fingerprint
    except (
        OSError,
        ValueError,
        SyntaxError,
        AttributeError,
        RecursionError,
    ):  # PIL's errors for files that are no (whole) PNG
        return False


def pending(jobs: Iterable[Job], outputs: Outputs) -> tuple[list[Job], list[Job]]:
    """(jobs still to run in group order, jobs whose outputs are all their own results). Leftovers of interrupted
    writes are removed first; an output made by another job, or by this job before it was edited, is made again."""
    outputs.remove_partials()
    todo: list[Job] = []
    complete: list[Job] = []
    for job in jobs:
        (complete if all(made_by(outputs, name, job) for name in job.outputs) else todo).append(job)
    return sorted(todo, key=lambda j: j.group), complete


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


def record_problems(problems: Iterable[JobProblem], outputs: Outputs) -> None:
    """Jobs skipped as invalid (``--skip-invalid``) get their line in ``results.jsonl`` too (once: a re-run of the
    same file does not repeat it)."""
    known = {(r.get("line"), r.get("error")) for r in outputs.results() if r.get("error_kind") == "InvalidJob"}
    for problem in problems:
        if (problem.line, problem.message) in known:
            continue
        outputs.record({"id": problem.id, "line": problem.line, "files": [], "error": problem.message,
                        "error_kind": "InvalidJob", "seconds": None})  # fmt: skip


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
