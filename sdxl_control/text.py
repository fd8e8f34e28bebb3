"""Prompt encoding and SDXL micro-conditioning, as each stage declares it."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .conditions import PromptEdit, PromptTokens, Window, acts
from .conversion import text_parameter
from .errors import ConditionError, IncompatibleModelError
from .weights import WeightPatch

__all__ = [
    "TextEncoder",
    "PromptEmbeddings",
    "TextChannel",
    "encode_prompts",
    "encode_negative",
    "prompt_segments",
    "prompt_chunks",
    "LongPrompts",
    "MicroConditioning",
    "time_ids",
]

log = logging.getLogger(__name__)

# How a prompt longer than one CLIP window is read: in 75-token chunks encoded apart and joined (A1111's way), or cut
# to its first 75 tokens (diffusers').
LongPrompts = Literal["chunks", "truncate"]
# A CLIP window holds a start token, 75 of the prompt's and an end token.
CHUNK_TOKENS = 75
# A1111's "prompt word wrap length limit": a chunk that fills up within this many tokens of a comma ends at the comma,
# and the words after it open the next chunk.
COMMA_BACKTRACK = 20
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class TextEncoder:
    """A tokenizer with its CLIP text model; the last one of a stage also gives the pooled embedding.

    Example:
        >>> TextEncoder(tokenizer, text_encoder)  # doctest: +SKIP
    """

    tokenizer: Any
    model: Any
    component: str = ""  # its name in the pipeline (text_encoder, text_encoder_2): where text-encoder LoRA parts go


@dataclass(frozen=True)
class PromptEmbeddings:
    """Per-image hidden states (batch, tokens, width) and pooled embeddings (batch, width).

    Example:
        >>> positive, negative = encode_prompts(encoders, ["a cat"], None, need_negative=True, zero_negative=True)  # doctest: +SKIP
        >>> positive.hidden.shape                                                                                # doctest: +SKIP
        torch.Size([1, 77, 2048])
    """

    hidden: torch.Tensor
    pooled: torch.Tensor


def _tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    full = tokenizer(texts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > ids.shape[-1]:
        log.warning("prompt truncated to %d CLIP tokens", tokenizer.model_max_length)
    return ids


def prompt_chunks(tokenizer: Any, text: str) -> list[list[int]]:
    """``text``'s token ids in chunks of at most 75, as A1111 splits a long prompt: ``BREAK`` ends a chunk, and a
    chunk that fills up within 20 tokens after a comma ends at the comma. An empty prompt is one empty chunk.

    Example:
        >>> [len(c) for c in prompt_chunks(tokenizer, "a red fox BREAK in the snow")]       # doctest: +SKIP
        [3, 3]
    """
    comma = tokenizer.get_vocab().get(",</w>")
    chunks: list[list[int]] = []
    chunk: list[int] = []
    comma_at = -1
    for number, part in enumerate(_BREAK.split(text)):
        if number:  # a BREAK before this part
            chunks.append(chunk)
            chunk, comma_at = [], -1
        ids = tokenizer(part, add_special_tokens=False, truncation=False, verbose=False).input_ids if part else []
        for token in ids:
            if token == comma:
                comma_at = len(chunk)
            elif len(chunk) == CHUNK_TOKENS and comma_at != -1 and len(chunk) - comma_at <= COMMA_BACKTRACK:
                chunks.append(chunk[: comma_at + 1])  # the words after the comma move on together
                chunk, comma_at = chunk[comma_at + 1 :], -1
            if len(chunk) == CHUNK_TOKENS:
                chunks.append(chunk)
                chunk, comma_at = [], -1
            chunk.append(token)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def _chunked(encoders: Sequence[TextEncoder], texts: list[str]) -> tuple[list[torch.Tensor], int]:
    """Each encoder's token ids for ``texts`` in 77-token windows, (texts x chunks, 77), every text given as many
    chunks (empty ones after a shorter text: what an empty prompt encodes to); and the chunks per text."""
    per_encoder = [[prompt_chunks(enc.tokenizer, text) for text in texts] for enc in encoders]
    counts = {len(chunks) for texts_chunks in per_encoder for chunks in texts_chunks}
    if len({tuple(len(c) for c in texts_chunks) for texts_chunks in per_encoder}) > 1:
        raise IncompatibleModelError("the stage's tokenizers split the prompt differently; they should share CLIP's")
    count = max(counts)
    ids = []
    for enc, texts_chunks in zip(encoders, per_encoder, strict=True):
        tok = enc.tokenizer
        windows = []
        for chunks in texts_chunks:
            for chunk in [*chunks, *[[]] * (count - len(chunks))]:
                # As one window of diffusers' tokenization: start, the tokens, end, padding.
                windows.append(
                    [tok.bos_token_id, *chunk, tok.eos_token_id, *[tok.pad_token_id] * (CHUNK_TOKENS - len(chunk))]
                )
        ids.append(torch.tensor(windows))
    return ids, count


def _run(encoders: Sequence[TextEncoder], ids: Sequence[torch.Tensor], chunks: int = 1) -> PromptEmbeddings:
    hidden = []
    pooled: torch.Tensor | None = None
    for enc, tokens in zip(encoders, ids, strict=True):
        out = enc.model(tokens.to(enc.model.device), output_hidden_states=True)
        # SDXL conditions on the penultimate layer of each encoder and the projected pooled output of the last.
        states = out.hidden_states[-2]
        hidden.append(states.reshape(states.shape[0] // chunks, chunks * states.shape[1], states.shape[2]))
        if out[0].ndim == 2:
            pooled = out[0][::chunks]  # a long prompt's pooled embedding is its first chunk's, as A1111's
    if pooled is None:
        raise IncompatibleModelError("the stage's last text encoder has no projection (no pooled text embedding)")
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


def _encode(
    encoders: Sequence[TextEncoder], texts: list[str], long_prompts: LongPrompts = "chunks"
) -> PromptEmbeddings:
    if long_prompts == "truncate":
        return _run(encoders, [_tokenize(enc.tokenizer, texts) for enc in encoders])
    ids, count = _chunked(encoders, texts)
    return _run(encoders, ids, count)


def _aligned(
    positive: PromptEmbeddings, negative: PromptEmbeddings | None, empty: Callable[[], PromptEmbeddings]
) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
    """The prompt and negative prompt at one length, the shorter followed by empty-prompt chunks (A1111's "pad
    prompt/negative prompt to be same length"): guidance runs them as one batch. ``empty()`` encodes ""."""
    if negative is None or negative.hidden.shape[1] == positive.hidden.shape[1]:
        return positive, negative
    window = empty().hidden

    def padded(embeddings: PromptEmbeddings, length: int) -> PromptEmbeddings:
        repeats = (length - embeddings.hidden.shape[1]) // window.shape[1]
        fill = window.expand(embeddings.hidden.shape[0], -1, -1).repeat(1, repeats, 1)
        return PromptEmbeddings(torch.cat([embeddings.hidden, fill], dim=1), embeddings.pooled)

    length = max(positive.hidden.shape[1], negative.hidden.shape[1])
    return padded(positive, length), padded(negative, length)


def _encode_edited(
    encoders: Sequence[TextEncoder], prompt: str, plain: str, edits: list[PromptEdit]
) -> PromptEmbeddings:
    rewriting = [e for e in edits if e.rewrites_tokens]
    if len(rewriting) > 1:
        names = ", ".join(type(e).__name__ for e in rewriting)
        raise ConditionError(f"{names} all rewrite the prompt's tokens at the same steps; only one condition may")
    tokens = []
    for index, enc in enumerate(encoders):
        if rewriting:
            read = rewriting[0].tokens(prompt, enc.tokenizer, index)
            if len(read.ids) != enc.tokenizer.model_max_length:
                raise ConditionError(
                    f"{type(rewriting[0]).__name__} gave {len(read.ids)} token ids; the text encoder reads "
                    f"{enc.tokenizer.model_max_length}"
                )
        else:
            ids = tuple(_tokenize(enc.tokenizer, [plain])[0].tolist())
            read = PromptTokens(ids, (False,) * len(ids))
        tokens.append(read)
    out = _run(encoders, [torch.tensor([t.ids]) for t in tokens])
    hidden = out.hidden
    for edit in edits:
        hidden = edit.embed(hidden, tokens)
    return PromptEmbeddings(hidden, out.pooled)


@dataclass(frozen=True)
class TextChannel:
    """What one condition changes in a stage's prompt encoding, and at which steps: its prompt edit and its text-encoder
    weight deltas (component -> parameter name -> delta), both acting only where the condition acts (``scale``,
    ``window``, see :func:`~sdxl_control.conditions.acts`); the edit also only inside its own window.

    Example:
        >>> TextChannel(0.8, Window(0.0, 0.5)).weighs(1, total=4)
        True
    """

    scale: float
    window: Window
    edit: PromptEdit | None = None
    deltas: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)

    def weighs(self, index: int, total: int) -> bool:
        return acts(self.scale, self.window, index, total)

    def edits(self, index: int, total: int) -> bool:
        return self.edit is not None and self.weighs(index, total) and self.edit.window.contains(index, total)


@contextmanager
def _deltas_applied(encoders: Sequence[TextEncoder], channels: Sequence[TextChannel]) -> Iterator[None]:
    patches: list[WeightPatch] = []
    try:
        for channel in channels:
            for encoder in encoders:
                deltas = channel.deltas.get(encoder.component)
                if deltas:
                    names = {n for n, _ in encoder.model.named_parameters()}
                    patches.append(WeightPatch(encoder.model, {text_parameter(names, k): v for k, v in deltas.items()}))
        yield
    finally:
        for patch in reversed(patches):
            patch.restore()


@torch.no_grad()
def prompt_segments(
    encoders: Sequence[TextEncoder],
    prompt: str,
    negative_prompt: str | None,
    channels: Sequence[TextChannel],
    steps: int,
    *,
    need_negative: bool,
    zero_negative: bool,
    long_prompts: LongPrompts = "chunks",
) -> list[tuple[int, PromptEmbeddings, PromptEmbeddings | None]]:
    """The prompt's (and, with ``need_negative``, the negative prompt's) embeddings for each run of steps that the same
    channels act on, as (first step index, positive, negative), in step order; with nothing acting, one segment from
    step 0. The prompt text is first passed through the :meth:`~sdxl_control.PromptEdit.text` of every edit whose
    condition acts at any step (the first encoder's tokenizer decides); the negative prompt is never edited, but is
    encoded with the text-encoder deltas acting at the segment's steps. ``long_prompts`` says how a prompt beyond 75
    tokens is read (a prompt edit reads one window: with one, the prompt is cut to it)."""
    live = [c for c in channels if any(c.weighs(i, steps) for i in range(steps))]
    plain = prompt
    for channel in live:
        if channel.edit is not None:
            plain = channel.edit.text(plain, encoders[0].tokenizer)
    negatives = None if negative_prompt is None else [negative_prompt]
    segments: list[tuple[int, PromptEmbeddings, PromptEmbeddings | None]] = []
    encoded: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[PromptEmbeddings, PromptEmbeddings | None]] = {}
    # Edits leave the negative prompt alone: it changes only with the deltas acting.
    encoded_negative: dict[tuple[int, ...], PromptEmbeddings | None] = {}
    previous = None
    for index in range(steps):
        key = (
            tuple(i for i, c in enumerate(live) if c.deltas and c.weighs(index, steps)),
            tuple(i for i, c in enumerate(live) if c.edits(index, steps)),
        )
        if key == previous:
            continue
        previous = key
        weighing, editing = key
        if key not in encoded:
            edits = [e for i in editing if (e := live[i].edit) is not None]
            with _deltas_applied(encoders, [live[i] for i in weighing]):
                positive = (
                    _encode_edited(encoders, prompt, plain, edits)
                    if edits
                    else _encode(encoders, [plain], long_prompts)
                )
                if weighing not in encoded_negative:
                    encoded_negative[weighing] = (
                        encode_negative(
                            encoders, negatives, positive, zero_negative=zero_negative, long_prompts=long_prompts
                        )  # fmt: skip
                        if need_negative
                        else None
                    )
                encoded[key] = _aligned(positive, encoded_negative[weighing], lambda: _encode(encoders, [""]))
        segments.append((index, *encoded[key]))
    return segments


@torch.no_grad()
def encode_negative(
    encoders: Sequence[TextEncoder],
    negatives: list[str] | None,
    like: PromptEmbeddings,
    *,
    zero_negative: bool,
    long_prompts: LongPrompts = "chunks",
) -> PromptEmbeddings:
    """The negative prompts' embeddings. With none given and ``zero_negative`` (the SDXL base's
    ``force_zeros_for_empty_prompt``) all zeros, as SDXL was trained; otherwise the negative text (default "")."""
    if negatives is None and zero_negative:
        return PromptEmbeddings(torch.zeros_like(like.hidden), torch.zeros_like(like.pooled))
    return _encode(encoders, negatives if negatives is not None else [""] * like.hidden.shape[0], long_prompts)


@torch.no_grad()
def encode_prompts(
    encoders: Sequence[TextEncoder],
    prompts: list[str],
    negatives: list[str] | None,
    *,
    need_negative: bool,
    zero_negative: bool,
    long_prompts: LongPrompts = "chunks",
) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
    """Encode prompts (and negatives when guidance needs them, see :func:`encode_negative`), at one length."""
    positive = _encode(encoders, prompts, long_prompts)
    if not need_negative:
        return positive, None
    negative = encode_negative(encoders, negatives, positive, zero_negative=zero_negative, long_prompts=long_prompts)
    return _aligned(positive, negative, lambda: _encode(encoders, [""]))


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL size/crop conditioning; the refiner replaces the target size by an aesthetic score.

    Sizes are (height, width), as SDXL's time ids order them.

    Example:
        >>> MicroConditioning(original_size=(1024, 1024), target_size=(1024, 1024)).crop_top_left
        (0, 0)
    """

    original_size: tuple[int, int]
    target_size: tuple[int, int]
    crop_top_left: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


def time_ids(
    micro: MicroConditioning, *, aesthetic: bool, unet: Any, pooled_width: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) time ids of shape (1, n) for a stage, checked against the UNet's embedding size."""
    base: list[float] = [*micro.original_size, *micro.crop_top_left]
    if aesthetic:
        pos, neg = base + [micro.aesthetic_score], base + [micro.negative_aesthetic_score]
    else:
        pos = neg = base + [*micro.target_size]
    expected = unet.add_embedding.linear_1.in_features
    given = unet.config.addition_time_embed_dim * len(pos) + pooled_width
    if expected != given:
        wanted = "an aesthetic score (refiner)" if not aesthetic else "a target size (base)"
        raise IncompatibleModelError(
            f"the UNet's added-condition embedding takes {expected} values but {given} were built; "
            f"this UNet seems to expect {wanted}: was a base model loaded as a refiner or the other way round?"
        )
    return torch.tensor([pos], dtype=dtype), torch.tensor([neg], dtype=dtype)
