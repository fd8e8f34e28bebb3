"""Command line: ``sdxl-control generate``, ``preprocess`` (see what a condition will see) and ``score`` (identity
similarity of images to a face photo)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidRequestError, SdxlControlError
from .fast import FAST_LEVELS, FastPath
from .generator import GenerationRequest, Generator
from .models import DEFAULT_BASE, DEFAULT_REFINER, default_device_and_dtype
from .presets import available_presets, load_preset
from .recipe import read_recipe
from .vae import DRAFT_DECODER

__all__ = ["main", "build_parser"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TINY_SIZE = (128, 128)


@dataclass(frozen=True)
class _Control:
    preprocessor: str
    model: str
    union_type: str
    tiny_annotator: str | None  # the --tiny stand-in for the preprocessor's model


CONTROLS = {
    "edges": _Control("canny", "diffusers/controlnet-canny-sdxl-1.0", "canny", None),
    "depth": _Control("depth", "diffusers/controlnet-depth-sdxl-1.0", "depth", "depth-estimator"),
    "pose": _Control("pose", "xinsir/controlnet-openpose-sdxl-1.0", "pose", "openpose"),
}
DEFAULT_UNION = "xinsir/controlnet-union-sdxl-1.0"
INSTANTID_REPO = "InstantX/InstantID"
PULID_REPO = "guozinan/PuLID"
IDENTITIES = ("faceid", "instantid", "pulid", "photomaker")
FACEID_SCALE = 0.8


def _size(text: str) -> tuple[int, int]:
    try:
        width, _, height = text.lower().partition("x")
        return int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768, got {text!r}") from None


def _window(text: str) -> tuple[float, float]:
    try:
        start, _, end = text.partition(":")
        return float(start or 0.0), float(end or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"window must look like 0:0.7, got {text!r}") from None


def _add_condition_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ControlNets (several may be combined)")
    for name, control in CONTROLS.items():
        group.add_argument(f"--{name}", metavar="PHOTO", help=f"guide by the {control.preprocessor} map of this photo")
        group.add_argument(f"--{name}-map", metavar="MAP", help=f"guide by this ready {name} map (no preprocessing)")
        group.add_argument(f"--{name}-model", metavar="MODEL", help=f"ControlNet for {name} (default {control.model})")
        group.add_argument(f"--{name}-scale", type=float, default=1.0, metavar="S", help="its strength (default 1)")
        group.add_argument(f"--{name}-window", type=_window, default=(0.0, 1.0), metavar="START:END",
                           help="fractions of the schedule where it acts (default 0:1)")  # fmt: skip
    group.add_argument("--union", nargs="?", const=DEFAULT_UNION, metavar="MODEL",
                       help=f"drive all controls through one ControlNet-Union model (default {DEFAULT_UNION}); "
                       "it takes --union-scale and --union-window")  # fmt: skip
    group.add_argument("--union-scale", type=float, default=1.0, metavar="S")
    group.add_argument("--union-window", type=_window, default=(0.0, 1.0), metavar="START:END")
    refs = parser.add_argument_group("reference images and identity")
    refs.add_argument("--style", metavar="IMG", action="append", default=[], help="style reference (InstantStyle)")
    refs.add_argument("--style-scale", type=float, default=0.8, metavar="S")
    refs.add_argument("--reference", metavar="IMG", action="append", default=[], help="IP-Adapter reference image")
    refs.add_argument("--reference-variant", default="plus", help="sdxl, vit-h, plus, plus-face (default plus)")
    refs.add_argument("--reference-scale", type=float, default=0.6, metavar="S")
    refs.add_argument("--reference-layers", default="all", help="all, style, composition, style+composition")
    refs.add_argument("--face", metavar="IMG", action="append", default=[],
                      help="photo of the person (repeatable: several photos of one person)")  # fmt: skip
    refs.add_argument("--identity", choices=IDENTITIES, default="faceid",
                      help="identity method for --face: faceid (IP-Adapter FaceID, default), instantid, pulid or photomaker")  # fmt: skip
    refs.add_argument("--face-variant", default="plusv2", help="FaceID: faceid or plusv2 (default)")
    refs.add_argument("--identity-scale", "--face-scale", dest="face_scale", type=float, metavar="S",
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
    refs.add_argument("--start-merge", type=float, metavar="F",
                      help="PhotoMaker: fraction of the steps before the identity joins the prompt (default 0.2)")  # fmt: skip
    refs.add_argument("--identitynet-scale", type=float, metavar="S",
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

    tiny: Callable[[str], Path] | None = None
    if args.tiny:
        from .testing import tiny_control_models as tiny
    # name -> (image, preprocessor or None for a ready map, preprocessor options)
    chosen: dict[str, tuple[str, str | None, dict[str, str]]] = {}
    for name, control in CONTROLS.items():
        photo, ready = getattr(args, name), getattr(args, f"{name}_map")
        if photo and ready:
            raise InvalidRequestError(f"give --{name} (a photo) or --{name}-map (a ready map), not both")
        if photo or ready:
            annotator = control.tiny_annotator
            options = {"model": str(tiny(annotator))} if tiny and annotator and photo else {}
            chosen[name] = (photo or ready, control.preprocessor if photo else None, options)
    if args.union:
        if not chosen:
            raise InvalidRequestError("--union needs at least one of --edges, --depth, --pose (or their -map)")
        types = {name: CONTROLS[name].union_type for name in chosen}
        model = str(tiny("controlnet-union")) if tiny and args.union == DEFAULT_UNION else args.union
        return [
            ControlNetUnion(
                model,
                preprocess=tuple(types[n] for n, (_, p, _) in chosen.items() if p),
                preprocess_options={types[n]: o for n, (_, _, o) in chosen.items()},
                scale=args.union_scale, window=args.union_window,
                **{types[n]: image for n, (image, _, _) in chosen.items()},
            )
        ]  # fmt: skip
    conditions = []
    for name, (image, preprocessor, options) in chosen.items():
        model = getattr(args, f"{name}_model") or (str(tiny(f"controlnet-{name}")) if tiny else CONTROLS[name].model)
        conditions.append(
            ControlNet(model, image=image, preprocess=preprocessor, preprocess_options=options,
                       scale=getattr(args, f"{name}_scale"), window=getattr(args, f"{name}_window"))
        )  # fmt: skip
    return conditions


def _reference_conditions(args: argparse.Namespace, preset: Any = None) -> list[Any]:
    from .adapters.ip_adapter import IPAdapter

    if not args.face and (args.face_keypoints or args.score):
        raise InvalidRequestError("--face-keypoints and --score need --face")
    source: dict[str, str] = {}
    if args.tiny and (args.style or args.reference):
        from .testing import tiny_control_models

        source = {"source": str(tiny_control_models("ip-adapter"))}
    conditions: list[Any] = []
    if args.style:
        conditions.append(IPAdapter.style(args.style, scale=args.style_scale, **source))
    if args.reference:
        conditions.append(IPAdapter(args.reference_variant, args.reference, scale=args.reference_scale,
                                    layers=args.reference_layers, **source))  # fmt: skip
    if args.face:
        conditions.append(_identity_condition(args, preset))
    return conditions


def _identity_condition(args: argparse.Namespace, preset: Any) -> Any:
    """The --identity condition for --face: the preset's settings for it, then the flags given."""
    if args.face_keypoints and args.identity != "instantid":
        raise InvalidRequestError("--face-keypoints is for --identity instantid")
    if (args.identity_mode or args.pulid_version) and args.identity != "pulid":
        raise InvalidRequestError("--identity-mode and --pulid-version are for --identity pulid")
    photomaker_flags = (args.trigger, args.photomaker_version, args.photomaker_weights, args.start_merge)
    if any(v is not None for v in photomaker_flags) and args.identity != "photomaker":
        raise InvalidRequestError("--trigger, --photomaker-version, --photomaker-weights and --start-merge are for "
                                  "--identity photomaker")  # fmt: skip
    given: dict[str, Any] = {"scale": args.face_scale, "window": args.face_window, "face_pack": _face_pack(args)}
    if args.identity == "faceid":
        given["scale"] = FACEID_SCALE if args.face_scale is None else args.face_scale
        if args.tiny:
            from .testing import tiny_control_models

            encoder = tiny_control_models("ip-adapter") / "models" / "image_encoder"
            given |= {"source": str(tiny_control_models("ip-adapter-faceid")), "image_encoder": str(encoder)}
        return _condition(preset, "faceid", args.face_variant, args.face, **given)
    if args.identity == "instantid":
        model = args.instantid_model
        if args.tiny and model == INSTANTID_REPO:
            from .testing import tiny_control_models

            model = str(tiny_control_models("instantid"))
        return _condition(preset, "instantid", args.face, keypoints_from=args.face_keypoints, source=model,
                          controlnet_scale=args.identitynet_scale, controlnet_window=args.identitynet_window, **given)  # fmt: skip
    if args.identity == "photomaker":
        weights = args.photomaker_weights
        if args.tiny and weights is None:
            from .testing import tiny_control_models

            weights = str(tiny_control_models("photomaker") / f"photomaker-{args.photomaker_version or 'v2'}.bin")
        return _condition(preset, "photomaker", args.face, version=args.photomaker_version, trigger=args.trigger,
                          weights=weights, start_merge=args.start_merge, **given)  # fmt: skip
    files = {"source": args.pulid_model, "eva": args.eva_model, "parsing": args.face_parsing}
    if args.tiny:
        from .testing import tiny_control_models

        tiny = tiny_control_models("pulid")
        stand_ins = {"source": tiny / "pulid", "eva": tiny / "eva", "parsing": tiny / "facexlib"}
        files = {k: str(stand_ins[k]) if v in (None, PULID_REPO) else v for k, v in files.items()}
    return _condition(preset, "pulid", args.face, version=args.pulid_version, mode=args.identity_mode, **files,
                      **given)  # fmt: skip


def _condition(preset: Any, kind: str, *inputs: Any, **given: Any) -> Any:
    """A condition of ``kind``: the preset's settings for it, overridden by the options actually given."""
    from .adapters import condition_class

    options = {k: v for k, v in given.items() if v is not None}
    if preset is not None:
        return preset.condition(kind, *inputs, **options)
    return condition_class(kind)(*inputs, **options)


def _face_pack(args: argparse.Namespace) -> str:
    from .preprocessors.face import DEFAULT_PACK, IDENTITY_PACK

    if args.face_pack:
        return str(args.face_pack)
    # FaceID and PhotoMaker v2 were trained on buffalo_l's embeddings; InstantID and PuLID on antelopev2's.
    return DEFAULT_PACK if getattr(args, "identity", None) in ("faceid", "photomaker") else IDENTITY_PACK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl-control", description="Controllable SDXL generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images from a prompt (or re-run a PNG's recipe)")
    gen.add_argument("prompt", nargs="?", help="the prompt (optional with --recipe)")
    gen.add_argument("-n", "--negative-prompt", help="negative prompt")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG; image i of a batch gets -i before .png")
    gen.add_argument("--seed", type=int, help="seed of the first image (random if not given)")
    gen.add_argument("--steps", type=int, help="denoising steps over both stages (default 30)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale; <= 1 turns it off (default 5)")
    gen.add_argument("--refiner-switch", type=float, help="fraction of the schedule the base runs before the refiner")
    gen.add_argument("--size", type=_size, help="WIDTHxHEIGHT, multiples of 8 (default 1024x1024)")
    gen.add_argument("--num-images", type=int, help="images in the batch, seeds seed, seed+1, ...")
    gen.add_argument("--scheduler", help="euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddim, unipc, heun, ... or a class")
    gen.add_argument(
        "--preset", choices=available_presets(), help="named recipe (e.g. lightning-4step); explicit options win"
    )
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="stack a LoRA (repeatable)")
    gen.add_argument("--base", help=f"base model: hub id, local folder or .safetensors (default {DEFAULT_BASE})")
    gen.add_argument("--refiner", help=f"refiner model, used with --refiner-switch (default {DEFAULT_REFINER})")
    gen.add_argument("--tiny", action="store_true", help="use built-in tiny random models (offline demo)")
    gen.add_argument("--recipe", type=Path, help="re-run the recipe stored in a PNG written by sdxl-control")
    gen.add_argument("--device", help="cuda, cpu, mps ... (default: cuda if available)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on GPU, fp32 on CPU")
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

    pre = sub.add_parser("preprocess", help="write the control image a preprocessor makes from a photo")
    pre.add_argument("kind", choices=["canny", "depth", "pose", "face"],
                     help="face: the keypoint map InstantID's IdentityNet sees")  # fmt: skip
    pre.add_argument("photo", help="the photo")
    pre.add_argument("-o", "--output", required=True, help="output image (PNG)")
    pre.add_argument("--size", type=_size, help="face: draw the keypoints at this output size (default: the photo's)")
    pre.add_argument("--face-pack", help="face: insightface pack name or folder (default antelopev2)")
    pre.add_argument("--tiny", action="store_true", help="depth/pose: tiny random stand-ins for the annotator models")

    score = sub.add_parser("score", help="identity similarity of images to a face photo (ArcFace cosine)")
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


def _models(args: argparse.Namespace, recipe: dict[str, Any] | None, switch: float | None) -> tuple[str, str | None]:
    if args.tiny or (recipe and args.base is None and recipe["models"]["base"].get("tiny_seed") is not None):
        from .testing import tiny_models

        seed = recipe["models"]["base"].get("tiny_seed", 0) if recipe else 0
        tiny = tiny_models(seed=seed)
        return str(tiny.base), str(tiny.refiner) if switch is not None else None
    base = args.base or (recipe["models"]["base"]["name"] if recipe else DEFAULT_BASE)
    refiner = None
    if switch is not None:
        recorded = (recipe["models"].get("refiner") or {}).get("name") if recipe else None
        refiner = args.refiner or recorded or DEFAULT_REFINER
    return base, refiner


def _output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise InvalidRequestError(f"output must be a .png file (it carries the recipe), got {output}")
    return [path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def _lora(text: str) -> Any:
    from .adapters.lora import LoRA

    path, sep, scale = text.rpartition(":")
    try:
        return LoRA(path, scale=float(scale)) if sep else LoRA(text)
    except ValueError:  # the colon belonged to the path
        return LoRA(text)


def _generate(args: argparse.Namespace) -> int:
    options = _request_options(args)
    preset = load_preset(args.preset) if args.preset else None
    conditions = [
        *(preset.conditions() if preset else []), *map(_lora, args.lora), *_control_conditions(args),
        *_reference_conditions(args, preset),
    ]  # fmt: skip
    if conditions:
        options["conditions"] = tuple(conditions)
    recipe = read_recipe(args.recipe) if args.recipe else None
    if recipe is not None:
        request = GenerationRequest.from_recipe(recipe, **({"prompt": args.prompt} if args.prompt else {}), **options)
    else:
        if not args.prompt:
            raise InvalidRequestError("a prompt is required (or --recipe PNG)")
        settings = dict(preset.settings) if preset else {}
        if args.tiny:
            settings.setdefault("size", TINY_SIZE)
        settings.update(options)
        request = GenerationRequest(args.prompt, **settings)
    base, refiner = _models(args, recipe, request.refiner_switch)
    device, dtype = default_device_and_dtype(args.device, DTYPES[args.dtype] if args.dtype else None)
    # Offloaded models are loaded into CPU memory: loading them onto a small GPU first would not fit.
    generator = Generator.from_pretrained(
        base, refiner, device="cpu" if args.offload else device, dtype=dtype, variant=args.variant,
        unet=preset.unet if preset else None,
    )  # fmt: skip
    if args.offload:
        generator.set_offload(device)
    generator.set_fast_path(FastPath.level(args.fast, fuse_qkv=not args.offload))
    result = generator.run(request, progress_bar=not args.quiet)
    images = result.images
    if args.score:
        _score_into_recipes(images, args.face[0], _face_pack(args))
    if recipe is not None and "num_images" not in options:
        images = [images[recipe["batch_index"]]]  # the batch was re-run only to re-make this image exactly
    for image, path in zip(images, _output_paths(args.output, len(images)), strict=True):
        image.save(path)
        sys.stdout.write(f"{path}  seed={image.recipe['seed']}\n")
    return 0


def _score_into_recipes(images: list[Any], face: str, pack: str) -> None:
    from .preprocessors.face import identity_similarity

    for i, image in enumerate(images):
        try:
            value: float | None = round(identity_similarity(face, image, pack=pack), 4)
        except SdxlControlError as exc:  # a finished image is kept whatever its score
            logging.getLogger(__name__).warning("image %d: no identity similarity (%s)", i, exc)
            value = None
        image.annotate(identity_similarity=value)


def _preprocess(args: argparse.Namespace) -> int:
    from .preprocessors import preprocess

    options: dict[str, Any] = {}
    if args.kind == "face":
        options = {"pack": _face_pack(args), **({"size": args.size} if args.size else {})}
    elif args.size:
        raise InvalidRequestError("--size is for the face keypoint map")
    elif args.tiny and args.kind in ("depth", "pose"):
        from .testing import tiny_control_models

        options = {"model": str(tiny_control_models("depth-estimator" if args.kind == "depth" else "openpose"))}
    preprocess(args.kind, args.photo, **options).save(args.output)
    sys.stdout.write(f"{args.output}\n")
    return 0


def _score(args: argparse.Namespace) -> int:
    from .preprocessors.face import identity_similarity

    for image in args.images:
        sys.stdout.write(f"{image}  {identity_similarity(args.face, image, pack=_face_pack(args)):.4f}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sdxl-control`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "quiet", False):
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    commands = {"generate": _generate, "preprocess": _preprocess, "score": _score}
    try:
        return commands[args.command](args)
    except SdxlControlError as exc:
        sys.stderr.write(f"sdxl-control: error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
