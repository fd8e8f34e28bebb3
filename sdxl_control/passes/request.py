"""What one generation asks for: :class:`GenerationRequest`, a frozen value checked whole when made (every field, and
how they combine) so nothing runs on a request that cannot run; how it is written in a recipe and read back from one
(:meth:`GenerationRequest.from_recipe`); and the requests the passes derive from it (hires, each face of the detailer).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

import torch

from ..base.defaults import MAX_SIDE
from ..base.errors import InputError, InvalidRequestError, SdxlControlError
from ..base.files import Locator, PathMode, portable
from ..base.validation import check_fields
from ..engine.step_cache import StepCache
from ..engine.upscale import LANCZOS
from ..protocol.conditions import Condition, recorded_before
from ..protocol.emphasis import READ_BEFORE_0_3_0, Emphasis, check_syntax
from ..protocol.schedule import scheduler_name, scheduler_spec
from ..protocol.text import LongPrompts
from ..records.recipe import check_recipe
from .detailer import FaceDetailer

__all__ = ["GenerationRequest"]

TRAIN_TIMESTEPS = 1000  # SDXL's training schedule: no step count or timestep beyond it means anything
MAX_IMAGES = 64
MAX_SEED = 2**64 - 1  # torch generators take 64-bit seeds
# Request fields that are images a user gives: recorded by name and content, found again by a re-run.
IMAGE_FIELDS = ("init_image", "mask")
START_FIELDS = ("init_image", "strength", "mask", "mask_blur", "refiner_only", "outpaint", "padding_mask_crop")
HIRES_FIELDS = ("hires_scale", "hires_strength", "hires_steps", "upscaler")
# Fields a recipe records only when they differ from their defaults: a recipe of a request that leaves them so is the
# one earlier releases wrote, so its dry-run lines and golden files stay the same.
RECORDED_WHEN_SET = (
    "vae", "embeddings", "clip_skip", "prompt_editing", "pad_conds", "first_pass_steps", "prediction_type",
    "zero_terminal_snr", "refiner_prompt", "refiner_negative_prompt", "paste_back",
)  # fmt: skip
MAX_HIRES = 4.0
# The latest release that reads a recorded setting otherwise than the one before it (issue 36: samplers, prompt syntax,
# v-prediction keys): a recipe recorded before it is read as its release read it (see _as_read_before_0_3).
LAST_READING_CHANGE = "0.3.0"
MAX_CLIP_SKIP = 12  # CLIP-L's 12 layers: A1111's range, and as far as both SDXL encoders reach


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
    to 1 and ``mask_blur`` (pixels) feathers its edge. ``paste_back`` pastes the init image back outside the
    (feathered) mask after decoding, so no pixel there changes, as A1111's inpainting does (a ``padding_mask_crop``
    repaint is always pasted back). See :mod:`sdxl_control.engine.start` for how sizes are fitted.

    ``detailer`` (a :class:`~sdxl_control.passes.detailer.FaceDetailer`, or ``True`` for ADetailer's defaults) repaints
    every face of the finished images at the request's size, each with the identity condition it resembles.

    ``long_prompts``: a prompt (or negative prompt) beyond 75 CLIP tokens is read in 75-token chunks, joined
    (``"chunks"``, A1111's way: ``BREAK`` and commas end chunks; the shorter of prompt and negative prompt is followed
    by empty-prompt chunks), or cut to its first 75 tokens (``"truncate"``, diffusers' way). A prompt of 75 tokens
    or fewer reads the same both ways.

    ``emphasis``: how weighting syntax in the prompts is read: ``"a1111"`` (``(word:1.2)``, ``(word)``, ``[word]``,
    ``\\(``, A1111's weighting and tokenizers; a negative prompt ``""`` is zeros), ``"comfyui"`` (ComfyUI's syntax,
    weighting and chunks) or ``"off"`` (brackets are text); ``"a1111-0.2"`` and ``"comfyui-2024"`` are the readings
    that recipes recorded before 0.3.0 re-make theirs with. See :mod:`sdxl_control.protocol.emphasis`.

    ``refiner_prompt`` / ``refiner_negative_prompt``: the refiner's own prompts (as a ComfyUI graph can give its
    refiner's text encoders other texts); ``None``: the refiner reads the prompt and negative prompt.

    ``prompt_editing`` (with ``emphasis="a1111"``): A1111's prompt editing ``[a:b:0.5]``, alternation ``[a|b]`` and
    composable ``AND`` with ``:weight`` are read as A1111 reads them (see :mod:`sdxl_control.protocol.prompt_schedule`);
    off, they are text (as recipes before 0.3.0 read them). ``pad_conds``: the shorter of prompt and negative prompt is
    followed by empty-prompt chunks so the UNet runs both in one batch (A1111's option "Pad prompt/negative prompt",
    "Pad conds" in its PNGs; recipes before 0.3.0 always padded); off (A1111's default), prompts of different chunk
    counts run in separate UNet calls. ComfyUI's reading (``emphasis="comfyui"``) repeats both to one length instead.
    ``first_pass_steps`` is set on a hires fix's second pass (the first pass's steps, which its prompt editing counts
    on from); it is not a setting.

    ``step_cache`` (DeepCache): each stage computes the whole UNet every ``step_cache`` steps and reuses its deep
    features in between, computing only the shallow path of skip connection ``step_cache_branch`` (0: the cheapest,
    DeepCache's SDXL setting). 1 computes every step whole. See :mod:`sdxl_control.engine.step_cache`.

    ``prediction_type`` (``"epsilon"`` or ``"v_prediction"``) and ``zero_terminal_snr`` override the base model's
    own (``None``: its scheduler config, or a single file's ``v_pred`` / ``ztsnr`` keys, as ComfyUI and Forge read
    them; see :mod:`sdxl_control.protocol.prediction`); the refiner keeps its own. An override against the model's
    own is done with a warning; zero terminal SNR for an epsilon model is refused.

    ``embeddings`` (name -> file): SDXL textual inversions the prompts may name, as A1111 uses them (the name as a
    word) or, with ``emphasis="comfyui"``, as ComfyUI does (``embedding:name``); see
    :mod:`sdxl_control.protocol.embeddings`. A job fills it from the model folders' embeddings.

    ``clip_skip`` N: every text encoder's hidden state is read from its N-th layer from the end, before the final
    layer norm (1: the last layer; 2: the penultimate, which SDXL reads anyway). ``None`` (the default) reads
    SDXL's penultimate layer. This is Forge's "Clip skip" for N >= 2 and ComfyUI's ``CLIPSetLastLayer(-N)``.

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
    paste_back: bool = False
    hires_scale: float | None = None
    hires_strength: float = 0.5
    hires_steps: int | None = None
    upscaler: str = LANCZOS
    detailer: FaceDetailer | None = None
    long_prompts: LongPrompts = "chunks"
    emphasis: Emphasis = "a1111"
    step_cache: int = 1
    step_cache_branch: int = 0
    embeddings: Mapping[str, Any] = field(default_factory=dict)
    clip_skip: int | None = None
    prompt_editing: bool = True
    pad_conds: bool = False
    first_pass_steps: int | None = None
    conditions: tuple[Condition, ...] = field(default_factory=tuple)
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    zero_terminal_snr: bool | None = None
    refiner_prompt: str | None = None
    refiner_negative_prompt: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.detailer, FaceDetailer):  # true or its settings, as a job file gives it
            object.__setattr__(self, "detailer", FaceDetailer.of(self.detailer))
        if isinstance(self.outpaint, tuple) and all(isinstance(v, int) for v in self.outpaint):
            self._check_padding()  # before the size it may decide
        derived = self.size is None  # the init image's own size (plus any outpaint): named if it is refused
        if self.size is None:
            object.__setattr__(self, "size", self._default_size())
        check_fields(self, "the request")
        for text, where in ((self.prompt, "the prompt"), (self.negative_prompt, "the negative prompt"),
                            (self.refiner_prompt, "the refiner prompt"),
                            (self.refiner_negative_prompt, "the refiner negative prompt")):  # fmt: skip
            if isinstance(text, str):
                check_syntax(text, self.emphasis, where)
        self._check_text_reading()
        if self.reads_schedules and isinstance(self.prompt, str):
            from ..protocol.prompt_schedule import check_composable

            check_composable(self.prompt)
        if self.first_pass_steps is not None and not 1 <= self.first_pass_steps <= TRAIN_TIMESTEPS:
            raise InvalidRequestError(
                f"first_pass_steps (set on a hires fix's second pass) must be from 1 to {TRAIN_TIMESTEPS}, got "
                f"{self.first_pass_steps}"
            )
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
            from ..protocol.schedule import check_schedule

            scheduler_spec(self.scheduler)
            check_schedule(self.scheduler, self.scheduler_options, self.timesteps)
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
        self._check_prediction()

    def _check_prediction(self) -> None:
        if self.prediction_type is None and self.zero_terminal_snr is None:
            return
        if self.refiner_only:
            raise InvalidRequestError(
                "prediction_type and zero_terminal_snr override the base model's; refiner_only runs the refiner "
                "alone, with its own: leave them out"
            )
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise InvalidRequestError(
                "zero_terminal_snr with prediction_type 'epsilon': at the zero-SNR step an epsilon model's noise "
                "estimate is multiplied by ~4096, which only a v-prediction model survives; give "
                "prediction_type='v_prediction' or leave zero_terminal_snr out"
            )
        if self.zero_terminal_snr and self.scheduler is not None:
            from ..protocol.prediction import check_zero_snr

            check_zero_snr(scheduler_spec(self.scheduler)[0], self.scheduler, {"rescale_betas_zero_snr": True})

    def _check_text_reading(self) -> None:
        from ..protocol.embeddings import check_references

        object.__setattr__(self, "embeddings", {str(k): v for k, v in dict(self.embeddings).items()})
        for name, file in self.embeddings.items():
            if not name.strip() or not isinstance(file, (str, os.PathLike)):
                raise InvalidRequestError(
                    f'embeddings maps a name to its file ("easynegative": "embeddings/easynegative.safetensors"), '
                    f"got {name!r}: {file!r}"
                )
        object.__setattr__(self, "embeddings", {name: os.fspath(file) for name, file in self.embeddings.items()})
        if self.emphasis == "comfyui":  # ComfyUI's embedding:name must name one given; A1111's names are words
            for text, where in ((self.prompt, "the prompt"), (self.negative_prompt, "the negative prompt")):
                if isinstance(text, str):
                    check_references(text, self.embeddings, where)
        if self.clip_skip is not None and not 1 <= self.clip_skip <= MAX_CLIP_SKIP:
            raise InvalidRequestError(
                f"clip_skip (--clip-skip) is the text encoders' layer counted from the end, 1 (the last) to "
                f"{MAX_CLIP_SKIP} (CLIP-L's depth), 2 being SDXL's own; got {self.clip_skip}"
            )

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
    def reads_schedules(self) -> bool:
        """Whether the prompts' prompt editing, alternation and ``AND`` are read (A1111's syntax, ``prompt_editing``)."""
        return self.prompt_editing and self.emphasis == "a1111"

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
            first_pass_steps=len(self.timesteps) if self.timesteps else self.steps, num_images=1, mask=None, mask_blur=0, outpaint=None, padding_mask_crop=None, refiner_only=False,
            hires_scale=None, hires_strength=0.5, hires_steps=None, upscaler=LANCZOS, detailer=None,
        )  # fmt: skip

    def face_pass(
        self, image: Any, mask: Any, seed: int, conditions: tuple[Condition, ...], region: Any = None
    ) -> GenerationRequest:
        """The face detailer's repaint of one face of a finished ``image``: inpainting a crop around ``mask`` at this
        request's size, at the detailer's strength, on the base alone, with ``conditions`` (made for the crop).
        ``region``: the regional prompt (a :class:`~sdxl_control.adapters.regions.Region`) whose region holds the
        face; its prompt (and its negative, if it has one) is the repaint's, as ADetailer's per-face prompt replaces
        the main one: the crop shows that one person, whom the request's prompt describes among others."""
        detailer = self.detailer
        assert detailer is not None
        described = {}
        if region is not None:
            described["prompt"] = region.prompt
            if region.negative_prompt is not None:
                described["negative_prompt"] = region.negative_prompt
        return dataclasses.replace(
            self, **described, init_image=image, mask=mask, mask_blur=0, padding_mask_crop=detailer.padding,
            strength=detailer.strength, steps=detailer.steps or self.steps,
            timesteps=None if detailer.steps else self.timesteps, seed=seed, num_images=1, outpaint=None,
            refiner_only=False, refiner_switch=None, hires_scale=None, hires_strength=0.5, hires_steps=None,
            upscaler=LANCZOS, detailer=None, conditions=conditions,
        )  # fmt: skip

    def _default_size(self) -> tuple[int, int]:
        if self.init_image is None or self.padding_mask_crop is not None:  # a crop is repainted at the model's size
            return (1024, 1024)
        from ..engine.start import image_size

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
        if self.paste_back and self.mask is None:
            raise InvalidRequestError("paste_back pastes the init image back outside a mask: give a mask")
        if self.padding_mask_crop is not None and self.refiner_switch is not None:
            raise InvalidRequestError("a mask crop is repainted by the base alone: leave out refiner_switch")

    def _check_mask_fits(self) -> None:
        """A mask of another aspect than its init image is refused now, from the files' headers, before any model
        loads; a file that cannot be read is reported by name where it is read."""
        from ..base.images import oriented_size
        from ..engine.start import check_mask_fits, image_size

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
        from ..protocol.conditions import describe

        starts, hires = self.init_image is not None, self.hires_scale is not None
        # A request that starts from noise, or has no hires fix, records none of those fields: its recipe reads as
        # before they existed.
        skipped = ("conditions", "detailer", *(() if starts else START_FIELDS), *(() if hires else HIRES_FIELDS),
                   *(("step_cache", "step_cache_branch") if self.step_cache == 1 else ()),
                   *(k for k in RECORDED_WHEN_SET if getattr(self, k) == _DEFAULTS[k]))  # fmt: skip
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
        if self.embeddings:  # by name and content, as the other files
            out["embeddings"] = {name: portable(describe(file), paths) for name, file in self.embeddings.items()}
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
            from ..adapters import condition_from_settings

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
        if values.get("embeddings"):
            values["embeddings"] = (locate or Locator()).resolve(values["embeddings"], "the recipe's embedding")
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
        if recorded_before(recipe.get("version"), LAST_READING_CHANGE):
            values = _as_read_before_0_3(recipe, values)
        values.update(overrides)
        return cls(**values)


# Each field's default, as a request left alone holds it.
_DEFAULTS = {
    f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(GenerationRequest)
}


def _as_read_before_0_3(recipe: Mapping[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A recipe's request as the release that recorded it (before 0.3.0) read its settings, where 0.3.0 reads them
    as A1111, ComfyUI and Forge do (issue 36), so that it re-makes its pixels."""
    from ..base.samplers import RENAMED_SCHEDULERS

    # Prompts: weights right after the colon only, diffusers' tokenizers and a negative "" encoded ("a1111-0.2"), or
    # ComfyUI's chunks before its commit 1c8d11e ("comfyui-2024"); "[a:b:0.5]", "[a|b]" and AND read as text, and
    # the shorter of prompt and negative padded.
    values = {"prompt_editing": False, "pad_conds": True, **values}
    values["emphasis"] = READ_BEFORE_0_3_0.get(values["emphasis"], values["emphasis"])
    if values["scheduler"] in RENAMED_SCHEDULERS:  # "dpmpp_sde" ran DPMSolverSinglestepScheduler
        cls_name, options = RENAMED_SCHEDULERS[values["scheduler"]]
        values["scheduler"] = cls_name
        values["scheduler_options"] = {**options, **(values.get("scheduler_options") or {})}
    base = (recipe.get("models") or {}).get("base") or {}
    if isinstance(base, Mapping) and base.get("local") == "file" and not values.get("refiner_only"):
        # A single file's v_pred / ztsnr keys went unread: its recorded schedule is what made the image.
        config = recipe["scheduler"].get("config") or {}
        values.setdefault("prediction_type", config.get("prediction_type", "epsilon"))
        values.setdefault("zero_terminal_snr", bool(config.get("rescale_betas_zero_snr", False)))
    return values


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
