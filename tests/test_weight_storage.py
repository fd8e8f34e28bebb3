"""fp8 weight storage: the same layers and numbers as diffusers' ``enable_layerwise_casting``; a generator kept in
fp8 makes the image of its weights rounded to fp8 by hand, exactly; weight patches add at the compute precision and
round once, and come off exactly; switching it off leaves the layers in the compute dtype with no hooks; a ControlNet
follows its UNet; the recipe, the CLI, presets and job files carry it. fp8 matmuls ("fp8_matmul") are torchao's own
quantization of the same linear layers, exactly, patched and restored exactly, refused clearly where they cannot run."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_control import FastPath, GenerationRequest, Generator, InvalidRequestError
from sdxl_control.weights.patches import WeightPatch
from sdxl_control.weights.storage import compute_dtype, store_weights, stored_as, stored_layers

PROMPT = "a portrait of an astronaut, studio light"
RUN = dict(steps=4, size=(64, 64), seed=3, refiner_switch=0.5, negative_prompt="blurry", progress_bar=False)
FP8 = torch.float8_e4m3fn


@pytest.fixture()
def fresh(tiny):
    """A generator of its own: fp8 rounding cannot be undone, so the session's generator is never stored."""
    return Generator.from_pretrained(tiny.base, tiny.refiner, device="cpu")


def _round_by_hand(unet):
    for layer in stored_layers(unet):
        for p in layer.parameters(recurse=False):
            p.data = p.data.to(FP8).to(p.dtype)


def _inputs(unet):
    g = torch.Generator().manual_seed(0)
    c = unet.config
    return dict(
        sample=torch.randn(2, 4, 8, 8, generator=g),
        timestep=torch.tensor(500.0),
        encoder_hidden_states=torch.randn(2, 77, c.cross_attention_dim, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(2, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, generator=g),
                           "time_ids": torch.randn(2, 6, generator=g)},
    )  # fmt: skip


def test_same_layers_and_numbers_as_diffusers_layerwise_casting(generator):
    from diffusers.hooks.layerwise_casting import _is_layerwise_casting_active

    theirs, ours = copy.deepcopy(generator.base.unet), copy.deepcopy(generator.base.unet)
    theirs.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=torch.float32)
    undo = store_weights(ours, "fp8_e4m3fn")
    assert _is_layerwise_casting_active(theirs)
    hooked = {n for n, m in theirs.named_modules() if getattr(m, "_diffusers_hook", None) is not None
              and m._diffusers_hook.get_hook("layerwise_casting") is not None}  # fmt: skip
    names = {id(m): n for n, m in ours.named_modules()}
    assert {names[id(m)] for m in stored_layers(ours)} == hooked and len(hooked) > 50
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a.float(), b.float()), name  # the same values kept in 8 bits
    with torch.no_grad():
        expected, got = theirs(**_inputs(theirs)).sample, ours(**_inputs(ours)).sample
    assert torch.equal(expected, got)
    undo()


def test_a_stored_generator_makes_the_image_of_its_weights_rounded_by_hand(fresh, tiny):
    by_hand = Generator.from_pretrained(tiny.base, tiny.refiner, device="cpu")
    for stage in (by_hand.base, by_hand.refiner):
        _round_by_hand(stage.unet)
    before = fresh.generate(PROMPT, **RUN)
    fresh.set_weight_storage("fp8_e4m3fn")
    assert fresh.weight_storage == "fp8_e4m3fn" and fresh.base.dtype == torch.float32
    stored = fresh.generate(PROMPT, **RUN)
    assert torch.equal(stored.latents, by_hand.generate(PROMPT, **RUN).latents)
    assert not torch.equal(stored.latents, before.latents)
    assert stored.recipes[0]["weight_storage"] == "fp8_e4m3fn" and "weight_storage" not in before.recipes[0]
    bytes_of = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert bytes_of(fresh.base.unet) < 0.3 * bytes_of(by_hand.base.unet)  # fp32 -> 8 bits, norms kept
    fresh.set_weight_storage(None)
    assert {p.dtype for p in fresh.base.unet.parameters()} == {torch.float32}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in fresh.base.unet.modules())
    assert compute_dtype(fresh.base.unet) is None
    # the values stay rounded: the by-hand generator's image, now without any casting
    assert torch.equal(fresh.generate(PROMPT, **RUN).latents, stored.latents)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_branches_on_a_stored_generator_equal_rounding_by_hand(fresh, tiny, tmp_path, masked):
    """An IP-Adapter's branch reads the layer's output projection: kept in fp8, it reads the rounded weights. A mask
    takes the processor path that projects the branches apart from the layer's own call."""
    from sdxl_control.adapters.ip_adapter import IPAdapter
    from sdxl_control.testing.ip_adapter import write_tiny_ip_adapter_repo

    repo = write_tiny_ip_adapter_repo(tmp_path / "ip", tiny.base)
    style = Image.fromarray(np.random.default_rng(2).integers(0, 255, (96, 96, 3), np.uint8))
    mask = Image.fromarray(np.tri(64, 64, dtype=np.uint8) * 255) if masked else None
    conditions = [IPAdapter("plus", style, source=str(repo), scale=0.7, mask=mask)]
    by_hand = Generator.from_pretrained(tiny.base, device="cpu")
    _round_by_hand(by_hand.base.unet)
    fresh.set_weight_storage("fp8_e4m3fn")
    run = {k: v for k, v in RUN.items() if k != "refiner_switch"}
    stored = fresh.generate(PROMPT, conditions=conditions, **run)
    assert torch.equal(stored.latents, by_hand.generate(PROMPT, conditions=conditions, **run).latents)


def test_weight_patches_add_at_full_precision_round_once_and_come_off_exactly(generator):
    unet = copy.deepcopy(generator.base.unet)
    store_weights(unet, "fp8_e4m3fn")
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    parameter = unet.get_parameter(name)
    kept = parameter.detach().clone()
    delta = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.05
    patch = WeightPatch(unet, {name: delta})
    assert parameter.dtype == FP8
    assert torch.equal(parameter.float(), (kept.float() + delta).to(FP8).float())
    patch.restore()
    assert torch.equal(parameter.float(), kept.float()) and parameter.dtype == FP8


def test_a_controlnet_is_kept_as_the_unet_it_serves(fresh, tiny, tmp_path):
    from sdxl_control.adapters.controlnet import ControlNet, load_controlnet
    from sdxl_control.testing import write_tiny_controlnet

    folder = write_tiny_controlnet(tmp_path / "cn", tiny.base, seed=4)
    edges = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8))
    fresh.set_weight_storage("fp8_e4m3fn")
    result = fresh.generate(PROMPT, conditions=[ControlNet(str(folder), image=edges)], **RUN)
    assert torch.isfinite(result.latents).all()
    stored = load_controlnet(str(folder), union=False, unet=fresh.base.unet)
    assert stored_as(stored) == "fp8_e4m3fn" and stored.controlnet_down_blocks[0].weight.dtype == FP8
    plain = load_controlnet(str(folder), union=False, unet=Generator.from_pretrained(tiny.base, device="cpu").base.unet)
    assert stored_as(plain) is None and plain is not stored


def test_the_fast_paths_fused_projections_and_fp8_are_refused_together(fresh):
    fresh.set_fast_path(FastPath())
    with pytest.raises(InvalidRequestError, match="fp8 weight storage casts each layer"):
        fresh.set_weight_storage("fp8_e4m3fn")
    assert fresh.weight_storage is None and {p.dtype for p in fresh.base.unet.parameters()} == {torch.float32}
    fresh.set_fast_path(None)
    fresh.set_weight_storage("fp8_e4m3fn")
    with pytest.raises(InvalidRequestError, match="fp8 weight storage casts each layer"):
        fresh.set_fast_path(FastPath(compile="blocks", fuse_qkv=False))
    fresh.set_fast_path(FastPath(fuse_qkv=False))  # channels_last alone composes
    assert fresh.generate(PROMPT, **RUN).latents.isfinite().all()
    with pytest.raises(InvalidRequestError, match="unknown weight storage 'fp4'"):
        fresh.set_weight_storage("fp4")


def test_the_cli_presets_and_job_files_carry_it(tiny, tmp_path, monkeypatch):
    from sdxl_control.cli import main
    from sdxl_control.jobs.batch import parse_job
    from sdxl_control.jobs.spec import JobSpec, resolve
    from sdxl_control.presets import load_preset

    out = tmp_path / "fp8.png"
    assert main(["generate", PROMPT, "--tiny", "--steps", "2", "--size", "64x64", "--seed", "1",
                 "--weight-storage", "fp8_e4m3fn", "-o", str(out), "-q"]) == 0  # fmt: skip
    recipe = json.loads(Image.open(out).info["sdxl-control"])
    assert recipe["weight_storage"] == "fp8_e4m3fn"
    assert resolve(JobSpec(recipe=recipe)).weight_storage == "fp8_e4m3fn"  # re-made as it was made
    again = tmp_path / "again.png"
    assert main(["generate", "--recipe", str(out), "--tiny", "-o", str(again), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    preset = tmp_path / "lean.json"
    preset.write_text(json.dumps({"description": "fp8", "models": {"weight_storage": "fp8_e5m2"}, "steps": 2}))
    assert resolve(JobSpec(PROMPT, preset=str(preset))).weight_storage == "fp8_e5m2"
    assert load_preset(str(preset)).models["weight_storage"] == "fp8_e5m2"
    preset.write_text(json.dumps({"description": "bad", "models": {"weight_storage": "int4"}}))
    with pytest.raises(InvalidRequestError, match="models.weight_storage"):
        load_preset(str(preset))
    job = parse_job({"prompt": PROMPT, "steps": 2, "models": {"weight_storage": "fp8_e4m3fn"}}, line=1)
    plain = parse_job({"prompt": PROMPT, "steps": 2}, line=1)
    assert job.weight_storage == "fp8_e4m3fn" and job.models != plain.models and job.fingerprint != plain.fingerprint
    assert GenerationRequest.from_recipe(recipe).steps == 2  # the record key is known to recipes


# fp8 matmuls (torchao's float8 linear layers). torchao refuses them off a GPU of compute capability 8.9+, but its
# float8 layers compute the same numbers on the CPU (its matrix product falls back to a reference kernel), so these
# tests lift both checks: ours, on the device type, and torchao's, on the GPU.


@pytest.fixture()
def fp8_matmul_on_cpu(monkeypatch):
    pytest.importorskip("torchao")
    import torchao.quantization.quant_api as quant_api

    from sdxl_control.weights import storage

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(storage, "_FP8_MATMUL_DEVICES", ("cuda", "xpu", "cpu"))


def _quantize_by_hand(unet):
    """torchao's own float8 quantization of the layers fp8 storage keeps: its linear layers (fp32 model: a scale per
    tensor), inputs' scales taken from at least 1e-12."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerTensor, quantize_

    chosen = {id(layer) for layer in stored_layers(unet) if isinstance(layer, torch.nn.Linear)}
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor(), activation_value_lb=1e-12)
    quantize_(unet, config, filter_fn=lambda module, name: id(module) in chosen)


def _bits(parameter):
    """What a weight holds: a float8 weight's 8-bit values and scales, or the tensor itself."""
    return (parameter.qdata, parameter.scale) if hasattr(parameter, "qdata") else (parameter,)


def _same_bits(a, b):
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(_bits(a), _bits(b), strict=True))


def test_fp8_matmul_is_torchaos_own_quantization_of_the_stored_linear_layers(fresh, tiny, fp8_matmul_on_cpu):
    from torchao.quantization import Float8Tensor

    by_hand = Generator.from_pretrained(tiny.base, tiny.refiner, device="cpu")
    for stage in (by_hand.base, by_hand.refiner):
        _quantize_by_hand(stage.unet)
    before = fresh.generate(PROMPT, **RUN)
    fresh.set_weight_storage("fp8_matmul")
    linears = [m for m in fresh.base.unet.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in linears if isinstance(m.weight, Float8Tensor)]
    assert len(quantized) > 100 and fresh.base.dtype == torch.float32 and compute_dtype(quantized[0]) == torch.float32
    stored = fresh.generate(PROMPT, **RUN)
    assert torch.equal(stored.latents, by_hand.generate(PROMPT, **RUN).latents)
    assert not torch.equal(stored.latents, before.latents)
    assert stored.recipes[0]["weight_storage"] == "fp8_matmul"
    theirs = dict(by_hand.base.unet.named_parameters())
    assert all(_same_bits(p, theirs[n]) for n, p in fresh.base.unet.named_parameters())
    fresh.set_weight_storage(None)
    assert {type(p) for p in fresh.base.unet.parameters()} == {torch.nn.Parameter}
    assert {p.dtype for p in fresh.base.unet.parameters()} == {torch.float32} and compute_dtype(fresh.base.unet) is None
    for name, p in fresh.base.unet.named_parameters():  # the values the float8 weights stood for
        mine = theirs[name].dequantize() if isinstance(theirs[name], Float8Tensor) else theirs[name]
        assert torch.equal(p, mine), name


def test_weight_patches_on_float8_layers_quantize_the_sum_once_and_come_off_exactly(generator, fp8_matmul_on_cpu):
    from torchao.quantization import Float8Tensor

    unet = copy.deepcopy(generator.base.unet)
    store_weights(unet, "fp8_matmul")
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    layer, parameter = unet.get_submodule(name.rpartition(".")[0]), unet.get_parameter(name)
    kept = parameter.detach().clone()
    delta = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.05
    expected = copy.deepcopy(layer)
    expected.weight = torch.nn.Parameter(kept.dequantize() + delta, requires_grad=False)
    _quantize_by_hand(torch.nn.Sequential(expected))
    bias = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.bias"  # a float8 layer's plain bias
    assert isinstance(unet.get_submodule(bias.rpartition(".")[0]).weight, Float8Tensor)
    bias_before, bias_delta = unet.get_parameter(bias).detach().clone(), torch.full_like(unet.get_parameter(bias), 0.25)
    patch = WeightPatch(unet, {name: delta, bias: bias_delta})
    assert unet.get_parameter(name) is parameter and isinstance(parameter, Float8Tensor)
    assert _same_bits(parameter, expected.weight)
    assert torch.equal(unet.get_parameter(bias), bias_before + bias_delta)
    patch.restore()
    assert _same_bits(parameter, kept) and torch.equal(unet.get_parameter(bias), bias_before)


@pytest.mark.parametrize("storage", ["fp8_e4m3fn", "fp8_matmul"])
def test_a_lora_on_a_stored_generator_leaves_the_stored_weights_as_they_were(fresh, tiny, tmp_path, storage, request):
    from sdxl_control.adapters.lora import LoRA
    from sdxl_control.testing.lora import write_tiny_lora

    if storage == "fp8_matmul":
        request.getfixturevalue("fp8_matmul_on_cpu")
    lora = write_tiny_lora(tmp_path / "style.safetensors", tiny.base, "kohya", seed=2)
    fresh.set_weight_storage(storage)
    before = {n: p.detach().clone() for n, p in fresh.base.unet.named_parameters()}
    plain = fresh.generate(PROMPT, **RUN)
    styled = fresh.generate(PROMPT, conditions=[LoRA(str(lora), scale=0.8)], **RUN)
    assert not torch.equal(plain.latents, styled.latents)
    after = dict(fresh.base.unet.named_parameters())
    assert all(_same_bits(after[n], v) for n, v in before.items())
    assert torch.equal(fresh.generate(PROMPT, **RUN).latents, plain.latents)


def test_fp8_matmul_says_what_it_needs_and_leaves_nothing_half_applied(fresh, tiny, tmp_path, monkeypatch, capsys):
    import sys

    from sdxl_control.adapters.controlnet import load_controlnet
    from sdxl_control.cli import main
    from sdxl_control.testing import write_tiny_controlnet

    pytest.importorskip("torchao")
    plain = {n: p.detach().clone() for n, p in fresh.base.unet.named_parameters()}

    def untouched():
        return fresh.weight_storage is None and all(
            type(p) is torch.nn.Parameter and torch.equal(p, plain[n]) for n, p in fresh.base.unet.named_parameters()
        )

    with pytest.raises(InvalidRequestError, match="fp8 matmuls need a GPU with fp8 matrix units.*on cpu"):
        fresh.set_weight_storage("fp8_matmul")
    assert untouched()
    from sdxl_control.weights import storage

    monkeypatch.setattr(storage, "_FP8_MATMUL_DEVICES", ("cuda", "xpu", "cpu"))
    with pytest.raises(InvalidRequestError, match="fp8 matmuls cannot run here: Float8 dynamic quantization requires"):
        fresh.set_weight_storage("fp8_matmul")  # torchao's own check of the GPU, made an error of ours
    assert untouched() and compute_dtype(fresh.base.unet) is None
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torchao.quantization", None)  # as if torchao were not installed
        with pytest.raises(InvalidRequestError, match=r"fp8 matmuls need torchao: pip install"):
            fresh.set_weight_storage("fp8_matmul")
    assert untouched()
    assert main(["generate", PROMPT, "--tiny", "--steps", "2", "--size", "64x64", "--weight-storage", "fp8_matmul",
                 "-o", str(tmp_path / "x.png"), "-q"]) != 0  # fmt: skip
    assert "fp8 matmuls cannot run here" in capsys.readouterr().err and not (tmp_path / "x.png").exists()

    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import Float8Tensor

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    fresh.set_fast_path(FastPath(fuse_qkv=True))
    with pytest.raises(InvalidRequestError, match="fused projections would concatenate"):
        fresh.set_weight_storage("fp8_matmul")
    assert fresh.weight_storage is None
    fresh.set_fast_path(None)
    fresh.set_weight_storage("fp8_matmul")
    fresh.set_fast_path(FastPath(compile="blocks", fuse_qkv=False))  # torchao's float8 layers are made to compile
    fresh.set_fast_path(None)
    folder = write_tiny_controlnet(tmp_path / "cn", tiny.base, seed=4)
    served = load_controlnet(str(folder), union=False, unet=fresh.base.unet)
    assert stored_as(served) == "fp8_matmul"
    assert any(isinstance(m.weight, Float8Tensor) for m in served.modules() if isinstance(m, torch.nn.Linear))


def test_fp8_matmul_takes_rows_of_zeros_without_nans(tiny, fp8_matmul_on_cpu):
    """An input row of zeros has no scale of its own (torchao divides by its maximum): SDXL's empty negative prompt is
    zeroed, so the unconditional half's cross-attention keys and values see such rows at every step. A bf16 model
    scales each row (token) on its own."""
    for dtype in (torch.bfloat16, torch.float32):
        layer = torch.nn.Sequential(torch.nn.Linear(32, 48)).to(dtype)
        store_weights(layer, "fp8_matmul")
        rows = torch.cat([torch.zeros(1, 3, 32), torch.randn(1, 3, 32)]).to(dtype)
        out = layer(rows)
        assert torch.isfinite(out).all() and torch.equal(out[0], layer[0].bias.expand(3, 48)), dtype
        assert torch.isfinite(layer(torch.zeros(2, 32, dtype=dtype))).all()  # a whole tensor of zeros too
    gen = Generator.from_pretrained(tiny.base, device="cpu", dtype=torch.bfloat16)
    gen.set_weight_storage("fp8_matmul")
    result = gen.generate(PROMPT, steps=2, size=(64, 64), seed=3, negative_prompt="", progress_bar=False)
    assert torch.isfinite(result.latents).all()
