"""Prompts beyond 75 CLIP tokens are read whole, as A1111 reads them: split into 75-token chunks (``BREAK`` and commas
end chunks), each encoded in its own 77-token window, the windows joined; the pooled embedding is the first chunk's;
the shorter of prompt and negative prompt is followed by empty-prompt chunks. The split is checked against a
transcription of A1111's ``tokenize_line`` (``tests/reference_prompts.py``) on the real CLIP tokenizer, the encoding against the windows encoded by
hand on the tiny text encoders. ``long_prompts="truncate"`` keeps diffusers' cut. ComfyUI's chunks
(``emphasis="comfyui"``) follow its ``SDTokenizer.tokenize_with_weights`` at Comfy-Org/ComfyUI @ a125cd84 (a weighted
segment tokenized whole, cut where the window fills if it has 8 tokens or more), ``"comfyui-2024"`` the same method
before its commit 1c8d11e (word by word), both transcribed in ``tests/reference_prompts.py`` and checked there against
the real file."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_control import GenerationRequest
from sdxl_control.cli import main
from sdxl_control.protocol.text import _chunked, encode_prompts, prompt_chunks
from sdxl_control.records.recipe import read_recipe
from tests.reference_prompts import a1111_windows, comfyui_windows

LIST = ", ".join(f"a {colour} {thing}" for colour in ("red", "green", "blue", "white", "black", "golden", "silver")
                 for thing in ("fox", "house", "boat", "tree"))  # fmt: skip  # 28 items, 3 tokens and a comma each
CASES = [
    "",
    "a lighthouse at dusk",
    LIST,
    "word " * 75,
    "word " * 76,
    "word " * 160,
    "word " * 70 + ", " + "other " * 30,  # the comma 4 tokens before the chunk fills: the rest moves on
    "word " * 40 + ", " + "other " * 60,  # the comma 34 tokens before: too far back, the chunk is cut where it fills
    "a portrait BREAK studio light",
    "BREAK a portrait",
    "a portrait BREAK",
    "a BREAK BREAK b",
    LIST + " BREAK " + LIST,
]


def _diffusers_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids  # fmt: skip


@pytest.mark.parametrize("text", CASES, ids=range(len(CASES)))
def test_the_split_is_a1111s(generator, text):
    encoders = generator.base.text_encoders
    ids, count = _chunked(encoders, [text])
    for enc, windows in zip(encoders, ids, strict=True):
        expected, _ = a1111_windows(enc.tokenizer, text, enc.tokenizer.pad_token_id, emphasis=False)
        assert windows.tolist() == expected and count == len(expected)
        assert len(prompt_chunks(enc.tokenizer, text)) == count


def test_the_split_has_the_cases_it_names(generator):
    tokenizer = generator.base.text_encoders[0].tokenizer
    sizes = {text: [len(c) for c in prompt_chunks(tokenizer, text)] for text in CASES}
    assert sizes["word " * 75] == [75] and sizes["word " * 76] == [75, 1] and sizes[""] == [0]
    assert sizes["word " * 70 + ", " + "other " * 30] == [71, 30]  # cut after the comma
    assert sizes["word " * 40 + ", " + "other " * 60] == [75, 26]  # the comma too far back: cut where full
    assert sizes["a BREAK BREAK b"] == [1, 0, 1] and sizes["BREAK a portrait"] == [0, 2]


def test_a_prompt_within_one_window_reads_as_diffusers_does(generator):
    """75 tokens or fewer: the same ids as diffusers' tokenization, the same embeddings both ways, bit for bit."""
    encoders = generator.base.text_encoders
    for text in ("a lighthouse at dusk", "word " * 75, ""):
        ids, _ = _chunked(encoders, [text])
        for enc, windows in zip(encoders, ids, strict=True):
            assert torch.equal(windows, _diffusers_ids(enc.tokenizer, text))
        chunks, _ = encode_prompts(encoders, [text], None, need_negative=False, zero_negative=True)
        cut, _ = encode_prompts(encoders, [text], None, need_negative=False, zero_negative=True,
                                long_prompts="truncate")  # fmt: skip
        assert torch.equal(chunks.hidden, cut.hidden) and torch.equal(chunks.pooled, cut.pooled)


def test_a_long_prompt_is_its_windows_encoded_apart_and_joined(generator):
    encoders = generator.base.text_encoders
    text = LIST + " BREAK " + LIST
    ids, count = _chunked(encoders, [text])
    assert count == 4  # each list is two chunks
    positive, _ = encode_prompts(encoders, [text], None, need_negative=False, zero_negative=True)
    by_hand, pooled = [], None
    with torch.no_grad():
        for enc, windows in zip(encoders, ids, strict=True):
            states = [enc.model(w[None], output_hidden_states=True) for w in windows]
            by_hand.append(torch.cat([s.hidden_states[-2] for s in states], dim=1))
            if states[0][0].ndim == 2:
                pooled = states[0][0]  # the first chunk's
    torch.testing.assert_close(positive.hidden, torch.cat(by_hand, dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(positive.pooled, pooled, rtol=1e-5, atol=1e-5)
    assert positive.hidden.shape[1] == 4 * 77


def test_the_shorter_of_prompt_and_negative_is_followed_by_empty_chunks(generator):
    encoders = generator.base.text_encoders
    long, short = "word " * 100, "blurry"
    empty, _ = encode_prompts(encoders, [""], None, need_negative=False, zero_negative=True)
    alone = {t: encode_prompts(encoders, [t], None, need_negative=False, zero_negative=True)[0] for t in (long, short)}
    for prompt, negative in ((long, short), (short, long)):
        positive, negative_embeddings = encode_prompts(encoders, [prompt], [negative], need_negative=True,
                                                       zero_negative=True)  # fmt: skip
        assert positive.hidden.shape == negative_embeddings.hidden.shape == (1, 154, positive.hidden.shape[2])
        shorter = positive if prompt == short else negative_embeddings
        torch.testing.assert_close(shorter.hidden[:, :77], alone[short].hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shorter.hidden[:, 77:], empty.hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shorter.pooled, alone[short].pooled, rtol=1e-5, atol=1e-5)
    # No negative prompt on the SDXL base: zeros, as long as the prompt.
    positive, zeros = encode_prompts(encoders, [long], None, need_negative=True, zero_negative=True)
    assert zeros.hidden.shape == positive.hidden.shape and not zeros.hidden.any()


def test_a_long_prompt_generates_whole_and_truncate_keeps_diffusers_cut(generator, tiny, tmp_path, caplog):
    common = {"steps": 3, "size": (64, 64), "seed": 4, "progress_bar": False, "negative_prompt": "blurry, " * 40}
    long = "a lighthouse " * 60  # 120 tokens, no comma
    with caplog.at_level(logging.WARNING):
        whole = generator.generate(long, **common)
    assert "truncated" not in caplog.text and whole.images[0].recipe["long_prompts"] == "chunks"
    cut = generator.generate(long, long_prompts="truncate", **common)
    assert "prompt truncated to 77 CLIP tokens" in caplog.text
    # Cut to one window by hand, in chunks: the same as diffusers' cut of the long prompt.
    first = "a lighthouse " * 37 + "a"  # its first 75 tokens
    by_hand = generator.generate(first, negative_prompt="blurry, " * 37 + "blurry", steps=3, size=(64, 64), seed=4,
                                 progress_bar=False)  # fmt: skip
    assert np.array_equal(np.asarray(cut.images[0]), np.asarray(by_hand.images[0]))
    assert not np.array_equal(np.asarray(whole.images[0]), np.asarray(cut.images[0]))
    # The recipe re-makes the image; a recipe from before chunks (no long_prompts) re-runs with the cut.
    again = generator.run(GenerationRequest.from_recipe(whole.images[0].recipe), progress_bar=False)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(whole.images[0]))
    old = {k: v for k, v in whole.images[0].recipe.items() if k != "long_prompts"}
    assert GenerationRequest.from_recipe(old).long_prompts == "truncate"
    # The command line's switch.
    out = tmp_path / "cut.png"
    argv = ["generate", long, "--tiny", "--size", "64x64", "--steps", "3", "--seed", "4", "-q", "-o", str(out)]
    assert main([*argv, "--long-prompts", "truncate"]) == 0
    assert read_recipe(out)["long_prompts"] == "truncate" and Image.open(out).size == (64, 64)
    assert main([*argv, "--dry-run"]) == 0


COMFYUI_CASES = {
    # A weighted segment of 5 tokens with 3 places left: ComfyUI moves it whole to the next chunk; word by word, three
    # words fit.
    "word " * 72 + "(a red fox in snow:1.2)": ([72, 5], [75, 2]),
    # 30 tokens of one weight (8 or more): cut where the chunk fills, both ways.
    "word " * 70 + "(" + "other " * 30 + ":1.2)": ([75, 25], [75, 25]),
    # The whole unweighted prompt is one segment (100 tokens): cut where the chunk fills; word by word, the same.
    "word " * 100: ([75, 25], [75, 25]),
    # A long unweighted segment after a weighted one that moved: "a b c d e f g" is 7 tokens, kept whole.
    "word " * 70 + "(x:1.1) a b c d e f g": ([71, 7], [75, 3]),
    # A word of many tokens (8 or more): cut where the chunk fills, both ways.
    "word " * 70 + "supercalifragilisticexpialidocious" * 2: ([75, 14], [75, 14]),
}


@pytest.mark.parametrize("text", COMFYUI_CASES, ids=range(len(COMFYUI_CASES)))
def test_comfyui_cuts_chunks_as_comfyui_does_now_and_did(generator, text):
    """ComfyUI since 1c8d11e keeps a weighted segment of fewer than 8 tokens whole and cuts a longer one where the
    window fills; before, each word was its own group ("comfyui-2024", what recipes of 0.2 recorded as "comfyui")."""
    encoders = generator.base.text_encoders
    now, before = COMFYUI_CASES[text]
    for emphasis, sizes, before_1c8d11e in (("comfyui", now, False), ("comfyui-2024", before, True)):
        assert [len(c) for c in prompt_chunks(encoders[0].tokenizer, text, emphasis)] == sizes
        ids, count = _chunked_as(encoders, text, emphasis)
        for enc, windows, pad_with_end in zip(encoders, ids, (True, False), strict=True):
            expected = comfyui_windows(enc.tokenizer, text, pad_with_end=pad_with_end, before_1c8d11e=before_1c8d11e)
            assert windows.tolist() == [[t for t, _ in w] for w in expected] and count == len(expected)


def _chunked_as(encoders, text, emphasis):
    from sdxl_control.protocol.text import _read

    reading = _read(encoders, [text], emphasis)
    return reading.ids, reading.windows
