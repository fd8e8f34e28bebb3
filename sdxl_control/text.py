"""Prompt encoding and SDXL micro-conditioning, as each stage declares it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import IncompatibleModelError

__all__ = ["TextEncoder", "PromptEmbeddings", "encode_prompts", "MicroConditioning", "time_ids"]

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


def _encode(encoders: Sequence[TextEncoder], texts: list[str]) -> PromptEmbeddings:
    hidden = []
    pooled: torch.Tensor | None = None
    for enc in encoders:
        tok = enc.tokenizer
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        ids = ids.input_ids
        full = tok(texts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            log.warning("prompt truncated to %d CLIP tokens", tok.model_max_length)
        out = enc.model(ids.to(enc.model.device), output_hidden_states=True)
        # SDXL conditions on the penultimate layer of each encoder and the projected pooled output of the last.
        hidden.append(out.hidden_states[-2])
        if out[0].ndim == 2:
            pooled = out[0]
    if pooled is None:
        raise IncompatibleModelError("the stage's last text encoder has no projection (no pooled text embedding)")
    return PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)


@torch.no_grad()
def encode_prompts(
    encoders: Sequence[TextEncoder],
    prompts: list[str],
    negatives: list[str] | None,
    *,
    need_negative: bool,
    zero_negative: bool,
) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
    """Encode prompts (and negatives when guidance needs them).

    With no negative prompt and ``zero_negative`` (the SDXL base's ``force_zeros_for_empty_prompt``), the negative
    embedding is all zeros, as SDXL was trained; otherwise the negative text (default "") is encoded.
    """
    positive = _encode(encoders, prompts)
    if not need_negative:
        return positive, None
    if negatives is None and zero_negative:
        return positive, PromptEmbeddings(torch.zeros_like(positive.hidden), torch.zeros_like(positive.pooled))
    return positive, _encode(encoders, negatives if negatives is not None else [""] * len(prompts))


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
