"""What weights a generation needs, whether this machine has them, and fetching the missing ones.

Every loader in sdxl-control finds its weights the same way: a local file or folder as given, else a hub repo through
the HF cache, holding some files. A :class:`ModelNeed` states one such lookup, made by the same code that loads it
(models, conditions and presets list theirs), so ``sdxl-control models`` reports exactly what a run would look for.

Example:
    >>> need = ModelNeed("PuLID weights", "guozinan/PuLID", ("pulid_v1.1.safetensors",))
    >>> need.fetch_command()
    'hf download guozinan/PuLID pulid_v1.1.safetensors'
    >>> check(need).present                                                      # doctest: +SKIP
    False
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingWeightsError
from .files import FILE_SUFFIXES, looks_like_hub_id

__all__ = ["ModelNeed", "Presence", "check", "fetch", "report", "unique", "weights_need", "pattern_for", "human_size"]

# Licence notes shown beside models whose terms restrict use; the rest are Apache-2.0, MIT or OpenRAIL++.
INSIGHTFACE_LICENCE = "insightface's models are for non-commercial research only"


@dataclass(frozen=True)
class ModelNeed:
    """One set of weights something loads: ``source`` (a hub id, or a local file or folder) holding ``files`` (exact
    paths or glob patterns inside it; none when the source is itself a file). ``how`` says how to get weights that no
    hub serves; ``licence`` notes terms that restrict use.

    Example:
        >>> ModelNeed("ControlNet (pose)", "xinsir/controlnet-openpose-sdxl-1.0", ("config.json", "*.safetensors"))
        ModelNeed(what='ControlNet (pose)', source='xinsir/controlnet-openpose-sdxl-1.0', files=('config.json', '*.safetensors'), how=None, licence=None)
    """  # noqa: E501

    what: str
    source: str
    files: tuple[str, ...] = ()
    how: str | None = None
    licence: str | None = None

    @property
    def on_hub(self) -> bool:
        return self.how is None and not Path(self.source).expanduser().exists() and looks_like_hub_id(self.source)

    def fetch_command(self) -> str:
        """The command that fetches the weights on a machine with network access (or ``how``)."""
        if self.how is not None:
            return self.how
        if not looks_like_hub_id(self.source):
            return f"put the weights at {self.source}"
        exact = all(not any(c in f for c in "*?[") for f in self.files)
        if exact:
            return " ".join(["hf download", self.source, *self.files])
        includes = " ".join(f'--include "{f}"' for f in self.files)
        return f"hf download {self.source} {includes}".rstrip()


@dataclass(frozen=True)
class Presence:
    """Where a need was found (``path``), the size of its files, and the patterns that matched nothing."""

    need: ModelNeed
    path: Path | None
    size: int
    missing: tuple[str, ...]

    @property
    def present(self) -> bool:
        return self.path is not None and not self.missing


def _matches(folder: Path, pattern: str) -> list[Path]:
    if not any(c in pattern for c in "*?["):
        target = folder / pattern
        if target.is_file():
            return [target]
        return [p for p in target.rglob("*") if p.is_file()] if target.is_dir() else []
    return [p for p in folder.rglob("*") if p.is_file() and fnmatch.fnmatch(p.relative_to(folder).as_posix(), pattern)]


def _snapshot(repo: str, files: tuple[str, ...]) -> Path | None:
    """The repo's folder in the HF cache (no network), or None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True, allow_patterns=list(files) or None))
    except Exception:  # LocalEntryNotFoundError, an invalid id, a half-written cache entry
        return None


def check(need: ModelNeed) -> Presence:
    """Whether ``need`` is on this machine (local path, or the HF cache), never touching the network."""
    local = Path(need.source).expanduser()
    if local.is_file():
        return Presence(need, local, local.stat().st_size, ())
    folder = local if local.is_dir() else (_snapshot(need.source, need.files) if need.on_hub else None)
    if folder is None:
        return Presence(need, None, 0, need.files)
    found: set[Path] = set()
    missing = []
    for pattern in need.files:
        matched = _matches(folder, pattern)
        if not matched:
            missing.append(pattern)
        found.update(matched)
    return Presence(need, folder, sum(p.stat().st_size for p in found), tuple(missing))


def fetch(need: ModelNeed) -> Presence:
    """Download a hub need into the HF cache (with huggingface_hub's progress bars); raises MissingWeightsError with
    the reason when the hub cannot be reached or the weights are not on a hub."""
    if not need.on_hub:
        raise MissingWeightsError(f"{need.what}: not on the hub; {need.fetch_command()}")
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        raise MissingWeightsError(f"{need.what}: HF_HUB_OFFLINE is set; unset it to fetch, or {need.fetch_command()}")
    try:
        snapshot_download(need.source, allow_patterns=list(need.files) or None)
    except Exception as exc:
        raise MissingWeightsError(
            f"{need.what}: the hub could not be reached ({type(exc).__name__}: {str(exc)[:200]}); on a machine with "
            f"network access: {need.fetch_command()}"
        ) from None
    return check(need)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def unique(needs: Iterable[ModelNeed]) -> list[ModelNeed]:
    """``needs`` without repeats (the same weights named by two conditions are fetched once)."""
    seen: dict[tuple[str, tuple[str, ...]], ModelNeed] = {}
    for need in needs:
        seen.setdefault((need.source, need.files), need)
    return list(seen.values())


def report(needs: Iterable[ModelNeed], checker: Callable[[ModelNeed], Presence] = check) -> tuple[str, bool]:
    """A table of ``needs``: present (where, size) or missing (the command that fetches it), licence notes; and
    whether all are present."""
    lines, complete = [], True
    for need in unique(needs):
        found = checker(need)
        complete &= found.present
        listed = ", ".join(need.files) if len(need.files) <= 3 else f"{len(need.files)} files"
        where = need.source + (f" [{listed}]" if need.files else "")
        if found.present:
            lines.append(f"  present  {human_size(found.size):>9}  {need.what}: {where}")
        else:
            lines.append(f"  MISSING  {'':>9}  {need.what}: {where}")
            lines.append(f"           get it: {need.fetch_command()}")
        if need.licence:
            lines.append(f"           licence: {need.licence}")
    return "\n".join(lines), complete


def pattern_for(relative: str) -> str:
    """The hub pattern that fetches ``relative`` inside a repo: the file itself, or everything under a folder."""
    return relative if Path(relative).suffix else f"{relative}/*"


def weights_need(what: str, source: str | os.PathLike[str], files: Iterable[str] = (), **notes: str) -> ModelNeed:
    """A need for ``files`` in ``source``, or for ``source`` itself when it names a weights file."""
    text = os.fspath(source)
    inside = () if Path(text).suffix.lower() in FILE_SUFFIXES else tuple(files)
    return ModelNeed(what, text, inside, **notes)
