"""The fast path gives the plain path's images up to rounding, with every condition stacked, and undoes exactly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import FusedAttnProcessor2_0
from PIL import Image

from sdxl_control import FastPath, GenerationRequest, Generator, InvalidRequestError
from sdxl_control.adapters.controlnet import ControlNet, load_controlnet
from sdxl_control.adapters.faceid import FaceID
from sdxl_control.adapters.ip_adapter import IPAdapter
from sdxl_control.adapters.lora import LoRA
from sdxl_control.testing import write_tiny_controlnet
from sdxl_control.testing.ip_adapter import write_tiny_faceid_repo, write_tiny_ip_adapter_repo
from sdxl_control.testing.lora import write_tiny_lora
from sdxl_control.weights.patches import WeightPatch

from .test_faceid import fake_face

# float32 on the CPU: fused products and NHWC convolutions sum in another order, nothing more.
ROUNDING = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def gen(tiny) -> Generator:
    return Generator.from_pretrained(tiny.base, tiny.refiner, device="cpu")


@pytest.fixture(scope="module")
def portrait_request(tiny, tmp_path_factory) -> GenerationRequest:
    folder = tmp_path_factory.mktemp("fast")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    conditions = (
        LoRA(str(write_tiny_lora(folder / "lora.safetensors", tiny.base, "kohya", seed=7)), window=(0.25, 0.75)),
        ControlNet(str(write_tiny_controlnet(folder / "cn", tiny.base, seed=3)), image=photo, window=(0.0, 0.5)),
        IPAdapter("plus", photo, source=str(write_tiny_ip_adapter_repo(folder / "ip", tiny.base)), scale=0.6),
        FaceID("faceid", fake_face(3), source=str(write_tiny_faceid_repo(folder / "faceid", tiny.base))),
    )
    return GenerationRequest("a portrait", size=(64, 64), steps=4, refiner_switch=0.5, seed=1, conditions=conditions)


def _controlnet_of(gen: Generator, request: GenerationRequest) -> torch.nn.Module:
    condition = next(c for c in request.conditions if isinstance(c, ControlNet))
    return load_controlnet(condition.model, union=False, unet=gen.base.unet)  # the cached instance calls use


def _state(gen: Generator) -> dict[str, tuple[torch.Tensor, int, bool]]:
    out = {}
    for stage in ("base", "refiner"):
        for name, p in getattr(gen, stage).unet.named_parameters():
            out[f"{stage}.{name}"] = (p.detach().clone(), id(p), p.is_contiguous())
    return out


@pytest.mark.parametrize(
    "fast",
    [
        FastPath(),
        FastPath(channels_last=False),
        # aot_eager traces exactly what inductor would get (fullgraph: a graph break fails) without a C++ build.
        FastPath(compile="unet", compile_backend="aot_eager"),
        # Inductor itself, as users run it (CPU kernels here: needs a C++ compiler). Blocks are compiled only this way:
        # an aot_eager pass over them would trace the same graphs again.
        pytest.param(
            FastPath(compile="blocks"),
            marks=pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU backend needs g++"),
        ),
    ],
    ids=["layout+fused", "fused", "compiled-unet", "inductor-blocks"],
)
def test_fast_path_equals_plain_path_with_everything_stacked(gen, portrait_request, fast):
    plain = gen.run(portrait_request, progress_bar=False)
    unconditioned = gen.run(GenerationRequest("a portrait", size=(64, 64), steps=4, refiner_switch=0.5, seed=1),
                            progress_bar=False)  # fmt: skip
    assert (plain.latents - unconditioned.latents).abs().max() > 100 * ROUNDING["atol"]  # the conditions matter
    before = _state(gen)
    processors = {s: dict(getattr(gen, s).unet.attn_processors) for s in ("base", "refiner")}
    controlnet = _controlnet_of(gen, portrait_request)
    plain_processors = dict(controlnet.attn_processors)
    gen.set_fast_path(fast)
    try:
        assert gen.fast_path == fast
        fast_result = gen.run(portrait_request, progress_bar=False)
        if fast.fuse_qkv:  # the ControlNet the call ran got the fast path too
            assert all(isinstance(p, FusedAttnProcessor2_0) for p in controlnet.attn_processors.values())
        again = gen.run(portrait_request, progress_bar=False)
    finally:
        gen.set_fast_path(None)
    gen.run(portrait_request, progress_bar=False)  # a plain call takes the ControlNet back to plain
    assert all(controlnet.attn_processors[n] is p for n, p in plain_processors.items())
    assert not any(hasattr(m, "to_qkv") for m in controlnet.modules())
    torch.testing.assert_close(fast_result.latents, plain.latents, **ROUNDING)
    assert torch.equal(again.latents, fast_result.latents)
    assert np.abs(np.asarray(fast_result.images[0], np.int16) - np.asarray(plain.images[0], np.int16)).max() <= 1
    after = _state(gen)
    assert after.keys() == before.keys()
    for name, (value, identity, contiguous) in before.items():
        assert torch.equal(after[name][0], value) and after[name][1:] == (identity, contiguous), name
    for stage, saved in processors.items():
        unet = getattr(gen, stage).unet
        assert all(unet.attn_processors[n] is p for n, p in saved.items())
        assert not any(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for m in unet.modules())
        assert all(getattr(m, "_compiled_call_impl", None) is None for m in unet.modules())


def test_fused_projections_are_views_that_weight_patches_reach(gen):
    unet = gen.base.unet
    gen.set_fast_path(FastPath(channels_last=False))
    try:
        fused = [m for m in unet.modules() if hasattr(m, "to_qkv")]
        cross = [m for m in unet.modules() if hasattr(m, "to_kv")]
        assert fused and cross and len(fused) == len(cross)
        assert all(isinstance(p, FusedAttnProcessor2_0) for p in unet.attn_processors.values())
        attn = fused[0]
        rows = attn.to_q.weight.shape[0]
        assert attn.to_q.weight.data_ptr() == attn.to_qkv.weight.data_ptr()
        name = next(n for n, m in unet.named_modules() if m is attn)
        delta = torch.full_like(attn.to_k.weight, 0.25)
        before = attn.to_qkv.weight[rows : 2 * rows].clone()
        patch = WeightPatch(unet, {f"{name}.to_k.weight": delta})
        try:
            torch.testing.assert_close(attn.to_qkv.weight[rows : 2 * rows], before + delta)
        finally:
            patch.restore()
        assert torch.equal(attn.to_qkv.weight[rows : 2 * rows], before)
    finally:
        gen.set_fast_path(None)


def test_replacing_and_failing_fast_paths_leave_nothing(gen, monkeypatch):
    before = _state(gen)
    gen.set_fast_path(FastPath())
    gen.set_fast_path(FastPath(channels_last=False))  # replaces: the first is undone before the second applies
    gen.set_fast_path(None)
    import sdxl_control.protocol.fast as fast_module

    def broken(module, fast):
        raise RuntimeError("compiler unavailable")

    monkeypatch.setattr(fast_module, "_compile", broken)
    with pytest.raises(RuntimeError, match="compiler unavailable"):
        gen.set_fast_path(FastPath(compile="blocks"))
    assert gen.fast_path is None
    after = _state(gen)
    for name, (value, identity, contiguous) in before.items():
        assert torch.equal(after[name][0], value) and after[name][1:] == (identity, contiguous), name
    with pytest.raises(ValueError, match="compile must be"):
        FastPath(compile="everything")  # type: ignore[arg-type]


def test_vae_tiling_decodes_tile_by_tile_and_is_recorded(gen):
    run = dict(size=(256, 192), steps=2, seed=1, progress_bar=False)
    decoded: list[tuple[int, ...]] = []
    hook = gen.base.vae.decoder.register_forward_pre_hook(lambda m, args: decoded.append(tuple(args[0].shape[-2:])))
    try:
        whole = gen.generate("x", **run)
        assert decoded == [(24, 32)]
        decoded.clear()
        tiled = gen.generate("x", vae_tiling=True, **run)
    finally:
        hook.remove()
    # The tiny VAE's tiles are 16 latents (128 px) with a quarter overlap: six tiles, none larger.
    assert len(decoded) == 6 and all(h <= 16 and w <= 16 for h, w in decoded)
    assert torch.equal(whole.latents, tiled.latents)  # only the decode differs
    a, b = (np.asarray(r.images[0], np.int16) for r in (whole, tiled))
    # Each tile normalises with its own group statistics and seams are blended: close, not equal.
    assert 0 < np.abs(a - b).mean() < 0.2 * a.std()
    assert tiled.recipes[0]["vae_tiling"] is True and whole.recipes[0]["vae_tiling"] is False
    assert gen.base.vae.use_tiling is False  # the request did not switch the model's own setting


def test_offload_keeps_one_model_on_the_device_at_a_time(gen, portrait_request, monkeypatch):
    """On this CPU-only machine the moves cannot save memory; what is checked is that every stage model reaches the
    device just before it runs and leaves right after, one at a time, and that images do not change."""
    plain = gen.run(portrait_request, progress_bar=False)
    names = {id(m): n for n, m in _stage_modules(gen).items()}
    moves: list[tuple[str, str]] = []
    original_to = torch.nn.Module.to

    def recording_to(module, *args, **kwargs):
        if id(module) in names:
            moves.append((names[id(module)], str(args[0] if args else kwargs.get("device"))))
        return original_to(module, *args, **kwargs)

    gen.set_offload("cpu")
    try:
        assert gen.device == torch.device("cpu")
        with pytest.raises(InvalidRequestError, match="fuse_qkv=False"):
            gen.set_fast_path(FastPath())
        monkeypatch.setattr(torch.nn.Module, "to", recording_to)
        offloaded = gen.run(portrait_request, progress_bar=False)
        monkeypatch.undo()
    finally:
        gen.set_offload(None)
    torch.testing.assert_close(offloaded.latents, plain.latents, rtol=0, atol=0)
    # "cpu" is both the storage and here the compute device: which move is which follows from their order.
    resident: set[str] = set()
    order = []
    for name, _ in moves:
        if name in resident:
            resident.remove(name)
        else:
            resident.add(name)
            order.append(name)
        assert len(resident) <= 2 and (len(resident) < 2 or all(".text" in n for n in resident)), moves
    assert not resident
    assert order == ["base.text", "base.text2", "refiner.text2", "base.unet", "refiner.unet", "refiner.vae"]


def _stage_modules(gen: Generator) -> dict[str, torch.nn.Module]:
    out: dict[str, torch.nn.Module] = {}
    for label, models in (("base", gen.base), ("refiner", gen.refiner)):
        out[f"{label}.unet"], out[f"{label}.vae"] = models.unet, models.vae
        for encoder in models.text_encoders:
            out[f"{label}.{'text2' if encoder.component == 'text_encoder_2' else 'text'}"] = encoder.model
    return out
