"""Prompt encoding and SDXL micro-conditioning, as each stage declares it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .conditions import PromptEdit, PromptTokens
from .errors import ConditionError, IncompatibleModelError

__all__ = [
    "TextEncoder",
    "PromptEmbeddings",
    "encode_prompts",
    "encode_negative",
    "prompt_segments",
    "MicroConditioning",
    "time_ids",
]

log = logging.getLogger(__name__)


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


def _run(encoders: Sequence[TextEncoder], ids: Sequence[torch.Tensor]) -> PromptEmbeddings:
    hidden = []
    pooled: torch.Tensor | None = None
    for enc, tokens in zip(encoders, ids, strict=True):
        out = enc.model(tokens.to(enc.model.device), output_hidden_states=True)
        # SDXL conditions on the penultimate layer of each encoder and the projected pooled output of the last.
        hidden.append(out.hidden_states[-2])
        if out[0].ndim == 2:
            pooled = out[0]
    if pooled is None:
        raise IncompatibleModelError("the stage's last text encoder has no projection (no pooled text embedding)")
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


def _encode(encoders: Sequence[TextEncoder], texts: list[str]) -> PromptEmbeddings:
    return _run(encoders, [_tokenize(enc.tokenizer, texts) for enc in encoders])


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


@torch.no_grad()
def prompt_segments(
    encoders: Sequence[TextEncoder], prompt: str, edits: Sequence[PromptEdit], steps: int
) -> list[tuple[int, PromptEmbeddings]]:
    """The prompt's embeddings for each run of steps that the same edits act on, as (first step index, embeddings),
    in step order; with no edits, one segment from step 0. The prompt text is first passed through every edit's
    :meth:`~sdxl_control.PromptEdit.text` (the first encoder's tokenizer decides)."""
    plain = prompt
    for edit in edits:
        plain = edit.text(plain, encoders[0].tokenizer)
    bounds = sorted(
        {0} | {e.first for e in edits if e.first < steps} | {e.last for e in edits if e.last and e.last < steps}
    )
    segments: list[tuple[int, PromptEmbeddings]] = []
    acting_before: list[PromptEdit] | None = None
    cache: PromptEmbeddings | None = None
    for start in bounds:
        acting = [e for e in edits if e.acts_at(start)]
        if acting == acting_before:
            continue
        if acting:
            embeddings = _encode_edited(encoders, prompt, plain, acting)
        else:
            cache = cache or _encode(encoders, [plain])
            embeddings = cache
        segments.append((start, embeddings))
        acting_before = acting
    return segments


@torch.no_grad()
def encode_negative(
    encoders: Sequence[TextEncoder], negatives: list[str] | None, like: PromptEmbeddings, *, zero_negative: bool
) -> PromptEmbeddings:
    """The negative prompts' embeddings. With none given and ``zero_negative`` (the SDXL base's
    ``force_zeros_for_empty_prompt``) all zeros, as SDXL was trained; otherwise the negative text (default "")."""
    if negatives is None and zero_negative:
        return PromptEmbeddings(torch.zeros_like(like.hidden), torch.zeros_like(like.pooled))
    return _encode(encoders, negatives if negatives is not None else [""] * like.hidden.shape[0])


@torch.no_grad()
def encode_prompts(
    encoders: Sequence[TextEncoder],
    prompts: list[str],
    negatives: list[str] | None,
    *,
    need_negative: bool,
    zero_negative: bool,
) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
    """Encode prompts (and negatives when guidance needs them, see :func:`encode_negative`)."""
    positive = _encode(encoders, prompts)
    if not need_negative:
        return positive, None
    return positive, encode_negative(encoders, negatives, positive, zero_negative=zero_negative)


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
