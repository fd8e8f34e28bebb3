"""The two-stage SDXL generator: a request in, images with their recipe out."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..base.caches import clear_caches
from ..base.defaults import DEFAULT_BASE
from ..base.errors import IncompatibleModelError, InvalidRequestError
from ..base.files import PATH_MODES, PathMode
from ..base.model_refs import ModelRef
from ..base.validation import unknown_keys
from ..base.version import VERSION
from ..engine.devices import check_device, placement
from ..engine.loop import ProgressCallback, PromptSegment, StageInputs, denoise
from ..engine.models import StageModels, load_stage
from ..engine.start import INPAINT_CHANNELS, start_images, start_latents
from ..engine.step_cache import StepCache
from ..engine.vae import NonFiniteLatentsError, decode_latents, encode_pixels, load_decoder, load_vae, vae_scale_factor
from ..protocol.conditions import Condition, PrepareContext, Prepared, Stage, validate_conditions
from ..protocol.fast import FastPath, FastPathHandle, apply_fast_path
from ..protocol.guidance import CFGRescale, guidance_for
from ..protocol.rows import Rows
from ..protocol.schedule import StageSchedule, make_scheduler, split_schedule
from ..protocol.text import MicroConditioning, TextChannel, prompt_segments, time_ids
from ..records.infotext import Infotext
from ..records.recipe import RecipeImage, Result
from ..weights.storage import FP8_MATMUL, check_storage, store_weights
from .detailer import detail_result
from .hires import hires_fix
from .request import GenerationRequest

if TYPE_CHECKING:
    from ..engine.residency import KeptWeights
    from ..protocol.prompt_schedule import ScheduledPrompt

__all__ = ["GenerationRequest", "Generator", "LastLoaded"]  # GenerationRequest: defined in .request


@dataclass(frozen=True)
class _StagePlan:
    models: StageModels
    schedule: StageSchedule


def _scheduled(request: GenerationRequest, plan: _StagePlan) -> ScheduledPrompt | None:
    """The prompts' A1111 editing, alternation and AND parts over the stage's pass (None: read as plain text). The
    schedule counts the request's steps, twice for a second-order sampler (A1111's ``total_steps``), whose denoiser
    calls the loop counts; warnings (numbers that leave a text unread) come with the pass's first stage."""
    from ..protocol.prompt_schedule import scheduled_prompt, uses_schedules

    texts = [t for t in (request.prompt, request.negative_prompt) if t is not None]
    if not request.reads_schedules or not any(uses_schedules(t) for t in texts):
        return None
    order = 2 if getattr(plan.schedule.scheduler, "order", 1) == 2 else 1
    steps = (len(request.timesteps) if request.timesteps else request.steps) * order
    first = None if request.first_pass_steps is None else request.first_pass_steps * order
    warn = plan.schedule.first_index == 0
    return scheduled_prompt(request.prompt, request.negative_prompt, steps, first, warn=warn)


def _part_weights(request: GenerationRequest) -> tuple[float, ...]:
    """The weights of the prompt's AND parts (one part, weight 1, when it has none or they are not read)."""
    from ..protocol.prompt_schedule import composable_parts

    if not request.reads_schedules:
        return (1.0,)
    return tuple(weight for _, weight in composable_parts(request.prompt))


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


def _embeddings(request: GenerationRequest) -> dict[str, Any]:
    """The request's textual inversions, read from their files (name -> :class:`TextualInversion`)."""
    from ..weights.embeddings import read_embedding

    return {name: read_embedding(file, name) for name, file in request.embeddings.items()}


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
        # Deltas kept applied between runs: a Runner sets its own for each of its runs (see engine.residency).
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
        just before it runs (ComfyUI's ``--fp8_e4m3fn-unet``; see :mod:`sdxl_control.weights.storage`): about half their
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
        from ..engine.models import stage_needs
        from ..weights.inventory import ensure

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
            refiner_config = {**self.refiner.scheduler_config, **self.refiner.marked}  # its file's v_pred / ztsnr
            scheduler = make_scheduler(
                refiner_config, request.scheduler, request.scheduler_options, seeds=request.seeds
            )
            schedule, _ = split_schedule(scheduler, None, request.steps, None, request.timesteps, strength)
            return [_StagePlan(self.refiner, schedule)]
        from ..protocol.prediction import predicted_config

        base_config = predicted_config(self.base.scheduler_config, self.base.marked, request.prediction_type,
                                       request.zero_terminal_snr, self.base.source.name)  # fmt: skip
        base_scheduler = make_scheduler(base_config, request.scheduler, request.scheduler_options, seeds=request.seeds)
        refiner_scheduler = None
        if request.refiner_switch is not None:
            if self.refiner is None:
                raise InvalidRequestError("refiner_switch was given but no refiner is loaded")
            refiner_scheduler = make_scheduler(
                {**self.refiner.scheduler_config, **self.refiner.marked},
                request.scheduler,
                request.scheduler_options,
                seeds=request.seeds,
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
        schedule = _scheduled(request, plan)
        weights = schedule.weights if schedule is not None else (1.0,)
        guidance = guidance_for(request.guidance, unet, weights=weights)
        guided = guidance.copies > 1
        # CFG rescale acts after every guidance condition's term (diffusers rescales after adding PAG's).
        terms = (CFGRescale(request.guidance_rescale),) if guided and request.guidance_rescale > 0 else ()
        n = request.num_images
        mine = [(c, p) for c, p in prepared if models.stage in c.stage]
        # ControlNet, IP-Adapter and the like act inside the UNet on its batch: with one of them the negative prompt and
        # the prompt run in one batch (padded); each part of a prompt of several reads their prompt rows (Rows).
        on_batch = [type(c).__name__ for c, p in mine if type(p).attach is not Prepared.attach]
        pad = request.pad_conds or bool(on_batch) or request.step_cache > 1
        # Every condition is asked (the prompt channel): a base-only one may still take its syntax out of the refiner's.
        channels = []
        for condition, ready in prepared:
            edit = ready.prompt_edit(models.stage)
            deltas = {k: v for k, v in ready.weight_deltas(models.stage).items() if k != "unet"}
            if edit is not None or deltas:
                channels.append(TextChannel(condition.scale, condition.window, edit, deltas))
        with self._resident([e.model for e in models.text_encoders]):
            prompt_text, negative_text = request.prompt, request.negative_prompt
            if models.stage is Stage.REFINER:  # the refiner's own prompts, where the request gives them
                prompt_text = request.refiner_prompt if request.refiner_prompt is not None else prompt_text
                negative_text = (
                    request.refiner_negative_prompt if request.refiner_negative_prompt is not None else negative_text
                )
            encoded = prompt_segments(models.text_encoders, prompt_text, negative_text, channels,
                                      plan.schedule.total, need_negative=guided,
                                      zero_negative=models.force_zeros_for_empty_prompt,
                                      long_prompts=request.long_prompts, emphasis=request.emphasis,
                                      embeddings=_embeddings(request), clip_skip=request.clip_skip,
                                      schedule=schedule, pad=pad)  # fmt: skip
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
        parts = len(weights)
        ids = torch.cat([neg_ids.repeat(n, 1), pos_ids.repeat(n * parts, 1)]) if guided else pos_ids.repeat(n, 1)
        prompts = []
        for first, positive, negative in encoded:
            # [negative x n, part 1 x n, ..., part k x n], as the guidance splits it
            hidden, pooled = positive.hidden.repeat_interleave(n, 0), positive.pooled.repeat_interleave(n, 0)
            if negative is not None and negative.hidden.shape[1] != hidden.shape[1]:  # not padded: two UNet calls
                prompts.append(PromptSegment(first, hidden.to(device, dtype), pooled.to(device, dtype),
                                             negative.hidden.repeat(n, 1, 1).to(device, dtype),
                                             negative.pooled.repeat(n, 1).to(device, dtype)))  # fmt: skip
                continue
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
            rows=Rows.of_parts(n, parts, guided) if parts > 1 else None,
            terms=terms,
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

        def run(one: GenerationRequest) -> Result:
            return self._run(one, progress, progress_bar, recipe_paths)

        def record(whole: GenerationRequest, images: Sequence[Any]) -> list[RecipeImage]:
            return self._recorded(whole, self._plans(whole), recipe_paths, images)

        with self._vae(request.vae):
            if request.hires_scale is None:
                result = run(request)
            else:
                factor = vae_scale_factor(self.base.vae)
                result = hires_fix(request, run, record, latent_factor=factor, device=self.device)
            if request.detailer is None:
                return result
            return detail_result(result, request, lambda face: run(face).images[0])

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
            guided=guidance_for(request.guidance, plans[0].models.unet, weights=_part_weights(request)).copies > 1,
            size=request.size,
            stages={p.models.stage: p.models.unet for p in plans},
            fast=self.fast_path,
            steps=plans[0].schedule.total,
            start_image=repainted[0],
            start_mask=repainted[1],
            encoder=lambda text, stage: self._encoded(request, plans, text, stage),
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
        return Result(images=self._recorded(request, plans, recipe_paths, pil), latents=latents)

    def _encoded(
        self, request: GenerationRequest, plans: list[_StagePlan], text: str, stage: Stage
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``text`` read as the request reads its prompt, by ``stage``'s text encoders (PrepareContext.encode_prompt)."""
        models = next(p.models for p in plans if p.models.stage is stage)
        with self._resident([e.model for e in models.text_encoders]):
            (_, positive, _), *_ = prompt_segments(models.text_encoders, text, None, (), plans[0].schedule.total,
                                                   need_negative=False, zero_negative=models.force_zeros_for_empty_prompt,
                                                   long_prompts=request.long_prompts, emphasis=request.emphasis,
                                                   embeddings=_embeddings(request), clip_skip=request.clip_skip)  # fmt: skip
        _, dtype = placement(models.unet)
        return positive.hidden.to(self.device, dtype), positive.pooled.to(self.device, dtype)

    def _kept(self, request: GenerationRequest, recipe_paths: PathMode) -> Result:
        """strength 0: the init image itself, fitted to the request's size, for the hires fix or the face detailer to
        work on (A1111's img2img at denoising 0; ADetailer's "skip img2img"); its latents as the VAE encodes it."""
        from ..engine.start import read_init_image

        image = read_init_image(request.init_image, request.size)
        vae = self.base.vae
        pixels = VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae)).preprocess(image).to(torch.float32)
        with self._resident([vae]):
            latents = torch.cat([
                encode_pixels(vae, pixels, torch.Generator("cpu").manual_seed(seed), self.base.dtype)
                for seed in request.seeds
            ])  # fmt: skip
        copies = [image.copy() for _ in request.seeds]
        return Result(images=self._recorded(request, self._plans(request), recipe_paths, copies), latents=latents)

    def _recorded(
        self, request: GenerationRequest, plans: list[_StagePlan], paths: PathMode, images: Sequence[Any]
    ) -> list[RecipeImage]:
        """``images``, one per seed of ``request``, each with its recipe: what the batch shares, its seed and index.
        The one place a recipe is assembled, whichever pass made the images."""
        shared = self._recipe(request, plans, paths)
        recipes = [{**copy.deepcopy(shared), "seed": seed, "batch_index": i} for i, seed in enumerate(request.seeds)]
        return [RecipeImage.wrap(image, recipe) for image, recipe in zip(images, recipes, strict=True)]

    def _recipe(self, request: GenerationRequest, plans: list[_StagePlan], paths: PathMode) -> dict[str, Any]:
        """What the batch's images share of their recipe (each adds its seed and index)."""
        scheduler = plans[0].schedule.scheduler
        recipe = request.settings(paths)
        infotext = sum((c.infotext() for c in request.conditions), Infotext())
        recipe.update(
            version=VERSION,
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
        # What the base was read as (its file's keys, or the request's override), so that a re-run reads it so
        # again; an epsilon model's recipe reads as before these fields existed.
        used = scheduler.config
        if plans[0].models is self.base and used.get("prediction_type") == "v_prediction":
            recipe.update(prediction_type="v_prediction", zero_terminal_snr=bool(used.get("rescale_betas_zero_snr")))
        return _jsonable(recipe)


class LastLoaded:
    """The :class:`Generator` for the models asked for last, kept while the next request names the same ones; other
    models replace it, the old ones let go first (two sets of SDXL weights need not fit at once), together with every
    process cache (:func:`sdxl_control.base.caches.clear_caches`: the ControlNets and encoders the old set used). The
    page and batch workers hold a :class:`~sdxl_control.jobs.runner.Runner`, which keeps models the same way and also
    applies a job's offloading and fast path.

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
