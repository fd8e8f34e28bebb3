"""Finding and loading SDXL base and refiner models: hub ids, the HF cache, diffusers folders, single files.

Weights are only ever read from safetensors. Everything that can be checked before loading (layout, config,
file headers) is checked first, so a bad model fails fast with a message that names the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .caches import process_cached
from .conditions import Stage
from .defaults import DEFAULT_BASE, DEFAULT_REFINER
from .errors import (
    CheckpointError,
    DeviceError,
    IncompatibleModelError,
    InvalidRequestError,
    MissingWeightsError,
    ModelNotFoundError,
)
from .files import Locator, PathMode, looks_like_hub_id, portable_ref, sha256_of
from .inventory import ModelNeed, pattern_for, weights_need
from .text import TextEncoder

__all__ = [
    "ModelSource",
    "StageModels",
    "load_stage",
    "resolve_source",
    "resolve_in",
    "resolve_hub",
    "check_safetensors",
    "read_safetensors",
    "read_checkpoint",
    "default_device_and_dtype",
    "placement",
    "DEFAULT_BASE",
    "DEFAULT_REFINER",
    "recorded_model",
]

log = logging.getLogger(__name__)


PICKLE_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"}
# What a stage needs from a diffusers folder; the refiner has no first text encoder.
REQUIRED = {
    Stage.BASE: ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
    Stage.REFINER: ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"),
}
HUB_PATTERNS = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer*/*"]


def _hub_patterns(variant: str | None) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns: configs and the one weights variant asked for, never pickles or ONNX exports."""
    if variant:
        return HUB_PATTERNS + [f"*/*.{variant}.safetensors", f"*/*.{variant}.safetensors.index.json"], []
    return HUB_PATTERNS + ["*/*.safetensors", "*/*.safetensors.index.json"], ["*.fp16.*"]


def default_device_and_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 when there is a GPU, else CPU in fp32; either can be overridden. A device that does not exist
    here is refused now, not at the first tensor moved onto it."""
    dev = _device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidRequestError(f"dtype must be a torch floating-point dtype (torch.float16, ...), got {dtype!r}")
    if dtype is None:
        dtype = torch.float16 if dev.type in ("cuda", "mps") else torch.float32
    return dev, dtype


def _device(name: str | torch.device) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {name!r}: this machine has no CUDA device torch can use (use cpu)")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu", "meta"):  # meta: shapes only, for tracing and tests
        raise DeviceError(f"device {name!r}: sdxl-control runs on cpu, cuda or mps")
    return dev


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, for the recipe: what the user named, the folder read, its revision and hash.

    Example:
        >>> ModelSource("stabilityai/stable-diffusion-xl-base-1.0", "/cache/.../snapshots/abc", revision="abc")  # doctest: +SKIP
    """

    name: str
    path: str
    revision: str | None = None
    unet_sha256: str | None = None
    tiny_seed: int | None = None
    # A UNet-only checkpoint loaded over the pipeline's (SDXL-Lightning): a path, or (repo, file) on the hub.
    unet_weights: str | tuple[str, str] | None = None
    local: Literal["file", "folder"] | None = None  # None: a hub id
    sha256: str | None = None  # of a single-file checkpoint: A1111's model hash is its first 10 digits

    def to_json(self, paths: PathMode = "names") -> dict[str, Any]:
        """For the recipe: a hub id as is; a local model by its file or folder name and content (``paths="full"``:
        and its path), as :func:`~sdxl_control.files.portable_ref` records files."""
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if v is not None and k not in ("path", "name")}
        out["name"] = self.name
        if self.local:
            ref = portable_ref(self.path, paths)
            out["name"] = ref.pop("file", None) or ref.pop("folder")
            out.update(ref)
        if isinstance(self.unet_weights, tuple):
            out["unet_weights"] = list(self.unet_weights)
        elif self.unet_weights is not None:
            out["unet_weights"] = portable_ref(self.unet_weights, paths)
        return out


@dataclass
class StageModels:
    """The models of one stage and what its pipeline config says about conditioning.

    Example:
        >>> base = load_stage("stabilityai/stable-diffusion-xl-base-1.0", Stage.BASE)  # doctest: +SKIP
    """

    stage: Stage
    unet: Any
    vae: Any
    text_encoders: tuple[TextEncoder, ...]
    scheduler_config: dict[str, Any]
    requires_aesthetics_score: bool
    force_zeros_for_empty_prompt: bool
    source: ModelSource
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return placement(self.unet)[0]

    @property
    def dtype(self) -> torch.dtype:
        return placement(self.unet)[1]


def placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a model's first parameter.

    diffusers' ``model.device`` / ``model.dtype`` walk every module to answer (milliseconds on a full UNet, several
    times per call); our models are moved and cast whole, so the first parameter speaks for all.
    """
    first = next(model.parameters())
    return first.device, first.dtype


def _fetch_hint(repo_id: str, files: list[str] | None = None) -> str:
    # Name the exact files when the caller needs only those (a LoRA, an adapter): no need to fetch a whole repo.
    exact = [f for f in files or [] if not any(c in f for c in "*?[")]
    what = " ".join([repo_id, *exact]) if exact and len(exact) == len(files or []) else repo_id
    return (
        f"fetch it on a machine with network access with `hf download {what}` (it lands in the HF cache, "
        f"which you can copy here), or pass the path of a local diffusers folder or .safetensors file instead"
    )


def _hub_cache_dir(cache_dir: str | os.PathLike[str] | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_hub(
    repo_id: str,
    *,
    allow: list[str],
    ignore: list[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A hub repo's snapshot folder: from the HF cache, else one download attempt, else one clear error."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError

    where: dict[str, Any] = {
        "revision": revision,
        "cache_dir": cache_dir,
        "allow_patterns": allow,
        "ignore_patterns": ignore,
    }
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **where))
    except HFValidationError:
        raise ModelNotFoundError(f"{repo_id!r} is neither an existing path nor a valid hub model id") from None
    except Exception:  # not in the cache: LocalEntryNotFoundError and friends
        pass
    cache = _hub_cache_dir(cache_dir)
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise MissingWeightsError(
            f"model {repo_id!r} is not in the HF cache ({cache}) and HF_HUB_OFFLINE is set; {_fetch_hint(repo_id, allow)}"
        ) from None
    try:
        return Path(snapshot_download(repo_id, **where))
    except Exception as exc:
        raise MissingWeightsError(
            f"model {repo_id!r} is not in the HF cache ({cache}) and the hub could not be reached "
            f"({type(exc).__name__}); {_fetch_hint(repo_id, allow)}"
        ) from None


def resolve_source(
    source: str | os.PathLike[str],
    *,
    allow: list[str],
    ignore: list[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
) -> Path:
    """An existing local file or folder as is; otherwise a hub id resolved through the HF cache.

    Pickle files are refused here unless the caller passes ``allow_pickle`` because it reads them with
    ``torch.load(weights_only=True)`` (the published FaceID files are pickles).
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise _refuse_pickle(path)
    if path.exists():
        return path
    if not looks_like_hub_id(text):  # anything but owner/name that does not exist is a missing path
        raise ModelNotFoundError(f"no model at {path}: no such file or folder")
    return resolve_hub(text, allow=allow, ignore=ignore, revision=revision, cache_dir=cache_dir)


def resolve_in(
    source: str | os.PathLike[str], relative: str, *, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """A file or folder at ``relative`` inside ``source`` (a local folder or a hub repo, through the HF cache)."""
    # A file is fetched by its exact name (and the fetch hint names it); a folder by everything under it.
    path = resolve_source(source, allow=[pattern_for(relative)], cache_dir=cache_dir) / relative
    if not path.exists():
        raise MissingWeightsError(f"{source} has no {relative}")
    return path


def check_safetensors(path: Path) -> None:
    """Read a safetensors header; a truncated or foreign file fails here with its name, before any loading."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); re-download or re-convert it"
        ) from None


@process_cached(8)
def _read_weights_cached(path: str, size: int, mtime_ns: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A checked safetensors file's tensors, read once per process while the file is unchanged (adapters and LoRAs
    are reused across calls; re-reading hundreds of MB per image would dominate a few-step draft). Treat as
    read-only."""
    check_safetensors(path)
    stat = path.stat()
    return _read_weights_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def read_checkpoint(path: Path) -> Any:
    """A weights file's contents: safetensors (checked; kept per process, see :func:`read_safetensors`), or a pickle
    read as plain tensors only (``torch.load(weights_only=True)``) — the published FaceID, InstantID, PuLID v1 and
    EVA-CLIP files are pickles, whose callers opt in with ``resolve_source(allow_pickle=True)``."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read as weights only ({exc})") from None


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickle checkpoint; sdxl-control only loads safetensors, because unpickling can run arbitrary "
        'code. Convert it once where you trust it: `python -c "import torch, safetensors.torch as s; '
        f"s.save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\"`"
    )


def _component_weights(folder: Path, variant: str | None) -> Path:
    """The safetensors file of one component folder (sharded files: their index)."""
    names = ["diffusion_pytorch_model", "model"]
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for name in names:
        for candidate in (folder / f"{name}{suffix}", folder / f"{name}{suffix}.index.json"):
            if candidate.exists():
                return candidate
    pickles = [p for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise _refuse_pickle(pickles[0])
    raise MissingWeightsError(f"no {'*' + suffix} weights in {folder}")


def _check_unet_config(config: dict[str, Any], where: Path, stage: Stage) -> None:
    if config.get("addition_embed_type") != "text_time":
        cross = config.get("cross_attention_dim")
        family = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}.get(cross, "not SDXL")  # type: ignore[arg-type]
        raise IncompatibleModelError(
            f"{where} is not an SDXL UNet: it has no text_time conditioning (cross_attention_dim={cross}, "
            f"looks like {family})"
        )


def _revision_of(folder: Path) -> str | None:
    # HF cache snapshots live in .../snapshots/<commit>/
    return folder.name if folder.parent.name == "snapshots" else None


def _load_folder(
    folder: Path, name: str, stage: Stage, device: torch.device, dtype: torch.dtype, variant: str | None
) -> StageModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index_file = folder / "model_index.json"
    if not index_file.exists():
        raise IncompatibleModelError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    aesthetic = bool(index.get("requires_aesthetics_score", False))
    if aesthetic != (stage == Stage.REFINER):
        kind = "refiner" if aesthetic else "base model"
        raise IncompatibleModelError(f"{folder} is an SDXL {kind}; it cannot be loaded as the {stage.label}")
    missing = [c for c in REQUIRED[stage] if not (isinstance(index.get(c), list) and index[c][0] is not None)]
    if missing:
        raise IncompatibleModelError(
            f"{folder} lacks the {', '.join(missing)} component(s) an SDXL {stage.label} needs"
        )
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    _check_unet_config(unet_config, folder / "unet", stage)

    weights = {
        c: _component_weights(folder / c, variant)
        for c in ("unet", "vae", "text_encoder", "text_encoder_2")
        if c in REQUIRED[stage]
    }
    for path in weights.values():
        if path.suffix == ".safetensors":
            check_safetensors(path)

    common: dict[str, Any] = {
        "torch_dtype": dtype,
        "use_safetensors": True,
        "local_files_only": True,
        "variant": variant,
    }
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **common)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **common)
    encoders = []
    if stage == Stage.BASE:
        encoders.append(
            TextEncoder(
                CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
                CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **common),
                "text_encoder",
            )
        )
    encoders.append(
        TextEncoder(
            CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True),
            CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **common),
            "text_encoder_2",
        )
    )
    width = sum(e.model.config.hidden_size for e in encoders)
    if unet.config.cross_attention_dim != width:
        raise IncompatibleModelError(
            f"{folder}: the UNet's cross_attention_dim is {unet.config.cross_attention_dim} but the text encoders "
            f"give {width}"
        )
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    for module in (unet, vae, *(e.model for e in encoders)):
        module.to(device).eval().requires_grad_(False)
    tiny = index.get("_sdxl_control_tiny", {})
    unet_file = weights["unet"]
    source = ModelSource(
        name=name,
        path=str(folder),
        revision=_revision_of(folder),
        unet_sha256=sha256_of(unet_file) if unet_file.suffix == ".safetensors" else None,
        tiny_seed=tiny.get("seed"),
        local="folder" if Path(name).expanduser().exists() else None,
    )
    return StageModels(
        stage=stage,
        unet=unet,
        vae=vae,
        text_encoders=tuple(encoders),
        scheduler_config=scheduler_config,
        requires_aesthetics_score=aesthetic,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        source=source,
    )


def _load_single_file(
    path: Path, stage: Stage, device: torch.device, dtype: torch.dtype, config: str | None
) -> StageModels:
    """A single-file checkpoint (A1111/ComfyUI style), converted by diffusers; component configs come from
    ``config`` (a diffusers folder or hub id), which must be local when offline."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    check_safetensors(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise IncompatibleModelError(
            f"{path} is not a single-file Stable Diffusion checkpoint (no model.diffusion_model.* keys)"
        )
    if not any(k.startswith("conditioner.embedders.") for k in keys):
        raise IncompatibleModelError(
            f"{path} has no SDXL text encoders (conditioner.embedders.*): not an SDXL checkpoint"
        )
    cls = StableDiffusionXLPipeline if stage == Stage.BASE else StableDiffusionXLImg2ImgPipeline
    default_config = DEFAULT_BASE if stage == Stage.BASE else DEFAULT_REFINER
    try:
        pipe = cls.from_single_file(
            str(path), config=config or default_config, torch_dtype=dtype, local_files_only=True
        )
    except Exception as exc:
        raise MissingWeightsError(
            f"loading {path} needs the component configs of {config or default_config} ({exc}); pass config= a local "
            f"diffusers folder of the same model family, or {_fetch_hint(config or default_config)}"
        ) from None
    encoders = []
    if getattr(pipe, "text_encoder", None) is not None:
        encoders.append(TextEncoder(pipe.tokenizer, pipe.text_encoder, "text_encoder"))
    encoders.append(TextEncoder(pipe.tokenizer_2, pipe.text_encoder_2, "text_encoder_2"))
    for module in (pipe.unet, pipe.vae, *(e.model for e in encoders)):
        module.to(device).eval().requires_grad_(False)
    return StageModels(
        stage=stage,
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoders=tuple(encoders),
        scheduler_config=dict(pipe.scheduler.config),
        requires_aesthetics_score=stage == Stage.REFINER,
        force_zeros_for_empty_prompt=stage == Stage.BASE,
        source=ModelSource(name=str(path), path=str(path), local="file", sha256=sha256_of(path)),
    )


def load_stage(
    source: str | os.PathLike[str],
    stage: Stage,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    config: str | None = None,
    unet: str | tuple[str, str] | None = None,
) -> StageModels:
    """Load the models of one stage from a hub id, the HF cache, a diffusers folder or a ``.safetensors`` file.

    ``unet`` replaces the UNet's weights by a UNet-only checkpoint of the same architecture: a ``.safetensors`` path
    or ``(repo, file)`` — how SDXL-Lightning's full-UNet models are published.
    """
    dev, dt = default_device_and_dtype(device, dtype)
    allow, ignore = _hub_patterns(variant)
    path = resolve_source(source, allow=allow, ignore=ignore, revision=revision, cache_dir=cache_dir)
    if path.is_dir():
        models = _load_folder(path, str(source), stage, dev, dt, variant)
    elif path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r} (expected a .safetensors file)")
    else:
        models = _load_single_file(path, stage, dev, dt, config)
    if unet is not None:
        _load_unet_weights(models, unet, cache_dir)
    return models


def stage_needs(
    source: str | os.PathLike[str],
    stage: Stage,
    *,
    variant: str | None = None,
    unet: str | tuple[str, str] | None = None,
) -> list[ModelNeed]:
    """The weights :func:`load_stage` looks for with these arguments (for ``sdxl-control models``)."""
    files = ["model_index.json"]
    for component in REQUIRED[stage]:
        if component.startswith(("tokenizer", "scheduler")):
            files.append(f"{component}/*")
        else:  # diffusers' file names, as from_pretrained looks them up for the variant
            stem = "diffusion_pytorch_model" if component in ("unet", "vae") else "model"
            files += [f"{component}/config.json", f"{component}/{stem}{f'.{variant}' if variant else ''}.safetensors"]
    needs = [weights_need(f"{stage.label} model", source, files)]
    if isinstance(unet, tuple):
        needs.append(weights_need(f"{stage.label} UNet weights", unet[0], [pattern_for(unet[1])]))
    elif unet is not None:
        needs.append(weights_need(f"{stage.label} UNet weights", unet))
    return needs


def _load_unet_weights(
    models: StageModels, unet: str | tuple[str, str], cache_dir: str | os.PathLike[str] | None
) -> None:
    from safetensors.torch import load_file

    if isinstance(unet, tuple):
        file = resolve_in(unet[0], unet[1], cache_dir=cache_dir)
    else:
        file = resolve_source(unet, allow=["*.safetensors"], cache_dir=cache_dir)
    if file.suffix != ".safetensors" or not file.is_file():
        raise CheckpointError(f"{file}: a UNet checkpoint must be a .safetensors file")
    check_safetensors(file)
    state = load_file(str(file))
    try:
        models.unet.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise IncompatibleModelError(f"{file} does not fit the {models.stage.label} UNet ({str(exc)[:300]})") from None
    recorded = unet if isinstance(unet, tuple) else str(file)
    models.source = dataclasses.replace(models.source, unet_weights=recorded, unet_sha256=sha256_of(file))


def recorded_model(source: Mapping[str, Any], locate: Locator, what: str) -> str:
    """A model a recipe names (``recipe["models"]["base"]``) as :func:`load_stage` takes it: the hub id, or the local
    file or folder found again by ``locate``."""
    name = source.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"the recipe's {what} has no name")
    if not source.get("local"):
        return name
    key = "file" if source["local"] == "file" else "folder"
    ref = {key: name, **{k: source[k] for k in ("sha256", "fingerprint", "path") if source.get(k)}}
    return str(locate.find(ref, f"the recipe's {what}"))


def recipe_models(
    recipe: Mapping[str, Any], locate: Locator, refiner: bool
) -> tuple[str, str | None, str | tuple[str, str] | None]:
    """(base, refiner, UNet checkpoint) a recipe recorded, as :meth:`Generator.from_pretrained` takes them; the
    refiner only when ``refiner`` (the request switches to one). A recipe made on the tiny models names them by seed."""
    models = recipe.get("models") or {}
    base = models.get("base") or {}
    unet = recipe_unet(recipe, locate)
    if base.get("tiny_seed") is not None:
        from .testing import tiny_models

        tiny = tiny_models(seed=base["tiny_seed"])
        return str(tiny.base), str(tiny.refiner) if refiner else None, unet
    recorded = models.get("refiner")
    if refiner and not recorded:
        raise InvalidRequestError("the recipe switches to a refiner but names none")
    return (
        recorded_model(base, locate, "base model"),
        recorded_model(recorded, locate, "refiner") if refiner and recorded else None,
        unet,
    )


def recipe_unet(recipe: Mapping[str, Any], locate: Locator) -> str | tuple[str, str] | None:
    """The UNet-only checkpoint a recipe's base recorded: ``(repo, file)`` on the hub, or the local file found again."""
    unet = ((recipe.get("models") or {}).get("base") or {}).get("unet_weights")
    if isinstance(unet, list):
        return (unet[0], unet[1])
    if isinstance(unet, dict):
        return str(locate.find(unet, "the recipe's UNet checkpoint"))
    return unet
