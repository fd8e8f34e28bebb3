"""Inputs a job names by URI (``s3://...``, ``gs://...``, anything pyarrow's filesystems reach): copied once to this
machine's cache, found again by content, and trimmed oldest first; peeking at them while a whole file is checked
reads only their first bytes.

Example:
    >>> with remote_inputs_peeked():                                  # doctest: +SKIP
    ...     jobs, problems = read_jobs("s3://bucket/jobs.jsonl")
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.errors import InputError
from .outputs import PARTIAL

if TYPE_CHECKING:
    pass

__all__ = ["is_uri", "fetched_input", "remote_inputs_peeked", "trim_input_cache"]


_URI = re.compile(r"[a-z][a-z0-9+.-]*://")


def is_uri(value: str) -> bool:
    """Whether ``value`` names a file by URI (``s3://...``), not by path."""
    return bool(_URI.match(value))


# A remote input smaller than this is read whole when peeked at, a larger one only its first _PEEK_BYTES.
_PEEK_WHOLE = 1 << 20


_PEEK_BYTES = 1 << 16


_PEEK_INTO: contextvars.ContextVar[Path | None] = contextvars.ContextVar("peek_into", default=None)


# The cache entries of remote inputs this process has read: never trimmed from under it.
_USED_INPUTS: set[Path] = set()


def fetched_input(uri: str) -> str:
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
        staging = target.parent / f".{uuid.uuid4().hex[:12]}{PARTIAL}"
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
