"""Side-by-side benchmark: sdxl-control's generator and plain diffusers doing the same work.

Full-size SDXL architectures are built from SDXL 1.0's configs (packaged in ``sdxl_control/configs``) with random
weights (compute does not depend on weight values); ControlNets, IP-Adapter, FaceID and a Lightning-sized LoRA are random files in
the published layouts, loaded through the normal code paths. Each scenario is timed for both implementations in the
same run: median latency of ``--repeats`` runs after a warm-up, it/s, peak GPU memory, and the UNet's model-FLOP
utilisation (UNet FLOPs counted with ``torch.utils.flop_counter`` over wall time).

The scenarios that start from an image (issue 22) are image-to-image at 0.6 and at 0.4, inpainting, the hires fix
at 1.5x with and without VAE tiling (peak memory: the 16 GB target), and the face detailer on one and two faces
(faces placed where a detector would find them: the GPU machine has no insightface), each against diffusers'
image-to-image and inpainting pipelines doing the same passes.

With ``--fast``, every scenario is run a second time with the generator's fast path (:class:`FastPath`) and its
images are compared with the plain path's; ``--profile WORDS`` writes a kernel-level profile of the matching scenario
for both implementations.

GPU (the device tool):   bash bench/device.sh --fast blocks      (see bench/README.md)
CPU smoke, tiny models:  python bench/bench.py --tiny --device cpu --steps 2 --repeats 1 --size 64
Results go to ``bench/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
# sdxl-control must be installed (pip install -e . here, bench/device.sh on the GPU machine): a checkout on sys.path
# lacks sdxl_control.adapters, which only the install's package-dir mapping provides.

from sdxl_control import FastPath, Generator  # noqa: E402
from sdxl_control.adapters.controlnet import ControlNet  # noqa: E402
from sdxl_control.adapters.faceid import FaceID, save_face  # noqa: E402
from sdxl_control.adapters.ip_adapter import VISION_COMMON, VISION_CONFIGS, IPAdapter  # noqa: E402
from sdxl_control.adapters.lora import LoRA  # noqa: E402
from sdxl_control.engine.models import ModelSource, StageModels  # noqa: E402
from sdxl_control.presets import load_preset  # noqa: E402
from sdxl_control.protocol.conditions import Stage  # noqa: E402
from sdxl_control.protocol.fast import FAST_LEVELS  # noqa: E402
from sdxl_control.protocol.text import TextEncoder  # noqa: E402
from sdxl_control.testing import tiny_models, write_tiny_controlnet, write_tiny_taesd  # noqa: E402
from sdxl_control.testing.ip_adapter import TINY_VISION, write_faceid_repo, write_ip_adapter_repo  # noqa: E402
from sdxl_control.weights.sdxl_configs import SDXL_SCHEDULER, sdxl_config_folder  # noqa: E402
from sdxl_control.weights.storage import FP8_MATMUL, WEIGHT_STORAGE  # noqa: E402

PROMPT = "a portrait of an astronaut, studio light"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Row:
    scenario: str
    steps: int
    ours_s: float
    ours_it_s: float
    ours_peak_gib: float | None
    diffusers_s: float | None = None
    diffusers_peak_gib: float | None = None
    ratio: float | None = None  # ours / diffusers: below 1 is faster
    unet_mfu: float | None = None
    fast_s: float | None = None
    fast_ratio: float | None = None  # ours with the fast path / diffusers
    fast_peak_gib: float | None = None
    fast_unet_mfu: float | None = None
    fast_first_call_s: float | None = None  # includes compiling, when the fast path compiles
    fast_max_pixel_diff: int | None = None  # against the plain path's image, 0-255
    note: str = ""


@dataclass
class Setup:
    gen: Generator
    pipes: dict[str, Any]
    files: dict[str, Path]
    control: Any
    reference: Any
    size: int
    steps: int
    device: torch.device
    peak_tflops: float
    unet_tflop_per_step: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    median_s: float
    peak_gib: float | None
    first_call_s: float
    first_result: Any


def _timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> Timing:
    start = time.perf_counter()
    first = fn()  # warm-up: kernels, caches, lazy loads, compiling
    _sync(device)
    first_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return Timing(statistics.median(times), peak, first_s, first)


def _full_stage(stage: Stage, device: torch.device, dtype: torch.dtype) -> StageModels:
    """SDXL 1.0's architectures for ``stage`` from the packaged configs and tokenizers, with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with sdxl_config_folder(stage) as folder, torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = []
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (folder / name).is_dir():
                tokenizer = CLIPTokenizer.from_pretrained(folder / name.replace("text_encoder", "tokenizer"))
                encoders.append(TextEncoder(tokenizer, cls(CLIPTextConfig.from_pretrained(folder / name)), name))
    for module in (unet, vae, *(e.model for e in encoders)):
        module.to(dtype).eval().requires_grad_(False)
    return StageModels(
        stage=stage, unet=unet, vae=vae, text_encoders=tuple(encoders), scheduler_config=SDXL_SCHEDULER,
        requires_aesthetics_score=stage == Stage.REFINER, force_zeros_for_empty_prompt=stage == Stage.BASE,
        source=ModelSource(name=f"random {stage.label} (SDXL 1.0's config)", path="-"),
    )  # fmt: skip


def _lightning_like_lora(unet: Any, path: Path, rank: int) -> Path:
    """A LoRA of ``rank`` on every attention projection, like the published Lightning LoRAs (peft layout)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(s) for s in ("to_q", "to_k", "to_v", "to_out.0")):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.01
            state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
    save_file(state, str(path))
    return path


def build(args: argparse.Namespace, work: Path) -> Setup:
    from diffusers import (
        ControlNetModel,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )
    from PIL import Image

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.tiny:
        tiny = tiny_models(seed=0, root=work / "tiny")
        gen = Generator.from_pretrained(tiny.base, tiny.refiner, device=device, dtype=dtype)
        controlnets = [write_tiny_controlnet(work / f"cn{i}", tiny.base, seed=i) for i in range(2)]
        # (ViT-H vision config, Resampler (width, heads), FaceID LoRA rank, Lightning-like LoRA rank)
        vit_h, resampler, faceid_rank, lora_rank = (
            {"hidden_size": 32, "projection_dim": 16, **TINY_VISION},
            (32, 1),
            4,
            4,
        )
    else:
        gen = Generator(_full_stage(Stage.BASE, device, dtype), _full_stage(Stage.REFINER, device, dtype))
        controlnets = []
        for i in range(2):
            with torch.device(device):
                controlnet = ControlNetModel.from_unet(gen.base.unet, load_weights_from_unet=False)
            controlnet.to(dtype).save_pretrained(work / f"cn{i}")
            controlnets.append(work / f"cn{i}")
        # The published sizes: ViT-H/14, the plus Resampler at 1280 wide with 20 heads, FaceID LoRA rank 128.
        vit_h = {**VISION_COMMON, **VISION_CONFIGS[32], "num_hidden_layers": 32}
        resampler, faceid_rank, lora_rank = (1280, 20), 128, 64
    unet = gen.base.unet
    ip = write_ip_adapter_repo(
        work / "ip", unet, encoders={"models/image_encoder": vit_h}, resampler=resampler, files=("plus-face",)
    )
    faceid = write_faceid_repo(work / "faceid", unet, clip_hidden=vit_h["hidden_size"], rank=faceid_rank, plus=False)
    lora = _lightning_like_lora(unet, work / "lightning.safetensors", rank=lora_rank)
    if args.tiny:
        taesd = write_tiny_taesd(work / "taesd")
    else:
        from diffusers import AutoencoderTiny

        taesd = work / "taesd"
        AutoencoderTiny().save_pretrained(taesd)  # TAESD-XL's published architecture is the class default
    save_face(work / "face.safetensors", torch.nn.functional.normalize(torch.randn(1, 512), dim=-1))
    base, refiner = gen.base, gen.refiner
    assert refiner is not None
    t1, t2 = base.text_encoders

    def scheduler() -> Any:
        return EulerDiscreteScheduler.from_config(base.scheduler_config)

    shared = dict(
        vae=base.vae,
        text_encoder=t1.model,
        text_encoder_2=t2.model,
        tokenizer=t1.tokenizer,
        tokenizer_2=t2.tokenizer,
        unet=base.unet,
    )
    pipes = {
        "base": StableDiffusionXLPipeline(**shared, scheduler=scheduler()),
        "refiner": StableDiffusionXLImg2ImgPipeline(
            vae=refiner.vae, text_encoder=None, text_encoder_2=refiner.text_encoders[0].model, tokenizer=None,
            tokenizer_2=refiner.text_encoders[0].tokenizer, unet=refiner.unet, scheduler=scheduler(),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        ),
    }  # fmt: skip
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    size = args.size
    rng = torch.Generator().manual_seed(0)
    control = Image.fromarray((torch.rand(size, size, 3, generator=rng) * 255).to(torch.uint8).numpy())
    setup = Setup(gen, pipes, {"cn0": controlnets[0], "cn1": controlnets[1], "ip": ip, "faceid": faceid, "lora": lora,
                               "face": work / "face.safetensors", "taesd": taesd}, control, control, size, args.steps, device, args.peak_tflops)  # fmt: skip
    setup.extra["shared"] = shared
    setup.unet_tflop_per_step = _unet_tflop(gen, size, device, dtype)
    return setup


def _unet_call(gen: Generator, size: int, device: torch.device, dtype: torch.dtype) -> Callable[[], Any]:
    """One base UNet forward on a classifier-free-guidance batch of 2, as a step runs it."""
    unet = gen.base.unet
    latent = size // 8
    sample = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    added = {"text_embeds": torch.randn(2, gen.base.text_encoders[-1].model.config.projection_dim, device=device, dtype=dtype),
             "time_ids": torch.randn(2, 6, device=device, dtype=dtype)}  # fmt: skip
    t = torch.tensor(999.0, device=device)

    @torch.no_grad()
    def call() -> Any:
        return unet(sample, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)

    return call


def _unet_tflop(gen: Generator, size: int, device: torch.device, dtype: torch.dtype) -> float:
    """FLOPs of one base UNet forward on a classifier-free-guidance batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _unet_call(gen, size, device, dtype)()
    return counter.get_total_flops() / 1e12


def unet_forward(setup: Setup, repeats: int) -> dict[str, Any]:
    """The UNet alone (CFG batch 2): median time of ``10 * repeats`` forwards and its model-FLOP utilisation."""
    call = _unet_call(setup.gen, setup.size, setup.device, setup.gen.base.dtype)
    timing = _timed(lambda: [call() for _ in range(10)], repeats, setup.device)
    seconds = timing.median_s / 10
    mfu = round(setup.unet_tflop_per_step / seconds / setup.peak_tflops, 3) if setup.device.type == "cuda" else None
    return {"ms": round(seconds * 1000, 2), "mfu": mfu}


def _weight_mib(model: torch.nn.Module) -> float:
    """Bytes a model's weights hold: a float8 weight's 8-bit values and scales, not the dtype it reports."""
    held = (t for p in model.parameters() for t in ((p.qdata, p.scale) if hasattr(p, "qdata") else (p,)))  # type: ignore[attr-defined]
    return round(sum(t.numel() * t.element_size() for t in held) / 2**20, 2)


def weight_storage(setup: Setup, storages: list[str], repeats: int, plain_ms: float) -> list[dict[str, Any]]:
    """The UNet alone (CFG batch 2) with its weights kept in each storage: ms per forward, the weights' MiB, speed-up
    over the plain models; ``"fp8_matmul"`` also with its transformer blocks compiled, as torchao's float8 layers are
    meant to run. Run last: fp8 rounds the weights for good. A storage this device cannot run is a row saying why."""
    gen = setup.gen
    rows: list[dict[str, Any]] = [{"storage": "compute dtype", "compiled": False, "ms": plain_ms,
                                   "weights_mib": _weight_mib(gen.base.unet), "speedup": 1.0}]  # fmt: skip
    for storage in storages:
        fast_paths = [None, FastPath(compile="blocks", fuse_qkv=False)] if storage == FP8_MATMUL else [None]
        for fast in fast_paths:
            row: dict[str, Any] = {"storage": storage, "compiled": fast is not None}
            try:
                gen.set_weight_storage(storage)
                gen.set_fast_path(fast)
                timing = unet_forward(setup, repeats)
                row.update(timing, weights_mib=_weight_mib(gen.base.unet), speedup=round(plain_ms / timing["ms"], 3))
            except Exception as exc:  # noqa: BLE001 - one storage failing must not lose the run's other rows
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            finally:
                gen.set_fast_path(None)
            rows.append(row)
            print(f"weight storage {storage}{' compiled' if fast else ''}: {row}", flush=True)  # noqa: T201
        gen.set_weight_storage(None)
    return rows


def _diffusers_generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def scenarios(
    s: Setup,
) -> list[tuple[str, int, Callable[[], Any], Callable[[], Any] | None, Callable[[], Any] | None, str]]:
    """(name, steps, ours, diffusers, diffusers teardown, note) — diffusers set-up happens inside its callable once."""
    from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionXLControlNetPipeline

    n, size, gen = s.steps, s.size, s.gen
    common = dict(size=(size, size), seed=0, progress_bar=False)
    pipe, refiner = s.pipes["base"], s.pipes["refiner"]
    d_common = dict(height=size, width=size, num_inference_steps=n, guidance_scale=5.0)
    nets = [
        ControlNetModel.from_pretrained(s.files[f"cn{i}"], torch_dtype=gen.base.dtype).to(s.device) for i in range(2)
    ]
    cn1 = StableDiffusionXLControlNetPipeline(**s.extra["shared"], controlnet=nets[0], scheduler=pipe.scheduler)
    cn2 = StableDiffusionXLControlNetPipeline(
        **s.extra["shared"], controlnet=MultiControlNetModel(nets), scheduler=pipe.scheduler
    )
    for p in (cn1, cn2):
        p.set_progress_bar_config(disable=True)
    ip_condition = IPAdapter("plus-face", s.reference, source=str(s.files["ip"]))
    face_condition = FaceID("faceid", embeddings=str(s.files["face"]), source=str(s.files["faceid"]))
    from safetensors.torch import load_file

    ids = load_file(str(s.files["face"]))["id_embeds"][None]
    face_embeds = torch.cat([torch.zeros_like(ids), ids]).to(s.device, gen.base.dtype)

    def handoff(p: Any, **kw: Any) -> Any:
        latents = p(
            PROMPT, denoising_end=0.8, output_type="latent", generator=_diffusers_generator(), **d_common, **kw
        ).images
        return refiner(
            PROMPT,
            image=latents,
            denoising_start=0.8,
            num_inference_steps=n,
            guidance_scale=5.0,
            generator=_diffusers_generator(),
        )

    def with_ip(p: Any, weight: str, encoder: str | None) -> None:
        p.load_ip_adapter(str(s.files["ip"] if encoder else s.files["faceid"]), subfolder="sdxl_models" if encoder else None,
                          weight_name=weight, image_encoder_folder=encoder)  # fmt: skip

    lightning = load_preset("lightning-4step").settings
    saved_scheduler: list[Any] = []
    taesd: list[Any] = []

    def draft_diffusers(lora: bool, preview: bool) -> Callable[[], Any]:
        """diffusers doing a 4-step Lightning draft: LoRA fused once (or a distilled UNet: none), trailing Euler."""

        def call() -> Any:
            from diffusers import AutoencoderTiny, EulerDiscreteScheduler

            if not saved_scheduler:  # the scenario's first call sets the pipeline up, outside the timed calls
                if lora:
                    pipe.load_lora_weights(str(s.files["lora"]), adapter_name="lightning")
                    pipe.fuse_lora()
                saved_scheduler.append(pipe.scheduler)
                pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
            if preview and not taesd:
                taesd.append(AutoencoderTiny.from_pretrained(s.files["taesd"], torch_dtype=gen.base.dtype).to(s.device))
            saved_vae = pipe.vae
            pipe.vae = taesd[0] if preview else saved_vae
            try:
                return pipe(PROMPT, height=size, width=size, num_inference_steps=4, guidance_scale=0.0,
                            generator=_diffusers_generator())  # fmt: skip
            finally:
                pipe.vae = saved_vae

        return call

    def draft_teardown(lora: bool) -> Callable[[], None]:
        def teardown() -> None:
            if lora and "lightning" in pipe.get_active_adapters():
                pipe.unfuse_lora()
                pipe.unload_lora_weights()
            if saved_scheduler:
                pipe.scheduler = saved_scheduler.pop()

        return teardown

    def ip_diffusers() -> Any:
        if getattr(pipe.unet, "encoder_hid_proj", None) is None:
            with_ip(pipe, "ip-adapter-plus-face_sdxl_vit-h.safetensors", "models/image_encoder")
        return pipe(PROMPT, ip_adapter_image=s.reference, generator=_diffusers_generator(), **d_common)

    def faceid_diffusers() -> Any:
        if getattr(pipe.unet, "encoder_hid_proj", None) is None:
            with_ip(pipe, "ip-adapter-faceid_sdxl.bin", None)
        return pipe(
            PROMPT, ip_adapter_image_embeds=[face_embeds[:, None]], generator=_diffusers_generator(), **d_common
        )

    def stack_diffusers() -> Any:
        if getattr(cn2.unet, "encoder_hid_proj", None) is None:
            with_ip(cn2, "ip-adapter-plus-face_sdxl_vit-h.safetensors", "models/image_encoder")
        return handoff(cn2, image=[s.control, s.control], ip_adapter_image=s.reference)

    stack = [ControlNet(str(s.files["cn0"]), image=s.control, scale=0.6, window=(0.0, 0.7)),
             ControlNet(str(s.files["cn1"]), image=s.control, scale=0.8), ip_condition, face_condition]  # fmt: skip
    started = _start_scenarios(s, common, d_common)
    return [
        ("base", n, lambda: gen.generate(PROMPT, steps=n, **common),
         lambda: pipe(PROMPT, generator=_diffusers_generator(), **d_common), None, ""),
        ("base + refiner (switch 0.8)", n, lambda: gen.generate(PROMPT, steps=n, refiner_switch=0.8, **common),
         lambda: handoff(pipe), None, ""),
        ("+ 1 ControlNet", n, lambda: gen.generate(PROMPT, steps=n, conditions=stack[:1], **common),
         lambda: cn1(PROMPT, image=s.control, generator=_diffusers_generator(), **d_common), None, ""),
        ("+ 2 ControlNets", n, lambda: gen.generate(PROMPT, steps=n, conditions=stack[:2], **common),
         lambda: cn2(PROMPT, image=[s.control, s.control], generator=_diffusers_generator(), **d_common), None, ""),
        ("+ IP-Adapter plus-face", n, lambda: gen.generate(PROMPT, steps=n, conditions=[ip_condition], **common),
         ip_diffusers, pipe.unload_ip_adapter, ""),
        ("+ FaceID", n, lambda: gen.generate(PROMPT, steps=n, conditions=[face_condition], **common),
         faceid_diffusers, lambda: (pipe.unload_ip_adapter(), pipe.unload_lora_weights()), "diffusers: FaceID LoRA unfused (peft)"),
        ("Lightning 4 steps (LoRA)", 4, lambda: gen.generate(PROMPT, conditions=[LoRA(str(s.files["lora"]))], **common, **lightning),
         draft_diffusers(lora=True, preview=False), draft_teardown(lora=True), "ours fuses and removes the LoRA per call"),
        ("Lightning 4 steps (UNet)", 4, lambda: gen.generate(PROMPT, **common, **lightning),
         draft_diffusers(lora=False, preview=False), draft_teardown(lora=False), "a distilled UNet checkpoint: nothing to fuse"),
        ("Lightning 4 steps (UNet), TAESD preview", 4,
         lambda: gen.generate(PROMPT, decoder=str(s.files["taesd"]), **common, **lightning),
         draft_diffusers(lora=False, preview=True), draft_teardown(lora=False), "decoded by a tiny autoencoder instead of the VAE"),
        ("portrait stack: refiner + 2 CN + IP + FaceID", n,
         lambda: gen.generate(PROMPT, steps=n, refiner_switch=0.8, conditions=stack, **common),
         stack_diffusers, cn2.unload_ip_adapter, "diffusers side without FaceID (it cannot mix image and embedding IP inputs)"),
        *started,
    ]  # fmt: skip


class _FixedFaces:
    """Stands in for insightface's analysis in the detailer scenarios (the GPU machine has no insightface): the faces
    are where they are put, so the scenarios time the repaints, the detailer's cost; detection is a CPU ONNX run
    either way."""

    count = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def detect(self, image: Any, confidence: float) -> list[Any]:
        import numpy as np

        from sdxl_control.preprocessors.face import FaceInfo

        width, height = image.size
        side = width // 6
        centres = (
            [(width // 2, height // 3)]
            if self.count == 1
            else [(width // 3, height // 3), (2 * width // 3, height // 3)]
        )
        return [FaceInfo((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), np.zeros((5, 2), np.float32), 0.9,
                         np.ones(512, np.float32), image, image.size) for cx, cy in centres]  # fmt: skip


def _start_scenarios(s: Setup, common: dict[str, Any], d_common: dict[str, Any]) -> list[Any]:
    """Images that start from an image (issue 22): image-to-image, inpainting, the hires fix with and without VAE
    tiling, and the face detailer on one and two faces — each against diffusers' pipelines doing the same work."""
    from contextlib import contextmanager

    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
    from PIL import Image

    import sdxl_control.preprocessors.face as face_module
    from sdxl_control.passes.detailer import FaceDetailer, face_mask

    n, size, gen = s.steps, s.size, s.gen
    pipe = s.pipes["base"]
    img2img = StableDiffusionXLImg2ImgPipeline(**s.extra["shared"], scheduler=pipe.scheduler)
    inpaint = StableDiffusionXLInpaintPipeline(**s.extra["shared"], scheduler=pipe.scheduler)
    for p in (img2img, inpaint):
        p.set_progress_bar_config(disable=True)
    photo = s.control
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    big = round(size * 1.5 / 8) * 8
    m = max(n, 5)  # a strength of 0.4 runs int(0.4 * steps) steps: at least 2 in a smoke run

    def hires_diffusers(tiled: bool) -> Any:
        draft = pipe(PROMPT, generator=_diffusers_generator(), **d_common).images[0]
        if tiled:
            img2img.vae.enable_tiling()
        try:
            return img2img(PROMPT, image=draft.resize((big, big), Image.Resampling.LANCZOS), strength=0.5,
                           height=big, width=big, num_inference_steps=n, guidance_scale=5.0,
                           generator=_diffusers_generator())  # fmt: skip
        finally:
            img2img.vae.disable_tiling()

    @contextmanager
    def faces(count: int) -> Any:
        saved = face_module.FaceAnalyzer
        face_module.FaceAnalyzer = type("Faces", (_FixedFaces,), {"count": count})  # type: ignore[misc]
        try:
            yield
        finally:
            face_module.FaceAnalyzer = saved

    def detailed(count: int) -> Any:
        with faces(count):
            return gen.generate(PROMPT, steps=n, detailer=FaceDetailer(face_pack="fixed", steps=m), **common)

    def detailed_diffusers(count: int) -> Any:
        image = pipe(PROMPT, generator=_diffusers_generator(), **d_common).images[0]
        for face in type("Faces", (_FixedFaces,), {"count": count})().detect(image, 0.3):
            image = inpaint(PROMPT, image=image, mask_image=face_mask(face.bbox, image.size), padding_mask_crop=32,
                            strength=0.4, generator=_diffusers_generator(), **{**d_common, "num_inference_steps": m}
                            ).images[0]  # fmt: skip
        return image

    start = {"init_image": photo, **common}
    return [
        ("img2img 0.6", int(n * 0.6), lambda: gen.generate(PROMPT, steps=n, strength=0.6, **start),
         lambda: img2img(PROMPT, image=photo, strength=0.6, generator=_diffusers_generator(), **d_common), None, ""),
        ("img2img 0.4", int(m * 0.4), lambda: gen.generate(PROMPT, steps=m, strength=0.4, **start),
         lambda: img2img(PROMPT, image=photo, strength=0.4, generator=_diffusers_generator(),
                         **{**d_common, "num_inference_steps": m}), None, "the detailer's strength"),
        ("inpaint (mask, regular UNet)", n, lambda: gen.generate(PROMPT, steps=n, mask=mask, **start),
         lambda: inpaint(PROMPT, image=photo, mask_image=mask, strength=1.0, generator=_diffusers_generator(),
                         **d_common), None, ""),
        ("hires 1.5x", n + int(n * 0.5), lambda: gen.generate(PROMPT, steps=n, hires_scale=1.5, **common),
         lambda: hires_diffusers(False), None, f"{size}² then {big}² at strength 0.5"),
        ("hires 1.5x, VAE tiling", n + int(n * 0.5),
         lambda: gen.generate(PROMPT, steps=n, hires_scale=1.5, vae_tiling=True, **common), lambda: hires_diffusers(True),
         None, "peak memory: the 16 GB target"),
        ("face detailer, 1 face", n + int(m * 0.4), lambda: detailed(1), lambda: detailed_diffusers(1), None,
         "faces placed, not detected (no insightface on the GPU machine)"),
        ("face detailer, 2 faces", n + 2 * int(m * 0.4), lambda: detailed(2), lambda: detailed_diffusers(2), None,
         "diffusers: its inpainting with padding_mask_crop per face"),
    ]  # fmt: skip


def _mfu(setup: Setup, name: str, steps: int, seconds: float) -> float | None:
    if setup.device.type != "cuda":
        return None
    # The UNet runs on a CFG batch of 2 per step; Lightning runs unguided, batch 1.
    forwards = steps * (0.5 if "Lightning" in name else 1.0)
    return round(setup.unet_tflop_per_step * forwards / seconds / setup.peak_tflops, 3)


def _pixels(result: Any) -> Any:
    import numpy as np

    image = result.images[0] if hasattr(result, "images") else result
    return np.asarray(image, dtype=np.int16)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def memory_options(setup: Setup, repeats: int) -> list[dict[str, Any]]:
    """The memory options, measured. "GiB the call needs" excludes what earlier scenarios left on the device
    (ControlNets, image encoders, diffusers' copies): for the base scenario it is the stage models on the device plus
    the activation peak, with the models resident and with model offloading; for the VAE decode (at the bench size
    and twice it, whole and tiled) it is the peak above what is resident."""
    from sdxl_control.engine.vae import decode_latents

    gen = setup.gen
    rows = []
    stage_bytes = sum(p.numel() * p.element_size() for x in gen.stage_modules() for p in x.parameters())

    def run() -> Any:
        return gen.generate(PROMPT, steps=setup.steps, size=(setup.size, setup.size), seed=0, progress_bar=False)

    for offload in (False, True):
        device = gen.device
        if offload:
            gen.set_offload(device)
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            resident = _allocated(device)
            timing = _timed(run, repeats, setup.device)
        finally:
            gen.set_offload(None)
        need = None
        if timing.peak_gib is not None:
            need = round(timing.peak_gib - (resident - (0 if offload else stage_bytes)) / 2**30, 2)
        what = f"base {setup.steps} steps, {'model offload' if offload else 'models resident'}"
        rows.append({"what": what, "size": setup.size, "s": round(timing.median_s, 4), "peak_gib": need})
        print(f"{what}: {rows[-1]['s']}s, needs {need} GiB", flush=True)  # noqa: T201
    for size in (setup.size, 2 * setup.size):
        latents = torch.randn(1, 4, size // 8, size // 8, device=setup.device, dtype=setup.gen.base.dtype)
        for tiled in (False, True):
            resident = _allocated(setup.device)
            timing = _timed(lambda: decode_latents(gen.base.vae, latents, tiled=tiled), repeats, setup.device)  # noqa: B023
            peak = None if timing.peak_gib is None else round(timing.peak_gib - resident / 2**30, 2)
            what = f"VAE decode {'tiled' if tiled else 'whole'}"
            rows.append({"what": what, "size": size, "s": round(timing.median_s, 4), "peak_gib": peak})
            print(f"{what} {size}²: {rows[-1]['s']}s, needs {peak} GiB", flush=True)  # noqa: T201
    return rows


def _profile(setup: Setup, name: str, ours: Callable[[], Any], theirs: Callable[[], Any] | None, out: Path) -> None:
    """Kernel-level tables for one run of each implementation: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    sort = "cuda_time_total" if setup.device.type == "cuda" else "cpu_time_total"
    parts = []
    for label, fn in (("sdxl-control", ours), ("diffusers", theirs)):
        if fn is None:
            continue
        fn()
        _sync(setup.device)
        with profile(activities=activities) as prof:
            fn()
            _sync(setup.device)
        parts.append(f"## {label}: {name}\n\n" + prof.key_averages().table(sort_by=sort, row_limit=40))
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    (out / f"profile_{slug}.txt").write_text("\n\n".join(parts))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers

    import sdxl_control

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        setup = build(args, Path(tmp))
        chosen = [sc for sc in scenarios(setup) if _chosen(sc[0], args)]
        rows, plain_pixels = [], []
        for name, steps, ours, theirs, teardown, note in chosen:
            if args.profile and any(p.lower() in name.lower() for p in args.profile):
                _profile(setup, name, ours, None if args.ours_only else theirs, out)
            timing = _timed(ours, args.repeats, setup.device)
            plain_pixels.append(_pixels(timing.first_result))
            row = Row(name, steps, round(timing.median_s, 4), round(steps / timing.median_s, 2),
                      timing.peak_gib and round(timing.peak_gib, 2), note=note)  # fmt: skip
            row.unet_mfu = _mfu(setup, name, steps, timing.median_s)
            if theirs is not None and not args.ours_only:
                try:
                    d = _timed(theirs, args.repeats, setup.device)
                    row.diffusers_s, row.diffusers_peak_gib = round(d.median_s, 4), d.peak_gib and round(d.peak_gib, 2)
                    row.ratio = round(timing.median_s / d.median_s, 3)
                finally:
                    if teardown is not None:
                        teardown()
            rows.append(row)
            print(f"{name}: ours {row.ours_s}s, diffusers {row.diffusers_s}s", flush=True)  # noqa: T201
        forward = {"plain": unet_forward(setup, args.repeats)}
        fast = FastPath.level(args.fast, compile_mode=args.compile_mode, compile_backend=args.compile_backend)
        if fast is not None:
            # A second pass, so that the fast path is applied (and compiled) once for all scenarios.
            setup.gen.set_fast_path(fast)
            try:
                for row, pixels, (name, steps, ours, *_rest) in zip(rows, plain_pixels, chosen, strict=True):
                    timing = _timed(ours, args.repeats, setup.device)
                    row.fast_s, row.fast_first_call_s = round(timing.median_s, 4), round(timing.first_call_s, 2)
                    row.fast_peak_gib = timing.peak_gib and round(timing.peak_gib, 2)
                    row.fast_ratio = row.diffusers_s and round(timing.median_s / row.diffusers_s, 3)
                    row.fast_unet_mfu = _mfu(setup, name, steps, timing.median_s)
                    row.fast_max_pixel_diff = int(abs(_pixels(timing.first_result) - pixels).max())
                    print(f"{name}: ours fast {row.fast_s}s (first call {row.fast_first_call_s}s)", flush=True)  # noqa: T201
                forward["fast"] = unet_forward(setup, args.repeats)
            finally:
                setup.gen.set_fast_path(None)
        memory = memory_options(setup, args.repeats) if not (args.only or args.quick) else []
        storage = weight_storage(setup, args.storage, args.repeats, forward["plain"]["ms"])
    return {
        "device": torch.cuda.get_device_name() if setup.device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "sdxl_control": sdxl_control.__version__,
        "dtype": args.dtype, "size": args.size, "tiny": args.tiny, "repeats": args.repeats,
        "unet_tflop_per_step_cfg": round(setup.unet_tflop_per_step, 3), "peak_tflops": args.peak_tflops,
        "fast_path": None if fast is None else asdict(fast),
        "unet_forward": forward,
        "rows": [asdict(r) for r in rows],
        "memory": memory,
        "weight_storage": storage,
    }  # fmt: skip


# --quick: what one device call of at most 8 minutes can hold (issue 25), each scenario plain and on the fast path.
QUICK = ("base", "+ 1 ControlNet", "Lightning 4 steps (UNet)", "portrait stack: refiner + 2 CN + IP + FaceID")


def _chosen(name: str, args: argparse.Namespace) -> bool:
    if args.quick:
        return name in QUICK
    return not args.only or any(o.lower() in name.lower() for o in args.only)


# The issue's targets on an H100 at 1024²: (what, scenario, steps, measure, limit).
TARGETS = [
    ("base 30 steps", "base", 30, "seconds", 0.8),
    ("Lightning 4-step draft (LoRA)", "Lightning 4 steps (LoRA)", 4, "seconds", 0.10),
    ("Lightning 4-step draft (UNet)", "Lightning 4 steps (UNet)", 4, "seconds", 0.10),
    ("Lightning 4-step draft (UNet), TAESD preview", "Lightning 4 steps (UNet), TAESD preview", 4, "seconds", 0.10),
    ("portrait stack / base, same steps", "portrait stack: refiner + 2 CN + IP + FaceID", 30, "vs_base", 2.0),
    ("UNet model-FLOP utilisation (forward, CFG batch 2)", "base", 30, "mfu", 0.60),
    # Issue 22: the detailer's extra time over the base, per face, against one img2img pass at its strength (0.4);
    # the hires fix at 1.5x with VAE tiling within 16 GB.
    ("face detailer, extra per face / img2img 0.4", "face detailer, 1 face", 42, "detailer", 1.0),
    ("hires 1.5x with VAE tiling, peak GiB", "hires 1.5x, VAE tiling", 45, "peak", 16.0),
]


def _best(row: dict[str, Any], key: str) -> float | None:
    values = [v for v in (row[key], row.get(f"fast_{key}")) if v is not None]
    if not values:
        return None
    return max(values) if key == "unet_mfu" else min(values)


def targets(result: dict[str, Any]) -> list[str]:
    rows = {r["scenario"]: r for r in result["rows"]}
    lines = ["| target | limit | measured (best of plain and fast path) | met |", "|---|---|---|---|"]
    for what, scenario, steps, measure, limit in TARGETS:
        row, base = rows.get(scenario), rows.get("base")
        value: float | None = None
        if row is not None and row["steps"] == steps and result["size"] == 1024:
            if measure == "seconds":
                value = _best(row, "s")
            elif measure == "mfu":  # the UNet alone, as the target means it
                values = [f["mfu"] for f in result["unet_forward"].values() if f["mfu"] is not None]
                value = max(values) if values else None
            elif measure == "peak":
                value = row["ours_peak_gib"]
            elif measure == "detailer":
                if base is not None and base["steps"] == 30 and "img2img 0.4" in rows:
                    extra = _best(row, "s") - _best(base, "s")  # type: ignore[operator]
                    value = round(extra / _best(rows["img2img 0.4"], "s"), 2)  # type: ignore[operator]
            elif base is not None and base["steps"] == steps:
                value = round(_best(row, "s") / _best(base, "s"), 2)  # type: ignore[operator]
        met = "n/a" if value is None else ("yes" if (value >= limit if measure == "mfu" else value <= limit) else "no")
        lines.append(f"| {what} | {'>=' if measure == 'mfu' else '<='} {limit} | {value} | {met} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    fast = result.get("fast_path")
    alone = ", ".join(f"{path} {f['ms']} ms (MFU {f['mfu']})" for path, f in result["unet_forward"].items())
    head = (f"Device: {result['device']} · torch {result['torch']} · diffusers {result['diffusers']} · "
            f"{result['dtype']} · {result['size']}² · median of {result['repeats']} after warm-up"
            f"{' · TINY smoke models' if result['tiny'] else ''}\n\n"
            f"UNet forward (CFG batch 2): {result['unet_tflop_per_step_cfg']} TFLOP; MFU against {result['peak_tflops']} TFLOP/s; "
            f"the UNet alone: {alone}.\n"
            f"Fast path: {fast if fast else 'not run'}.\n\n")  # fmt: skip
    lines = ["| scenario | steps | ours (s) | ours fast (s) | diffusers (s) | ours/diffusers | fast/diffusers | ours it/s | "
             "peak GiB ours / fast / diffusers | UNet MFU ours / fast | fast first call (s) | fast vs plain max px diff | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['scenario']} | {r['steps']} | {r['ours_s']} | {r['fast_s']} | {r['diffusers_s']} | {r['ratio']} | "
                     f"{r['fast_ratio']} | {r['ours_it_s']} | {r['ours_peak_gib']} / {r['fast_peak_gib']} / {r['diffusers_peak_gib']} | "
                     f"{r['unet_mfu']} / {r['fast_unet_mfu']} | {r['fast_first_call_s']} | {r['fast_max_pixel_diff']} | {r['note']} |")  # fmt: skip
    memory = ["| option | size | time (s) | GiB the call needs on the device |", "|---|---|---|---|"]
    memory += [f"| {m['what']} | {m['size']}² | {m['s']} | {m['peak_gib']} |" for m in result.get("memory", [])]
    storage = ["| weights kept as | compiled | UNet forward (ms) | speed-up | UNet weights (MiB) | MFU | error |",
               "|---|---|---|---|---|---|---|"]  # fmt: skip
    storage += [f"| {w['storage']} | {w['compiled']} | {w.get('ms')} | {w.get('speedup')} | {w.get('weights_mib')} | "
                f"{w.get('mfu')} | {w.get('error', '')} |" for w in result.get("weight_storage", [])]  # fmt: skip
    return (head + "\n".join(lines) + "\n\nTargets (issue 5):\n\n" + "\n".join(targets(result))
            + "\n\nMemory (small GPUs):\n\n" + "\n".join(memory)
            + "\n\nWeight storage (issue 25; the UNet alone, CFG batch 2; MFU against the 16-bit peak):\n\n"
            + "\n".join(storage) + "\n")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a CPU smoke run of the same code")
    parser.add_argument("--only", nargs="*", help="run the scenarios whose names contain these words")
    parser.add_argument("--ours-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="base 30 steps, Lightning 4 steps, one ControlNet and "
                        "the portrait stack, diffusers beside, 2 repeats, the fast path at 'layout' unless --fast "
                        "names another: one device call of at most 8 minutes")  # fmt: skip
    parser.add_argument(
        "--fast",
        choices=list(FAST_LEVELS),
        default="off",
        help="also time ours with a fast-path level: " + "; ".join(f"{k}: {v}" for k, v in FAST_LEVELS.items()),
    )
    parser.add_argument("--storage", nargs="*", choices=list(WEIGHT_STORAGE), default=None,
                        help="also time the UNet alone with its weights kept so (fp8_matmul plain and compiled), "
                        "last; --quick: fp8_e4m3fn and fp8_matmul")  # fmt: skip
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--profile", nargs="*", help="write profile_<scenario>.txt for the scenarios matching these")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense fp16/bf16 peak (H100 SXM: 989)")
    parser.add_argument("--workdir", default=None, help="where the random checkpoint files are written")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for <name>.json and <name>.md")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.fast = "layout" if args.fast == "off" else args.fast
        args.storage = ["fp8_e4m3fn", FP8_MATMUL] if args.storage is None else args.storage
    args.storage = args.storage or []
    result = run(args)
    out = Path(args.out)
    name = args.name or ("smoke" if args.tiny else f"{result['device'].replace(' ', '_')}_{args.dtype}_{args.size}")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
