"""Every condition family at its published widths, on the CPU (issue 25, part 1): SDXL 1.0's base and refiner
(random weights, the packaged configs) with each family's checkpoint written in its published layout and size —
ControlNet and ControlNet-Union, IP-Adapter sdxl (ViT-bigG) / vit-h / plus / plus-face (ViT-H), FaceID and FaceID
PlusV2, InstantID (IdentityNet + the 1280-wide, 20-head Resampler), PuLID v1 and v1.1 (the full EVA02-L/14 at
336 px), PhotoMaker v1 and v2, a kohya LoRA of rank 128 on every transformer projection, a Lightning-style full
UNet — then the portrait and style-transfer presets' stacks. Each row runs ``--steps`` steps at ``--size`` (64 px:
this CPU computes bf16 slowly) in bf16, the VAEs in fp32, through the normal code paths, each row in a fresh
process, and reports the seconds before the first step (encoders, face analysis), seconds per step, and the peak RSS
of the row's process and its excess over the plain base row's. Faces are analysed with the real SCRFD detector from
``../shared`` and a stand-in recognition model (no ArcFace weights are reachable here); the photos are
``../shared``'s.

    python bench/families.py --work /tmp/sdxl-full      # reuses the load part's folders; about 40 min here
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from full_size import (  # noqa: E402 (a script beside it)
    DTYPE,
    HERE,
    _peak_rss_gib,
    _say,
    _write_folders,
    in_fresh_process,
    machine,
    markdown,
)
from PIL import Image

SHARED = HERE.parent.parent / "shared"
PROMPT = "a portrait of an astronaut, studio light"


def _insightface_root(work: Path) -> Path:
    from sdxl_control.testing.faces import write_tiny_recognition_onnx

    root = work / "insightface"
    for name, detector, recognition in (("antelopev2", "scrfd_10g_bnkps", "glintr100"),
                                        ("buffalo_l", "det_10g", "w600k_r50")):  # fmt: skip
        pack = root / "models" / name
        if not pack.exists():
            pack.mkdir(parents=True)
            shutil.copy(SHARED / "models" / "scrfd_500m_bnkps.onnx", pack / f"{detector}.onnx")
            write_tiny_recognition_onnx(pack / f"{recognition}.onnx")
    return root


def write_kohya_lora(path: Path, unet: Any, rank: int) -> Path:
    """A kohya LoRA on every linear layer of the UNet's transformers, named by the original (SGM) blocks."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    out: dict[str, torch.Tensor] = {}

    def sgm(name: str) -> str:
        parts = name.split(".")
        if parts[0] == "down_blocks":
            block = f"input_blocks_{3 * int(parts[1]) + int(parts[3]) + 1}_1"
        elif parts[0] == "up_blocks":
            block = f"output_blocks_{3 * int(parts[1]) + int(parts[3])}_1"
        else:  # mid_block.attentions.0.<rest>
            return "lora_unet_middle_block_1_" + "_".join(parts[3:])
        return f"lora_unet_{block}_" + "_".join(parts[4:])

    for name, module in unet.named_modules():
        if ".attentions." in name and isinstance(module, torch.nn.Linear):
            key = sgm(name)
            out[f"{key}.lora_down.weight"] = (torch.randn(rank, module.in_features, generator=g) * 0.01).to(DTYPE)
            out[f"{key}.lora_up.weight"] = (torch.randn(module.out_features, rank, generator=g) * 0.01).to(DTYPE)
            out[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(out, str(path))
    return path


def _in_bf16(target: Path) -> None:
    """Rewrite the float32 tensors of the files at ``target`` in bf16, as published half-precision files are: the
    factories write float32, and the full set would not fit this machine's disk."""
    from safetensors.torch import load_file, save_file

    def half(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: half(v) for k, v in value.items()}
        return value.to(DTYPE) if torch.is_tensor(value) and value.dtype == torch.float32 else value

    for file in [target] if target.is_file() else sorted(target.rglob("*")):
        if file.suffix == ".safetensors":
            state = half(load_file(str(file)))
            save_file({k: v.contiguous() for k, v in state.items()}, str(file.with_suffix(".tmp")))
        elif file.suffix in (".bin", ".pt"):
            torch.save(half(torch.load(file, map_location="cpu", weights_only=True)), file.with_suffix(".tmp"))
        else:
            continue
        file.with_suffix(".tmp").replace(file)


def family_files(work: Path) -> dict[str, Path]:
    """Where :func:`write_files` puts each family's files."""
    root = work / "families"
    files = {name: root / name for name in ("cn", "union", "ip", "faceid", "instantid", "pulid", "eva", "parsing")}
    files.update(photomaker_v1=root / "photomaker-v1.bin", photomaker_v2=root / "photomaker-v2.bin",
                 lora=root / "lora_rank128.safetensors")  # fmt: skip
    # A full-UNet checkpoint as SDXL-Lightning publishes one (a UNet state dict alone): the base's own UNet file is
    # one, and spares 5 GB of disk.
    files["lightning"] = work / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    return files


def write_files(work: Path, unet: Any) -> dict[str, Path]:
    """Every family's files at the published sizes, written once into ``work/families``."""
    from sdxl_control.adapters.ip_adapter import VISION_COMMON, VISION_CONFIGS
    from sdxl_control.testing.annotators import write_controlnet
    from sdxl_control.testing.instantid import write_instantid_repo
    from sdxl_control.testing.ip_adapter import write_faceid_repo, write_ip_adapter_repo
    from sdxl_control.testing.photomaker import write_photomaker_checkpoint
    from sdxl_control.testing.pulid import write_eva_clip_checkpoint, write_face_parser, write_pulid_checkpoint

    files = family_files(work)
    steps: list[tuple[Path, Callable[[], Any]]] = [
        (files["cn"], lambda: write_controlnet(files["cn"], unet, seed=1)),
        (files["union"], lambda: write_controlnet(files["union"], unet, seed=2, union=True, promax=True)),
        (files["ip"], lambda: write_ip_adapter_repo(files["ip"], unet, resampler=(1280, 20), encoders={
            "models/image_encoder": {**VISION_COMMON, **VISION_CONFIGS[32], "num_hidden_layers": 32},
            "sdxl_models/image_encoder": {**VISION_COMMON, **VISION_CONFIGS[48], "num_hidden_layers": 48}})),
        (files["faceid"], lambda: write_faceid_repo(files["faceid"], unet, clip_hidden=1280, rank=128)),
        (files["instantid"], lambda: write_instantid_repo(files["instantid"], unet, resampler=(1280, 20))),
        (files["pulid"], lambda: (write_pulid_checkpoint(files["pulid"] / "pulid_v1.bin", unet, "v1"),
                                  write_pulid_checkpoint(files["pulid"] / "pulid_v1.1.safetensors", unet, "v1.1"))),
        (files["eva"], lambda: write_eva_clip_checkpoint(files["eva"] / "EVA02_CLIP_L_336_psz14_s6B.pt")),
        (files["parsing"], lambda: write_face_parser(files["parsing"])),
        (files["photomaker_v1"], lambda: write_photomaker_checkpoint(files["photomaker_v1"], unet, "v1")),
        (files["photomaker_v2"], lambda: write_photomaker_checkpoint(files["photomaker_v2"], unet, "v2")),
        (files["lora"], lambda: write_kohya_lora(files["lora"], unet, rank=128)),
    ]  # fmt: skip
    for target, write in steps:
        if not target.exists():
            _say(f"writing {target.name}")
            try:
                write()
                _in_bf16(target)
            except BaseException:  # never leave half a file that a later run would take for done
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
                raise
            gc.collect()
    return files


def rows(files: dict[str, Path], faces: Path) -> dict[str, Callable[[], tuple[list[Any], dict[str, Any]]]]:
    """Each row: the conditions and request settings it runs."""
    from sdxl_control.adapters.controlnet import ControlNet, ControlNetUnion
    from sdxl_control.adapters.faceid import FaceID
    from sdxl_control.adapters.instantid import InstantID
    from sdxl_control.adapters.ip_adapter import IPAdapter
    from sdxl_control.adapters.lora import LoRA
    from sdxl_control.adapters.photomaker import PhotoMaker
    from sdxl_control.adapters.pulid import PuLID

    photo = str(SHARED / "images" / "obama.jpg")
    edges = Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256, 3), np.uint8))
    face = {"face_root": str(faces)}
    ip = str(files["ip"])
    pulid = dict(source=str(files["pulid"]), eva=str(files["eva"]), parsing=str(files["parsing"]), **face)
    return {
        "base": lambda: ([], {}),
        "base + refiner": lambda: ([], {"refiner_switch": 0.5}),
        "ControlNet": lambda: ([ControlNet(str(files["cn"]), image=edges, scale=0.6)], {}),
        "ControlNet-Union (ProMax)": lambda: ([ControlNetUnion(str(files["union"]), canny=edges)], {}),
        "IP-Adapter sdxl (ViT-bigG)": lambda: ([IPAdapter("sdxl", photo, source=ip)], {}),
        "IP-Adapter vit-h": lambda: ([IPAdapter("vit-h", photo, source=ip)], {}),
        "IP-Adapter plus": lambda: ([IPAdapter("plus", photo, source=ip)], {}),
        "IP-Adapter plus-face": lambda: ([IPAdapter("plus-face", photo, source=ip)], {}),
        "FaceID": lambda: ([FaceID("faceid", photo, source=str(files["faceid"]), **face)], {}),
        "FaceID PlusV2": lambda: ([FaceID("plusv2", photo, source=str(files["faceid"]),
                                          image_encoder=str(files["ip"] / "models" / "image_encoder"), **face)], {}),
        "InstantID": lambda: ([InstantID(photo, source=str(files["instantid"]), **face)], {}),
        "PuLID v1": lambda: ([PuLID(photo, version="v1", **pulid)], {}),
        "PuLID v1.1": lambda: ([PuLID(photo, version="v1.1", **pulid)], {}),
        "PhotoMaker v1": lambda: ([PhotoMaker(photo, weights=str(files["photomaker_v1"]), **face)], {"prompt": "a photo of a man img"}),
        "PhotoMaker v2": lambda: ([PhotoMaker(photo, weights=str(files["photomaker_v2"]), **face)], {"prompt": "a photo of a man img"}),
        "kohya LoRA rank 128": lambda: ([LoRA(str(files["lora"]), scale=0.8)], {}),
        "portrait stack (PuLID v1.1 + pose ControlNet)": lambda: (
            [PuLID(photo, version="v1.1", **pulid), ControlNet(str(files["cn"]), image=edges, scale=0.4)], {}),
        "style-transfer stack (IP-Adapter style layers + canny ControlNet)": lambda: (
            [IPAdapter("sdxl", photo, source=ip, layers="style"), ControlNet(str(files["cn"]), image=edges, scale=0.6)], {}),
    }  # fmt: skip


LOAD = "load base + refiner (folders)"
LIGHTNING = "Lightning full UNet (trailing, CFG 1)"


def _row(
    gen: Any, name: str, make: Callable[[], tuple[list[Any], dict[str, Any]]], args: argparse.Namespace
) -> dict[str, Any]:
    stamps: list[float] = []
    start = time.perf_counter()
    try:
        conditions, settings = make()
        settings = {"prompt": PROMPT, **settings}
        result = gen.generate(settings.pop("prompt"), conditions=conditions, steps=args.steps,
                              size=(args.size, args.size), seed=1, progress_bar=False,
                              progress=lambda e: stamps.append(time.perf_counter()), **settings)  # fmt: skip
    except Exception as exc:  # a failure at the real widths is the finding: recorded, the run goes on
        traceback.print_exc()
        return {"row": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    total = time.perf_counter() - start
    step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {"row": name, "before_first_step_s": round(stamps[0] - start - step, 1), "s_per_step": round(step, 1),
            "total_s": round(total, 1), "peak_rss_gib": round(_peak_rss_gib(), 2),
            "finite": bool(torch.isfinite(result.latents).all())}  # fmt: skip


def _vae_in_fp32(gen: Any) -> None:
    # This CPU has no bf16 arithmetic: a bf16 VAE decode takes minutes even at 64 px, and says nothing about the
    # families. The VAEs decode in fp32 (330 MB each); everything else stays bf16.
    for stage in (gen.base, gen.refiner):
        if stage is not None:
            stage.vae.to(torch.float32)


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """One row in this fresh process: the generator loaded, then the row's call; its peak RSS is the process's."""
    from sdxl_control import Generator

    work = Path(args.work)
    paths = _write_folders(work, single_files=False)
    files = family_files(work)  # written by the parent
    start = time.perf_counter()
    if args.row == LOAD:
        Generator.from_pretrained(paths["base"], paths["refiner"], device="cpu", dtype=DTYPE)
        return {
            "row": LOAD,
            "total_s": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(_peak_rss_gib(), 2),
        }
    if args.row == LIGHTNING:
        gen = Generator.from_pretrained(paths["base"], device="cpu", dtype=DTYPE, unet=str(files["lightning"]))

        def make() -> tuple[list[Any], dict[str, Any]]:
            return [], {"guidance": 1.0, "scheduler": "euler_trailing"}
    else:
        gen = Generator.from_pretrained(paths["base"], paths["refiner"], device="cpu", dtype=DTYPE)
        make = rows(files, _insightface_root(work))[args.row]
    loaded = time.perf_counter() - start
    _vae_in_fp32(gen)
    return {**_row(gen, args.row, make, args), "load_s": round(loaded, 1)}


def _in_own_process(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Each row runs in a fresh process, so that its peak RSS is its own."""
    result = in_fresh_process(__file__, "--row", name, "--work", args.work, "--steps", str(args.steps),
                              "--size", str(args.size))  # fmt: skip
    return {"row": name, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/sdxl-full")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--only", nargs="*", default=None, help="rows whose names contain any of these words")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--row", help=argparse.SUPPRESS)  # the child process of one row
    args = parser.parse_args(argv)
    if args.row:
        _say(json.dumps(_child(args)))
        return 0
    from sdxl_control import Generator

    work = Path(args.work)
    paths = _write_folders(work, single_files=False)
    faces = _insightface_root(work)
    files = family_files(work)
    if not all(path.exists() for path in files.values()):  # the writers need the real UNet
        gen = Generator.from_pretrained(paths["base"], paths["refiner"], device="cpu", dtype=DTYPE)
        write_files(work, gen.base.unet)
        del gen
        gc.collect()
    names = [LOAD, *rows(files, faces), LIGHTNING]
    table = []
    for name in [n for n in names if not args.only or any(w in n for w in args.only)]:
        table.append(_in_own_process(name, args))
        _say(json.dumps(table[-1]))
    earlier = Path(args.out) / "families-cpu.json"
    if args.only and earlier.exists():  # the rows run again replace theirs in the last full table
        redone = {r["row"]: r for r in table}
        table = [redone.pop(r["row"], r) for r in json.loads(earlier.read_text())["rows"]] + list(redone.values())
    base = next((r for r in table if r["row"] == "base" and "peak_rss_gib" in r), None)
    for row in table:
        if base is not None and row["row"] != LOAD and "peak_rss_gib" in row:
            row["over_base_gib"] = round(row["peak_rss_gib"] - base["peak_rss_gib"], 2)
    result = {"part": "families", "rows": table, "dtype": "bf16", "steps": args.steps, "size": args.size,
              "failed": [r["row"] for r in table if "error" in r], "machine": machine(),
              "note": "each row ran in a fresh process that loaded base + refiner (the Lightning row: base with "
              "the Lightning UNet); peak_rss_gib is that process's peak, over_base_gib its excess over the "
              "plain base row's"}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "families-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "families-cpu.md").write_text(markdown(result))
    _say(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
