"""LoRA conditions equal diffusers' load_lora_weights + set_adapters, and leave every weight bit-identical."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from sdxl_control import IncompatibleModelError
from sdxl_control.adapters.lora import LoRA
from sdxl_control.testing.lora import write_tiny_lora

from .conftest import as_reference

PROMPT = "a watercolour fox"
RUN = dict(steps=6, size=(64, 64), seed=4, progress_bar=False)
CLOSE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory):
    # diffusers is the reference for UNet LoRAs only: with transformers 5, its load_lora_weights re-initialises the
    # CLIP text encoder. Text-encoder parts are checked against the LoRA formula directly below.
    # diffusers 0.42.1 also ignores kohya alphas on attention layers (peft warns "alpha_pattern keys did not match");
    # the diffusers comparison uses attention alphas equal to the rank, test_kohya_alphas checks them all.
    root = tmp_path_factory.mktemp("loras")
    return {
        "kohya": write_tiny_lora(
            root / "kohya.safetensors", tiny.base, "kohya", seed=1, text=False, attention_alpha=4.0
        ),
        "kohya-alphas": write_tiny_lora(root / "kohya-alphas.safetensors", tiny.base, "kohya", seed=5, text=False),
        "peft": write_tiny_lora(root / "peft.safetensors", tiny.base, "peft", seed=2, text=False),
        "kohya+te": write_tiny_lora(root / "kohya-te.safetensors", tiny.base, "kohya", seed=3),
        "peft+te": write_tiny_lora(root / "peft-te.safetensors", tiny.base, "peft", seed=4),
    }


def reference(tiny, files_and_weights):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny.base)
    as_reference(pipe)
    names = []
    for i, (path, _) in enumerate(files_and_weights):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    pipe.set_adapters(names, [w for _, w in files_and_weights])
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=6, guidance_scale=5.0, height=64, width=64,
                    generator=torch.Generator().manual_seed(4), output_type="latent").images  # fmt: skip


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_one_lora_matches_diffusers(generator, tiny, loras, layout):
    ours = generator.generate(PROMPT, conditions=[LoRA(str(loras[layout]), scale=0.8)], **RUN)
    torch.testing.assert_close(ours.latents, reference(tiny, [(loras[layout], 0.8)]), **CLOSE)
    assert not torch.allclose(ours.latents, generator.generate(PROMPT, **RUN).latents, atol=1e-3)


def test_two_loras_with_weights_match_set_adapters(generator, tiny, loras):
    ours = generator.generate(
        PROMPT, conditions=[LoRA(str(loras["kohya"]), scale=0.7), LoRA(str(loras["peft"]), scale=0.4)], **RUN
    )
    torch.testing.assert_close(ours.latents, reference(tiny, [(loras["kohya"], 0.7), (loras["peft"], 0.4)]), **CLOSE)


def test_weights_bit_identical_afterwards(generator, loras):
    modules = [generator.base.unet, *(e.model for e in generator.base.text_encoders)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    ids = [{n: id(p) for n, p in m.named_parameters()} for m in modules]
    generator.generate(
        PROMPT, conditions=[LoRA(str(loras["kohya+te"])), LoRA(str(loras["peft+te"]), scale=-0.5)], **RUN
    )
    for module, state, params in zip(modules, before, ids, strict=True):
        assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
        assert {n: id(p) for n, p in module.named_parameters()} == params


def test_window_fuses_only_inside(generator, loras):
    def trace(conditions):
        seen = []
        generator.generate(PROMPT, conditions=conditions, progress=lambda e: seen.append(e.latents.clone()), **RUN)
        return seen

    plain, late = trace([]), trace([LoRA(str(loras["kohya"]), window=(0.5, 1.0))])
    for i in range(3):
        assert torch.equal(late[i], plain[i])
    assert not torch.allclose(late[3], plain[3], atol=1e-4)


def test_scale_zero_is_absent(generator, loras):
    assert torch.equal(generator.generate(PROMPT, conditions=[LoRA(str(loras["kohya"]), scale=0.0)], **RUN).latents,
                       generator.generate(PROMPT, **RUN).latents)  # fmt: skip


def test_lora_for_another_architecture_is_refused(generator, loras, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "sd15.safetensors"
    save_file({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(16, 4)}, str(path))  # fmt: skip
    with pytest.raises(
        IncompatibleModelError,
        match=r"sd15.safetensors \(base UNet\): LoRA does not fit this UNet at .*attn2.to_k.weight",
    ):
        generator.generate(PROMPT, conditions=[LoRA(str(path))], **RUN)
    assert torch.equal(generator.generate(PROMPT, **RUN).latents, generator.generate(PROMPT, **RUN).latents)


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_text_encoder_part_follows_the_lora_formula(generator, loras, layout):
    """Prompt embeddings under the LoRA equal those of a text encoder patched by hand with W + w * alpha/r * up @ down."""
    import copy

    from safetensors.torch import load_file

    from sdxl_control import Generator
    from sdxl_control.protocol.text import TextEncoder

    weight = 0.6
    state = load_file(str(loras[f"{layout}+te"]))
    patched = copy.deepcopy(generator.base.text_encoders[0].model)
    for proj in ("q", "v"):
        if layout == "kohya":
            stem = f"lora_te1_text_model_encoder_layers_1_self_attn_{proj}_proj"
            down, up = state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"]
            alpha = float(state[f"{stem}.alpha"])
        else:
            stem = f"text_encoder.text_model.encoder.layers.1.self_attn.{proj}_proj"
            down, up = state[f"{stem}.lora_A.weight"], state[f"{stem}.lora_B.weight"]
            alpha = down.shape[0]
        layer = patched.get_submodule(f"encoder.layers.1.self_attn.{proj}_proj")
        layer.weight.data += weight * alpha / down.shape[0] * up @ down
    unet_only = {k: v for k, v in state.items() if "te1" not in k and "text_encoder" not in k}
    from safetensors.torch import save_file

    save_file(unet_only, str(loras[f"{layout}+te"]) + ".unet.safetensors")
    base = copy.copy(generator.base)
    base.text_encoders = (TextEncoder(base.text_encoders[0].tokenizer, patched, "text_encoder"), base.text_encoders[1])
    by_hand = Generator(base).generate(
        PROMPT, conditions=[LoRA(str(loras[f"{layout}+te"]) + ".unet.safetensors", scale=weight)], **RUN
    )
    ours = generator.generate(PROMPT, conditions=[LoRA(str(loras[f"{layout}+te"]), scale=weight)], **RUN)
    torch.testing.assert_close(ours.latents, by_hand.latents, **CLOSE)
    without_text = generator.generate(
        PROMPT, conditions=[LoRA(str(loras[f"{layout}+te"]) + ".unet.safetensors", scale=weight)], **RUN
    )
    assert not torch.allclose(ours.latents, without_text.latents, atol=1e-4)


def test_kohya_alphas_scale_every_module(generator, loras):
    """Each module's delta is weight * alpha / rank * up @ down (kohya's definition), attention layers included."""
    from safetensors.torch import load_file

    from sdxl_control.testing.lora import KOHYA_UNET
    from sdxl_control.weights.conversion import lora_deltas

    state = load_file(str(loras["kohya-alphas"]))
    deltas = lora_deltas(state, generator.base.unet.config, weight=0.5)["unet"]
    assert len(deltas) == len(KOHYA_UNET)
    halved = 0
    for kohya, module in KOHYA_UNET.items():
        down, up = state[f"lora_unet_{kohya}.lora_down.weight"], state[f"lora_unet_{kohya}.lora_up.weight"]
        alpha, rank = float(state[f"lora_unet_{kohya}.alpha"]), down.shape[0]
        halved += alpha != rank
        expected = (
            (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) if down.ndim == 4 else up @ down
        )
        torch.testing.assert_close(deltas[f"{module}.weight"].dense(), 0.5 * alpha / rank * expected)
    assert halved >= 3
