"""FaceID conditions equal diffusers' ip_adapter_image_embeds path (with the checkpoints' attention LoRA), and
leave the UNet bit-identical afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from sdxl_control import ConditionError
from sdxl_control.adapters.faceid import FaceID, save_face
from sdxl_control.adapters.ip_adapter import encode_images
from sdxl_control.preprocessors.face import FaceInfo
from sdxl_control.testing.ip_adapter import write_tiny_faceid_repo, write_tiny_ip_adapter_repo

from .conftest import as_reference

PROMPT = "a portrait"
RUN = dict(steps=6, size=(64, 64), seed=5, progress_bar=False)
CLOSE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def repos(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("faceid")
    return write_tiny_faceid_repo(root / "h94-IP-Adapter-FaceID", tiny.base), write_tiny_ip_adapter_repo(
        root / "h94-IP-Adapter", tiny.base
    )


def fake_face(seed: int) -> FaceInfo:
    rng = np.random.default_rng(seed)
    embedding = rng.standard_normal(512).astype(np.float32)
    aligned = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    # A raw embedding, as the analyser gives it; FaceID takes its normalised form.
    return FaceInfo((0, 0, 100, 100), np.zeros((5, 2), np.float32), 0.9, embedding * 3.0, aligned, (100, 100))


@pytest.fixture(scope="module")
def faces():
    return [fake_face(1), fake_face(2)]


def reference(tiny, repo, weight_name, faces, scale, clip=None, s_scale=1.0):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny.base)
    as_reference(pipe)
    pipe.load_ip_adapter(str(repo), subfolder=None, weight_name=weight_name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    ids = torch.from_numpy(np.stack([f.normed_embedding for f in faces]))[None]
    embeds = torch.cat([torch.zeros_like(ids), ids])
    if clip is not None:
        projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        cond, uncond = clip
        projection.clip_embeds = torch.cat([uncond[None], cond[None]])
        projection.shortcut, projection.shortcut_scale = True, s_scale
    with torch.no_grad():
        return pipe(PROMPT, ip_adapter_image_embeds=[embeds], num_inference_steps=6, guidance_scale=5.0, height=64,
                    width=64, generator=torch.Generator().manual_seed(5), output_type="latent").images  # fmt: skip


def test_faceid_matches_diffusers(generator, tiny, repos, faces):
    faceid, _ = repos
    ours = generator.generate(PROMPT, conditions=[FaceID("faceid", faces[0], source=str(faceid), scale=0.7)], **RUN)
    ref = reference(tiny, faceid, "ip-adapter-faceid_sdxl.bin", faces[:1], 0.7)
    torch.testing.assert_close(ours.latents, ref, **CLOSE)


def test_two_faces_add_their_tokens(generator, tiny, repos, faces):
    faceid, _ = repos
    ours = generator.generate(PROMPT, conditions=[FaceID("faceid", faces, source=str(faceid))], **RUN)
    torch.testing.assert_close(ours.latents, reference(tiny, faceid, "ip-adapter-faceid_sdxl.bin", faces, 1.0), **CLOSE)


def test_plusv2_with_shortcut_matches_diffusers(generator, tiny, repos, faces):
    faceid, ip = repos
    encoder = ip / "models" / "image_encoder"
    condition = FaceID("plusv2", faces[0], source=str(faceid), image_encoder=str(encoder), s_scale=1.5, scale=0.8)
    ours = generator.generate(PROMPT, conditions=[condition], **RUN)
    clip = encode_images([faces[0].aligned], encoder, hidden_states=True)
    ref = reference(tiny, faceid, "ip-adapter-faceid-plusv2_sdxl.bin", faces[:1], 0.8, clip=clip, s_scale=1.5)
    torch.testing.assert_close(ours.latents, ref, **CLOSE)
    weaker = FaceID("plusv2", faces[0], source=str(faceid), image_encoder=str(encoder), s_scale=0.0, scale=0.8)
    assert not torch.allclose(generator.generate(PROMPT, conditions=[weaker], **RUN).latents, ours.latents, atol=1e-4)


def test_lora_is_removed_bit_exactly(generator, repos, faces):
    faceid, _ = repos
    unet = generator.base.unet
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    parameters = {n: id(p) for n, p in unet.named_parameters()}
    plain = generator.generate(PROMPT, **RUN)
    generator.generate(PROMPT, conditions=[FaceID("faceid", faces[0], source=str(faceid))], **RUN)
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())
    assert {n: id(p) for n, p in unet.named_parameters()} == parameters
    assert torch.equal(generator.generate(PROMPT, **RUN).latents, plain.latents)


def test_saved_face_embeddings(generator, repos, faces, tmp_path):
    faceid, ip = repos
    encoder = ip / "models" / "image_encoder"
    direct = generator.generate(
        PROMPT, conditions=[FaceID("plusv2", faces[1], source=str(faceid), image_encoder=str(encoder))], **RUN
    )
    ids = torch.from_numpy(faces[1].normed_embedding[None])
    save_face(tmp_path / "me.safetensors", ids, encode_images([faces[1].aligned], encoder, hidden_states=True))
    saved = FaceID("plusv2", embeddings=str(tmp_path / "me.safetensors"), source=str(faceid))
    torch.testing.assert_close(generator.generate(PROMPT, conditions=[saved], **RUN).latents, direct.latents)
    save_face(tmp_path / "id-only.safetensors", ids)
    with pytest.raises(ConditionError, match="no CLIP face features"):
        generator.generate(
            PROMPT,
            conditions=[FaceID("plusv2", embeddings=str(tmp_path / "id-only.safetensors"), source=str(faceid))],
            **RUN,
        )


def test_faceid_needs_faces_or_embeddings():
    with pytest.raises(ConditionError, match="one of the two"):
        FaceID("faceid")


def test_faceid_file_given_by_path(generator, repos, faces):
    """A local FaceID .bin loads like the published variant (read with weights_only=True, not refused as a pickle)."""
    faceid, _ = repos
    by_variant = generator.generate(PROMPT, conditions=[FaceID("faceid", faces[0], source=str(faceid))], **RUN)
    by_path = generator.generate(
        PROMPT, conditions=[FaceID(str(faceid / "ip-adapter-faceid_sdxl.bin"), faces[0])], **RUN
    )
    assert torch.equal(by_path.latents, by_variant.latents)
