"""Attention couple (``Region(mode="attention")``): Forge Couple's blending of the regions' cross-attention, on the
tiny models.

The reference is a transcription of Forge Couple's ``lib_couple/attention_couple.py`` (``AttentionCouple.patch_unet``:
its ``attn2_patch`` and ``attn2_output_patch``) and ``lib_couple/attention_masks.py`` (``get_mask``), and of the box and
mask mappings of ``lib_couple/mapping.py`` (``advanced_mapping``, ``b64image2tensor``), at Haoming02/sd-forge-couple
commit 7a396d8d4f5c80164aa903775ace51cb51230fe3 (after laksjdjf's cgem156-ComfyUI attention couple). The transcription
was checked against that REAL code (run outside this repository with stubs for Forge's ``modules``): equal outputs of
both patches on random tensors (odd and even batches, several regions of other token counts, uncond/cond chunks in
both orders), of ``get_mask`` for several latent sizes and token counts, and of the two mappings.

Forge runs the patches inside ComfyUI's ``BasicTransformerBlock``: ``attn2_patch`` gets ``norm2(x)`` and the text
context before ``to_k``/``to_v``; ``attn2_output_patch`` gets attn2's output after ``to_out``. :class:`_ForgeLayer`
runs them so in a diffusers attention processor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdxl_control.adapters import couple
from sdxl_control.adapters.couple import CoupleBranch, layer_size, region_weight
from sdxl_control.adapters.ip_adapter import IPAdapter
from sdxl_control.adapters.regions import Region
from sdxl_control.base.errors import ConditionError
from sdxl_control.protocol.attention import AttentionBranch, BranchedAttnProcessor, attention_layers
from sdxl_control.protocol.rows import calling
from sdxl_control.testing.stand_ins import tiny_condition

PROMPT = "a photo of two people in a park"
SIZE = (64, 48)  # width, height: not square, so a transposed mask would show
KW: dict[str, Any] = dict(steps=4, size=SIZE, seed=3, guidance=5.0, progress_bar=False)
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Transcription of Forge Couple @ 7a396d8 (see the module docstring).


def forge_repeat_div(value: int, iterations: int) -> int:
    for _ in range(iterations):
        value = math.ceil(value / 2)
    return value


def forge_get_mask(mask: torch.Tensor, batch_size: int, num_tokens: int, shape: tuple[int, ...]) -> torch.Tensor:
    width, height = shape[3], shape[2]
    scale = math.ceil(math.log2(math.sqrt(height * width / num_tokens)))
    size = (forge_repeat_div(height, scale), forge_repeat_div(width, scale))
    num_conds = mask.shape[0]
    down = F.interpolate(mask, size=size, mode="nearest").view(num_conds, num_tokens, 1)
    return down.repeat_interleave(batch_size, dim=0)


def forge_box(width: int, height: int, box: tuple[float, float, float, float], weight: float) -> torch.Tensor:
    x1, y1, x2, y2 = box
    mask = torch.zeros((height, width))
    mask[int(height * y1) : int(height * y2), int(width * x1) : int(width * x2)] = weight
    return mask.unsqueeze(0)


def forge_image_mask(image: Image.Image, width: int, height: int, weight: float) -> torch.Tensor:
    image = image.convert("L")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.NEAREST)
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0) * weight


def forge_patches(base_mask: torch.Tensor, masks: list[torch.Tensor], conds: list[torch.Tensor]) -> Any:
    """(attn2_patch, attn2_output_patch) as ``AttentionCouple.patch_unet`` builds them, or None on an uncovered pixel."""
    num_conds = len(masks) + 1
    mask = torch.stack([base_mask, *masks], dim=0)
    if mask.sum(dim=0).min().item() <= 0.0:
        return None
    mask = mask / mask.sum(dim=0, keepdim=True)
    num_tokens = [c.shape[1] for c in conds]
    state: dict[str, int] = {}

    def attn2_patch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> tuple:
        cond_or_unconds = extra["cond_or_uncond"]
        num_chunks = len(cond_or_unconds)
        state["batch"] = batch = q.shape[0] // num_chunks
        q_chunks, k_chunks = q.chunk(num_chunks, dim=0), k.chunk(num_chunks, dim=0)
        lcm_tokens = math.lcm(*num_tokens, k.shape[1])
        conds_tensor = torch.cat([c.repeat(batch, lcm_tokens // num_tokens[i], 1) for i, c in enumerate(conds)])
        qs, ks = [], []
        for i, which in enumerate(cond_or_unconds):
            k_target = k_chunks[i].repeat(1, lcm_tokens // k.shape[1], 1)
            if which == 1:
                qs.append(q_chunks[i])
                ks.append(k_target)
            else:
                qs.append(q_chunks[i].repeat(num_conds, 1, 1))
                ks.append(torch.cat([k_target, conds_tensor], dim=0))
        qs_t, ks_t = torch.cat(qs).to(q), torch.cat(ks).to(k)
        if qs_t.size(0) % 2 == 1:
            qs_t = torch.cat((qs_t, torch.zeros_like(qs_t[0])[None]))
            ks_t = torch.cat((ks_t, torch.zeros_like(ks_t[0])[None]))
        return qs_t, ks_t, ks_t

    def attn2_output_patch(out: torch.Tensor, extra: dict) -> torch.Tensor:
        batch = state["batch"]
        down = forge_get_mask(mask, batch, out.shape[1], extra["original_shape"])
        outputs, pos = [], 0
        for which in extra["cond_or_uncond"]:
            if which == 1:
                outputs.append(out[pos : pos + batch])
                pos += batch
            else:
                part = (out[pos : pos + num_conds * batch] * down).view(num_conds, batch, out.shape[1], out.shape[2])
                outputs.append(part.sum(dim=0))
                pos += num_conds * batch
        return torch.cat(outputs, dim=0)

    return attn2_patch, attn2_output_patch


class _ForgeLayer:
    """An attn2 processor running Forge's two patches around diffusers' attention, as ComfyUI's block does."""

    def __init__(self, patches: Any, extra: dict) -> None:
        self.patch, self.output_patch = patches
        self.extra = extra

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, *a, **k) -> Any:
        q_in, k_in, v_in = self.patch(hidden_states, encoder_hidden_states, encoder_hidden_states, self.extra)
        query, key, value = attn.to_q(q_in), attn.to_k(k_in), attn.to_v(v_in)
        batch, heads = q_in.shape[0], attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(query), split(key), split(value))
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor
        return self.output_patch(out, self.extra)


# ---------------------------------------------------------------------------------------------------------------------


def _attention(prompt: str, **kw: Any) -> Region:
    return Region(prompt=prompt, mode="attention", **kw)


@pytest.fixture
def contexts(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The CouplePrepared values the generator makes (their region prompts' hidden states, per stage)."""
    made: list[Any] = []
    real = couple.prepare_couple

    def spy(region: Region, ctx: Any) -> Any:
        made.append(real(region, ctx))
        return made[-1]

    monkeypatch.setattr(couple, "prepare_couple", spy)
    return made


def _forge_run(generator: Any, masks: list[torch.Tensor], conds: list[torch.Tensor], **kw: Any) -> torch.Tensor:
    """The plain request with Forge's patches on every attn2 layer of the base UNet (batch [uncond, cond])."""
    width, height = kw["size"]
    unet = generator.base.unet
    extra = {"cond_or_uncond": [1, 0], "original_shape": (2, 4, height // 8, width // 8)}
    base = torch.zeros(1, height, width)
    saved = {name: layer.processor for name, layer in attention_layers(unet).items()}
    try:
        for name, layer in attention_layers(unet).items():
            if name.endswith("attn2.processor"):
                layer.set_processor(_ForgeLayer(forge_patches(base, masks, conds), extra))
        return generator.generate(PROMPT, **kw).latents
    finally:
        for name, layer in attention_layers(unet).items():
            layer.set_processor(saved[name])


def test_equals_forge_couple(generator, contexts):
    """Two regions that cover the image (left, right at weight 1.25, Forge's Basic tile weight, and a soft mask at 0.5
    over the whole image, Forge's background line), with Forge's zero base mask: the latents equal Forge's patches
    run on the same UNet, with region prompts of other token counts (a long prompt reads several chunks of 77)."""
    width, height = SIZE
    soft = Image.new("L", (width // 2, height // 2), 200)  # another size: resized as Forge does
    regions = [
        _attention("a woman with red hair, " * 40, box=LEFT, scale=1.25),
        _attention("a man in a blue coat", box=RIGHT, scale=1.25),
        _attention("a park at dusk", mask=soft, scale=0.5),
    ]
    ours = generator.generate(PROMPT, conditions=regions, **KW).latents
    conds = [made.contexts[next(iter(made.contexts))] for made in contexts]
    assert conds[0].shape[1] > 77 and [c.shape[1] for c in conds[1:]] == [77, 77]
    masks = [forge_box(width, height, LEFT, 1.25), forge_box(width, height, RIGHT, 1.25),
             forge_image_mask(soft, width, height, 0.5)]  # fmt: skip
    reference = _forge_run(generator, masks, conds, **KW)
    assert not torch.allclose(reference, generator.generate(PROMPT, **KW).latents, atol=1e-3)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_region_weights_are_forge_mappings():
    """Boxes are Forge's Advanced mapping, masks its Mask mode (grey / 255, nearest resize), both times the weight."""
    width, height = 37, 29  # int() truncation at odd sizes
    box = (0.1, 0.2, 0.7, 0.9)
    assert torch.equal(region_weight(_attention("x", box=box, scale=0.8), (width, height)),
                       forge_box(width, height, box, 0.8)[0])  # fmt: skip
    image = Image.linear_gradient("L").resize((50, 40))
    assert torch.equal(region_weight(_attention("x", mask=image, scale=2.0), (width, height)),
                       forge_image_mask(image, width, height, 2.0)[0])  # fmt: skip


@pytest.mark.parametrize("latent", [(128, 128), (13, 9), (96, 160)])
def test_layer_size_is_forge_get_mask(latent):
    height, width = latent
    mask = torch.rand(3, 1, 8 * height, 8 * width)
    for level in range(3):
        h, w = forge_repeat_div(height, level), forge_repeat_div(width, level)
        assert layer_size(latent, h * w) == (h, w)
        expected = forge_get_mask(mask, 1, h * w, (1, 4, height, width))
        assert torch.equal(F.interpolate(mask, size=(h, w), mode="nearest").reshape(3, h * w, 1), expected)


def test_whole_image_region_with_the_prompt_is_the_plain_prompt(generator):
    plain = generator.generate(PROMPT, **KW).latents
    whole = generator.generate(PROMPT, conditions=[_attention(PROMPT, box=(0.0, 0.0, 1.0, 1.0))], **KW).latents
    torch.testing.assert_close(whole, plain, rtol=0, atol=1e-6)
    # A partial region fills the rest with the prompt; other words there change the image.
    other = generator.generate(PROMPT, conditions=[_attention("a snowy mountain", box=LEFT)], **KW).latents
    assert not torch.allclose(other, plain, atol=1e-3)


def _captured_call(generator: Any, regions: list[Region], layer: str) -> dict[str, Any]:
    """One call of ``layer``'s processor at the last base step, with the rows it ran under."""
    seen: dict[str, Any] = {}
    unet = generator.base.unet
    original = BranchedAttnProcessor.__call__

    def spy(self, attn, hidden_states, encoder_hidden_states=None, *a, **k):  # type: ignore[no-untyped-def]
        if attn is attention_layers(unet)[layer]:
            from sdxl_control.protocol.rows import call_rows

            seen.update(proc=self, attn=attn, hidden=hidden_states.clone(), context=encoder_hidden_states.clone(),
                        rows=call_rows(), branches=list(self.branches))  # fmt: skip
        return original(self, attn, hidden_states, encoder_hidden_states, *a, **k)

    BranchedAttnProcessor.__call__ = spy  # type: ignore[method-assign]
    try:
        generator.generate(PROMPT, conditions=regions, **KW)
    finally:
        BranchedAttnProcessor.__call__ = original  # type: ignore[method-assign]
    return seen


def test_each_region_reads_only_its_own_tokens(generator):
    """Measured in the attention: at every pixel of the left region, the gradient of the prompt rows' attention output
    with respect to the right region's tokens (its keys and values) is exactly 0, and not 0 with respect to its own;
    likewise for the right. The negative rows read neither."""
    regions = [_attention("a woman with red hair", box=LEFT), _attention("a man in a blue coat", box=RIGHT)]
    unet = generator.base.unet
    for layer in [n for n in attention_layers(unet) if n.endswith("attn2.processor")]:
        seen = _captured_call(generator, regions, layer)
        left, right = seen["branches"]
        tokens = [b.key.clone().requires_grad_(True) for b in (left, right)]
        with torch.enable_grad(), calling(seen["rows"]):
            probes = [
                dataclasses.replace(b, key=t, value=t, active=True) for b, t in zip((left, right), tokens, strict=True)
            ]
            out = BranchedAttnProcessor(seen["proc"].inner, probes)(seen["attn"], seen["hidden"], seen["context"])
            queries = out.shape[1]
            h, w = layer_size(left.latent, queries)
            column = torch.arange(queries) % w
            in_left = column < w / 2
            for pixels, own, other in ((in_left, 0, 1), (~in_left, 1, 0)):
                grads = torch.autograd.grad(out[1:, pixels].sum(), tokens, retain_graph=True, allow_unused=True)
                assert grads[other] is None or torch.count_nonzero(grads[other]) == 0, layer
                assert grads[own] is not None and torch.count_nonzero(grads[own]) > 0, layer
            negative = torch.autograd.grad(out[:1].sum(), tokens, allow_unused=True)
            assert all(g is None or torch.count_nonzero(g) == 0 for g in negative)


class _Adds(AttentionBranch):
    """A second user of the replace hook: its kind replaces the text attention by ``scale`` times itself."""

    replaces_text = True

    @classmethod
    def replace_text(cls, group, query, text, attn):  # type: ignore[no-untyped-def]
        for branch in group:
            text = text * branch.scale
        return text


def test_replace_hook_runs_before_adding_branches(generator):
    """The generic hook: a replacing kind changes the text attention, the adding branches (an IP-Adapter's) add to
    what it made: ``to_out(2 * text + ip)`` against ``to_out(text + ip)``."""
    unet = generator.base.unet
    name = next(n for n in attention_layers(unet) if n.endswith("attn2.processor"))
    attn = attention_layers(unet)[name]
    torch.manual_seed(0)
    hidden, context = torch.randn(2, 16, attn.to_q.in_features), torch.randn(2, 7, attn.to_k.in_features)
    ip_tokens = torch.randn(2, 4, attn.to_k.out_features)
    ip = AttentionBranch("ip", ip_tokens, ip_tokens, 0.7)
    inner = attn.processor
    plain = BranchedAttnProcessor(inner, [ip])(attn, hidden, context)
    doubled = BranchedAttnProcessor(inner, [ip, _Adds("twice", ip_tokens, ip_tokens, 2.0)])(attn, hidden, context)
    text = inner(attn, hidden, context) - attn.to_out[0].bias  # to_out(text) without bias
    torch.testing.assert_close(doubled - plain, text, rtol=1e-4, atol=1e-5)


def test_with_an_ip_adapter_in_the_same_region_base_and_refiner(generator, tiny):
    """A region and an IP-Adapter masked to the same left half, both stages: the identity branch adds to the blended
    text attention (on one layer: the two changes add up exactly as each alone), and the region acts in the refiner."""
    width, height = SIZE
    mask = Image.new("L", SIZE, 0)
    mask.paste(255, (0, 0, width // 2, height))
    photo = Image.effect_noise((64, 64), 40).convert("RGB")
    region = _attention("a woman with red hair", mask=mask, stage="both")
    ip = tiny_condition(IPAdapter("plus", photo, scale=1.0, mask=mask))
    kw = {**KW, "refiner_switch": 0.5}
    both = generator.generate(PROMPT, conditions=[region, ip], **kw).latents
    assert both.isfinite().all()
    base_only = generator.generate(PROMPT, conditions=[dataclasses.replace(region, stage="base"), ip], **kw).latents
    assert not torch.allclose(both, base_only, atol=1e-4)  # the refiner reads the region too
    layer = next(n for n in attention_layers(generator.base.unet) if n.endswith("attn2.processor"))
    seen = _captured_call(generator, [region, ip], layer)
    proc, attn, hidden, context = seen["proc"], seen["attn"], seen["hidden"], seen["context"]
    couple_b = [b for b in proc.branches if isinstance(b, CoupleBranch)]
    ip_b = [b for b in proc.branches if not isinstance(b, CoupleBranch)]
    assert couple_b and ip_b
    for b in proc.branches:
        b.active = True
    with calling(seen["rows"]):
        run = {key: BranchedAttnProcessor(proc.inner, branches)(attn, hidden, context)
               for key, branches in (("none", []), ("couple", couple_b), ("ip", ip_b), ("both", couple_b + ip_b))}  # fmt: skip
    torch.testing.assert_close(run["both"] - run["couple"], run["ip"] - run["none"], rtol=1e-4, atol=1e-5)


def test_bad_input(generator, caplog):
    """A mask of another size is resized (said in the log); an empty mask or box is refused, naming it; a negative
    prompt is refused (the negative rows stay the request's); overlapping regions share by weight."""
    with caplog.at_level(logging.INFO, logger="sdxl_control.adapters.couple"):
        weight = region_weight(_attention("x", mask=Image.new("L", (8, 6), 255)), SIZE)
    assert weight.shape == (SIZE[1], SIZE[0]) and "resized (nearest) to the output size 64x48" in caplog.text
    with pytest.raises(ConditionError, match="'a dog' mask .* is empty"):
        generator.generate(PROMPT, conditions=[_attention("a dog", mask=Image.new("L", SIZE, 0))], **KW)
    with pytest.raises(ConditionError, match="holds no pixel"):
        region_weight(_attention("a dog", box=(0.0, 0.0, 0.01, 0.01)), SIZE)
    with pytest.raises(ConditionError, match="negative_prompt"):
        generator.generate(PROMPT, conditions=[_attention("a dog", box=LEFT, negative_prompt="blur")], **KW)
    # Overlap: weights 1 and 3 on the same pixels give shares 1/4 and 3/4 (Forge's per-pixel normalisation).
    first = CoupleBranch("a", torch.zeros(1), torch.zeros(1), 1.0, weight=torch.ones(8, 8), latent=(1, 1))
    second = CoupleBranch("b", torch.zeros(1), torch.zeros(1), 1.0, weight=3 * torch.ones(8, 8), latent=(1, 1))
    shares = first.blend([first, second], 1)[:, 0, 0]
    assert shares.tolist() == [0.0, 0.25, 0.75]


def test_prompt_rows_are_and_parts_and_perturbed_copies(generator):
    """The blend reads which rows are the prompt's from the call's rows: every AND part, PAG's perturbed copies, every
    row without guidance; never the negative rows."""
    from sdxl_control.protocol.rows import Rows

    branch = CoupleBranch("r", torch.zeros(1), torch.zeros(1), 1.0, batch=2, guided=True)
    with calling(Rows.of_parts(batch=2, parts=2, guided=True)):
        assert branch.prompt_rows(6) == [2, 3, 4, 5]
    with calling(Rows((0, 1, 2, 3, 2, 3), 4, (False,) * 4 + (True,) * 2)):
        assert branch.prompt_rows(6) == [2, 3, 4, 5]
    unguided = CoupleBranch("r", torch.zeros(1), torch.zeros(1), 1.0, batch=2, guided=False)
    with calling(Rows.identity(2)):
        assert unguided.prompt_rows(2) == [0, 1]
    regions = [_attention("a woman with red hair", box=LEFT), _attention("a man in a blue coat", box=RIGHT)]
    parts = generator.generate("a cat AND a dog :0.5", conditions=regions, **KW).latents
    assert parts.isfinite().all()
    assert not torch.allclose(parts, generator.generate("a cat AND a dog :0.5", **KW).latents, atol=1e-4)
