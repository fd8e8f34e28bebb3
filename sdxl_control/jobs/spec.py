"""The one request path: every front-end (command line, web page, job file) translates what its user gave into a
:class:`JobSpec`; :func:`resolve` alone turns a spec into what :meth:`Generator.run` takes — the preset applied, its
inputs filled, the models chosen and found by a :class:`~sdxl_control.jobs.resolvers.Resolver`.

Example:
    >>> spec = JobSpec("a red fox", settings={"steps": 4, "seed": 3})
    >>> job = resolve(spec)                                         # doctest: +SKIP
    >>> job.request.steps, job.base
    (4, 'stabilityai/stable-diffusion-xl-base-1.0')
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..base.errors import InvalidRequestError
from ..base.files import Locator
from ..base.model_refs import ModelRef
from ..base.validation import unknown_keys
from .resolvers import HubResolver, Resolver

if TYPE_CHECKING:
    from ..passes.request import GenerationRequest
    from ..presets import Preset
    from ..protocol.conditions import Condition

__all__ = ["JobSpec", "ResolvedJob", "resolve"]

log = logging.getLogger(__name__)
# Keys of a job's models that say how this machine runs it (a Runner's business), beside the preset's MODEL_KEYS.
RUN_KEYS = ("fast", "offload")


@dataclass(frozen=True)
class JobSpec:
    """What a user asked for, before anything is looked up: a ``prompt``; a ``preset`` (name or file); ``inputs``
    (name -> files) and ``set`` assignments, which fill and change the preset's inputs and settings, and fill the
    input slots of the condition families (:func:`~sdxl_control.adapters.input_slots`: ``{"edges": ["photo.jpg"]}``
    with ``{"edges.scale": 0.6}``) where no preset takes them; request ``settings`` given explicitly (they win over
    the preset's); ``conditions`` stacked after the preset's and the slots'; ``models`` named explicitly (``base``,
    ``refiner``, ``unet``, and how the :class:`~sdxl_control.jobs.runner.Runner` keeps them: ``weight_storage``,
    ``"fp8_e4m3fn"`` keeps the UNets in fp8, see :meth:`~sdxl_control.passes.generator.Generator.set_weight_storage`;
    ``fast``, a level of :data:`~sdxl_control.base.defaults.FAST_LEVELS`; ``offload``, ``True`` to keep the models in
    CPU memory, each on the device only while it runs); a ``face_pack`` for every face analysis (the preset's conditions
    included); or a ``recipe`` to re-make, which the other fields then change.

    Example:
        >>> JobSpec("a portrait", preset="portrait", inputs={"face": ["me.jpg"]}, settings={"seed": 7}).preset
        'portrait'
    """

    prompt: str | None = None
    preset: str | None = None
    inputs: Mapping[str, Sequence[str]] = field(default_factory=dict)
    set: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    conditions: tuple[Condition, ...] = ()
    models: Mapping[str, Any] = field(default_factory=dict)
    face_pack: str | None = None
    recipe: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ResolvedJob:
    """A spec made runnable: the request and the models it runs on, with how a :class:`~sdxl_control.jobs.runner.Runner`
    keeps them (``weight_storage``, the ``fast`` path's level, ``offload``). ``keep`` is the one image of the batch to
    keep when a recipe's batch is re-run to re-make that image exactly.

    Example:
        >>> job = resolve(JobSpec("a fox"))                               # doctest: +SKIP
        >>> Runner().run(job).images[0].save("fox.png")                   # doctest: +SKIP
    """

    request: GenerationRequest
    base: str
    refiner: str | None = None
    unet: ModelRef | None = None
    keep: int | None = None
    weight_storage: str | None = None
    fast: str | None = None
    offload: bool = False

    @property
    def models(self) -> tuple[str, str | None, ModelRef | None]:
        return self.base, self.refiner, self.unet


def resolve(spec: JobSpec, resolver: Resolver | None = None, *, locate: Locator | None = None) -> ResolvedJob:
    """The request and models ``spec`` asks for, with its models found by ``resolver`` (default: what it names) and
    the files a recipe or a job names found by ``locate``. Nothing is loaded."""
    from ..adapters import with_face_pack
    from ..passes.request import GenerationRequest
    from ..protocol.conditions import validate_conditions
    from .slots import slot_conditions

    resolver = resolver or HubResolver()
    locate = locate or Locator()
    preset, inputs, slot_inputs, slot_options = _preset(spec)
    conditions = [
        *(preset.conditions(inputs) if preset is not None else []),
        *slot_conditions(slot_inputs, slot_options),
        *spec.conditions,
    ]
    conditions = [resolver.condition(c) for c in with_face_pack(conditions, spec.face_pack)]
    settings = _json_forms(spec.settings)
    if spec.recipe is not None:
        if spec.prompt:
            settings["prompt"] = spec.prompt
        if conditions:  # conditions given with a recipe replace the recorded ones
            settings["conditions"] = tuple(conditions)
        request = GenerationRequest.from_recipe(spec.recipe, locate=locate, **settings)
        keep = spec.recipe.get("batch_index", 0) if "num_images" not in settings else None
    else:
        if spec.prompt is None:  # "" is a prompt: an unconditional image, as A1111's API and ComfyUI make one
            raise InvalidRequestError("a prompt is required (or a recipe to re-make)")
        given = {**(preset.request_settings(inputs) if preset is not None else {}), **settings}
        # A recipe names the embeddings it used; a new prompt finds them in the model folders.
        given = _with_embeddings(spec.prompt, given, resolver)
        implied = dict(resolver.defaults())
        if given.get("init_image") is not None:  # an image names its own size
            implied.pop("size", None)
        request = GenerationRequest(spec.prompt, **{**implied, **given}, conditions=tuple(conditions))
        keep = None
    request = _fitted(request, resolver, explicit="size" in settings)
    if request.decoder is not None:
        request = dataclasses.replace(request, decoder=resolver.decoder(request.decoder))
    if request.vae is not None:
        request = dataclasses.replace(request, vae=resolver.vae(request.vae))
    if (upscaler := resolver.upscaler(request.upscaler)) != request.upscaler:
        request = dataclasses.replace(request, upscaler=upscaler)
    if request.detailer is not None:  # its faces analysed by the same policy as the conditions' photos
        from ..passes.detailer import detailer_pack

        pack = request.detailer.face_pack or spec.face_pack or detailer_pack(request.conditions)
        detailer = dataclasses.replace(request.detailer, face_pack=resolver.face_pack(pack))
        request = dataclasses.replace(request, detailer=detailer)
    refines = request.refiner_switch is not None or request.refiner_only
    validate_conditions(request.conditions, has_refiner=refines, has_base=not request.refiner_only)
    base, refiner, unet = _stages(spec, preset, refines, locate, resolver)
    fast, offload = _run_options(spec)
    return ResolvedJob(request, base, refiner, unet, keep, _weight_storage(spec, preset), fast, offload)


def _with_embeddings(prompt: str, settings: dict[str, Any], resolver: Resolver) -> dict[str, Any]:
    """The request ``settings`` with the textual inversions ``prompt`` and their negative prompt use (see
    :meth:`~sdxl_control.jobs.resolvers.Resolver.embeddings`), each file read now: a file that is no SDXL embedding
    is refused before any model loads. None used: the settings as they are."""
    from ..passes.request import GenerationRequest
    from ..protocol.emphasis import check_syntax
    from ..weights.embeddings import read_embedding

    texts = [t for t in (prompt, settings.get("negative_prompt")) if isinstance(t, str) and t]
    emphasis = settings.get("emphasis", GenerationRequest.__dataclass_fields__["emphasis"].default)
    given = settings.get("embeddings") or {}
    if not isinstance(given, Mapping) or emphasis not in ("a1111", "comfyui", "off"):
        return settings  # the request names what it expects
    for text, where in zip(texts, ("the prompt", "the negative prompt"), strict=False):
        check_syntax(text, emphasis, where)  # a prompt it refuses is refused before it is read for names
    found = resolver.embeddings(texts, str(emphasis), given)
    for name, file in found.items():
        read_embedding(file, name)
    return {**settings, "embeddings": found} if found else settings


def _fitted(request: GenerationRequest, resolver: Resolver, *, explicit: bool) -> GenerationRequest:
    """``request`` at the size its models' policy runs it (``--tiny``: the tiny models' scale), whichever front-end
    or preset gave the size; the recipe records the size used. An outpainted canvas is the image and its borders,
    which name their own size: it stays."""
    fitted = resolver.fit_size(request.size)
    if fitted == tuple(request.size) or request.outpaint is not None:
        return request
    width, height = request.size
    # A size the user typed is worth a warning; a preset's or an image's is what --tiny is expected to shrink.
    (log.warning if explicit else log.info)(
        "size %dx%d runs as %dx%d, the tiny models' scale (--tiny)", width, height, *fitted
    )
    return dataclasses.replace(request, size=fitted)


def _weight_storage(spec: JobSpec, preset: Preset | None) -> str | None:
    """How the models keep their weights: as the spec names it, else as the recipe was made, else the preset's."""
    from ..weights.storage import storage_dtype

    chosen = spec.models.get("weight_storage")
    if chosen is None and spec.recipe is not None:
        chosen = spec.recipe.get("weight_storage")
    if chosen is None and preset is not None:
        chosen = preset.models.get("weight_storage")
    if chosen is not None:
        storage_dtype(chosen)
    return chosen


def _run_options(spec: JobSpec) -> tuple[str | None, bool]:
    """(the fast path's level, whether to offload) as the spec's models name them: how this machine runs the job, so
    neither a recipe nor a preset records them."""
    from ..base.defaults import FAST_LEVELS

    fast, offload = spec.models.get("fast"), spec.models.get("offload")
    if fast is not None and (not isinstance(fast, str) or fast not in FAST_LEVELS):
        raise InvalidRequestError(f"the job's models.fast is one of {', '.join(FAST_LEVELS)}, got {fast!r}")
    if offload is not None and not isinstance(offload, bool):
        raise InvalidRequestError(f"the job's models.offload is true or false, got {offload!r}")
    return (None if fast == "off" else fast), bool(offload)


def _preset(spec: JobSpec) -> tuple[Preset | None, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(the preset with the assignments to it applied, its inputs, the inputs and options left for the families'
    input slots). The preset takes the inputs it declares and the settings it has (its keys and its templates:
    ``face.scale``); the slots take the rest, so ``--edges`` beside a preset without a structure input adds a
    ControlNet as it does without a preset."""
    from ..adapters import input_slots

    slots = input_slots()
    if spec.preset is None:
        unknown = [*(k for k in spec.inputs if k not in slots),
                   *(k for k in spec.set if str(k).partition(".")[0] not in slots)]  # fmt: skip
        if unknown:
            raise InvalidRequestError(
                f"'inputs' and 'set' fill a preset or the condition families' input slots ({', '.join(slots)}): "
                f"{', '.join(map(repr, unknown))} names no slot, and the job names no 'preset'"
            )
        return None, {}, dict(spec.inputs), dict(spec.set)
    from ..presets import PRESET_KEYS, load_preset

    preset = load_preset(spec.preset)

    def for_preset(name: str) -> bool:
        return name in PRESET_KEYS or name in preset.templates or name not in slots

    assignments = {k: v for k, v in spec.set.items() if for_preset(str(k).partition(".")[0])}
    inputs = {k: v for k, v in spec.inputs.items() if k in preset.inputs or k not in slots}
    slot_inputs = {k: v for k, v in spec.inputs.items() if k not in inputs}
    slot_options = {k: v for k, v in spec.set.items() if k not in assignments}
    preset = preset.with_settings(assignments) if assignments else preset
    return preset, inputs, slot_inputs, slot_options


def _json_forms(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Request settings as written in JSON (lists) in the request's own types (tuples)."""
    out = dict(settings)
    for key in ("size", "timesteps", "outpaint"):
        if isinstance(out.get(key), list):
            out[key] = tuple(out[key])
    return out


def _stages(
    spec: JobSpec, preset: Preset | None, switches: bool, locate: Locator, resolver: Resolver
) -> tuple[str, str | None, ModelRef | None]:
    """(base, refiner, UNet checkpoint): those the spec names, else the recipe's, else the preset's, else the
    defaults. A base named on its own drops the preset's UNet checkpoint, which was chosen for the preset's base."""
    from ..base.defaults import DEFAULT_BASE, DEFAULT_REFINER
    from ..presets import MODEL_KEYS
    from ..records.recipe import recipe_models, recorded_model

    message = unknown_keys(spec.models, (*MODEL_KEYS, *RUN_KEYS), "the job's models")
    if message:
        raise InvalidRequestError(message)
    given = {k: v for k, v in spec.models.items() if v is not None}
    from_preset = dict(preset.models) if preset is not None else {}
    recipe = spec.recipe
    tiny_seed = None
    refiner: str | None = None
    if recipe is not None and "base" not in given:
        recorded = recipe["models"].get("refiner") or recipe["models"].get("base", {}).get("tiny_seed") is not None
        tiny_seed = (recipe["models"].get("base") or {}).get("tiny_seed")
        base, refiner, unet = recipe_models(recipe, locate, refiner=switches and bool(recorded))
        unet = ModelRef.parse(given["unet"], "the job's models.unet") if "unet" in given else unet
    else:
        chosen = {k: v for k, v in from_preset.items() if not ("base" in given and k == "unet")}
        chosen.update(given)
        base = locate.resolve(chosen.get("base", DEFAULT_BASE), "the job's base model")
        unet = ModelRef.parse(locate.resolve(chosen.get("unet"), "the job's UNet checkpoint"), "the job's models.unet")
        if recipe is not None and switches and recipe["models"].get("refiner"):  # another base over a recipe
            refiner = recorded_model(recipe["models"]["refiner"], locate, "refiner")
    if switches:
        named = given.get("refiner") or refiner or from_preset.get("refiner", DEFAULT_REFINER)
        refiner = locate.resolve(named, "the job's refiner")
    else:
        refiner = None
    found = resolver.stages(base, refiner, unet, tiny_seed)
    # One rule for every front-end: models the job names explicitly are swapped by the policy too (--tiny's
    # stand-ins), and it is said.
    for key, asked, used in zip(("base", "refiner", "unet"), (base, refiner, unet), found, strict=True):
        if given.get(key) and str(asked) != str(used):
            if key != "unet" and str(resolver.named("checkpoints", asked)) == str(used):
                log.info("the job's %s %s is %s (in the model folders)", key, given[key], used)
            else:
                log.warning("the job's %s %s runs as %s (%s)", key, given[key], used, type(resolver).__name__)
    return found
