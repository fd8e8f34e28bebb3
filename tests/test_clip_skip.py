"""Clip skip for SDXL (issue 36, part 4). ``clip_skip`` N reads both text encoders' N-th layer from the end, before
the final layer norm (``hidden_states[-N]``); unset, SDXL's penultimate layer, bit for bit as before. What each tool
means by it (issue 36 research notes, section 2):

* diffusers ``encode_prompt(clip_skip=k)``: ``hidden_states[-(k + 2)]`` on both encoders, for the prompt only (its
  negative keeps ``[-2]``) — ours with N = k + 2 for the prompt;
* ComfyUI ``CLIPSetLastLayer(n)``: ``hidden_states[n]`` on both encoders (``comfy/sd1_clip.py`` at Comfy-Org/ComfyUI
  a125cd84b054a57729b5eecab930ca9408719832: ``layer="hidden"``, ``layer_norm_hidden_state=False`` for SDXL) — ours
  with N = -n;
* Forge ``Clip skip: N``: ``hidden_states[-max(N, 2)]`` on both — ours from N = 3 on;
* A1111 ``Clip skip: N`` on SDXL: nothing changes (unless its "Clip skip SDXL" option, CLIP-L only, which its text
  does not record) — listed on import, not applied.

The pooled embedding (bigG's last layer, projected) is never changed.
"""

from __future__ import annotations

import json

import pytest
import torch

from sdxl_control import GenerationRequest
from sdxl_control.base.errors import IncompatibleModelError, InvalidRequestError
from sdxl_control.cli import main
from sdxl_control.jobs.png_import import read_a1111, read_comfyui
from sdxl_control.protocol.text import encode_prompts
from sdxl_control.records.infotext import parameters_text

PROMPT, NEGATIVE = "a lighthouse on a cliff at dusk", "blurry, low quality"


def _ours(generator, clip_skip, negative: str | None = NEGATIVE):
    return encode_prompts(generator.base.text_encoders, [PROMPT], None if negative is None else [negative],
                          need_negative=negative is not None, zero_negative=True, clip_skip=clip_skip)  # fmt: skip


def test_clip_skip_equals_diffusers_where_the_meanings_coincide(generator, sdxl_pipes):
    pipe = sdxl_pipes[0]
    with torch.no_grad():
        default, negative_default, pooled, _ = pipe.encode_prompt(PROMPT, negative_prompt=NEGATIVE,
                                                                  do_classifier_free_guidance=True)  # fmt: skip
        skipped, negative_kept, pooled_skipped, _ = pipe.encode_prompt(
            PROMPT, negative_prompt=NEGATIVE, do_classifier_free_guidance=True, clip_skip=1
        )
        negative_skipped = pipe.encode_prompt(NEGATIVE, do_classifier_free_guidance=False, clip_skip=1)[0]
    unset, unset_negative = _ours(generator, None)
    two, two_negative = _ours(generator, 2)
    assert torch.equal(unset.hidden, default) and torch.equal(unset_negative.hidden, negative_default)
    assert torch.equal(two.hidden, unset.hidden) and torch.equal(two_negative.hidden, unset_negative.hidden)
    three, three_negative = _ours(generator, 3)  # diffusers' clip_skip=1: hidden_states[-3]
    assert torch.equal(three.hidden, skipped) and not torch.equal(three.hidden, default)
    # diffusers leaves its negative at [-2] (negative_kept == negative_default); ours reads it at the same layer as
    # the prompt, as Forge and ComfyUI do: diffusers' reading of that text as a prompt.
    assert torch.equal(negative_kept, negative_default) and torch.equal(three_negative.hidden, negative_skipped)
    assert torch.equal(three.pooled, unset.pooled) and torch.equal(pooled_skipped, pooled)


@pytest.mark.parametrize("layer", [-1, -2, -3])
def test_clip_skip_is_comfyuis_clip_set_last_layer(generator, layer):
    """CLIPSetLastLayer(n): ``hidden_states[n]`` of each encoder, no final layer norm; both encoders."""
    encoded, _ = _ours(generator, -layer, negative=None)
    by_hand = []
    for encoder in generator.base.text_encoders:
        ids = encoder.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            by_hand.append(encoder.model(ids, output_hidden_states=True).hidden_states[layer])
    assert torch.equal(encoded.hidden, torch.cat(by_hand, dim=-1))


def test_unset_changes_nothing_and_a_set_clip_skip_is_recorded(generator):
    common = {"steps": 2, "size": (64, 64), "seed": 5}
    unset = generator.generate(PROMPT, progress_bar=False, **common)
    assert "clip_skip" not in unset.images[0].recipe and "Clip skip" not in parameters_text(unset.images[0].recipe)
    two = generator.generate(PROMPT, clip_skip=2, progress_bar=False, **common)
    assert two.images[0].tobytes() == unset.images[0].tobytes()  # SDXL's own layer: the same pixels
    three = generator.generate(PROMPT, clip_skip=3, progress_bar=False, **common)
    assert three.images[0].tobytes() != unset.images[0].tobytes()
    recipe = three.images[0].recipe
    assert recipe["clip_skip"] == 3 and "Clip skip: 3" in parameters_text(recipe)
    again = generator.run(GenerationRequest.from_recipe(recipe), progress_bar=False)
    assert again.images[0].tobytes() == three.images[0].tobytes()


def test_bad_clip_skips_are_refused(generator):
    for bad in (0, 13, -1):
        with pytest.raises(
            InvalidRequestError, match=rf"clip_skip \(--clip-skip\) .* 1 \(the last\) to 12 .*got {bad}"
        ):
            GenerationRequest(PROMPT, clip_skip=bad)
    with pytest.raises(InvalidRequestError, match="clip_skip must be a whole number"):
        GenerationRequest(PROMPT, clip_skip=2.5)
    with pytest.raises(IncompatibleModelError, match="clip_skip 4 .* text_encoder, which has 3: give 1 to 3"):
        _ours(generator, 4)  # the tiny encoders have 3 layers


def test_clip_skip_is_imported_as_each_tool_means_it():
    settings = "Steps: 20, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 1024x1024, Clip skip: {}, Version: {}"
    a1111 = read_a1111("a pony\n" + settings.format(2, "v1.10.1"))
    assert "clip_skip" not in a1111.settings
    assert any(u.startswith("Clip skip: 2: A1111 reads SDXL's penultimate") for u in a1111.unmapped)
    forge = read_a1111("a pony\n" + settings.format(3, "f2.0.1v1.10.1-previous-224-g900196889"))
    assert forge.settings["clip_skip"] == 3 and not any("Clip skip" in u for u in forge.unmapped)
    forge_two = read_a1111("a pony\n" + settings.format(2, "f2.0.1v1.10.1"))  # max(2, 2): Forge's default
    assert "clip_skip" not in forge_two.settings and not any("Clip skip" in u for u in forge_two.unmapped)

    def graph(layer: int) -> dict:
        return {
            "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["6", 0],
                                                        "latent_image": ["5", 0], "seed": 1, "steps": 20, "cfg": 7,
                                                        "sampler_name": "euler", "scheduler": "normal"}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a pony", "clip": ["7", 0]}},
            "7": {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": layer, "clip": ["4", 1]}},
        }  # fmt: skip

    assert read_comfyui(graph(-1)).settings["clip_skip"] == 1  # the node's default: the last layer, both encoders
    assert read_comfyui(graph(-2)).settings["clip_skip"] == 2
    deep = read_comfyui(graph(-13))
    assert "clip_skip" not in deep.settings and any("past CLIP-L's 12 layers" in u for u in deep.unmapped)


def test_the_command_line_flag_reaches_the_request(tiny, capsys):
    assert main(["generate", PROMPT, "--tiny", "--steps", "2", "--clip-skip", "3", "--dry-run"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["clip_skip"] == 3
