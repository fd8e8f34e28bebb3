"""Command line: ``sdxl-control generate``, ``preprocess`` (see what a condition will see) and ``score`` (identity
similarity of images to a face photo)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any

# Only light modules at the top: an argument error or --help answers before torch and diffusers load (seconds).
from .defaults import DEFAULT_BASE, DEFAULT_REFINER, DRAFT_DECODER, FAST_LEVELS, STRUCTURE_CONTROLS
from .errors import EXIT_INTERRUPTED, DeviceError, InvalidRequestError, ModelError, OutputError, SdxlControlError
from .presets import available_presets

__all__ = ["main", "build_parser"]

DTYPES = ("fp16", "bf16", "fp32")
TINY_SIZE = (128, 128)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


DEFAULT_UNION = "xinsir/controlnet-union-sdxl-1.0"
INSTANTID_REPO = "InstantX/InstantID"
PULID_REPO = "guozinan/PuLID"
IDENTITIES = ("faceid", "instantid", "pulid", "photomaker")
FACEID_SCALE = 0.8


def _size(text: str) -> tuple[int, int]:
    try:
        width, _, height = text.lower().partition("x")
        size = int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768, got {text!r}") from None
    if min(size) <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def _number(text: str) -> float:
    """A float option: NaN and infinities are refused here (argparse's float takes them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _window(text: str) -> tuple[float, float]:
    try:
        start, _, end = text.partition(":")
        window = _number(start or "0"), _number(end or "1")
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"window must look like 0:0.7, got {text!r}") from None
    if not 0.0 <= window[0] < window[1] <= 1.0:
        raise argparse.ArgumentTypeError(f"a window needs 0 <= start < end <= 1, got {text!r}")
    return window


def _add_condition_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ControlNets (several may be combined)")
    for name, control in STRUCTURE_CONTROLS.items():
        group.add_argument(f"--{name}", metavar="PHOTO", help=f"guide by the {control.preprocessor} map of this photo")
        group.add_argument(f"--{name}-map", metavar="MAP", help=f"guide by this ready {name} map (no preprocessing)")
        group.add_argument(f"--{name}-model", metavar="MODEL", help=f"ControlNet for {name} (default {control.model})")
        group.add_argument(f"--{name}-scale", type=_number, default=1.0, metavar="S", help="its strength (default 1)")
        group.add_argument(f"--{name}-window", type=_window, default=(0.0, 1.0), metavar="START:END",
                           help="fractions of the schedule where it acts (default 0:1)")  # fmt: skip
    group.add_argument("--union", nargs="?", const=DEFAULT_UNION, metavar="MODEL",
                       help=f"drive all controls through one ControlNet-Union model (default {DEFAULT_UNION}); "
                       "it takes --union-scale and --union-window")  # fmt: skip
    group.add_argument("--union-scale", type=_number, default=1.0, metavar="S")
    group.add_argument("--union-window", type=_window, default=(0.0, 1.0), metavar="START:END")
    refs = parser.add_argument_group("reference images and identity")
    refs.add_argument("--style", metavar="IMG", action="append", default=[], help="style reference (InstantStyle)")
    refs.add_argument("--style-scale", type=_number, default=0.8, metavar="S")
    refs.add_argument("--reference", metavar="IMG", action="append", default=[], help="IP-Adapter reference image")
    refs.add_argument("--reference-variant", default="plus", help="sdxl, vit-h, plus, plus-face (default plus)")
    refs.add_argument("--reference-scale", type=_number, default=0.6, metavar="S")
    refs.add_argument("--reference-layers", default="all", help="all, style, composition, style+composition")
    refs.add_argument("--face", metavar="IMG", action="append", default=[],
                      help="photo of the person (repeatable: several photos of one person)")  # fmt: skip
    refs.add_argument("--identity", choices=IDENTITIES,
                      help="identity method for --face: faceid (IP-Adapter FaceID, default), instantid, pulid or photomaker")  # fmt: skip
    refs.add_argument("--face-variant", help="FaceID: faceid or plusv2 (default)")
    refs.add_argument("--identity-scale", "--face-scale", dest="face_scale", type=_number, metavar="S",
                      help="strength of the identity (FaceID, InstantID's face tokens, PuLID's id_scale; default 0.8)")  # fmt: skip
    refs.add_argument("--face-window", type=_window, default=(0.0, 1.0), metavar="START:END")
    refs.add_argument("--identity-mode", choices=("fidelity", "style"),
                      help="PuLID: fidelity (default) or style (v1: more zero tokens, plain orthogonal projection)")  # fmt: skip
    refs.add_argument("--pulid-version", choices=("v1", "v1.1"), help="PuLID: v1 (Lightning 4-step) or v1.1 (default)")
    refs.add_argument("--pulid-model", default=PULID_REPO, metavar="MODEL",
                      help=f"PuLID repo holding pulid_v1.bin / pulid_v1.1.safetensors (default {PULID_REPO})")  # fmt: skip
    refs.add_argument("--eva-model", metavar="MODEL", help="PuLID: EVA-CLIP repo or file (default QuanSun/EVA-CLIP)")
    refs.add_argument("--face-parsing", metavar="FOLDER",
                      help="PuLID: folder with facexlib's parsing_bisenet.pth (default: facexlib's own)")  # fmt: skip
    refs.add_argument("--trigger", help="PhotoMaker: the trigger word after the class word in the prompt (default img)")
    refs.add_argument("--photomaker-version", choices=("v1", "v2"), help="PhotoMaker: v1 or v2 (default)")
    refs.add_argument("--photomaker-weights", metavar="FILE", help="PhotoMaker: a checkpoint file instead of the hub's")
    refs.add_argument("--start-merge", type=_number, metavar="F",
                      help="PhotoMaker: fraction of the steps before the identity joins the prompt (default 0.2)")  # fmt: skip
    refs.add_argument("--identitynet-scale", type=_number, metavar="S",
                      help="InstantID: strength of IdentityNet (default 0.8)")  # fmt: skip
    refs.add_argument("--identitynet-window", type=_window, default=(0.0, 1.0), metavar="START:END")
    refs.add_argument("--face-keypoints", metavar="IMG", help="InstantID: pose the face like the face in this photo")
    refs.add_argument("--instantid-model", default=INSTANTID_REPO, metavar="MODEL",
                      help=f"InstantID repo with ControlNetModel/ and ip-adapter.bin (default {INSTANTID_REPO})")  # fmt: skip
    refs.add_argument("--face-pack", help="insightface model pack name or folder (default: buffalo_l for FaceID, "
                      "antelopev2 for InstantID)")  # fmt: skip
    refs.add_argument("--score", action="store_true",
                      help="store each image's identity similarity to the first --face photo in its recipe")  # fmt: skip


def _control_conditions(args: argparse.Namespace) -> list[Any]:
    from .adapters.controlnet import ControlNet, ControlNetUnion

    # name -> (image, preprocessor or None for a ready map)
    chosen: dict[str, tuple[str, str | None]] = {}
    for name, control in STRUCTURE_CONTROLS.items():
        photo, ready = getattr(args, name), getattr(args, f"{name}_map")
        if photo and ready:
            raise InvalidRequestError(f"give --{name} (a photo) or --{name}-map (a ready map), not both")
        if photo or ready:
            chosen[name] = (photo or ready, control.preprocessor if photo else None)
    if args.union:
        if not chosen:
            raise InvalidRequestError("--union needs at least one of --edges, --depth, --pose (or their -map)")
        types = {name: STRUCTURE_CONTROLS[name].union_type for name in chosen}
        return [
            ControlNetUnion(
                args.union, preprocess=tuple(types[n] for n, (_, p) in chosen.items() if p),
                scale=args.union_scale, window=args.union_window,
                **{types[n]: image for n, (image, _) in chosen.items()},
            )
        ]  # fmt: skip
    return [
        ControlNet(getattr(args, f"{name}_model") or STRUCTURE_CONTROLS[name].model, image=image, preprocess=preprocessor,
                   scale=getattr(args, f"{name}_scale"), window=getattr(args, f"{name}_window"))
        for name, (image, preprocessor) in chosen.items()
    ]  # fmt: skip


def _reference_conditions(args: argparse.Namespace) -> list[Any]:
    from .adapters.ip_adapter import IPAdapter

    if args.face_keypoints and not args.face:
        raise InvalidRequestError("--face-keypoints needs --face")
    conditions: list[Any] = []
    if args.style:
        conditions.append(IPAdapter.style(args.style, scale=args.style_scale))
    if args.reference:
        conditions.append(IPAdapter(args.reference_variant, args.reference, scale=args.reference_scale,
                                    layers=args.reference_layers))  # fmt: skip
    if args.face:
        conditions.append(_identity_condition(args))
    return conditions


def _identity_condition(args: argparse.Namespace) -> Any:
    """The --identity condition for --face, from the flags given (the rest keep the method's defaults)."""
    if args.face_keypoints and args.identity != "instantid":
        raise InvalidRequestError("--face-keypoints is for --identity instantid")
    if (args.identity_mode or args.pulid_version) and args.identity != "pulid":
        raise InvalidRequestError("--identity-mode and --pulid-version are for --identity pulid")
    photomaker_flags = (args.trigger, args.photomaker_version, args.photomaker_weights, args.start_merge)
    if any(v is not None for v in photomaker_flags) and args.identity != "photomaker":
        raise InvalidRequestError("--trigger, --photomaker-version, --photomaker-weights and --start-merge are for "
                                  "--identity photomaker")  # fmt: skip
    given: dict[str, Any] = {"scale": args.face_scale, "window": args.face_window, "face_pack": _face_pack(args)}
    if args.identity in (None, "faceid"):
        given["scale"] = FACEID_SCALE if args.face_scale is None else args.face_scale
        return _condition("faceid", args.face_variant or "plusv2", args.face, **given)
    if args.identity == "instantid":
        return _condition("instantid", args.face, keypoints_from=args.face_keypoints, source=args.instantid_model,
                          controlnet_scale=args.identitynet_scale, controlnet_window=args.identitynet_window, **given)  # fmt: skip
    if args.identity == "photomaker":
        return _condition("photomaker", args.face, version=args.photomaker_version, trigger=args.trigger,
                          weights=args.photomaker_weights, start_merge=args.start_merge, **given)  # fmt: skip
    return _condition("pulid", args.face, version=args.pulid_version, mode=args.identity_mode,
                      source=args.pulid_model, eva=args.eva_model, parsing=args.face_parsing, **given)  # fmt: skip


def _condition(kind: str, *inputs: Any, **given: Any) -> Any:
    """A condition of ``kind`` with the options actually given (the rest keep the class's defaults)."""
    from .adapters import condition_class

    return condition_class(kind)(*inputs, **{k: v for k, v in given.items() if v is not None})


def _face_pack(args: argparse.Namespace) -> str:
    from .preprocessors.face import DEFAULT_PACK, IDENTITY_PACK

    if args.face_pack:
        return str(args.face_pack)
    # FaceID and PhotoMaker v2 were trained on buffalo_l's embeddings; InstantID and PuLID on antelopev2's.
    identity = getattr(args, "identity", "instantid") or "faceid"  # preprocess and score have no --identity
    return DEFAULT_PACK if identity in ("faceid", "photomaker") else IDENTITY_PACK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error, not only its message",
    )
    parser = argparse.ArgumentParser(
        prog="sdxl-control",
        description="Controllable SDXL generation.",
        epilog="exit codes: 0 done, 1 unexpected failure (a bug: --debug shows it), 2 bad option or request, "
        "3 unreadable or missing input file, 4 model missing or unusable, 5 no usable face in a photo, "
        "6 output cannot be written, 7 device unavailable or out of memory, 130 interrupted",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images from a prompt (or re-run a PNG's recipe)", parents=[common])
    gen.add_argument("prompt", nargs="?", help="the prompt (optional with --recipe)")
    gen.add_argument("-n", "--negative-prompt", help="negative prompt")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG; image i of a batch gets -i before .png")
    gen.add_argument("--seed", type=_count, help="seed of the first image (random if not given)")
    gen.add_argument("--steps", type=_count, help="denoising steps over both stages (default 30)")
    gen.add_argument("--guidance", type=_number, help="classifier-free guidance scale; <= 1 turns it off (default 5)")
    gen.add_argument("--refiner-switch", type=_number, help="fraction of the schedule the base runs before the refiner")
    gen.add_argument("--size", type=_size, help="WIDTHxHEIGHT, multiples of 8 (default 1024x1024)")
    gen.add_argument("--num-images", type=_count, help="images in the batch, seeds seed, seed+1, ...")
    gen.add_argument("--scheduler", help="euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddim, unipc, heun, ... or a class")
    gen.add_argument("--preset", metavar="NAME|FILE",
                     help=f"what works together, as data: {', '.join(available_presets())}, or a preset file "
                     "(`sdxl-control presets` describes them); explicit options win")  # fmt: skip
    gen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="change a preset's setting: steps=8, size=[768,1024], face.scale=0.6 (a condition's field), "
                     "models.base=REPO; repeatable")  # fmt: skip
    gen.add_argument("--input", action="append", default=[], metavar="NAME=FILE",
                     help="fill a preset's input (face, style, structure, pose); --face, --style, --pose and "
                     "--structure do the same")  # fmt: skip
    gen.add_argument("--structure", metavar="PHOTO", help="a preset's structure input: the photo whose composition "
                     "to keep (style-transfer)")  # fmt: skip
    gen.add_argument("--dry-run", action="store_true",
                     help="print the resolved models and request (as the recipe records them) and load nothing")  # fmt: skip
    gen.add_argument("--preview-every", type=_count, metavar="N",
                     help="every N steps, write the image as it forms to OUTPUT-preview.png (decoded by TAESD-XL)")  # fmt: skip
    gen.add_argument("--preview-decoder", metavar="MODEL", default=DRAFT_DECODER,
                     help=f"the previews' tiny autoencoder: a TAESD folder or hub id (default {DRAFT_DECODER}), or "
                     "ComfyUI's vae_approx/taesdxl_decoder.safetensors")  # fmt: skip
    gen.add_argument("--grid", action="store_true",
                     help="with --num-images: also write a contact sheet OUTPUT-grid.png with each image's seed")  # fmt: skip
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="stack a LoRA (repeatable)")
    gen.add_argument("--base", help=f"base model: hub id, local folder or .safetensors (default {DEFAULT_BASE})")
    gen.add_argument("--refiner", help=f"refiner model, used with --refiner-switch (default {DEFAULT_REFINER})")
    gen.add_argument("--tiny", action="store_true", help="use built-in tiny random models (offline demo)")
    gen.add_argument("--recipe", type=Path, help="re-run the recipe stored in a PNG written by sdxl-control")
    gen.add_argument("--inputs-from", metavar="FOLDER", action="append", default=[],
                     help="with --recipe: a folder holding the files the recipe names (control images, face photos, "
                     "local models); they are also looked for beside the PNG and where this machine last saw them")  # fmt: skip
    gen.add_argument("--recipe-paths", choices=("names", "full"), default="names",
                     help="how the images' recipes name local files: by name and content hash (default), or also by "
                     "their full path (private to this machine)")  # fmt: skip
    gen.add_argument("--device", help="cuda, cpu, mps ... (default: cuda if available)")
    gen.add_argument("--dtype", choices=DTYPES, help="default: fp16 on GPU, fp32 on CPU")
    gen.add_argument("--variant", help="weights variant to load, e.g. fp16")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    gen.add_argument("--vae-tiling", action="store_true", help="decode tile by tile (large images, small GPUs)")
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

    pre = sub.add_parser(
        "preprocess", help="write the control image a preprocessor makes from a photo", parents=[common]
    )
    pre.add_argument("kind", choices=["canny", "depth", "pose", "face", "faces"],
                     help="face: the keypoint map InstantID's IdentityNet sees; faces: the photo with each detected "
                     "face's box, landmarks and score (green: the largest, which identity methods use)")  # fmt: skip
    pre.add_argument("photo", help="the photo")
    pre.add_argument("-o", "--output", required=True, help="output image (PNG)")
    pre.add_argument("--size", type=_size, help="face: draw the keypoints at this output size (default: the photo's)")
    pre.add_argument("--face-pack", help="face, faces: insightface pack name or folder (default antelopev2)")
    pre.add_argument("--tiny", action="store_true", help="depth/pose: tiny random stand-ins for the annotator models")

    ui = sub.add_parser("ui", help="open the local web page: every condition, live previews, PNGs with recipes",
                        parents=[common])  # fmt: skip
    ui.add_argument("--tiny", action="store_true", help="serve the built-in tiny models (offline demo)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=_count, default=7860, help="port (default 7860)")
    ui.add_argument("--base", default=DEFAULT_BASE, help=f"base model (default {DEFAULT_BASE})")
    ui.add_argument("--refiner", default=DEFAULT_REFINER, help=f"refiner model (default {DEFAULT_REFINER})")
    ui.add_argument("--device", help="cuda, cpu, mps ... (default: cuda if available)")
    ui.add_argument("--face-pack", help="insightface pack name or folder for the identity methods")
    ui.add_argument("--preview-decoder", default=DRAFT_DECODER, metavar="MODEL",
                    help="the live previews' tiny autoencoder (a TAESD folder, hub id or taesdxl_decoder.safetensors)")  # fmt: skip
    batch = sub.add_parser("batch", help="run a job file (JSON Lines, one recipe per line) into a folder, resumable; "
                           "on a Ray cluster with --ray", parents=[common])  # fmt: skip
    batch.add_argument("jobs", help="the job file: one JSON job per line (a PNG's recipe, or what --dry-run prints)")
    batch.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                       help="folder for the PNGs and results.jsonl (made if missing; with --ray, a folder every worker "
                       "reaches, or a pyarrow filesystem URI such as s3://bucket/run)")  # fmt: skip
    batch.add_argument("--skip-invalid", action="store_true",
                       help="run the valid jobs when some lines are not (they are listed, and recorded as failed)")  # fmt: skip
    batch.add_argument("--check", action="store_true", help="check the job file, list its problems, run nothing")
    batch.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run on Ray: the cluster at ADDRESS (auto, ray://head:10001), or a local Ray runtime")  # fmt: skip
    batch.add_argument("--workers", type=_count, help="--ray: workers, each with its own models (default: one per GPU)")
    batch.add_argument("--gpus-per-worker", type=_number, help="--ray: GPUs each worker takes (default 1 with GPUs)")
    batch.add_argument("--inputs-from", metavar="FOLDER", action="append", default=[],
                       help="a folder holding files the jobs' recipes name (also looked for beside the job file)")  # fmt: skip
    batch.add_argument("--recipe-paths", choices=("names", "full"), default="names",
                       help="how the images' recipes name local files (as for generate)")  # fmt: skip
    batch.add_argument("--tiny", action="store_true", help="run every job on the built-in tiny models (offline demo)")
    batch.add_argument("--device", help="cuda, cpu, mps ... (default: cuda if available)")
    batch.add_argument("--dtype", choices=DTYPES, help="default: fp16 on GPU, fp32 on CPU")
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sub.add_parser("presets", help="list the presets: what each does and the inputs it takes", parents=[common])
    models = sub.add_parser("models", help="the models presets need: present or not, their size, how to fetch them",
                            parents=[common])  # fmt: skip
    models.add_argument("--preset", action="append", default=[], metavar="NAME|FILE",
                        help="only this preset's models (repeatable; default: every shipped preset)")  # fmt: skip
    models.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for generate")
    models.add_argument("--fetch", action="store_true", help="download the missing ones from the hub (needs network)")

    score = sub.add_parser("score", help="identity similarity of images to a face photo (ArcFace cosine)",
                           parents=[common])  # fmt: skip
    score.add_argument("images", nargs="+", help="images to score")
    score.add_argument("--face", required=True, metavar="IMG", help="photo of the person")
    score.add_argument("--face-pack", help="insightface pack name or folder (default antelopev2)")
    return parser


def _request_options(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "refiner_switch": args.refiner_switch,
        "size": args.size,
        "num_images": args.num_images,
        "scheduler": args.scheduler,
        "vae_tiling": True if args.vae_tiling else None,
        "decoder": args.decoder,
    }
    return {k: v for k, v in given.items() if v is not None}


def _check_model_flags(args: argparse.Namespace) -> None:
    if args.tiny and (args.base or args.refiner):
        raise InvalidRequestError("--tiny uses the built-in tiny models: give it, or --base/--refiner, not both")
    if args.recipe is None and args.inputs_from:
        raise InvalidRequestError("--inputs-from is where --recipe finds the files its recipe names: give --recipe")


def _models(
    args: argparse.Namespace, recipe: dict[str, Any] | None, switch: float | None, locate: Any, preset: Any = None
) -> tuple[str, str | None, Any]:
    """(base, refiner, UNet checkpoint) to load: the flags, else what the recipe recorded, else the preset's, else
    the defaults."""
    from .recipe import recipe_models, recipe_unet, recorded_model

    chosen = preset.models if preset is not None else {}
    if args.tiny:
        from .testing import tiny_models
        from .testing.stand_ins import tiny_unet

        tiny = tiny_models(seed=((recipe or {}).get("models", {}).get("base") or {}).get("tiny_seed", 0))
        unet = preset.unet if preset is not None else None
        if recipe is not None:
            unet = recipe_unet(recipe, locate)
        return str(tiny.base), str(tiny.refiner) if switch is not None else None, tiny_unet(unet)
    if recipe is not None and args.base is None:
        recorded = recipe["models"].get("refiner") or recipe["models"].get("base", {}).get("tiny_seed") is not None
        base, refiner, unet = recipe_models(recipe, locate, refiner=switch is not None and bool(recorded))
    else:
        base = args.base or chosen.get("base", DEFAULT_BASE)
        refiner, unet = None, preset.unet if preset is not None and args.base is None else None
        if recipe is not None and switch is not None and recipe["models"].get("refiner"):  # --base over a recipe
            refiner = recorded_model(recipe["models"]["refiner"], locate, "refiner")
    if switch is not None:
        refiner = args.refiner or refiner or chosen.get("refiner", DEFAULT_REFINER)
    return base, refiner, unet


def _output_paths(output: str, count: int) -> list[Path]:
    """Where the images go, checked before anything is generated: a finished image must not be lost to a typo."""
    path = Path(output).expanduser()
    if path.suffix.lower() != ".png":
        raise OutputError(f"-o {output}: the output must be a .png file (it carries the recipe)")
    paths = [path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"-o {output}: the folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"-o {output}: the folder {folder} is not writable")
    for target in paths:
        if target.is_dir():
            raise OutputError(f"-o {output}: {target} is a folder")
        if target.exists() and not os.access(target, os.W_OK):
            raise OutputError(f"-o {output}: {target} exists and is not writable")
    return paths


def _lora(text: str) -> Any:
    from .adapters.lora import LoRA

    path, sep, scale = text.rpartition(":")
    try:
        value = float(scale) if sep else None
    except ValueError:  # the colon belonged to the path (C:\loras\x.safetensors)
        value = None
    return LoRA(path, scale=value) if value is not None else LoRA(text)


# Flags that fill a preset input of the same name instead of adding a condition of their own.
_INPUT_FLAGS = ("face", "style", "pose", "structure")


def _load_preset(args: argparse.Namespace) -> Any:
    """The --preset with its --set assignments applied, or None."""
    if args.preset is None:
        if args.set:
            raise InvalidRequestError("--set changes a preset's settings: give --preset")
        return None
    from .presets import load_preset, parse_assignment

    preset = load_preset(args.preset)
    return preset.with_settings(dict(parse_assignment(a) for a in args.set)) if args.set else preset


def _preset_inputs(args: argparse.Namespace, preset: Any) -> dict[str, Any]:
    """The preset's inputs from --input NAME=FILE and from the flags named like them (--face, --style, --pose,
    --structure), which then add no condition of their own."""
    inputs: dict[str, list[str]] = {}
    for text in args.input:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise InvalidRequestError(f"--input takes NAME=FILE (face=me.jpg), got {text!r}")
        inputs.setdefault(name, []).append(path)
    for name in _INPUT_FLAGS:
        value = getattr(args, name)
        if value and preset is not None and name in preset.inputs:
            inputs.setdefault(name, []).extend(value if isinstance(value, list) else [value])
            setattr(args, name, [] if isinstance(value, list) else None)
    if args.structure:
        raise InvalidRequestError("--structure fills a preset's structure input (--preset style-transfer)")
    if inputs and preset is None:
        raise InvalidRequestError("--input fills a preset's inputs: give --preset")
    if preset is not None and preset.templates.get("face") and _identity_flags_given(args):
        raise InvalidRequestError(
            f"the preset {preset.name} sets up the identity condition; change it with --set face.KEY=VALUE "
            "(--dry-run shows its settings)"
        )
    return inputs


def _identity_flags_given(args: argparse.Namespace) -> bool:
    names = ("identity", "face_variant", "face_scale", "identity_mode", "pulid_version", "trigger", "photomaker_version",
             "photomaker_weights", "start_merge", "identitynet_scale", "face_keypoints")  # fmt: skip
    return any(getattr(args, n) is not None for n in names)


def _generate(args: argparse.Namespace) -> int:
    _check_model_flags(args)
    _output_paths(args.output, 1)  # now, before the seconds torch takes to import; again below for a whole batch
    from .files import Locator

    options = _request_options(args)
    preset = _load_preset(args)
    faces = list(args.face)
    if args.score and not faces:
        raise InvalidRequestError("--score needs --face")
    inputs = _preset_inputs(args, preset)
    conditions = [*map(_lora, args.lora), *_control_conditions(args), *_reference_conditions(args)]
    from .adapters import with_face_pack

    # --face-pack applies to a preset's identity condition too.
    conditions = with_face_pack([*(preset.conditions(inputs) if preset else []), *conditions], args.face_pack)
    if args.tiny:
        from .testing.stand_ins import tiny_condition, tiny_decoder

        conditions = [tiny_condition(c) for c in conditions]
        if "decoder" in options or (preset and preset.settings.get("decoder")):
            options["decoder"] = tiny_decoder(options.get("decoder") or preset.settings["decoder"])
    if conditions:
        options["conditions"] = tuple(conditions)
    recipe = None
    locate = None
    if args.recipe is not None:
        from .recipe import read_recipe

        recipe = read_recipe(args.recipe)
        locate = Locator([*args.inputs_from, args.recipe.expanduser().resolve().parent])
    from .generator import GenerationRequest

    if recipe is not None:
        prompt = {"prompt": args.prompt} if args.prompt else {}
        request = GenerationRequest.from_recipe(recipe, locate=locate, **prompt, **options)
    else:
        if not args.prompt:
            raise InvalidRequestError("a prompt is required (or --recipe PNG)")
        settings = dict(preset.settings) if preset else {}
        if args.tiny:
            settings.setdefault("size", TINY_SIZE)
        settings.update(options)
        request = GenerationRequest(args.prompt, **settings)
    keep_one = recipe is not None and "num_images" not in options  # the batch is re-run to re-make one image exactly
    outputs = _output_paths(args.output, 1 if keep_one else request.num_images)
    from .conditions import validate_conditions

    validate_conditions(request.conditions, has_refiner=request.refiner_switch is not None)
    base, refiner, unet = _models(args, recipe, request.refiner_switch, locate, preset)
    if args.dry_run:
        return _dry_run(args, request, base, refiner, unet)
    from .devices import default_device_and_dtype
    from .fast import FastPath
    from .generator import Generator

    device, dtype = default_device_and_dtype(args.device, _dtype(args.dtype))
    progress = None
    if args.preview_every:
        from .preview import Previews

        preview = outputs[0].with_name(f"{outputs[0].stem}-preview.png")
        source = args.preview_decoder
        if args.tiny:
            from .testing.stand_ins import tiny_decoder

            source = tiny_decoder(source)
        from .vae import find_decoder

        find_decoder(source)  # a missing decoder fails before the models load
        progress = Previews(lambda image, event: _save(image, preview), every=args.preview_every, decoder=source)
    _quiet_libraries(args.quiet)
    # Offloaded models are loaded into CPU memory: loading them onto a small GPU first would not fit.
    generator = Generator.from_pretrained(
        base, refiner, device="cpu" if args.offload else device, dtype=dtype, variant=args.variant, unet=unet
    )
    if args.offload:
        generator.set_offload(device)
    generator.set_fast_path(FastPath.level(args.fast, fuse_qkv=not args.offload))
    result = generator.run(request, progress=progress, progress_bar=not args.quiet, recipe_paths=args.recipe_paths)
    images = result.images
    if keep_one:
        assert recipe is not None
        images = [images[recipe.get("batch_index", 0)]]
    if args.score:
        _score_into_recipes(images, faces[0], _face_pack(args))
    for image, path in zip(images, outputs, strict=True):
        _save(image, path)
        sys.stdout.write(f"{path}  seed={image.recipe['seed']}\n")
    if args.grid and len(images) > 1:
        from .sheet import contact_sheet

        grid = outputs[0].with_name(f"{outputs[0].stem}-grid.png")
        _save(contact_sheet(images, [f"seed {image.recipe['seed']}" for image in images]), grid)
        sys.stdout.write(f"{grid}  contact sheet\n")
    return 0


def _save(image: Any, path: Path) -> None:
    try:
        image.save(path)
    except OSError as exc:
        raise OutputError(f"{path}: could not be written ({exc})") from None


def _dry_run(args: argparse.Namespace, request: Any, base: str, refiner: str | None, unet: Any) -> int:
    """Print what would run, loading nothing: the job (a line of a job file for `sdxl-control batch`) with the models
    and the request as the recipe records them."""
    import json

    from .batch import job_line

    sys.stdout.write(json.dumps(job_line(request, base, refiner, unet, args.recipe_paths)) + "\n")
    return 0


def _dtype(name: str | None) -> Any:
    if name is None:
        return None
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _quiet_libraries(quiet: bool) -> None:
    if quiet:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def _score_into_recipes(images: list[Any], face: str, pack: str) -> None:
    from .preprocessors.face import identity_similarity

    for i, image in enumerate(images):
        try:
            value: float | None = round(identity_similarity(face, image, pack=pack), 4)
        except SdxlControlError as exc:  # a finished image is kept whatever its score
            logging.getLogger(__name__).warning("image %d: no identity similarity (%s)", i, exc)
            value = None
        image.annotate(identity_similarity=value)


def _image_flags(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(flag, path) of every image file the command reads."""
    found = []
    for name in (*STRUCTURE_CONTROLS, *(f"{n}_map" for n in STRUCTURE_CONTROLS), "style", "reference", "face", "face_keypoints", "photo",
                 "images", "structure"):  # fmt: skip
        value = getattr(args, name, None)
        for path in value if isinstance(value, list) else [value]:
            if path:
                found.append((f"--{name.replace('_', '-')}", str(path)))
    for text in getattr(args, "input", []):
        name, _, path = text.partition("=")
        if path:
            found.append((f"--input {name}", path))
    return found


def _check_inputs(args: argparse.Namespace) -> None:
    """Every image the command reads opens as an image, before any model loads."""
    from .preprocessors.images import check_image_file

    for flag, path in _image_flags(args):
        check_image_file(path, flag.lstrip("-") if flag in ("--photo", "--images") else flag)


def _preprocess(args: argparse.Namespace) -> int:
    from .preprocessors import preprocess

    (output,) = _output_paths(args.output, 1)
    options: dict[str, Any] = {}
    if args.kind == "face":
        options = {"pack": _face_pack(args), **({"size": args.size} if args.size else {})}
    elif args.kind == "faces":
        options = {"pack": _face_pack(args)}
    elif args.size:
        raise InvalidRequestError("--size is for the face keypoint map")
    elif args.tiny:
        from .testing.stand_ins import tiny_preprocess_options

        options = tiny_preprocess_options(args.kind)
    preprocess(args.kind, args.photo, **options).save(output)
    sys.stdout.write(f"{output}\n")
    return 0


def _score(args: argparse.Namespace) -> int:
    from .preprocessors.face import identity_similarity

    for image in args.images:
        sys.stdout.write(f"{image}  {identity_similarity(args.face, image, pack=_face_pack(args)):.4f}\n")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from .ui import UiConfig, build_app

    config = UiConfig(tiny=args.tiny, base=args.base, refiner=args.refiner, face_pack=args.face_pack,
                      preview_decoder=args.preview_decoder, device=args.device)  # fmt: skip
    build_app(config).launch(server_name=args.host, server_port=args.port)
    return 0


def _presets(args: argparse.Namespace) -> int:
    import textwrap

    from .presets import available_presets, load_preset

    for name in available_presets():
        preset = load_preset(name, check=False)
        sys.stdout.write(f"{name}\n")
        sys.stdout.write(textwrap.fill(preset.description, 100, initial_indent="    ", subsequent_indent="    ") + "\n")
        for spec in preset.inputs.values():
            need = "required" if spec.required else "optional"
            many = ", repeatable" if spec.many else ""
            sys.stdout.write(f"    --{spec.name} FILE  ({need}{many}) {spec.help}\n")
    return 0


def _models_command(args: argparse.Namespace) -> int:
    """Each preset's models: present (where, size) or missing (how to get them); exit 4 while any is missing."""
    from .inventory import check, fetch, report
    from .presets import available_presets, load_preset, parse_assignment

    assignments = dict(parse_assignment(a) for a in args.set)
    complete = True
    for name in args.preset or available_presets():
        preset = load_preset(name)
        if assignments:
            preset = preset.with_settings(assignments)
        needs = preset.model_needs()
        if args.fetch:
            for need in needs:
                if not check(need).present and need.on_hub:
                    sys.stderr.write(f"fetching {need.what} from {need.source}\n")
                    fetch(need)
        table, present = report(needs)
        complete &= present
        sys.stdout.write(f"{preset.name}: {'all present' if present else 'some missing'}\n{table}\n")
    if not complete:
        sys.stderr.write("sdxl-control: some models are missing: fetch them as shown, or run with --fetch\n")
    return 0 if complete else ModelError.exit_code


def _batch(args: argparse.Namespace) -> int:
    """Check the whole job file, then run it; exit 0 when every job is done, else the exit code of the first
    failure's kind (its line in results.jsonl says what went wrong)."""
    from .batch import Outputs, read_jobs, record_problems, run_batch

    if args.ray is None and (args.workers is not None or args.gpus_per_worker is not None):
        raise InvalidRequestError("--workers and --gpus-per-worker are for --ray")
    jobs, problems = read_jobs(args.jobs, inputs_from=args.inputs_from, tiny=args.tiny)
    for problem in problems:
        sys.stderr.write(f"{args.jobs}: {problem}\n")
    if args.check:
        sys.stdout.write(f"{len(jobs)} job(s) valid, {len(problems)} not\n")
        return 0 if not problems else InvalidRequestError.exit_code
    if problems and not args.skip_invalid:
        raise InvalidRequestError(
            f"{len(problems)} of {len(jobs) + len(problems)} job(s) are not valid (listed above); nothing was run. "
            "Fix them, or --skip-invalid to run the rest"
        )
    outputs = Outputs(args.output)
    record_problems(problems, outputs)
    _quiet_libraries(args.quiet)
    options = {"device": args.device, "dtype": _dtype(args.dtype), "recipe_paths": args.recipe_paths,
               "progress_bar": not args.quiet}  # fmt: skip
    if args.ray is not None:
        from .ray_batch import run_batch_ray

        summary = run_batch_ray(jobs, outputs, address=args.ray or None, workers=args.workers,
                                gpus_per_worker=args.gpus_per_worker, **options)  # fmt: skip
    else:
        summary = run_batch(jobs, outputs, **options)
    sys.stdout.write(
        f"{summary.done} done, {summary.failed} failed, {summary.skipped} already complete, {len(problems)} invalid: "
        f"{outputs.target}\n"
    )
    failed = [r for r in summary.results if r.get("error") is not None]
    if failed:
        sys.stderr.write(f"sdxl-control: {len(failed)} job(s) failed, first {failed[0]['id']}: {failed[0]['error']}\n")
        code = failed[0].get("exit_code")
        return code if isinstance(code, int) else 1
    return InvalidRequestError.exit_code if problems else 0


def _out_of_memory(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError, and the CPU allocator's RuntimeError, without importing torch to ask.
    return (
        isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(exc)
    )


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stderr.write(f"sdxl-control: error: {message}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sdxl-control`` command; returns its exit code (see ``sdxl-control --help``)."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {"generate": _generate, "preprocess": _preprocess, "score": _score, "presets": _presets,
                "models": _models_command, "ui": _ui, "batch": _batch}  # fmt: skip
    try:
        _check_inputs(args)
        return commands[args.command](args)
    except KeyboardInterrupt:
        return _fail("interrupted (images not finished were not written)", EXIT_INTERRUPTED, debug)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python would report the failed flush at exit otherwise
        return EXIT_BROKEN_PIPE
    except SdxlControlError as exc:
        return _fail(str(exc), exc.exit_code, debug)
    except Exception as exc:
        if _out_of_memory(exc):
            hint = "try a smaller --size, fewer --num-images, --offload or --vae-tiling"
            what = (str(exc) or type(exc).__name__).splitlines()[0][:200]
            return _fail(f"out of memory ({what}): {hint}", DeviceError.exit_code, debug)
        if debug:
            raise
        return _fail(
            f"unexpected {type(exc).__name__}: {exc}. This is a bug in sdxl-control or a library it uses: run again "
            "with --debug for the traceback, and report it",
            1,
            debug,
        )


if __name__ == "__main__":
    raise SystemExit(main())
