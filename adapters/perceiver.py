"""The perceiver blocks the identity encoders share — PuLID v1.1's IDFormer and PhotoMaker v2's Q-Former, both from
IP-Adapter's Resampler family — under the names their checkpoints give them (``norm1``, ``norm2``, ``to_q``,
``to_kv``, ``to_out``; a feed-forward numbered 0, 1, 3).

Example:
    >>> block = PerceiverAttention(width=2048, heads=16, head_width=128)  # doctest: +SKIP
    >>> latents = block(context, latents) + latents                      # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PerceiverAttention", "feed_forward"]


class PerceiverAttention(nn.Module):
    """Latents attend to the context and to themselves; both factors of the logits are scaled by head_width^-1/4
    (steadier in half precision than scaling after) and the softmax runs in float32.

    Example:
        >>> PerceiverAttention(width=1024, heads=16)(context, latents).shape == latents.shape  # doctest: +SKIP
        True
    """

    def __init__(self, width: int, heads: int, head_width: int = 64) -> None:
        super().__init__()
        inner = heads * head_width
        self.heads, self.head_width = heads, head_width
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context, latents = self.norm1(context), self.norm2(latents)
        batch, length, _ = latents.shape
        key, value = self.to_kv(torch.cat([context, latents], dim=-2)).chunk(2, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.heads, self.head_width).transpose(1, 2)

        query, key, value = split(self.to_q(latents)), split(key), split(value)
        factor = self.head_width**-0.25
        weights = ((query * factor) @ (key * factor).transpose(-2, -1)).float().softmax(dim=-1).type(query.dtype)
        return self.to_out((weights @ value).transpose(1, 2).reshape(batch, length, -1))


def feed_forward(width: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm, Linear (no bias), exact GELU, Linear (no bias): modules 0, 1, 2, 3."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width * mult, bias=False), nn.GELU(),
                         nn.Linear(width * mult, width, bias=False))  # fmt: skip
