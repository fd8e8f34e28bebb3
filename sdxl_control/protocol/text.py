"""Prompt encoding and SDXL micro-conditioning, as each stage declares it."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch

from ..base.errors import ConditionError, IncompatibleModelError
from ..weights.conversion import text_parameter
from ..weights.embeddings import TextualInversion
from ..weights.patches import WeightDelta, WeightPatch
from .conditions import PromptEdit, PromptTokens, Window, acts
from .embeddings import EncoderEmbeddings, placed, vectors_placed
from .emphasis import CHUNK_TOKENS, Emphasis, emphasized, syntax_of, unweighted, weighted_tokens, zeroes_empty_negative
from .prompt_schedule import ScheduledPrompt

__all__ = [
    "TextEncoder",
    "PromptEmbeddings",
    "TextChannel",
    "encode_prompts",
    "encode_negative",
    "prompt_segments",
    "paired",
    "prompt_chunks",
    "LongPrompts",
    "MicroConditioning",
    "time_ids",
]

log = logging.getLogger(__name__)

# How a prompt longer than one CLIP window is read: in 75-token chunks encoded apart and joined (A1111's way), or cut
# to its first 75 tokens (diffusers').
LongPrompts = Literal["chunks", "truncate"]
# ComfyUI batches a prompt and negative prompt of other lengths by repeating each to their least common length, unless
# one would be repeated more than this (comfy/conds.py CONDCrossAttn.can_concat): then they run in separate calls.
COMFYUI_MAX_REPEAT = 4


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


def prompt_chunks(tokenizer: Any, text: str, emphasis: Emphasis = "off") -> list[list[int]]:
    """``text``'s token ids in chunks of at most 75, as A1111 splits a long prompt: ``BREAK`` ends a chunk, and a
    chunk that fills up within 20 tokens after a comma ends at the comma (``emphasis="comfyui"``: as ComfyUI splits
    it, see :mod:`~sdxl_control.protocol.emphasis`). An empty prompt is one empty chunk.

    Example:
        >>> [len(c) for c in prompt_chunks(tokenizer, "a red fox BREAK in the snow")]       # doctest: +SKIP
        [3, 3]
    """
    return [[token for token, _ in chunk] for chunk in weighted_tokens(tokenizer, text, emphasis)]


@dataclass(frozen=True)
class _Reading:
    """What each encoder reads for a batch of texts: 77-token windows (texts x windows, 77) of ids and their weights,
    every text given as many windows (empty ones after a shorter text: what an empty prompt encodes to)."""

    ids: list[torch.Tensor]
    weights: list[torch.Tensor]
    windows: int
    emphasis: Emphasis = "off"
    # Per encoder: the (window, position) of each embedding vector, and the vectors (see protocol.embeddings).
    vectors: tuple[tuple[list[tuple[int, int]], list[torch.Tensor]], ...] = ()


def _encoder_embeddings(
    encoder: TextEncoder, embeddings: Mapping[str, TextualInversion] | None
) -> EncoderEmbeddings | None:
    if not embeddings:
        return None
    width = encoder.model.config.hidden_size
    vectors = {name: ti.for_component(encoder.component, width) for name, ti in embeddings.items()}
    return EncoderEmbeddings(encoder.tokenizer, vectors)


def _read(
    encoders: Sequence[TextEncoder],
    texts: list[str],
    emphasis: Emphasis = "off",
    long_prompts: LongPrompts = "chunks",
    embeddings: Mapping[str, TextualInversion] | None = None,
) -> _Reading:
    whole = long_prompts == "chunks"
    # The stage's last encoder is SDXL's OpenCLIP bigG, whose text A1111 tokenizes with open_clip's tokenizer.
    per_encoder = [
        [
            weighted_tokens(
                enc.tokenizer,
                text,
                emphasis,
                whole=whole,
                open_clip=i == len(encoders) - 1,
                embeddings=_encoder_embeddings(enc, embeddings),
            )
            for text in texts
        ]
        for i, enc in enumerate(encoders)
    ]
    counts = [[len(chunks) for chunks in texts_chunks] for texts_chunks in per_encoder]
    if len({tuple(c) for c in counts}) > 1:
        if emphasis != "a1111":
            raise IncompatibleModelError(
                "the stage's tokenizers split the prompt differently; they should share CLIP's"
            )
        # A1111's two tokenizers clean text apart (HTML entities, see emphasis.a1111_cleaned), so near a chunk's end
        # they may cut a prompt into different numbers of chunks; A1111 then stops (its conditioner cannot join the
        # two encoders' states). Here the encoder with fewer chunks reads empty ones after its own.
        text = next(i for i in range(len(texts)) if len({c[i] for c in counts}) > 1)
        log.warning(
            "the text encoders cut %r into different numbers of 75-token chunks (%s; their tokenizers clean the text "
            "apart, as A1111's do): the shorter reading is followed by empty chunks, where A1111 stops with an error",
            texts[text] if len(texts[text]) <= 60 else texts[text][:57] + "...",
            " and ".join(str(c[text]) for c in counts),
        )
    count = max(len(chunks) for texts_chunks in per_encoder for chunks in texts_chunks)
    ids, weights, vectors = [], [], []
    for enc, texts_chunks in zip(encoders, per_encoder, strict=True):
        tok = enc.tokenizer
        windows: list[list[tuple[int, float]]] = []
        for chunks in texts_chunks:
            for chunk in [*chunks, *[[]] * (count - len(chunks))]:
                # As one window of diffusers' tokenization: start, the tokens, end, padding.
                windows.append(
                    [(tok.bos_token_id, 1.0), *chunk, (tok.eos_token_id, 1.0)]
                    + [(tok.pad_token_id, 1.0)] * (CHUNK_TOKENS - len(chunk))
                )
        ids.append(torch.tensor([[t for t, _ in w] for w in windows]))
        weights.append(torch.tensor([[v for _, v in w] for w in windows]))
        vectors.append(placed(windows))
    return _Reading(ids, weights, count, emphasis, tuple(vectors))


def _chunked(encoders: Sequence[TextEncoder], texts: list[str]) -> tuple[list[torch.Tensor], int]:
    """Each encoder's token ids for ``texts`` in 77-token windows, (texts x chunks, 77), and the chunks per text."""
    reading = _read(encoders, texts)
    return reading.ids, reading.windows


def _layer(encoder: TextEncoder, clip_skip: int | None) -> int:
    """The index into ``hidden_states`` the prompt is read from: SDXL's penultimate layer (-2), or with ``clip_skip``
    N the N-th layer from the end (1: the last), before the final layer norm, on every encoder."""
    if clip_skip is None:
        return -2
    layers = encoder.model.config.num_hidden_layers
    if not 1 <= clip_skip <= layers:
        raise IncompatibleModelError(
            f"clip_skip {clip_skip} reads the {clip_skip}-th layer from the end of {encoder.component or 'a text encoder'}"
            f", which has {layers}: give 1 to {layers}"
        )
    return -clip_skip


def _run(encoders: Sequence[TextEncoder], reading: _Reading, clip_skip: int | None = None) -> PromptEmbeddings:
    hidden = []
    pooled: torch.Tensor | None = None
    chunks = reading.windows
    placements = reading.vectors or (([], []),) * len(encoders)
    for enc, tokens, weights, (where, vectors) in zip(encoders, reading.ids, reading.weights, placements, strict=True):
        layer = _layer(enc, clip_skip)
        with vectors_placed(enc.model, where, vectors):
            out = enc.model(tokens.to(enc.model.device), output_hidden_states=True)
        # SDXL conditions on the penultimate layer of each encoder (or the one clip_skip says) and the projected
        # pooled output of the last, which no clip skip changes (in A1111, Forge or ComfyUI).
        states = emphasized(out.hidden_states[layer], weights, reading.emphasis, partial(_empty_window, enc, layer))
        hidden.append(states.reshape(states.shape[0] // chunks, chunks * states.shape[1], states.shape[2]))
        if out[0].ndim == 2:
            pooled = out[0][::chunks]  # a long prompt's pooled embedding is its first chunk's, as A1111's
    if pooled is None:
        raise IncompatibleModelError("the stage's last text encoder has no projection (no pooled text embedding)")
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


def _empty_window(encoder: TextEncoder, layer: int = -2) -> torch.Tensor:
    ids = _read([encoder], [""]).ids[0]
    return encoder.model(ids.to(encoder.model.device), output_hidden_states=True).hidden_states[layer]


def _encode(
    encoders: Sequence[TextEncoder],
    texts: list[str],
    long_prompts: LongPrompts = "chunks",
    emphasis: Emphasis = "off",
    *,
    embeddings: Mapping[str, TextualInversion] | None = None,
    clip_skip: int | None = None,
) -> PromptEmbeddings:
    return _run(encoders, _read(encoders, texts, emphasis, long_prompts, embeddings), clip_skip)


def _aligned(
    positive: PromptEmbeddings,
    negative: PromptEmbeddings | None,
    empty: Callable[[], PromptEmbeddings],
    emphasis: Emphasis = "off",
) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
    """The prompt and negative prompt at one length, for guidance to run them as one batch: the shorter followed by
    empty-prompt chunks (A1111's "pad prompt/negative prompt to be same length"; ``empty()`` encodes ""), or, as
    ComfyUI reads prompts, each repeated to the least common length (attention over repeated keys is attention over
    the keys once: the same as running the two apart)."""
    if negative is None or negative.hidden.shape[1] == positive.hidden.shape[1]:
        return positive, negative
    length = max(positive.hidden.shape[1], negative.hidden.shape[1])
    comfyui = syntax_of(emphasis) == "comfyui"
    if comfyui:
        length = math.lcm(positive.hidden.shape[1], negative.hidden.shape[1])

    def padded(embeddings: PromptEmbeddings) -> PromptEmbeddings:
        if comfyui:
            return PromptEmbeddings(
                embeddings.hidden.repeat(1, length // embeddings.hidden.shape[1], 1), embeddings.pooled
            )
        window = empty().hidden
        repeats = (length - embeddings.hidden.shape[1]) // window.shape[1]
        fill = window.expand(embeddings.hidden.shape[0], -1, -1).repeat(1, repeats, 1)
        return PromptEmbeddings(torch.cat([embeddings.hidden, fill], dim=1), embeddings.pooled)

    return padded(positive), padded(negative)


def _encode_edited(
    encoders: Sequence[TextEncoder],
    prompt: str,
    plain: str,
    edits: list[PromptEdit],
    long_prompts: LongPrompts = "chunks",
    emphasis: Emphasis = "off",
    *,
    embeddings: Mapping[str, TextualInversion] | None = None,
    clip_skip: int | None = None,
) -> PromptEmbeddings:
    rewriting = [e for e in edits if e.rewrites_tokens]
    if len(rewriting) > 1:
        names = ", ".join(type(e).__name__ for e in rewriting)
        raise ConditionError(f"{names} all rewrite the prompt's tokens at the same steps; only one condition may")
    if rewriting:
        # A condition that rewrites the tokens reads the prompt's words.
        written, dropped = unweighted(prompt, emphasis)
        if dropped:
            log.warning("%s reads the prompt without its weights", type(rewriting[0]).__name__)
        tokens = []
        for index, enc in enumerate(encoders):
            read = rewriting[0].tokens(written, enc.tokenizer, index, whole=long_prompts == "chunks")
            window = enc.tokenizer.model_max_length
            if not read.ids or len(read.ids) % window or (long_prompts != "chunks" and len(read.ids) != window):
                raise ConditionError(
                    f"{type(rewriting[0]).__name__} gave {len(read.ids)} token ids; the text encoder reads "
                    f"{'windows' if long_prompts == 'chunks' else 'one window'} of {window}"
                )
            tokens.append(read)
        windows = {len(t.ids) // enc.tokenizer.model_max_length for t, enc in zip(tokens, encoders, strict=True)}
        if len(windows) > 1:
            raise ConditionError(f"{type(rewriting[0]).__name__} gave the text encoders different numbers of windows")
        count = windows.pop()
        ids = [torch.tensor(t.ids).view(count, -1) for t in tokens]
        reading = _Reading(ids, [torch.ones(i.shape) for i in ids], count)
    else:
        reading = _read(encoders, [plain], emphasis, long_prompts, embeddings)
        tokens = [PromptTokens(tuple(i.flatten().tolist()), (False,) * i.numel()) for i in reading.ids]
    out = _run(encoders, reading, clip_skip)
    hidden = out.hidden
    for edit in edits:
        hidden = edit.embed(hidden, tokens)
    return PromptEmbeddings(hidden, out.pooled)


@dataclass(frozen=True)
class TextChannel:
    """What one condition changes in a stage's prompt encoding, and at which steps: its prompt edit and its text-encoder
    weight deltas (component -> parameter name -> delta), both acting only where the condition acts (``scale``,
    ``window``, see :func:`~sdxl_control.protocol.conditions.acts`); the edit also only inside its own window.

    Example:
        >>> TextChannel(0.8, Window(0.0, 0.5)).weighs(1, total=4)
        True
    """

    scale: float
    window: Window
    edit: PromptEdit | None = None
    deltas: Mapping[str, Mapping[str, WeightDelta]] = field(default_factory=dict)

    def weighs(self, index: int, total: int) -> bool:
        return acts(self.scale, self.window, index, total)

    def edits(self, index: int, total: int) -> bool:
        return self.edit is not None and self.weighs(index, total) and self.edit.window.contains(index, total)


def encoder_patch(encoder: TextEncoder, deltas: Mapping[str, WeightDelta]) -> WeightPatch:
    """``deltas`` (named as published LoRAs name CLIP parameters) added to ``encoder``'s weights until restored."""
    names = {n for n, _ in encoder.model.named_parameters()}
    return WeightPatch(encoder.model, {text_parameter(names, k): v for k, v in deltas.items()})


@contextmanager
def _deltas_applied(encoders: Sequence[TextEncoder], channels: Sequence[TextChannel]) -> Iterator[None]:
    patches: list[WeightPatch] = []
    try:
        for channel in channels:
            for encoder in encoders:
                deltas = channel.deltas.get(encoder.component)
                if deltas:
                    patches.append(encoder_patch(encoder, deltas))
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
    emphasis: Emphasis = "off",
    embeddings: Mapping[str, TextualInversion] | None = None,
    clip_skip: int | None = None,
    schedule: ScheduledPrompt | None = None,
    pad: bool = True,
) -> list[tuple[int, PromptEmbeddings, PromptEmbeddings | None]]:
    """The prompt's (and, with ``need_negative``, the negative prompt's) embeddings for each run of steps that the same
    channels act on, as (first step index, positive, negative), in step order; with nothing acting, one segment from
    step 0. The prompt text is first passed through the :meth:`~sdxl_control.PromptEdit.text` of every edit whose
    condition acts at any step (the first encoder's tokenizer decides); the negative prompt is never edited, but is
    encoded with the text-encoder deltas acting at the segment's steps. ``long_prompts`` and ``emphasis`` say how a
    prompt is read (see :mod:`~sdxl_control.protocol.emphasis`); an edit that rewrites the tokens (PhotoMaker's) reads
    the prompt without its weights. ``embeddings`` (name -> textual inversion) stand in where the prompts name them
    (see :mod:`~sdxl_control.protocol.embeddings`); ``clip_skip`` N reads every encoder's N-th layer from the end
    (default: SDXL's penultimate, 2).

    ``schedule`` (A1111's prompt editing, alternation and ``AND``, see
    :mod:`~sdxl_control.protocol.prompt_schedule`) gives the texts read at each step instead of ``prompt`` and
    ``negative_prompt``: segments then also start where a text changes, each distinct text is encoded once, and the
    positive holds one row per composable part (a shorter part followed by copies of its last vector, A1111's
    ``stack_conds``). ``pad``: the shorter of positive and negative is followed by empty-prompt chunks to batch them
    (A1111's "pad prompt/negative prompt"); without it, they keep their own lengths (see :func:`paired`)."""
    reading: dict[str, Any] = {"embeddings": embeddings, "clip_skip": clip_skip}
    live = [c for c in channels if any(c.weighs(i, steps) for i in range(steps))]

    def edited(text: str) -> str:
        for channel in live:
            if channel.edit is not None:
                text = channel.edit.text(text, encoders[0].tokenizer)
        return text

    segments: list[tuple[int, PromptEmbeddings, PromptEmbeddings | None]] = []
    encoded: dict[tuple[Any, ...], tuple[PromptEmbeddings, PromptEmbeddings | None]] = {}
    # Each text once per set of acting channels; edits leave the negative prompt alone: it changes only with the
    # deltas acting.
    encoded_text: dict[tuple[Any, ...], PromptEmbeddings] = {}
    encoded_negative: dict[tuple[Any, ...], PromptEmbeddings | None] = {}
    previous = None
    for index in range(steps):
        texts = schedule.texts_at(index) if schedule is not None else ((prompt,), negative_prompt)
        key = (
            tuple(i for i, c in enumerate(live) if c.deltas and c.weighs(index, steps)),
            tuple(i for i, c in enumerate(live) if c.edits(index, steps)),
            texts,
        )
        if key == previous:
            continue
        previous = key
        weighing, editing, (positives, negative_text) = key
        if key not in encoded:
            edits = [e for i in editing if (e := live[i].edit) is not None]
            with _deltas_applied(encoders, [live[i] for i in weighing]):
                parts = []
                for text in positives:
                    if (weighing, editing, text) not in encoded_text:
                        encoded_text[weighing, editing, text] = (
                            _encode_edited(encoders, text, edited(text), edits, long_prompts, emphasis, **reading)
                            if edits
                            else _encode(encoders, [edited(text)], long_prompts, emphasis, **reading)
                        )
                    parts.append(encoded_text[weighing, editing, text])
                positive = _stacked(parts)
                if (weighing, negative_text) not in encoded_negative:
                    encoded_negative[weighing, negative_text] = (
                        encode_negative(
                            encoders,
                            None if negative_text is None else [negative_text],
                            parts[0],
                            zero_negative=zero_negative,
                            long_prompts=long_prompts,
                            emphasis=emphasis,
                            **reading,
                        )  # fmt: skip
                        if need_negative
                        else None
                    )
                empty = partial(_encode, encoders, [""], clip_skip=clip_skip)
                encoded[key] = paired(positive, encoded_negative[weighing, negative_text], empty, emphasis, pad=pad)
        segments.append((index, *encoded[key]))
    return segments


def _stacked(parts: Sequence[PromptEmbeddings]) -> PromptEmbeddings:
    """Composable parts as one batch row each, a shorter one followed by copies of its last vector (A1111's
    ``stack_conds``)."""
    if len(parts) == 1:
        return parts[0]
    length = max(p.hidden.shape[1] for p in parts)
    hidden = [torch.cat([p.hidden, p.hidden[:, -1:].expand(-1, length - p.hidden.shape[1], -1)], dim=1) for p in parts]
    return PromptEmbeddings(torch.cat(hidden), torch.cat([p.pooled for p in parts]))


def paired(
    positive: PromptEmbeddings,
    negative: PromptEmbeddings | None,
    empty: Callable[[], PromptEmbeddings],
    emphasis: Emphasis = "off",
    *,
    pad: bool = True,
) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
    """The prompt and negative prompt as guidance runs them: at one length (see :func:`_aligned`), or, without ``pad``,
    each at its own length, for the UNet to run in two calls when they differ: always as A1111 reads them (its option
    "pad prompt/negative prompt to be same length" is off by default), and as ComfyUI reads them (``emphasis=
    "comfyui"``) when repeating the shorter to the common length would repeat it more than 4 times (ComfyUI's
    ``CONDCrossAttn.can_concat``)."""
    if pad or negative is None:
        return _aligned(positive, negative, empty, emphasis)
    if emphasis == "comfyui":
        lengths = positive.hidden.shape[1], negative.hidden.shape[1]
        if math.lcm(*lengths) // min(lengths) <= COMFYUI_MAX_REPEAT:
            return _aligned(positive, negative, empty, emphasis)
    return positive, negative


@torch.no_grad()
def encode_negative(
    encoders: Sequence[TextEncoder],
    negatives: list[str] | None,
    like: PromptEmbeddings,
    *,
    zero_negative: bool,
    long_prompts: LongPrompts = "chunks",
    emphasis: Emphasis = "off",
    embeddings: Mapping[str, TextualInversion] | None = None,
    clip_skip: int | None = None,
) -> PromptEmbeddings:
    """The negative prompts' embeddings. With none given and ``zero_negative`` (the SDXL base's
    ``force_zeros_for_empty_prompt``) all zeros, as SDXL was trained; otherwise the negative text (default "").
    Read as A1111 reads it (``emphasis="a1111"``), negatives that are all ``""`` are zeros too, as A1111 makes them
    for SDXL."""
    empty = negatives is not None and zeroes_empty_negative(emphasis) and all(text == "" for text in negatives)
    if zero_negative and (negatives is None or empty):
        return PromptEmbeddings(torch.zeros_like(like.hidden), torch.zeros_like(like.pooled))
    texts = negatives if negatives is not None else [""] * like.hidden.shape[0]
    return _encode(encoders, texts, long_prompts, emphasis, embeddings=embeddings, clip_skip=clip_skip)


@torch.no_grad()
def encode_prompts(
    encoders: Sequence[TextEncoder],
    prompts: list[str],
    negatives: list[str] | None,
    *,
    need_negative: bool,
    zero_negative: bool,
    long_prompts: LongPrompts = "chunks",
    emphasis: Emphasis = "off",
    embeddings: Mapping[str, TextualInversion] | None = None,
    clip_skip: int | None = None,
) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
    """Encode prompts (and negatives when guidance needs them, see :func:`encode_negative`), at one length;
    ``embeddings`` and ``clip_skip`` as :func:`prompt_segments` reads them."""
    positive = _encode(encoders, prompts, long_prompts, emphasis, embeddings=embeddings, clip_skip=clip_skip)
    if not need_negative:
        return positive, None
    negative = encode_negative(
        encoders, negatives, positive, zero_negative=zero_negative, long_prompts=long_prompts, emphasis=emphasis,
        embeddings=embeddings, clip_skip=clip_skip,
    )  # fmt: skip
    return _aligned(positive, negative, partial(_encode, encoders, [""], clip_skip=clip_skip), emphasis)


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
