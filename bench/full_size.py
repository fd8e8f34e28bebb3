"""Full-size measurements that need no GPU (issue 25), on SDXL 1.0's architectures with random weights (the configs
that come with the package), each part one command, its table in ``bench/results/<part>-cpu.{json,md}``:

* ``load``: loading base + refiner from diffusers folders and from single files (Stability's layout, as A1111 and
  ComfyUI keep them), ours against ``StableDiffusionXLPipeline.from_pretrained`` / ``from_single_file``, each in a
  fresh process (warm page cache): seconds and peak RSS, against the weights' bytes; then a process that switches
  between two model sets as the page and batch workers do (:class:`~sdxl_control.passes.generator.LastLoaded`);
* ``fp8``: the full-size UNet's resident memory in bf16 and kept in fp8 (parameter bytes and RSS), and a UNet call's
  CPU time both ways;
* ``step-cache``: UNet FLOPs per step (``torch.utils.flop_counter``, 1024x1024 with guidance, on the meta device) and
  CPU seconds per step of a generation at 256x256, for N = 1 (no caching), 2, 3, 5;
* ``lora``: what a rank-128 kohya LoRA on every transformer linear layer of the base UNet (2.2 B weights) costs in
  memory while it acts: peak RSS of a one-step call with it over the same call without it, each in a fresh process;
  and the second of two consecutive jobs with it through one Runner, which keeps it applied (costs a plain call);
* ``families``: every condition family at its published widths, stacked as the presets stack them (see
  ``bench/families.py``);
* ``guidance``: the guidance conditions and regional prompts beside plain CFG in one run (issue 38): UNet calls and
  batch rows per step (PAG with CFG: 3 rows per image, diffusers' ``[uncond, cond, perturbed]``) and CPU seconds per
  step of the base at ``--size``, for plain CFG, PAG, APG, FreeU, two masked regions and two regions by attention
  couple.

    python bench/full_size.py load --work /tmp/full      # about 10 min, 30 GB of disk in --work
    python bench/full_size.py fp8 --size 64 --repeats 1       # memory in bf16; this CPU computes bf16 slowly
    python bench/full_size.py step-cache --dtype fp32 --steps 11
    python bench/full_size.py lora --work /tmp/full      # the base folder of the load part, and a LoRA file beside it
    python bench/full_size.py guidance --dtype fp32 --steps 3 --size 512
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
DTYPE = torch.bfloat16  # what the loads are measured in
# This CPU has no bf16 arithmetic (AVX2 only): timings of UNet calls are taken in fp32 unless asked otherwise.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def status_gib(field: str) -> float:
    """A memory line of /proc/self/status in GiB: ``VmRSS`` (now) or ``VmHWM`` (the peak). The peak is read there,
    not from getrusage's ru_maxrss, which Linux carries across exec: a child started by a large process would
    report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _rss_gib() -> float:
    return status_gib("VmRSS")


def _peak_rss_gib() -> float:
    return status_gib("VmHWM")


def in_fresh_process(script: str, *arguments: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script`` with ``arguments`` in a new Python process and return the JSON object on the last line it
    prints, or ``{"error": the last line of its stderr}``. Memory is measured in fresh processes: in a long one the
    allocator keeps what earlier work freed, and a peak would carry it."""
    run = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, check=False, env=env)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        return {"error": (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1]}
    return json.loads(lines[-1])


def machine() -> dict[str, Any]:
    import diffusers
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"cpu": cpu, "cores": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip


def random_models(stage: Any, dtype: torch.dtype = DTYPE) -> dict[str, Any]:
    """SDXL 1.0's components for ``stage`` with random weights in ``dtype``, built without a float32 copy."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdxl_control.weights.sdxl_configs import sdxl_config_folder

    def filled(module: torch.nn.Module) -> torch.nn.Module:
        module.to(dtype).to_empty(device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
            for name, b in module.named_buffers():
                if name.endswith("position_ids"):  # the text encoders' positions, as they were built
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
                elif b.is_floating_point():
                    b.zero_()
        return module.eval().requires_grad_(False)

    out: dict[str, Any] = {}
    with sdxl_config_folder(stage) as folder:
        with torch.device("meta"):
            out["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            out["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
                if (folder / name).is_dir():
                    out[name] = cls(CLIPTextConfig.from_pretrained(folder / name))
        for name in list(out):
            out[name] = filled(out[name])
        for name in ("tokenizer", "tokenizer_2"):
            if (folder / name).is_dir():
                out[name] = CLIPTokenizer.from_pretrained(folder / name)
    return out


def random_base_generator(dtype: torch.dtype) -> Any:
    """A Generator on SDXL 1.0's base architecture with random weights in ``dtype`` (no files written)."""
    from sdxl_control import Generator
    from sdxl_control.engine.models import ModelSource, StageModels
    from sdxl_control.protocol.conditions import Stage
    from sdxl_control.protocol.text import TextEncoder
    from sdxl_control.weights.sdxl_configs import SDXL_SCHEDULER

    parts = random_models(Stage.BASE, dtype)
    encoders = (TextEncoder(parts["tokenizer"], parts["text_encoder"], "text_encoder"),
                TextEncoder(parts["tokenizer_2"], parts["text_encoder_2"], "text_encoder_2"))  # fmt: skip
    models = StageModels(stage=Stage.BASE, unet=parts["unet"], vae=parts["vae"], text_encoders=encoders,
                         scheduler_config=SDXL_SCHEDULER, requires_aesthetics_score=False,
                         force_zeros_for_empty_prompt=True, source=ModelSource(name="random base", path="-"))  # fmt: skip
    return Generator(models)


def _write_folders(work: Path, single_files: bool = True) -> dict[str, Path]:
    """Base and refiner as diffusers folders and (``single_files``) as single files, written once into ``work``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from sdxl_control.protocol.conditions import Stage
    from sdxl_control.testing.single_file import write_single_file
    from sdxl_control.weights.sdxl_configs import SDXL_SCHEDULER

    paths = {"base": work / "base", "refiner": work / "refiner",
             "base_file": work / "sd_xl_base_random.safetensors",
             "refiner_file": work / "sd_xl_refiner_random.safetensors"}  # fmt: skip
    for stage, cls in ((Stage.BASE, StableDiffusionXLPipeline), (Stage.REFINER, StableDiffusionXLImg2ImgPipeline)):
        name = stage.label
        if not (paths[name] / "model_index.json").exists():
            parts = random_models(stage)
            extra = {"force_zeros_for_empty_prompt": True} if stage == Stage.BASE else {
                "text_encoder": None, "tokenizer": None, "requires_aesthetics_score": True,
                "force_zeros_for_empty_prompt": False}  # fmt: skip
            pipe = cls(**parts, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), **extra)
            pipe.save_pretrained(paths[name], safe_serialization=True)
            del pipe, parts
            gc.collect()
        if single_files and not paths[f"{name}_file"].exists():
            write_single_file(paths[name], paths[f"{name}_file"], dtype=DTYPE)
            gc.collect()
    return paths


def _weights_bytes(path: Path) -> int:
    files = [path] if path.is_file() else list(path.rglob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


def _warm(path: Path) -> None:
    """Read the files once so that every measurement starts from the page cache, not the disk."""
    for f in [path] if path.is_file() else sorted(path.rglob("*.safetensors")):
        with open(f, "rb") as handle:
            while handle.read(1 << 26):
                pass


LOADS: dict[str, Callable[[dict[str, str]], Any]] = {}


def _load(name: str) -> Callable[[Callable[[dict[str, str]], Any]], Callable[[dict[str, str]], Any]]:
    def register(fn: Callable[[dict[str, str]], Any]) -> Callable[[dict[str, str]], Any]:
        LOADS[name] = fn
        return fn

    return register


@_load("ours, folders")
def _ours_folders(p: dict[str, str]) -> Any:
    from sdxl_control import Generator

    return Generator.from_pretrained(p["base"], p["refiner"], device="cpu", dtype=DTYPE)


@_load("diffusers, folders")
def _theirs_folders(p: dict[str, str]) -> Any:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(p["base"], torch_dtype=DTYPE, local_files_only=True)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(p["refiner"], torch_dtype=DTYPE, local_files_only=True)
    return base, refiner


@_load("ours, single files")
def _ours_files(p: dict[str, str]) -> Any:
    from sdxl_control import Generator

    return Generator.from_pretrained(p["base_file"], p["refiner_file"], device="cpu", dtype=DTYPE)


@_load("diffusers, single files")
def _theirs_files(p: dict[str, str]) -> Any:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from sdxl_control.protocol.conditions import Stage
    from sdxl_control.weights.sdxl_configs import sdxl_config_folder

    # The same configs ours reads (diffusers' own default fetches them from the hub).
    with sdxl_config_folder(Stage.BASE) as base_config, sdxl_config_folder(Stage.REFINER) as refiner_config:
        base = StableDiffusionXLPipeline.from_single_file(
            p["base_file"], config=str(base_config), torch_dtype=DTYPE, local_files_only=True
        )
        refiner = StableDiffusionXLImg2ImgPipeline.from_single_file(
            p["refiner_file"], config=str(refiner_config), torch_dtype=DTYPE, local_files_only=True
        )
    return base, refiner


@_load("ours, switching sets")
def _switching(p: dict[str, str]) -> Any:
    from sdxl_control.passes.generator import LastLoaded

    models = LastLoaded(device="cpu", dtype=DTYPE)
    _read_all(models.get(p["base"], p["refiner"]))  # resident, as after a generation
    models.get(p["base_file"], p["refiner_file"])  # another set: the first is let go before it loads
    return models


def _modules(held: Any) -> list[torch.nn.Module]:
    if hasattr(held, "stage_modules"):
        return list(held.stage_modules())
    if hasattr(held, "_generator"):
        return _modules(held._generator)
    return [m for pipe in held for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


def _read_all(held: Any) -> None:
    with torch.no_grad():
        for module in _modules(held):
            for p in module.parameters():
                p.view(-1)[:: max(1, 4096 // p.element_size())].sum()  # one element per 4 KiB page


def _child(name: str, paths: dict[str, str]) -> dict[str, Any]:
    """Run one load in this process (a fresh one) and report it; then read every weight once (what the first
    generation does: memory-mapped weights become resident) and report the peak again."""
    import diffusers  # noqa: F401

    import sdxl_control  # noqa: F401  (imports are not the load's cost)

    before = _rss_gib()
    start = time.perf_counter()
    held = LOADS[name.removesuffix(FIRST)](paths)
    seconds = time.perf_counter() - start
    loaded_peak = _peak_rss_gib()
    _read_all(held)
    return {"seconds": seconds, "rss_before_gib": before, "peak_rss_gib": loaded_peak,
            "touched_peak_rss_gib": _peak_rss_gib(), "held": type(held).__name__}  # fmt: skip


# The first load of a file hashes it (SHA-256, for the recipe and A1111's model hash) and keeps the hash.
FIRST = ", first time (hashes the weights for the recipe, kept after)"
ORDER = ["ours, folders" + FIRST, "ours, folders", "diffusers, folders", "ours, single files" + FIRST,
         "ours, single files", "diffusers, single files", "ours, switching sets"]  # fmt: skip


def part_load(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = _write_folders(work)
    hashes = work / "sdxl-control-cache"  # the file hashes ours keeps, empty at the start
    shutil.rmtree(hashes, ignore_errors=True)
    sets = {
        "folders": paths["base"], "single files": paths["base_file"],
    }  # fmt: skip
    weights = {k: _weights_bytes(v) + _weights_bytes(paths["refiner" if k == "folders" else "refiner_file"])
               for k, v in sets.items()}  # fmt: skip
    rows = []
    for name in ORDER:
        kind = "single files" if "single" in name else "folders"
        for key in ("base", "refiner", "base_file", "refiner_file"):
            if name == "ours, switching sets" or ("file" in key) == (kind == "single files"):
                _warm(paths[key])
        payload = json.dumps({k: str(v) for k, v in paths.items()})
        runs = []
        for _ in range(1 if name.endswith(FIRST) else args.repeats):  # a first time happens once
            run = in_fresh_process(__file__, "_child", name, payload,
                                   env={**os.environ, "SDXL_CONTROL_CACHE": str(hashes)})  # fmt: skip
            if "error" in run:
                break
            runs.append(run)
        if not runs:
            rows.append({"load": name, "error": run["error"]})
            continue
        result = min(runs, key=lambda r: r["seconds"])  # the least disturbed of the runs
        set_bytes = max(weights.values()) if name == "ours, switching sets" else weights[kind]
        growth = result["touched_peak_rss_gib"] - result["rss_before_gib"]
        rows.append({"load": name, "seconds": round(result["seconds"], 1), "weights_gib": round(set_bytes / 2**30, 2),
                     "peak_rss_after_load_gib": round(result["peak_rss_gib"], 2),
                     "peak_rss_weights_read_gib": round(result["touched_peak_rss_gib"], 2),
                     "growth_over_weights": round(growth * 2**30 / set_bytes, 3)})  # fmt: skip
        _say(json.dumps(rows[-1]))
    return {"part": "load", "rows": rows, "dtype": "bf16", "repeats": args.repeats, "note": "each load in a fresh "
            "process (the fastest of --repeats), files in the page "
            "cache; weights are memory-mapped, so the peak is taken again after every weight is read once; growth = "
            "that peak minus RSS after imports, over the weights' bytes; a set is base + refiner"}  # fmt: skip


def part_fp8(args: argparse.Namespace) -> dict[str, Any]:
    from sdxl_control.protocol.conditions import Stage
    from sdxl_control.weights.storage import store_weights

    unet = random_models(Stage.BASE, DTYPES[args.dtype])["unet"]
    gc.collect()

    def bytes_of() -> int:
        return sum(p.numel() * p.element_size() for p in unet.parameters())

    def call() -> float:
        g = torch.Generator().manual_seed(0)
        dtype = DTYPES[args.dtype]
        x = torch.randn(2, 4, args.size // 8, args.size // 8, generator=g).to(dtype)
        h = torch.randn(2, 77, 2048, generator=g).to(dtype)
        added = {"text_embeds": torch.randn(2, 1280).to(dtype), "time_ids": torch.randn(2, 6).to(dtype)}
        start = time.perf_counter()
        with torch.no_grad():
            unet(x, torch.tensor(500.0), encoder_hidden_states=h, added_cond_kwargs=added)
        return time.perf_counter() - start

    rows = []
    for label in (args.dtype, "fp8_e4m3fn"):
        if label != args.dtype:
            store_weights(unet, label)
            gc.collect()
        call()  # warm-up
        seconds = min(call() for _ in range(args.repeats))
        rows.append({"storage": label, "param_gib": round(bytes_of() / 2**30, 3), "rss_gib": round(_rss_gib(), 2),
                     f"unet_call_s_{args.size}": round(seconds, 2)})  # fmt: skip
        _say(json.dumps(rows[-1]))
    ratio = rows[1]["param_gib"] / rows[0]["param_gib"]
    return {"part": "fp8", "rows": rows, "param_ratio": round(ratio, 3), "target": "<= 0.55 x bf16",
            "met": ratio <= 0.55 if args.dtype == "bf16" else None,
            "compute_dtype": args.dtype}  # fmt: skip


def part_step_cache(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from sdxl_control.engine.step_cache import StepCache, cached_steps
    from sdxl_control.weights.sdxl_configs import published_config

    intervals = (1, 2, 3, 5)
    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(published_config("unet_base"))
        x, t = torch.randn(2, 4, 128, 128), torch.tensor(999.0)
        h, added = torch.randn(2, 77, 2048), {"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)}

    def flops(steps: Any, k: int) -> int:
        steps.at(k)
        with FlopCounterMode(display=False) as counter:
            meta(x, t, encoder_hidden_states=h, added_cond_kwargs=added)
        return counter.get_total_flops()

    with cached_steps(meta, StepCache(2, args.branch)) as steps:
        whole, cached = flops(steps, 0), flops(steps, 1)
    gen = random_base_generator(DTYPES[args.dtype])
    rows = []
    for n in intervals:
        stamps: list[float] = []
        gen.generate("a lighthouse at dusk", steps=args.steps, size=(args.size, args.size), seed=1, step_cache=n,
                     step_cache_branch=args.branch, progress=lambda e, stamps=stamps: stamps.append(time.perf_counter()),
                     progress_bar=False)  # fmt: skip
        # Step k's time is stamps[k] - stamps[k-1] (step 0 includes set-up and is left out). Whole and cached steps
        # are timed apart and weighed as every N steps hold them, so the timed window does not flatter any N.
        times = [(k, b - a) for k, (a, b) in enumerate(itertools.pairwise(stamps), start=1)]
        whole_s = statistics.median([t for k, t in times if k % n == 0] or [t for _, t in times])
        cached_s = statistics.median([t for k, t in times if k % n] or [whole_s])
        per_step = (whole_s + (n - 1) * cached_s) / n
        mean_flops = (whole + (n - 1) * cached) / n
        rows.append({"N": n, "unet_tflop_per_step_1024": round(mean_flops / 1e12, 2), "cpu_s_whole_step": round(whole_s, 2),
                     "cpu_s_cached_step": round(cached_s, 2) if n > 1 else None,
                     "flop_reduction": round(whole / mean_flops, 2),
                     f"cpu_s_per_step_{args.size}": round(per_step, 2)})  # fmt: skip
        _say(json.dumps(rows[-1]))
    for row in rows:
        row["time_reduction"] = round(rows[0][f"cpu_s_per_step_{args.size}"] / row[f"cpu_s_per_step_{args.size}"], 2)
    at_3 = next(r for r in rows if r["N"] == 3)["flop_reduction"]
    return {"part": "step-cache", "branch": args.branch, "compute_dtype": args.dtype, "rows": rows, "target": ">= 1.8x fewer UNet FLOPs per step "
            "at N = 3", "met": at_3 >= 1.8, "whole_step_tflop_1024": round(whole / 1e12, 2),
            "cached_step_tflop_1024": round(cached / 1e12, 3)}  # fmt: skip


def _lora_child(paths: dict[str, str], lora: str, through: str = "generator") -> dict[str, Any]:
    """One base-only call, 1 step at 64 px, with the LoRA at ``lora`` or (``""``) without, after a call without it has
    made every weight resident: the call's peak RSS over the RSS before it. ``through="runner"``: the call is the
    second of two consecutive jobs with the LoRA through one :class:`~sdxl_control.jobs.runner.Runner`, which keeps it
    applied from the first (the RSS before it holds what that costs)."""
    from sdxl_control import Generator
    from sdxl_control.adapters.lora import LoRA
    from sdxl_control.jobs.runner import Runner
    from sdxl_control.jobs.spec import JobSpec, resolve

    runner = Runner(device="cpu", dtype=DTYPE)

    def job(conditions: list[Any]) -> Any:
        settings = {"steps": 1, "size": (64, 64), "seed": 1}
        return resolve(JobSpec("a lighthouse", conditions=tuple(conditions), settings=settings,
                               models={"base": paths["base"]}))  # fmt: skip

    if through == "runner":
        gen = runner.generator(job([]))
    else:
        gen = Generator.from_pretrained(paths["base"], device="cpu", dtype=DTYPE)
    gen.base.vae.to(torch.float32)  # this CPU decodes bf16 slowly; the VAE is not what is measured

    def call(conditions: list[Any]) -> None:
        if through == "runner":
            runner.run(job(conditions))
        else:
            gen.generate("a lighthouse", conditions=conditions, steps=1, size=(64, 64), seed=1, progress_bar=False)

    call([])
    if through == "runner":
        call([LoRA(lora, scale=0.8)])  # the first job with it: read and added, and kept applied after
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the RSS now
    before, start = _rss_gib(), time.perf_counter()
    call([LoRA(lora, scale=0.8)] if lora else [])
    return {"seconds": time.perf_counter() - start, "rss_before_gib": before, "peak_rss_gib": _peak_rss_gib()}


def part_lora(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel
    from families import write_kohya_lora  # a script beside this one
    from safetensors import safe_open

    work = Path(args.work)
    paths = {k: str(v) for k, v in _write_folders(work, single_files=False).items()}
    lora = work / "lora_rank128.safetensors"
    if not lora.exists():
        with torch.device("meta"):  # the layers' widths are all the LoRA needs
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(paths["base"]) / "unet"))
        write_kohya_lora(lora, unet, rank=128)
    with safe_open(str(lora), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    patched = sum(shapes[k.replace("lora_down", "lora_up")][0] * v[1] for k, v in shapes.items() if "lora_down" in k)
    factors = sum(v[0] * v[1] for k, v in shapes.items() if ".lora_" in k)
    rows = []
    cases = (("without the LoRA", "", "generator"), ("with the LoRA (rank 128, scale 0.8)", str(lora), "generator"),
             ("the next job with the same LoRA through a Runner (kept applied)", str(lora), "runner"))  # fmt: skip
    for case, file, through in cases:
        result = in_fresh_process(__file__, "_lora", json.dumps(paths), file, through)
        if "error" in result:
            rows.append({"call": case, "error": result["error"]})
            continue
        rows.append({"call": case, "seconds": round(result["seconds"], 1),
                     "rss_before_gib": round(result["rss_before_gib"], 2),
                     "peak_rss_gib": round(result["peak_rss_gib"], 2)})  # fmt: skip
        _say(json.dumps(rows[-1]))
    extra = rows[1].get("peak_rss_gib", float("nan")) - rows[0].get("peak_rss_gib", float("nan"))
    return {"part": "lora", "rows": rows, "patched_weights": patched,
            "patched_weights_bf16_gib": round(patched * 2 / 2**30, 2),
            "dense_deltas_fp32_gib": round(patched * 4 / 2**30, 2),
            "factors_bf16_gib": round(factors * 2 / 2**30, 2), "lora_costs_gib": round(extra, 2),
            "note": "the LoRA's cost is a copy of each weight it patches (to restore it bit for bit) and its factors; "
            "the products are made one weight at a time while it is added. A Runner keeps a LoRA that consecutive "
            "jobs use applied (and that cost held, in rss_before_gib): the next job adds nothing and costs a plain "
            "call"}  # fmt: skip


def _guidance_scenarios() -> dict[str, list[Any]]:
    from sdxl_control.adapters.apg import APG
    from sdxl_control.adapters.freeu import FreeU
    from sdxl_control.adapters.pag import PAG
    from sdxl_control.adapters.regions import Region

    def halves(mode: str) -> list[Any]:
        return [Region("a woman with red hair", box=(0.0, 0.0, 0.5, 1.0), mode=mode),
                Region("a man in a blue coat", box=(0.5, 0.0, 1.0, 1.0), mode=mode)]  # fmt: skip

    return {"plain CFG": [], "PAG (mid)": [PAG()], "APG": [APG()], "FreeU": [FreeU()],
            "2 regions, masked": halves("masked"), "2 regions, attention couple": halves("attention")}  # fmt: skip


def part_guidance(args: argparse.Namespace) -> dict[str, Any]:
    """UNet calls and rows per step, and CPU seconds per step (median of the steps after the first), per scenario."""

    gen = random_base_generator(DTYPES[args.dtype])
    calls: list[int] = []
    hook = gen.base.unet.register_forward_pre_hook(lambda m, a, k: calls.append(a[0].shape[0]), with_kwargs=True)
    rows, plain = [], None
    # A warm-up call first: the first call of a process pays for allocations and thread pools.
    gen.generate("warm-up", steps=2, size=(args.size, args.size), seed=1, progress_bar=False)
    try:
        for name, conditions in _guidance_scenarios().items():
            stamps: list[float] = []
            calls.clear()
            try:
                gen.generate("two people in a park", steps=args.steps, size=(args.size, args.size), seed=1,
                             guidance=6.0, conditions=conditions, progress_bar=False,
                             progress=lambda e, stamps=stamps: stamps.append(time.perf_counter()))  # fmt: skip
            except Exception as exc:  # a scenario this version cannot run is a row saying why
                rows.append({"scenario": name, "error": str(exc)[:120]})
                _say(json.dumps(rows[-1]))
                continue
            per_step = statistics.median(b - a for a, b in itertools.pairwise(stamps))
            plain = plain or per_step
            rows.append({"scenario": name, "unet_calls_per_step": round(len(calls) / args.steps, 2),
                         "rows_per_step": round(sum(calls) / args.steps, 2),
                         f"cpu_s_per_step_{args.size}": round(per_step, 2),
                         "x_plain": round(per_step / plain, 2)})  # fmt: skip
            _say(json.dumps(rows[-1]))
    finally:
        hook.remove()
    return {"part": "guidance", "compute_dtype": args.dtype, "steps": args.steps, "rows": rows,
            "note": "one image; rows per step count the UNet batch (2 = [uncond, cond])"}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [f"# {result['part']} (CPU, full-size SDXL architectures, random weights)", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]  # fmt: skip
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    lines += ["", *(f"- {k}: {v}" for k, v in result.items() if k not in ("rows", "part", "machine"))]
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items())]
    return "\n".join(lines) + "\n"


PARTS = {
    "load": part_load,
    "fp8": part_fp8,
    "step-cache": part_step_cache,
    "lora": part_lora,
    "guidance": part_guidance,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        _say(json.dumps(_child(argv[1], json.loads(argv[2]))))
        return 0
    if argv and argv[0] == "_lora":
        _say(json.dumps(_lora_child(json.loads(argv[1]), *argv[2:])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--work", default="/tmp/sdxl-full", help="where the load part writes its model files")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype of the fp8 and "
                        "step-cache parts (the load part always loads bf16)")  # fmt: skip
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    result = {**PARTS[args.part](args), "machine": machine()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.part}-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{args.part}-cpu.md").write_text(markdown(result))
    _say(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
