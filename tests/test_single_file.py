"""Single-file SDXL checkpoints as A1111 and ComfyUI users keep them: tiny base and refiner written in Stability's
original (SGM) key layout — the inverse of diffusers' conversion, with the embedded text encoders — load offline with
SDXL 1.0's packaged component configs or those of a named local folder and make the same pixels as the diffusers folders; the recipe and the
A1111 parameters name them by file with A1111's hash; files that are something else are named for what they are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdxl_control import Generator, IncompatibleModelError
from sdxl_control.base.files import sha256_of
from sdxl_control.engine.models import load_stage
from sdxl_control.jobs.png_import import read_a1111
from sdxl_control.protocol.conditions import Stage
from sdxl_control.records.infotext import parameters_text
from sdxl_control.testing.single_file import write_single_file
from sdxl_control.testing.tiny import write_tiny_base

RUN = dict(steps=3, size=(64, 64), seed=2, refiner_switch=0.5, negative_prompt="blurry", progress_bar=False)


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    # SDXL's two text encoders differ in width (768, 1280): that is how a single file's encoders are told apart.
    base = write_tiny_base(root / "base", seed=3, first_width=24)
    return {"base": base, "refiner": tiny.refiner, "root": root}


def test_sgm_files_load_offline_and_make_the_folders_pixels(folders):
    root = folders["root"]
    base_file = write_single_file(folders["base"], root / "juggernautXL_tiny.safetensors")
    refiner_file = write_single_file(folders["refiner"], root / "refiner_tiny.safetensors")
    from safetensors import safe_open

    with safe_open(str(base_file), framework="pt") as f:
        keys = set(f.keys())
    # The published layout's landmarks: the UNet's numbering, the VAE's, both text encoders'.
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
            "model.diffusion_model.output_blocks.2.2.conv.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection"} <= keys  # fmt: skip
    from_files = Generator.from_pretrained(base_file, refiner_file, device="cpu", base_config=folders["base"],
                                           refiner_config=folders["refiner"])  # fmt: skip
    from_folders = Generator.from_pretrained(folders["base"], folders["refiner"], device="cpu")
    ours, theirs = from_files.generate("a red fox", **RUN), from_folders.generate("a red fox", **RUN)
    assert np.array_equal(np.asarray(ours.images[0]), np.asarray(theirs.images[0]))
    torch.testing.assert_close(ours.latents, theirs.latents, rtol=1e-4, atol=1e-4)
    for stage in ("base", "refiner"):  # every weight came through the conversion unchanged
        for part in ("unet", "vae"):
            a, b = (
                getattr(getattr(from_files, stage), part).state_dict(),
                getattr(getattr(from_folders, stage), part).state_dict(),
            )
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (stage, part)
    recipe = ours.images[0].recipe
    assert recipe["models"]["base"]["name"] == "juggernautXL_tiny.safetensors"
    assert recipe["models"]["base"]["sha256"] == sha256_of(base_file)
    text = parameters_text(recipe)
    assert f"Model hash: {sha256_of(base_file)[:10]}, Model: juggernautXL_tiny" in text  # A1111's hash convention
    assert f"Refiner: refiner_tiny [{sha256_of(refiner_file)[:10]}]" in text
    assert read_a1111(text).models == {"base": "juggernautXL_tiny", "refiner": "refiner_tiny"}


@pytest.mark.parametrize(
    ("keys", "what"),
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": 2}, "a LoRA"),
        ({"cond_stage_model.transformer.text_model.embeddings.position_ids": 2,
          "model.diffusion_model.input_blocks.0.0.weight": 2}, "an SD 1.x checkpoint"),
        ({"cond_stage_model.model.token_embedding.weight": 2, "model.diffusion_model.out.2.bias": 2},
         "an SD 2.x checkpoint"),
        ({"controlnet_cond_embedding.conv_in.weight": 2}, "a ControlNet"),
        ({"encoder.down.0.block.0.conv1.weight": 2}, "a VAE"),
        ({"down_blocks.0.resnets.0.conv1.weight": 2}, "a UNet-only checkpoint"),
        ({"something.else": 2}, "no model this knows"),
    ],
    ids=["lora", "sd15", "sd2", "controlnet", "vae", "unet", "unknown"],
)  # fmt: skip
def test_a_file_that_is_no_sdxl_checkpoint_is_named_for_what_it_is(tmp_path, keys, what):
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(n) for k, n in keys.items()}, path)
    with pytest.raises(IncompatibleModelError, match=f"not a single-file SDXL checkpoint .*: it holds {what}"):
        load_stage(path, Stage.BASE)


def test_without_a_config_folder_the_packaged_sdxl_configs_are_read(folders, tmp_path, monkeypatch):
    """The default: SDXL 1.0's component configs come with the package and the tokenizers are rebuilt offline — no
    hub, no HF cache (pointed at an empty folder). Here the packaged files are the tiny models' own configs under the
    packaged names, so the tiny files read through the same path and must make the folders' pixels."""
    from huggingface_hub import constants

    from sdxl_control.weights import sdxl_configs

    packaged = tmp_path / "configs"
    packaged.mkdir()
    for stage, names in (("base", sdxl_configs._LAYOUT[Stage.BASE]), ("refiner", sdxl_configs._LAYOUT[Stage.REFINER])):
        for relative, name in names.items():  # the VAE and second encoder: one config for both stages, the base's
            if not (packaged / f"{name}.json").exists():
                (packaged / f"{name}.json").write_text((folders[stage] / relative).read_text())
    monkeypatch.setattr(sdxl_configs, "CONFIGS", packaged)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    base_file = write_single_file(folders["base"], tmp_path / "base.safetensors")
    refiner_file = write_single_file(folders["refiner"], tmp_path / "refiner.safetensors")
    alone = Generator.from_pretrained(base_file, refiner_file, device="cpu")
    plain = Generator.from_pretrained(folders["base"], folders["refiner"], device="cpu")
    assert np.array_equal(np.asarray(alone.generate("a fox", **RUN).images[0]),
                          np.asarray(plain.generate("a fox", **RUN).images[0]))  # fmt: skip
    assert not (tmp_path / "empty-cache").exists()


def test_the_packaged_configs_are_sdxl_1_0s():
    """The packaged folder builds SDXL 1.0's published architectures: parameter counts as the published fp16 files
    weigh (UNet 5.14 GB, refiner UNet 4.52 GB, text encoders 246 MB and 1.39 GB, VAE 167 MB), the tokenizers CLIP's
    with each encoder's padding token, the pipelines' flags and scheduler."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdxl_control.weights.sdxl_configs import sdxl_config_folder

    def count(module):
        return sum(p.numel() for p in module.parameters())

    published = {"base": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863}
    for stage in (Stage.BASE, Stage.REFINER):
        with sdxl_config_folder(stage) as folder, init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
            tok2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
            index = json.loads((folder / "model_index.json").read_text())
            scheduler = EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
            if stage == Stage.BASE:
                te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
                tok1 = CLIPTokenizer.from_pretrained(folder / "tokenizer")
                assert count(te1) == published["text_encoder"]
                assert tok1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
                assert (tok1.pad_token_id, tok1.model_max_length) == (49407, 77)
                assert count(unet) == published["base"]
                assert index["force_zeros_for_empty_prompt"] is True
            else:
                assert abs(count(unet) * 2 - 4.52e9) < 0.005e9
                assert not (folder / "text_encoder").exists() and index["requires_aesthetics_score"] is True
        assert count(vae) == published["vae"] and vae.config.scaling_factor == 0.13025
        assert count(te2) == published["text_encoder_2"]
        assert (tok2.pad_token_id, tok2.model_max_length) == (0, 77)
        assert scheduler.config.timestep_spacing == "leading" and scheduler.config.steps_offset == 1


def test_a_tiny_file_read_with_sdxls_configs_says_to_name_its_own(folders, tmp_path):
    base_file = write_single_file(folders["base"], tmp_path / "odd.safetensors")
    with pytest.raises(IncompatibleModelError, match="does not read with SDXL 1.0's base configs .*base_config="):
        load_stage(base_file, Stage.BASE)


def test_a_controlnet_kept_as_one_file_makes_its_folders_pixels(tiny, tmp_path):
    """SDXL's published ControlNets as ComfyUI and A1111 users keep them: the diffusers weights alone, renamed; read
    with the layout of the UNet they serve, no hub. A file of another shape is left to diffusers' conversion, which
    says it needs the ControlNet's own config offline."""
    import shutil

    from PIL import Image

    from sdxl_control.adapters.controlnet import ControlNet
    from sdxl_control.base.errors import MissingWeightsError
    from sdxl_control.testing import write_tiny_controlnet

    folder = write_tiny_controlnet(tmp_path / "cn", tiny.base, seed=4)
    file = tmp_path / "diffusers_xl_canny_full.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", file)
    gen = Generator.from_pretrained(tiny.base, device="cpu")
    edges = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8))
    run = {k: v for k, v in RUN.items() if k != "refiner_switch"}
    results = [gen.generate("a fox", conditions=[ControlNet(str(m), image=edges)], **run) for m in (file, folder)]
    assert torch.equal(results[0].latents, results[1].latents)
    other = tmp_path / "other.safetensors"
    save_file({"controlnet_cond_embedding.conv_in.weight": torch.zeros(2)}, other)
    with pytest.raises(MissingWeightsError, match="could not convert this single-file ControlNet offline"):
        gen.generate("a fox", conditions=[ControlNet(str(other), image=edges)], **run)


def test_an_image_encoder_kept_as_one_file_makes_its_folders_pixels(tiny, tmp_path, monkeypatch):
    """ComfyUI's clip_vision files (the transformers weights of a published CLIP vision tower, renamed) read with that
    tower's published config, told by its depth as ComfyUI tells them apart; here the tiny tower's depth stands in."""
    import json
    import shutil

    from PIL import Image

    from sdxl_control.adapters import ip_adapter
    from sdxl_control.adapters.ip_adapter import IPAdapter
    from sdxl_control.testing.ip_adapter import write_tiny_ip_adapter_repo

    repo = write_tiny_ip_adapter_repo(tmp_path / "ip", tiny.base)
    folder = repo / "models" / "image_encoder"
    config = json.loads((folder / "config.json").read_text())
    published = {k: config[k] for k in ("hidden_size", "intermediate_size", "projection_dim", "hidden_act")}
    common = {k: config[k] for k in ("num_attention_heads", "image_size", "patch_size", "layer_norm_eps")}
    monkeypatch.setitem(ip_adapter.VISION_CONFIGS, config["num_hidden_layers"], published)
    monkeypatch.setattr(ip_adapter, "VISION_COMMON", common)
    file = tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    shutil.copy(folder / "model.safetensors", file)
    gen = Generator.from_pretrained(tiny.base, device="cpu")
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), np.uint8))
    run = {k: v for k, v in RUN.items() if k != "refiner_switch"}
    results = [gen.generate("a fox", conditions=[IPAdapter("plus", photo, source=str(repo), image_encoder=str(e))],
                            **run) for e in (file, folder)]  # fmt: skip
    assert torch.equal(results[0].latents, results[1].latents)
    monkeypatch.delitem(ip_adapter.VISION_CONFIGS, config["num_hidden_layers"])
    other = tmp_path / "other.safetensors"
    shutil.copy(folder / "model.safetensors", other)
    with pytest.raises(IncompatibleModelError, match="not one of the published CLIP vision towers .* 2 layers"):
        gen.generate("a fox", conditions=[IPAdapter("plus", photo, source=str(repo), image_encoder=str(other))], **run)


def test_a_vae_file_replaces_the_checkpoints_for_a_call(tiny, tmp_path):
    """A VAE kept as one file, in diffusers' layout or the original one (as ``sdxl_vae.safetensors``), or a folder:
    read with the architecture of the VAE it replaces, used for the call only, recorded and re-made."""
    import shutil

    from sdxl_control import GenerationRequest
    from sdxl_control.base.files import Locator
    from sdxl_control.cli import main
    from sdxl_control.records.recipe import read_recipe
    from sdxl_control.testing import tiny_models
    from sdxl_control.testing.single_file import write_vae_file

    install = tmp_path / "ComfyUI" / "models" / "vae"
    install.mkdir(parents=True)
    diffusers_file = install / "sdxl_vae.safetensors"
    shutil.copy(tiny.base / "vae" / "diffusion_pytorch_model.safetensors", diffusers_file)
    original_file = write_vae_file(tiny.base / "vae", tmp_path / "original_vae.safetensors")
    other = tiny_models(seed=1).base / "vae"  # another VAE of the same shape
    gen = Generator.from_pretrained(tiny.base, device="cpu")
    vae = gen.base.vae
    run = {k: v for k, v in RUN.items() if k != "refiner_switch"}
    plain = gen.generate("a fox", **run)
    for source in (diffusers_file, original_file, tiny.base / "vae"):
        same = gen.generate("a fox", vae=str(source), **run)
        assert np.array_equal(np.asarray(same.images[0]), np.asarray(plain.images[0])), source
    changed = gen.generate("a fox", vae=str(other), **run)
    assert torch.equal(changed.latents, plain.latents)
    assert not np.array_equal(np.asarray(changed.images[0]), np.asarray(plain.images[0]))
    assert gen.base.vae is vae  # the call's VAE is gone after it
    recipe = changed.images[0].recipe
    assert "vae" not in plain.images[0].recipe and recipe["vae"]["folder"] == "vae"
    again = gen.run(GenerationRequest.from_recipe(recipe, locate=Locator([other.parent])), progress_bar=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(changed.images[0]))
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(2)}, lora)
    with pytest.raises(IncompatibleModelError, match="is not a VAE: it holds a LoRA"):
        gen.generate("a fox", vae=str(lora), **run)
    out = tmp_path / "cli.png"
    argv = ["generate", "a fox", "--tiny", "--size", "64x64", "--steps", "2", "-q", "-o", str(out)]
    assert main([*argv, "--models-dir", str(tmp_path / "ComfyUI"), "--vae", "sdxl_vae"]) == 0
    assert read_recipe(out)["vae"]["file"] == "sdxl_vae.safetensors"
