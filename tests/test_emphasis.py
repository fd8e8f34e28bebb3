"""Prompt weighting as A1111 and ComfyUI read it: the parse, the chunks and the weighted embeddings are checked against
transcriptions of both tools (``tests/reference_prompts.py``) on the real CLIP tokenizer and the tiny SDXL text
encoders. ``emphasis="off"`` reads brackets as text; a prompt without brackets reads the same in every mode."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sdxl_control import GenerationRequest
from sdxl_control.base.errors import InvalidRequestError
from sdxl_control.cli import main
from sdxl_control.protocol.emphasis import BREAK, parse_a1111, parse_comfyui, unweighted
from sdxl_control.protocol.text import _read, encode_prompts
from sdxl_control.records.recipe import read_recipe
from tests.reference_prompts import (
    a1111_encode,
    a1111_parse,
    a1111_windows,
    comfyui_encode,
    comfyui_token_weights,
    comfyui_windows,
)

LONG = ", ".join(f"(a {c} fox:1.3)" if i % 3 else f"[{c} house]" for i, c in enumerate(["red", "green", "blue"] * 10))
SYNTAX = [
    "",
    "normal text",
    "an (important) word",
    "(unbalanced",
    "unbalanced)",
    "[unbalanced",
    r"\(literal\]",
    "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "(word:0)",
    "(word:-1.5) [[x]]",
    "(a:1.2)(b:1.2)",
    "(a (b:0.5) c:1.5)",
    "(word: 1.2)",
    "(word:abc)",
    "a \\\\ b \\ c",
    "time: noon (x:2)",
    "a portrait BREAK (studio light:1.2)",
    "BREAK (x) BREAK",
    "(a BREAK b)",
    "((masterpiece)), best quality, (photo of a woman:1.1), [blurry], (((red hair)))",
    "a photo\nof (a cat:1.3)",
    LONG,
    "word " * 70 + ", (" + "other " * 30 + ":1.2)",
]


def _ours(text: str) -> list[list]:
    return [["BREAK", -1] if f is BREAK else list(f) for f in parse_a1111(text)]


# A1111 reads a BREAK inside brackets as the word "break" weighted -1.1; we end the chunk there.
BREAK_IN_BRACKETS = "(a BREAK b)"


def _flat(rows):
    return [v for row in rows for v in row]


@pytest.mark.parametrize("text", SYNTAX, ids=range(len(SYNTAX)))
def test_the_a1111_parse_is_a1111s(text):
    if text == BREAK_IN_BRACKETS:
        assert a1111_parse(text) == [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]
        assert _ours(text) == [["a", 1.1], ["BREAK", -1], ["b", 1.1]]
        return
    assert _ours(text) == a1111_parse(text)


def test_the_a1111_parse_gives_its_documented_examples():
    assert _ours("an (important) word") == [["an ", 1.0], ["important", 1.1], [" word", 1.0]]
    assert _ours("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]
    assert _ours("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
        [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1],
    ]  # fmt: skip


@pytest.mark.parametrize("text", SYNTAX, ids=range(len(SYNTAX)))
def test_the_comfyui_parse_is_comfyuis(text):
    assert parse_comfyui(text) == comfyui_token_weights(text)


def test_bad_and_doubtful_syntax_is_said(caplog):
    with pytest.raises(InvalidRequestError, match=r"weight '1\.2\.3' .* is not a number"):
        parse_a1111("a (cat:1.2.3)")
    with pytest.raises(InvalidRequestError, match="not a number"):
        GenerationRequest("a (cat:.)", steps=2)
    GenerationRequest("a (cat:.)", steps=2, emphasis="off")  # brackets are text there
    with caplog.at_level(logging.WARNING):
        assert parse_a1111("a (cat") == [("a ", 1.0), ("cat", 1.1)]
        assert "unclosed '('" in caplog.text
        parse_a1111("a cat)")
        assert "')' at 'a cat)' closes no bracket" in caplog.text
        parse_a1111("(cat: 1.2)")
        assert "A1111 reads a weight written right after the colon" in caplog.text
        parse_comfyui("(cat:abc)")
        assert "'abc' is not a weight" in caplog.text
        parse_comfyui("(cat")
        assert "unbalanced bracket" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        GenerationRequest("a (cat", steps=2)  # checked as the request is made, said once as it is encoded
    assert not caplog.text


@pytest.mark.parametrize("emphasis", ["a1111", "off"])
@pytest.mark.parametrize("text", SYNTAX, ids=range(len(SYNTAX)))
def test_the_a1111_windows_are_a1111s(generator, text, emphasis):
    encoders = generator.base.text_encoders
    reading = _read(encoders, [text], emphasis)
    for enc, ids, weights in zip(encoders, reading.ids, reading.weights, strict=True):
        windows, multipliers = a1111_windows(enc.tokenizer, text, enc.tokenizer.pad_token_id,
                                             emphasis=emphasis == "a1111")  # fmt: skip
        if text == BREAK_IN_BRACKETS and emphasis == "a1111":
            assert len(windows) == 1 and ids.shape[0] == 2
            continue
        assert ids.tolist() == windows
        assert _flat(weights.tolist()) == pytest.approx(_flat(multipliers), abs=0, rel=1e-7)


@pytest.mark.parametrize("text", SYNTAX, ids=range(len(SYNTAX)))
def test_the_comfyui_windows_are_comfyuis(generator, text):
    encoders = generator.base.text_encoders
    reading = _read(encoders, [text], "comfyui")
    for enc, ids, weights, pad_with_end in zip(encoders, reading.ids, reading.weights, (True, False), strict=True):
        expected = comfyui_windows(enc.tokenizer, text, pad_with_end=pad_with_end)
        assert ids.tolist() == [[t for t, _ in w] for w in expected]
        assert _flat(weights.tolist()) == pytest.approx([v for w in expected for _, v in w], abs=0, rel=1e-7)


WEIGHTED = ["a (red:1.4) fox in [deep] snow", "((masterpiece)), (photo of a woman:0.7)", LONG, "plain words"]


@pytest.mark.parametrize("text", WEIGHTED, ids=range(len(WEIGHTED)))
def test_a1111_weighting_is_a1111s(generator, text):
    encoders = generator.base.text_encoders
    ours, _ = encode_prompts(encoders, [text], None, need_negative=False, zero_negative=True, emphasis="a1111")
    hidden, pooled = [], None
    for enc in encoders:
        windows, multipliers = a1111_windows(enc.tokenizer, text, enc.tokenizer.pad_token_id)
        z, p = a1111_encode(enc.model, windows, multipliers)
        hidden.append(z)
        pooled = p if p is not None else pooled
    torch.testing.assert_close(ours.hidden, torch.cat(hidden, dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("text", WEIGHTED, ids=range(len(WEIGHTED)))
def test_comfyui_weighting_is_comfyuis(generator, text):
    encoders = generator.base.text_encoders
    ours, _ = encode_prompts(encoders, [text], None, need_negative=False, zero_negative=True, emphasis="comfyui")
    hidden, pooled = [], None
    for enc, pad_with_end in zip(encoders, (True, False), strict=True):
        windows = comfyui_windows(enc.tokenizer, text, pad_with_end=pad_with_end)
        tok = enc.tokenizer
        empty = [tok.bos_token_id, tok.eos_token_id] + [tok.eos_token_id if pad_with_end else 0] * 75
        z, p = comfyui_encode(enc.model, windows, empty)
        hidden.append(z)
        pooled = p if p is not None else pooled
    torch.testing.assert_close(ours.hidden, torch.cat(hidden, dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-6, atol=1e-6)


def test_weights_change_only_their_tokens_and_no_weight_is_no_change(generator):
    encoders = generator.base.text_encoders

    def encoded(text, emphasis):
        return encode_prompts(encoders, [text], None, need_negative=False, zero_negative=True, emphasis=emphasis)[0]

    plain = encoded("a red fox in the snow", "off")
    for emphasis in ("a1111", "comfyui"):  # no brackets: the same, bit for bit
        same = encoded("a red fox in the snow", emphasis)
        assert torch.equal(same.hidden, plain.hidden) and torch.equal(same.pooled, plain.pooled)
        assert torch.equal(encoded("a (red:1) fox in the snow", emphasis).hidden, plain.hidden)
    moved = encoded("a (red:1.5) fox in the snow", "comfyui")
    changed = (moved.hidden != plain.hidden).any(dim=-1)[0]
    assert changed.nonzero().flatten().tolist() == [2]  # "red" alone: start token, "a", "red"
    assert torch.equal(moved.pooled, plain.pooled)  # the pooled embedding is never weighted, in either tool
    literal = encoded("a (red:1.5) fox in the snow", "off")
    assert literal.hidden.shape == plain.hidden.shape and not torch.equal(literal.hidden, plain.hidden)


def test_a_condition_that_rewrites_tokens_reads_the_words():
    assert unweighted("a photo of a (man:1.2) img, [blurry]", "a1111") == ("a photo of a man img, blurry", True)
    assert unweighted("a (man) img", "comfyui") == ("a man img", True)
    assert unweighted("a (man) img", "off") == ("a (man) img", False)
    assert unweighted(r"a \(man\) img", "a1111") == ("a (man) img", False)


def test_generation_weighs_words_records_the_mode_and_re_makes(generator, tmp_path):
    common = {"steps": 2, "size": (64, 64), "seed": 5, "progress_bar": False, "negative_prompt": "(blurry:1.4)"}
    weighted = generator.generate("a (red:1.6) fox", **common)
    recipe = weighted.images[0].recipe
    assert recipe["emphasis"] == "a1111"
    literal = generator.generate("a (red:1.6) fox", emphasis="off", **common)
    comfy = generator.generate("a (red:1.6) fox", emphasis="comfyui", **common)
    pixels = [np.asarray(r.images[0]) for r in (weighted, literal, comfy)]
    assert not np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
    again = generator.run(GenerationRequest.from_recipe(recipe), progress_bar=False)
    assert np.array_equal(np.asarray(again.images[0]), pixels[0])
    old = {k: v for k, v in recipe.items() if k != "emphasis"}  # a recipe from before: brackets were text
    assert GenerationRequest.from_recipe(old).emphasis == "off"
    out = tmp_path / "comfy.png"
    argv = ["generate", "a (red:1.6) fox", "--tiny", "--size", "64x64", "--steps", "2", "-q", "-o", str(out)]
    assert main([*argv, "--emphasis", "comfyui"]) == 0
    assert read_recipe(out)["emphasis"] == "comfyui"


def test_comfyui_mode_repeats_the_shorter_of_prompt_and_negative(generator):
    """ComfyUI repeats the shorter conditioning to the common length, which attention reads as the conditioning once
    (the same as running the two apart); A1111's mode pads with empty-prompt chunks."""
    encoders = generator.base.text_encoders
    long, short = "word " * 100, "blurry"

    def encoded(prompt, negative, emphasis):
        return encode_prompts(encoders, [prompt], [negative], need_negative=True, zero_negative=True,
                              emphasis=emphasis)  # fmt: skip

    alone = encode_prompts(encoders, [short], None, need_negative=False, zero_negative=True)[0].hidden
    empty = encode_prompts(encoders, [""], None, need_negative=False, zero_negative=True)[0].hidden
    positive, negative = encoded(long, short, "comfyui")
    assert negative.hidden.shape == positive.hidden.shape == (1, 154, alone.shape[-1])
    assert torch.equal(negative.hidden[:, :77], alone) and torch.equal(negative.hidden[:, 77:], alone)
    _, padded = encoded(long, short, "a1111")
    assert torch.equal(padded.hidden[:, :77], alone) and torch.equal(padded.hidden[:, 77:], empty)
    two, three = encoded("word " * 100, "word " * 160, "comfyui")
    assert two.hidden.shape[1] == three.hidden.shape[1] == 6 * 77
    unet = generator.base.unet
    sample, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    added = {"text_embeds": negative.pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        repeated = unet(sample, t, encoder_hidden_states=negative.hidden, added_cond_kwargs=added).sample
        once = unet(sample, t, encoder_hidden_states=alone, added_cond_kwargs=added).sample
    torch.testing.assert_close(repeated, once, rtol=1e-5, atol=1e-5)
