"""PAG (perturbed-attention guidance) equals diffusers' own PAG pipelines on the tiny models — its scale, applied
layers and adaptive scale, with and without classifier-free guidance, with CFG rescale, stacked with a ControlNet, an
IP-Adapter and FaceID, and in the refiner — costs one more UNet row per step where it acts, and fails clearly on a
layer that does not exist.

References: diffusers 0.42.1 (installed) ``StableDiffusionXLPAGPipeline``, ``StableDiffusionXLControlNetPAGPipeline``,
``StableDiffusionXLPAGImg2ImgPipeline`` (pipelines/pag/) and their processors ``PAGCFGIdentitySelfAttnProcessor2_0``
/ ``PAGIdentitySelfAttnProcessor2_0`` (models/attention_processor.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetPAGPipeline,
    StableDiffusionXLPAGImg2ImgPipeline,
    StableDiffusionXLPAGPipeline,
)
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image

from sdxl_control import ConditionError
from sdxl_control.adapters.controlnet import ControlNet
from sdxl_control.adapters.faceid import FaceID
from sdxl_control.adapters.ip_adapter import VARIANTS, IPAdapter
from sdxl_control.adapters.pag import PAG, PerturbedSelfAttnProcessor, pag_layers, pag_scale_at
from sdxl_control.preprocessors.face import FaceInfo
from sdxl_control.protocol.attention import attention_layers
from sdxl_control.protocol.rows import Rows, call_rows, calling
from sdxl_control.testing import write_tiny_controlnet
from sdxl_control.testing.ip_adapter import write_tiny_faceid_repo, write_tiny_ip_adapter_repo

from .conftest import as_reference

PROMPT = "a lighthouse on a cliff"
STEPS = 6
RUN = dict(steps=STEPS, size=(64, 64), seed=3, progress_bar=False)
CLOSE = dict(rtol=1e-4, atol=1e-5)


def _photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pag_pipe(tiny):
    return as_reference(StableDiffusionXLPAGPipeline.from_pretrained(tiny.base))


def reference(pipe, layers=("mid",), guidance=5.0, **kwargs):
    pipe.set_pag_applied_layers(list(layers))
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=guidance, height=64, width=64,
                    generator=torch.Generator().manual_seed(3), output_type="latent", **kwargs).images  # fmt: skip


# (our PAG fields and request fields, diffusers' arguments): defaults; layers; adaptive scale; PAG alone (guidance 1,
# no classifier-free guidance); CFG rescale (diffusers rescales after adding PAG, against the unperturbed prompt's).
CASES = {
    "defaults": ({}, {}, {}),
    "mid": (dict(scale=2.0, layers="mid"), {}, dict(pag_scale=2.0)),
    "down_blocks.2": (dict(layers="down_blocks.2"), {}, dict(layers=("down_blocks.2",))),
    "up_blocks.0.attentions.0": (dict(layers="up_blocks.0.attentions.0"), {}, dict(layers=("up_blocks.0.attentions.0",))),
    "a list": (dict(layers=["down_blocks.1", "mid", "up_blocks.1.attentions.2"]), {},
               dict(layers=("down_blocks.1", "mid", "up_blocks.1.attentions.2"))),
    "adaptive": (dict(scale=4.0, adaptive_scale=0.006), {}, dict(pag_scale=4.0, pag_adaptive_scale=0.006)),
    "guidance 1": ({}, dict(guidance=1.0), dict(guidance=1.0)),
    "guidance 0.5 adaptive": (dict(adaptive_scale=0.004), dict(guidance=0.5), dict(guidance=0.5, pag_adaptive_scale=0.004)),
    "rescale": (dict(scale=2.5), dict(guidance_rescale=0.7), dict(pag_scale=2.5, guidance_rescale=0.7)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_pag_matches_diffusers(generator, pag_pipe, case):
    fields, request, theirs = CASES[case]
    ours = generator.generate(PROMPT, conditions=[PAG(**fields)], **{"guidance": 5.0, **request}, **RUN)
    ref = reference(pag_pipe, **theirs)
    torch.testing.assert_close(ours.latents, ref, **CLOSE)
    plain = generator.generate(PROMPT, **{"guidance": 5.0, **request}, **RUN)
    assert not torch.allclose(ours.latents, plain.latents, atol=1e-3)  # PAG did act


def test_a_batch_matches_diffusers(generator, pag_pipe):
    """Two images: diffusers' batch [uncond x2, cond x2, perturbed x2], each image's noise from its own seed."""
    ours = generator.generate(PROMPT, conditions=[PAG(scale=2.0)], num_images=2, guidance=5.0, **RUN)
    pag_pipe.set_pag_applied_layers(["mid"])
    with torch.no_grad():
        ref = pag_pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64, pag_scale=2.0,
                       num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
                       output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, **CLOSE)


def test_adaptive_scale_falls_with_the_timestep():
    assert pag_scale_at(3.0, 0.0, 0.0) == 3.0
    assert pag_scale_at(3.0, 0.002, 999.0) == pytest.approx(3.0 - 0.002)
    assert pag_scale_at(3.0, 0.002, 500.0) == pytest.approx(2.0)
    assert pag_scale_at(3.0, 0.01, 100.0) == 0.0  # never below 0


def test_pag_stacks_with_a_controlnet(generator, tiny, tmp_path_factory):
    """diffusers' ControlNet PAG pipeline runs the ControlNet on the 3-row batch ([uncond, cond, cond]): the perturbed
    row reads the prompt's residuals."""
    net = write_tiny_controlnet(tmp_path_factory.mktemp("pag-controlnet") / "net", tiny.base, seed=4)
    image = _photo(5)
    condition = ControlNet(net, image=image, scale=0.8, window=(0.0, 0.7))
    ours = generator.generate(PROMPT, conditions=[condition, PAG(scale=2.0)], guidance=5.0, **RUN)
    pipe = as_reference(StableDiffusionXLControlNetPAGPipeline.from_pretrained(
        tiny.base, controlnet=ControlNetModel.from_pretrained(net), pag_applied_layers=["mid"]))  # fmt: skip
    with torch.no_grad():
        ref = pipe(PROMPT, image=image, num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64,
                   controlnet_conditioning_scale=0.8, control_guidance_start=0.0, control_guidance_end=0.7,
                   pag_scale=2.0, generator=torch.Generator().manual_seed(3), output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, **CLOSE)
    alone = generator.generate(PROMPT, conditions=[condition], guidance=5.0, **RUN)
    assert not torch.allclose(ours.latents, alone.latents, atol=1e-3)


def test_pag_stacks_with_an_ip_adapter(generator, tiny, pag_pipe, tmp_path_factory):
    """The PAG pipeline's perturbed row reads the positive image tokens (diffusers' ``ip_adapter_image``)."""
    repo = write_tiny_ip_adapter_repo(tmp_path_factory.mktemp("pag-ip") / "h94-IP-Adapter", tiny.base)
    image = _photo(6)
    ours = generator.generate(
        PROMPT, conditions=[IPAdapter("plus", image, source=str(repo), scale=0.7), PAG()], guidance=5.0, **RUN
    )
    pag_pipe.load_ip_adapter(str(repo), subfolder="sdxl_models", weight_name=VARIANTS["plus"].weights.split("/")[-1],
                             image_encoder_folder=VARIANTS["plus"].encoder)  # fmt: skip
    try:
        pag_pipe.set_ip_adapter_scale(0.7)
        ref = reference(pag_pipe, ip_adapter_image=image)
    finally:
        pag_pipe.unload_ip_adapter()
    torch.testing.assert_close(ours.latents, ref, rtol=1e-4, atol=1e-4)


def _face(seed: int) -> FaceInfo:
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal(512).astype(np.float32)
    aligned = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    return FaceInfo((0, 0, 100, 100), np.zeros((5, 2), np.float32), 0.9, embedding * 3.0, aligned, (100, 100))


def test_pag_stacks_with_an_identity_condition(generator, tiny, tmp_path_factory):
    """FaceID (face tokens and its attention LoRA) with PAG equals the PAG pipeline fed the same face embeddings
    (``ip_adapter_image_embeds``, as tests/test_faceid.py feeds diffusers' plain pipeline)."""
    repo = write_tiny_faceid_repo(tmp_path_factory.mktemp("pag-faceid") / "h94-IP-Adapter-FaceID", tiny.base)
    face = _face(1)
    ours = generator.generate(PROMPT, conditions=[FaceID("faceid", face, source=str(repo), scale=0.7), PAG(scale=2.0)],
                              guidance=5.0, **RUN)  # fmt: skip
    pipe = as_reference(StableDiffusionXLPAGPipeline.from_pretrained(tiny.base, pag_applied_layers=["mid"]))
    pipe.load_ip_adapter(str(repo), subfolder=None, weight_name="ip-adapter-faceid_sdxl.bin", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)
    ids = torch.from_numpy(face.normed_embedding[None, None])
    ref = reference(pipe, pag_scale=2.0, ip_adapter_image_embeds=[torch.cat([torch.zeros_like(ids), ids])])
    torch.testing.assert_close(ours.latents, ref, rtol=1e-4, atol=1e-4)


def test_pag_in_both_stages_matches_the_pag_pipelines_handing_over(generator, tiny, pag_pipe):
    """Base and refiner, each with PAG on its own layers: the PAG pipeline to ``denoising_end``, then diffusers'
    PAG img2img pipeline with the tiny refiner from ``denoising_start``. (At 64x64 the tiny refiner's mid block sees
    one token, where self-attention is the identity already: its down_blocks.1 are perturbed too.)"""
    switch, layers = 0.5, ["mid", "down_blocks.1"]
    ours = generator.generate(PROMPT, conditions=[PAG(scale=2.0, layers=layers, stage="both")], refiner_switch=switch,
                              guidance=5.0, **RUN)  # fmt: skip
    latents = reference(pag_pipe, layers, pag_scale=2.0, denoising_end=switch)
    refiner = as_reference(StableDiffusionXLPAGImg2ImgPipeline.from_pretrained(tiny.refiner, pag_applied_layers=layers))
    with torch.no_grad():
        ref = refiner(PROMPT, image=latents, denoising_start=switch, num_inference_steps=STEPS, guidance_scale=5.0,
                      pag_scale=2.0, generator=torch.Generator().manual_seed(3), output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, **CLOSE)
    # PAG in both stages differs from PAG in the base alone: the refiner's own layers are perturbed.
    base_only = generator.generate(PROMPT, conditions=[PAG(scale=2.0, layers=layers)], refiner_switch=switch,
                                   guidance=5.0, **RUN)  # fmt: skip
    assert not torch.allclose(ours.latents, base_only.latents, atol=1e-3)


def _rows_per_call(generator):
    calls: list[tuple[int, tuple[bool, ...]]] = []

    def hook(module, args, kwargs):
        rows = call_rows()
        calls.append((args[0].shape[0], rows.perturbed if rows is not None else ()))

    return calls, generator.base.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(("guidance", "rows"), [(5.0, 3), (1.0, 2)])
def test_one_more_unet_row_per_image_where_pag_acts(generator, guidance, rows):
    """diffusers' PAG batch: [uncond, cond, perturbed] with classifier-free guidance, [cond, perturbed] without; one
    UNet call per step. Outside PAG's window the step is the plain one."""
    calls, handle = _rows_per_call(generator)
    try:
        generator.generate(PROMPT, conditions=[PAG(window=(0.0, 0.5))], guidance=guidance, **RUN)
    finally:
        handle.remove()
    assert [n for n, _ in calls] == [rows] * 3 + [rows - 1] * 3
    assert calls[0][1] == (False,) * (rows - 1) + (True,)
    assert all(not flags for _, flags in calls[3:])


def test_a_layer_that_does_not_exist_is_named(generator, tiny):
    before = {name: layer.processor for name, layer in attention_layers(generator.base.unet).items()}
    with pytest.raises(ConditionError, match="Cannot find PAG layer.*'down_blocks.0' in the base's UNet"):
        generator.generate(PROMPT, conditions=[PAG(layers=("mid", "down_blocks.0"))], **RUN)
    # diffusers' comment syntax "down.block_2" matches nothing in diffusers 0.42.1 either.
    with pytest.raises(ConditionError, match="'down.block_2'"):
        generator.generate(PROMPT, conditions=[PAG(layers="down.block_2")], **RUN)
    with pytest.raises(ConditionError, match="not a regular expression"):
        generator.generate(PROMPT, conditions=[PAG(layers="mid(")], **RUN)
    # The tiny refiner's up_blocks.0 has no attention: refused for the refiner, in a call that runs it.
    with pytest.raises(ConditionError, match="'up_blocks.0' in the refiner's UNet"):
        generator.generate(PROMPT, conditions=[PAG(layers="up_blocks.0", stage="both")], refiner_switch=0.5, **RUN)
    after = {name: layer.processor for name, layer in attention_layers(generator.base.unet).items()}
    assert after == before
    # diffusers refuses the same layers.
    pipe = StableDiffusionXLPAGPipeline.from_pretrained(tiny.base)
    pipe.set_pag_applied_layers(["down_blocks.0"])
    with pytest.raises(ValueError, match="Cannot find PAG layer to set attention processor for: down_blocks.0"):
        pipe._set_pag_attn_processor(pipe.pag_applied_layers, True)


def test_layers_are_found_as_diffusers_finds_them(generator, tiny):
    pipe = StableDiffusionXLPAGPipeline.from_pretrained(tiny.base)
    unet = pipe.unet
    for layers in (["mid"], ["down_blocks.2"], ["up"], ["down.blocks.2"], ["blocks.(1|2)"], ["attentions.1", "mid"]):
        pipe.set_pag_applied_layers(layers)
        plain = {name: m.processor for name, m in attention_layers(unet).items()}
        pipe._set_pag_attn_processor(layers, True)
        theirs = {name for name, m in attention_layers(unet).items() if m.processor is not plain[name]}
        unet.set_attn_processor(AttnProcessor2_0())
        assert set(pag_layers(unet, tuple(layers))) == theirs, layers


def test_two_pags_are_refused(generator):
    before = {name: layer.processor for name, layer in attention_layers(generator.base.unet).items()}
    with pytest.raises(ConditionError, match="PAG is given twice"):
        generator.generate(PROMPT, conditions=[PAG(), PAG(layers="up_blocks.0")], **RUN)
    assert {name: layer.processor for name, layer in attention_layers(generator.base.unet).items()} == before


def test_bad_values_are_refused():
    with pytest.raises(ConditionError, match="PAG scale is 0 .* got -1.0"):
        PAG(scale=-1.0)
    with pytest.raises(ConditionError, match="adaptive_scale is 0 or more, got -0.1"):
        PAG(adaptive_scale=-0.1)
    with pytest.raises(ConditionError, match="at least one layer"):
        PAG(layers=())


def test_step_cache_is_refused_where_pag_acts(generator):
    with pytest.raises(ConditionError, match="PAG perturbs.*step_cache"):
        generator.generate(PROMPT, conditions=[PAG()], step_cache=2, **RUN)
    # Off (scale 0, or a window holding no step), PAG is absent: the cached call is the same as without it.
    plain = generator.generate(PROMPT, step_cache=2, **RUN)
    for off in (PAG(scale=0.0), PAG(window=(0.0, 0.1))):
        assert torch.equal(generator.generate(PROMPT, conditions=[off], step_cache=2, **RUN).latents, plain.latents)


def test_fused_projections_give_the_same_image(tiny):
    """The fast path's fused QKV processors are what PAG wraps (and gives back); the perturbed rows read ``to_v``,
    a view of the fused matrix."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    from sdxl_control import FastPath, Generator

    gen = Generator.from_pretrained(tiny.base, device="cpu")
    plain = gen.generate(PROMPT, conditions=[PAG(layers=["mid", "up_blocks.1"])], **RUN)
    gen.set_fast_path(FastPath())
    try:
        layers = attention_layers(gen.base.unet)
        before = {name: m.processor for name, m in layers.items()}
        assert isinstance(before["mid_block.attentions.0.transformer_blocks.0.attn1.processor"], FusedAttnProcessor2_0)
        fast = gen.generate(PROMPT, conditions=[PAG(layers=["mid", "up_blocks.1"])], **RUN)
        assert {name: m.processor for name, m in layers.items()} == before
    finally:
        gen.set_fast_path(None)
    torch.testing.assert_close(fast.latents, plain.latents, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compile", ["blocks", "unet"])
def test_compiled_models_trace_the_processor(tiny, compile):
    """torch.compile (fullgraph, the eager backend: tracing alone) reads the call's rows inside the compiled blocks;
    a step without PAG after steps with it traces again rather than reusing the perturbed graph."""
    from sdxl_control import FastPath, Generator

    gen = Generator.from_pretrained(tiny.base, device="cpu")
    run = dict(RUN, steps=3)
    condition = PAG(window=(0.0, 0.7))  # steps 0-1 perturbed, step 2 plain
    plain = gen.generate(PROMPT, conditions=[condition], **run)
    gen.set_fast_path(FastPath(channels_last=False, fuse_qkv=False, compile=compile, compile_backend="eager"))
    try:
        compiled = gen.generate(PROMPT, conditions=[condition], **run)
    finally:
        gen.set_fast_path(None)
    torch.testing.assert_close(compiled.latents, plain.latents, rtol=1e-4, atol=1e-4)


def test_the_processor_is_the_replaced_one_unless_rows_are_perturbed():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval().requires_grad_(False)
    inner = AttnProcessor2_0()
    processor = PerturbedSelfAttnProcessor(inner)
    x = torch.randn(4, 9, 32)
    assert torch.equal(processor(attn, x), inner(attn, x))  # outside the loop's calls
    with calling(Rows.identity(4)):
        assert torch.equal(processor(attn, x), inner(attn, x))
    identity = attn.to_out[1](attn.to_out[0](attn.to_v(x)))
    # Perturbed rows anywhere in the batch: identity attention there, the replaced processor on the others.
    with calling(Rows((0, 1, 2, 3), 4, (False, True, False, True))):
        out = processor(attn, x)
    torch.testing.assert_close(out[[1, 3]], identity[[1, 3]], rtol=0, atol=0)
    torch.testing.assert_close(out[[0, 2]], inner(attn, x[[0, 2]]), rtol=0, atol=0)
    # The same as diffusers' CFG processor on its [uncond, cond, perturbed] batch.
    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

    with calling(Rows((0, 1, 1), 2, (False, False, True))):
        ours = processor(attn, x[:3])
    torch.testing.assert_close(ours, PAGCFGIdentitySelfAttnProcessor2_0()(attn, x[:3]), rtol=0, atol=0)


def test_the_recipe_and_the_a1111_text_record_pag(generator):
    from sdxl_control import GenerationRequest
    from sdxl_control.records.infotext import parameters_text

    made = generator.generate(PROMPT, conditions=[PAG(scale=2.0, layers=["mid", "up_blocks.1"], window=(0.0, 0.5))],
                              **RUN)  # fmt: skip
    recipe = made.images[0].recipe
    assert recipe["conditions"] == [{"kind": "pag", "scale": 2.0, "window": [0.0, 0.5], "stage": "base",
                                     "adaptive_scale": 0.0, "layers": ["mid", "up_blocks.1"]}]  # fmt: skip
    assert 'PAG: "{' in parameters_text(recipe)
    again = generator.run(GenerationRequest.from_recipe(recipe), progress_bar=False)
    assert again.images[0].tobytes() == made.images[0].tobytes()
    forge = generator.generate(PROMPT, conditions=[PAG(scale=2.0)], **RUN).images[0].recipe
    assert "pagi_enabled: True, pagi_scale: 2.0, pagi_attenuation: 0.0, pagi_start_step: 0.0, pagi_end_step: 1.0" in (
        parameters_text(forge)
    )


def test_infotext_writes_forges_items_where_they_mean_the_same():
    """Forge's built-in PAG (lllyasviel/stable-diffusion-webui-forge @ dfdcbab,
    extensions-builtin/sd_forge_perturbed_attention/scripts/forge_perturbed_attention.py) writes ``pagi_enabled``,
    ``pagi_scale``, ``pagi_attenuation``, ``pagi_start_step``, ``pagi_end_step`` and perturbs the base model's middle
    block (diffusers' "mid"), without an adaptive scale."""
    fields = PAG(scale=2.5, window=(0.0, 0.8)).infotext().fields
    assert fields == {"pagi_enabled": True, "pagi_scale": 2.5, "pagi_attenuation": 0.0, "pagi_start_step": 0.0,
                      "pagi_end_step": 0.8}  # fmt: skip
    for other in (PAG(layers="up_blocks.0"), PAG(adaptive_scale=0.01), PAG(stage="both")):
        fields = other.infotext().fields
        assert set(fields) == {"PAG"}
        recorded = json.loads(fields["PAG"])
        assert PAG(**recorded) == other
