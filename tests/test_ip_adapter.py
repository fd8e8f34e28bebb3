"""IP-Adapter conditions equal diffusers' load_ip_adapter/set_ip_adapter_scale on tiny published-format files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image
from safetensors.torch import load_file, save_file

from sdxl_control import ConditionError, IncompatibleModelError, Stage
from sdxl_control.adapters.ip_adapter import LAYER_PRESETS, VARIANTS, IPAdapter, encode_images, save_embeddings
from sdxl_control.protocol.attention import AttentionBranch, BranchedAttnProcessor
from sdxl_control.testing.ip_adapter import write_tiny_ip_adapter_repo

from .conftest import as_reference

PROMPT = "a portrait"
RUN = dict(steps=6, size=(64, 64), seed=3, progress_bar=False)
CLOSE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def repo(tiny, tmp_path_factory):
    return write_tiny_ip_adapter_repo(tmp_path_factory.mktemp("h94-IP-Adapter"), tiny.base)


@pytest.fixture(scope="module")
def refs():
    from skimage.data import astronaut

    photo = Image.fromarray(astronaut())
    rng = np.random.default_rng(1)
    return {
        "face": photo.crop((140, 20, 330, 230)),
        "style": Image.fromarray(rng.integers(0, 255, (80, 60, 3), np.uint8)),
    }


@pytest.fixture(scope="module")
def pipe(tiny):
    p = StableDiffusionXLPipeline.from_pretrained(tiny.base)
    as_reference(p)
    return p


def reference(pipe, repo, variants, images, scales, masks=None, trace=None):
    encoder = VARIANTS[variants[0]].encoder
    names = [VARIANTS[v].weights.split("/")[-1] for v in variants]
    pipe.load_ip_adapter(str(repo), subfolder="sdxl_models", weight_name=names, image_encoder_folder=encoder)
    try:
        pipe.set_ip_adapter_scale(scales)
        kwargs = {"cross_attention_kwargs": {"ip_adapter_masks": masks}} if masks is not None else {}
        if trace is not None:
            kwargs["callback_on_step_end"] = lambda p, i, t, k: trace.append(k["latents"].clone()) or {}
        return pipe(PROMPT, ip_adapter_image=images, num_inference_steps=6, guidance_scale=5.0, height=64, width=64,
                    generator=torch.Generator().manual_seed(3), output_type="latent", **kwargs).images  # fmt: skip
    finally:
        pipe.unload_ip_adapter()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_published_format_matches_diffusers(generator, pipe, repo, refs, variant):
    ours = generator.generate(PROMPT, conditions=[IPAdapter(variant, refs["face"], source=str(repo), scale=0.7)], **RUN)
    ref = reference(pipe, repo, [variant], refs["face"], 0.7)
    torch.testing.assert_close(ours.latents, ref, **CLOSE)
    assert not torch.allclose(ours.latents, generator.generate(PROMPT, **RUN).latents, atol=1e-3)


@pytest.mark.parametrize("preset", ["style", "composition", "style+composition"])
def test_instantstyle_layer_targeting_matches_per_layer_scales(generator, pipe, repo, refs, preset):
    ours = generator.generate(
        PROMPT, conditions=[IPAdapter("plus", refs["style"], source=str(repo), layers=preset)], **RUN
    )
    ref = reference(pipe, repo, ["plus"], refs["style"], LAYER_PRESETS[preset])
    torch.testing.assert_close(ours.latents, ref, **CLOSE)


def test_per_layer_dict_times_scale(generator, pipe, repo, refs):
    layers = {"down": {"block_1": [0.5, 1.0]}, "up": {"block_1": [1.0, 0.0, 0.25]}}
    ours = generator.generate(
        PROMPT, conditions=[IPAdapter("vit-h", refs["style"], source=str(repo), layers=layers, scale=0.8)], **RUN
    )
    scaled = {"down": {"block_1": [0.4, 0.8]}, "up": {"block_1": [0.8, 0.0, 0.2]}}
    torch.testing.assert_close(ours.latents, reference(pipe, repo, ["vit-h"], refs["style"], scaled), **CLOSE)


def test_two_adapters_at_once(generator, pipe, repo, refs):
    conditions = [IPAdapter("plus", refs["style"], source=str(repo), scale=0.5),
                  IPAdapter("plus-face", refs["face"], source=str(repo), scale=0.8)]  # fmt: skip
    ours = generator.generate(PROMPT, conditions=conditions, **RUN)
    ref = reference(pipe, repo, ["plus", "plus-face"], [refs["style"], refs["face"]], [0.5, 0.8])
    torch.testing.assert_close(ours.latents, ref, **CLOSE)


def test_several_images_concatenated(generator, pipe, repo, refs):
    ours = generator.generate(
        PROMPT, conditions=[IPAdapter("plus", [refs["style"], refs["face"]], source=str(repo))], **RUN
    )
    ref = reference(pipe, repo, ["plus"], [[refs["style"], refs["face"]]], 1.0)
    torch.testing.assert_close(ours.latents, ref, **CLOSE)
    averaged = generator.generate(
        PROMPT,
        conditions=[IPAdapter("plus", [refs["style"], refs["face"]], source=str(repo), combine="average")],
        **RUN,
    )
    assert not torch.allclose(averaged.latents, ours.latents, atol=1e-3)


def test_masks_match_ip_adapter_mask_processor(generator, pipe, repo, refs):
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255
    masks = [Image.fromarray(left), Image.fromarray(255 - left)]
    conditions = [IPAdapter("plus", refs["style"], source=str(repo), scale=0.6, mask=masks[0]),
                  IPAdapter("plus-face", refs["face"], source=str(repo), scale=0.9, mask=masks[1])]  # fmt: skip
    ours = generator.generate(PROMPT, conditions=conditions, **RUN)
    processed = IPAdapterMaskProcessor().preprocess(masks, height=64, width=64)
    ref = reference(pipe, repo, ["plus", "plus-face"], [refs["style"], refs["face"]], [0.6, 0.9],
                    masks=[processed[0:1], processed[1:2]])  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, **CLOSE)


def test_step_windows(generator, pipe, repo, refs):
    def trace(conditions):
        seen = []
        generator.generate(PROMPT, conditions=conditions, progress=lambda e: seen.append(e.latents.clone()), **RUN)
        return seen

    full = []
    reference(pipe, repo, ["plus"], refs["face"], 1.0, trace=full)
    plain = trace([])
    early = trace([IPAdapter("plus", refs["face"], source=str(repo), window=(0.0, 0.5))])
    late = trace([IPAdapter("plus", refs["face"], source=str(repo), window=(0.5, 1.0))])
    for i in range(3):  # 6 steps: the first 3 lie inside (0, 0.5) and outside (0.5, 1)
        torch.testing.assert_close(early[i], full[i], **CLOSE)
        assert torch.equal(late[i], plain[i])
    assert not torch.allclose(early[3], full[3], atol=1e-4)
    assert not torch.allclose(late[3], plain[3], atol=1e-4)


def test_models_restored_and_calls_do_not_leak(generator, repo, refs):
    unet = generator.base.unet
    before = dict(unet.attn_processors)
    vit_h = generator.generate(PROMPT, conditions=[IPAdapter("vit-h", refs["style"], source=str(repo))], **RUN)
    generator.generate(
        PROMPT,
        conditions=[
            IPAdapter("plus", refs["face"], source=str(repo)),
            IPAdapter("sdxl", refs["style"], source=str(repo)),
        ],
        **RUN,
    )
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    again = generator.generate(PROMPT, conditions=[IPAdapter("vit-h", refs["style"], source=str(repo))], **RUN)
    assert torch.equal(vit_h.latents, again.latents)


def test_saved_embeddings_replace_images(generator, repo, refs, tmp_path):
    with_images = generator.generate(PROMPT, conditions=[IPAdapter("plus-face", refs["face"], source=str(repo))], **RUN)
    cond, uncond = encode_images([refs["face"]], repo / "models" / "image_encoder", hidden_states=True)
    save_embeddings(tmp_path / "face.safetensors", cond, uncond, "plus-face")
    from_file = IPAdapter("plus-face", embeddings=str(tmp_path / "face.safetensors"), source=str(repo))
    torch.testing.assert_close(generator.generate(PROMPT, conditions=[from_file], **RUN).latents, with_images.latents)


def test_grayscale_and_rgba_references(generator, repo, refs):
    gray = refs["face"].convert("L")
    a = generator.generate(PROMPT, conditions=[IPAdapter("plus", gray, source=str(repo))], **RUN)
    b = generator.generate(PROMPT, conditions=[IPAdapter("plus", gray.convert("RGB"), source=str(repo))], **RUN)
    assert torch.equal(a.latents, b.latents)
    generator.generate(PROMPT, conditions=[IPAdapter("plus", refs["face"].convert("RGBA"), source=str(repo))], **RUN)


def test_sd15_adapter_is_refused(generator, repo, refs, tmp_path):
    weights = load_file(str(repo / "sdxl_models" / "ip-adapter_sdxl_vit-h.safetensors"))
    sd15 = {k: (torch.zeros(v.shape[0], 768) if "to_k_ip" in k or "to_v_ip" in k else v) for k, v in weights.items()}
    save_file(sd15, str(tmp_path / "ip-adapter_sd15.safetensors"))
    condition = IPAdapter(
        str(tmp_path / "ip-adapter_sd15.safetensors"),
        refs["face"],
        image_encoder=str(repo / "models" / "image_encoder"),
    )
    with pytest.raises(IncompatibleModelError, match=r"768-wide \(an SD 1.5 IP-Adapter\).*takes 64"):
        generator.generate(PROMPT, conditions=[condition], **RUN)


def test_vit_h_adapter_with_big_g_encoder_is_refused(generator, repo, refs):
    condition = IPAdapter(
        "vit-h", refs["face"], source=str(repo), image_encoder=str(repo / "sdxl_models" / "image_encoder")
    )
    with pytest.raises(
        IncompatibleModelError, match="expects 16-wide image embeddings but the image encoder .* gives 24"
    ):
        generator.generate(PROMPT, conditions=[condition], **RUN)


def test_bad_ip_adapter_requests(generator, repo, refs):
    with pytest.raises(ConditionError, match="reference images or saved embeddings"):
        IPAdapter("plus")
    with pytest.raises(ConditionError, match="cannot apply to the refiner"):
        generator.generate(
            PROMPT,
            conditions=[IPAdapter("plus", refs["face"], source=str(repo), stage=Stage.BOTH)],
            refiner_switch=0.5,
            **RUN,
        )
    with pytest.raises(ConditionError, match="unknown layer preset 'texture'"):
        generator.generate(
            PROMPT, conditions=[IPAdapter("plus", refs["face"], source=str(repo), layers="texture")], **RUN
        )


class _OtherSdpa(AttnProcessor2_0):
    """Same math, another type: the branched processor must wrap it instead of taking its joint path."""


@pytest.mark.parametrize("masked", [False, True])
def test_joint_and_wrapped_branch_paths_agree(masked):
    g = torch.Generator().manual_seed(0)
    attn = Attention(query_dim=64, cross_attention_dim=32, heads=4, dim_head=16).eval()
    hidden, context = torch.randn(2, 16, 64, generator=g), torch.randn(2, 7, 32, generator=g)
    mask = (torch.rand(1, 4, 4, generator=g) > 0.5).float() if masked else None
    branches = [
        AttentionBranch(
            f"b{i}", torch.randn(2, 3 + i, 64, generator=g), torch.randn(2, 3 + i, 64, generator=g), s, mask
        )
        for i, s in enumerate((0.7, 0.4))
    ]
    with torch.no_grad():
        joint = BranchedAttnProcessor(AttnProcessor2_0(), branches)(attn, hidden, context)
        wrapped = BranchedAttnProcessor(_OtherSdpa(), branches)(attn, hidden, context)
        text_only = AttnProcessor2_0()(attn, hidden, context)
    torch.testing.assert_close(joint, wrapped, rtol=1e-5, atol=1e-5)
    assert (joint - text_only).abs().max() > 0.01
