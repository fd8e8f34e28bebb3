"""Prompt weighting as A1111 and ComfyUI read it: the parse, the tokens, the chunks and the weighted embeddings are
checked against transcriptions of both tools (``tests/reference_prompts.py``: A1111 @ 28bd8e14 / 5ad03e65 / 01a40c62
/ 0bba67e8, ComfyUI @ a125cd84 and before its commit 1c8d11e; each checked against the real file, see there) on the
real CLIP tokenizer and the tiny SDXL text encoders, and the second encoder's tokens against open_clip's own
tokenizer. ``emphasis="off"`` reads brackets as text; a prompt without brackets reads the same in every mode. The
readings recipes recorded before 0.3.0 (``"a1111-0.2"``, ``"comfyui-2024"``) are checked against what they were."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sdxl_control import GenerationRequest
from sdxl_control.base.errors import IncompatibleModelError, InvalidRequestError
from sdxl_control.cli import main
from sdxl_control.protocol.emphasis import BREAK, parse_a1111, parse_comfyui, unweighted, weighted_tokens
from sdxl_control.protocol.text import _read, encode_prompts
from sdxl_control.records.recipe import read_recipe
from tests.reference_prompts import (
    a1111_encode,
    a1111_parse,
    a1111_tokenize,
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
    # Issue 36: weights with spaces (A1111 1.6+), text A1111's tokenizers clean (ftfy, open_clip's HTML unescape).
    "(word:1.2 )",
    "(red fox : 0.7)",
    "( word :\n1.2\n) and (x :-0.5)",
    "(fish &amp; chips: 1.3)",
    "Ｆｕｌｌ ｗｉｄｔｈ (letters:1.2)",
    "“curly” quotes, ﬁne ligatures",
    "x &amp;amp; y &lt;3",
    "a<b &amp; c",
    "CAPITALS  and   spaces\tand\nnewlines",
]
# Texts A1111's tokenizers read differently from diffusers' (and sdxl-control 0.2's) tokenizer.
CLEANED = ["fish &amp; chips", "Ｆｕｌｌ ｗｉｄｔｈ", "“curly” quotes", "x &amp;amp; y &lt;3", "a<b &amp; c", "ﬁsh"]


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
def test_the_0_2_reading_parses_weights_as_a1111_before_1_6(text):
    """``"a1111-0.2"`` (recipes recorded before 0.3.0) keeps the weight only right after the colon, A1111 @ 0674fab."""
    if text == BREAK_IN_BRACKETS:
        return
    old = [["BREAK", -1] if f is BREAK else list(f) for f in parse_a1111(text, spaced=False)]
    assert old == a1111_parse(text, spaced=False)


def test_weights_with_spaces_are_weights():
    for text, weighed in (("(word: 1.2)", "word"), ("(word:1.2 )", "word"), ("(red fox : 0.7)", "red fox ")):
        (fragment,) = parse_a1111(text)
        assert fragment == (weighed, float(text.split(":")[1].strip(" )")))
        assert parse_a1111(text, spaced=False) == [(text[1:-1], 1.1)]  # 0.2's reading: text weighted 1.1
        assert unweighted(text, "a1111") == (weighed, True) and unweighted(text, "a1111-0.2") == (text[1:-1], True)


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
        assert parse_a1111("(cat: 1.2)") == [("cat", 1.2)]
        assert "(cat: 1.2)" not in caplog.text  # a weight, as A1111 1.6+ reads it: nothing to say
        assert parse_a1111("(cat: 1.2)", spaced=False) == [("cat: 1.2", 1.1)]
        assert "read as text weighted 1.1, as sdxl-control 0.2 read it" in caplog.text
        parse_comfyui("(cat:abc)")
        assert "'abc' is not a weight" in caplog.text
        parse_comfyui("(cat")
        assert "unbalanced bracket" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        GenerationRequest("a (cat", steps=2)  # checked as the request is made, said once as it is encoded
    assert not caplog.text


@pytest.mark.parametrize("emphasis", ["a1111", "off", "a1111-0.2"])
@pytest.mark.parametrize("text", SYNTAX, ids=range(len(SYNTAX)))
def test_the_a1111_windows_are_a1111s(generator, text, emphasis):
    """ "a1111": A1111's tokenizers (CLIP-L's, bigG's open_clip); "off" and "a1111-0.2": diffusers' tokenizer, the
    latter with the weights before A1111 1.6."""
    encoders = generator.base.text_encoders
    reading = _read(encoders, [text], emphasis)
    for number, (enc, ids, weights) in enumerate(zip(encoders, reading.ids, reading.weights, strict=True)):
        windows, multipliers = a1111_windows(
            enc.tokenizer, text, enc.tokenizer.pad_token_id, emphasis=emphasis != "off",
            open_clip=number == 1 if emphasis == "a1111" else None, spaced=emphasis == "a1111",
        )  # fmt: skip
        if text == BREAK_IN_BRACKETS and emphasis != "off":
            assert len(windows) == 1 and ids.shape[0] == 2
            continue
        assert ids.tolist() == windows
        assert _flat(weights.tolist()) == pytest.approx(_flat(multipliers), abs=0, rel=1e-7)


@pytest.mark.parametrize("emphasis", ["comfyui", "comfyui-2024"])
@pytest.mark.parametrize("text", SYNTAX, ids=range(len(SYNTAX)))
def test_the_comfyui_windows_are_comfyuis(generator, text, emphasis):
    """ "comfyui": ComfyUI @ a125cd84; "comfyui-2024": before its commit 1c8d11e (word by word)."""
    encoders = generator.base.text_encoders
    reading = _read(encoders, [text], emphasis)
    for enc, ids, weights, pad_with_end in zip(encoders, reading.ids, reading.weights, (True, False), strict=True):
        expected = comfyui_windows(enc.tokenizer, text, pad_with_end=pad_with_end,
                                   before_1c8d11e=emphasis == "comfyui-2024")  # fmt: skip
        assert ids.tolist() == [[t for t, _ in w] for w in expected]
        assert _flat(weights.tolist()) == pytest.approx([v for w in expected for _, v in w], abs=0, rel=1e-7)


LONG_SEGMENT = "a fox, (" + "long weighted segment " * 30 + ": 1.1)"  # 90 tokens of one weight
WEIGHTED = [
    "a (red:1.4) fox in [deep] snow",
    "((masterpiece)), (photo of a woman:0.7)",
    LONG,
    "plain words",
    "(fish &amp; chips : 1.3), Ｆｕｌｌ ｗｉｄｔｈ",
    LONG_SEGMENT,
]


@pytest.mark.parametrize("text", WEIGHTED, ids=range(len(WEIGHTED)))
def test_a1111_weighting_is_a1111s(generator, text):
    encoders = generator.base.text_encoders
    ours, _ = encode_prompts(encoders, [text], None, need_negative=False, zero_negative=True, emphasis="a1111")
    hidden, pooled = [], None
    for number, enc in enumerate(encoders):
        windows, multipliers = a1111_windows(enc.tokenizer, text, enc.tokenizer.pad_token_id, open_clip=number == 1)
        z, p = a1111_encode(enc.model, windows, multipliers)
        hidden.append(z)
        pooled = p if p is not None else pooled
    torch.testing.assert_close(ours.hidden, torch.cat(hidden, dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.pooled, pooled, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("emphasis", ["comfyui", "comfyui-2024"])
@pytest.mark.parametrize("text", WEIGHTED, ids=range(len(WEIGHTED)))
def test_comfyui_weighting_is_comfyuis(generator, text, emphasis):
    encoders = generator.base.text_encoders
    ours, _ = encode_prompts(encoders, [text], None, need_negative=False, zero_negative=True, emphasis=emphasis)
    hidden, pooled = [], None
    for enc, pad_with_end in zip(encoders, (True, False), strict=True):
        windows = comfyui_windows(enc.tokenizer, text, pad_with_end=pad_with_end,
                                  before_1c8d11e=emphasis == "comfyui-2024")  # fmt: skip
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


def _ids(tokenizer, text, emphasis, **kwargs):
    return [t for chunk in weighted_tokens(tokenizer, text, emphasis, **kwargs) for t, _ in chunk]


@pytest.mark.parametrize("text", CLEANED, ids=range(len(CLEANED)))
def test_a1111_tokenizes_as_its_tokenizers_do(generator, text):
    """The second encoder's tokens are open_clip's own tokenizer's (the real one, which A1111 runs for OpenCLIP bigG:
    ftfy, HTML unescaped twice, whitespace, lower case); CLIP-L's are transformers' Python tokenizer's with ftfy (no
    HTML unescape of its own: ftfy's leaves ``a<b &amp; c`` alone). 0.2's reading keeps diffusers' tokenizer."""
    import open_clip.tokenizer

    clip_l, open_clip_g = (e.tokenizer for e in generator.base.text_encoders)
    assert _ids(open_clip_g, text, "a1111", open_clip=True) == open_clip.tokenizer._tokenizer.encode(text)
    assert _ids(clip_l, text, "a1111") == a1111_tokenize(text, open_clip=False)
    as_diffusers = clip_l(text, add_special_tokens=False).input_ids
    assert _ids(clip_l, text, "a1111-0.2") == _ids(open_clip_g, text, "a1111-0.2", open_clip=True) == as_diffusers
    assert as_diffusers != open_clip.tokenizer._tokenizer.encode(text)  # each text is one that A1111 reads otherwise
    if text != "a<b &amp; c":  # ftfy unescapes entities only in text without "<"
        assert _ids(clip_l, text, "a1111") == _ids(open_clip_g, text, "a1111", open_clip=True)
    assert _ids(clip_l, "Fish &amp; Chips", "a1111") == _ids(clip_l, "fish & chips", "off")


def test_encoders_that_cut_a_prompt_apart_are_padded_with_a_warning(generator, caplog):
    """Only "<" keeps ftfy from unescaping: CLIP-L reads ``&amp;`` as three tokens where bigG reads ``&``, so this
    prompt is two chunks for one and one for the other. A1111 stops there (its conditioner joins the two encoders'
    states along the width); here the shorter reading is followed by an empty chunk, with a warning."""
    encoders = generator.base.text_encoders
    text = "a<b " + "fish &amp; chips, " * 15
    with caplog.at_level(logging.WARNING):
        reading = _read(encoders, [text], "a1111")
    assert "cut 'a<b fish" in caplog.text and "2 and 1" in caplog.text
    clip_l, open_clip_g = (a1111_windows(e.tokenizer, text, e.tokenizer.pad_token_id, open_clip=k == 1)[0]
                           for k, e in enumerate(encoders))  # fmt: skip
    assert len(clip_l) == 2 and len(open_clip_g) == 1
    empty = a1111_windows(encoders[1].tokenizer, "", encoders[1].tokenizer.pad_token_id, open_clip=True)[0]
    assert reading.ids[0].tolist() == clip_l and reading.ids[1].tolist() == open_clip_g + empty
    # The other readings share one tokenizer: two that cut a prompt apart are refused.
    other = type(encoders[1])(_Cleaning(encoders[1].tokenizer), encoders[1].model)
    with pytest.raises(IncompatibleModelError, match="split the prompt differently"):
        _read([encoders[0], other], [text], "off")


class _Cleaning:
    """A tokenizer that unescapes HTML before it reads (as if a stage's two tokenizers differed)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, text, **kwargs):
        return self.tokenizer(text.replace("&amp;", "&"), **kwargs)


def test_an_empty_negative_is_zeros_as_a1111_makes_it(generator):
    """A1111 zeroes an SDXL negative prompt that is "" (``force_zero_negative_prompt``, A1111 @ 0bba67e8), the text
    states and the pooled vector; ComfyUI encodes "" as any prompt (checked against its ``sd1_clip`` @ a125cd84), as
    diffusers and sdxl-control 0.2 did; a stage that zeroes no missing negative (the refiner) zeroes no "" either."""
    encoders = generator.base.text_encoders

    def negative(emphasis, zero=True, texts=("",)):
        return encode_prompts(encoders, ["a fox"], list(texts), need_negative=True, zero_negative=zero,
                              emphasis=emphasis)[1]  # fmt: skip

    zeros = negative("a1111")
    assert not zeros.hidden.any() and not zeros.pooled.any() and zeros.hidden.shape == (1, 77, zeros.hidden.shape[2])
    missing = encode_prompts(encoders, ["a fox"], None, need_negative=True, zero_negative=True, emphasis="a1111")[1]
    assert torch.equal(zeros.hidden, missing.hidden) and torch.equal(zeros.pooled, missing.pooled)
    empty = encode_prompts(encoders, [""], None, need_negative=False, zero_negative=True)[0]
    for emphasis in ("comfyui", "comfyui-2024", "a1111-0.2", "off"):
        encoded = negative(emphasis)
        assert torch.equal(encoded.hidden, empty.hidden) and torch.equal(encoded.pooled, empty.pooled)
    assert torch.equal(negative("a1111", zero=False).hidden, empty.hidden)
    assert negative("a1111", texts=[" "]).hidden.any()  # only "" itself, as A1111's x == ''


def test_an_empty_negative_generates_as_a_missing_one(generator):
    common = {"steps": 2, "size": (64, 64), "seed": 3, "progress_bar": False}
    missing = np.asarray(generator.generate("a fox", **common).images[0])
    empty = np.asarray(generator.generate("a fox", negative_prompt="", **common).images[0])
    assert np.array_equal(empty, missing)
    comfy = np.asarray(generator.generate("a fox", negative_prompt="", emphasis="comfyui", **common).images[0])
    comfy_missing = np.asarray(generator.generate("a fox", emphasis="comfyui", **common).images[0])
    assert not np.array_equal(comfy, comfy_missing)


def test_recipes_recorded_before_0_3_0_keep_their_reading(generator):
    """A recipe of 0.2 re-makes its pixels: its "a1111" is read as 0.2 read it (``"a1111-0.2"``: weights right after
    the colon, diffusers' tokenizer, "" encoded) and its "comfyui" with the older chunks (``"comfyui-2024"``); a
    recipe of 0.3.0, or a job written by hand (no version), reads as now."""
    common = {"steps": 2, "size": (64, 64), "seed": 5, "progress_bar": False, "negative_prompt": ""}
    text = "a (red: 1.6) fox, fish &amp; chips"
    now = generator.generate(text, **common)
    recipe = now.images[0].recipe
    assert recipe["version"] == "0.3.0" and recipe["emphasis"] == "a1111"
    for version, emphasis, read in (("0.2.0", "a1111", "a1111-0.2"), ("0.2.0", "comfyui", "comfyui-2024"),
                                    ("0.1.0", "off", "off"), ("0.3.0", "a1111", "a1111"),
                                    ("0.3.0", "comfyui", "comfyui"), (None, "comfyui", "comfyui")):  # fmt: skip
        old = {**recipe, "version": version, "emphasis": emphasis}
        if version is None:
            del old["version"]
        assert GenerationRequest.from_recipe(old).emphasis == read
    old = GenerationRequest.from_recipe({**recipe, "version": "0.2.0"})
    again = generator.run(old, progress_bar=False)
    as_0_2 = generator.generate(text, emphasis="a1111-0.2", **common)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(as_0_2.images[0]))
    assert not np.array_equal(np.asarray(again.images[0]), np.asarray(now.images[0]))
    assert again.images[0].recipe["emphasis"] == "a1111-0.2"  # the re-made image's recipe keeps the reading
    remade = generator.run(GenerationRequest.from_recipe(recipe), progress_bar=False)
    assert np.array_equal(np.asarray(remade.images[0]), np.asarray(now.images[0]))


def test_the_2024_comfyui_reading_keeps_what_0_2_read(generator):
    """``"comfyui-2024"`` re-makes 0.2's recipes: 0.2 took a word found whole in the vocabulary as that one token,
    which ComfyUI (before 1c8d11e, and now) never did: they differ on a lone capital letter (the byte-level ``A</w>``,
    where ComfyUI's tokenizer lower-cases). ComfyUI's current reading is ComfyUI's."""
    clip_l = generator.base.text_encoders[0].tokenizer
    text = "A cat"
    old = _ids(clip_l, text, "comfyui-2024")
    assert old[0] == clip_l.get_vocab()["A</w>"] and old[1:] == _ids(clip_l, "cat", "comfyui-2024")
    comfy_then = [t for w in comfyui_windows(clip_l, text, pad_with_end=True, before_1c8d11e=True) for t, _ in w]
    assert old != comfy_then[1 : 1 + len(old)]
    comfy_now = [t for w in comfyui_windows(clip_l, text, pad_with_end=True) for t, _ in w]
    assert _ids(clip_l, text, "comfyui") == comfy_now[1:3] == comfy_then[1:3]
