"""The models a server offers, by the names it lists: the one place a request's model name (A1111's
``sd_model_checkpoint``, ``refiner_checkpoint``, a ControlNet unit's ``model``, OpenAI's ``model``) becomes what a job
loads. Only listed names are taken, so no path or hub id a client sends ever reaches the file system or the network.

The checkpoints are the server's default base (``--base``, else the published SDXL base), its refiner, and every
checkpoint file of the model folders (``--models-dir``); the other kinds are the model folders' files of that kind.

Example:
    >>> from sdxl_control.weights.model_folders import ModelFolders
    >>> catalogue = Catalogue(ModelFolders())
    >>> [entry.title for entry in catalogue.listed("checkpoints")]
    ['sd_xl_base_1.0', 'sd_xl_refiner_1.0']
    >>> catalogue.find("checkpoints", "sd_xl_base_1.0", "sd_model_checkpoint").source
    'stabilityai/stable-diffusion-xl-base-1.0'
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..base.defaults import DEFAULT_BASE, DEFAULT_REFINER
from ..base.errors import InvalidRequestError

if TYPE_CHECKING:
    from ..weights.model_folders import ModelFolders

__all__ = ["Catalogue", "Listed"]

# The published models under the file names A1111 users know them by (what its model list shows for them).
PUBLISHED_NAMES = {DEFAULT_BASE: "sd_xl_base_1.0", DEFAULT_REFINER: "sd_xl_refiner_1.0"}


@dataclass(frozen=True)
class Listed:
    """One model the server offers: the ``title`` clients see and send back (A1111's ``title``), its ``name`` (no
    extension), the ``source`` a job loads (a hub id or a file the server found), and its file, if it is one.

    Example:
        >>> Listed("sd_xl_base_1.0", "sd_xl_base_1.0", "stabilityai/stable-diffusion-xl-base-1.0").file is None
        True
    """

    title: str
    name: str
    source: str
    file: Path | None = None


class Catalogue:
    """The server's models by kind (``checkpoints``, ``loras``, ``vae``, ``controlnet``, ``upscale_models``,
    ``embeddings`` ... as :class:`~sdxl_control.weights.model_folders.ModelFolders` names them), read once and again
    on :meth:`refresh`.

    Example:
        >>> from sdxl_control.weights.model_folders import ModelFolders
        >>> Catalogue(ModelFolders(), base="my-org/my-sdxl").listed("checkpoints")[0].source
        'my-org/my-sdxl'
    """

    def __init__(self, folders: ModelFolders, *, base: str | None = None, refiner: str | None = None) -> None:
        self.folders = folders
        self.base, self.refiner = base or DEFAULT_BASE, refiner or DEFAULT_REFINER
        self._lock = threading.Lock()
        self._listed: dict[str, list[Listed]] = {}
        self.refresh()

    def refresh(self) -> None:
        """Read the model folders again (A1111's refresh-checkpoints)."""
        listed: dict[str, list[Listed]] = {}
        for kind, paths in self.folders.listing().items():
            listed[kind] = [_file_entry(kind, path, self.folders) for path in paths]
        published = [_published(self.base), _published(self.refiner)]
        files = listed.get("checkpoints", [])
        listed["checkpoints"] = [*(p for p in published if all(f.source != p.source for f in files)), *files]
        with self._lock:
            self._listed = listed

    def listed(self, kind: str) -> list[Listed]:
        """The models of ``kind`` the server offers, in the order it lists them."""
        with self._lock:
            return list(self._listed.get(kind, []))

    def default(self) -> Listed:
        """The checkpoint a job runs on until a client chooses another."""
        return self.find("checkpoints", _published(self.base).title, "--base")

    def find(self, kind: str, name: str, field: str) -> Listed:
        """The listed model ``name`` names: its title (A1111's ``name.safetensors [hash]`` read with or without the
        hash), its name, or its file's name; anything else is refused, naming ``field`` and the names listed."""
        wanted = _bare(str(name))
        for entry in self.listed(kind):
            names = {entry.title, entry.name, *((entry.file.name,) if entry.file is not None else ())}
            if wanted in names or str(name) in names:
                return entry
        titles = [entry.title for entry in self.listed(kind)]
        shown = ", ".join(repr(t) for t in titles[:20]) + (" ..." if len(titles) > 20 else "")
        raise InvalidRequestError(
            f"{field}: {name!r} is not a {kind} model this server offers; it offers {shown or 'none'} "
            "(a server takes only the names it lists: add files to its --models-dir and refresh)"
        )


def _bare(title: str) -> str:
    """A1111's title without its ``[hash]``."""
    text = title.strip()
    if text.endswith("]") and " [" in text:
        text = text[: text.rindex(" [")]
    return text


def _published(source: str) -> Listed:
    name = PUBLISHED_NAMES.get(source, source)
    return Listed(name, name, source)


def _file_entry(kind: str, path: Path, folders: ModelFolders) -> Listed:
    # The title is the path inside the kind's folder (A1111 lists subfolders so), without a hash: reading the whole
    # of every multi-GB file at start would hold the server for minutes, and clients send the title back as given.
    roots = [root.resolve() for root in folders.folders.get(kind, ())]
    inside = next((path.relative_to(root) for root in roots if path.is_relative_to(root)), None)
    title = (inside or Path(path.name)).as_posix()
    return Listed(title, Path(title).stem if path.is_file() else title, str(path), path)
