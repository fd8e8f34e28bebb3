"""The attention channel: one processor per cross-attention layer holding an ordered list of named branches.

Each branch adds ``scale * attention(query, k_i, v_i)`` over its own tokens (an IP-Adapter's image tokens, an identity
embedding...) to the layer's text attention, before the output projection — the IP-Adapter formulation. The wrapped
processor computes the text attention unchanged; since the output projection is linear, the branches' sum is
projected separately (without bias) and added to its result. An :class:`OrthogonalBranch` (PuLID's ID attention)
also reads the text attention's own output, so it needs the joint path of diffusers' plain SDPA processors.

A branch whose ``replaces_text`` is set does not add: the live branches of its kind in a layer make the text attention's
output anew, together (:meth:`AttentionBranch.replace_text`; attention couple blends the regions' prompts), before the
adding branches read and add to it — also on the joint path.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from .rows import call_rows

__all__ = ["AttentionBranch", "OrthogonalBranch", "BranchedAttnProcessor", "attention_layers"]

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
    _mask_cache: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    # Whether the branch reads the text attention's output (before the output projection).
    needs_text: ClassVar[bool] = False
    # Whether the live branches of this kind replace the text attention's output jointly (``replace_text``), instead
    # of adding their own ``output`` to it.
    replaces_text: ClassVar[bool] = False

    @classmethod
    def replace_text(
        cls, group: list[AttentionBranch], query: torch.Tensor, text: torch.Tensor, attn: Any
    ) -> torch.Tensor:
        """The text attention's output (batch, tokens, width) made anew by the live branches ``group`` of this kind
        (all of one layer, in attach order); ``query`` in head layout. Only kinds with ``replaces_text`` define it."""
        raise NotImplementedError(f"{cls.__name__} does not replace the text attention")

    def region(self, queries: int, batch: int, width: int) -> torch.Tensor | None:
        if self.mask is None:
            return None
        if (queries, batch) not in self._mask_cache:
            from diffusers.image_processor import IPAdapterMaskProcessor

            self._mask_cache[queries, batch] = IPAdapterMaskProcessor.downsample(self.mask, batch, queries, width)
        return self._mask_cache[queries, batch]

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values for the rows of the UNet call running now (they were made for the prepared rows)."""
        rows = call_rows()
        if rows is None or self.key.shape[0] != rows.prepared:
            return self.key, self.value
        return rows.gather(self.key), rows.gather(self.value)

    def attend(self, query: torch.Tensor, attn: Any) -> torch.Tensor:
        """attention(query, key, value) with the layer's heads, as (batch, tokens, width) in the query's dtype."""
        batch, width = query.shape[0], query.shape[1] * query.shape[-1]
        key, value = self.rows()
        out = F.scaled_dot_product_attention(query, _heads(key, attn), _heads(value, attn), dropout_p=0.0,
                                             is_causal=False)  # fmt: skip
        return out.transpose(1, 2).reshape(batch, -1, width).to(query.dtype)

    def output(self, query: torch.Tensor, text: torch.Tensor | None, attn: Any) -> torch.Tensor:
        """What the branch adds to the text attention before the output projection (scaled, limited to its region).
        ``query`` is in head layout (batch, heads, tokens, head_dim); ``text`` is the text attention's output."""
        return self._in_region(self.scale * self.attend(query, attn))

    def _in_region(self, extra: torch.Tensor) -> torch.Tensor:
        region = self.region(extra.shape[1], extra.shape[0], extra.shape[2])
        return extra if region is None else extra * region.to(extra.device, extra.dtype)


@dataclass(eq=False)
class OrthogonalBranch(AttentionBranch):
    """PuLID's ID attention: its part along the text attention's output ``O`` is taken out, so the identity changes
    the image less where the prompt already decides it.

    With ``P = (sum_L O*O_id / sum_L O*O) * O`` (sums over the image tokens, per channel, in float32):
    ``"ortho"`` adds ``scale * (O_id - P)``; ``"ortho_v2"`` adds ``scale * (O_id + (a - 1) * P)``, ``a`` being the
    attention weight (unscaled logits, averaged over heads) that each query gives the first ``mass_tokens`` ID tokens.

    Example:
        >>> OrthogonalBranch("pulid", key, value, scale=0.8, variant="ortho_v2")  # doctest: +SKIP
    """

    variant: Literal["ortho", "ortho_v2"] = "ortho"
    mass_tokens: int = 5

    needs_text: ClassVar[bool] = True

    def output(self, query: torch.Tensor, text: torch.Tensor | None, attn: Any) -> torch.Tensor:
        if text is None:
            raise NotImplementedError("an orthogonal attention branch needs the text attention's output")
        identity = self.attend(query, attn)
        plain, extra = text.float(), identity.float()
        energy = (plain * plain).sum(dim=-2, keepdim=True)
        # A channel the text attention leaves at zero (SDXL's all-zero negative prompt does, in every layer) has nothing
        # to project out: its projection is 0, not 0/0.
        energy = torch.where(energy == 0, torch.ones_like(energy), energy)
        projection = (plain * extra).sum(dim=-2, keepdim=True) / energy * plain
        if self.variant == "ortho":
            orthogonal = extra - projection
        else:
            # As the reference: logits in the query's dtype, without the 1/sqrt(d) scale.
            weights = (query @ _heads(self.rows()[0], attn).transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
            mass = weights[:, :, : self.mass_tokens].sum(dim=-1, keepdim=True)
            orthogonal = extra + (mass - 1) * projection
        return self._in_region(self.scale * orthogonal).to(text.dtype)


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
        if any(b.replaces_text for b in live) and not _plain_cross_attention(
            self.inner, attn, hidden_states, encoder_hidden_states, attention_mask
        ):
            names = ", ".join(sorted({b.name for b in live if b.replaces_text}))
            raise NotImplementedError(
                f"{names} needs diffusers' plain SDPA attention processors (it makes the text attention anew); "
                f"this layer runs {type(self.inner).__name__}"
            )
        if live and _plain_cross_attention(self.inner, attn, hidden_states, encoder_hidden_states, attention_mask):
            return self._joint(attn, hidden_states, encoder_hidden_states, live)  # type: ignore[arg-type]
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if not live:
            return out
        if any(b.needs_text for b in live):
            raise NotImplementedError(
                f"{', '.join(sorted({b.name for b in live if b.needs_text}))} needs diffusers' plain SDPA attention "
                f"processors (it reads the text attention's output); this layer runs {type(self.inner).__name__}"
            )
        if hidden_states.ndim != 3 or attn.spatial_norm is not None:
            raise NotImplementedError(
                "attention branches support (batch, tokens, channels) inputs without spatial norm"
            )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = _heads(attn.to_q(hidden_states), attn)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        # The output projection is linear: the branches' sum is projected on its own (no bias) and added. Its weight
        # is read outside the layer's call, so in the layer's compute dtype (a layer kept in fp8 holds 8 bits here).
        weight = attn.to_out[0].weight.to(out.dtype)
        return out + F.linear(_branch_sum(query, None, live, attn), weight) / attn.rescale_output_factor

    def _joint(
        self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, live: list[AttentionBranch]
    ) -> torch.Tensor:
        """Text attention and branches from one query projection, summed before one output projection (the
        IP-Adapter formulation itself) — for the plain SDPA processors, whose steps this repeats."""
        if hasattr(attn, "to_kv"):  # fused projections (sdxl_control.protocol.fast)
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query = _heads(attn.to_q(hidden_states), attn)
        text = F.scaled_dot_product_attention(query, _heads(key, attn), _heads(value, attn), dropout_p=0.0)
        batch, width = hidden_states.shape[0], query.shape[1] * query.shape[-1]
        text = text.transpose(1, 2).reshape(batch, -1, width).to(query.dtype)
        kinds: dict[type[AttentionBranch], list[AttentionBranch]] = {}
        for branch in live:
            if branch.replaces_text:
                kinds.setdefault(type(branch), []).append(branch)
        for kind, group in kinds.items():
            text = kind.replace_text(group, query, text, attn)
        adding = [b for b in live if not b.replaces_text]
        mixed = text + _branch_sum(query, text, adding, attn) if adding else text
        return attn.to_out[1](attn.to_out[0](mixed)) / attn.rescale_output_factor


def _heads(x: torch.Tensor, attn: Any) -> torch.Tensor:
    """(batch, tokens, width) -> (batch, heads, tokens, head_dim)."""
    batch, width = x.shape[0], x.shape[-1]
    return x.view(batch, -1, attn.heads, width // attn.heads).transpose(1, 2)


def _branch_sum(query: torch.Tensor, text: torch.Tensor | None, live: list[AttentionBranch], attn: Any) -> torch.Tensor:
    """The live branches' outputs summed, as (batch, tokens, width)."""
    total: torch.Tensor | None = None
    for branch in live:
        extra = branch.output(query, text, attn)
        total = extra if total is None else total + extra
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
