"""The local web page (``sdxl-control ui``): every condition as a user thinks of it, live previews while the image
forms, a gallery of PNGs that carry their recipes, and the same as an HTTP API through Gradio's client.

Built on Gradio: its queue runs one generation at a time (others wait, their position shown), its file handling
takes the uploads, its client is the API. Models load once per process and stay loaded.

Example:
    >>> app = build_app(UiConfig(tiny=True))          # doctest: +SKIP
    >>> app.launch()                                  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import queue
import random
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np

from .adapters import identity_kinds, input_slots
from .base.defaults import DRAFT_DECODER, FAST_LEVELS, SCHEDULERS, STRUCTURE_CONTROLS
from .base.errors import InvalidRequestError, SdxlControlError
from .jobs.resolvers import HubResolver, Resolver

if TYPE_CHECKING:
    from .jobs.spec import JobSpec

__all__ = ["UiConfig", "PageForm", "build_app", "form_spec"]

log = logging.getLogger(__name__)

NO_PRESET = "(none)"
PRESET_SAMPLER = "(the preset's, else the model's)"
# The settings a restored PNG fills the form with (the others are named in the status).
_RESTORED_FIELDS = ("prompt", "negative_prompt", "size", "steps", "guidance", "seed", "refiner_switch", "scheduler")
PRESET_STORAGE = "(the preset's, else the compute dtype)"
# The fp8 storages the page offers (storage.WEIGHT_STORAGE, named without importing torch as the page opens).
PAGE_STORAGES = ("fp8_e4m3fn", "fp8_e5m2", "fp8_matmul")
# The page's face method: PuLID, as the portrait preset and the README's page example use it.
PAGE_IDENTITY = "pulid"
PREVIEW_EVERY = 2
MORE_INPUTS_EXAMPLE = '{"inputs": {"reference": ["ref.png"]}, "set": {"reference.scale": 0.5}}'
MAX_SEED = 2**32 - 1
# How regions act, as the region slot's mode flag offers them (the registry's, read without importing the family).
_REGION_MODES = next(f.choices for f in input_slots()["region"][1].flags if f.field == "mode")


class Stopped(Exception):
    """Raised inside the denoising loop when the user pressed Stop: the loop's cleanup detaches every condition."""


@dataclass(frozen=True)
class UiConfig:
    """What the page serves: models found by ``resolver`` (``TinyResolver()``: the tiny stand-ins, offline), the
    ``base``/``refiner`` it always uses (default: each preset's, else SDXL's); ``face_pack`` for identity conditions;
    ``preview_decoder`` for the live previews; ``outputs`` where generated PNGs are kept.

    Example:
        >>> from sdxl_control.jobs.resolvers import TinyResolver
        >>> UiConfig(resolver=TinyResolver()).base is None
        True
    """

    resolver: Resolver = field(default_factory=HubResolver)
    base: str | None = None
    refiner: str | None = None
    face_pack: str | None = None
    preview_decoder: str = DRAFT_DECODER
    device: str | None = None
    outputs: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sdxl-control-ui-")))


@dataclass(frozen=True)
class PageForm:
    """The page's form, field by field, with the values the page opens with; the HTTP API takes the same names.
    ``more_inputs`` fills any condition family's input slot the other fields do not (a reference image, the union,
    a family added later), as a job line does: JSON ``{"inputs": {SLOT: files}, "set": {"SLOT.OPTION": value}}``.
    ``regions`` holds one region a line as ``--region`` reads it (``X0,Y0,X1,Y1:PROMPT``, ``MASK:PROMPT``);
    ``region_paint`` a canvas whose painted layers are masks, each with its line of ``region_prompts``;
    ``pag_scale`` 0, ``apg`` and ``freeu`` off leave those conditions out.

    Example:
        >>> PageForm("a red fox", steps=4).identity
        'pulid'
    """

    prompt: str = ""
    negative: str = ""
    preset: str = NO_PRESET
    width: float = 1024
    height: float = 1024
    steps: float = 30
    guidance: float = 5.0
    scheduler: str = PRESET_SAMPLER
    seed: float | None = None
    random_seed: bool = True
    num_images: float = 1
    refiner_switch: float = 0.0
    faces: Any = None
    identity: str = PAGE_IDENTITY
    identity_scale: float = 0.8
    style: str | None = None
    style_scale: float = 0.8
    style_layers: str = "style"
    structure: str | None = None
    structure_kind: str = "edges"
    structure_is_map: bool = False
    structure_scale: float = 0.6
    structure_start: float = 0.0
    structure_end: float = 1.0
    loras: Any = None
    lora_weights: str = ""
    init_image: Any = None
    strength: float = 0.75
    hires_scale: float = 1.0
    hires_strength: float = 0.5
    detail_faces: bool = False
    detail_strength: float = 0.4
    offload: bool = False
    fast: str = "off"
    weight_storage: str = PRESET_STORAGE
    regions: str = ""
    region_paint: Any = None
    region_prompts: str = ""
    region_mode: str = "masked"
    region_scale: float = 1.0
    pag_scale: float = 0.0
    apg: bool = False
    apg_eta: float = 1.0
    freeu: bool = False
    more_inputs: str = ""


def _files(value: Any) -> list[str]:
    if not value:
        return []
    items = value if isinstance(value, list) else [value]
    return [str(getattr(item, "name", item)) for item in items]


def _slot_inputs(form: PageForm, taken: set[str], folder: Path) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """(the condition families' input slots the form's fields fill, their options): the fields that fill the preset's
    inputs (``taken``) left out. The slots' families build the conditions (:mod:`sdxl_control.jobs.slots`), as for the
    command line's flags."""
    from .base.images import check_image_file

    inputs: dict[str, list[str]] = {}
    options: dict[str, Any] = {}
    faces = _files(form.faces)
    for face in faces:
        check_image_file(face, "face photo")
    if faces and "faces" not in taken:
        inputs["face"] = faces
        options.update({"face.kind": form.identity, "face.scale": form.identity_scale})
    if form.style and "style" not in taken:
        check_image_file(form.style, "style image")
        inputs["style"] = [form.style]
        options.update({"style.layers": form.style_layers, "style.scale": form.style_scale})
    if form.structure and "structure" not in taken:
        check_image_file(form.structure, "structure photo")
        name = form.structure_kind  # edges, depth or pose: a slot each
        inputs[name] = [form.structure]
        options.update({f"{name}.scale": form.structure_scale, f"{name}.window": (form.structure_start,
                        form.structure_end), **({f"{name}.map": True} if form.structure_is_map else {})})  # fmt: skip
    if loras := _files(form.loras):
        inputs["lora"] = loras
        weights = [float(w) for w in str(form.lora_weights or "").replace(",", " ").split()]
        if weights:  # one per file, the last repeating; none: the LoRA's own weight
            options["lora.scale"] = weights
    if regions := _regions(form, folder):
        # The region slot reads each line as --region does (its family's grammar), with the page's mode and strength.
        inputs["region"] = regions
        options.update({"region.mode": form.region_mode, "region.scale": float(form.region_scale)})
    if form.pag_scale:  # 0: no PAG (a condition at scale 0 is absent)
        options["pag.scale"] = float(form.pag_scale)
    if form.apg:
        options["apg.eta"] = float(form.apg_eta)
    if form.freeu:
        options["freeu.on"] = True
    return inputs, options


def _regions(form: PageForm, folder: Path) -> list[str]:
    """The region slot's entries of the page's Regions fields: the typed lines, then each layer painted on the
    canvas as a mask (white where its strokes are, written to ``folder`` so recipes can name it) with its prompt
    line, in layer order."""
    typed = [line.strip() for line in str(form.regions or "").splitlines() if line.strip()]
    value = form.region_paint
    layers = [layer for layer in (value.get("layers") or [] if isinstance(value, dict) else []) if layer]
    from PIL import Image

    masks = []
    for layer in layers:
        with Image.open(str(layer)) as image:
            painted = np.asarray(image.convert("RGBA"))[..., 3] > 0
        if painted.any():  # a layer left blank is no region
            masks.append(Image.fromarray(painted.astype(np.uint8) * 255))
    prompts = [line.strip() for line in str(form.region_prompts or "").splitlines() if line.strip()]
    if len(prompts) != len(masks):
        raise InvalidRequestError(
            f"Regions: {len(masks)} painted layer(s) and {len(prompts)} prompt line(s); write one prompt line per "
            "painted layer, in layer order (a new layer for each region)"
        )
    painted_regions = []
    for mask, prompt in zip(masks, prompts, strict=True):
        path = folder / f"region-{hashlib.sha256(mask.tobytes()).hexdigest()[:16]}.png"
        mask.save(path)
        painted_regions.append(f"{path}:{prompt}")
    return typed + painted_regions


def _more_inputs(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inputs, set) of the More inputs field: any input slot by name, in a job line's words."""
    import json

    if not (text or "").strip():
        return {}, {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidRequestError(f"More inputs: not JSON ({exc}); write {MORE_INPUTS_EXAMPLE}") from None
    if not isinstance(value, dict) or set(value) - {"inputs", "set"}:
        raise InvalidRequestError(
            f"More inputs: an object of 'inputs' and 'set', as {MORE_INPUTS_EXAMPLE}, got {text!r:.80}"
        )
    inputs, options = value.get("inputs", {}), value.get("set", {})
    if not isinstance(inputs, dict) or not isinstance(options, dict):
        raise InvalidRequestError(f"More inputs: 'inputs' and 'set' are objects, as {MORE_INPUTS_EXAMPLE}")
    return inputs, options


def _preset_inputs(preset: str, form: PageForm) -> tuple[dict[str, Any], set[str]]:
    """(the preset's inputs from the page's fields, the fields they took): the face photos fill "face", the style
    image "style", the structure photo "structure", or "pose" when it is a pose."""
    from .presets import load_preset

    takes = load_preset(preset).inputs
    inputs: dict[str, Any] = {}
    if "face" in takes and _files(form.faces):
        inputs["face"] = _files(form.faces)
    if "style" in takes and form.style:
        inputs["style"] = [form.style]
    if form.structure:
        name = "pose" if form.structure_kind == "pose" and "pose" in takes else "structure"
        if name in takes:
            inputs[name] = form.structure
    if "init_image" in takes and form.init_image:
        background = form.init_image.get("background") if isinstance(form.init_image, dict) else form.init_image
        if background:
            inputs["init_image"] = str(background)
    fields_of = {"face": "faces", "style": "style", "structure": "structure", "pose": "structure",
                 "init_image": "init_image"}  # fmt: skip
    return inputs, {fields_of[name] for name in inputs}


def _start(form: PageForm, folder: Path) -> dict[str, Any]:
    """The request settings of the page's "Start from an image" fields: the editor's background is the init image;
    what was painted on it, the mask (white where any stroke is), written to ``folder`` so recipes can name it."""
    value = form.init_image
    if isinstance(value, dict):
        background, layers = value.get("background"), [layer for layer in value.get("layers") or [] if layer]
    else:
        background, layers = value, []
    from PIL import Image

    painted = None
    for layer in layers:
        with Image.open(str(layer)) as image:
            alpha = np.asarray(image.convert("RGBA"))[..., 3] > 0
        painted = alpha if painted is None else painted | alpha
    if not background:
        if painted is not None and painted.any():
            # Strokes alone say where to repaint but not what: dropping them would draw from noise without a word.
            raise InvalidRequestError(
                "Start from an image: strokes were painted with no image under them; upload the image to repaint "
                "first (then paint on it), or clear the strokes to draw from the prompt alone"
            )
        return {}
    from .base.images import check_image_file

    check_image_file(str(background), "init image")
    settings: dict[str, Any] = {"init_image": str(background), "strength": float(form.strength)}
    if painted is not None and painted.any():
        mask = Image.fromarray(painted.astype(np.uint8) * 255)
        path = folder / f"mask-{hashlib.sha256(mask.tobytes()).hexdigest()[:16]}.png"
        mask.save(path)
        settings["mask"] = str(path)
    return settings


def form_spec(form: PageForm, config: UiConfig, seed: int) -> JobSpec:
    """The job the page's form asks for: the preset's sampler, models, LoRAs and condition templates filled from the
    page's fields, the page's numbers (which choosing a preset fills in) and the input slots its other fields fill."""
    from .jobs.spec import JobSpec

    preset = form.preset if form.preset and form.preset != NO_PRESET else None
    inputs, taken = _preset_inputs(preset, form) if preset else ({}, set())
    switch = form.refiner_switch
    settings: dict[str, Any] = {
        "size": (int(form.width), int(form.height)), "steps": int(form.steps), "guidance": float(form.guidance),
        "refiner_switch": switch if switch and switch > 0 else None, "seed": seed, "num_images": int(form.num_images),
    }  # fmt: skip
    if form.negative:
        settings["negative_prompt"] = form.negative
    if form.scheduler and form.scheduler != PRESET_SAMPLER:
        settings["scheduler"] = form.scheduler
    settings.update(_start(form, config.outputs))
    if form.hires_scale and form.hires_scale > 1:
        settings.update(hires_scale=float(form.hires_scale), hires_strength=float(form.hires_strength))
    if form.detail_faces:
        settings["detailer"] = {"strength": float(form.detail_strength)}
    models: dict[str, Any] = {"base": config.base, "refiner": config.refiner}
    if form.weight_storage and form.weight_storage != PRESET_STORAGE:
        models["weight_storage"] = form.weight_storage
    if form.fast and form.fast != "off":
        models["fast"] = form.fast
    if form.offload:
        models["offload"] = True
    slot_inputs, slot_options = _slot_inputs(form, taken, config.outputs)
    more, more_options = _more_inputs(form.more_inputs)
    if both := sorted(set(more) & {*inputs, *slot_inputs}):
        raise InvalidRequestError(f"More inputs: {', '.join(both)} is filled by the page's own field; give it there")
    slot_inputs.update(more)
    slot_options.update(more_options)
    # An empty prompt box is a prompt forgotten, said as such (an empty prompt is a prompt to the job path).
    return JobSpec(form.prompt or None, preset=preset, inputs={**inputs, **slot_inputs}, set=slot_options, settings=settings,
                   models=models, face_pack=config.face_pack)  # fmt: skip


def _for_page(message: str) -> str:
    """``message`` with absolute paths cut to their file names: uploads live in temporary folders the user never
    chose."""
    return re.sub(r"(?:/[^/\s:'\"()]+)+/([^/\s:'\"()]+)", r"\1", message)


@contextmanager
def _warnings_of(worker: threading.Thread, events: queue.Queue[tuple[str, Any]]) -> Iterator[None]:
    """Every warning sdxl-control logs from ``worker``'s thread also goes to ``events``, for the page to show."""

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == worker.ident:
                events.put(("warning", _for_page(record.getMessage())))

    handler = Forward(logging.WARNING)
    root = logging.getLogger("sdxl_control")
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def _with_signature(handler: Callable[..., Iterator[Any]], form: type[PageForm], *extra: str) -> Any:
    """``handler`` (a generator) announcing the form's fields (and ``extra`` state) as its parameters: Gradio names the
    HTTP API's parameters after them and passes the page's values in this order."""

    def call(*values: Any) -> Iterator[Any]:
        yield from handler(*values)

    params = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default,
                                annotation=f.type) for f in fields(form)]  # fmt: skip
    params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for name in extra]
    call.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return call


class _Page:
    """The page's handlers, over the models it keeps loaded."""

    def __init__(self, config: UiConfig) -> None:
        from .jobs.runner import Runner

        self.config = config
        # The models of the page's last generation (another preset's models replace them, so memory does not double).
        self.runner = Runner(device=config.device)

    def generate(self, *values: Any) -> Iterator[tuple[Any, ...]]:
        """Generate for the page: the form's values in :class:`PageForm`'s order, then the session's Stop flag
        (unused: a new one is made). Yields (preview, status, gallery, downloads, last seed, Stop flag) as the image
        forms. An error is a message and the status; the last results stay."""
        yield from self._generate(values, raise_errors=False)

    def generate_api(self, *values: Any) -> Iterator[tuple[Any, ...]]:
        """Generate for the HTTP API: the same, an error raised to the client."""
        yield from self._generate(values, raise_errors=True)

    def _generate(self, values: tuple[Any, ...], raise_errors: bool) -> Iterator[tuple[Any, ...]]:
        from .jobs.spec import resolve

        form = PageForm(*values[:-1])
        seed = random.randint(0, MAX_SEED) if form.random_seed or form.seed in (None, "") else int(form.seed)

        def failed(message: str) -> tuple[Any, ...]:
            message = _for_page(message)
            if raise_errors:
                raise gr.Error(message)
            gr.Warning(message)
            return gr.update(), f"**error:** {message}", gr.update(), gr.update(), seed, None

        try:
            job = resolve(form_spec(form, self.config, seed), self.config.resolver)
        except (SdxlControlError, ValueError) as exc:
            yield failed(str(exc))
            return
        # This session's Stop flag, kept in its state: the Stop button sets it, the loop checks it every step.
        stop = threading.Event()
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        worker = threading.Thread(target=self._work, args=(job, stop, events), daemon=True)
        notes: list[str] = []
        with _warnings_of(worker, events):
            worker.start()
            try:
                yield None, "waiting for the models", gr.update(), gr.update(), seed, stop
                while True:
                    kind, payload = events.get()
                    if kind == "preview":
                        image, status = payload
                        yield image, status, gr.update(), gr.update(), seed, stop
                    elif kind == "warning":  # e.g. "2 faces in me.jpg: using the largest"
                        gr.Warning(payload)
                        notes.append(payload)
                    elif kind == "done":
                        paths = [self._save(image, i) for i, image in enumerate(payload.images)]
                        status = f"done: {len(paths)} image(s), seed {seed}" + "".join(f"; {n}" for n in notes)
                        yield paths[0], status, paths, paths, seed, None
                        return
                    elif kind == "stopped":
                        yield gr.update(), "stopped", gr.update(), gr.update(), seed, None
                        return
                    else:
                        message = str(payload) if isinstance(payload, SdxlControlError) else (
                            f"unexpected {type(payload).__name__}: {payload}")  # fmt: skip
                        yield failed(message)
                        return
            finally:
                stop.set()  # a cancelled or failed page call stops its generation too
                worker.join()

    def _work(self, job: Any, stop: threading.Event, events: queue.Queue[tuple[str, Any]]) -> None:
        from .engine.preview import Previews

        def show(image: Any, event: Any) -> None:
            events.put(("preview", (image, f"{event.stage.label}: step {event.step} of {event.steps}")))

        def check(event: Any) -> None:
            if stop.is_set():
                raise Stopped()

        try:
            decoder = self.config.resolver.decoder(self.config.preview_decoder) or self.config.preview_decoder
            progress = Previews(show, every=PREVIEW_EVERY, decoder=decoder, then=check)
            events.put(("done", self.runner.run(job, progress=progress, progress_bar=False)))
        except Stopped:
            events.put(("stopped", None))
        except Exception as exc:  # reported in the page; the page and the next call live on
            events.put(("error", exc))

    def _save(self, image: Any, index: int) -> str:
        path = self.config.outputs / f"sdxl-control-{image.recipe['seed']}-{index}-{random.getrandbits(32):08x}.png"
        image.save(path)
        return str(path)

    def faces_uploaded(self, files: Any, identity: str) -> tuple[Any, list[Any]]:
        """The face photos as uploaded, checked at once: a file that is not an image is removed (and said), and each
        photo is shown with the faces found by the face pack the ``identity`` method uses, the one used in green
        (more than one is said)."""
        from .adapters import condition_class
        from .base.images import check_image_file
        from .preprocessors.face import DEFAULT_PACK, FaceAnalyzer, draw_faces

        method_pack = next(
            (f.default for f in fields(condition_class(identity)) if f.name == "face_pack"), DEFAULT_PACK
        )
        pack = self.config.resolver.face_pack(self.config.face_pack or str(method_pack))
        kept, shown = [], []
        for path in _files(files):
            name = Path(path).name
            try:
                check_image_file(path, name)
            except SdxlControlError:
                gr.Warning(f"{name} is not an image: it was removed from the face photos")
                continue
            kept.append(path)
            try:
                count = len(FaceAnalyzer(pack).faces(path))
                shown.append((draw_faces(path, pack), f"{name}: {count} face(s)"))
            except SdxlControlError as exc:  # no face, or the face models are missing: said now, not at Generate
                gr.Warning(str(exc))
                continue
            if count > 1:
                gr.Warning(f"{count} faces in {name}: the largest (green) is the identity")
        return (kept or None), shown

    @staticmethod
    def stop_clicked(stop: threading.Event | None) -> str:
        if stop is None:
            return "nothing to stop"
        stop.set()
        return "stopping"

    def show_maps(self, faces: Any, structure: Any, kind: str, is_map: bool) -> list[Any]:
        from .preprocessors import preprocess

        resolver, maps = self.config.resolver, []
        try:
            if structure:
                preprocessor = None if is_map else STRUCTURE_CONTROLS[kind].preprocessor
                maps.append(preprocess(preprocessor, structure, **resolver.preprocess_options(preprocessor)))
            for face in _files(faces):
                pack = {"pack": resolver.face_pack(self.config.face_pack)} if self.config.face_pack else {}
                maps.append(preprocess("face", face, **pack))
        except SdxlControlError as exc:
            raise gr.Error(str(exc)) from None
        return maps

    def opening_status(self) -> str:
        """What the page says as it opens: ready, or which models are missing and how to get them."""
        from .base.errors import MissingWeightsError
        from .jobs.needs import run_needs
        from .jobs.spec import JobSpec, resolve
        from .weights.inventory import check, missing_advice

        job = resolve(JobSpec("the page's models", models={"base": self.config.base, "refiner": self.config.refiner}),
                      self.config.resolver)  # fmt: skip
        try:
            missing = [n for n in run_needs(job.request, *job.models) if not check(n).present]
        except MissingWeightsError as exc:
            return f"**models missing:** {exc}"
        if not missing:
            return "ready"
        return "**models missing** (generating will fail until they are here): " + missing_advice(missing)

    def apply_preset(self, name: str) -> list[Any]:
        """Choosing a preset fills in its numbers, its size at the model policy's scale (``--tiny``: the tiny
        models', as every front-end runs it); the rest comes with it."""
        from .presets import load_preset

        if not name or name == NO_PRESET:
            return [gr.update()] * 7 + ["ready"]
        preset = load_preset(name)
        settings = preset.settings
        width, height = self.config.resolver.fit_size(tuple(settings.get("size", (1024, 1024))))
        size = [width, height]
        takes = f" — it takes: {', '.join(preset.inputs)}" if preset.inputs else ""
        return [settings.get("steps", gr.update()), settings.get("guidance", gr.update()), *size,
                settings.get("refiner_switch") or 0.0, settings.get("negative_prompt", ""),
                settings.get("strength", gr.update()), f"{name}: {preset.description}{takes}"]  # fmt: skip

    def restore(self, png: Any) -> list[Any]:
        """The form's values from a PNG: an sdxl-control recipe, or A1111's or ComfyUI's settings (with the parts
        that did not map listed in the status). A LoRA the PNG names that is not on this machine is said in the
        words the command line refuses it with (:func:`~sdxl_control.jobs.png_import.missing_loras`)."""
        from .jobs.png_import import Imported, missing_loras, read_image_settings

        name = Path(_files(png)[0]).name
        try:
            found = read_image_settings(_files(png)[0])
        except SdxlControlError as exc:
            raise gr.Error(str(exc)) from None
        if isinstance(found, Imported):
            values: dict[str, Any] = {"prompt": found.prompt, **found.settings}
            absent = missing_loras(found, self.config.resolver, name)
            if absent:
                gr.Warning("\n".join(absent.values()))
            notes = [
                *absent.values(),
                *(
                    f"LoRA {getattr(c, 'source', c.kind)}: add its file under LoRAs"
                    for c in found.conditions
                    if getattr(c, "source", None) not in absent
                ),  # fmt: skip
                *(f"{role} model {model}: the page runs its own models" for role, model in found.models.items()),
                # Settings the form has no field for (the command line restores them): named, not dropped.
                *(
                    f"{key} {value!r}: no field on the page; `generate --recipe` restores it"
                    for key, value in found.settings.items()
                    if key not in _RESTORED_FIELDS
                ),  # fmt: skip
                *found.unmapped,
            ]
            status = f"restored from {name} ({found.tool} settings); not used:\n" + "\n".join(f"- {n}" for n in notes)
        else:
            values = {**found, "scheduler": (found.get("scheduler") or {}).get("requested")}
            status = f"restored from {name}: seed {found['seed']}"
            from .base.version import VERSION
            from .passes.request import LAST_READING_CHANGE
            from .protocol.conditions import recorded_before

            if recorded_before(found.get("version"), LAST_READING_CHANGE):
                # The page runs its fields as this release reads them; only the command line reads a recipe whole,
                # as the release that recorded it read it (its sampler names, prompt syntax...).
                status += (
                    f"; recorded by sdxl-control {found.get('version')}, which read some settings otherwise: "
                    f"`generate --recipe {name}` re-makes its pixels, the page runs these fields as {VERSION} reads them"
                )
        width, height = values.get("size", (gr.update(), gr.update()))
        return [values.get("prompt", ""), values.get("negative_prompt") or "", width, height,
                values.get("steps", gr.update()), values.get("guidance", gr.update()), values.get("seed", gr.update()),
                False if "seed" in values else gr.update(), values.get("refiner_switch") or 0.0,
                values.get("scheduler") or PRESET_SAMPLER, status]  # fmt: skip


def _form_widgets(config: UiConfig) -> dict[str, Any]:
    """One widget per :class:`PageForm` field (inside the current Blocks), opening with the form's values at the size
    the model policy implies (the tiny models'), plus the form's buttons."""
    from .presets import available_presets

    width, height = config.resolver.defaults().get("size", (PageForm.width, PageForm.height))
    v = {**asdict(PageForm()), "width": width, "height": height}
    w: dict[str, Any] = {}
    w["prompt"] = gr.Textbox(v["prompt"], label="Prompt", lines=2, elem_id="prompt")
    w["negative"] = gr.Textbox(v["negative"], label="Negative prompt", elem_id="negative")
    with gr.Row():  # above the fold: the first thing after the prompt
        w["generate"] = gr.Button("Generate", variant="primary", elem_id="generate")
        w["stop"] = gr.Button("Stop", elem_id="stop")
        w["see"] = gr.Button("Show what the conditions see", elem_id="see")
    with gr.Row():
        presets = [NO_PRESET, *available_presets()]
        w["preset"] = gr.Dropdown(presets, value=v["preset"], label="Preset", elem_id="preset")
        w["width"] = gr.Number(value=v["width"], step=8, label="Width", elem_id="width")
        w["height"] = gr.Number(value=v["height"], step=8, label="Height", elem_id="height")
    with gr.Row():
        w["steps"] = gr.Slider(1, 100, value=v["steps"], step=1, label="Steps", elem_id="steps")
        w["guidance"] = gr.Slider(0, 15, value=v["guidance"], step=0.1, label="Guidance", elem_id="guidance")
        w["refiner_switch"] = gr.Slider(0, 0.95, value=v["refiner_switch"], step=0.05, label="Refiner switch (0: off)")
        w["scheduler"] = gr.Dropdown([PRESET_SAMPLER, *SCHEDULERS], value=v["scheduler"], label="Sampler",
                                     elem_id="scheduler")  # fmt: skip
    with gr.Row():
        w["seed"] = gr.Number(value=v["seed"] or 0, precision=0, label="Seed", elem_id="seed")
        w["random_seed"] = gr.Checkbox(value=v["random_seed"], label="Random seed", elem_id="random-seed")
        w["reuse"] = gr.Button("Reuse last seed", elem_id="reuse")
        w["num_images"] = gr.Slider(1, 8, value=v["num_images"], step=1, label="Images", elem_id="num-images")
    with gr.Accordion("Face (identity)", open=True):
        w["faces"] = gr.File(file_count="multiple", label="Face photo(s) of one person", elem_id="faces")
        w["faces_found"] = gr.Gallery(label="The faces found (green: the one used)", elem_id="faces-found",
                                      height=180, columns=4)  # fmt: skip
        with gr.Row():
            w["identity"] = gr.Dropdown(identity_kinds(), value=v["identity"], label="Method")
            w["identity_scale"] = gr.Slider(0, 1.5, value=v["identity_scale"], step=0.05, label="Strength")
    with gr.Accordion("Style", open=True):
        w["style"] = gr.Image(type="filepath", label="Style image", elem_id="style", height=260)
        with gr.Row():
            w["style_scale"] = gr.Slider(0, 1.5, value=v["style_scale"], step=0.05, label="Strength")
            w["style_layers"] = gr.Dropdown(["style", "composition", "style+composition", "all"],
                                            value=v["style_layers"], label="Layers")  # fmt: skip
    with gr.Accordion("Structure", open=False):
        w["structure"] = gr.Image(type="filepath", label="Photo or ready map", elem_id="structure", height=260)
        with gr.Row():
            w["structure_kind"] = gr.Radio(list(STRUCTURE_CONTROLS), value=v["structure_kind"], label="From")
            w["structure_is_map"] = gr.Checkbox(value=v["structure_is_map"], label="It is a ready map")
        with gr.Row():
            w["structure_scale"] = gr.Slider(0, 1.5, value=v["structure_scale"], step=0.05, label="Strength")
            w["structure_start"] = gr.Slider(0, 1, value=v["structure_start"], step=0.05, label="Window start")
            w["structure_end"] = gr.Slider(0, 1, value=v["structure_end"], step=0.05, label="Window end")
    with gr.Accordion("LoRAs", open=False):
        w["loras"] = gr.File(file_count="multiple", file_types=[".safetensors"], label="LoRA files")
        w["lora_weights"] = gr.Textbox(value=v["lora_weights"], label="Weights (one per file, e.g. 0.8, 0.5)")
    with gr.Accordion("Start from an image", open=False):
        w["init_image"] = gr.ImageEditor(type="filepath", label="Image (paint where to repaint; nothing painted: the "
                                         "whole image)", elem_id="init-image", height=320)  # fmt: skip
        w["strength"] = gr.Slider(0, 1, value=v["strength"], step=0.05, label="Strength (0: keep the image, for the "
                                  "hires fix or face detailer)", elem_id="strength")  # fmt: skip
    with gr.Accordion("Hires fix", open=False):
        with gr.Row():
            w["hires_scale"] = gr.Slider(1, 4, value=v["hires_scale"], step=0.25, label="Upscale by (1: off)",
                                         elem_id="hires-scale")  # fmt: skip
            w["hires_strength"] = gr.Slider(0.05, 1, value=v["hires_strength"], step=0.05, label="Redraw strength")
    with gr.Accordion("Face detailer", open=False):
        with gr.Row():
            w["detail_faces"] = gr.Checkbox(value=v["detail_faces"], label="Repaint every face (each with the "
                                            "identity it resembles)", elem_id="detail-faces")  # fmt: skip
            w["detail_strength"] = gr.Slider(0.05, 1, value=v["detail_strength"], step=0.05, label="Strength")
    with gr.Accordion("Speed and memory", open=False):
        with gr.Row():
            w["offload"] = gr.Checkbox(value=v["offload"], label="Offload (models in CPU memory, each on the GPU "
                                       "only while it runs: small GPUs)", elem_id="offload")  # fmt: skip
            w["fast"] = gr.Dropdown(list(FAST_LEVELS), value=v["fast"], label="Fast path", elem_id="fast")
            w["weight_storage"] = gr.Dropdown([PRESET_STORAGE, *PAGE_STORAGES], value=v["weight_storage"],
                                              label="Weight storage (fp8: about half the UNet's memory)",
                                              elem_id="weight-storage")  # fmt: skip
    with gr.Accordion("Regions (a prompt per region)", open=False):
        w["regions"] = gr.Textbox(v["regions"], label="Regions by box, one a line: X0,Y0,X1,Y1:PROMPT (fractions of "
                                  "the width and height, e.g. 0,0,0.5,1:a woman with red hair)", lines=2,
                                  elem_id="regions")  # fmt: skip
        # A white canvas of the image's size to paint on (a picture uploaded instead helps to place the regions):
        # only the layers' strokes are read.
        blank = np.full((int(height), int(width), 3), 255, np.uint8)
        w["region_paint"] = gr.ImageEditor(blank, type="filepath", label="Or paint them: one layer per region (a "
                                           "picture uploaded under them only helps to place them)",
                                           elem_id="region-paint", height=320)  # fmt: skip
        w["region_prompts"] = gr.Textbox(v["region_prompts"], label="The painted layers' prompts, one a line in "
                                         "layer order", lines=2, elem_id="region-prompts")  # fmt: skip
        with gr.Row():
            w["region_mode"] = gr.Radio(list(_REGION_MODES), value=v["region_mode"], label="How regions act")
            w["region_scale"] = gr.Slider(0, 1.5, value=v["region_scale"], step=0.05, label="Regions' strength")
    with gr.Accordion("Guidance (PAG, APG, FreeU)", open=False):
        with gr.Row():
            w["pag_scale"] = gr.Slider(0, 10, value=v["pag_scale"], step=0.1, label="Perturbed-attention guidance "
                                       "(0: off; diffusers' 3)", elem_id="pag-scale")  # fmt: skip
            w["apg"] = gr.Checkbox(value=v["apg"], label="Adaptive projected guidance", elem_id="apg")
            w["apg_eta"] = gr.Slider(0, 1, value=v["apg_eta"], step=0.05, label="APG eta (0: no oversaturation)")
            w["freeu"] = gr.Checkbox(value=v["freeu"], label="FreeU (SDXL factors)", elem_id="freeu")
    with gr.Accordion("More inputs", open=False):
        w["more_inputs"] = gr.Textbox(v["more_inputs"], label="Any input slot of the condition families, as a job "
                                      f"line's inputs and set: {MORE_INPUTS_EXAMPLE}", lines=2,
                                      elem_id="more-inputs")  # fmt: skip
    return w


def build_app(config: UiConfig) -> Any:
    """The Gradio Blocks app; ``launch()`` it (``sdxl-control ui`` does)."""
    page = _Page(config)
    with gr.Blocks(title="sdxl-control") as app:
        gr.Markdown("# sdxl-control\nPrompt, conditions, and the image as it forms.")
        with gr.Row():
            with gr.Column(scale=3):
                w = _form_widgets(config)
                run, stop, see = w["generate"], w["stop"], w["see"]
                restore_png = gr.File(label="Drop a PNG made by sdxl-control, A1111 or ComfyUI to restore its settings",
                                      file_types=[".png"], elem_id="restore")  # fmt: skip
            with gr.Column(scale=2):
                status = gr.Markdown("ready", elem_id="status")
                preview = gr.Image(label="Preview (as the image forms)", interactive=False, elem_id="preview",
                                   height=320)  # fmt: skip
                gallery = gr.Gallery(label="Images", elem_id="gallery", format="png")
                downloads = gr.File(label="PNGs with their recipes", file_count="multiple", elem_id="downloads")
                maps = gr.Gallery(label="What the conditions see", elem_id="maps")
        form = [w[f.name] for f in fields(PageForm)]
        last_seed, running = gr.State(None), gr.State(None)
        outputs = [preview, status, gallery, downloads, last_seed, running]
        # The page's button says an error in the page and keeps the last results; the API's endpoint (a hidden
        # button) raises it to the client. Only these two and "conditions" are API endpoints.
        run.click(page.generate, [*form, running], outputs, api_name="page_generate", api_visibility="private")
        hidden = gr.Button(visible=False)
        hidden.click(_with_signature(page.generate_api, PageForm, "running"), [*form, running], outputs,
                     api_name="generate")  # fmt: skip
        private: dict[str, Any] = {"api_visibility": "private"}
        stop.click(page.stop_clicked, running, status, queue=False, **private)
        w["reuse"].click(lambda s: (s if s is not None else 0, False), last_seed, [w["seed"], w["random_seed"]],
                         queue=False, **private)  # fmt: skip
        numbers = [w[n] for n in ("steps", "guidance", "width", "height", "refiner_switch", "negative", "strength")]
        w["preset"].change(page.apply_preset, w["preset"], [*numbers, status], queue=False, **private)
        w["faces"].upload(page.faces_uploaded, [w["faces"], w["identity"]], [w["faces"], w["faces_found"]], **private)
        w["faces"].clear(lambda: [], None, w["faces_found"], queue=False, **private)
        see.click(page.show_maps, [w["faces"], w["structure"], w["structure_kind"], w["structure_is_map"]], maps,
                  api_name="conditions")  # fmt: skip
        restored = ("prompt", "negative", "width", "height", "steps", "guidance", "seed", "random_seed",
                    "refiner_switch", "scheduler")  # fmt: skip
        restore_png.upload(page.restore, restore_png, [*[w[n] for n in restored], status], **private)
        app.load(page.opening_status, None, status, **private)
    app.queue(default_concurrency_limit=1)
    return app
