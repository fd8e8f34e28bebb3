"""Prompt weighting syntax as A1111 and ComfyUI users write it: ``(word)``, ``(word:1.3)``, ``[word]``, ``\\(``.

A prompt is read into fragments, each a piece of text with its weight, and ``BREAK`` markers (A1111 only).
:func:`weighted_tokens` turns them into the token ids and weights a text encoder reads, in 75-token chunks the way
each tool cuts them, and :func:`emphasized` applies the weights to the encoded hidden states:

* ``"a1111"`` (the default): A1111's ``prompt_parser`` syntax; each hidden state is multiplied by its token's weight,
  then the chunk is rescaled to its mean before weighting (A1111's "Original" emphasis). Chunks end at ``BREAK``,
  at 75 tokens, or at a comma at most 20 tokens back.
  A1111's tokenizers clean the text first (ftfy's fixes, whitespace collapsed, lower case; the second encoder's,
  open_clip's, also unescapes HTML entities: ``fish &amp; chips`` reads as ``fish & chips``), and an SDXL negative
  prompt that is ``""`` is zeros, as a missing one is.
* ``"comfyui"``: ComfyUI's syntax (round brackets only; ``[word]`` is text); a weighted token's hidden state is moved
  from the empty prompt's at its position by its weight, ``empty + (h - empty) * w``. Each run of one weight is
  tokenized whole; a run of fewer than 8 tokens that does not fit in the chunk moves whole to the next one, a longer
  one is cut where the chunk fills (ComfyUI since its commit 1c8d11e, December 2024).
* ``"off"``: brackets are plain text; ``BREAK`` still ends a chunk.

Two readings are kept by name for the recipes that recorded them (see :data:`READ_BEFORE_0_3_0`):

* ``"a1111-0.2"``: A1111's syntax as sdxl-control 0.2 read it: a weight only right after the colon (``(word:1.2)``,
  as A1111 before 1.6), the text tokenized as diffusers does, a negative prompt ``""`` encoded.
* ``"comfyui-2024"``: ComfyUI's chunks before its commit 1c8d11e: each space-separated word tokenized apart and kept
  whole in one chunk (a word of 8 tokens or more may straddle two).

Example:
    >>> parse_a1111("a (red:1.2) fox [in] snow")
    [('a ', 1.0), ('red', 1.2), (' fox ', 1.0), ('in', 0.9090909090909091), (' snow', 1.0)]
    >>> parse_comfyui("a ((red)) fox")
    [('a ', 1.0), ('red', 1.2100000000000002), (' fox', 1.0)]
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch

from ..base.errors import InvalidRequestError

__all__ = [
    "Emphasis",
    "Syntax",
    "READ_BEFORE_0_3_0",
    "syntax_of",
    "zeroes_empty_negative",
    "BREAK",
    "parse_a1111",
    "parse_comfyui",
    "check_syntax",
    "unweighted",
    "weighted_tokens",
    "emphasized",
]

log = logging.getLogger(__name__)

Emphasis = Literal["a1111", "comfyui", "off", "a1111-0.2", "comfyui-2024"]
Syntax = Literal["a1111", "comfyui", "off"]
# The readings a recipe recorded by sdxl-control before 0.3.0 made its pixels with, by the emphasis it recorded.
READ_BEFORE_0_3_0: dict[str, Emphasis] = {"a1111": "a1111-0.2", "comfyui": "comfyui-2024"}


def syntax_of(emphasis: Emphasis) -> Syntax:
    """Whose syntax ``emphasis`` reads: ``"a1111"``, ``"comfyui"`` or ``"off"`` (a kept older reading is its tool's).

    Example:
        >>> syntax_of("comfyui-2024")
        'comfyui'
    """
    return "a1111" if emphasis.startswith("a1111") else "comfyui" if emphasis.startswith("comfyui") else "off"


def zeroes_empty_negative(emphasis: Emphasis) -> bool:
    """Whether a negative prompt written ``""`` is zeros where a missing one is (SDXL's base): A1111 zeroes both
    (``force_zero_negative_prompt`` in its ``sd_models_xl.py``); ComfyUI, diffusers and sdxl-control 0.2 encode ``""``.

    Example:
        >>> zeroes_empty_negative("a1111"), zeroes_empty_negative("comfyui")
        (True, False)
    """
    return emphasis == "a1111"


# A fragment list's chunk end (A1111's BREAK keyword).
BREAK = None
Fragment = tuple[str, float]
# What a text encoder reads: token ids with their weights, in chunks of at most 75.
Chunk = list[tuple[int, float]]

CHUNK_TOKENS = 75
# A1111's "prompt word wrap length limit": a chunk that fills up within this many tokens of a comma ends at the comma.
COMMA_BACKTRACK = 20
# ComfyUI keeps a word of fewer tokens than this whole in one chunk.
COMFYUI_LONG_WORD = 8
EMPHASIS_STEP = 1.1
# The largest weight (either sign) a word may carry. A1111 sets none, and its NaN check fires only after the UNet (a
# black image, or its "NansException"); ComfyUI none either. Users write 0.5 to 2; past ~10 the cross-attention
# saturates on that one word and the image stops following the rest. 100 keeps a weighted hidden state (CLIP's are
# at most a few tens) far inside half precision's 65504, so any weight accepted stays finite in the encoders and
# the UNet's attention; ``(cat:1e9)`` or ``cat`` in 1000 nested brackets (1.1 ** 1000 = 2.5e41) overflows instead.
# 100 is 48 nested round brackets.
MAX_WEIGHT = 100.0
# The deepest bracket nesting read: past 48 an unweighted word already weighs beyond MAX_WEIGHT, and ComfyUI's reading
# recurses once per level (1000 levels would end in a RecursionError).
MAX_NESTING = 100
T = TypeVar("T")
if TYPE_CHECKING:
    from .embeddings import EncoderEmbeddings
_QUIET: ContextVar[bool] = ContextVar("quiet", default=False)

_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)
# A1111's pieces, in its order of precedence: an escape (a lone backslash escapes nothing and vanishes), an explicit
# weight closing a round bracket, a bracket, text, and a colon that is only text.
# Since A1111 1.6 (its PR #12177) the weight may have spaces around it, ``(word: 1.2 )``; before, none.
_A1111_PIECE = re.compile(
    r"(?P<escape>\\[()\[\]\\]?)|(?P<weight>:\s*(?P<number>[+-]?[.\d]+)\s*\))|(?P<bracket>[()\[\]])|(?P<text>[^\\()\[\]:]+|:)"
)
_A1111_PIECE_UNSPACED = re.compile(
    r"(?P<escape>\\[()\[\]\\]?)|(?P<weight>:(?P<number>[+-]?[.\d]+)\))|(?P<bracket>[()\[\]])|(?P<text>[^\\()\[\]:]+|:)"
)
# A bracket that opens or closes a level (an escaped one, ``\\(``, is text), and the word after an opening one.
_NESTING = re.compile(r"\\.|[()\[\]]")
_WORD = re.compile(r"[^()\[\]:]{0,40}")
_LOOKS_WEIGHTED = re.compile(r":(\s+[+-]?[.\d]+\s*|[+-]?[.\d]+\s+)\)")


def parse_a1111(
    text: str, *, breaks: bool = True, where: str = "the prompt", spaced: bool = True
) -> list[Fragment | None]:
    """``text`` as A1111's ``parse_prompt_attention`` reads it: (text, weight) fragments, runs of one weight joined, and
    :data:`BREAK` where ``BREAK`` ends a chunk (with ``breaks``; otherwise it is a word). An unclosed bracket weighs
    the rest of the prompt, a stray closing one is text (both with a warning); a weight that is not a number raises
    :class:`~sdxl_control.base.errors.InvalidRequestError` naming ``where`` (the prompt, the negative prompt...).
    ``BREAK`` inside brackets also ends a chunk (A1111 reads it there as a word of weight -1.1, which no prompt
    means). A weight may have spaces around it, ``(word: 1.2 )``, as A1111 reads it since 1.6; not ``spaced``: only
    ``(word:1.2)`` is a weight (A1111 before 1.6, and the ``"a1111-0.2"`` reading), the rest text weighted 1.1.

    Example:
        >>> parse_a1111(r"\\(literal\\) ((sky)) (red fox : 0.7)")
        [('(literal) ', 1.0), ('sky', 1.2100000000000002), (' ', 1.0), ('red fox ', 0.7)]
    """
    out: list[list[Any] | None] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}
    multiplier = {"(": EMPHASIS_STEP, "[": 1 / EMPHASIS_STEP}

    def weigh(start: int, by: float) -> None:
        for item in out[start:]:
            if item is not None:
                item[1] *= by

    for piece in (_A1111_PIECE if spaced else _A1111_PIECE_UNSPACED).finditer(text):
        kind, value = piece.lastgroup, piece.group(0)
        if kind == "escape":
            out.append([value[1:], 1.0])
        elif kind == "bracket" and value in opened:
            opened[value].append(len(out))
        elif kind == "weight" and opened["("]:
            number = piece.group("number")
            try:
                weight = float(number)
            except ValueError:
                raise InvalidRequestError(
                    f"{where}'s weight {number!r} in {_around(text, piece.start())!r} is not a number: write it as "
                    "(word:1.2)"
                ) from None
            weigh(opened["("].pop(), weight)
        elif kind == "bracket" and value in ")]" and opened["(" if value == ")" else "["]:
            opening = "(" if value == ")" else "["
            weigh(opened[opening].pop(), multiplier[opening])
        else:
            if kind != "text":
                _warn("the prompt's %r at %r closes no bracket: read as text", value, _around(text, piece.start()))
            elif value == ":" and not spaced and _LOOKS_WEIGHTED.match(text, piece.start()):
                _warn("the prompt's %r is read as text weighted 1.1, as sdxl-control 0.2 read it (its recipe's "
                      "reading, 'a1111-0.2'); A1111 1.6 and later read a weight there", _around(text, piece.start()))  # fmt: skip
            parts = _BREAK_WORD.split(value) if breaks else [value]
            for number, part in enumerate(parts):
                if number:
                    out.append(BREAK)
                out.append([part, 1.0])
    for opening in ("(", "["):
        for start in opened[opening]:
            _warn("the prompt has an unclosed %r: it weighs the rest of the prompt, as A1111 reads it", opening)
            weigh(start, multiplier[opening])
    return _joined(out)


def parse_comfyui(text: str) -> list[Fragment]:
    """``text`` as ComfyUI's ``token_weights`` reads it: (text, weight) fragments; ``(x)`` weighs ``x`` by 1.1,
    ``(x:w)`` by ``w`` (replacing, not multiplying, the weight around it); ``\\(`` and ``\\)`` are brackets as text.
    Square brackets and ``BREAK`` are text. An unbalanced bracket, or a weight that is not a number, leaves text as
    ComfyUI does, with a warning.

    Example:
        >>> parse_comfyui("(a (b:0.5) c)")
        [('a ', 1.1), ('b', 0.5), (' c', 1.1)]
    """
    escaped = text.replace("\\)", "\0\1").replace("\\(", "\0\2")

    def unescaped(part: str) -> str:
        return part.replace("\0\1", ")").replace("\0\2", "(")

    def read(part: str, weight: float) -> list[Fragment]:
        fragments: list[Fragment] = []
        for group in _top_level_groups(part):
            if len(group) < 2 or not (group[0] == "(" and group[-1] == ")"):
                if "(" in group or ")" in group:
                    _warn("the prompt's %r has an unbalanced bracket: read as text, as ComfyUI reads it",
                                unescaped(group))  # fmt: skip
                fragments.append((unescaped(group), weight))
                continue
            inner, inner_weight = group[1:-1], weight * EMPHASIS_STEP
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    inner_weight = float(inner[colon + 1 :])
                    inner = inner[:colon]
                except ValueError:
                    if "(" not in inner[colon:] and ")" not in inner[colon:]:  # not a nested group's colon
                        _warn("the prompt's %r: %r is not a weight; read as text weighted 1.1, as ComfyUI reads it",
                              unescaped(group), unescaped(inner[colon + 1 :]))  # fmt: skip
            fragments.extend(read(inner, inner_weight))
        return fragments

    return read(escaped, 1.0)


def unweighted(text: str, emphasis: Emphasis) -> tuple[str, bool]:
    """``text`` with ``emphasis``'s weighting syntax taken out, and whether any weight other than 1 was dropped.

    Example:
        >>> unweighted("a (red:1.2) fox", "a1111")
        ('a red fox', True)
    """
    if syntax_of(emphasis) == "off":
        return text, False
    syntax = syntax_of(emphasis)
    fragments = (
        parse_a1111(text, breaks=False, spaced=emphasis == "a1111") if syntax == "a1111" else parse_comfyui(text)
    )
    return "".join(f[0] for f in fragments if f), any(f[1] != 1.0 for f in fragments if f)


def _top_level_groups(text: str) -> list[str]:
    """``text`` cut into runs outside brackets and bracketed groups, by ComfyUI's depth count (a stray ``)`` sends
    the count below zero, and what follows is one run of text until it comes back)."""
    groups, current, depth = [], "", 0
    for char in text:
        if char == "(" and depth == 0:
            if current:
                groups.append(current)
            current = char
        elif char == ")" and depth == 1:
            groups.append(current + char)
            current = ""
        else:
            current += char
        depth += {"(": 1, ")": -1}.get(char, 0)
    if current:
        groups.append(current)
    return groups


def _joined(fragments: list[list[Any] | None]) -> list[Fragment | None]:
    joined: list[list[Any] | None] = []
    for item in fragments:
        last = joined[-1] if joined else None
        if item is not None and last is not None and last[1] == item[1]:
            last[0] += item[0]
        else:
            joined.append(item)
    return [tuple(item) if item is not None else BREAK for item in joined] or [("", 1.0)]  # type: ignore[misc]


def check_syntax(text: str, emphasis: Emphasis, where: str = "the prompt") -> None:
    """Raise :class:`~sdxl_control.base.errors.InvalidRequestError` naming ``where`` (e.g. ``"the negative prompt"``)
    where ``text`` cannot be read as ``emphasis`` reads prompts: a weight that is not a number, or a word weighted
    beyond :data:`MAX_WEIGHT` (either sign), or not finite, by its weight or by nested brackets; warn of nothing (the
    encoding does, once).

    Example:
        >>> check_syntax("a (red:1.2) fox", "a1111")
        >>> check_syntax("a (red:1000) fox", "a1111", "the negative prompt")
        Traceback (most recent call last):
        ...
        sdxl_control.base.errors.InvalidRequestError: the negative prompt weighs 'red' by 1000, beyond ...
    """
    if syntax_of(emphasis) == "off":
        return
    depth = deepest = deepest_at = 0
    for piece in _NESTING.finditer(text):
        if len(piece.group(0)) > 1:  # escaped
            continue
        depth = max(depth + (1 if piece.group(0) in "([" else -1), 0)
        if depth > deepest:
            deepest, deepest_at = depth, piece.end()
    if deepest > MAX_NESTING:
        after = _WORD.match(text, deepest_at)
        shown = (after.group(0).strip() if after else "") or "word"
        order = deepest * math.log10(EMPHASIS_STEP)
        raise InvalidRequestError(
            f"{where} puts {shown!r} in {deepest} nested brackets, beyond the {MAX_NESTING} read (each '(' multiplies "
            f"its weight by {EMPHASIS_STEP}: {EMPHASIS_STEP}^{deepest} is about 10^{order:.0f}): write the weight once, "
            f"as ({shown}:1.5)"
        )
    token = _QUIET.set(True)
    try:
        fragments = (
            parse_a1111(text, where=where, spaced=emphasis == "a1111")
            if syntax_of(emphasis) == "a1111"
            else parse_comfyui(text)
        )
    finally:
        _QUIET.reset(token)
    for fragment in fragments:
        if fragment is not None and not abs(fragment[1]) <= MAX_WEIGHT:  # not: NaN compares false
            text_weighed = fragment[0].strip()
            shown = text_weighed if len(text_weighed) <= 40 else text_weighed[:37] + "..."
            raise InvalidRequestError(
                f"{where} weighs {shown!r} by {fragment[1]:g}, beyond the {MAX_WEIGHT:g} (either sign) a word may "
                f"carry: the encoders' numbers grow toward overflow (NaN, a black image). Nested brackets multiply "
                f"(each '(' by {EMPHASIS_STEP}, each '[' by 1/{EMPHASIS_STEP}): write the weight once, as "
                f"({shown or 'word'}:1.5)"
            )


def _warn(message: str, *args: Any) -> None:
    if not _QUIET.get():
        log.warning(message, *args)


def _around(text: str, at: int) -> str:
    return text[max(0, at - 20) : at + 20]


def weighted_tokens(
    tokenizer: Any,
    text: str,
    emphasis: Emphasis,
    *,
    whole: bool = True,
    open_clip: bool = False,
    embeddings: EncoderEmbeddings | None = None,
) -> list[Chunk]:
    """The (token id, weight) chunks a text encoder reads for ``text``, without the start and end tokens: at most 75
    each, cut as ``emphasis``'s tool cuts them (see the module). An empty prompt is one empty chunk. Not ``whole``:
    one chunk of the first 75 tokens (diffusers' reading; ``BREAK`` is a word), with a warning if any were cut.
    ``open_clip``: the encoder is SDXL's OpenCLIP bigG, whose text A1111 cleans as open_clip's tokenizer does (see
    :func:`a1111_cleaned`). ``embeddings``: textual inversions found in the text stand as their vectors (see
    :mod:`~sdxl_control.protocol.embeddings`).

    Example:
        >>> [len(c) for c in weighted_tokens(tokenizer, "a (red) fox BREAK in the snow", "a1111")]  # doctest: +SKIP
        [3, 3]
    """
    syntax = syntax_of(emphasis)
    if syntax == "comfyui":
        groups = (
            _comfyui_words(tokenizer, text, embeddings)
            if emphasis == "comfyui-2024"
            else _comfyui_groups(tokenizer, text, embeddings)
        )
        if whole:
            return _word_chunks(groups)
        tokens = [token for group in groups for token in group]
    else:
        fragments: list[Fragment | None] = (
            parse_a1111(text, breaks=whole, spaced=emphasis == "a1111")
            if syntax == "a1111"
            else _plain(text, breaks=whole)
        )
        clean = partial(a1111_cleaned, open_clip=open_clip) if emphasis == "a1111" else None
        if whole:
            return _comma_chunks(tokenizer, fragments, clean, embeddings)
        ids = _reader(tokenizer, clean, embeddings)
        tokens = [(t, f[1]) for f in fragments if f is not None for t in ids(f[0])]
    if len(tokens) > CHUNK_TOKENS:
        _warn("prompt truncated to %d CLIP tokens", CHUNK_TOKENS + 2)
    return [tokens[:CHUNK_TOKENS]]


def a1111_cleaned(text: str, *, open_clip: bool = False) -> str:
    """``text`` as A1111's tokenizers clean it before their byte-pair encoding: ftfy's ``fix_text`` (curly quotes made
    straight, full-width letters and ligatures made plain, HTML entities unescaped where the text has no ``<``),
    whitespace collapsed, lower case: transformers' Python ``CLIPTokenizer`` with ftfy installed, which A1111 runs for
    CLIP-L. ``open_clip``: open_clip's ``SimpleTokenizer``, which A1111 runs for SDXL's OpenCLIP bigG; it also
    unescapes HTML entities, twice. The tokenizer sdxl-control loads (transformers' Rust one, as diffusers) only
    collapses whitespace and lowers the case.

    Example:
        >>> a1111_cleaned("Fish &amp; Chips  <b>", open_clip=True), a1111_cleaned("Fish &amp; Chips  <b>")
        ('fish & chips <b>', 'fish &amp; chips <b>')
    """
    import html

    import ftfy  # open-clip-torch's dependency

    text = ftfy.fix_text(text)
    if open_clip:
        text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def _plain(text: str, *, breaks: bool) -> list[Fragment | None]:
    fragments: list[Fragment | None] = []
    for number, part in enumerate(_BREAK_WORD.split(text) if breaks else [text]):
        if number:
            fragments.append(BREAK)
        fragments.append((part, 1.0))
    return fragments


def _ids(tokenizer: Any, text: str, clean: Callable[[str], str] | None = None) -> list[int]:
    if clean is not None:
        text = clean(text)
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)


def _comma_chunks(
    tokenizer: Any,
    fragments: list[Fragment | None],
    clean: Callable[[str], str] | None = None,
    embeddings: EncoderEmbeddings | None = None,
) -> list[Chunk]:
    ids = _reader(tokenizer, clean, embeddings)
    items: list[tuple[int, float] | None] = []
    for fragment in fragments:
        if fragment is BREAK:
            items.append(None)
        else:  # each fragment tokenized apart, as A1111 does
            items += [(token, fragment[1]) for token in ids(fragment[0])]
    return split_chunks(items, tokenizer.get_vocab().get(",</w>"))


def split_chunks(items: Sequence[tuple[int, T] | None], comma: int | None) -> list[list[tuple[int, T]]]:
    """(token id, anything) items cut into chunks of at most 75 as A1111 cuts a prompt: ``None`` (a ``BREAK``) ends a
    chunk, and a chunk that fills up within 20 tokens after a ``comma`` ends at the comma. None: one empty chunk.

    Example:
        >>> [len(c) for c in split_chunks([(1, "a"), None, (2, "b"), (3, "c")], comma=None)]
        [1, 2]
    """
    chunks: list[list[tuple[int, T]]] = []
    chunk: list[tuple[int, T]] = []
    comma_at = -1
    for item in items:
        if item is None:
            chunks.append(chunk)
            chunk, comma_at = [], -1
            continue
        if item[0] == comma:
            comma_at = len(chunk)
        elif len(chunk) == CHUNK_TOKENS and comma_at != -1 and len(chunk) - comma_at <= COMMA_BACKTRACK:
            chunks.append(chunk[: comma_at + 1])  # the words after the comma move on together
            chunk, comma_at = chunk[comma_at + 1 :], -1
        if len(chunk) == CHUNK_TOKENS or len(chunk) + _embedding_left(item[0]) > CHUNK_TOKENS:
            chunks.append(chunk)  # an embedding that would not fit whole starts the next chunk, as in A1111
            chunk, comma_at = [], -1
        chunk.append(item)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def _reader(
    tokenizer: Any, clean: Callable[[str], str] | None, embeddings: EncoderEmbeddings | None
) -> Callable[[str], list[int]]:
    """A text's token ids, cleaned as its tool cleans it, with the embeddings' names read as their vectors."""
    if embeddings is not None:
        return partial(embeddings.ids, clean=clean)
    return partial(_ids, tokenizer, clean=clean)


def _comfyui_groups(tokenizer: Any, text: str, embeddings: EncoderEmbeddings | None = None) -> list[Chunk]:
    """Each run of one weight's tokens with its weight, as ComfyUI tokenizes them since its commit 1c8d11e: the run
    whole, cut before each `` embedding:`` (an embedding's name is its own group, its vectors one group)."""
    from .embeddings import comfyui_pieces

    groups = []
    for part, weight in parse_comfyui(text):
        pieces: Sequence[str | list[int]] = (
            embeddings.comfyui_groups(part) if embeddings is not None else comfyui_pieces(part)
        )
        for piece in pieces:
            if piece:
                ids = _ids(tokenizer, piece) if isinstance(piece, str) else piece
                groups.append([(token, weight) for token in ids])
    return groups


def _comfyui_words(tokenizer: Any, text: str, embeddings: EncoderEmbeddings | None = None) -> list[Chunk]:
    """Each space-separated word's tokens with its fragment's weight, as ComfyUI tokenized them before its commit
    1c8d11e (``"comfyui-2024"``): word by word, a word found whole in the vocabulary taken as that one token; an
    ``embedding:`` reference is one word of its vectors."""
    vocab = tokenizer.get_vocab()
    words = []
    for part, weight in parse_comfyui(text):
        for group in embeddings.comfyui_groups(part) if embeddings is not None else [part]:
            if not isinstance(group, str):
                words.append([(token, weight) for token in group])
                continue
            for word in group.replace("\n", " ").split(" "):
                if word:
                    ids = [vocab[f"{word}</w>"]] if f"{word}</w>" in vocab else _ids(tokenizer, word)
                    words.append([(token, weight) for token in ids])
    return words


def _embedding_left(token: int) -> int:
    """How many positions an embedding starting at ``token`` takes (0 for any other token)."""
    from .embeddings import EmbeddingToken

    return token.count if isinstance(token, EmbeddingToken) and token.index == 0 else 0


def _word_chunks(words: list[Chunk]) -> list[Chunk]:
    chunks: list[Chunk] = [[]]
    for word in words:
        splittable = len(word) >= COMFYUI_LONG_WORD
        while word:
            room = CHUNK_TOKENS - len(chunks[-1])
            if len(word) <= room:
                chunks[-1].extend(word)
                break
            if splittable:
                chunks[-1].extend(word[:room])
                word = word[room:]
            chunks.append([])
    return chunks


def emphasized(
    hidden: torch.Tensor, weights: torch.Tensor, emphasis: Emphasis, empty: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """One text encoder's hidden states (windows, 77, width) with its tokens' ``weights`` (windows, 77) applied as
    ``emphasis`` does (see the module); ``empty()`` gives the empty prompt's window (1, 77, width), which only
    ComfyUI's weighting reads. All weights 1: ``hidden`` itself.

    Example:
        >>> h = torch.ones(1, 3, 2)
        >>> emphasized(h, torch.tensor([[1.0, 2.0, 1.0]]), "comfyui", lambda: torch.zeros(1, 3, 2))[0, :, 0]
        tensor([1., 2., 1.])
    """
    syntax = syntax_of(emphasis)
    if syntax == "off" or bool((weights == 1.0).all()):
        return hidden
    weights = weights.to(hidden.device, hidden.dtype)
    if syntax == "comfyui":
        base = empty().to(hidden.device, hidden.dtype).expand_as(hidden)
        moved = (hidden - base) * weights[..., None] + base
        return torch.where((weights != 1.0)[..., None], moved, hidden)
    windows = []
    for window, weight in zip(hidden, weights, strict=True):  # each window keeps its own mean, as A1111's chunks do
        mean = window.mean()
        weighed = window * weight[:, None].expand(window.shape)
        windows.append(weighed * (mean / weighed.mean()))
    return torch.stack(windows)
