"""The attention channel: one processor per cross-attention layer holding an ordered list of named branches.

Each branch adds ``scale * attention(query, k_i, v_i)`` over its own tokens (an IP-Adapter's image tokens, an identity
embedding...) to the layer's text attention, before the output projection — the IP-Adapter formulation. The wrapped
processor computes the text attention unchanged; since the output projection is linear, the branches' sum is
projected separately (without bias) and added to its result.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["AttentionBranch", "BranchedAttnProcessor", "attention_layers"]

# model -> {processor name: attention module}; weak so that dropped models are forgotten
_LAYERS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def attention_layers(model: torch.nn.Module) -> dict[str, Any]:
    """A model's attention modules by processor name (diffusers' ``attn_processors`` naming and order), found once.

    diffusers' ``attn_processors`` / ``set_attn_processor`` walk every module on each use (milliseconds on a full
    UNet, twice per condition per call); the set of attention modules of a model does not change.
    """
    layers = _LAYERS.get(model)
    if layers is None:
        layers = {f"{name}.processor": m for name, m in model.named_modules() if hasattr(m, "set_processor")}
        _LAYERS[model] = layers
    return layers


@dataclass(eq=False)
class AttentionBranch:
    """Extra keys and values (batch, n, width) for one layer, computed once per call from the condition's tokens —
    they do not change over the steps.

    ``active`` is switched per step by the owning attachment (step windows); ``mask`` (1, H, W), if set, limits the
    branch to a region.

    Example:
        >>> AttentionBranch("ip-style", F.linear(tokens, w_k), F.linear(tokens, w_v), scale=0.8)  # doctest: +SKIP
    """

    name: str
    key: torch.Tensor
    value: torch.Tensor
    scale: float
    mask: Any = None
    active: bool = True
    _mask_cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def region(self, queries: int, batch: int, width: int) -> torch.Tensor | None:
        if self.mask is None:
            return None
        if queries not in self._mask_cache:
            from diffusers.image_processor import IPAdapterMaskProcessor

            self._mask_cache[queries] = IPAdapterMaskProcessor.downsample(self.mask, batch, queries, width)
        return self._mask_cache[queries]


class BranchedAttnProcessor:
    """Wraps a layer's processor and adds the active branches' attention to its output.

    Example:
        >>> proc = BranchedAttnProcessor(unet.attn_processors[name], [branch])  # doctest: +SKIP
    """

    def __init__(self, inner: Any, branches: list[AttentionBranch]) -> None:
        # Stacking onto a branched layer keeps one processor per layer: same inner processor, branches appended.
        self.inner: Any = inner.inner if isinstance(inner, BranchedAttnProcessor) else inner
        self.branches: list[AttentionBranch] = (
            inner.branches if isinstance(inner, BranchedAttnProcessor) else []
        ) + branches

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        live = [b for b in self.branches if b.active]
        if live and _plain_cross_attention(self.inner, attn, hidden_states, encoder_hidden_states, attention_mask):
            return self._joint(attn, hidden_states, encoder_hidden_states, live)  # type: ignore[arg-type]
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if not live:
            return out
        if hidden_states.ndim != 3 or attn.spatial_norm is not None:
            raise NotImplementedError(
                "attention branches support (batch, tokens, channels) inputs without spatial norm"
            )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = _heads(attn.to_q(hidden_states), attn)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        # The output projection is linear: the branches' sum is projected on its own (no bias) and added.
        return out + F.linear(_branch_sum(query, live, attn), attn.to_out[0].weight) / attn.rescale_output_factor

    def _joint(
        self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, live: list[AttentionBranch]
    ) -> torch.Tensor:
        """Text attention and branches from one query projection, summed before one output projection (the
        IP-Adapter formulation itself) — for the plain SDPA processors, whose steps this repeats."""
        if hasattr(attn, "to_kv"):  # fused projections (sdxl_control.fast)
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query = _heads(attn.to_q(hidden_states), attn)
        text = F.scaled_dot_product_attention(query, _heads(key, attn), _heads(value, attn), dropout_p=0.0)
        batch, width = hidden_states.shape[0], query.shape[1] * query.shape[-1]
        mixed = text.transpose(1, 2).reshape(batch, -1, width).to(query.dtype) + _branch_sum(query, live, attn)
        return attn.to_out[1](attn.to_out[0](mixed)) / attn.rescale_output_factor


def _heads(x: torch.Tensor, attn: Any) -> torch.Tensor:
    """(batch, tokens, width) -> (batch, heads, tokens, head_dim)."""
    batch, width = x.shape[0], x.shape[-1]
    return x.view(batch, -1, attn.heads, width // attn.heads).transpose(1, 2)


def _branch_sum(query: torch.Tensor, live: list[AttentionBranch], attn: Any) -> torch.Tensor:
    """sum_i scale_i * attention(query, k_i, v_i), masked, as (batch, tokens, width)."""
    batch, width = query.shape[0], query.shape[1] * query.shape[-1]
    total: torch.Tensor | None = None
    for branch in live:
        extra = F.scaled_dot_product_attention(
            query, _heads(branch.key, attn), _heads(branch.value, attn), dropout_p=0.0, is_causal=False
        )
        extra = extra.transpose(1, 2).reshape(batch, -1, width).to(query.dtype)
        region = branch.region(extra.shape[1], batch, width)
        if region is not None:
            extra = extra * region.to(extra.device, extra.dtype)
        total = branch.scale * extra if total is None else total + branch.scale * extra
    assert total is not None
    return total


def _plain_cross_attention(
    inner: Any, attn: Any, hidden_states: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None
) -> bool:
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    return (
        type(inner) in (AttnProcessor2_0, FusedAttnProcessor2_0)
        and context is not None
        and mask is None
        and hidden_states.ndim == 3
        and attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_cross is None
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.residual_connection
    )
