"""``sdxl-control generate``: the flags translated into one :class:`~sdxl_control.jobs.spec.JobSpec`, resolved and run
as one job. The condition flags fill the families' input slots (``JobSpec.inputs`` and ``set``), which
:func:`~sdxl_control.jobs.spec.resolve` builds; the identity flags, and a slot's ``--NAME FILE`` with its flags, come
from the condition families' declarations (:data:`sdxl_control.adapters.CONDITION_KINDS`): a family added there gets its
flags here without code."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import CONDITION_KINDS, Flag, identity_kinds, input_slots
from ..base.defaults import (
    DEFAULT_BASE,
    DEFAULT_IDENTITY,
    DEFAULT_REFINER,
    DEFAULT_UNION,
    DRAFT_DECODER,
    FAST_LEVELS,
    STRUCTURE_CONTROLS,
)
from ..base.errors import InvalidRequestError, MissingWeightsError, SdxlControlError
from ..base.samplers import SAMPLERS, SCHEDULES
from ..presets import available_presets
from . import options
from .options import DTYPES, Once, count, number, window

if TYPE_CHECKING:
    from ..jobs.resolvers import Resolver
    from ..jobs.spec import JobSpec, ResolvedJob

__all__ = ["add_parser", "run", "job_spec"]

log = logging.getLogger(__name__)

# Flags that fill a preset input of the same name instead of adding a condition of their own.
INPUT_FLAGS = ("face", "style", "pose", "structure", "init_image")
# The input slots this command has flags of its own for (below); every other slot gets --NAME FILE and its flags.
OWN_SLOTS = ("lora", *STRUCTURE_CONTROLS, "union", "style", "reference", "face")
_FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    "text": str, "number": number, "window": window, "image": str,
    "list": lambda text: [part.strip() for part in text.split(",") if part.strip()],
}  # fmt: skip


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    gen = sub.add_parser("generate", help="generate images from a prompt (or re-run a PNG's recipe)", parents=[common])
    gen.add_argument("prompt", nargs="?", help="the prompt (optional with --recipe)")
    gen.add_argument("-n", "--negative-prompt", help="negative prompt")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG; image i of a batch gets -i before .png")
    gen.add_argument("--seed", type=count, help="seed of the first image (random if not given)")
    gen.add_argument("--steps", type=count, help="denoising steps over both stages (default 30)")
    gen.add_argument("--guidance", type=number, help="classifier-free guidance scale; <= 1 turns it off (default 5)")
    gen.add_argument("--refiner-switch", type=number, help="fraction of the schedule the base runs before the refiner")
    gen.add_argument("--refiner-prompt", help="the refiner's own prompt (default: the prompt)")
    gen.add_argument(
        "--refiner-negative-prompt", help="the refiner's own negative prompt (default: the negative prompt)"
    )
    gen.add_argument(
        "--guidance-rescale",
        type=number,
        metavar="PHI",
        help="CFG rescale (0 to 1; diffusers' guidance_rescale, ComfyUI's RescaleCFG; 0.7 for v-prediction models)",
    )
    gen.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        help="override what the base model predicts (default: its config, or a single file's v_pred key)",
    )
    gen.add_argument(
        "--zero-terminal-snr",
        action=argparse.BooleanOptionalAction,
        help="override whether the base model's schedule reaches zero SNR (default: a single file's ztsnr key)",
    )
    gen.add_argument("--size", type=options.request_size, help="WIDTHxHEIGHT, multiples of 8 (default 1024x1024)")
    gen.add_argument("--num-images", type=count, help="images in the batch, seeds seed, seed+1, ...")
    gen.add_argument(
        "--scheduler",
        help=f"a sampler ({', '.join(SAMPLERS)}), optionally with a schedule after it ({', '.join(f'_{s}' for s in SCHEDULES)}: "
        "dpmpp_2m_sde_karras; not every pair exists, see the docs), A1111's and ComfyUI's names for them "
        '("DPM++ 2M Karras", euler_ancestral), or a diffusers scheduler class name',
    )
    gen.add_argument(
        "--preset",
        metavar="NAME|FILE",
        help=f"what works together, as data: {', '.join(available_presets())}, or a preset file "
        "(`sdxl-control presets` describes them); explicit options win",
    )
    gen.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a preset's setting: steps=8, size=[768,1024], face.scale=0.6 (a condition's field), "
        "models.base=REPO; repeatable",
    )
    gen.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="fill a preset's input (face, style, structure, pose); --face, --style, --pose and "
        "--structure do the same",
    )
    start = gen.add_argument_group("start from an image")
    start.add_argument("--init-image", metavar="IMG", help="start from this image instead of noise (img2img)")
    start.add_argument(
        "--strength",
        type=number,
        help="how much of the schedule runs from --init-image: 0..1 (default 0.75; "
        "1 with --mask); int(steps * strength) steps run",
    )
    start.add_argument("--mask", metavar="IMG", help="with --init-image: repaint only the white part (inpainting)")
    start.add_argument("--mask-blur", type=count, metavar="PX", help="feather the mask's edge by this radius in pixels")
    start.add_argument(
        "--mask-crop",
        type=count,
        metavar="PX",
        help="with --mask: repaint only the mask's area grown by PX, at --size, and paste it back (a small area of a "
        "large photo at full resolution)",
    )
    start.add_argument(
        "--paste-back",
        action="store_true",
        help="with --mask: paste --init-image back outside the (feathered) mask, so no pixel there changes (A1111's "
        "inpainting does)",
    )
    start.add_argument(
        "--outpaint",
        type=options.outpaint,
        metavar="SIDE=PX,...",
        help="with --init-image: extend the canvas, e.g. left=256,right=256 (multiples of 8; the output grows by them: "
        "with --size, the image is fitted to --size and the output is --size plus them)",
    )
    hires = gen.add_argument_group("hires fix")
    hires.add_argument("--hires", type=number, metavar="SCALE", help="enlarge each image by SCALE (1-4) and redraw it")
    hires.add_argument("--hires-strength", type=number, metavar="S", help="strength of the redraw (default 0.5)")
    hires.add_argument("--hires-steps", type=count, metavar="N", help="steps of the redraw (default: --steps)")
    hires.add_argument(
        "--upscaler",
        metavar="lanczos|latent|FILE",
        help="how to enlarge: lanczos (default), latent (A1111's: the latents interpolated; also latent-bicubic, "
        "latent-nearest-exact) or an upscaler model file (ESRGAN, Real-ESRGAN, SwinIR .pth or .safetensors, as in "
        "ComfyUI's models/upscale_models)",
    )
    start.add_argument(
        "--refiner-only", action="store_true", help="polish --init-image with the refiner alone (try --strength 0.3)"
    )
    detail = gen.add_argument_group("face detailer")
    detail.add_argument(
        "--detail-faces",
        action="store_true",
        help="repaint every face of the result at full resolution (ADetailer), each with the --face identity it "
        "resembles",
    )
    detail.add_argument(
        "--detail-strength", type=number, metavar="S", help="strength of the face repaint (default 0.4)"
    )
    detail.add_argument(
        "--detail-unmatched",
        choices=["neutral", "skip"],
        help="faces resembling no identity: repainted without one (neutral, default) or left alone (skip)",
    )
    gen.add_argument(
        "--structure",
        metavar="PHOTO",
        help="a preset's structure input: the photo whose composition to keep (style-transfer)",
    )
    gen.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved models and request (as the recipe records them) and load nothing",
    )
    gen.add_argument(
        "--preview-every",
        type=count,
        metavar="N",
        help="every N steps, write the image as it forms to OUTPUT-preview.png (decoded by TAESD-XL)",
    )
    gen.add_argument(
        "--preview-decoder",
        metavar="MODEL",
        default=DRAFT_DECODER,
        help=f"the previews' tiny autoencoder: a TAESD folder or hub id (default {DRAFT_DECODER}), or "
        "ComfyUI's vae_approx/taesdxl_decoder.safetensors",
    )
    gen.add_argument(
        "--grid",
        action="store_true",
        help="with --num-images: also write a contact sheet OUTPUT-grid.png with each image's seed",
    )
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="stack a LoRA (repeatable)")
    gen.add_argument("--base", help=f"base model: hub id, local folder or .safetensors (default {DEFAULT_BASE})")
    gen.add_argument("--refiner", help=f"refiner model, used with --refiner-switch (default {DEFAULT_REFINER})")
    gen.add_argument("--tiny", action="store_true", help="use built-in tiny random models (offline demo)")
    gen.add_argument(
        "--recipe",
        type=Path,
        help="re-run the recipe stored in a PNG written by sdxl-control, or restore the settings of a PNG written by "
        "A1111 or ComfyUI (the parts that do not map are listed)",
    )
    gen.add_argument(
        "--inputs-from",
        metavar="FOLDER",
        action="append",
        default=[],
        help="with --recipe: a folder holding the files the recipe names (control images, face photos, "
        "local models); they are also looked for beside the PNG and where this machine last saw them",
    )
    gen.add_argument(
        "--recipe-paths",
        choices=("names", "full"),
        default="names",
        help="how the images' recipes name local files: by name and content hash (default), or also by "
        "their full path (private to this machine)",
    )
    gen.add_argument("--device", help="cuda, cpu, mps ... (default: cuda if available)")
    gen.add_argument("--dtype", choices=DTYPES, help="default: fp16 on GPU, fp32 on CPU")
    gen.add_argument("--variant", help="weights variant to load, e.g. fp16")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    gen.add_argument("--vae-tiling", action="store_true", help="decode tile by tile (large images, small GPUs)")
    gen.add_argument(
        "--long-prompts",
        choices=("chunks", "truncate"),
        help="a prompt beyond 75 tokens: read in 75-token chunks (default, A1111's; BREAK ends a chunk) or cut to its "
        "first 75 (diffusers')",
    )
    gen.add_argument(
        "--emphasis",
        choices=("a1111", "comfyui", "off"),
        help="how (word:1.2), (word) and [word] in prompts weigh words: as A1111 does (default), as ComfyUI does, or "
        "off (brackets are text)",
    )
    gen.add_argument(
        "--clip-skip",
        type=int,
        metavar="N",
        help="read both text encoders' N-th layer from the end (1: the last; 2: the penultimate, SDXL's own): "
        "Forge's Clip skip, ComfyUI's CLIPSetLastLayer -N; recorded in the recipe",
    )
    gen.add_argument(
        "--pad-conds",
        action="store_true",
        help="pad the shorter of prompt and negative prompt with empty chunks and run both in one UNet batch (A1111's "
        "'Pad prompt/negative prompt'); by default, as A1111's default, prompts of different chunk counts run in "
        "separate UNet calls; recorded in the recipe",
    )
    gen.add_argument(
        "--weight-storage",
        choices=("fp8_e4m3fn", "fp8_e5m2", "fp8_matmul"),  # storage.WEIGHT_STORAGE, without importing torch
        help="keep the UNets' (and ControlNets') weights in fp8, each layer cast to the compute dtype as it runs "
        "(ComfyUI's --fp8_e4m3fn-unet): about half their memory, the weights rounded to fp8; fp8_matmul: torchao's "
        "float8 linear layers, matrix products in fp8 (GPUs of compute capability 8.9+, pip install torchao); "
        "recorded in the recipe",
    )
    gen.add_argument(
        "--step-cache",
        type=int,
        metavar="N",
        help="DeepCache: compute the whole UNet every N steps and reuse its deep features in between (3: 2.9x "
        "fewer UNet FLOPs; an approximation; default 1: every step whole)",
    )
    gen.add_argument(
        "--step-cache-branch",
        type=int,
        metavar="B",
        help="DeepCache's skip branch computed fresh on cached steps (0, the default: the cheapest; higher: closer to "
        "the uncached image)",
    )
    gen.add_argument(
        "--vae",
        metavar="MODEL",
        help="decode and encode with this VAE instead of the checkpoint's: a diffusers folder or hub id, or a "
        ".safetensors file (sdxl_vae.safetensors; found by name with --models-dir)",
    )
    gen.add_argument(
        "--decoder",
        metavar="MODEL",
        help=f"decode with this tiny autoencoder instead of the VAE (draft previews), e.g. {DRAFT_DECODER}",
    )
    gen.add_argument(
        "--offload",
        action="store_true",
        help="keep models in CPU memory, each on the device only while it runs (small GPUs)",
    )
    gen.add_argument(
        "--fast",
        choices=list(FAST_LEVELS),
        default="off",
        help="; ".join(f"{k}: {v}" for k, v in FAST_LEVELS.items()) + " (compiling is paid once per process)",
    )
    _add_condition_options(gen)


def _add_condition_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ControlNets (several may be combined)")
    for name, control in STRUCTURE_CONTROLS.items():
        group.add_argument(f"--{name}", action=Once, metavar="PHOTO",
                           help=f"guide by the {control.preprocessor} map of this photo")  # fmt: skip
        group.add_argument(f"--{name}-map", action=Once, metavar="MAP",
                           help=f"guide by this ready {name} map (no preprocessing)")  # fmt: skip
        group.add_argument(f"--{name}-model", action=Once, metavar="MODEL",
                           help=f"ControlNet for {name} (default {control.model})")  # fmt: skip
        group.add_argument(f"--{name}-scale", action=Once, type=number, metavar="S",
                           help="its strength (default 1)")  # fmt: skip
        group.add_argument(f"--{name}-window", action=Once, type=window, metavar="START:END",
                           help="fractions of the schedule where it acts (default 0:1)")  # fmt: skip
    group.add_argument(
        "--union",
        nargs="?",
        const=DEFAULT_UNION,
        metavar="MODEL",
        help=f"drive all controls through one ControlNet-Union model (default {DEFAULT_UNION}); "
        "it takes --union-scale and --union-window",
    )
    # Not given: the slot's defaults (its family's), as for every option below.
    group.add_argument("--union-scale", type=number, metavar="S")
    group.add_argument("--union-window", type=window, metavar="START:END")
    refs = parser.add_argument_group("reference images")
    refs.add_argument("--style", metavar="IMG", action="append", default=[], help="style reference (InstantStyle)")
    refs.add_argument("--style-scale", type=number, metavar="S")
    refs.add_argument("--reference", metavar="IMG", action="append", default=[], help="IP-Adapter reference image")
    refs.add_argument("--reference-variant", help="sdxl, vit-h, plus, plus-face (default plus)")
    refs.add_argument("--reference-scale", type=number, metavar="S")
    refs.add_argument("--reference-layers", help="all, style, composition, style+composition")
    face = parser.add_argument_group("identity (a family's flags are for that --identity only)")
    face.add_argument(
        "--face",
        metavar="IMG",
        action="append",
        default=[],
        help="photo of the person (repeatable: several photos of one person)",
    )
    face.add_argument(
        "--identity", choices=identity_kinds(), help=f"identity method for --face (default {DEFAULT_IDENTITY})"
    )
    face.add_argument(
        "--identity-scale",
        "--face-scale",
        dest="face_scale",
        type=number,
        metavar="S",
        help="strength of the identity (default: the method's own)",
    )
    face.add_argument("--face-window", type=window, metavar="START:END", help="where the identity acts (default 0:1)")
    face.add_argument(
        "--face-pack", help="insightface model pack name or folder (default: the method's own, buffalo_l or antelopev2)"
    )
    face.add_argument(
        "--score",
        action="store_true",
        help="store each image's identity similarity to the first --face photo in its recipe",
    )
    for family in CONDITION_KINDS.values():
        for flag in family.flags:
            _add_flag(face, flag)
    slots = [slot for _, slot in input_slots().values() if slot.name not in OWN_SLOTS]
    if slots:
        more = parser.add_argument_group("more inputs (the condition families' input slots)")
        for slot in slots:
            many = slot.many or slot.each
            if slot.files is not None:  # a slot of options only has its flags alone
                more.add_argument(f"--{slot.name}", action="append" if many else Once, default=[] if many else None,
                                  metavar=slot.metavar or ("FILE" if slot.images else "TEXT"), help=slot.help)  # fmt: skip
            for flag in slot.flags:
                _add_flag(more, flag)


def _add_flag(group: Any, flag: Flag) -> None:
    if flag.type == "switch" and flag.values:  # --NAME alone, or --NAME V1,V2,...: one number per field
        metavar = ",".join(name.upper() for name in flag.values)
        group.add_argument(f"--{flag.name}", nargs="?", const=True, default=None, type=_numbers(flag),
                           metavar=metavar, help=flag.help)  # fmt: skip
        return
    if flag.type == "switch":
        group.add_argument(f"--{flag.name}", action="store_const", const=True, default=None, help=flag.help)
        return
    group.add_argument(
        f"--{flag.name}",
        type=_FLAG_TYPES[flag.type],
        choices=flag.choices or None,
        metavar=flag.metavar or _METAVARS.get(flag.type),
        help=flag.help,
    )


# A flag's value as the command's own flags name it in --help (argparse's default: the flag's name in capitals).
_METAVARS = {"image": "IMG", "number": "N", "window": "START:END", "list": "A,B"}


def _numbers(flag: Flag) -> Callable[[str], tuple[float, ...]]:
    """The reader of a switch's values: as many comma-separated numbers as it has fields, each finite."""

    def read(text: str) -> tuple[float, ...]:
        parts = text.split(",")
        if len(parts) != len(flag.values):
            names = ",".join(name.upper() for name in flag.values)
            raise argparse.ArgumentTypeError(
                f"takes nothing or {len(flag.values)} comma-separated numbers {names}, got {text!r} (a prompt "
                f"after --{flag.name}: put the prompt first)"
            )
        return tuple(number(part.strip()) for part in parts)

    return read


def _flag_options(args: argparse.Namespace, flags: tuple[Flag, ...]) -> dict[str, Any]:
    """Field -> value of the ``flags`` as given (``None``: not given); a switch given numbers sets its fields too."""
    out: dict[str, Any] = {}
    for flag in flags:
        value = _given(args, flag)
        if isinstance(value, tuple) and flag.type == "switch":
            out.update(zip(flag.values, value, strict=True))
            value = True
        out[flag.field] = value
    return out


def _family_flags(kind: str) -> tuple[Flag, ...]:
    return CONDITION_KINDS[kind].flags


def _given(args: argparse.Namespace, flag: Flag) -> Any:
    return getattr(args, flag.name.replace("-", "_"))


def _slot_options(slot: str, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` as options of ``slot`` (``SLOT.OPTION``), those not given (``None``) left out: the slot's defaults,
    its family's, apply to them."""
    return {f"{slot}.{option}": value for option, value in given.items() if value is not None}


def _identity_flags_given(args: argparse.Namespace) -> list[str]:
    shared = [f"--{n.replace('_', '-')}" for n in ("identity", "face_scale", "face_window") if getattr(args, n)]
    own = [f"--{f.name}" for kind in identity_kinds() for f in _family_flags(kind) if _given(args, f) is not None]
    return shared + own


def _identity_options(args: argparse.Namespace) -> dict[str, Any]:
    """The face slot's options from the identity flags given (``face.kind``, the shared and the family's own); the
    rest keep the family's defaults."""
    kind = args.identity or DEFAULT_IDENTITY
    for other in identity_kinds():
        wrong = [f"--{f.name}" for f in _family_flags(other) if _given(args, f) is not None]
        if other != kind and wrong:
            raise InvalidRequestError(f"{', '.join(wrong)}: for --identity {other}, not {kind}")
    given = {"kind": args.identity, **{f.field: _given(args, f) for f in _family_flags(kind)}}
    given.update(scale=args.face_scale, window=args.face_window)
    return _slot_options("face", given)


def _structure_slots(
    args: argparse.Namespace, taken: set[str], declared: set[str]
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """The structure slots (edges, depth, pose) and the union slot from their flags: a photo, or a ready map."""
    inputs: dict[str, list[str]] = {}
    options: dict[str, Any] = {}
    for name in STRUCTURE_CONTROLS:
        photo, ready = None if name in taken else getattr(args, name), getattr(args, f"{name}_map")
        if photo and ready:
            raise InvalidRequestError(f"give --{name} (a photo) or --{name}-map (a ready map), not both")
        if ready and name in declared:  # the preset's input of that name takes photos
            raise InvalidRequestError(
                f"--{name}-map: the preset {args.preset} takes its {name} input as --{name}; give a ready map as "
                f"--{name} MAP --set {name}.preprocess=null"
            )
        if not (photo or ready):
            continue
        inputs[name] = [photo or ready]
        if ready:
            options[f"{name}.map"] = True
        if not args.union:  # under --union, the union's scale and window apply
            given = {"model": getattr(args, f"{name}_model"), "scale": getattr(args, f"{name}_scale"),
                     "window": getattr(args, f"{name}_window")}  # fmt: skip
            options.update(_slot_options(name, given))
    if args.union:
        if not inputs:
            raise InvalidRequestError("--union needs at least one of --edges, --depth, --pose (or their -map)")
        given = {"model": args.union, "scale": args.union_scale, "window": args.union_window}
        options.update(_slot_options("union", given))
    return inputs, options


def _lora(text: str) -> tuple[str, float | None]:
    """(file, weight) of ``--lora FILE[:SCALE]``; no weight: the LoRA's default."""
    path, sep, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if sep else (text, None)
    except ValueError:  # the colon belonged to the path (C:\loras\x.safetensors)
        return text, None


def _slot_inputs(
    args: argparse.Namespace, taken: set[str], declared: set[str]
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """(the condition families' input slots the flags fill, their options as given): what no preset input took.
    Options not given are left out, so the slot's defaults (its family's) apply; so are the options of a slot the
    preset takes as an input of its own (``declared``), which its template sets up (``--set NAME.KEY=VALUE``)."""
    inputs, options = _structure_slots(args, taken, declared)
    if args.lora:
        files, scales = zip(*map(_lora, args.lora), strict=True)
        inputs["lora"] = list(files)
        if any(scale is not None for scale in scales):
            options["lora.scale"] = list(scales)
    if args.style and "style" not in taken:
        inputs["style"] = list(args.style)
        options.update(_slot_options("style", {"scale": args.style_scale}))
    if args.reference:
        inputs["reference"] = list(args.reference)
        given = {"variant": args.reference_variant, "scale": args.reference_scale, "layers": args.reference_layers}
        options.update(_slot_options("reference", given))
    if args.face and "face" not in taken:
        inputs["face"] = list(args.face)
        options.update(_identity_options(args))
    elif identity_flags := _identity_flags_given(args):
        raise InvalidRequestError(f"{', '.join(identity_flags)}: identity options need --face")
    for _, slot in input_slots().values():  # a family's slot this command has no flags of its own for
        if slot.name in OWN_SLOTS:
            continue
        if slot.files is None:  # options only: switched on by any of its flags
            options.update(_slot_options(slot.name, _flag_options(args, slot.flags)))
            continue
        value = getattr(args, slot.name.replace("-", "_"))
        named: list[str] = value if isinstance(value, list) else [value] if value else []
        if named:
            inputs[slot.name] = named
            options.update(_slot_options(slot.name, _flag_options(args, slot.flags)))
        elif stray := [f"--{f.name}" for f in slot.flags if _given(args, f) is not None]:
            raise InvalidRequestError(f"{', '.join(stray)}: options of --{slot.name}, which is not given")
    return inputs, {k: v for k, v in options.items() if k.partition(".")[0] not in declared}


def _preset_inputs(args: argparse.Namespace) -> tuple[dict[str, list[str]], set[str], set[str]]:
    """(the preset's inputs from --input NAME=FILE and from the flags named like them, the flags they took, the names
    of the preset's inputs): a flag that fills an input adds no condition of its own."""
    from ..presets import load_preset

    inputs: dict[str, list[str]] = {}
    for text in args.input:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise InvalidRequestError(f"--input takes NAME=FILE (face=me.jpg), got {text!r}")
        inputs.setdefault(name, []).append(path)
    taken: set[str] = set()
    preset = load_preset(args.preset) if args.preset is not None else None
    for name in INPUT_FLAGS:
        value = getattr(args, name)
        if value and preset is not None and name in preset.inputs:
            inputs.setdefault(name, []).extend(value if isinstance(value, list) else [value])
            taken.add(name)
    if args.structure and "structure" not in taken:
        raise InvalidRequestError("--structure fills a preset's structure input (--preset style-transfer)")
    if inputs and preset is None:
        raise InvalidRequestError("--input fills a preset's inputs: give --preset")
    identity_flags = _identity_flags_given(args)
    if preset is not None and preset.templates.get("face") and identity_flags:
        raise InvalidRequestError(
            f"the preset {preset.name} sets up the identity condition ({', '.join(identity_flags)}); "
            "change it with --set face.KEY=VALUE (--dry-run shows its settings)"
        )
    return inputs, taken, set(preset.inputs) if preset is not None else set()


def _request_settings(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size
    if size is not None and args.outpaint is not None:
        # --size is what the image is fitted to; the output grows by the outpaint, as its help says. The request's
        # size (and the recipe's) is the whole canvas.
        from ..base.defaults import MAX_SIDE

        left, top, right, bottom = args.outpaint
        size = (size[0] + left + right, size[1] + top + bottom)
        if max(size) > MAX_SIDE:
            raise InvalidRequestError(
                f"--size {args.size[0]}x{args.size[1]} grown by --outpaint is {size[0]}x{size[1]}, beyond "
                f"{MAX_SIDE} pixels a side: give a smaller --size or less --outpaint"
            )
    given = {
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "refiner_switch": args.refiner_switch,
        "refiner_prompt": args.refiner_prompt,
        "refiner_negative_prompt": args.refiner_negative_prompt,
        "guidance_rescale": args.guidance_rescale,
        "prediction_type": args.prediction_type,
        "zero_terminal_snr": args.zero_terminal_snr,
        "size": size,
        "num_images": args.num_images,
        "scheduler": args.scheduler,
        "vae_tiling": True if args.vae_tiling else None,
        "long_prompts": args.long_prompts,
        "emphasis": args.emphasis,
        "clip_skip": args.clip_skip,
        "pad_conds": True if args.pad_conds else None,
        "step_cache": args.step_cache,
        "step_cache_branch": args.step_cache_branch,
        "decoder": args.decoder,
        "vae": args.vae,
        "init_image": args.init_image,
        "strength": args.strength,
        "mask": args.mask,
        "mask_blur": args.mask_blur,
        "refiner_only": True if args.refiner_only else None,
        "outpaint": args.outpaint,
        "padding_mask_crop": args.mask_crop,
        "paste_back": True if args.paste_back else None,
        "hires_scale": args.hires,
        "hires_strength": args.hires_strength,
        "hires_steps": args.hires_steps,
        "upscaler": args.upscaler,
        "detailer": _detailer(args),
    }
    return {k: v for k, v in given.items() if v is not None}


def _detailer(args: argparse.Namespace) -> dict[str, Any] | None:
    options = {"strength": args.detail_strength, "unmatched": args.detail_unmatched}
    given = {k: v for k, v in options.items() if v is not None}
    if given and not args.detail_faces:
        raise InvalidRequestError(
            "--detail-strength and --detail-unmatched are for the face detailer: give --detail-faces"
        )
    return given if args.detail_faces else None


def job_spec(args: argparse.Namespace, resolver: Resolver) -> tuple[JobSpec, Any]:
    """(the job the flags ask for, the Locator that finds the files a --recipe names)."""
    from ..base.files import Locator
    from ..jobs.spec import JobSpec
    from ..presets import parse_assignment

    if args.preset is None and args.set:
        raise InvalidRequestError("--set changes a preset's settings: give --preset")
    if args.recipe is None and args.inputs_from:
        raise InvalidRequestError("--inputs-from is where --recipe finds the files its recipe names: give --recipe")
    inputs, taken, declared = _preset_inputs(args)
    slot_inputs, slot_options = _slot_inputs(args, taken, declared)
    recipe, locate, imported = None, Locator(), None
    if args.recipe is not None:
        from ..jobs.png_import import Imported, missing_loras, read_image_settings

        found = read_image_settings(args.recipe)
        if isinstance(found, Imported):
            imported = found
        else:
            recipe = found
        locate = Locator([*args.inputs_from, args.recipe.expanduser().resolve().parent])
    spec = JobSpec(
        args.prompt,
        preset=args.preset,
        inputs={**inputs, **slot_inputs},
        set={**dict(parse_assignment(a) for a in args.set), **slot_options},
        settings=_request_settings(args),
        models={
            "base": args.base,
            "refiner": args.refiner,
            "weight_storage": args.weight_storage,
            "fast": None if args.fast == "off" else args.fast,
            "offload": True if args.offload else None,
        },
        face_pack=args.face_pack,
        recipe=recipe,
    )
    if imported is not None:
        log.warning("%s: %s's settings restored; not used:\n%s", args.recipe.name, imported.tool, imported.report())
        if absent := missing_loras(imported, resolver, args.recipe.name):  # the page says the same
            raise MissingWeightsError("\n".join(absent.values()))
        spec = imported.under(spec)
    return spec, locate


def run(args: argparse.Namespace, resolver: Resolver) -> int:
    if args.grid and args.recipe is None and (args.num_images or 1) < 2:
        raise InvalidRequestError("--grid makes a contact sheet of a batch: give --num-images 2 or more")
    options.output_paths(args.output, 1)  # now, before the seconds torch takes to import; again below for a batch
    if args.score and not args.face:
        raise InvalidRequestError("--score needs --face")
    # Said before the imports below (torch, and with --tiny the tiny models' first build): seconds, not an instant.
    # A PNG given to --recipe brings its own prompt.
    if args.recipe is None and not args.prompt:
        raise InvalidRequestError("a prompt is required (or --recipe PNG)")
    from ..jobs.spec import resolve

    spec, locate = job_spec(args, resolver)
    if spec.recipe is None and not spec.prompt:  # a PNG from another tool whose prompt is empty
        raise InvalidRequestError(f"a prompt is required: {args.recipe} restores none; give one")
    job = resolve(spec, resolver.naming() if args.dry_run else resolver, locate=locate)
    outputs = options.output_paths(args.output, 1 if job.keep is not None else job.request.num_images)
    if args.dry_run:
        return _dry_run(args, job)
    from ..jobs.runner import Runner

    options.library_output(getattr(args, "verbose", False))
    progress = None
    if args.preview_every:
        from ..engine.preview import Previews

        preview = outputs[0].with_name(f"{outputs[0].stem}-preview.png")
        source = resolver.decoder(args.preview_decoder) or args.preview_decoder
        progress = Previews(lambda image, event: options.save(image, preview), every=args.preview_every, decoder=source)
    runner = Runner(device=args.device, dtype=options.dtype(args.dtype), variant=args.variant)
    images = runner.run(job, progress=progress, progress_bar=not args.quiet, recipe_paths=args.recipe_paths).images
    if args.score:
        _score_into_recipes(images, args.face[0], _identity_pack(job, resolver))
    for image, path in zip(images, outputs, strict=True):
        options.save(image, path)
        detailed = image.recipe.get("measurements", {}).get("detailer")
        faces = f"  faces: {detailed['found']} found, {detailed['repainted']} repainted" if detailed else ""
        sys.stdout.write(f"{path}  seed={image.recipe['seed']}{faces}\n")
    if args.grid and len(images) > 1:
        from ..records.recipe import RecipeImage
        from .sheet import contact_sheet

        grid = outputs[0].with_name(f"{outputs[0].stem}-grid.png")
        sheet = contact_sheet(images, [f"seed {image.recipe['seed']}" for image in images])
        # The sheet carries the batch's recipe (its first image's: --recipe re-makes the batch, keeping that one).
        options.save(RecipeImage.wrap(sheet, images[0].recipe), grid)
        sys.stdout.write(f"{grid}  contact sheet\n")
    return 0


def _dry_run(args: argparse.Namespace, job: ResolvedJob) -> int:
    """Print what would run, loading nothing: the job (a line of a job file for `sdxl-control batch`) with the models
    and the request as the recipe records them."""
    import json

    from ..jobs.job_file import job_line

    line = job_line(job.request, job.base, job.refiner, job.unet, args.recipe_paths, job.weight_storage,
                    fast=job.fast, offload=job.offload)  # fmt: skip
    sys.stdout.write(json.dumps(line) + "\n")
    return 0


def _identity_pack(job: ResolvedJob, resolver: Resolver) -> str:
    """The face pack the request's identity condition analyses faces with (scores compare like with like)."""
    from ..preprocessors.face import IDENTITY_PACK

    packs = [c.face_pack for c in job.request.conditions if c.kind in identity_kinds()]  # type: ignore[attr-defined]
    return packs[0] if packs else resolver.face_pack(IDENTITY_PACK)


def _score_into_recipes(images: list[Any], face: str, pack: str) -> None:
    from ..preprocessors.face import identity_similarity

    for i, image in enumerate(images):
        try:
            value: float | None = round(identity_similarity(face, image, pack=pack), 4)
        except SdxlControlError as exc:  # a finished image is kept whatever its score
            logging.getLogger(__name__).warning("image %d: no identity similarity (%s)", i, exc)
            value = None
        image.annotate(identity_similarity=value)
