"""A1111's prompt editing ``[a:b:N]``, alternation ``[a|b]`` and composable ``AND`` (``:weight``), and its rule for
running prompt and negative prompt in one UNet batch or two.

The schedules and AND parts below are what AUTOMATIC1111/stable-diffusion-webui's own ``modules/prompt_parser.py``
@28bd8e142d5f77b71ae8d7d7140b5da1b3a49906 (``get_learned_conditioning_prompt_schedules``,
``get_multicond_prompt_list``) returns for them: the file was run in a scratch folder outside this repository on its
doctest prompts and the issue's cases, and its answers written here. The generations are compared with diffusers' own
SDXL pipeline whose prompt embeddings are swapped by ``callback_on_step_end`` at the call A1111 switches, and with
the UNet's own outputs combined by A1111's formulas (``CFGDenoiser.combine_denoised``; separate calls or padding as
``sd_samplers_cfg_denoiser.py`` @029adbe5318b57c04dbc0d92273cce38e1ecf457 decides)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler
from PIL import Image

from sdxl_control import GenerationRequest
from sdxl_control.base.errors import InvalidRequestError
from sdxl_control.cli import main
from sdxl_control.jobs.png_import import read_a1111
from sdxl_control.protocol.prompt_schedule import composable_parts, prompt_schedule, scheduled_prompt
from sdxl_control.protocol.text import prompt_segments
from sdxl_control.records.infotext import parameters_text
from sdxl_control.records.recipe import read_recipe


def _cycle(steps: int, *texts: str) -> list[tuple[int, str]]:
    """A schedule that reads ``texts`` in turn at steps 1 to ``steps`` (A1111's answer for an alternation, written
    short)."""
    return [(step, texts[(step - 1) % len(texts)]) for step in range(1, steps + 1)]


# (prompt, steps, hires second pass's steps or None, A1111's schedule)
A1111_SCHEDULES = [
    ("test", 10, None, [(10, "test")]),
    ("a [b:3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, None, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, None, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, None, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, None, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, None, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, None, [(5, "a  c"), (10, "a b c")]),
    ("a [{b|d{:.5] c", 10, None, [(10, "a [{b|d{:.5] c")]),
    ("((a][:b:c [d:3]", 10, None, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    (
        "[a|(b:1.1)]",
        10,
        None,
        _cycle(10, "a", "(b:1.1)"),
    ),
    (
        "[fe|]male",
        10,
        None,
        _cycle(10, "female", "male"),
    ),
    (
        "[fe|||]male",
        10,
        None,
        _cycle(10, "female", "male", "male", "male"),
    ),
    ("[a:b:0.5]", 10, None, [(5, "a"), (10, "b")]),
    ("[a:b:10]", 10, None, [(10, "a")]),
    ("[a:0.5]", 10, None, [(5, ""), (10, "a")]),
    ("[a::0.5]", 10, None, [(5, "a"), (10, "")]),
    (
        "[a|b]",
        10,
        None,
        _cycle(10, "a", "b"),
    ),
    ("[a:b:1.5]", 10, None, [(10, "a")]),
    ("[a:b:-1]", 10, None, [(10, "b")]),
    ("[a:b:1.0]", 10, None, [(10, "a")]),
    ("[a:b:10.]", 10, None, [(10, "a")]),
    ("x [a:b: 3 ] y", 10, None, [(3, "x a y"), (10, "x b y")]),
    (
        "[a:[b|c]:3]",
        10,
        None,
        [(1, "a"), (2, "a"), (3, "a"), (4, "c"), (5, "b"), (6, "c"), (7, "b"), (8, "c"), (9, "b"), (10, "c")],
    ),
    ("a | b", 10, None, [(10, "a | b")]),
    ("[a:b:+2]", 10, None, [(2, "a"), (10, "b")]),
    ("[:x:5]", 10, None, [(5, ""), (10, "x")]),
    (
        "[dog:cat:0.25] in a [forest|desert]",
        10,
        None,
        [
            (1, "dog in a forest"),
            (2, "dog in a desert"),
            (3, "cat in a forest"),
            (4, "cat in a desert"),
            (5, "cat in a forest"),
            (6, "cat in a desert"),
            (7, "cat in a forest"),
            (8, "cat in a desert"),
            (9, "cat in a forest"),
            (10, "cat in a desert"),
        ],
    ),
    ("test", 4, None, [(4, "test")]),
    ("a [b:3]", 4, None, [(3, "a "), (4, "a b")]),
    ("a [b: 3]", 4, None, [(3, "a "), (4, "a b")]),
    ("a [[[b]]:2]", 4, None, [(2, "a "), (4, "a [[b]]")]),
    ("[(a:2):3]", 4, None, [(3, ""), (4, "(a:2)")]),
    ("a [b : c : 1] d", 4, None, [(1, "a b  d"), (4, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 4, None, [(1, "abe"), (2, "ace"), (4, "ade")]),
    ("a [unbalanced", 4, None, [(4, "a [unbalanced")]),
    ("a [b:.5] c", 4, None, [(2, "a  c"), (4, "a b c")]),
    ("a [{b|d{:.5] c", 4, None, [(4, "a [{b|d{:.5] c")]),
    ("((a][:b:c [d:3]", 4, None, [(3, "((a][:b:c "), (4, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 4, None, [(1, "a"), (2, "(b:1.1)"), (3, "a"), (4, "(b:1.1)")]),
    ("[fe|]male", 4, None, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    ("[fe|||]male", 4, None, [(1, "female"), (2, "male"), (3, "male"), (4, "male")]),
    ("[a:b:0.5]", 4, None, [(2, "a"), (4, "b")]),
    ("[a:b:10]", 4, None, [(4, "a")]),
    ("[a:0.5]", 4, None, [(2, ""), (4, "a")]),
    ("[a::0.5]", 4, None, [(2, "a"), (4, "")]),
    ("[a|b]", 4, None, [(1, "a"), (2, "b"), (3, "a"), (4, "b")]),
    ("[a:b:1.5]", 4, None, [(4, "a")]),
    ("[a:b:-1]", 4, None, [(4, "b")]),
    ("[a:b:1.0]", 4, None, [(4, "a")]),
    ("[a:b:10.]", 4, None, [(4, "a")]),
    ("x [a:b: 3 ] y", 4, None, [(3, "x a y"), (4, "x b y")]),
    ("[a:[b|c]:3]", 4, None, [(1, "a"), (2, "a"), (3, "a"), (4, "c")]),
    ("a | b", 4, None, [(4, "a | b")]),
    ("[a:b:+2]", 4, None, [(2, "a"), (4, "b")]),
    ("[:x:5]", 4, None, [(4, "")]),
    (
        "[dog:cat:0.25] in a [forest|desert]",
        4,
        None,
        [(1, "dog in a forest"), (2, "cat in a desert"), (3, "cat in a forest"), (4, "cat in a desert")],
    ),
    ("test", 10, 10, [(10, "test")]),
    ("a [b:3]", 10, 10, [(10, "a b")]),
    ("a [b: 3]", 10, 10, [(10, "a b")]),
    ("a [[[b]]:2]", 10, 10, [(10, "a [[b]]")]),
    ("[(a:2):3]", 10, 10, [(10, "(a:2)")]),
    ("a [b : c : 1] d", 10, 10, [(10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, 10, [(10, "ade")]),
    ("a [unbalanced", 10, 10, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, 10, [(10, "a b c")]),
    ("a [{b|d{:.5] c", 10, 10, [(10, "a [{b|d{:.5] c")]),
    ("((a][:b:c [d:3]", 10, 10, [(10, "((a][:b:c d")]),
    (
        "[a|(b:1.1)]",
        10,
        10,
        _cycle(10, "a", "(b:1.1)"),
    ),
    (
        "[fe|]male",
        10,
        10,
        _cycle(10, "female", "male"),
    ),
    (
        "[fe|||]male",
        10,
        10,
        _cycle(10, "female", "male", "male", "male"),
    ),
    ("[a:b:0.5]", 10, 10, [(10, "b")]),
    ("[a:b:10]", 10, 10, [(10, "b")]),
    ("[a:0.5]", 10, 10, [(10, "a")]),
    ("[a::0.5]", 10, 10, [(10, "")]),
    (
        "[a|b]",
        10,
        10,
        _cycle(10, "a", "b"),
    ),
    ("[a:b:1.5]", 10, 10, [(5, "a"), (10, "b")]),
    ("[a:b:-1]", 10, 10, [(10, "b")]),
    ("[a:b:1.0]", 10, 10, [(10, "b")]),
    ("[a:b:10.]", 10, 10, [(10, "a")]),
    ("x [a:b: 3 ] y", 10, 10, [(10, "x b y")]),
    (
        "[a:[b|c]:3]",
        10,
        10,
        _cycle(10, "b", "c"),
    ),
    ("a | b", 10, 10, [(10, "a | b")]),
    ("[a:b:+2]", 10, 10, [(10, "b")]),
    ("[:x:5]", 10, 10, [(10, "x")]),
    (
        "[dog:cat:0.25] in a [forest|desert]",
        10,
        10,
        _cycle(10, "cat in a forest", "cat in a desert"),
    ),
]

# (prompt, A1111's parts: (text, weight))
A1111_PARTS = [
    ("a AND b", [("a", 1.0), (" b", 1.0)]),
    ("a cat AND a dog:0.5", [("a cat", 1.0), (" a dog", 0.5)]),
    ("x AND  y : -2 AND z:+.5", [("x", 1.0), ("  y", -2.0), (" z", 0.5)]),
    ("a:1. AND b:.25", [("a", 1.0), (" b", 0.25)]),
    ("ANDROID AND b", [("ANDROID", 1.0), (" b", 1.0)]),
    ("a and b", [("a and b", 1.0)]),
    ("a:1.5 AND a", [("a", 1.5), (" a", 1.0)]),
]

RUN = {"size": (64, 64), "seed": 5, "progress_bar": False}


@pytest.mark.parametrize(("prompt", "steps", "hires", "expected"), A1111_SCHEDULES)
def test_schedules_are_a1111s(prompt, steps, hires, expected):
    if hires is None:
        assert prompt_schedule(prompt, steps) == expected
    else:  # a hires fix's second pass of ``hires`` steps after a first pass of ``steps``
        assert prompt_schedule(prompt, hires, first_pass_steps=steps) == expected


@pytest.mark.parametrize(("prompt", "expected"), A1111_PARTS)
def test_and_parts_are_a1111s(prompt, expected):
    assert composable_parts(prompt) == expected


def _a1111_text(schedule, call):
    """A1111's reconstruct_cond_batch: the first entry whose end step is not before the denoiser call (from 0)."""
    return next((text for end, text in schedule if call <= end), schedule[-1][1])


@torch.no_grad()
def _embeds(pipe, text):
    hidden, _, pooled, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
    return hidden, pooled


@torch.no_grad()
def _switched(pipe, schedule, steps, scheduler, guidance=5.0):
    """diffusers' SDXL pipeline reading the text A1111 reads at each call: its prompt embeddings swapped after a call
    by callback_on_step_end (no negative prompt: zeros, as both read it)."""
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    embeds = {text: _embeds(pipe, text) for _, text in schedule}

    def swap(_pipe, call, _t, tensors):
        hidden, pooled = embeds[_a1111_text(schedule, call + 1)]
        return {"prompt_embeds": torch.cat([tensors["prompt_embeds"].chunk(2)[0], hidden]),
                "add_text_embeds": torch.cat([tensors["add_text_embeds"].chunk(2)[0], pooled])}  # fmt: skip

    hidden, pooled = embeds[_a1111_text(schedule, 0)]
    return pipe(
        prompt_embeds=hidden, pooled_prompt_embeds=pooled, num_inference_steps=steps, guidance_scale=guidance,
        height=64, width=64, generator=torch.Generator().manual_seed(5), output_type="latent",
        callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"],
    ).images  # fmt: skip


@pytest.mark.parametrize(
    ("prompt", "steps", "scheduler", "schedule"),
    [
        # A1111 (steps 3): "[a cat:a dog:1]" -> [[1, 'a cat'], [3, 'a dog']]: calls 0 and 1 read 'a cat'
        ("[a cat:a dog:1]", 3, "euler", [(1, "a cat"), (3, "a dog")]),
        # "[a cat:a dog:0.5]" of 4 steps -> [[2, 'a cat'], [4, 'a dog']]
        ("[a cat:a dog:0.5]", 4, "euler", [(2, "a cat"), (4, "a dog")]),
        # alternation, 3 steps -> [[1, 'a cat'], [2, 'a dog'], [3, 'a cat']]
        ("[a cat|a dog]", 3, "euler", [(1, "a cat"), (2, "a dog"), (3, "a cat")]),
        # Heun, second order: A1111 counts 2 x 3 steps, 0.5 -> 3; diffusers' Heun calls the UNet 5 times
        ("[a cat:a dog:0.5]", 3, "heun", [(3, "a cat"), (6, "a dog")]),
    ],
)
def test_editing_switches_the_embeddings_at_a1111s_call(generator, sdxl_pipes, prompt, steps, scheduler, schedule):
    assert prompt_schedule(prompt, steps * (2 if scheduler == "heun" else 1)) == schedule
    ours = generator.generate(prompt, steps=steps, scheduler=scheduler, **RUN)
    classes = {"euler": EulerDiscreteScheduler, "heun": HeunDiscreteScheduler}
    reference = _switched(sdxl_pipes[0], schedule, steps, classes[scheduler])
    torch.testing.assert_close(ours.latents, reference, rtol=1e-4, atol=1e-5)
    # Not the first text throughout: the switch matters.
    plain = generator.generate(schedule[0][1], steps=steps, scheduler=scheduler, **RUN)
    assert not torch.allclose(ours.latents, plain.latents)


@torch.no_grad()
def _by_hand(pipe, calls, combine, steps=3):
    """Euler steps on the UNet's own outputs: each step runs ``calls`` (batches of (hidden, pooled), each one UNet call)
    and ``combine`` turns their joined predictions into one."""
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, 64, 64, torch.float32, "cpu",
                                   torch.Generator().manual_seed(5))  # fmt: skip
    ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)  # fmt: skip
    for t in scheduler.timesteps:
        sample = scheduler.scale_model_input(latents, t)
        outs = [
            pipe.unet(torch.cat([sample] * len(hidden)), t, encoder_hidden_states=hidden,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": ids.repeat(len(hidden), 1)}).sample
            for hidden, pooled in calls
        ]  # fmt: skip
        latents = scheduler.step(combine(torch.cat(outs)), t, latents).prev_sample
    return latents


def test_and_weighs_the_parts_as_a1111s_combine_denoised(generator, sdxl_pipes):
    pipe = sdxl_pipes[0]
    scale = 5.0
    parts = [_embeds(pipe, "a cat"), _embeds(pipe, " a dog")]
    negative = _embeds(pipe, "blurry")
    hidden = torch.cat([negative[0]] + [h for h, _ in parts])
    pooled = torch.cat([negative[1]] + [p for _, p in parts])

    def combine(out):  # uncond + sum_i (cond_i - uncond) * (weight_i * scale), in order
        uncond, cat, dog = out.chunk(3)
        guided = uncond.clone()
        guided += (cat - uncond) * (1.0 * scale)
        guided += (dog - uncond) * (0.5 * scale)
        return guided

    reference = _by_hand(pipe, [(hidden, pooled)], combine)
    ours = generator.generate("a cat AND a dog:0.5", negative_prompt="blurry", steps=3, guidance=scale,
                              scheduler="euler", **RUN)  # fmt: skip
    torch.testing.assert_close(ours.latents, reference, rtol=1e-4, atol=1e-5)
    # One part with a weight is guided by it too, and at guidance 1 the parts still combine (A1111 has no shortcut).
    for prompt, weights, guidance in (("a cat:0.5", (0.5,), 5.0), ("a cat AND a dog:0.5", (1.0, 0.5), 1.0)):
        rows = parts[: len(weights)]
        hidden = torch.cat([negative[0]] + [h for h, _ in rows])
        pooled = torch.cat([negative[1]] + [p for _, p in rows])

        def combine_weighted(out, weights=weights, guidance=guidance):
            uncond, *conds = out.chunk(1 + len(weights))
            guided = uncond.clone()
            for cond, weight in zip(conds, weights, strict=True):
                guided += (cond - uncond) * (weight * guidance)
            return guided

        reference = _by_hand(pipe, [(hidden, pooled)], combine_weighted)
        ours = generator.generate(prompt, negative_prompt="blurry", steps=3, guidance=guidance, scheduler="euler",
                                  **RUN)  # fmt: skip
        torch.testing.assert_close(ours.latents, reference, rtol=1e-4, atol=1e-5)


def test_prompt_and_negative_of_other_lengths_run_apart_unless_padded(generator, sdxl_pipes):
    """A1111's default runs a 2-chunk prompt and a 1-chunk negative in two UNet calls, each at its own length; with
    pad_conds ("Pad prompt/negative prompt") the negative is followed by the empty prompt's chunk and both run as one
    batch. The two give other numbers."""
    from sdxl_control.protocol.text import encode_prompts

    pipe, scale = sdxl_pipes[0], 5.0
    long, short = "a lighthouse " * 60, "blurry"  # 120 tokens: 2 chunks; 1 chunk
    encoders = generator.base.text_encoders
    positive, negative, empty = (
        encode_prompts(encoders, [t], None, need_negative=False, zero_negative=True)[0] for t in (long, short, "")
    )

    def cfg(out):
        uncond, cond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    apart = _by_hand(pipe, [(negative.hidden, negative.pooled), (positive.hidden, positive.pooled)], cfg)
    padded_negative = torch.cat([negative.hidden, empty.hidden], dim=1)
    batched = _by_hand(pipe, [(torch.cat([padded_negative, positive.hidden]),
                               torch.cat([negative.pooled, positive.pooled]))], cfg)  # fmt: skip
    common = {"negative_prompt": short, "steps": 3, "guidance": scale, "scheduler": "euler", **RUN}
    ours_apart = generator.generate(long, **common)
    ours_padded = generator.generate(long, pad_conds=True, **common)
    torch.testing.assert_close(ours_apart.latents, apart, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_padded.latents, batched, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(apart, batched)
    assert "pad_conds" not in ours_apart.recipes[0] and ours_padded.recipes[0]["pad_conds"] is True
    # An old recipe (always padded) is re-made as it was.
    recorded = {k: v for k, v in ours_padded.recipes[0].items() if k != "pad_conds"}
    old = GenerationRequest.from_recipe({**recorded, "version": "0.2.0"})
    assert torch.equal(generator.run(old, progress_bar=False).latents, ours_padded.latents)


def test_a_plain_prompt_reads_as_before(generator):
    for prompt in ("a red fox, (snow:1.2)", "a [small] fox"):
        new = generator.generate(prompt, negative_prompt="blurry", steps=2, **RUN)
        old = generator.generate(prompt, negative_prompt="blurry", steps=2, prompt_editing=False, **RUN)
        assert torch.equal(new.latents, old.latents)


def test_recipes_before_0_3_read_editing_as_text_and_pad(generator):
    prompt = "[a cat:a dog:1] AND a fox"
    made = generator.generate(prompt, negative_prompt="blurry " * 80, steps=3, **RUN)
    recipe = made.recipes[0]
    assert "prompt_editing" not in recipe and "pad_conds" not in recipe
    again = generator.run(GenerationRequest.from_recipe(recipe), progress_bar=False)
    assert torch.equal(again.latents, made.latents)
    old = GenerationRequest.from_recipe({**recipe, "version": "0.2.0"})
    assert old.prompt_editing is False and old.pad_conds is True
    as_text = generator.run(old, progress_bar=False)
    by_hand = generator.generate(prompt, negative_prompt="blurry " * 80, steps=3, prompt_editing=False,
                                 pad_conds=True, **RUN)  # fmt: skip
    assert torch.equal(as_text.latents, by_hand.latents)
    assert not torch.allclose(as_text.latents, made.latents)
    # What an old recipe read is recorded when it is made again, so its new recipe reads the same.
    assert as_text.recipes[0]["prompt_editing"] is False and as_text.recipes[0]["pad_conds"] is True


def test_the_command_line_pads_on_request(tmp_path):
    out = tmp_path / "padded.png"
    argv = ["generate", "a lighthouse " * 60, "--negative-prompt", "blurry", "--tiny", "--size", "64x64", "--steps",
            "2", "--seed", "4", "-q", "-o", str(out)]  # fmt: skip
    assert main([*argv, "--pad-conds"]) == 0
    recipe = read_recipe(out)
    assert recipe["pad_conds"] is True and Image.open(out).size == (64, 64)
    # A1111's PNG text says it as A1111 does ("Pad conds: True"), and reads back
    text = parameters_text(recipe)
    assert "Pad conds: True" in text
    assert read_a1111(text).settings["pad_conds"] is True
    assert "pad_conds" not in read_a1111(text.replace("Pad conds: True, ", "")).settings
    old = read_a1111(text.replace("Pad conds: True", "Old prompt editing timelines: True"))
    assert any(u.startswith("Old prompt editing timelines: True") for u in old.unmapped)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("AND", "has nothing before its first AND"),
        ("a cat AND", "has nothing after its AND"),
        ("a cat AND :0.5", "has nothing after its AND"),
        ("a AND b AND  AND c", "has nothing after its second AND"),
    ],
)
def test_an_empty_and_part_is_refused(prompt, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerationRequest(prompt)
    GenerationRequest(prompt, prompt_editing=False)  # read as text: nothing to refuse
    GenerationRequest(prompt, emphasis="comfyui")


@pytest.mark.parametrize(
    ("prompt", "warning", "schedule"),
    [
        # A1111 accepts these silently; its schedules (10 steps) as its prompt_parser gives them
        ("[a:b:1.5]", "a fraction beyond 1", [(10, "a")]),
        ("[a:b:-1]", "a negative step", [(10, "b")]),
        ("[a:b:12]", "at or after the pass's last", [(10, "a")]),
        ("a | [b:c:2]", "does not parse", [(10, "a | [b:c:2]")]),  # '|' outside brackets: all text
        ("[a:b:0.5]", None, [(5, "a"), (10, "b")]),
    ],
)
def test_numbers_that_leave_a_text_unread_are_warned_of(prompt, warning, schedule, caplog):
    with caplog.at_level(logging.WARNING):
        read = scheduled_prompt(prompt, None, 10, warn=True)
    assert [tuple(e) for e in read.parts[0][0]] == schedule
    if warning is None:
        assert not caplog.records
    else:
        assert warning in caplog.text and "the prompt" in caplog.text


def test_a_hires_second_pass_counts_on_from_the_first(generator):
    request = GenerationRequest("a [cat:dog:1.5]", steps=4, hires_scale=1.5, hires_steps=6, **{"size": (64, 64)})
    second = request.hires_pass(Image.new("RGB", (96, 96)), 1)
    assert second.first_pass_steps == 4 and "first_pass_steps" not in request.settings()
    with pytest.raises(InvalidRequestError, match="first_pass_steps .* must be from 1 to 1000, got 0"):
        GenerationRequest("a", first_pass_steps=0)
    # A1111, base 4 steps, hires 6: "[cat:dog:1.5]" -> (1.5 - 1) * 6 = 3 in the second pass
    assert prompt_schedule(second.prompt, 6, first_pass_steps=4) == [(3, "a cat"), (6, "a dog")]
    # Through a generation: 1.5 reads 'a cat' all the first pass (min(2, 3)) and switches in the second, at call
    # (1.5 - 1) * 4 = 2; 2.0 switches at the second pass's end, so reads 'a cat' throughout, as the plain prompt.
    hires = {"steps": 2, "hires_scale": 1.5, "hires_steps": 4, "hires_strength": 1.0, **RUN}
    plain = generator.generate("a cat", **hires)
    late = generator.generate("[a cat:a dog:2.0]", **hires)
    switched = generator.generate("[a cat:a dog:1.5]", **hires)
    assert switched.images[0].size == (96, 96)
    assert torch.equal(late.latents, plain.latents) and not torch.allclose(switched.latents, plain.latents)


def test_and_parts_read_the_conditions_prompt_rows(generator, tiny, tmp_path):
    """A ControlNet (residuals), its guess mode, and an IP-Adapter (attention keys and values) prepare their rows for
    [negative, prompt]; with a prompt of two parts each part's rows read the prompt's (protocol.rows). Two equal parts
    of weight 0.5 sum to the prompt itself: the same latents as the plain prompt, up to float rounding."""
    from skimage.data import astronaut

    from sdxl_control.adapters.controlnet import ControlNet
    from sdxl_control.adapters.ip_adapter import IPAdapter
    from sdxl_control.testing import write_tiny_controlnet
    from sdxl_control.testing.ip_adapter import write_tiny_ip_adapter_repo

    net = write_tiny_controlnet(tmp_path / "cn", tiny.base)
    repo = write_tiny_ip_adapter_repo(tmp_path / "ip", tiny.base)
    image = tmp_path / "edges.png"
    Image.fromarray((np.arange(64 * 64 * 3) % 255).astype(np.uint8).reshape(64, 64, 3)).save(image)
    face = Image.fromarray(astronaut()).crop((140, 20, 330, 230))
    for conditions in (
        [ControlNet(str(net), image=str(image), scale=2.0)],
        [ControlNet(str(net), image=str(image), scale=2.0, guess_mode=True)],
        [IPAdapter("plus", face, source=str(repo), scale=2.0)],
    ):
        options = {"steps": 3, "guidance": 7.0, "conditions": conditions, **RUN}
        plain = generator.generate("a cat", **options)
        halves = generator.generate("a cat :0.5 AND a cat :0.5", **options)
        without = generator.generate("a cat :0.5 AND a cat :0.5", **{**options, "conditions": []})
        torch.testing.assert_close(halves.latents, plain.latents, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(halves.latents, without.latents, atol=1e-3)  # the condition acts on both parts
    condition = ControlNet(str(net), image=str(image))
    # Prompts of other lengths with it run padded, as one batch: the same as asking for padding.
    long = {"negative_prompt": "blurry", "steps": 2, "conditions": [condition], **RUN}
    apart = generator.generate("a lighthouse " * 60, **long)
    padded = generator.generate("a lighthouse " * 60, pad_conds=True, **long)
    assert torch.equal(apart.latents, padded.latents)


def test_segments_encode_each_text_once(generator, monkeypatch):
    from sdxl_control.protocol import text

    seen = []
    real = text._encode

    def counting(encoders, texts, *args, **kwargs):
        seen.append(tuple(texts))
        return real(encoders, texts, *args, **kwargs)

    monkeypatch.setattr(text, "_encode", counting)
    read = scheduled_prompt("[a cat|a dog] AND a fox", "[ugly:blurry:2]", 6)
    segments = prompt_segments(generator.base.text_encoders, "", None, [], 6, need_negative=True,
                               zero_negative=True, schedule=read, emphasis="a1111")  # fmt: skip
    assert [s[0] for s in segments] == [0, 2, 3, 4, 5]  # a cat, a dog / ugly -> blurry at 3, then alternating
    assert sorted(seen) == sorted([("a cat",), ("a dog",), (" a fox",), ("ugly",), ("blurry",)])
    assert segments[0][1].hidden.shape[0] == 2  # one row per AND part


def test_comfyui_repeats_to_a_common_length_up_to_4_times_else_runs_apart(generator, sdxl_pipes):
    """ComfyUI (comfy/conds.py CONDCrossAttn.can_concat and concat, Comfy-Org/ComfyUI @a125cd84) batches conds of
    other lengths by repeating each to their least common multiple, unless one would be repeated more than 4 times:
    then they run in separate calls (calc_cond_batch)."""
    from sdxl_control.protocol.text import encode_prompts

    pipe, scale = sdxl_pipes[0], 5.0
    encoders = generator.base.text_encoders

    def encoded(text):
        return encode_prompts(encoders, [text], None, need_negative=False, zero_negative=True, emphasis="comfyui")[0]

    def cfg(out):
        uncond, cond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    negative = encoded("blurry")
    common = {"negative_prompt": "blurry", "steps": 3, "guidance": scale, "scheduler": "euler", "emphasis": "comfyui"}
    for words, windows in ((60, 2), (180, 5)):  # 2 windows: repeated 2 times; 5: would be 5 times
        positive = encoded("a lighthouse " * words)
        assert positive.hidden.shape[1] == 77 * windows
        if windows <= 4:
            repeated = negative.hidden.repeat(1, windows, 1)
            calls = [(torch.cat([repeated, positive.hidden]), torch.cat([negative.pooled, positive.pooled]))]
        else:
            calls = [(negative.hidden, negative.pooled), (positive.hidden, positive.pooled)]
        reference = _by_hand(pipe, calls, cfg)
        batches = []  # the rows of each UNet call: repeating and running apart agree to rounding, the calls do not
        hook = generator.base.unet.register_forward_pre_hook(lambda _m, args, seen=batches: seen.append(len(args[0])))
        try:
            ours = generator.generate("a lighthouse " * words, **common, **RUN)
        finally:
            hook.remove()
        torch.testing.assert_close(ours.latents, reference, rtol=1e-4, atol=1e-5)
        assert batches == ([2] * 3 if windows <= 4 else [1, 1] * 3)
