"""Transcriptions of how A1111 and ComfyUI read an SDXL prompt, for the equivalence tests.

Written for these tests from the references' code; each part names the repository and commit it follows. Each was
checked (December 2026) against the real file, run in a scratch folder outside this repository on the real CLIP
tokenizer and the tiny SDXL text encoders: the same ids, weights and hidden states on the prompts of issue 36 and
of these tests (weights with spaces, ``fish &amp; chips``, full-width letters, curly quotes, long weighted segments,
``BREAK``, nesting, unbalanced brackets, escapes). A1111's ``modules.shared`` options were stubbed at their defaults
and its textual-inversion database left empty; ComfyUI's model classes were stubbed around the real tokenizer code.

* ``a1111_parse``: ``modules/prompt_parser.py`` ``parse_prompt_attention`` (AUTOMATIC1111/stable-diffusion-webui
  @ 28bd8e14, the same in lllyasviel/stable-diffusion-webui-forge @ dfdcbab6), its regular expression and bracket
  stacks; a weight may have spaces around it since A1111 1.6 (PR #12177). ``spaced=False``: the expression before
  that (@ 0674fab), which sdxl-control 0.2 followed.
* ``a1111_tokenize``: A1111's two SDXL tokenizers. CLIP-L: transformers' Python ``CLIPTokenizer`` (``_tokenize``,
  huggingface/transformers @ 01f287b3, the class A1111's ``sgm`` embedder loads) with ftfy installed, as A1111 has
  it: ``whitespace_clean(ftfy.fix_text(text)).lower()``, then CLIP's byte-pair encoding. OpenCLIP bigG: open_clip's
  own ``SimpleTokenizer.encode`` (``modules/sd_hijack_open_clip.py`` ``FrozenOpenCLIPEmbedder2WithCustomWords``,
  A1111 @ 01a40c62), the installed open_clip's, run as is.
* ``a1111_windows``: ``modules/sd_hijack_clip.py`` ``tokenize_line`` (A1111 @ 5ad03e65: chunks of 75 with the comma
  backtrack of 20, ``BREAK``, multipliers) and ``process_tokens``' padding after the first end token (``id_pad``:
  the end token for CLIP-L, 0 for OpenCLIP-G). No textual-inversion embeddings.
* ``a1111_encode``: ``process_tokens`` with ``modules/sd_emphasis.py`` ``EmphasisOriginal`` (and "No norm"; A1111
  @ f8391b8a) for one encoder: each chunk through the transformer's penultimate layer, weighted, rescaled to its
  mean; chunks joined with ``hstack``; the pooled output the first chunk's. SDXL's conditioner joins the two
  encoders along the width; a negative prompt that is all ``""`` is zeros (``modules/sd_models_xl.py``
  ``get_learned_conditioning``, A1111 @ 0bba67e8, ``force_zero_negative_prompt``).
* ``comfyui_token_weights``: ``comfy/sd1_clip.py`` ``escape_important`` / ``parse_parentheses`` / ``token_weights``
  / ``unescape_important`` (Comfy-Org/ComfyUI @ a125cd84; unchanged since comfyanonymous/ComfyUI @ 00728eb).
* ``comfyui_windows``: ``SDTokenizer.tokenize_with_weights`` (ComfyUI @ a125cd84: each weighted segment tokenized
  whole, cut before each `` embedding:``, ``max_word_length`` 8; padding with the end token for clip_l and 0 for
  clip_g: ``SDXLClipGTokenizer``'s ``pad_with_end=False``). ``before_1c8d11e``: the same method before ComfyUI's
  commit 1c8d11e (December 2024; @ a220d11e): each space-separated word tokenized apart. No embeddings.
* ``comfyui_encode``: ``ClipTokenWeightEncoder.encode_token_weights`` (ComfyUI @ a125cd84): an empty-prompt window
  encoded beside the sections when any weight is not 1, each weighted token moved from it; ``SDXLClipModel`` joins
  clip_l and clip_g along the width, the pooled output clip_g's first section's.
"""

from __future__ import annotations

import re

import ftfy
import regex
import torch

RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
RE_ATTENTION_BEFORE_1_6 = re.compile(RE_ATTENTION.pattern.replace(r":\s*([+-]?[.\d]+)\s*\)", r":([+-]?[.\d]+)\)"), re.X)
RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def a1111_parse(text: str, *, spaced: bool = True) -> list[list]:
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start_position, multiplier):
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in (RE_ATTENTION if spaced else RE_ATTENTION_BEFORE_1_6).finditer(text):
        piece = m.group(0)
        weight = m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(RE_BREAK, piece)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if len(res) == 0:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)


def a1111_tokenize(text: str, *, open_clip: bool) -> list[int]:
    """``text``'s ids as A1111's tokenizer for one SDXL encoder gives them (see the module): open_clip's own
    ``SimpleTokenizer`` for OpenCLIP bigG; transformers' Python ``CLIPTokenizer._tokenize`` with ftfy for CLIP-L."""
    from open_clip.tokenizer import _tokenizer as simple  # the instance A1111's sd_hijack_open_clip uses

    if open_clip:
        return simple.encode(text)
    text = regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()  # whitespace_clean(self.fix_text(text)).lower()
    ids = []
    for token in regex.findall(CLIP_PATTERN, text):
        token = "".join(simple.byte_encoder[b] for b in token.encode("utf-8"))
        ids.extend(simple.encoder[piece] for piece in simple.bpe(token).split(" "))  # the same merges and vocabulary
    return ids


def a1111_windows(
    tokenizer, text: str, pad_id: int, *, emphasis: bool = True, open_clip: bool | None = None, spaced: bool = True
) -> tuple[list[list[int]], list[list[float]]]:
    """The windows (ids, multipliers) one SDXL text encoder reads; ``emphasis=False`` is the "None" option's
    ``[[line, 1.0]]`` with ``BREAK`` still split, as a prompt without brackets parses. ``open_clip``: tokenized as
    A1111 tokenizes for OpenCLIP bigG (True) or CLIP-L (False), see :func:`a1111_tokenize`; ``None``: by
    ``tokenizer`` itself (transformers' Rust tokenizer, as diffusers and sdxl-control 0.2 read prompts).
    ``spaced=False``: weights only right after the colon (A1111 before 1.6)."""
    chunk_length, backtrack = 75, 20
    id_start, id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma_token = tokenizer.get_vocab().get(",</w>", None)
    if emphasis:
        parsed = a1111_parse(text, spaced=spaced)
    else:
        parsed = []
        for i, part in enumerate(re.split(RE_BREAK, text)):
            if i > 0:
                parsed.append(["BREAK", -1])
            parsed.append([part, 1.0])
    if open_clip is None:
        tokenized = [tokenizer(t, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]
                     for t, _ in parsed]  # fmt: skip
    else:
        tokenized = [a1111_tokenize(t, open_clip=open_clip) for t, _ in parsed]
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    multipliers: list[float] = []
    last_comma = -1

    def next_chunk():
        nonlocal tokens, multipliers, last_comma
        to_add = chunk_length - len(tokens)
        if to_add > 0:
            tokens += [id_end] * to_add
            multipliers += [1.0] * to_add
        chunks.append(([id_start] + tokens + [id_end], [1.0] + multipliers + [1.0]))
        tokens, multipliers, last_comma = [], [], -1

    for ids, (text_part, weight) in zip(tokenized, parsed, strict=True):
        if text_part == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma_token:
                last_comma = len(tokens)
            elif (
                backtrack != 0
                and len(tokens) == chunk_length
                and last_comma != -1
                and len(tokens) - last_comma <= backtrack
            ):
                break_location = last_comma + 1
                reloc_tokens, reloc_mults = tokens[break_location:], multipliers[break_location:]
                tokens, multipliers = tokens[:break_location], multipliers[:break_location]
                next_chunk()
                tokens, multipliers = reloc_tokens, reloc_mults
            if len(tokens) == chunk_length:
                next_chunk()
            tokens.append(token)
            multipliers.append(weight)
            position += 1
    if tokens or not chunks:
        next_chunk()
    windows, weights = [], []
    for window, mults in chunks:
        first_end = window.index(id_end)
        windows.append(window[: first_end + 1] + [pad_id] * (len(window) - first_end - 1))
        weights.append(mults)
    return windows, weights


@torch.no_grad()
def a1111_encode(model, windows, multipliers, *, norm: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    zs, pooled = [], None
    for ids, mults in zip(windows, multipliers, strict=True):
        out = model(torch.asarray([ids]), output_hidden_states=True)
        z = out.hidden_states[-2]
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]
        batch_multipliers = torch.asarray([mults])
        original_mean = z.mean()
        z = z * batch_multipliers.reshape(batch_multipliers.shape + (1,)).expand(z.shape)
        if norm:
            new_mean = z.mean()
            z = z * (original_mean / new_mean)
        zs.append(z)
    return torch.hstack(zs), pooled


def comfyui_token_weights(text: str) -> list[tuple[str, float]]:
    def parse_parentheses(string):
        result = []
        current_item = ""
        nesting_level = 0
        for char in string:
            if char == "(":
                if nesting_level == 0:
                    if current_item:
                        result.append(current_item)
                    current_item = "("
                else:
                    current_item += char
                nesting_level += 1
            elif char == ")":
                nesting_level -= 1
                if nesting_level == 0:
                    result.append(current_item + ")")
                    current_item = ""
                else:
                    current_item += char
            else:
                current_item += char
        if current_item:
            result.append(current_item)
        return result

    def token_weights(string, current_weight):
        out = []
        for x in parse_parentheses(string):
            weight = current_weight
            if len(x) >= 2 and x[-1] == ")" and x[0] == "(":
                x = x[1:-1]
                xx = x.rfind(":")
                weight *= 1.1
                if xx > 0:
                    try:
                        weight = float(x[xx + 1 :])
                        x = x[:xx]
                    except ValueError:
                        pass
                out += token_weights(x, weight)
            else:
                out += [(x, current_weight)]
        return out

    escaped = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    return [(t.replace("\0\1", ")").replace("\0\2", "("), w) for t, w in token_weights(escaped, 1.0)]


def comfyui_windows(
    tokenizer, text: str, *, pad_with_end: bool, before_1c8d11e: bool = False
) -> list[list[tuple[int, float]]]:
    max_length, max_word_length = 77, 8
    empty = tokenizer("")["input_ids"]
    start_token, end_token = empty[0], empty[1]
    pad_token = end_token if pad_with_end else 0
    tokens = []
    for weighted_segment, weight in comfyui_token_weights(text):
        if before_1c8d11e:
            to_tokenize = [x for x in weighted_segment.replace("\n", " ").split(" ") if x != ""]
        else:
            split = re.split(" {0}|\n{0}".format("embedding:"), weighted_segment)
            to_tokenize = [split[0]] + ["embedding:" + x for x in split[1:]]
            to_tokenize = [x for x in to_tokenize if x != ""]
        for word in to_tokenize:
            tokens.append([(t, weight) for t in tokenizer(word)["input_ids"][1:-1]])
    batched_tokens = []
    batch = [(start_token, 1.0)]
    batched_tokens.append(batch)
    for t_group in tokens:
        is_large = len(t_group) >= max_word_length
        while len(t_group) > 0:
            if len(t_group) + len(batch) > max_length - 1:
                remaining_length = max_length - len(batch) - 1
                if is_large:
                    batch.extend(t_group[:remaining_length])
                    batch.append((end_token, 1.0))
                    t_group = t_group[remaining_length:]
                else:
                    batch.append((end_token, 1.0))
                    batch.extend([(pad_token, 1.0)] * remaining_length)
                batch = [(start_token, 1.0)]
                batched_tokens.append(batch)
            else:
                batch.extend(t_group)
                t_group = []
    batch.append((end_token, 1.0))
    batch.extend([(pad_token, 1.0)] * (max_length - len(batch)))
    return batched_tokens


@torch.no_grad()
def comfyui_encode(model, token_weight_pairs, empty_ids) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``encode_token_weights`` for one encoder; ``empty_ids`` is ``gen_empty_tokens`` (start, end, padding)."""
    to_encode = [[t for t, _ in x] for x in token_weight_pairs]
    has_weights = any(w != 1.0 for x in token_weight_pairs for _, w in x)
    if has_weights:
        to_encode.append(empty_ids)
    out = model(torch.tensor(to_encode), output_hidden_states=True)
    z_all = out.hidden_states[-2].clone()
    first_pooled = out[0][0:1] if out[0].ndim == 2 else None
    output = []
    for k in range(len(token_weight_pairs)):
        z = z_all[k : k + 1]
        if has_weights:
            z_empty = z_all[-1]
            for i in range(len(z)):
                for j in range(len(z[i])):
                    weight = token_weight_pairs[k][j][1]
                    if weight != 1.0:
                        z[i][j] = (z[i][j] - z_empty[j]) * weight + z_empty[j]
        output.append(z)
    return torch.cat(output, dim=-2), first_pooled
