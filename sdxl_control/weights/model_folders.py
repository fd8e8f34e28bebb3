"""Models a user already keeps in a ComfyUI or A1111 install, found by name.

``--models-dir`` (or ``SDXL_CONTROL_MODELS_DIR``, several joined by ``os.pathsep``) names an install, its ``models``
folder, or a folder holding ComfyUI's ``extra_model_paths.yaml``. Each kind of model is looked for in the folders
that tool keeps it in:

==================  =======================  ==========================================
kind                ComfyUI (``models/...``)  A1111 (``models/...``)
==================  =======================  ==========================================
``checkpoints``     ``checkpoints``          ``Stable-diffusion``
``loras``           ``loras``                ``Lora``, ``LyCORIS``
``controlnet``      ``controlnet``           ``ControlNet`` (and the extension's ``models``)
``ipadapter``       ``ipadapter``            ``ControlNet`` (where the extension keeps them)
``upscale_models``  ``upscale_models``       ``ESRGAN``, ``RealESRGAN``, ``SwinIR``
``vae``             ``vae``                  ``VAE``
``vae_approx``      ``vae_approx``           ``VAE-approx``
``embeddings``      ``embeddings``           ``embeddings`` (beside ``models``, not in it)
==================  =======================  ==========================================

and ComfyUI's ``clip_vision``, ``insightface`` (face packs under ``insightface/models``), ``instantid``, ``pulid``
and ``photomaker``. A name is a file's name with or without its extension, or its path inside the kind's folder
(``sdxl/juggernautXL_v9.safetensors``); subfolders are searched. A name found in two places is refused, naming both.

Example:
    >>> folders = ModelFolders.of(["~/ComfyUI"])                                          # doctest: +SKIP
    >>> folders.find("loras", "add-detail-xl")                                             # doctest: +SKIP
    PosixPath('/home/me/ComfyUI/models/loras/add-detail-xl.safetensors')
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..base.errors import InputError, InvalidRequestError

__all__ = ["ModelFolders", "MODELS_DIR_ENV", "MODEL_SUFFIXES"]

MODELS_DIR_ENV = "SDXL_CONTROL_MODELS_DIR"
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".onnx")
COMFYUI_KINDS = (
    "checkpoints", "loras", "controlnet", "ipadapter", "clip_vision", "upscale_models", "vae", "vae_approx",
    "insightface", "instantid", "pulid", "photomaker", "embeddings",
)  # fmt: skip
A1111_FOLDERS = {
    "checkpoints": ("Stable-diffusion",),
    "loras": ("Lora", "LyCORIS"),
    "controlnet": ("ControlNet", "../extensions/sd-webui-controlnet/models"),
    "ipadapter": ("ControlNet", "../extensions/sd-webui-controlnet/models"),
    "upscale_models": ("ESRGAN", "RealESRGAN", "SwinIR"),
    "vae": ("VAE",),
    "vae_approx": ("VAE-approx",),
    "embeddings": ("../embeddings",),  # textual inversions live in the install's own embeddings/ folder
}
EXTRA_PATHS = "extra_model_paths.yaml"
# Kinds whose models are folders (an insightface pack is a folder of ONNX files).
FOLDER_KINDS = ("insightface",)


@dataclass(frozen=True)
class ModelFolders:
    """The folders each kind of model is looked for in, in order.

    Example:
        >>> ModelFolders({"loras": (Path("/models/loras"),)}).kinds()
        ('loras',)
    """

    folders: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, roots: Iterable[str | os.PathLike[str]] = (), *, environment: bool = True) -> ModelFolders:
        """The folders of every install in ``roots``, then of those ``SDXL_CONTROL_MODELS_DIR`` names (with
        ``environment``). A root that is no install is refused, saying what was looked for."""
        # Each root with where it came from, for a message that says what to change.
        given = [(Path(r).expanduser(), f"--models-dir {os.fspath(r)!r}") for r in roots]
        if environment:
            value = os.environ.get(MODELS_DIR_ENV, "")
            given += [(Path(p).expanduser(), f"{MODELS_DIR_ENV}={value!r}") for p in value.split(os.pathsep) if p]
        folders: dict[str, list[Path]] = {}
        for root, origin in given:
            try:
                found = _install_folders(root)
            except InputError as exc:
                fix = f"set {MODELS_DIR_ENV} to an install, or unset it" if origin.startswith(MODELS_DIR_ENV) else ""
                raise InputError(f"{origin}: {exc}{'; ' + fix if fix else ''}") from None
            for kind, paths in found.items():
                folders.setdefault(kind, []).extend(p for p in paths if p not in folders.get(kind, []))
        return cls({kind: tuple(paths) for kind, paths in folders.items()})

    def kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind, paths in self.folders.items() if paths)

    def find(self, kind: str, name: str | os.PathLike[str]) -> Path | None:
        """The one model of ``kind`` called ``name`` (see the module), or ``None``; two are refused, naming both."""
        text = str(name)
        found: list[Path] = []
        for folder in self.folders.get(kind, ()):
            direct = folder / text
            if text and direct.exists() and (direct.is_file() or kind in FOLDER_KINDS):
                found.append(direct)
                continue
            if "/" in text or os.sep in text:
                continue
            found += [path for path in self._entries(kind, folder) if _called(path, text)]
        unique = list(dict.fromkeys(p.resolve() for p in found))
        if len(unique) > 1:
            listed = "\n".join(f"  {p}" for p in unique)
            raise InvalidRequestError(
                f"{kind} {text!r} is ambiguous: found in\n{listed}\ngive its path, or its path inside the folder"
            )
        return unique[0] if unique else None

    def listing(self) -> dict[str, list[Path]]:
        """Every model found, by kind."""
        return {
            kind: sorted({p.resolve() for folder in folders for p in self._entries(kind, folder)})
            for kind, folders in self.folders.items()
        }

    @staticmethod
    def _entries(kind: str, folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        if kind in FOLDER_KINDS:
            packs = folder / "models" if (folder / "models").is_dir() else folder
            return [p for p in packs.iterdir() if p.is_dir() and any(p.glob("*.onnx"))]
        return [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES]


def _called(path: Path, name: str) -> bool:
    lowered = name.lower()
    return path.name.lower() == lowered or (path.stem.lower() == lowered and path.suffix.lower() in MODEL_SUFFIXES)


def _install_folders(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise InputError(f"models folder {root}: no such folder")
    models = root / "models" if (root / "models").is_dir() else root
    folders: dict[str, list[Path]] = {}
    if (models / "checkpoints").is_dir() or any((models / kind).is_dir() for kind in COMFYUI_KINDS[1:]):
        for kind in COMFYUI_KINDS:
            folders.setdefault(kind, []).append(models / kind)
    if (models / "Stable-diffusion").is_dir():
        for kind, names in A1111_FOLDERS.items():
            folders.setdefault(kind, []).extend((models / n).resolve() for n in names)
    extra = root / EXTRA_PATHS
    if extra.is_file():
        for kind, paths in _extra_paths(extra).items():
            folders.setdefault(kind, []).extend(paths)
    if not folders:
        raise InputError(
            f"models folder {root}: neither a ComfyUI install (models/checkpoints, models/loras, ...) nor an A1111 "
            f"one (models/Stable-diffusion), and no {EXTRA_PATHS}"
        )
    return folders


def _extra_paths(file: Path) -> dict[str, list[Path]]:
    """ComfyUI's ``extra_model_paths.yaml``: sections of ``base_path`` and ``kind: folder`` entries (one folder per
    line where several), relative to ``base_path`` (itself relative to the file's folder)."""
    import yaml

    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{file}: not readable YAML ({exc})") from None
    if not isinstance(data, Mapping):
        raise InputError(f"{file}: expected sections of model folders, got {type(data).__name__}")
    folders: dict[str, list[Path]] = {}
    for section, entries in data.items():
        if not isinstance(entries, Mapping):
            raise InputError(f"{file}: section {section!r} is not a mapping of model folders")
        base = Path(str(entries.get("base_path", "."))).expanduser()
        base = base if base.is_absolute() else file.parent / base
        for kind, value in entries.items():
            if kind in COMFYUI_KINDS and isinstance(value, str):
                folders.setdefault(kind, []).extend(_under(base, value.splitlines()))
    return folders


def _under(base: Path, lines: Sequence[str]) -> list[Path]:
    paths = [Path(line.strip()).expanduser() for line in lines if line.strip()]
    return [p if p.is_absolute() else base / p for p in paths]
