"""Where a batch writes: a folder, local or reached through pyarrow's filesystems, of PNGs written under a temporary
name and renamed (an interrupted batch leaves no half-written file), with ``results.jsonl`` recording each job's
outcome, so a re-run skips the jobs whose images exist and were made by the same job.

Example:
    >>> outputs = Outputs("out/")                                     # doctest: +SKIP
    >>> outputs.exists("fox.png")                                     # doctest: +SKIP
    False
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..base.errors import OutputError
from ..records.recipe import RECIPE_KEY

if TYPE_CHECKING:
    from .job_file import Job, JobProblem

    pass

__all__ = ["PARTIAL", "RESULTS", "Outputs", "made_by", "pending", "record_problems"]


RESULTS = "results.jsonl"


# The suffix of files being written: a reader never takes one for a finished file.
PARTIAL = ".partial"


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
        temporary = self._path(f".{name}.{uuid.uuid4().hex[:12]}{PARTIAL}")
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
            names = [p.name for p in Path(self._root).glob(f".*{PARTIAL}")]
            for name in names:
                Path(self._path(name)).unlink(missing_ok=True)
            return len(names)
        from pyarrow import fs as arrow_fs

        infos = self._fs.get_file_info(arrow_fs.FileSelector(self._root, allow_not_found=True))
        partial = [i.path for i in infos if i.base_name.startswith(".") and i.base_name.endswith(PARTIAL)]
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


def record_problems(problems: Iterable[JobProblem], outputs: Outputs) -> None:
    """Jobs skipped as invalid (``--skip-invalid``) get their line in ``results.jsonl`` too (once: a re-run of the
    same file does not repeat it)."""
    known = {(r.get("line"), r.get("error")) for r in outputs.results() if r.get("error_kind") == "InvalidJob"}
    for problem in problems:
        if (problem.line, problem.message) in known:
            continue
        outputs.record({"id": problem.id, "line": problem.line, "files": [], "error": problem.message,
                        "error_kind": "InvalidJob", "seconds": None})  # fmt: skip
