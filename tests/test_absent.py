"""The protocol's one rule, for every condition kind and every channel it uses (residuals, attention branches, the
prompt, weight deltas): scale 0, and a step window that holds no step, give the very pixels of the call without the
condition, in each stage the kind applies to. Each case also shows the condition does act when it is on, so the
comparison cannot pass by the condition doing nothing at all."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_control import Generator
from sdxl_control.adapters import CONDITION_KINDS
from sdxl_control.adapters.apg import APG
from sdxl_control.adapters.controlnet import ControlNet, ControlNetUnion
from sdxl_control.adapters.faceid import FaceID, save_face
from sdxl_control.adapters.freeu import FreeU
from sdxl_control.adapters.instantid import InstantID
from sdxl_control.adapters.ip_adapter import IPAdapter
from sdxl_control.adapters.lora import LoRA
from sdxl_control.adapters.pag import PAG
from sdxl_control.adapters.photomaker import PhotoMaker
from sdxl_control.adapters.pulid import PuLID
from sdxl_control.adapters.regions import Region
from sdxl_control.preprocessors.face import FaceInfo, Identity
from sdxl_control.protocol.conditions import Condition, Window
from sdxl_control.testing.lora import write_tiny_lora
from sdxl_control.testing.pulid import TINY_EVA
from sdxl_control.testing.stand_ins import tiny_condition

PROMPT = "a photo of a man img, in a garden"  # PhotoMaker's trigger; plain words to the others
STEPS = 8
SWITCH = 0.5  # the refiner runs steps 4..7
# A window no step lies in: step 0 of 8 would need its end (1/8) <= 0.1.
EMPTY = Window(0.0, 0.1)
# For the refiner: only base steps.
BASE_ONLY = Window(0.0, SWITCH)


def _photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _face(seed: int) -> FaceInfo:
    rng = np.random.default_rng(seed)
    points = np.array([[22, 24], [42, 23], [32, 34], [24, 45], [40, 44]], np.float32)
    embedding = (rng.standard_normal(512) * 1.2).astype(np.float32)
    return FaceInfo((10, 10, 54, 54), points, 0.9, embedding, _photo(seed + 1).resize((224, 224)), (64, 64))


def _faceid(folder: Path) -> Condition:
    path = folder / "face.safetensors"
    save_face(path, torch.from_numpy(_face(3).normed_embedding[None]))
    return FaceID("faceid", embeddings=str(path), scale=0.9)


def _pulid(folder: Path) -> Condition:
    rng = np.random.default_rng(4)
    tokens = TINY_EVA["grid"] ** 2 + 1
    identity = Identity(
        embeddings=(rng.standard_normal((1, 512)) * 20).astype(np.float32),
        keypoints=_face(4).landmarks,
        image_size=(64, 64),
        pack="antelopev2",
        eva_cls=rng.standard_normal((1, TINY_EVA["proj"])).astype(np.float32),
        eva_hidden=rng.standard_normal((1, 5, tokens, TINY_EVA["width"])).astype(np.float32),
    )
    identity.save(folder / "pulid.safetensors")
    return PuLID(identity=str(folder / "pulid.safetensors"), version="v1.1", scale=1.0)


def _refiner_lora(folder: Path, refiner: Path) -> Condition:
    """A peft-layout LoRA on the refiner's attention projections (the tiny base's LoRA does not fit it)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(refiner, subfolder="unet")
    g = torch.Generator().manual_seed(5)
    state = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_v")):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.3
            state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.3
    save_file(state, str(folder / "refiner-lora.safetensors"))
    return LoRA(str(folder / "refiner-lora.safetensors"), stage="refiner")


# kind -> (build the condition on the tiny stand-ins, the fields that switch all of it off). InstantID is two parts
# with a scale and a window each (the face-token branch and IdentityNet): both are switched.
CASES: dict[str, tuple[Callable[[Path, Any], Condition], tuple[str, ...]]] = {
    "controlnet": (lambda f, t: ControlNet("diffusers/controlnet-canny-sdxl-1.0", image=_photo(1)), ()),
    "controlnet-union": (lambda f, t: ControlNetUnion("xinsir/controlnet-union-sdxl-1.0", pose=_photo(2)), ()),
    "ip-adapter": (lambda f, t: IPAdapter("plus", _photo(6), scale=1.0), ()),
    "faceid": (lambda f, t: _faceid(f), ()),
    "instantid": (lambda f, t: InstantID(faces=_face(7), scale=1.0), ("controlnet",)),
    "pulid": (lambda f, t: _pulid(f), ()),
    "photomaker": (lambda f, t: PhotoMaker(_photo(8), version="v1", start_merge=0.25), ()),
    "lora": (lambda f, t: LoRA("some/hub-lora", weight_name="style.safetensors", scale=1.0), ()),
    "lora-text": (
        lambda f, t: LoRA(str(write_tiny_lora(f / "text.safetensors", t.base, "kohya", seed=9, text=True))),
        (),
    ),
    "lora-refiner": (lambda f, t: _refiner_lora(f, t.refiner), ()),
    "pag": (lambda f, t: PAG(), ()),
    # At 64x64 the tiny refiner's mid block sees one token (self-attention is the identity there already).
    "pag-refiner": (lambda f, t: PAG(layers=("mid", "down_blocks.1"), stage="refiner"), ()),
    # eta 1 keeps the whole guidance (APG is then CFG unless its norm threshold bites): eta 0 shows it acting.
    "apg": (lambda f, t: APG(eta=0.0), ()),
    "apg-refiner": (lambda f, t: APG(eta=0.0, stage="refiner"), ()),
    "freeu": (lambda f, t: FreeU(), ()),
    "freeu-refiner": (lambda f, t: FreeU(stage="refiner"), ()),
    "region": (lambda f, t: Region("a red dog", box=(0.0, 0.0, 0.5, 1.0), negative_prompt="blurry"), ()),
    "region-refiner": (lambda f, t: Region("a red dog", box=(0.0, 0.0, 0.5, 1.0), stage="refiner"), ()),
    "region-attention": (
        lambda f, t: Region(prompt="a red-haired woman", box=(0.0, 0.0, 0.5, 1.0), mode="attention"),
        (),
    ),
}


def test_every_condition_kind_has_a_case():
    assert set(CONDITION_KINDS) <= {kind.partition("-refiner")[0].removesuffix("-text") for kind in CASES}


def _off(condition: Condition, parts: tuple[str, ...], how: str) -> Condition:
    prefixes = ("", *(f"{part}_" for part in parts))
    if how == "scale 0":
        return dataclasses.replace(condition, **{f"{p}scale": 0.0 for p in prefixes})
    empty = BASE_ONLY if condition.stage.label == "refiner" else EMPTY
    return dataclasses.replace(condition, **{f"{p}window": empty for p in prefixes})


@pytest.fixture(scope="module")
def run(generator: Generator) -> Callable[..., torch.Tensor]:
    def make(conditions: list[Condition], refiner: bool) -> torch.Tensor:
        result = generator.generate(PROMPT, conditions=conditions, steps=STEPS, size=(64, 64), seed=11, guidance=5.0,
                                    refiner_switch=SWITCH if refiner else None)  # fmt: skip
        return result.latents

    return make


@pytest.mark.parametrize("how", ["scale 0", "empty window"])
@pytest.mark.parametrize("kind", list(CASES))
def test_off_is_the_same_as_absent(kind, how, run, tiny, tmp_path):
    build, parts = CASES[kind]
    condition = tiny_condition(build(tmp_path, tiny))
    refiner = condition.stage.label == "refiner"
    absent = run([], refiner)
    assert not torch.equal(run([condition], refiner), absent), f"{kind} changes nothing even when on"
    off = _off(condition, parts, how)
    assert torch.equal(run([off], refiner), absent)
    # Beside another condition too: what the other one does is left as it is.
    other = tiny_condition(LoRA("another/hub-lora", weight_name="other.safetensors", scale=0.7))
    assert torch.equal(run([off, other], refiner), run([other], refiner))


def _unet_reads(generator: Generator, condition: Condition) -> torch.Tensor:
    """The conditional prompt embeddings the UNet reads at the last step."""
    seen = []
    hook = generator.base.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"][-1].clone()), with_kwargs=True
    )
    try:
        generator.generate(PROMPT, conditions=[condition], steps=4, size=(64, 64), seed=1, progress_bar=False)
    finally:
        hook.remove()
    return seen[-1]


def test_photomaker_scale_weighs_the_identity_and_lora_scale_its_lora(generator):
    """``scale`` moves the identity positions of the prompt linearly from the class word's embedding (towards 0) to the
    fused one (1, the reference); ``lora_scale`` weighs the LoRA alone."""
    base = tiny_condition(PhotoMaker(_photo(8), version="v1", start_merge=0.0))
    reads = {s: _unet_reads(generator, dataclasses.replace(base, scale=s)) for s in (0.25, 0.5, 1.0)}
    moved = (reads[1.0] - reads[0.5]).abs().sum(-1) > 0
    assert 0 < int(moved.sum()) < moved.numel()  # the class-word copies only
    torch.testing.assert_close(reads[1.0] - reads[0.5], 2 * (reads[0.5] - reads[0.25]), rtol=1e-4, atol=1e-5)
    unweighted = dataclasses.replace(base, lora_scale=0.0)
    assert torch.equal(_unet_reads(generator, unweighted), reads[1.0])  # the prompt does not see the LoRA
    kwargs = dict(steps=4, size=(64, 64), seed=1, progress_bar=False)
    assert not torch.equal(generator.generate(PROMPT, conditions=[unweighted], **kwargs).latents,
                           generator.generate(PROMPT, conditions=[base], **kwargs).latents)  # fmt: skip


def test_recipes_of_0_1_read_photomaker_scale_as_the_lora_weight():
    """Before 0.2.0 a PhotoMaker's ``scale`` weighed its LoRA and the identity was always fused whole: such recipes
    (and only those) are read as ``lora_scale``, so they re-make the same pixels; a job written today is read as is."""
    from sdxl_control.adapters import condition_from_settings

    settings = {"kind": "photomaker", "faces": "me.png", "version": "v1", "scale": 0.8, "weights": "pm.bin"}
    old = condition_from_settings(settings, version="0.1.0")
    assert (old.scale, old.lora_scale) == (1.0, 0.8)  # type: ignore[attr-defined]
    new = condition_from_settings(settings)
    assert (new.scale, new.lora_scale) == (0.8, 1.0)  # type: ignore[attr-defined]
    lora = condition_from_settings({"kind": "lora", "source": "x.safetensors", "scale": 0.8}, version="0.1.0")
    assert lora.scale == 0.8
