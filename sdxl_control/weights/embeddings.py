"""SDXL textual-inversion embeddings: the files A1111 keeps in ``embeddings/`` and ComfyUI in ``models/embeddings``.

An SDXL embedding file holds ``clip_l`` (``[n, 768]``, for the first text encoder, CLIP ViT-L) and ``clip_g``
(``[n, 1280]``, for the second, OpenCLIP bigG): ``n`` vectors that stand in for ``n`` tokens of the prompt. How the
tools find one by name:

* A1111: every file (``.safetensors``, ``.pt``, ``.bin``) under the folder, subfolders included, is an embedding
  named by its file name without the extension; the name is used wherever its tokens appear in the prompt.
* ComfyUI (``comfy/sd1_clip.py`` ``load_embed``): ``embedding:NAME`` names the path ``NAME`` inside an embeddings
  folder or any of its subfolders (``embedding:sub/name`` too), as given or with ``.safetensors``, ``.pt`` or
  ``.bin`` added; a path that leaves the folder names nothing.

Example:
    >>> read_embedding("easynegative.safetensors").count               # doctest: +SKIP
    8
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..base.errors import IncompatibleModelError, InputError, InvalidRequestError

__all__ = ["KEYS", "MAX_VECTORS", "TextualInversion", "read_embedding", "a1111_embeddings", "comfyui_embedding"]

# The text-encoder component -> the key of its vectors in an SDXL embedding file (A1111's and ComfyUI's names).
KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
# A1111 puts an embedding whole in one 75-token chunk; one of more vectors fits in none.
MAX_VECTORS = 75
SUFFIXES = (".safetensors", ".pt", ".bin")
# ComfyUI tries the name as written, then with these added, in this order.
COMFYUI_SUFFIXES = (".safetensors", ".pt", ".bin")


@dataclass(frozen=True)
class TextualInversion:
    """One SDXL embedding: its ``name`` in prompts, its ``file`` and ``vectors`` (``clip_l``, ``clip_g``: ``[n,
    width]`` each).

    Example:
        >>> ti = TextualInversion("fox", "fox.safetensors", {"clip_l": torch.zeros(2, 4), "clip_g": torch.zeros(2, 6)})
        >>> ti.count, ti.for_component("text_encoder_2").shape
        (2, torch.Size([2, 6]))
    """

    name: str
    file: str
    vectors: Mapping[str, torch.Tensor]

    @property
    def count(self) -> int:
        """How many tokens the embedding stands for."""
        return int(self.vectors["clip_l"].shape[0])

    def for_component(self, component: str, width: int | None = None) -> torch.Tensor:
        """The vectors for the text encoder ``component`` (``text_encoder``, ``text_encoder_2``), checked against its
        ``width``."""
        if component not in KEYS:
            raise IncompatibleModelError(
                f"embedding {self.name} ({self.file}): no vectors for a text encoder called {component!r}; SDXL "
                f"embeddings hold {', '.join(f'{k} ({c})' for c, k in KEYS.items())}"
            )
        vectors = self.vectors[KEYS[component]]
        if width is not None and vectors.shape[-1] != width:
            raise IncompatibleModelError(
                f"embedding {self.name} ({self.file}): its {KEYS[component]} vectors are {vectors.shape[-1]} wide but "
                f"the model's {component} reads {width}: the embedding was made for another model family; use one "
                "made for this model"
            )
        return vectors


def _sd15(path: str, name: str, what: str) -> InputError:
    return InputError(
        f"embedding {name} ({path}) is an SD 1.5 embedding ({what}): SDXL reads embeddings made for it, with "
        "'clip_l' (768-wide) and 'clip_g' (1280-wide) vectors for its two text encoders; use the SDXL version of "
        "this embedding, or take its name out of the prompt"
    )


def read_embedding(path: str | os.PathLike[str], name: str | None = None) -> TextualInversion:
    """The SDXL embedding in ``path`` (named ``name``, default the file's name without its extension). An SD 1.5
    embedding (A1111's ``string_to_param``, or one 768-wide tensor), or a file of another layout, is refused naming
    the file and what to use instead.

    Example:
        >>> read_embedding("sdxl/easynegative.safetensors", "easynegative").name     # doctest: +SKIP
        'easynegative'
    """
    file = Path(path).expanduser()
    shown = os.fspath(path)
    name = name if name is not None else file.stem
    if not file.is_file():
        raise InputError(f"embedding {name}: no file {shown}")
    data: Any
    try:
        if file.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(file), device="cpu")
        else:
            data = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn download, a pickle with code in it, a file of another kind
        raise InputError(f"embedding {name} ({shown}) could not be read as an embedding file: {exc}") from None
    if not isinstance(data, Mapping):
        raise InputError(f"embedding {name} ({shown}) holds a {type(data).__name__}, not an embedding's tensors")
    if "string_to_param" in data:
        raise _sd15(shown, name, "A1111's 'string_to_param' layout, for one text encoder")
    if not {"clip_l", "clip_g"} <= data.keys():
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1 and tensors[0].shape[-1] == 768:
            raise _sd15(shown, name, "one set of 768-wide vectors, for one text encoder")
        raise InputError(
            f"embedding {name} ({shown}) is not an SDXL embedding: it holds {', '.join(map(repr, data)) or 'nothing'}, "
            "where SDXL embeddings hold 'clip_l' and 'clip_g' vectors"
        )
    vectors = {}
    for key in ("clip_l", "clip_g"):
        tensor = data[key]
        if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (1, 2) or not tensor.numel():
            raise InputError(f"embedding {name} ({shown}): its {key} is not a set of vectors [n, width]")
        vectors[key] = (tensor[None] if tensor.ndim == 1 else tensor).float()
    if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
        raise InputError(
            f"embedding {name} ({shown}) has {vectors['clip_l'].shape[0]} clip_l vectors but "
            f"{vectors['clip_g'].shape[0]} clip_g vectors; the two encoders read the same number of tokens"
        )
    if vectors["clip_l"].shape[0] > MAX_VECTORS:
        raise InputError(
            f"embedding {name} ({shown}) has {vectors['clip_l'].shape[0]} vectors; a prompt chunk holds "
            f"{MAX_VECTORS} tokens, and an embedding is never split across two"
        )
    return TextualInversion(name, shown, vectors)


def a1111_embeddings(folders: tuple[Path, ...]) -> dict[str, list[Path]]:
    """Every embedding file under ``folders`` (subfolders included), by its A1111 name: the file name without its
    extension (several files of one name are all listed; the caller refuses the name if a prompt uses it)."""
    found: dict[str, list[Path]] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in SUFFIXES and path.stat().st_size:
                paths = found.setdefault(path.stem, [])
                if path.resolve() not in paths:
                    paths.append(path.resolve())
    return found


def comfyui_embedding(folders: tuple[Path, ...], name: str) -> Path | None:
    """The file ComfyUI's ``embedding:name`` reads (see the module), or ``None``. ComfyUI looks in every folder and
    each of its subfolders, in the order of a Python set, so where two of them hold the name its pick is a matter
    of chance: here such a name is refused, naming both."""
    found: list[Path] = []
    for folder in folders:
        for root, _, _ in os.walk(folder, followlinks=True):
            path = _comfyui_in(os.path.abspath(root), name)
            if path is not None and path.resolve() not in found:
                found.append(path.resolve())
    if len(found) > 1:
        listed = "\n".join(f"  {p}" for p in found)
        raise InvalidRequestError(
            f"embedding:{name} is ambiguous: found in\n{listed}\n(ComfyUI would take one of them by chance): write its "
            "path inside the embeddings folder (embedding:sub/name), or keep one"
        )
    return found[0] if found else None


def _comfyui_in(root: str, name: str) -> Path | None:
    """``load_embed``'s look in one folder: the path inside it, as written or with a suffix added."""
    path = os.path.abspath(os.path.join(root, name))
    try:
        if os.path.commonpath((root, path)) != root:
            return None
    except ValueError:  # another drive (Windows)
        return None
    if os.path.isfile(path):
        return Path(path)
    for suffix in COMFYUI_SUFFIXES:
        if os.path.isfile(path + suffix):
            return Path(path + suffix)
    return None
