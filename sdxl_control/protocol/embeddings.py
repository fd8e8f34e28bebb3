"""Textual-inversion embeddings in a prompt, read as A1111 and ComfyUI read them.

* A1111 (``emphasis="a1111"`` or ``"off"``): an embedding's name is matched on tokens — the name tokenized by the
  encoder's tokenizer, found as a run of the prompt's tokens inside one weighted piece, the longest name first
  (A1111's ``EmbeddingDatabase.find_embedding_at_position``); so case does not matter, and ``(name:1.2)`` weighs it.
* ComfyUI (``emphasis="comfyui"``): ``embedding:NAME`` at the start of a weighted piece or after a space or a line
  break (``comfy/sd1_clip.py`` ``tokenize_with_weights``); NAME runs to the next space, a trailing comma is text.
  ``(embedding:NAME:1.2)`` weighs every vector.

An embedding of ``n`` vectors takes ``n`` token positions, which hold token id 0 (as A1111 fills them) and whose
input embeddings are the vectors instead: :func:`vectors_placed` swaps them in while the encoder runs, so a call
leaves the tokenizer and the model as they were. The pooled embedding stays at the end-of-text token.

Example:
    >>> comfyui_references("a photo, embedding:easynegative, (embedding:sub/hands:1.2)")
    ['easynegative,', 'sub/hands']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..base.errors import InvalidRequestError
from .emphasis import _ids

__all__ = [
    "EmbeddingToken",
    "EncoderEmbeddings",
    "COMFYUI_PREFIX",
    "comfyui_references",
    "comfyui_name",
    "check_references",
    "a1111_mentions",
    "vectors_placed",
]

COMFYUI_PREFIX = "embedding:"
# ComfyUI's split: the prefix after a space or a line break (or at the start of a weighted piece).
_COMFYUI_SPLIT = re.compile(r" embedding:|\nembedding:")


class EmbeddingToken(int):
    """One vector of an embedding at a token position: token id 0 to the tokenizer's arithmetic (A1111 fills the
    positions so), carrying its ``vector``, which embedding it belongs to and its place in it (``index`` of
    ``count``) so that a chunk is never cut inside an embedding."""

    vector: torch.Tensor
    name: str
    index: int
    count: int

    def __new__(cls, vector: torch.Tensor, name: str, index: int, count: int) -> EmbeddingToken:
        token = super().__new__(cls, 0)
        token.vector, token.name, token.index, token.count = vector, name, index, count
        return token


def _tokens(name: str, vectors: torch.Tensor) -> list[int]:
    return [EmbeddingToken(v, name, i, len(vectors)) for i, v in enumerate(vectors)]


def comfyui_pieces(segment: str) -> list[str]:
    """A weighted piece of a ComfyUI prompt cut where an ``embedding:`` reference starts (each such piece keeps its
    prefix), empty pieces dropped, as ``tokenize_with_weights`` cuts it."""
    split = _COMFYUI_SPLIT.split(segment)
    return [p for p in (split[0], *(COMFYUI_PREFIX + s for s in split[1:])) if p]


def comfyui_name(piece: str) -> tuple[str, str]:
    """(the name a piece that starts with ``embedding:`` gives, the text left after it): the name runs to the next
    whitespace; the text left is read as words."""
    words = piece[len(COMFYUI_PREFIX) :].strip("\n").split()
    return (words[0] if words else ""), " ".join(words[1:])


def comfyui_references(text: str) -> list[str]:
    """The names ``embedding:`` references give in ``text``, a prompt read as ComfyUI reads it (weighted pieces
    first; a name is what follows the prefix up to the next whitespace).

    Example:
        >>> comfyui_references("embedding:a b\\nembedding:c, (embedding:d:1.2) embedding:")
        ['a', 'c,', 'd', '']
    """
    from .emphasis import parse_comfyui

    if COMFYUI_PREFIX not in text:
        return []
    pieces = [p for part, _ in parse_comfyui(text) for p in comfyui_pieces(part)]
    return [comfyui_name(p)[0] for p in pieces if p.startswith(COMFYUI_PREFIX)]


def _comfyui_known(name: str, known: Mapping[str, Any]) -> str | None:
    """The key of ``known`` a written name reads as: itself, else without its trailing commas (ComfyUI's retry)."""
    if name in known:
        return name
    stripped = name.strip(",")
    return stripped if stripped and stripped in known else None


def check_references(text: str, known: Mapping[str, Any], where: str = "the prompt") -> None:
    """Refuse an ``embedding:NAME`` in ``text`` that names none of ``known`` (ComfyUI leaves it out with a warning;
    here the image would silently lack it), naming it and the fix."""
    for name in comfyui_references(text):
        if _comfyui_known(name, known) is None:
            shown = name.strip(",") or "(nothing)"
            listed = f" (given: {', '.join(sorted(known))})" if known else ""
            raise InvalidRequestError(
                f"{where} names embedding:{shown}, which is no embedding given{listed}: put {shown}.safetensors in an "
                f"embeddings folder of the install --models-dir names (ComfyUI's models/embeddings, A1111's "
                f"embeddings/), or take it out of the prompt"
            )


def _class(char: str) -> str:
    """CLIP's pre-tokenizer keeps runs of letters, and runs of other non-space symbols, together; digits stand alone."""
    return "letter" if char.isalpha() else "digit" if char.isdigit() else "space" if char.isspace() else "symbol"


def a1111_mentions(text: str, name: str) -> bool:
    """Whether ``text`` holds ``name`` where A1111's token match can find it: case aside, not glued to letters (or
    symbols) that CLIP's tokenizer would read as one word with it. A cheap look at the text, before any tokenizer
    is loaded, that the encoder's token match then settles.

    Example:
        >>> a1111_mentions("a fox, EasyNegative", "easynegative"), a1111_mentions("easynegatives", "easynegative")
        (True, False)
    """
    haystack, needle = " ".join(text.lower().split()), " ".join(name.lower().split())
    if not needle:
        return False
    start = haystack.find(needle)
    while start != -1:
        end = start + len(needle)
        before = haystack[start - 1] if start else " "
        after = haystack[end] if end < len(haystack) else " "
        glued = [
            _class(a) == _class(b) and _class(a) in ("letter", "symbol")
            for a, b in ((before, needle[0]), (after, needle[-1]))
        ]
        if not any(glued):
            return True
        start = haystack.find(needle, start + 1)
    return False


@dataclass(frozen=True)
class EncoderEmbeddings:
    """The embeddings one text encoder reads: name -> its vectors for that encoder ``[n, width]``, matched on that
    encoder's ``tokenizer``."""

    tokenizer: Any
    vectors: Mapping[str, torch.Tensor]

    def ids(self, text: str, clean: Callable[[str], str] | None = None) -> list[int]:
        """``text``'s token ids (no start or end token), cleaned first by ``clean`` where its tool cleans text, with
        every embedding name found in them replaced by the embedding's vectors, as A1111 matches names (see the
        module)."""
        ids = _ids(self.tokenizer, text, clean)
        if not ids or not self.vectors:
            return ids
        lookup = self._lookup
        out: list[int] = []
        position = 0
        while position < len(ids):
            for name_ids, name in lookup.get(ids[position], ()):
                if ids[position : position + len(name_ids)] == name_ids:
                    out += _tokens(name, self.vectors[name])
                    position += len(name_ids)
                    break
            else:
                out.append(ids[position])
                position += 1
        return out

    @cached_property
    def _lookup(self) -> dict[int, list[tuple[list[int], str]]]:
        """The names' token ids by their first token, the longest name first (A1111's ``ids_lookup``)."""
        lookup: dict[int, list[tuple[list[int], str]]] = {}
        for name in self.vectors:
            name_ids = _ids(self.tokenizer, name)
            if name_ids:
                lookup.setdefault(name_ids[0], []).append((name_ids, name))
        for candidates in lookup.values():
            candidates.sort(key=lambda c: len(c[0]), reverse=True)
        return lookup

    def comfyui_groups(self, segment: str) -> list[str | list[int]]:
        """A weighted piece of a ComfyUI prompt as text to tokenize and embeddings (lists of their tokens), in
        order, as ``tokenize_with_weights`` reads ``embedding:NAME``: the name's trailing commas are text when the
        name without them is the embedding's."""
        out: list[str | list[int]] = []
        for piece in comfyui_pieces(segment):
            if not piece.startswith(COMFYUI_PREFIX):
                out.append(piece)
                continue
            name, leftover = comfyui_name(piece)
            key = _comfyui_known(name, self.vectors)
            if key is None:  # refused before anything runs (check_references); as text if it got here
                out.append(piece)
                continue
            out.append(_tokens(key, self.vectors[key]))
            rest = " ".join(p for p in (name[len(key) :] if name.startswith(key) else "", leftover) if p)
            if rest:
                out.append(rest)
        return out


def placed(windows: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
    """The (window, position) of every embedding vector in ``windows`` of (token, weight), and the vectors."""
    where, vectors = [], []
    for row, window in enumerate(windows):
        for column, (token, _) in enumerate(window):
            if isinstance(token, EmbeddingToken):
                where.append((row, column))
                vectors.append(token.vector)
    return where, vectors


@contextmanager
def vectors_placed(model: Any, where: Sequence[tuple[int, int]], vectors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the block, ``model``'s input embeddings (a text encoder's token embedding) give ``vectors`` at
    ``where`` (window, position), its other outputs untouched: run one call of the model in it. The model is as it
    was after the block, whatever happens in it."""
    if not where:
        yield
        return
    index = torch.tensor(where)
    stacked = torch.stack(list(vectors))

    def swap(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[index[:, 0], index[:, 1]] = stacked.to(output.device, output.dtype)
        return output

    handle = model.get_input_embeddings().register_forward_hook(swap)
    try:
        yield
    finally:
        handle.remove()
