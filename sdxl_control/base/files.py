"""Files a recipe names: their content hashes (cached on disk), references to them that carry no private path, and
finding them again when a recipe is re-run.

A local file is recorded as ``{"file": name, "sha256": ...}`` and a local folder as ``{"folder": name, "fingerprint":
...}``; hub ids stay as they are. ``paths="full"`` adds the absolute ``"path"``. This machine remembers where it last
saw each recorded content (in its cache folder, never in an image), so a re-run here needs no help; elsewhere the
files are looked for beside the image or in folders the user names.

Example:
    >>> ref = portable_ref("photos/face.png")                    # doctest: +SKIP
    >>> ref                                                      # doctest: +SKIP
    {'file': 'face.png', 'sha256': '9f2c...'}
    >>> Locator(["~/moved-photos"]).find(ref, "the face photo")  # doctest: +SKIP
    PosixPath('/home/me/moved-photos/face.png')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from .errors import InputError

__all__ = [
    "PathMode",
    "cache_dir",
    "sha256_of",
    "addnet_hash",
    "a1111_short_hash",
    "fingerprint",
    "portable_ref",
    "portable",
    "looks_local",
    "looks_like_hub_id",
    "is_ref",
    "Locator",
]

log = logging.getLogger(__name__)

PathMode = Literal["names", "full"]
PATH_MODES: tuple[str, ...] = ("names", "full")
# Suffixes of files users hand in; a hub id never ends in one ("...-xl-base-1.0" does end in ".0").
FILE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".safetensors", ".bin", ".pt", ".pth",
     ".ckpt", ".onnx", ".json", ".zip", ".npy"}
)  # fmt: skip
# A folder of more files than this is fingerprinted by its first ones only (sorted): enough to tell folders apart.
_FINGERPRINT_FILES = 5000


def cache_dir() -> Path:
    """Where sdxl-control keeps what it learns about this machine's files (``SDXL_CONTROL_CACHE`` overrides)."""
    return Path(os.environ.get("SDXL_CONTROL_CACHE", Path.home() / ".cache" / "sdxl-control")).expanduser()


def _load_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _store_json(path: Path, value: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(value))
        temporary.replace(path)  # readers in other processes never see half a file
    except OSError:
        log.debug("could not write %s", path)


def _cached(path: Path, kind: str, compute: Callable[[Path], str]) -> str:
    """A hash of a file, kept by (kind, path, size, mtime): hashing a 7 GB checkpoint costs seconds, once."""
    stat = path.stat()
    key = f"{kind}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    store = cache_dir() / "hashes.json"
    cache = _load_json(store)
    if key not in cache:
        cache[key] = compute(path)
        _store_json(store, cache)
    return str(cache[key])


def _digest(path: Path, start: int = 0, length: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            chunk = f.read(1 << 24 if left is None else min(1 << 24, left))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest.hexdigest()


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a whole file (cached). Its first 10 hex digits are A1111's and Civitai's model hash."""
    return _cached(Path(path), "sha256", _digest)


def addnet_hash(path: str | os.PathLike[str]) -> str:
    """The hash A1111 gives safetensors LoRAs (``Lora hashes``, Civitai's AutoV3 with 12 digits): the SHA-256 of the
    tensor data after the header, so editing a file's metadata keeps it."""

    def compute(file: Path) -> str:
        with open(file, "rb") as f:
            (header,) = struct.unpack("<Q", f.read(8))
        return _digest(file, start=8 + header)

    return _cached(Path(path), "addnet", compute)


def a1111_short_hash(path: str | os.PathLike[str]) -> str:
    """A1111's first model hash, which the ControlNet extension still shows after model names (``name [hash]``): the
    SHA-256 of 64 KiB at 1 MiB into the file, 8 hex digits."""
    return _digest(Path(path), start=0x100000, length=0x10000)[:8]


def _sample(path: Path) -> str:
    """A file's size and 64 KiB from its start, middle and end, hashed: tells weights files apart without reading
    gigabytes (a full hash would cost a minute for an SDXL folder)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for start in (0, max(0, size // 2 - 0x8000), max(0, size - 0x10000)):
            f.seek(start)
            digest.update(f.read(0x10000))
    return digest.hexdigest()


def fingerprint(folder: str | os.PathLike[str]) -> str:
    """What a folder holds (relative names, sizes and samples of each file's bytes), hashed: equal for a copy,
    different for other contents."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file())[:_FINGERPRINT_FILES]
    lines = [f"{p.relative_to(root).as_posix()}\t{_sample(p)}" for p in files]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def is_ref(value: Any) -> bool:
    """Whether a recorded value is a reference to a local file or folder (rather than a hub id or an option)."""
    return isinstance(value, dict) and ("file" in value or "folder" in value)


def portable_ref(value: str | os.PathLike[str], paths: PathMode = "names") -> Any:
    """A local file or folder as a reference by name and content; anything else (a hub id) unchanged."""
    if paths not in PATH_MODES:
        raise ValueError(f"paths must be one of {', '.join(PATH_MODES)}, got {paths!r}")
    text = os.fspath(value)
    if not _names_a_path(text):
        return text  # a bare word is an option or a name ("plus", "antelopev2"), even if a folder has that name
    path = Path(text).expanduser()
    if path.is_file():
        ref: dict[str, Any] = {"file": path.name, "sha256": sha256_of(path)}
    elif path.is_dir():
        ref = {"folder": path.resolve().name, "fingerprint": fingerprint(path)}
    else:
        return os.fspath(value)
    _remember(ref, path)
    if paths == "full":
        ref["path"] = str(path.resolve())
    return ref


def _names_a_path(text: str) -> bool:
    # A bare word ("plus", "antelopev2") is an option or a name, even where a folder of that name exists.
    return "/" in text or os.sep in text or text.startswith(("~", ".")) or bool(Path(text).suffix)


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` without a file suffix: what loaders resolve through the hub cache when no such path exists."""
    owner, _, name = text.partition("/")
    return (
        bool(owner and name)
        and "/" not in name
        and "\\" not in text
        and not text.startswith((".", "~"))
        and Path(text).suffix.lower() not in FILE_SUFFIXES
    )


def looks_local(text: str) -> bool:
    """Whether a string can only name a local file or folder (not a hub id, not a bare option word)."""
    return _names_a_path(text) and not looks_like_hub_id(text)


def _key(ref: dict[str, Any]) -> str:
    return f"sha256:{ref.get('sha256')}" if "file" in ref else f"folder:{ref['folder']}:{ref.get('fingerprint')}"


def _remember(ref: dict[str, Any], path: Path) -> None:
    store = cache_dir() / "places.json"
    places = _load_json(store)
    where = str(path.resolve())
    if places.get(_key(ref)) != where:
        places[_key(ref)] = where
        _store_json(store, places)


class Locator:
    """Finds the files and folders a recipe references: at the recorded path (``paths="full"`` recipes), in the
    given folders, then where this machine last saw the same content. A file must have the recorded content.

    Example:
        >>> locate = Locator([Path("shot.png").parent, "~/inputs"])               # doctest: +SKIP
        >>> locate.find({"file": "face.png", "sha256": "9f2c..."}, "the face photo")  # doctest: +SKIP
    """

    def __init__(self, folders: Iterable[str | os.PathLike[str]] = ()) -> None:
        self.folders = [Path(f).expanduser() for f in folders]

    def _matches(self, ref: dict[str, Any], path: Path) -> bool:
        if "file" in ref:
            return path.is_file() and (ref.get("sha256") is None or sha256_of(path) == ref["sha256"])
        return path.is_dir() and (ref.get("fingerprint") is None or fingerprint(path) == ref["fingerprint"])

    def find(self, ref: dict[str, Any], what: str) -> Path:
        name = str(ref.get("file") or ref.get("folder"))
        if not name or Path(name).name != name:
            raise InputError(f"{what}: the recipe's reference {ref!r} does not name a file")
        candidates = [Path(ref["path"])] if ref.get("path") else []
        candidates += [folder / name for folder in self.folders]
        # Where this content was last seen: only content that is named (a reference written by hand may not be).
        named = ref.get("sha256") if "file" in ref else ref.get("fingerprint")
        known = _load_json(cache_dir() / "places.json").get(_key(ref)) if named else None
        if known:
            candidates.append(Path(known))
        differing = []
        for candidate in candidates:
            if self._matches(ref, candidate):
                return candidate
            if candidate.exists():
                differing.append(str(candidate))
        kind = "file" if "file" in ref else "folder"
        places = [*(str(f) for f in self.folders), "where this machine last saw it"]
        found = f"; {', '.join(differing)} has other contents than the recipe records" if differing else ""
        raise InputError(
            f"{what}: {kind} {name!r} not found (looked in {', '.join(places)}){found}. Put it beside the image or "
            "pass the folder holding it (--inputs-from FOLDER)"
        )

    def resolve(self, value: Any, what: str) -> Any:
        """``value`` with every reference in it replaced by the local path found for it (as a string)."""
        if is_ref(value):
            return str(self.find(value, what))
        if isinstance(value, list):
            return [self.resolve(v, what) for v in value]
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{what} {k}") for k, v in value.items()}
        return value


def portable(value: Any, paths: PathMode = "names") -> Any:
    """``value`` (a recorded setting: a string, or lists and mappings of them) with local paths made references."""
    if isinstance(value, str):
        return portable_ref(value, paths)
    if isinstance(value, (list, tuple)):
        return [portable(v, paths) for v in value]
    if isinstance(value, dict) and not is_ref(value):
        return {k: portable(v, paths) for k, v in value.items()}
    return value
