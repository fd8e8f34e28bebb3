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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import MissingWeightsError
from ..base.files import FILE_SUFFIXES, looks_like_hub_id

__all__ = [
    "ModelNeed", "Presence", "check", "fetch", "report", "unique", "weights_need", "pattern_for", "human_size",
    "download_size", "ensure", "missing_advice", "fetch_commands", "home_relative",
]  # fmt: skip

# Licence notes shown beside models whose terms restrict use; the rest are Apache-2.0, MIT or OpenRAIL++.
INSIGHTFACE_LICENCE = "insightface's models are for non-commercial research only"

_SDXL_BASE, _SDXL_REFINER, _LIGHTNING = (
    "stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-refiner-1.0", "ByteDance/SDXL-Lightning"
)  # fmt: skip
# Download sizes (bytes, rounded) of the published weights files the built-in names fetch, as their hubs list them
# (SDXL's fp32 files are its components' parameter counts x 4 bytes; Lightning's UNets, fp16, x 2): the missing-model
# advice adds them up. Configs and tokenizers are too small to count.
PUBLISHED_SIZES: dict[tuple[str, str], int] = {
    (_SDXL_BASE, "unet/diffusion_pytorch_model.safetensors"): 10_270_000_000,
    (_SDXL_BASE, "text_encoder/model.safetensors"): 492_000_000,
    (_SDXL_BASE, "text_encoder_2/model.safetensors"): 2_780_000_000,
    (_SDXL_BASE, "vae/diffusion_pytorch_model.safetensors"): 335_000_000,
    (_SDXL_REFINER, "unet/diffusion_pytorch_model.safetensors"): 9_090_000_000,
    (_SDXL_REFINER, "text_encoder_2/model.safetensors"): 2_780_000_000,
    (_SDXL_REFINER, "vae/diffusion_pytorch_model.safetensors"): 335_000_000,
    ("madebyollin/taesdxl", "*.safetensors"): 9_800_000,
    **{(_LIGHTNING, f"sdxl_lightning_{n}step_lora.safetensors"): 394_000_000 for n in (2, 4, 8)},
    **{(_LIGHTNING, f"sdxl_lightning_{n}step_unet.safetensors"): 5_140_000_000 for n in (2, 4, 8)},
    (_LIGHTNING, "sdxl_lightning_1step_unet_x0.safetensors"): 5_140_000_000,
    ("guozinan/PuLID", "pulid_v1.1.safetensors"): 984_000_000,
    ("guozinan/PuLID", "pulid_v1.bin"): 1_580_000_000,
    ("QuanSun/EVA-CLIP", "EVA02_CLIP_L_336_psz14_s6B.pt"): 856_000_000,
    ("InstantX/InstantID", "ip-adapter.bin"): 1_690_000_000,
    ("InstantX/InstantID", "ControlNetModel/diffusion_pytorch_model.safetensors"): 2_500_000_000,
    ("TencentARC/PhotoMaker", "photomaker-v1.bin"): 934_000_000,
    ("TencentARC/PhotoMaker-V2", "photomaker-v2.bin"): 1_800_000_000,
}
_WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".onnx")


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


def download_size(need: ModelNeed) -> int | None:
    """What fetching ``need`` downloads, in bytes, where the sizes of its weights files are known (see
    :data:`PUBLISHED_SIZES`), else None.

    Example:
        >>> human_size(download_size(ModelNeed("PuLID", "guozinan/PuLID", ("pulid_v1.1.safetensors",))))
        '984.0 MB'
    """
    sizes = [PUBLISHED_SIZES.get((need.source, f)) for f in need.files if f.endswith(_WEIGHTS_SUFFIXES)]
    if not sizes or None in sizes:
        return None
    return sum(s for s in sizes if s is not None)


def missing_advice(missing: Iterable[ModelNeed]) -> str:
    """One message for every missing need of a run: each with the command that fetches it and its size, and the
    total.

    Example:
        >>> print(missing_advice([ModelNeed("PuLID", "guozinan/PuLID", ("pulid_v1.1.safetensors",))]))
        1 model this run needs is not on this machine:
          PuLID: guozinan/PuLID (984.0 MB)
            hf download guozinan/PuLID pulid_v1.1.safetensors
        984.0 MB in all. Fetch on a machine with network access (the files land in the HF cache, ~/.cache/huggingface, which you can copy here), or name local folders or .safetensors files instead; `sdxl-control models` lists what each preset needs.
    """  # noqa: E501
    missing = unique(missing)
    lines = [f"{len(missing)} model{'s' if len(missing) > 1 else ''} this run needs "
             f"{'are' if len(missing) > 1 else 'is'} not on this machine:"]  # fmt: skip
    sizes = [download_size(need) for need in missing]
    for need, size in zip(missing, sizes, strict=True):
        lines.append(f"  {need.what}: {need.source}" + (f" ({human_size(size)})" if size is not None else ""))
        lines.append(f"    {need.fetch_command()}")
    known = sum(s for s in sizes if s is not None)
    total = f"{'at least ' if None in sizes else ''}{human_size(known)} in all. " if known else ""
    lines.append(
        f"{total}Fetch on a machine with network access (the files land in the HF cache, ~/.cache/huggingface, "
        "which you can copy here), or name local folders or .safetensors files instead; `sdxl-control models` lists "
        "what each preset needs."
    )
    return "\n".join(lines)


def ensure(needs: Iterable[ModelNeed]) -> None:
    """Every hub need of ``needs`` on this machine before anything loads: missing ones are fetched when the hub can
    be reached; otherwise one :class:`MissingWeightsError` lists them all (:func:`missing_advice`). Local paths are
    left to their loaders, which say what is wrong with them.

    Example:
        >>> ensure([ModelNeed("base model", "stabilityai/stable-diffusion-xl-base-1.0", ("model_index.json",))])  # doctest: +SKIP
    """  # noqa: E501
    from huggingface_hub import constants

    # Needs no hub serves (face packs) say how to get them; other local paths are for their loaders to judge.
    missing = [n for n in unique(needs) if (n.on_hub or n.how is not None) and not check(n).present]
    if missing and not constants.HF_HUB_OFFLINE:
        unreached: list[ModelNeed] = []
        for need in missing:
            if need.on_hub and not unreached:  # once the hub did not answer, the rest are not tried
                try:
                    fetch(need)
                    continue
                except MissingWeightsError:
                    pass
            unreached.append(need)
        missing = unreached
    if missing:
        raise MissingWeightsError(missing_advice(missing))


def unique(needs: Iterable[ModelNeed]) -> list[ModelNeed]:
    """``needs`` without repeats (the same weights named by two conditions are fetched once)."""
    seen: dict[tuple[str, tuple[str, ...]], ModelNeed] = {}
    for need in needs:
        seen.setdefault((need.source, need.files), need)
    return list(seen.values())


def report(
    needs: Iterable[ModelNeed],
    checker: Callable[[ModelNeed], Presence] = check,
    users: Mapping[ModelNeed, Sequence[str]] | None = None,
) -> tuple[str, bool]:
    """A table of ``needs``, one line each: present (size, where) or missing (its download size, or ``size ?``
    where no size is known), licence notes; then, when some are missing, their count and total size and the
    command that fetches them, once per repository. ``users`` names what needs each (the presets). Also whether
    all are present. Paths under the home folder are shown from ``~``.

    Example:
        >>> need = ModelNeed("PuLID", "guozinan/PuLID", ("pulid_v1.1.safetensors",))
        >>> print(report([need], lambda n: Presence(n, None, 0, n.files))[0])
          MISSING   984.0 MB  PuLID: guozinan/PuLID [pulid_v1.1.safetensors]
          1 missing, 984.0 MB in all; get them with:
            hf download guozinan/PuLID pulid_v1.1.safetensors
    """
    lines, missing = [], []
    for need in unique(needs):
        found = checker(need)
        listed = ", ".join(need.files) if len(need.files) <= 3 else f"{len(need.files)} files"
        where = home_relative(need.source) + (f" [{listed}]" if need.files else "")
        by = f"  ({_users(users[need])})" if users and users.get(need) else ""
        if found.present:
            lines.append(f"  present  {human_size(found.size):>9}  {need.what}: {where}{by}")
        else:
            missing.append(need)
            size = download_size(need)
            lines.append(f"  MISSING  {'size ?' if size is None else human_size(size):>9}  {need.what}: {where}{by}")
        if need.licence:
            lines.append(f"           licence: {need.licence}")
    if missing:
        sizes = [download_size(need) for need in missing]
        known = sum(s for s in sizes if s is not None)
        total = f"{'at least ' if None in sizes else ''}{human_size(known)} in all" if known else "sizes unknown"
        lines.append(f"  {len(missing)} missing, {total}; get them with:")
        lines.extend(f"    {home_relative(command)}" for command in fetch_commands(missing))
    return "\n".join(lines), not missing


def _users(names: Sequence[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{len(names)} presets"


def fetch_commands(missing: Iterable[ModelNeed]) -> list[str]:
    """The commands that fetch ``missing``: one ``hf download`` per hub repository (every file of it that a need
    names), and each other way of getting weights once.

    Example:
        >>> fetch_commands([ModelNeed("a", "x/y", ("a.safetensors",)), ModelNeed("b", "x/y", ("b.safetensors",))])
        ['hf download x/y a.safetensors b.safetensors']
    """
    by_repo: dict[str, list[str]] = {}
    others: list[str] = []
    for need in unique(missing):
        if need.how is None and looks_like_hub_id(need.source):
            files = by_repo.setdefault(need.source, [])
            files.extend(f for f in need.files if f not in files)
        elif need.fetch_command() not in others:
            others.append(need.fetch_command())
    hub = [ModelNeed(repo, repo, tuple(files)).fetch_command() for repo, files in by_repo.items()]
    return [*hub, *others]


def home_relative(text: str | os.PathLike[str]) -> str:
    """``text`` (a path, or a message holding paths) with the home folder written ``~``: what output shows of this
    machine's paths.

    Example:
        >>> home_relative(Path.home() / "models" / "x.safetensors")
        '~/models/x.safetensors'
    """
    text = os.fspath(text)
    home = str(Path.home()).rstrip("/")
    if not home:
        return text
    return "~" if text == home else text.replace(home + "/", "~/")


def pattern_for(relative: str) -> str:
    """The hub pattern that fetches ``relative`` inside a repo: the file itself, or everything under a folder."""
    return relative if Path(relative).suffix else f"{relative}/*"


def weights_need(what: str, source: str | os.PathLike[str], files: Iterable[str] = (), **notes: str) -> ModelNeed:
    """A need for ``files`` in ``source``, or for ``source`` itself when it names a weights file."""
    text = os.fspath(source)
    inside = () if Path(text).suffix.lower() in FILE_SUFFIXES else tuple(files)
    return ModelNeed(what, text, inside, **notes)
