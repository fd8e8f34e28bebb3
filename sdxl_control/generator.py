"""The two-stage SDXL generator: a request in, images with their recipe out."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from . import __version__
from .caches import clear_caches
from .conditions import Condition, PrepareContext, Prepared, Stage, validate_conditions
from .defaults import DEFAULT_BASE, MAX_SIDE
from .detailer import FaceDetailer, detail_faces
from .devices import check_device, placement
from .emphasis import Emphasis, check_syntax
from .errors import IncompatibleModelError, InputError, InvalidRequestError, SdxlControlError
from .fast import FastPath, FastPathHandle, apply_fast_path
from .files import PATH_MODES, Locator, PathMode, portable
from .guidance import guidance_for
from .infotext import Infotext
from .loop import ProgressCallback, PromptSegment, StageInputs, denoise
from .model_refs import ModelRef
from .models import StageModels, load_stage
from .recipe import RecipeImage, Result, check_recipe
from .schedule import StageSchedule, make_scheduler, scheduler_name, scheduler_spec, split_schedule
from .start import INPAINT_CHANNELS, start_images, start_latents
from .step_cache import StepCache
from .storage import FP8_MATMUL, check_storage, store_weights
from .text import LongPrompts, MicroConditioning, TextChannel, prompt_segments, time_ids
from .upscale import LANCZOS, LATENT_MODES, check_upscaler, upscale_images, upscale_latents
from .vae import NonFiniteLatentsError, decode_latents, encode_pixels, load_decoder, load_vae, vae_scale_factor
from .validation import check_fields, unknown_keys

if TYPE_CHECKING:
    from .residency import KeptWeights

__all__ = ["GenerationRequest", "Generator", "LastLoaded"]

TRAIN_TIMESTEPS = 1000  # SDXL's training schedule: no step count or timestep beyond it means anything
MAX_IMAGES = 64
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds
# Request fields that are images a user gives: recorded by name and content, found again by a re-run.
IMAGE_FIELDS = ("init_image", "mask")
START_FIELDS = ("init_image", "strength", "mask", "mask_blur", "refiner_only", "outpaint", "padding_mask_crop")
HIRES_FIELDS = ("hires_scale", "hires_strength", "hires_steps", "upscaler")
MAX_HIRES = 4.0


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides a generation; with the models, it is the recipe.

    ``size`` is (width, height): by default 1024x1024, or, starting from an image, the image's own size (whole
    multiples of 8) plus any ``outpaint``. ``seed`` seeds the first image; image ``i`` of a batch uses ``seed + i``,
    so any image can be re-made alone. ``refiner_switch`` is the fraction of the schedule the base denoises before the
    refiner takes over (diffusers' ``denoising_end``/``denoising_start``); ``None`` runs the base alone.
    ``vae_tiling`` decodes tile by tile: flat memory for large images, small differences along tile seams.
    ``decoder`` names a tiny autoencoder (e.g. ``"madebyollin/taesdxl"``) that decodes instead of the VAE: a draft
    preview at a fraction of the VAE's cost, close to but not the VAE's image.

    ``vae`` replaces the checkpoints' VAE for the call (a diffusers folder or hub id, or one ``.safetensors`` file in
    diffusers' or the original layout, as ``sdxl_vae.safetensors`` is kept), for encoding and decoding both.

    ``init_image`` (a path, PIL image or array) starts from an image instead of noise: ``strength`` (0 to 1, default
    0.75 — A1111's) is how much of the schedule runs from it, entered at ``1 - strength`` as diffusers does, so
    ``int(steps * strength)`` steps run; 0 keeps the image as it is, for the hires fix or the face detailer to work on.
    ``mask`` (white: repaint; a path, PIL image or array) repaints only its area, with a regular UNet (the original
    put back outside the mask after every step) or an inpainting UNet (9 input channels); its ``strength`` defaults
    to 1 and ``mask_blur`` (pixels) feathers its edge. See :mod:`sdxl_control.start` for how sizes are fitted.

    ``detailer`` (a :class:`~sdxl_control.detailer.FaceDetailer`, or ``True`` for ADetailer's defaults) repaints
    every face of the finished images at the request's size, each with the identity condition it resembles.

    ``long_prompts``: a prompt (or negative prompt) beyond 75 CLIP tokens is read in 75-token chunks, joined
    (``"chunks"``, A1111's way: ``BREAK`` and commas end chunks; the shorter of prompt and negative prompt is followed
    by empty-prompt chunks), or cut to its first 75 tokens (``"truncate"``, diffusers' way). A prompt of 75 tokens
    or fewer reads the same both ways.

    ``emphasis``: how weighting syntax in the prompts is read: ``"a1111"`` (``(word:1.2)``, ``(word)``, ``[word]``,
    ``\\(``, A1111's weighting), ``"comfyui"`` (ComfyUI's syntax, weighting and chunks) or ``"off"`` (brackets are
    text). See :mod:`sdxl_control.emphasis`.

    ``step_cache`` (DeepCache): each stage computes the whole UNet every ``step_cache`` steps and reuses its deep
    features in between, computing only the shallow path of skip connection ``step_cache_branch`` (0: the cheapest,
    DeepCache's SDXL setting). 1 computes every step whole. See :mod:`sdxl_control.step_cache`.

    Example:
        >>> GenerationRequest("a red fox", steps=20, size=(1024, 768), seed=3).seeds
        (3,)
    """

    prompt: str
    negative_prompt: str | None = None
    steps: int = 30
    guidance: float = 5.0
    guidance_rescale: float = 0.0
    refiner_switch: float | None = None
    size: tuple[int, int] = None  # type: ignore[assignment]  # None: decided by __post_init__ (see above)
    seed: int | None = None
    num_images: int = 1
    scheduler: str | None = None
    scheduler_options: Mapping[str, Any] = field(default_factory=dict)
    timesteps: tuple[int, ...] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    vae_tiling: bool = False
    decoder: str | None = None
    vae: str | None = None
    init_image: Any = None
    strength: float | None = None
    mask: Any = None
    mask_blur: int = 0
    refiner_only: bool = False
    outpaint: tuple[int, int, int, int] | None = None
    padding_mask_crop: int | None = None
    hires_scale: float | None = None
    hires_strength: float = 0.5
    hires_steps: int | None = None
    upscaler: str = LANCZOS
    detailer: FaceDetailer | None = None
    long_prompts: LongPrompts = "chunks"
    emphasis: Emphasis = "a1111"
    step_cache: int = 1
    step_cache_branch: int = 0
    conditions: tuple[Condition, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.detailer, FaceDetailer):  # true or its settings, as a job file gives it
            object.__setattr__(self, "detailer", FaceDetailer.of(self.detailer))
        if isinstance(self.outpaint, tuple) and all(isinstance(v, int) for v in self.outpaint):
            self._check_padding()  # before the size it may decide
        derived = self.size is None  # the init image's own size (plus any outpaint): named if it is refused
        if self.size is None:
            object.__setattr__(self, "size", self._default_size())
        check_fields(self, "the request")
        for text, where in ((self.prompt, "the prompt"), (self.negative_prompt, "the negative prompt")):
            if isinstance(text, str):
                check_syntax(text, self.emphasis, where)
        if len(self.size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in self.size):
            raise InvalidRequestError(f"the request: size must be (width, height) in whole pixels, got {self.size!r}")
        object.__setattr__(self, "size", tuple(self.size))
        object.__setattr__(self, "conditions", tuple(self.conditions))
        object.__setattr__(self, "scheduler_options", dict(self.scheduler_options))
        if isinstance(self.scheduler, str):  # A1111's and ComfyUI's names recorded as ours
            object.__setattr__(self, "scheduler", scheduler_name(self.scheduler))
        if self.timesteps is not None:
            if not self.timesteps or not all(isinstance(t, int) and 0 <= t < TRAIN_TIMESTEPS for t in self.timesteps):
                raise InvalidRequestError(
                    f"timesteps must be whole numbers in 0..{TRAIN_TIMESTEPS - 1}, got {list(self.timesteps)[:8]}"
                )
            # An explicit schedule (as some distilled models publish) fixes the step count.
            object.__setattr__(self, "timesteps", tuple(self.timesteps))
            object.__setattr__(self, "steps", len(self.timesteps))
        if self.seed is None:
            object.__setattr__(self, "seed", random.randrange(2**32))
        width, height = self.size
        if width <= 0 or height <= 0 or width % 8 or height % 8:
            raise InvalidRequestError(f"size must be positive multiples of 8, got {width}x{height}")
        if max(width, height) > MAX_SIDE:
            grown = f" grown by outpaint (--outpaint) {tuple(self.outpaint)}" if self.outpaint else ""
            origin = (
                f" (no size given: the init image's own size{grown})" if derived and self.init_image is not None else ""
            )
            fix = ": give smaller outpaint margins or a smaller image" if origin and grown else ""
            raise InvalidRequestError(
                f"size (--size) {width}x{height}{origin} is beyond {MAX_SIDE} pixels a side, which SDXL cannot fill{fix}"
            )
        if not 1 <= self.steps <= TRAIN_TIMESTEPS:
            raise InvalidRequestError(f"steps must be a whole number from 1 to {TRAIN_TIMESTEPS}, got {self.steps}")
        if self.refiner_switch is not None and not (0.0 < self.refiner_switch < 1.0):
            raise InvalidRequestError(f"refiner_switch must lie strictly between 0 and 1, got {self.refiner_switch}")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise InvalidRequestError(
                f"num_images must be from 1 to {MAX_IMAGES} per call, got {self.num_images} (larger runs: a job file)"
            )
        assert self.seed is not None
        if not 0 <= self.seed <= MAX_SEED - (self.num_images - 1):
            raise InvalidRequestError(
                f"seed must be a whole number from 0 to {MAX_SEED - (self.num_images - 1)} (64 bits, and room for the "
                f"batch's seed + i), got {self.seed}"
            )
        if self.guidance < 0:
            raise InvalidRequestError(f"guidance must be >= 0, got {self.guidance}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise InvalidRequestError(f"guidance_rescale must lie in [0, 1], got {self.guidance_rescale}")
        if self.vae_tiling and self.decoder is not None:
            raise InvalidRequestError("vae_tiling is for the VAE; a tiny draft decoder needs no tiling")
        if self.scheduler is not None:
            scheduler_spec(self.scheduler)
        StepCache(self.step_cache, self.step_cache_branch)
        if self.step_cache == 1 and self.step_cache_branch:
            raise InvalidRequestError(
                f"step_cache_branch (--step-cache-branch) {self.step_cache_branch} chooses what a cached step computes, "
                "and step_cache is 1 (every step whole, nothing cached): give step_cache 2 or more (--step-cache 3), "
                "or leave the branch out"
            )
        self._check_start()
        self._check_hires()
        self._check_detailer()

    def _check_hires(self) -> None:
        if self.hires_scale is None:
            given = [
                n for n in HIRES_FIELDS[1:] if getattr(self, n) != GenerationRequest.__dataclass_fields__[n].default
            ]
            if given:
                raise InvalidRequestError(f"{', '.join(given)}: for a hires fix: give hires_scale")
            return
        if not 1.0 < self.hires_scale <= MAX_HIRES:
            raise InvalidRequestError(f"hires_scale must lie in (1, {MAX_HIRES:g}], got {self.hires_scale}")
        if not 0.0 < self.hires_strength <= 1.0:
            raise InvalidRequestError(f"hires_strength must lie in (0, 1], got {self.hires_strength}")
        if self.hires_steps is not None and not 1 <= self.hires_steps <= TRAIN_TIMESTEPS:
            raise InvalidRequestError(f"hires_steps must be from 1 to {TRAIN_TIMESTEPS}, got {self.hires_steps}")
        if max(self.hires_size) > MAX_SIDE:
            raise InvalidRequestError(f"the hires fix's {self.hires_size[0]}x{self.hires_size[1]} is beyond {MAX_SIDE}")
        default = GenerationRequest.__dataclass_fields__["hires_strength"].default
        _check_runs_a_step(
            "the hires fix's strength (hires_strength)", self.hires_strength,
            "its default" if self.hires_strength == default else "--hires-strength, or the preset's", "--hires-strength",
            self.hires_steps or self.steps, "--hires-steps" if self.hires_steps else "--steps, which --hires-steps overrides",
        )  # fmt: skip

    def _check_detailer(self) -> None:
        detailer = self.detailer
        if detailer is None:
            return
        default = FaceDetailer.__dataclass_fields__["strength"].default
        _check_runs_a_step(
            "the face detailer's strength (a job's detailer.strength)", detailer.strength,
            "its default, ADetailer's" if detailer.strength == default else "--detail-strength, or the preset's",
            "--detail-strength", detailer.steps or self.steps,
            "the detailer's steps" if detailer.steps else "--steps (a job's detailer.steps overrides it)",
        )  # fmt: skip

    @property
    def hires_size(self) -> tuple[int, int]:
        """The size the hires fix redraws at: ``size`` times ``hires_scale``, in whole multiples of 8."""
        scale = self.hires_scale or 1.0
        return (round(self.size[0] * scale / 8) * 8, round(self.size[1] * scale / 8) * 8)

    def hires_pass(self, image: Any, seed: int) -> GenerationRequest:
        """The second pass of the hires fix for one image of the first (already enlarged): image-to-image."""
        return dataclasses.replace(
            self, init_image=image, size=self.hires_size, strength=self.hires_strength,
            steps=self.hires_steps or self.steps, timesteps=None if self.hires_steps else self.timesteps, seed=seed,
            num_images=1, mask=None, mask_blur=0, outpaint=None, padding_mask_crop=None, refiner_only=False,
            hires_scale=None, hires_strength=0.5, hires_steps=None, upscaler=LANCZOS, detailer=None,
        )  # fmt: skip

    def face_pass(self, image: Any, mask: Any, seed: int, conditions: tuple[Condition, ...]) -> GenerationRequest:
        """The face detailer's repaint of one face of a finished ``image``: inpainting a crop around ``mask`` at this
        request's size, at the detailer's strength, on the base alone, with ``conditions`` (made for the crop)."""
        detailer = self.detailer
        assert detailer is not None
        return dataclasses.replace(
            self, init_image=image, mask=mask, mask_blur=0, padding_mask_crop=detailer.padding,
            strength=detailer.strength, steps=detailer.steps or self.steps,
            timesteps=None if detailer.steps else self.timesteps, seed=seed, num_images=1, outpaint=None,
            refiner_only=False, refiner_switch=None, hires_scale=None, hires_strength=0.5, hires_steps=None,
            upscaler=LANCZOS, detailer=None, conditions=conditions,
        )  # fmt: skip

    def _default_size(self) -> tuple[int, int]:
        if self.init_image is None or self.padding_mask_crop is not None:  # a crop is repainted at the model's size
            return (1024, 1024)
        from .start import image_size

        width, height = image_size(self.init_image)
        pads = self.outpaint if isinstance(self.outpaint, tuple) and len(self.outpaint) == 4 else (0, 0, 0, 0)
        if not all(isinstance(v, int) for v in pads):  # check_fields names the bad value next
            pads = (0, 0, 0, 0)
        left, top, right, bottom = pads
        return (width // 8 * 8 + left + right, height // 8 * 8 + top + bottom)

    def _check_start(self) -> None:
        if self.init_image is None:
            for name in ("strength", "mask", "outpaint", "padding_mask_crop"):
                if getattr(self, name) is not None:
                    raise InvalidRequestError(f"{name} is for a request that starts from an image: give init_image")
            if self.mask_blur:
                raise InvalidRequestError("mask_blur is for a mask: give init_image and mask (or outpaint)")
            if self.refiner_only:
                raise InvalidRequestError("refiner_only polishes an image: give init_image")
            return
        defaulted = self.strength is None
        if self.strength is None:
            object.__setattr__(self, "strength", 0.75 if self.mask is None and self.outpaint is None else 1.0)
        assert self.strength is not None
        if self.strength == 0.0:
            self._check_kept()
        elif not 0.0 < self.strength <= 1.0:
            raise InvalidRequestError(f"strength must lie in [0, 1] (1: all steps run), got {self.strength}")
        else:
            source = "the default for an init image, A1111's" if defaulted else "--strength, or the preset's"
            _check_runs_a_step("strength", self.strength, source, "--strength", self.steps, "--steps")
        if self.mask_blur < 0:
            raise InvalidRequestError(f"mask_blur is a radius in pixels, >= 0, got {self.mask_blur}")
        if self.mask_blur and self.mask is None and self.outpaint is None:
            raise InvalidRequestError(
                f"mask_blur (--mask-blur) {self.mask_blur} feathers a mask's edge, and there is none: give a mask "
                "(--mask) or outpaint, or leave mask_blur out"
            )
        # A radius past the image's longer side blurs the mask into one flat grey: every pixel half repainted, the
        # mask's shape gone, and the blur's cost growing with the radius for nothing.
        if self.mask_blur > max(self.size):
            raise InvalidRequestError(
                f"mask_blur (--mask-blur) {self.mask_blur} is wider than the image ({self.size[0]}x{self.size[1]}): "
                f"it would blur the mask into flat grey; give at most {max(self.size)} (A1111's default is 4)"
            )
        if self.refiner_only and (self.mask is not None or self.refiner_switch is not None):
            raise InvalidRequestError(
                "refiner_only runs the refiner alone on the init image: no mask or refiner_switch"
            )
        if self.outpaint is not None:
            self._check_outpaint()
        if self.mask is not None and not isinstance(self.init_image, torch.Tensor):
            self._check_mask_fits()
        if self.padding_mask_crop is not None and (self.mask is None or self.padding_mask_crop < 0):
            raise InvalidRequestError(
                f"padding_mask_crop is the margin (pixels, >= 0) around a mask's area: give a mask, got "
                f"{self.padding_mask_crop}"
            )
        if self.padding_mask_crop is not None and self.refiner_switch is not None:
            raise InvalidRequestError("a mask crop is repainted by the base alone: leave out refiner_switch")

    def _check_mask_fits(self) -> None:
        """A mask of another aspect than its init image is refused now, from the files' headers, before any model
        loads; a file that cannot be read is reported by name where it is read."""
        from .preprocessors.images import oriented_size
        from .start import check_mask_fits, image_size

        try:
            sizes = oriented_size(self.mask, "mask"), image_size(self.init_image)
        except SdxlControlError:
            return
        check_mask_fits(self.mask, *sizes)

    def _check_kept(self) -> None:
        if self.hires_scale is None and self.detailer is None:
            raise InvalidRequestError(
                "strength 0 keeps the init image as it is: give a hires fix or face detailer to work on it"
            )
        if self.mask is not None or self.outpaint is not None or self.refiner_only or self.refiner_switch is not None:
            raise InvalidRequestError("strength 0 keeps the init image as it is: no mask, outpaint or refiner")

    def _check_padding(self) -> None:
        assert self.outpaint is not None
        if len(self.outpaint) != 4 or any(v < 0 or v % 8 for v in self.outpaint) or not any(self.outpaint):
            raise InvalidRequestError(
                f"outpaint is (left, top, right, bottom) in pixels, each a multiple of 8 and one above 0, got "
                f"{tuple(self.outpaint)}"
            )

    def _check_outpaint(self) -> None:
        assert self.outpaint is not None
        if self.mask is not None or self.refiner_only:
            raise InvalidRequestError("outpaint makes its own mask: give it without mask or refiner_only")
        left, top, right, bottom = self.outpaint
        if left + right >= self.size[0] or top + bottom >= self.size[1]:
            raise InvalidRequestError(
                f"outpaint (--outpaint) {tuple(self.outpaint)} leaves no room in size (--size) "
                f"{self.size[0]}x{self.size[1]}: the margins must leave some of it to the image"
            )

    @property
    def seeds(self) -> tuple[int, ...]:
        assert self.seed is not None
        return tuple(self.seed + i for i in range(self.num_images))

    def settings(self, paths: PathMode = "names") -> dict[str, Any]:
        """JSON-ready fields (conditions described by their settings; see :meth:`Condition.settings` for ``paths``)."""
        from .conditions import describe

        starts, hires = self.init_image is not None, self.hires_scale is not None
        # A request that starts from noise, or has no hires fix, records none of those fields: its recipe reads as
        # before they existed.
        skipped = ("conditions", "detailer", *(() if starts else START_FIELDS), *(() if hires else HIRES_FIELDS),
                   *(("vae",) if self.vae is None else ()),
                   *(("step_cache", "step_cache_branch") if self.step_cache == 1 else ()))  # fmt: skip
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skipped}
        if self.detailer is not None:  # recorded only when asked for, as the start and hires fields
            detailer = self.detailer.settings()
            if detailer["face_pack"] is not None:
                detailer["face_pack"] = portable(detailer["face_pack"], paths)
            out["detailer"] = detailer
        files = (*(IMAGE_FIELDS if starts else ()), *(("upscaler",) if hires else ()), *(("vae",) if self.vae else ()),
                 *(("decoder",) if self.decoder else ()))  # fmt: skip
        for name in files:  # by name and content, as conditions' files (a hub id stays as it is)
            value = getattr(self, name)
            out[name] = portable(describe(value), paths) if value is not None else None
        out["size"] = list(self.size)
        out["conditions"] = [c.settings(paths) for c in self.conditions]
        return out

    @classmethod
    def from_recipe(
        cls, recipe: Mapping[str, Any], *, locate: Locator | None = None, **overrides: Any
    ) -> GenerationRequest:
        """The request that re-makes a recipe's batch; its image is ``images[recipe["batch_index"]]``.

        The whole batch is re-run because batched arithmetic differs from single-image arithmetic in the last
        bits; this way the pixels come out identical. Conditions are rebuilt from their recorded settings when their
        inputs were files, found again by ``locate`` (default: where this machine last saw them); pass
        ``conditions=`` to replace them. A recipe edited by hand is checked: an unknown or misspelt key is an error,
        not silently ignored.
        """
        check_recipe(recipe, {f.name for f in fields(cls)})
        if "conditions" not in overrides and recipe.get("conditions"):
            from .adapters import condition_from_settings

            locate = locate or Locator()
            conditions, missing = [], []
            for settings in recipe["conditions"]:
                try:
                    conditions.append(condition_from_settings(settings, locate, recipe.get("version")))
                except InputError as exc:  # name every missing file at once, not one per attempt
                    missing.append(str(exc))
            if missing:
                raise InputError("\n".join(missing))
            overrides["conditions"] = tuple(conditions)
        names = {f.name for f in fields(cls)} - {"conditions", "seed"}
        # A recipe from before long prompts were read in chunks, or weighted, was made with the prompt cut to one window
        # and its brackets read as text.
        values = {"long_prompts": "truncate", "emphasis": "off", **{k: recipe[k] for k in names if k in recipe}}
        for name in ("upscaler", "vae", "decoder"):
            if values.get(name) is not None:
                values[name] = (locate or Locator()).resolve(values[name], f"the recipe's {name}")
        if isinstance(values.get("detailer"), dict) and values["detailer"].get("face_pack") is not None:
            pack = (locate or Locator()).resolve(values["detailer"]["face_pack"], "the recipe's detailer face pack")
            values["detailer"] = {**values["detailer"], "face_pack": pack}
        for name in IMAGE_FIELDS:
            if isinstance(values.get(name), dict) and ({"image", "mode"} <= values[name].keys()):
                raise InputError(
                    f"the recipe's {name} was an in-memory image, which recipes do not store: pass it again"
                )
            values[name] = (locate or Locator()).resolve(values.get(name), f"the recipe's {name}")
        values["size"] = tuple(recipe["size"])
        if values.get("outpaint") is not None:
            values["outpaint"] = tuple(values["outpaint"])
        if values.get("timesteps") is not None:
            values.pop("steps", None)
        values["scheduler"] = recipe["scheduler"]["requested"]
        values["seed"] = recipe["batch_seed"]
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class _StagePlan:
    models: StageModels
    schedule: StageSchedule


def _check_runs_a_step(what: str, strength: float, source: str, flag: str, steps: int, steps_source: str) -> None:
    """Refuse a pass whose ``strength`` enters its schedule of ``steps`` past the last step (``int(steps * strength)``
    steps run, as in diffusers), naming the value, where it came from (``source``: a default the user never typed is
    said to be one) and the two ways out."""
    if int(steps * strength) >= 1:
        return
    least = math.ceil(100 / steps) / 100  # rounded up, so that int(steps * least) is 1
    raise InvalidRequestError(
        f"{what} {strength:g} ({source}) with {steps} steps ({steps_source}) runs no step (int(steps * strength) = 0): "
        f"give {flag} {least:g} or more, or {math.ceil(1 / strength)} steps or more"
    )


def _nan_suspects(request: GenerationRequest, dtype: torch.dtype) -> str:
    """What in ``request`` can make the denoising overflow, with the values given, for the message of latents that
    came out NaN (prompt weights past emphasis.MAX_WEIGHT are refused before, so they are not among them)."""
    suspects = [f"guidance {request.guidance:g}"]
    suspects += [
        f"{type(c).__name__} {getattr(c, 'source', '')} at scale {c.scale:g}".replace("  ", " ")
        for c in request.conditions
        if isinstance(getattr(c, "scale", None), (int, float)) and abs(c.scale) > 2
    ]
    if dtype == torch.float16:
        suspects.append("half precision (fp16) overflowing in the UNet: try --dtype bf16 or fp32")
    return f"What can cause it here: {'; '.join(suspects)}; or weights of a model or LoRA that hold NaN"


class Generator:
    """SDXL base (+ optional refiner) with stacked conditions, one denoising loop for both stages.

    Example:
        >>> gen = Generator.from_pretrained(base="stabilityai/stable-diffusion-xl-base-1.0",
        ...                                 refiner="stabilityai/stable-diffusion-xl-refiner-1.0")  # doctest: +SKIP
        >>> result = gen.generate("a portrait", steps=30, refiner_switch=0.8, seed=7)               # doctest: +SKIP
        >>> result.images[0].save("out.png")                                                        # doctest: +SKIP
    """

    def __init__(self, base: StageModels, refiner: StageModels | None = None) -> None:
        self.base = base
        self.refiner = refiner
        self._fast: FastPathHandle | None = None
        self._offload: torch.device | None = None
        self._storage: tuple[str, list[Callable[[], None]]] | None = None
        # Deltas kept applied between runs: a Runner sets its own for each of its runs (see sdxl_control.residency).
        self.kept_weights: KeptWeights | None = None

    @property
    def device(self) -> torch.device:
        """Where the models compute (with offloading, where each is moved while it runs)."""
        return self._offload if self._offload is not None else self.base.device

    def set_offload(self, device: str | torch.device | None) -> None:
        """Keep the stage models in CPU memory and move each to ``device`` only while it runs — the text encoders, each
        stage's UNet, the VAE, one after the other — so the device holds the largest of them instead of all.

        ``None`` moves everything back to that device. Models that conditions bring (ControlNets, image encoders)
        stay on the device. Each move costs a copy over the bus per call: this is for GPUs too small for SDXL whole.
        """
        if device is not None and self._fast is not None and self._fast.fast.fuse_qkv:
            raise InvalidRequestError(_FUSED_CANNOT_MOVE)
        target = check_device(device) if device is not None else self._offload
        if target is None:
            return
        self._offload = None if device is None else target
        for module in self.stage_modules():
            module.to("cpu" if device is not None else target)

    def _stages(self) -> list[StageModels]:
        return [m for m in (self.base, self.refiner) if m is not None]

    def stage_modules(self) -> list[torch.nn.Module]:
        """Every model of both stages: UNets, VAEs, text encoders (not the models conditions bring)."""
        return [module for m in self._stages() for module in (m.unet, m.vae, *(e.model for e in m.text_encoders))]

    @contextmanager
    def _resident(self, modules: list[torch.nn.Module]) -> Iterator[None]:
        """With offloading, ``modules`` are on the device inside the block and back in CPU memory after it."""
        if self._offload is None:
            yield
            return
        try:
            for module in modules:
                module.to(self._offload)
            yield
        finally:
            for module in modules:
                module.to("cpu")

    @property
    def fast_path(self) -> FastPath | None:
        """The speed settings in force (see :meth:`set_fast_path`)."""
        return None if self._fast is None else self._fast.fast

    def set_fast_path(self, fast: FastPath | None) -> None:
        """Apply speed settings to the loaded models, replacing any in force; ``None`` returns to the plain models.

        Images stay the same up to floating-point rounding. Undo (``None``) before saving or re-casting the models:
        fused projections share one storage.
        """
        if fast is not None and fast.fuse_qkv and self._offload is not None:
            raise InvalidRequestError(_FUSED_CANNOT_MOVE)
        if fast is not None and self._storage is not None:
            _check_storage_and_fast(fast, self._storage[0])
        if self._fast is not None:
            self._fast.undo()
            self._fast = None
        if fast is not None:
            stages = self._stages()
            self._fast = apply_fast_path([m.unet for m in stages], [m.vae for m in stages], fast)

    @property
    def weight_storage(self) -> str | None:
        """How the UNets' weights are kept between uses: ``None`` (in the compute dtype), ``"fp8_e4m3fn"`` /
        ``"fp8_e5m2"`` or ``"fp8_matmul"`` (see :meth:`set_weight_storage`)."""
        return None if self._storage is None else self._storage[0]

    def set_weight_storage(self, storage: str | None) -> None:
        """Keep the UNets' linear and convolution weights in fp8 between uses, each layer cast to the compute dtype
        just before it runs (ComfyUI's ``--fp8_e4m3fn-unet``; see :mod:`sdxl_control.storage`): about half their
        memory, the images those of the weights rounded to fp8. ControlNets a call runs are kept the same way.
        ``"fp8_matmul"`` (GPUs with fp8 matrix units, torchao installed) makes the linear layers torchao's float8
        layers, whose matrix products run in fp8.
        ``None`` casts the layers back to the compute dtype; their values stay rounded: load the models again for
        their full precision. The fast path's fused projections read weights outside the layers, and compiled graphs
        outside the casts of ``"fp8_e4m3fn"``/``"fp8_e5m2"``: those take ``FastPath(fuse_qkv=False)`` without
        compiling; ``"fp8_matmul"`` compiles (torchao's float8 layers are made to)."""
        if storage is not None:
            check_storage(storage, placement(self.base.unet)[0])
            if self._fast is not None:
                _check_storage_and_fast(self._fast.fast, storage)
        if self.weight_storage == storage:
            return
        if self._storage is not None:
            _undo_all(self._storage[1])
            self._storage = None
        if storage is not None:
            undos: list[Callable[[], None]] = []
            try:
                for stage in self._stages():
                    undos.append(store_weights(stage.unet, storage))
            except BaseException:
                _undo_all(undos)
                raise
            self._storage = (storage, undos)

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike[str] = DEFAULT_BASE,
        refiner: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        unet: ModelRef | str | os.PathLike[str] | None = None,
        base_config: str | os.PathLike[str] | None = None,
        refiner_config: str | os.PathLike[str] | None = None,
        weight_storage: str | None = None,
    ) -> Generator:
        """Load from hub ids (HF cache first), diffusers folders or single ``.safetensors`` files.

        ``unet`` loads a UNet-only checkpoint over the base's UNet (a path, or a :class:`ModelRef` naming the file in a
        repo), e.g. ``ModelRef("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors")``.
        ``base_config`` / ``refiner_config``: for a single-file checkpoint, a diffusers folder (or hub id) of the same
        architecture whose component configs and tokenizers it is read with (default: SDXL 1.0's, which come with
        the package). ``weight_storage``: see :meth:`set_weight_storage`.
        """
        from .inventory import ensure
        from .models import stage_needs

        options: dict[str, Any] = {"device": device, "dtype": dtype, "variant": variant, "cache_dir": cache_dir}
        unet_ref = ModelRef.parse(unet, "the UNet checkpoint")
        if cache_dir is None:  # every missing model said at once, before anything loads
            needs = stage_needs(base, Stage.BASE, variant=variant, unet=unet_ref)
            ensure(needs + (stage_needs(refiner, Stage.REFINER, variant=variant) if refiner is not None else []))
        base_models = load_stage(base, Stage.BASE, unet=unet_ref, config=_text(base_config), **options)
        refiner_models = (
            load_stage(refiner, Stage.REFINER, config=_text(refiner_config), **options) if refiner is not None else None
        )
        generator = cls(base_models, refiner_models)
        generator.set_weight_storage(weight_storage)
        return generator

    def generate(
        self,
        prompt: str,
        *,
        progress: ProgressCallback | None = None,
        progress_bar: bool = True,
        recipe_paths: PathMode = "names",
        **options: Any,
    ) -> Result:
        """Generate images for ``prompt``; ``options`` are the fields of :class:`GenerationRequest`."""
        message = unknown_keys(options, [f.name for f in fields(GenerationRequest)], "generate()", "option")
        if message:
            raise InvalidRequestError(message)
        request = GenerationRequest(prompt, **options)
        return self.run(request, progress=progress, progress_bar=progress_bar, recipe_paths=recipe_paths)

    def _plans(self, request: GenerationRequest) -> list[_StagePlan]:
        # strength 0 runs no step (the image is kept); the recipe still names the schedule a pass on it would use.
        strength = request.strength if request.init_image is not None and request.strength else 1.0
        if request.refiner_only:
            if self.refiner is None:
                raise InvalidRequestError("refiner_only was given but no refiner is loaded")
            scheduler = make_scheduler(self.refiner.scheduler_config, request.scheduler, request.scheduler_options)
            schedule, _ = split_schedule(scheduler, None, request.steps, None, request.timesteps, strength)
            return [_StagePlan(self.refiner, schedule)]
        base_scheduler = make_scheduler(self.base.scheduler_config, request.scheduler, request.scheduler_options)
        refiner_scheduler = None
        if request.refiner_switch is not None:
            if self.refiner is None:
                raise InvalidRequestError("refiner_switch was given but no refiner is loaded")
            refiner_scheduler = make_scheduler(
                self.refiner.scheduler_config, request.scheduler, request.scheduler_options
            )
        base_schedule, refiner_schedule = split_schedule(
            base_scheduler, refiner_scheduler, request.steps, request.refiner_switch, request.timesteps, strength
        )
        plans = [_StagePlan(self.base, base_schedule)]
        if refiner_schedule is not None:
            assert self.refiner is not None
            plans.append(_StagePlan(self.refiner, refiner_schedule))
        return plans

    def _stage_inputs(
        self, plan: _StagePlan, request: GenerationRequest, prepared: list[tuple[Condition, Prepared]]
    ) -> StageInputs:
        models = plan.models
        unet = models.unet
        device, dtype = self.device, placement(unet)[1]
        guidance = guidance_for(request.guidance, unet, request.guidance_rescale)
        n = request.num_images
        mine = [(c, p) for c, p in prepared if models.stage in c.stage]
        # Every condition is asked (the prompt channel): a base-only one may still take its syntax out of the refiner's.
        channels = []
        for condition, ready in prepared:
            edit = ready.prompt_edit(models.stage)
            deltas = {k: v for k, v in ready.weight_deltas(models.stage).items() if k != "unet"}
            if edit is not None or deltas:
                channels.append(TextChannel(condition.scale, condition.window, edit, deltas))
        guided = guidance.copies > 1
        with self._resident([e.model for e in models.text_encoders]):
            encoded = prompt_segments(models.text_encoders, request.prompt, request.negative_prompt, channels,
                                      plan.schedule.total, need_negative=guided,
                                      zero_negative=models.force_zeros_for_empty_prompt,
                                      long_prompts=request.long_prompts, emphasis=request.emphasis)  # fmt: skip
        width, height = request.size
        micro = MicroConditioning(
            original_size=(height, width),
            target_size=(height, width),
            aesthetic_score=request.aesthetic_score,
            negative_aesthetic_score=request.negative_aesthetic_score,
        )
        pos_ids, neg_ids = time_ids(
            micro,
            aesthetic=models.requires_aesthetics_score,
            unet=unet,
            pooled_width=encoded[0][1].pooled.shape[-1],
            dtype=dtype,
        )
        ids = torch.cat([neg_ids.repeat(n, 1), pos_ids.repeat(n, 1)]) if guided else pos_ids.repeat(n, 1)
        prompts = []
        for first, positive, negative in encoded:
            hidden, pooled = positive.hidden.repeat(n, 1, 1), positive.pooled.repeat(n, 1)
            if negative is not None:
                hidden = torch.cat([negative.hidden.repeat(n, 1, 1), hidden])
                pooled = torch.cat([negative.pooled.repeat(n, 1), pooled])
            prompts.append(PromptSegment(first, hidden.to(device, dtype), pooled.to(device, dtype)))
        return StageInputs(
            stage=models.stage,
            unet=unet,
            schedule=plan.schedule,
            prompts=tuple(prompts),
            time_ids=ids.to(device),
            guidance=guidance,
            conditions=mine,
            step_cache=StepCache(request.step_cache, request.step_cache_branch) if request.step_cache > 1 else None,
        )

    def run(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        progress_bar: bool = True,
        recipe_paths: PathMode = "names",
    ) -> Result:
        """Run a :class:`GenerationRequest`.

        The images' recipes name local files (models, control images, face photos) by name and content hash, so no
        private path travels with a shared image; ``recipe_paths="full"`` records their absolute paths too.
        """
        if recipe_paths not in PATH_MODES:
            raise InvalidRequestError(f"recipe_paths must be one of {', '.join(PATH_MODES)}, got {recipe_paths!r}")
        with self._vae(request.vae):
            return self._detailed(request, progress, progress_bar, recipe_paths)

    @contextmanager
    def _vae(self, source: str | None) -> Iterator[None]:
        """The stages with ``source``'s VAE for the call (see :class:`GenerationRequest`), as they were after it."""
        if source is None:
            yield
            return
        stages = self.base, self.refiner
        _, dtype = placement(self.base.vae)
        vae = load_vae(source, self.base.vae, self.device, dtype)
        try:
            self.base = dataclasses.replace(self.base, vae=vae)
            if self.refiner is not None:
                self.refiner = dataclasses.replace(self.refiner, vae=vae)
            yield
        finally:
            self.base, self.refiner = stages

    def _detailed(
        self, request: GenerationRequest, progress: ProgressCallback | None, progress_bar: bool, recipe_paths: PathMode
    ) -> Result:
        if request.hires_scale is None:
            result = self._run(request, progress, progress_bar, recipe_paths)
        else:
            result = self._hires(request, progress, progress_bar, recipe_paths)
        if request.detailer is None:
            return result
        images = []
        for image, seed in zip(result.images, request.seeds, strict=True):

            def repaint(face_request: GenerationRequest) -> Image.Image:
                return self._run(face_request, progress, progress_bar, recipe_paths).images[0]

            detailed, record = detail_faces(image, request, seed, repaint)
            out = RecipeImage.wrap(detailed, image.recipe)
            out.annotate(detailer=record)
            images.append(out)
        return Result(images=images, latents=result.latents)

    def _hires(
        self, request: GenerationRequest, progress: ProgressCallback | None, progress_bar: bool, recipe_paths: PathMode
    ) -> Result:
        check_upscaler(request.upscaler)  # before the first pass, which would be lost to a missing file
        if request.init_image is not None and request.strength == 0:  # an image of the user's, enlarged
            drafts = self._kept(request, recipe_paths)
        else:
            first = dataclasses.replace(
                request, hires_scale=None, hires_strength=0.5, hires_steps=None, upscaler=LANCZOS
            )
            drafts = self._run(first, progress, progress_bar, recipe_paths)
        enlarged: list[Any]
        if request.upscaler in LATENT_MODES:  # the second pass starts from the latents themselves
            factor = vae_scale_factor(self.base.vae)
            latents = upscale_latents(drafts.latents, request.hires_size, request.upscaler, factor)
            enlarged = list(latents.split(1))
        else:
            enlarged = upscale_images(drafts.images, request.hires_size, request.upscaler, self.device)
        passes = [
            self._run(request.hires_pass(image, seed), progress, progress_bar, recipe_paths)
            for image, seed in zip(enlarged, request.seeds, strict=True)
        ]
        shared = self._recipe(request, self._plans(request), recipe_paths)
        recipes = [{**copy.deepcopy(shared), "seed": seed, "batch_index": i} for i, seed in enumerate(request.seeds)]
        images = [RecipeImage.wrap(p.images[0], r) for p, r in zip(passes, recipes, strict=True)]
        return Result(images=images, latents=torch.cat([p.latents for p in passes]))

    def _run(
        self, request: GenerationRequest, progress: ProgressCallback | None, progress_bar: bool, recipe_paths: PathMode
    ) -> Result:
        if request.init_image is not None and request.strength == 0:
            return self._kept(request, recipe_paths)
        plans = self._plans(request)
        stages = [p.models.stage for p in plans]
        validate_conditions(request.conditions, has_refiner=Stage.REFINER in stages, has_base=Stage.BASE in stages)
        width, height = request.size
        device, dtype = self.device, plans[0].models.dtype
        images = None
        if request.init_image is not None and not isinstance(request.init_image, torch.Tensor):
            images = start_images(request, plans[0].models.unet.config.in_channels == INPAINT_CHANNELS)
        repainted = images.repainted() if images is not None else (None, None)
        context = PrepareContext(
            device=device,
            dtype=dtype,
            batch_size=request.num_images,
            guided=guidance_for(request.guidance, plans[0].models.unet).copies > 1,
            size=request.size,
            stages={p.models.stage: p.models.unet for p in plans},
            fast=self.fast_path,
            steps=plans[0].schedule.total,
            start_image=repainted[0],
            start_mask=repainted[1],
        )
        if self.kept_weights is not None:
            prepared = self.kept_weights.prepare(request.conditions, context, plans)
        else:
            prepared = [(c, c.prepare(context)) for c in request.conditions]
        stage_inputs = [self._stage_inputs(plan, request, prepared) for plan in plans]

        factor = vae_scale_factor(self.base.vae)
        generators = [torch.Generator("cpu").manual_seed(s) for s in request.seeds]
        overlay = None
        if request.init_image is not None:
            first = plans[0].models
            with self._resident([first.vae]):
                start = start_latents(request, images, first.vae, first.unet.config.in_channels, plans[0].schedule,
                                      generators, stage_inputs[0].guidance.copies, device, dtype)  # fmt: skip
            latents, overlay = start.latents, start.overlay
            stage_inputs[0] = dataclasses.replace(stage_inputs[0], repaint=start.repaint)
        else:
            if plans[0].models.unet.config.in_channels == INPAINT_CHANNELS:
                raise IncompatibleModelError("the base UNet is an inpainting UNet (9 input channels): give an "
                                             "init_image and a mask")  # fmt: skip
            shape = (request.num_images, self.base.vae.config.latent_channels, height // factor, width // factor)
            latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
            latents = latents * plans[0].schedule.scheduler.init_noise_sigma
        for k, inputs in enumerate(stage_inputs):
            repaint = stage_inputs[0].repaint
            if k and repaint is not None and repaint.mask is not None:  # the refiner goes on repainting the mask
                inputs = dataclasses.replace(inputs, repaint=repaint.handed_over(latents, generators))
            with self._resident([inputs.unet]):
                latents = latents.to(*placement(inputs.unet))
                latents = denoise(inputs, latents, generators=generators, progress=progress, progress_bar=progress_bar)

        last = plans[-1].models
        try:
            if request.decoder is not None:
                decoder = load_decoder(request.decoder, last.unet.config.out_channels, self.device, dtype)
                pixels = decode_latents(decoder, latents)
            else:
                with self._resident([last.vae]):
                    pixels = decode_latents(last.vae, latents, tiled=request.vae_tiling)
        except NonFiniteLatentsError as exc:
            raise NonFiniteLatentsError(f"{exc}. {_nan_suspects(request, dtype)}") from None
        pil = VaeImageProcessor(vae_scale_factor=factor).postprocess(pixels, output_type="pil")
        if overlay is not None:
            pil = [overlay(image) for image in pil]
        shared = self._recipe(request, plans, recipe_paths)
        recipes = [{**copy.deepcopy(shared), "seed": seed, "batch_index": i} for i, seed in enumerate(request.seeds)]
        return Result(images=[RecipeImage.wrap(img, r) for img, r in zip(pil, recipes, strict=True)], latents=latents)

    def _kept(self, request: GenerationRequest, recipe_paths: PathMode) -> Result:
        """strength 0: the init image itself, fitted to the request's size, for the hires fix or the face detailer to
        work on (A1111's img2img at denoising 0; ADetailer's "skip img2img"); its latents as the VAE encodes it."""
        from .start import read_init_image

        image = read_init_image(request.init_image, request.size)
        vae = self.base.vae
        pixels = VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae)).preprocess(image).to(torch.float32)
        with self._resident([vae]):
            latents = torch.cat([
                encode_pixels(vae, pixels, torch.Generator("cpu").manual_seed(seed), self.base.dtype)
                for seed in request.seeds
            ])  # fmt: skip
        shared = self._recipe(request, self._plans(request), recipe_paths)
        recipes = [{**copy.deepcopy(shared), "seed": seed, "batch_index": i} for i, seed in enumerate(request.seeds)]
        return Result(images=[RecipeImage.wrap(image.copy(), r) for r in recipes], latents=latents)

    def _recipe(self, request: GenerationRequest, plans: list[_StagePlan], paths: PathMode) -> dict[str, Any]:
        """What the batch's images share of their recipe (each adds its seed and index)."""
        scheduler = plans[0].schedule.scheduler
        recipe = request.settings(paths)
        infotext = sum((c.infotext() for c in request.conditions), Infotext())
        recipe.update(
            version=__version__,
            batch_seed=request.seed,
            scheduler={"requested": request.scheduler, "name": request.scheduler or type(scheduler).__name__,
                       "class": type(scheduler).__name__, "config": dict(scheduler.config)},
            models={"base": self.base.source.to_json(paths),
                    "refiner": self.refiner.source.to_json(paths)
                    if self.refiner and plans[-1].models is self.refiner else None},
            dtype=str(self.base.dtype).removeprefix("torch."),
            infotext=infotext.to_json(),
        )  # fmt: skip
        if self.weight_storage is not None:  # recorded only when used, as the request's optional fields
            recipe["weight_storage"] = self.weight_storage
        return _jsonable(recipe)


class LastLoaded:
    """The :class:`Generator` for the models asked for last, kept while the next request names the same ones; other
    models replace it, the old ones let go first (two sets of SDXL weights need not fit at once), together with every
    process cache (:func:`sdxl_control.caches.clear_caches`: the ControlNets and encoders the old set used). The page
    and batch workers hold a :class:`~sdxl_control.runner.Runner`, which keeps models the same way and also applies a
    job's offloading and fast path.

    Example:
        >>> models = LastLoaded(device="cuda")                                 # doctest: +SKIP
        >>> models.get("stabilityai/stable-diffusion-xl-base-1.0") is models.get("stabilityai/stable-diffusion-xl-base-1.0")  # doctest: +SKIP
        True
    """  # noqa: E501

    def __init__(self, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        self.device, self.dtype = device, dtype
        self._key: tuple[Any, ...] | None = None
        self._generator: Generator | None = None

    def get(
        self,
        base: str | os.PathLike[str],
        refiner: str | os.PathLike[str] | None = None,
        unet: Any = None,
        *,
        weight_storage: str | None = None,
    ) -> Generator:
        key = (base, refiner, unet, weight_storage)
        if self._generator is None or key != self._key:
            if self._generator is not None:
                # What the old set used (its ControlNets, encoders, converted weights) goes with it.
                self._generator, self._key = None, None
                clear_caches()
            self._generator = Generator.from_pretrained(
                base, refiner, device=self.device, dtype=self.dtype, unet=unet, weight_storage=weight_storage
            )
            self._key = key
        return self._generator


def _check_storage_and_fast(fast: FastPath, storage: str) -> None:
    if storage == FP8_MATMUL and fast.fuse_qkv:
        raise InvalidRequestError(
            "fp8 matmuls quantize each linear layer's weight on its own, which the fast path's fused projections "
            "would concatenate: use FastPath(fuse_qkv=False)"
        )
    if storage != FP8_MATMUL and (fast.fuse_qkv or fast.compile != "off"):
        raise InvalidRequestError(
            "fp8 weight storage casts each layer's weights as it runs, which the fast path's fused projections and "
            "compiled graphs read past: use FastPath(fuse_qkv=False) without compiling"
        )


def _undo_all(undos: list[Callable[[], None]]) -> None:
    for undo in reversed(undos):
        undo()


_FUSED_CANNOT_MOVE = (
    "offloading moves models between devices, which the fast path's fused projections cannot follow: "
    "use FastPath(fuse_qkv=False) with offloading"
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _text(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else str(path)
