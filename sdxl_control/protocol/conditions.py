"""The condition protocol: what a condition is, and how the denoising loop drives it.

A :class:`Condition` is a small frozen value (its inputs, ``scale``, step :class:`Window`, :class:`Stage`).
Running it goes through three runtime objects that live apart from that value:

* ``Condition.prepare(ctx)`` encodes the inputs once per call and returns a :class:`Prepared`;
* ``Prepared.attach(unet, stage)`` changes one UNet and returns an :class:`Attachment`;
* the loop calls ``Attachment.contribute(step, active)`` at every step and ``Attachment.detach()`` at the end,
  also when anything raised.

Conditions compose through four typed channels: :class:`Residuals` returned by ``contribute`` are summed and fed to
the UNet (ControlNet-like conditions); attention processors installed at attach time (IP-Adapter-like conditions) are
switched on and off by the ``active`` flag; a :class:`PromptEdit` from ``Prepared.prompt_edit`` changes what a
stage's text encoders read, and at which steps (PhotoMaker); weight deltas from ``Prepared.weight_deltas`` are
added to the stage's models while the condition acts (LoRAs, FaceID's and PhotoMaker's LoRAs); and a
:class:`~sdxl_control.protocol.guidance.GuidanceTerm` from ``Prepared.guidance_term`` changes how the step's
predictions are combined (PAG, APG). Every channel follows one rule, :func:`acts`: a condition with scale 0, or with a
window that holds no step, is the same as absent. Per-row inputs are prepared for the batch ``[negative, prompt]``;
the loop's batch may hold more rows, and :class:`~sdxl_control.protocol.rows.Rows` says which prepared row each reads. A model
a condition brings may attend to its own :class:`Tokens` instead of the prompt (IdentityNet's face tokens); a condition
made of parts with their own scales and windows attaches as :class:`Parts`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from ..base.errors import ConditionError, InputError
from ..base.files import PathMode, looks_local, portable
from ..base.stages import Stage, Window
from ..base.validation import check_fields
from ..weights.patches import WeightDelta
from .fast import FastPath
from .rows import Rows

if TYPE_CHECKING:
    from ..records.infotext import Infotext
    from ..weights.inventory import ModelNeed
    from .guidance import GuidanceTerm

__all__ = [
    "Stage",
    "Window",
    "Residuals",
    "Tokens",
    "PromptTokens",
    "PromptEdit",
    "StepInfo",
    "PrepareContext",
    "Crop",
    "Likeness",
    "Condition",
    "Prepared",
    "Attachment",
    "Parts",
    "acts",
    "recorded_before",
    "validate_conditions",
    "describe",
]


def acts(scale: float, window: Window, index: int, total: int) -> bool:
    """Whether something with this scale and window acts at step ``index`` of ``total``: the one rule for every
    condition and every part of one (scale 0 is the same as absent).

    Example:
        >>> acts(0.8, Window(0.0, 0.5), index=1, total=4), acts(0.0, Window(), index=1, total=4)
        (True, False)
    """
    return scale != 0 and window.contains(index, total)


@dataclass(frozen=True)
class Residuals:
    """Additive UNet residuals (one per down-block output, plus the mid block), the ControlNet channel.

    Example:
        >>> r = Residuals(down=(torch.ones(1),), mid=torch.ones(1))
        >>> (r + r).mid.item()
        2.0
    """

    down: tuple[torch.Tensor, ...]
    mid: torch.Tensor

    def __add__(self, other: Residuals) -> Residuals:
        if len(self.down) != len(other.down):
            raise ConditionError(f"cannot add residuals of {len(self.down)} and {len(other.down)} down blocks")
        return Residuals(tuple(a + b for a, b in zip(self.down, other.down, strict=True)), self.mid + other.mid)


@dataclass(frozen=True)
class Tokens:
    """Tokens a condition's model attends to instead of the prompt (IdentityNet's face tokens, say), with the
    unconditional ones classifier-free guidance pairs them with.

    ``positive`` and ``negative`` are (tokens, width) or (1, tokens, width); :meth:`batched` lays them out as the step's
    ``encoder_hidden_states`` are: ``[negative] * batch + [positive] * batch`` when guided.

    Example:
        >>> Tokens(torch.ones(16, 2048), torch.zeros(16, 2048)).batched(2, guided=True).shape
        torch.Size([4, 16, 2048])
    """

    positive: torch.Tensor
    negative: torch.Tensor | None = None

    def batched(self, batch_size: int, guided: bool) -> torch.Tensor:
        width = self.positive.shape[-1]
        positive = self.positive.reshape(1, -1, width).repeat(batch_size, 1, 1)
        if not guided:
            return positive
        if self.negative is None:
            raise ConditionError("classifier-free guidance needs unconditional tokens: give Tokens a negative")
        negative = self.negative.reshape(1, -1, width)
        if negative.shape[1:] != positive.shape[1:]:
            raise ConditionError(
                f"unconditional tokens {tuple(negative.shape[1:])} do not match the conditional {tuple(positive.shape[1:])}"
            )
        return torch.cat([negative.repeat(batch_size, 1, 1), positive])


@dataclass(frozen=True)
class PromptTokens:
    """The token ids one text encoder reads for a prompt (``model_max_length`` of them) and the positions a condition
    marked among them (PhotoMaker: the copies of the class word its identity is fused into).

    Example:
        >>> PromptTokens((49406, 320, 1611, 49407), (False, False, True, False)).marked[2]
        True
    """

    ids: tuple[int, ...]
    marked: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.marked):
            raise ConditionError(f"{len(self.ids)} token ids but {len(self.marked)} marks")


class PromptEdit:
    """The prompt channel: how a condition changes what a stage's text encoders read, and at which steps.

    * :meth:`text` gives the prompt text encoded at every step, where the condition acts at any step of the call
      (PhotoMaker takes its trigger word out);
    * at the steps inside ``window`` where the condition also acts (its scale is not 0 and its own window holds the
      step), :meth:`tokens` may give each encoder its own token ids (only one condition per step may), and
      :meth:`embed` may change the encoded hidden states (PhotoMaker fuses the identity into the marked class-word
      positions). ``window`` is in fractions of the whole schedule, as every :class:`Window`.

    The negative prompt is not edited. The pooled embedding follows the token ids.

    Example:
        >>> class Stronger(PromptEdit):                                  # doctest: +SKIP
        ...     def embed(self, hidden, tokens): return hidden * 1.1
        >>> Stronger(Window(0.25, 1.0)).window.start
        0.25
    """

    def __init__(self, window: Window = Window()) -> None:
        if not isinstance(window, Window):
            raise ConditionError(f"a prompt edit acts in a Window, got {window!r:.80}")
        self.window = window

    # Whether :meth:`tokens` gives token ids of its own (only one such edit may act at a step).
    rewrites_tokens: ClassVar[bool] = False

    def text(self, prompt: str, tokenizer: Any) -> str:
        """The prompt text encoded at every step (before edits act, and where they do not rewrite tokens)."""
        return prompt

    def tokens(self, prompt: str, tokenizer: Any, encoder: int, *, whole: bool = False) -> PromptTokens:
        """Token ids for text encoder ``encoder`` (0, 1, ...) from the prompt as written: one window
        (``tokenizer.model_max_length`` ids), or, with ``whole`` (the request reads long prompts in chunks), as many
        windows as the prompt needs, joined; only for edits that set ``rewrites_tokens``."""
        raise NotImplementedError

    def embed(self, hidden: torch.Tensor, tokens: Sequence[PromptTokens]) -> torch.Tensor:
        """The encoders' hidden states (1, tokens, total width), edited; ``tokens`` are what each encoder read."""
        return hidden


@dataclass(frozen=True)
class StepInfo:
    """What a condition sees of one denoising step.

    ``sample``, ``encoder_hidden_states`` and ``added_cond_kwargs`` are exactly what the UNet receives: batched as
    ``[unconditional, conditional]`` when classifier-free guidance is on (``guided`` is then True), with one
    conditional block per part of a prompt of several parts. ``rows`` maps each row to the prepared row it reads
    (``None``: the prepared layout itself); residuals are returned for these rows.

    Example:
        >>> def contribute(self, step: StepInfo, active: bool):       # doctest: +SKIP
        ...     image = step.gather(self.control_image)  # prepared [negative, prompt] rows, laid out as the step's
    """

    index: int
    total: int
    timestep: torch.Tensor
    stage: Stage
    sample: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: Mapping[str, torch.Tensor]
    guided: bool
    rows: Rows | None = None

    def gather(self, prepared: torch.Tensor) -> torch.Tensor:
        """A tensor of prepared rows (first dimension) laid out as this step's rows."""
        return prepared if self.rows is None else self.rows.gather(prepared)

    @property
    def prompt_rows(self) -> torch.Tensor:
        """Which of the step's rows are the prompt's (not the negative prompt's), as a boolean vector."""
        rows = self.rows or Rows.identity(self.sample.shape[0])
        batch = rows.prepared // 2 if self.guided else 0
        return torch.tensor([s >= batch for s in rows.source], device=self.sample.device)


@dataclass(frozen=True)
class PrepareContext:
    """What a condition needs to encode its inputs once per call.

    ``stages`` maps each stage the call runs to that stage's UNet (read-only use: encoders may need its dtype or
    config). ``size`` is the output size as (width, height). ``fast`` is the generator's fast path, if any. ``steps``
    is the number of steps of the whole schedule (base and refiner). ``start_image`` and ``start_mask`` (white:
    repaint) are what a call that starts from an image repaints, at ``size`` (the outpainted canvas, the mask crop).
    :meth:`encode_prompt` encodes a text as the call reads its prompt (long prompts, emphasis, embeddings, clip skip).

    Example:
        >>> def prepare(self, ctx: PrepareContext):                     # doctest: +SKIP
        ...     unet = ctx.unet(Stage.BASE); width, height = ctx.size
    """

    device: torch.device
    dtype: torch.dtype
    batch_size: int
    guided: bool
    size: tuple[int, int]
    stages: Mapping[Stage, Any] = field(default_factory=dict)
    fast: FastPath | None = None
    steps: int = 0
    start_image: Image.Image | None = None
    start_mask: Image.Image | None = None
    # (text, stage) -> (hidden states (1, tokens, width), pooled (1, width)) with the stage's text encoders
    encoder: Callable[[str, Stage], tuple[torch.Tensor, torch.Tensor]] | None = None

    def encode_prompt(self, text: str, stage: Stage = Stage.BASE) -> tuple[torch.Tensor, torch.Tensor]:
        """``text`` as the call reads its prompt, by ``stage``'s text encoders: hidden states (1, tokens, width) and the
        pooled embedding (1, width), on the call's device and in its dtype (regional prompts)."""
        if self.encoder is None:
            raise ConditionError("this call encodes no prompt for its conditions")
        if stage not in self.stages:
            raise ConditionError(f"this call runs no {stage.label} stage")
        return self.encoder(text, stage)

    def unet(self, stage: Stage) -> Any:
        """The UNet of ``stage``; every call runs the base, so only a context built by hand may lack it."""
        if stage not in self.stages:
            raise ConditionError(f"this call runs no {stage.label} stage")
        return self.stages[stage]


class Attachment(ABC):
    """A condition attached to one UNet: contributes per step, and undoes itself exactly on ``detach``.

    Example:
        >>> class Hooked(Attachment):                                    # doctest: +SKIP
        ...     def __init__(self, unet): self.handle = unet.conv_in.register_forward_hook(fn)
        ...     def detach(self): self.handle.remove()
    """

    def contribute(self, step: StepInfo, active: bool) -> Residuals | None:
        """Called at every step of the stage; ``active`` is whether the step lies in the condition's window."""
        return None

    @abstractmethod
    def detach(self) -> None:
        """Restore the UNet to exactly what it was before ``attach`` (same objects, same weights, no hooks)."""


class Parts(Attachment):
    """One condition's attachment made of parts, each switched on by its own scale and step window (InstantID: the
    face-token branch and IdentityNet); residuals of the parts are summed, detaching undoes them in reverse order.

    The loop's ``active`` flag is for the condition's own ``scale`` and ``window``; a part that uses them says so.

    Example:
        >>> Parts([(branches, cond.scale, cond.window), (controlnet, cond.controlnet_scale, cond.controlnet_window)])  # doctest: +SKIP
    """

    def __init__(self, parts: list[tuple[Attachment, float, Window]]) -> None:
        self.parts = parts

    def contribute(self, step: StepInfo, active: bool) -> Residuals | None:
        total: Residuals | None = None
        for attachment, scale, window in self.parts:
            extra = attachment.contribute(step, acts(scale, window, step.index, step.total))
            if extra is not None:
                total = extra if total is None else total + extra
        return total

    def detach(self) -> None:
        errors: list[BaseException] = []
        for attachment, _, _ in reversed(self.parts):
            try:
                attachment.detach()
            except BaseException as exc:  # detach the others; report after
                errors.append(exc)
        if errors:
            raise errors[0]


class _Unchanged(Attachment):
    def detach(self) -> None:
        return None


class Prepared:
    """A condition's inputs, encoded once per call, ready to attach to the UNet of a stage.

    A condition that works only through the prompt or weight channels need not attach anything: the default
    :meth:`attach` changes nothing.

    Example:
        >>> class Ready(Prepared):                                       # doctest: +SKIP
        ...     def attach(self, unet, stage): return Hooked(unet)
    """

    def attach(self, unet: Any, stage: Stage) -> Attachment:
        return _Unchanged()

    def prompt_edit(self, stage: Stage) -> PromptEdit | None:
        """How the condition changes the prompt of ``stage`` (the prompt channel). Asked for every stage the call runs,
        also those it does not attach to: a base-only condition may still take its syntax out of the refiner's prompt."""
        return None

    def weight_deltas(self, stage: Stage) -> Mapping[str, Mapping[str, WeightDelta]]:
        """The weight channel: deltas for the stage's models, by component (``unet``, ``text_encoder``,
        ``text_encoder_2``), each a map of parameter name to a tensor of that parameter's shape or a
        :class:`~sdxl_control.weights.patches.LowRankDelta` (a LoRA's factors), already weighed.

        They are added exactly at the steps where the condition acts (see :func:`acts`) and removed bit for bit
        after: the UNet's for its denoising steps, the text encoders' while the prompt of those steps is encoded.
        Parameter names are the loaded models' own (see :mod:`sdxl_control.weights.conversion` for published layouts).
        """
        return {}

    def guidance_term(self, stage: Stage) -> GuidanceTerm | None:
        """The guidance channel: how the condition changes the combination of the step's predictions in ``stage``
        (a new term per stage of a call; it may keep state between steps). ``None``: it does not."""
        return None


# Field types a condition converts from plain values in __post_init__, and how to name what is expected.
_CONVERTED: dict[type, tuple[tuple[type, ...], str]] = {
    Window: ((tuple, list), "(start, end) fractions of the schedule"),
    Stage: ((str,), "'base', 'refiner' or 'both'"),
}


@dataclass(frozen=True)
class Crop:
    """A region of a finished image that is repainted on its own (the face detailer): ``box`` (x0, y0, x1, y1) in the
    pixels of the image, whose size is ``image_size``, repainted at ``size``; ``face`` is the face found there
    (a :class:`~sdxl_control.preprocessors.face.FaceInfo` in the repaint's pixels), if any.

    Example:
        >>> crop = Crop((256, 128, 768, 640), (1024, 1024), (1024, 1024))
        >>> crop.image(Image.new("L", (512, 512), 255)).size
        (1024, 1024)
    """

    box: tuple[int, int, int, int]
    image_size: tuple[int, int]
    size: tuple[int, int]
    face: Any = None

    def image(self, value: Any, *, mask: bool = False) -> Image.Image:
        """An image aligned with the whole picture (a control image, a region mask; any size, fitted to the picture
        as the loop fits it) cut to the box and brought to the repaint's size; ``mask``: kept two-tone."""
        from ..base.images import load_image

        picture = load_image(value, "an image of the request").convert("L" if mask else "RGB")
        resample = Image.Resampling.NEAREST if mask else Image.Resampling.LANCZOS
        (width, height), (out_width, out_height) = self.image_size, self.size  # tuples, whether given as lists or not
        if picture.size != (width, height):
            picture = picture.resize((width, height), resample)
        return picture.crop(self.box).resize((out_width, out_height), resample)


@dataclass(frozen=True)
class Likeness:
    """The person a condition draws, as the face detailer matches faces to it: ``faces`` (photos or
    :class:`~sdxl_control.preprocessors.face.FaceInfo`), or a saved ``identity`` file, and the ``mask`` of the region
    the person was placed in, if any.

    Example:
        >>> Likeness(faces=["me.jpg"]).mask is None
        True
    """

    faces: Any = None
    identity: str | None = None
    mask: Any = None


@dataclass(frozen=True, kw_only=True)
class Condition(ABC):
    """Base of every condition: a frozen value with ``scale``, ``window`` and ``stage``.

    Subclasses are frozen dataclasses that add their inputs and implement :meth:`prepare`. ``supported_stages``
    says where the condition can work at all; asking for another stage is refused before anything runs.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Nothing(Condition):
        ...     kind = "nothing"
        ...     def prepare(self, ctx): raise NotImplementedError
        >>> Nothing(scale=0.5, window=(0.0, 0.8)).window
        Window(start=0.0, end=0.8)
    """

    scale: float = 1.0
    window: Window = Window()
    stage: Stage = Stage.BASE

    kind: ClassVar[str] = "condition"
    supported_stages: ClassVar[Stage] = Stage.BASE
    # Why a stage is not supported, for the error message.
    unsupported_reason: ClassVar[str] = ""
    # Fields that may name local files or folders (inputs or models): recipes record those by name and content, not
    # by path, and find them again on a re-run.
    path_fields: ClassVar[tuple[str, ...]] = ()
    # Fields that may name a model by its name in a ComfyUI or A1111 install (field -> the kind of model, a folder kind
    # of :mod:`sdxl_control.weights.model_folders`): the resolver puts the file found there in its place.
    model_fields: ClassVar[Mapping[str, str]] = {}
    # Fields holding images aligned with the picture being made (control images, region masks): a crop of the picture
    # repainted on its own takes the same crop of them (:meth:`in_crop`). Fields named ``mask`` are masks.
    aligned_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        # Every field against its type hint (a string scale, a NaN window, a bool count...) before anything loads.
        check_fields(self, type(self).__name__, error=ConditionError, adapters=_CONVERTED)
        object.__setattr__(self, "window", Window.of(self.window))
        object.__setattr__(self, "stage", Stage.parse(self.stage))

    @abstractmethod
    def prepare(self, ctx: PrepareContext) -> Prepared: ...

    @classmethod
    def upgrade_settings(cls, settings: Mapping[str, Any], version: str | None) -> dict[str, Any]:
        """Settings (``kind`` taken out) that a recipe of sdxl-control ``version`` recorded, in this version's fields,
        so that old recipes re-make the same pixels (``None``: written for this version); a family whose field changed
        meaning says here how an old value maps (see :func:`recorded_before`)."""
        return dict(settings)

    def settings(self, paths: PathMode = "names") -> dict[str, Any]:
        """JSON-ready description for the recipe; inputs that are not plain data are summarised. Local files and
        folders in :attr:`path_fields` are recorded by name and content (``paths="full"``: with their path too)."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = describe(value)
            # A default such as "~/.insightface" means the same folder on every machine: kept as written.
            if f.name in self.path_fields and not (isinstance(value, str) and value == f.default):
                out[f.name] = portable(out[f.name], paths)
        return out

    def infotext(self) -> Infotext:
        """How the condition appears in the A1111 ``parameters`` text of its images (a ControlNet-extension unit, a
        LoRA tag...); called after a generation, when the condition's files are known to be there."""
        from ..records.infotext import Infotext

        return Infotext()

    def in_crop(self, crop: Crop) -> Condition | None:
        """This condition for a repaint of ``crop`` alone (the face detailer): each given :attr:`aligned_fields` image
        cut to the crop; ``None`` where its region mask leaves the crop out, so it would not act there."""
        changes: dict[str, Any] = {}
        for name in self.aligned_fields:
            value = getattr(self, name)
            if value is None:
                continue
            image = crop.image(value, mask=name == "mask")
            if name == "mask" and max(image.getdata()) < 128:  # type: ignore[arg-type]
                return None
            changes[name] = image
        return replace(self, **changes) if changes else self

    def likeness(self) -> Likeness | None:
        """The person this condition draws, for the face detailer to match faces to; ``None``: it draws no one."""
        return None

    def model_needs(self) -> tuple[ModelNeed, ...]:
        """The weights :meth:`prepare` will look for, found the way it finds them: what ``sdxl-control models`` lists
        and fetches. Made without reading any file."""
        return ()

    def resident_key(self) -> Hashable | None:
        """For a condition that acts through the weight channel alone (no attachment, no prompt edit) and whose
        :meth:`prepare` depends only on this key and the stage models: the key. A
        :class:`~sdxl_control.jobs.runner.Runner` keeps such deltas applied from one job to the next that brings the
        same key (see :mod:`sdxl_control.engine.residency`). ``None`` (the default): prepared and applied per call."""
        return None


def recorded_before(version: str | None, release: str) -> bool:
    """Whether a recipe's ``version`` is older than ``release`` (``None``, a job written by hand: it is not).

    Example:
        >>> recorded_before("0.1.0", "0.2.0"), recorded_before(None, "0.2.0")
        (True, False)
    """
    if version is None:
        return False

    def numbers(text: str) -> tuple[int, ...]:
        return tuple(int(part) if part.isdigit() else 0 for part in text.split(".")[:3])

    return numbers(version) < numbers(release)


def describe(value: Any) -> Any:
    """``value`` as a recipe records it: plain data as it is, an in-memory image or tensor summarised by its size."""
    if isinstance(value, Window):
        return [value.start, value.end]
    if isinstance(value, Stage):
        return value.label
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype)}
    size = getattr(value, "size", None)
    if hasattr(value, "mode") and isinstance(size, tuple):
        return {"image": list(size), "mode": value.mode}
    return type(value).__name__


def _same(a: Condition, b: Condition) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except (ValueError, TypeError, RuntimeError):  # arrays and tensors have no single truth value
        return False


def check_input_files(condition: Condition) -> None:
    """Refuse a condition whose file inputs are not there, before anything loads: every local-looking string in its
    :attr:`~Condition.path_fields` must exist (hub ids and bare names are the loaders' to resolve)."""
    defaults = {f.name: f.default for f in fields(condition)}
    for name in condition.path_fields:
        value = getattr(condition, name)
        if isinstance(value, str) and value == defaults.get(name):
            continue  # "~/.insightface" need not exist when the pack is a folder given elsewhere
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, os.PathLike)) and looks_local(os.fspath(item)):
                path = Path(os.fspath(item)).expanduser()
                if not path.exists():
                    raise InputError(f"{type(condition).__name__} {name}: no such file or folder {path}")


def validate_conditions(conditions: tuple[Condition, ...], has_refiner: bool, has_base: bool = True) -> None:
    """Refuse conditions that are not conditions, given twice, missing their files, or asking for a stage they
    cannot work on or that the call does not run (``has_base`` is false for the refiner alone)."""
    for i, condition in enumerate(conditions):
        if not isinstance(condition, Condition):
            raise ConditionError(f"{condition!r:.80} is not a Condition")
        if any(_same(condition, other) for other in conditions[:i]):
            raise ConditionError(
                f"the same {type(condition).__name__} condition is given twice, which would apply it twice; "
                "give it once (raise its scale for more of it)"
            )
        check_input_files(condition)
        unsupported = condition.stage & ~condition.supported_stages
        if unsupported:
            reason = f": {condition.unsupported_reason}" if condition.unsupported_reason else ""
            raise ConditionError(f"{type(condition).__name__} cannot apply to the {unsupported.label} stage{reason}")
        if condition.stage == Stage.BASE and not has_base:
            raise ConditionError(
                f"{type(condition).__name__} is set for the base stage, but this call runs the refiner alone "
                "(give it stage='refiner' or 'both' where it supports the refiner)"
            )
        if condition.stage == Stage.REFINER and not has_refiner:
            raise ConditionError(
                f"{type(condition).__name__} is set for the refiner stage, but this call runs no refiner "
                "(load a refiner and pass refiner_switch)"
            )
