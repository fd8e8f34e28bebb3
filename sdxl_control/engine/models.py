"""Loading the models of a stage (SDXL base or refiner) from what :mod:`sdxl_control.weights.hub` finds: a diffusers
folder or a single ``.safetensors`` checkpoint, optionally with a UNet-only checkpoint over its UNet.

Weights are only ever read from safetensors. Everything that can be checked before loading (layout, config,
file headers) is checked first, so a bad model fails fast with a message that names the file. Finding weights lives in
:mod:`~sdxl_control.weights.hub`, reading them in :mod:`~sdxl_control.weights.checkpoints`, devices in
:mod:`~sdxl_control.engine.devices`, and what a recipe's models are in :mod:`~sdxl_control.records.recipe`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..base.errors import CheckpointError, IncompatibleModelError, MissingWeightsError
from ..base.files import PathMode, portable, portable_ref, sha256_of
from ..base.model_refs import ModelRef
from ..protocol.conditions import Stage
from ..protocol.text import TextEncoder
from ..weights.checkpoints import PICKLE_SUFFIXES, check_safetensors, checkpoint_kind, refuse_pickle
from ..weights.hub import fetch_hint, resolve_in, resolve_source
from ..weights.inventory import ModelNeed, pattern_for, weights_need
from ..weights.sdxl_configs import sdxl_config_folder
from .devices import default_device_and_dtype, placement

__all__ = ["ModelSource", "StageModels", "load_stage", "stage_needs"]

log = logging.getLogger(__name__)


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
    # A UNet-only checkpoint loaded over the pipeline's (SDXL-Lightning).
    unet_weights: ModelRef | None = None
    local: Literal["file", "folder"] | None = None  # None: a hub id
    sha256: str | None = None  # of a single-file checkpoint: A1111's model hash is its first 10 digits

    def to_json(self, paths: PathMode = "names") -> dict[str, Any]:
        """For the recipe: a hub id as is; a local model by its file or folder name and content (``paths="full"``:
        and its path), as :func:`~sdxl_control.base.files.portable_ref` records files."""
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if v is not None and k not in ("path", "name")}
        out["name"] = self.name
        if self.local:
            ref = portable_ref(self.path, paths)
            out["name"] = ref.pop("file", None) or ref.pop("folder")
            out.update(ref)
        if self.unet_weights is not None:
            out["unet_weights"] = portable(self.unet_weights.to_json(), paths)
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
    # What a single file's marker keys (v_pred, ztsnr) ask of the scheduler config, kept apart from the config they
    # were read with so that a request can read the file without them (see sdxl_control.protocol.prediction).
    marked: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return placement(self.unet)[0]

    @property
    def dtype(self) -> torch.dtype:
        return placement(self.unet)[1]


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
        raise refuse_pickle(pickles[0])
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
    ``config`` (a diffusers folder or hub id, which must be local when offline), else SDXL 1.0's, packaged."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    check_safetensors(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if not any(k.startswith("model.diffusion_model.") for k in keys) or not any(
        k.startswith("conditioner.embedders.") for k in keys
    ):
        raise IncompatibleModelError(
            f"{path} is not a single-file SDXL checkpoint (a UNet under model.diffusion_model.*, text encoders under "
            f"conditioner.embedders.*): it holds {checkpoint_kind(keys)}"
        )
    from ..protocol.prediction import checkpoint_prediction

    # diffusers' conversion ignores the marker keys ComfyUI and Forge read (v_pred, ztsnr): read them here, from the
    # header, before anything loads (an EDM checkpoint is refused).
    prediction = checkpoint_prediction(keys, str(path))
    cls = StableDiffusionXLPipeline if stage == Stage.BASE else StableDiffusionXLImg2ImgPipeline
    if config is not None:
        try:
            pipe = cls.from_single_file(str(path), config=config, torch_dtype=dtype, local_files_only=True)
        except Exception as exc:
            raise MissingWeightsError(
                f"loading {path} needs the component configs of {config} ({exc}); pass config= a local diffusers "
                f"folder of the same model family, or {fetch_hint(config)}"
            ) from None
    else:
        with sdxl_config_folder(stage) as folder:
            try:
                pipe = cls.from_single_file(str(path), config=str(folder), torch_dtype=dtype, local_files_only=True)
            except Exception as exc:
                raise IncompatibleModelError(
                    f"{path} does not read with SDXL 1.0's {stage.label} configs ({exc}); if it is a model of another "
                    f"architecture, name a local diffusers folder of it ({stage.label}_config=)"
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
        marked=prediction,
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
    unet: ModelRef | None = None,
) -> StageModels:
    """Load the models of one stage from a hub id, the HF cache, a diffusers folder or a ``.safetensors`` file.

    ``unet`` replaces the UNet's weights by a UNet-only checkpoint of the same architecture: a ``.safetensors`` path,
    or a file in a repo — how SDXL-Lightning's full-UNet models are published.
    """
    dev, dt = default_device_and_dtype(device, dtype)
    allow, ignore = _hub_patterns(variant)
    path = resolve_source(source, allow=allow, ignore=ignore, revision=revision, cache_dir=cache_dir)
    if path.is_dir():
        _check_configs(path)
        models = _load_folder(path, str(source), stage, dev, dt, variant)
    elif path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r} (expected a .safetensors file)")
    else:
        models = _load_single_file(path, stage, dev, dt, config)
    if unet is not None:
        _load_unet_weights(models, unet, cache_dir)
    return models


def _check_configs(folder: Path) -> None:
    """Refuse a model folder whose JSON files (``model_index.json``, each component's config) do not parse, naming
    the file: the loaders would fail deep inside with a bare decoding error."""
    # Config files only: a tokenizer.json (megabytes) is parsed by its own loader, which names it on failure.
    for file in [folder / "model_index.json", *sorted(folder.glob("*/*config*.json"))]:
        if not file.is_file():
            continue
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{file}: not valid JSON ({exc}); the model folder is damaged: fetch it again"
            ) from None


def stage_needs(
    source: str | os.PathLike[str],
    stage: Stage,
    *,
    variant: str | None = None,
    unet: ModelRef | None = None,
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
    if unet is not None and unet.weight_name is not None:
        needs.append(weights_need(f"{stage.label} UNet weights", unet.source, [pattern_for(unet.weight_name)]))
    elif unet is not None:
        needs.append(weights_need(f"{stage.label} UNet weights", unet.source))
    return needs


def _take_tensors(module: torch.nn.Module, state: dict[str, torch.Tensor], misfit: str) -> None:
    """Put ``state``'s tensors in place of ``module``'s parameters and buffers, each moved to the device and dtype of
    the one it replaces: for a file already in them nothing is copied (the tensor stays a view of the file's memory
    map), and on a GPU one tensor at a time is new. Copying into the parameters instead (``load_state_dict``) would
    make the module's old weights resident beside the file's: twice the UNet at the peak. Checked whole before any
    is put in place; ``misfit`` starts the error."""
    own: dict[str, torch.Tensor] = dict(module.state_dict(keep_vars=True))  # the keys load_state_dict takes
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [f"{k} {tuple(state[k].shape)} for {tuple(own[k].shape)}" for k in own.keys() & state.keys()
              if state[k].shape != own[k].shape]  # fmt: skip
    faults = [f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
              for what, names in (("missing", missing), ("unexpected", unexpected), ("shapes", sorted(shapes)))
              if names]  # fmt: skip
    if faults:
        raise IncompatibleModelError(f"{misfit} ({'; '.join(faults)})")
    for name in list(state):
        old = own.pop(name)
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        value = state.pop(name).to(old.device, old.dtype)
        if isinstance(old, torch.nn.Parameter):
            setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(leaf, value)
        del old


def _load_unet_weights(models: StageModels, unet: ModelRef, cache_dir: str | os.PathLike[str] | None) -> None:
    from safetensors.torch import load_file

    if unet.weight_name is not None:
        file = resolve_in(unet.source, unet.weight_name, cache_dir=cache_dir)
    else:
        file = resolve_source(unet.source, allow=["*.safetensors"], cache_dir=cache_dir)
    if file.suffix != ".safetensors" or not file.is_file():
        raise CheckpointError(f"{file}: a UNet checkpoint must be a .safetensors file")
    check_safetensors(file)
    _take_tensors(models.unet, load_file(str(file)), f"{file} does not fit the {models.stage.label} UNet")
    recorded = unet if unet.weight_name is not None else ModelRef(str(file))
    models.source = dataclasses.replace(models.source, unet_weights=recorded, unet_sha256=sha256_of(file))
