"""PuLID for SDXL: a person's identity as ID tokens that every cross-attention layer attends to, with the part the
prompt already decides projected out (``ortho`` / ``ortho_v2``), so the identity changes little else.

The ID encoder reads, per photo, the raw antelopev2 ArcFace embedding with EVA02-CLIP's unit-length class embedding of
the parsed, FFHQ-aligned face (1280 values for the published files), and five of EVA's hidden token sequences:

* v1 (``pulid_v1.bin``, a pickle read with ``weights_only=True``): ``IDEncoder``, an MLP giving 5 tokens from the
  embeddings and one per hidden sequence — 10. Several photos: the first photo's 10 tokens, then 5 of each other photo
  (all 10 with ``id_mix``), as the reference app combines them.
* v1.1 (``pulid_v1.1.safetensors``): ``IDFormer``, a perceiver giving 32 tokens; several photos are read together.

The two are told apart by their keys. The unconditional side of guidance is the encoder run on all-zero inputs
(not zero tokens). ``mode`` picks the reference's zero-token count (keys and values of zeros: attention sinks) and
orthogonal variant for the version. Weights: ``guozinan/PuLID``; EVA: ``QuanSun/EVA-CLIP``; parsing: facexlib's
BiSeNet; faces: insightface's antelopev2 pack.

Example:
    >>> from sdxl_control.adapters.pulid import PuLID
    >>> PuLID("me.jpg", version="v1", mode="fidelity", scale=0.8)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from ..base.caches import PerModelCache
from ..base.errors import ConditionError, IncompatibleModelError
from ..preprocessors.face import IDENTITY_PACK, Identity, identity_features, pack_need
from ..protocol.attention import AttentionBranch, OrthogonalBranch
from ..protocol.conditions import Condition, Likeness, PrepareContext, Prepared, Stage, Tokens
from ..records.infotext import Infotext, control_unit, model_label
from ..weights.checkpoints import read_checkpoint
from ..weights.hub import resolve_in, resolve_source
from ..weights.inventory import ModelNeed, weights_need
from .ip_adapter import IPPrepared, checkpoint_family, cross_layers
from .perceiver import PerceiverAttention, feed_forward

__all__ = ["PuLID", "IDEncoder", "IDFormer", "read_pulid", "PULID_FILES", "MODES", "REPO"]

REPO = "guozinan/PuLID"
PULID_FILES = {"v1": "pulid_v1.bin", "v1.1": "pulid_v1.1.safetensors"}
# The reference apps' settings per (version, mode): zero tokens appended to the ID tokens, orthogonal variant.
# v1.1's app has no style mode: raising zero_tokens is its way to more editability.
MODES: dict[tuple[str, str], tuple[int, str]] = {
    ("v1", "fidelity"): (8, "ortho_v2"),
    ("v1", "style"): (16, "ortho"),
    ("v1.1", "fidelity"): (20, "ortho_v2"),
}
_ORTHO = ("off", "ortho", "ortho_v2")


def _mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU, Linear (the encoders' mapping blocks)."""
    a, b, c, d = widths
    return nn.Sequential(
        nn.Linear(a, b),
        nn.LayerNorm(b),
        nn.LeakyReLU(),
        nn.Linear(b, c),
        nn.LayerNorm(c),
        nn.LeakyReLU(),
        nn.Linear(c, d),
    )


def _mlp_widths(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    return [state[f"{prefix}.0.weight"].shape[1], state[f"{prefix}.0.weight"].shape[0],
            state[f"{prefix}.3.weight"].shape[0], state[f"{prefix}.6.weight"].shape[0]]  # fmt: skip


class IDEncoder(nn.Module):
    """PuLID v1's ID encoder: ``body`` maps the embeddings to ``tokens`` tokens; ``mapping_i`` (class token) plus the
    mean of ``mapping_patch_i`` (patch tokens) make one more token per EVA hidden sequence. Sizes come from a state
    dict with the published key names (:meth:`fitting`).

    Example:
        >>> IDEncoder.fitting(state)(id_cond, hidden).shape  # doctest: +SKIP
        torch.Size([1, 10, 2048])
    """

    def __init__(self, body: Sequence[int], mapping: Sequence[int], tokens: int = 5, sequences: int = 5) -> None:
        super().__init__()
        self.tokens, self.width = tokens, body[-1] // tokens
        self.body = _mlp(body)
        for i in range(sequences):
            setattr(self, f"mapping_{i}", _mlp(mapping))
            setattr(self, f"mapping_patch_{i}", _mlp(mapping))
        self.sequences = sequences

    @classmethod
    def fitting(cls, state: Mapping[str, torch.Tensor]) -> IDEncoder:
        return cls(_mlp_widths(state, "body"), _mlp_widths(state, "mapping_0"))

    def forward(self, embeds: torch.Tensor, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        tokens = self.body(embeds).reshape(-1, self.tokens, self.width)
        per_sequence = [
            getattr(self, f"mapping_{i}")(h[:, :1])
            + getattr(self, f"mapping_patch_{i}")(h[:, 1:]).mean(1, keepdim=True)
            for i, h in enumerate(hidden)
        ]
        return torch.cat([tokens, *per_sequence], dim=1)


class IDFormer(nn.Module):
    """PuLID v1.1's ID encoder: 32 latent queries plus 5 tokens per photo's embeddings attend, two layers per EVA hidden
    sequence, to those tokens and the mapped sequence; the 32 queries, projected, are the ID tokens. Sizes come from a
    state dict with the published key names (:meth:`fitting`).

    Example:
        >>> IDFormer.fitting(state)(id_cond, hidden).shape  # doctest: +SKIP
        torch.Size([1, 32, 2048])
    """

    def __init__(self, width: int, heads: int, depth: int, queries: int, output: int, embedding: Sequence[int],
                 mapping: Sequence[int], id_tokens: int = 5) -> None:  # fmt: skip
        super().__init__()
        self.width, self.id_tokens, self.queries = width, id_tokens, queries
        self.per_sequence = depth // 5
        self.latents = nn.Parameter(torch.zeros(1, queries, width))
        self.proj_out = nn.Parameter(torch.zeros(width, output))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(width, heads), feed_forward(width)]) for _ in range(depth)
        )
        for i in range(5):
            setattr(self, f"mapping_{i}", _mlp(mapping))
        self.id_embedding_mapping = _mlp(embedding)

    @classmethod
    def fitting(cls, state: Mapping[str, torch.Tensor]) -> IDFormer:
        _, queries, width = state["latents"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
        return cls(width, state["layers.0.0.to_q.weight"].shape[0] // 64, depth, queries, state["proj_out"].shape[1],
                   _mlp_widths(state, "id_embedding_mapping"), _mlp_widths(state, "mapping_0"))  # fmt: skip

    def forward(self, embeds: torch.Tensor, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        photos = embeds.shape[1] if embeds.ndim == 3 else 1
        latents = self.latents.repeat(embeds.shape[0], 1, 1)
        tokens = self.id_embedding_mapping(embeds).reshape(-1, self.id_tokens * photos, self.width)
        latents = torch.cat([latents, tokens], dim=1)
        for i in range(5):
            context = torch.cat([tokens, getattr(self, f"mapping_{i}")(hidden[i])], dim=1)
            for layer in range(i * self.per_sequence, (i + 1) * self.per_sequence):
                pair: Any = self.layers[layer]
                latents = pair[0](context, latents) + latents
                latents = pair[1](latents) + latents
        return latents[:, : self.queries] @ self.proj_out


@dataclass(frozen=True)
class LoadedPuLID:
    """A PuLID checkpoint ready: its version, the ID encoder (float32, as the reference runs it) and the attention
    weights renamed to the IP-Adapter naming (``<i>.to_k_ip.weight``), float32 too."""

    version: str
    encoder: nn.Module
    weights: Mapping[str, torch.Tensor]


def read_pulid(path: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(version, ID encoder state, attention state) of a PuLID checkpoint; another method's file is named as such."""
    state = read_checkpoint(path)
    family = checkpoint_family(state) if isinstance(state, dict) else "unknown"
    if family != "PuLID":
        what = f"holds {family} weights" if family != "unknown" else "is not a PuLID checkpoint"
        raise IncompatibleModelError(f"{path} {what}, not PuLID's (id_adapter.* and id_adapter_attn_layers.* keys)")
    encoder = {k.removeprefix("id_adapter."): v for k, v in state.items() if k.startswith("id_adapter.")}
    attention = {k.removeprefix("id_adapter_attn_layers."): v for k, v in state.items()
                 if k.startswith("id_adapter_attn_layers.")}  # fmt: skip
    if "body.0.weight" in encoder and "mapping_patch_0.0.weight" in encoder:
        return "v1", encoder, attention
    if "latents" in encoder and "proj_out" in encoder and "layers.0.0.to_q.weight" in encoder:
        return "v1.1", encoder, attention
    raise IncompatibleModelError(f"{path}: its id_adapter is neither PuLID v1's IDEncoder nor v1.1's IDFormer")


_LOADED: PerModelCache[LoadedPuLID] = PerModelCache(size=2)


def load_pulid(path: Path, unet: Any, device: torch.device) -> LoadedPuLID:
    """Read, check and place a PuLID checkpoint for ``unet`` (kept per process while the file is unchanged)."""
    return _LOADED.get(unet, path, (str(device),), lambda: _build(path, unet, device))


def _build(path: Path, unet: Any, device: torch.device) -> LoadedPuLID:
    version, encoder_state, attention = read_pulid(path)
    layers = cross_layers(unet)
    found = sorted(int(k.split(".")[0]) for k in attention if k.endswith("id_to_k.weight"))
    if found != [2 * n + 1 for n in range(len(layers))]:
        raise IncompatibleModelError(
            f"{path} has ID projections for {len(found)} attention layers, this UNet has {len(layers)} "
            "cross-attention layers (an SDXL UNet has 70)"
        )
    width = attention["1.id_to_k.weight"].shape[1]
    if width != unet.config.cross_attention_dim:
        raise IncompatibleModelError(
            f"{path}: its ID tokens are {width}-wide, this UNet's cross-attention takes "
            f"{unet.config.cross_attention_dim}"
        )
    encoder = (IDEncoder if version == "v1" else IDFormer).fitting(encoder_state)
    try:
        encoder.load_state_dict(encoder_state, strict=True)
    except RuntimeError as exc:
        raise IncompatibleModelError(f"{path}: its {version} ID encoder does not load ({str(exc)[:300]})") from None
    weights = {k.replace("id_to_k", "to_k_ip").replace("id_to_v", "to_v_ip"): v.to(device, torch.float32)
               for k, v in attention.items()}  # fmt: skip
    return LoadedPuLID(version, encoder.to(device).eval().requires_grad_(False), weights)


@dataclass(frozen=True)
class PuLID(Condition):
    """PuLID with one or several photos of a person, or a saved identity (:func:`~sdxl_control.preprocessors.face.
    save_identity` with ``pulid=True``).

    ``version`` picks the published file in ``source`` (``"v1"``, best on SDXL-Lightning 4-step; ``"v1.1"``, for other
    bases; default v1.1); with ``weights=`` a file's own keys tell, and a ``version`` that disagrees is an error.
    ``mode`` is ``"fidelity"`` or ``"style"`` (v1 only), the reference's zero-token count and orthogonal variant;
    ``zero_tokens`` and ``ortho`` (``"off"``, ``"ortho"``, ``"ortho_v2"``) override them. ``scale`` is the reference's
    id_scale (0.8). ``id_mix`` (v1) keeps all tokens of the second and later photos. ``eva`` is the EVA-CLIP repo or
    file, ``parsing`` the folder holding facexlib's ``parsing_bisenet.pth`` (default: facexlib's own). ``mask``
    limits the identity to a region (white = here), which the reference cannot.

    Example:
        >>> PuLID("me.jpg", version="v1", scale=0.8)  # doctest: +SKIP
        >>> PuLID(["me1.jpg", "me2.jpg"], mode="fidelity", zero_tokens=30)  # doctest: +SKIP
    """

    faces: Any = None
    identity: str | None = None
    version: Literal["v1", "v1.1"] | None = None
    mode: Literal["fidelity", "style"] = "fidelity"
    zero_tokens: int | None = None
    ortho: Literal["off", "ortho", "ortho_v2"] | None = None
    id_mix: bool = False
    mask: Any = None
    source: str = REPO
    weights: str | None = None
    eva: str | None = None
    parsing: str | None = None
    face_pack: str = IDENTITY_PACK
    face_root: str = "~/.insightface"
    scale: float = field(default=0.8, kw_only=True)

    kind: ClassVar[str] = "pulid"
    supported_stages: ClassVar[Stage] = Stage.BASE
    unsupported_reason: ClassVar[str] = "PuLID's ID projections are trained for the base UNet's cross-attention"
    path_fields: ClassVar[tuple[str, ...]] = (
        "faces", "identity", "mask", "source", "weights", "eva", "parsing", "face_pack", "face_root",
    )  # fmt: skip
    model_fields: ClassVar[Mapping[str, str]] = {"weights": "pulid", "face_pack": "insightface"}
    aligned_fields: ClassVar[tuple[str, ...]] = ("mask",)

    def likeness(self) -> Likeness:
        return Likeness(self.faces, self.identity, self.mask)

    def infotext(self) -> Infotext:
        checkpoint = self._checkpoint()
        return Infotext(units=(control_unit("ip-adapter_pulid", model_label(checkpoint, checkpoint), self.scale,
                                            self.window),))  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.faces is None) == (self.identity is None):
            raise ConditionError("PuLID takes face photos or a saved identity file (one of the two)")
        if self.zero_tokens is not None and self.zero_tokens < 0:
            raise ConditionError(f"zero_tokens must be >= 0, got {self.zero_tokens}")

    def model_needs(self) -> tuple[ModelNeed, ...]:
        from ..preprocessors.eva_clip import EVA_FILE, EVA_REPO
        from ..preprocessors.face_parsing import PARSING_FILE, PARSING_URL, default_parsing_folder

        weights = (weights_need("PuLID", self.weights, ["*.bin", "*.safetensors"]) if self.weights
                   else weights_need("PuLID", self.source, [PULID_FILES[self.version or "v1.1"]]))  # fmt: skip
        if self.identity is not None:
            return (weights,)
        parsing = str(self.parsing or default_parsing_folder())
        return (
            weights,
            weights_need("EVA02-CLIP-L-336", self.eva or EVA_REPO, [EVA_FILE]),
            weights_need("face parsing (facexlib BiSeNet)", parsing, [PARSING_FILE],
                         how=f"download {PARSING_URL} into {parsing}"),
            pack_need(self.face_pack, self.face_root),
        )  # fmt: skip

    def _checkpoint(self) -> Path:
        if self.weights is not None:
            return resolve_source(self.weights, allow=["*.bin", "*.safetensors"], allow_pickle=True)
        return resolve_in(self.source, PULID_FILES[self.version or "v1.1"])

    def settings_for(self, version: str) -> tuple[int, str]:
        """(zero tokens, orthogonal variant) this condition runs with on a checkpoint of ``version``."""
        if self.zero_tokens is not None and self.ortho is not None:
            return self.zero_tokens, self.ortho
        if (version, self.mode) not in MODES:
            raise ConditionError(
                f"PuLID {version} has no {self.mode!r} mode in the reference; use 'fidelity' and raise zero_tokens "
                "(default 20) for more editability"
            )
        zeros, ortho = MODES[(version, self.mode)]
        return (zeros if self.zero_tokens is None else self.zero_tokens), (ortho if self.ortho is None else self.ortho)

    def _identity(self, ctx: PrepareContext) -> Identity:
        if self.identity is not None:
            saved = Identity.load(self.identity)
            if saved.eva_cls is None:
                raise ConditionError(
                    f"{self.identity} holds no EVA-CLIP face features, which PuLID needs: save it with "
                    "save_identity(..., pulid=True)"
                )
            return saved
        return identity_features(self.faces, self.face_pack, self.face_root, vision=True, eva=self.eva,
                                 parsing=self.parsing, device=ctx.device)  # fmt: skip

    def prepare(self, ctx: PrepareContext) -> Prepared:
        unet = ctx.unet(Stage.BASE)
        path = self._checkpoint()
        loaded = load_pulid(path, unet, ctx.device)
        if self.version is not None and loaded.version != self.version:
            raise IncompatibleModelError(
                f"{path} is a PuLID {loaded.version} checkpoint, but version={self.version!r} was asked: pass "
                f"version={loaded.version!r} or the {PULID_FILES[self.version]} file"
            )
        zeros, ortho = self.settings_for(loaded.version)
        identity = self._identity(ctx)
        positive, negative = _id_tokens(loaded, identity, self.id_mix, ctx)
        if zeros:
            # Zero tokens give zero keys and values: attention sinks that soak up the ID attention.
            pad = positive.new_zeros(1, zeros, positive.shape[-1])
            positive, negative = torch.cat([positive, pad], 1), torch.cat([negative, pad], 1)
        tokens = Tokens(positive, negative).batched(ctx.batch_size, ctx.guided)
        from .ip_adapter import region_mask

        mask = region_mask(self.mask, ctx) if self.mask is not None else None
        scales = dict.fromkeys(cross_layers(unet), float(self.scale))
        kind = partial(OrthogonalBranch, variant=ortho) if ortho != "off" else AttentionBranch
        return IPPrepared(f"pulid-{loaded.version}", loaded.weights, tokens, scales, mask, branch=kind)


@torch.no_grad()
def _id_tokens(loaded: LoadedPuLID, identity: Identity, id_mix: bool, ctx: PrepareContext) -> tuple[torch.Tensor, ...]:
    """(conditional, unconditional) ID tokens (1, n, width) in float32, several photos combined as the reference
    combines them for the version."""
    assert identity.eva_cls is not None and identity.eva_hidden is not None
    device = ctx.device
    embeds = torch.cat([torch.from_numpy(np.asarray(identity.embeddings, np.float32)),
                        torch.from_numpy(np.asarray(identity.eva_cls, np.float32))], dim=-1).to(device)  # fmt: skip
    hidden = torch.from_numpy(np.asarray(identity.eva_hidden, np.float32)).to(device)  # (photos, 5, tokens, width)
    encoder = loaded.encoder
    zero_embeds, zero_hidden = torch.zeros_like(embeds[:1]), [torch.zeros_like(h[None]) for h in hidden[0]]
    negative = encoder(zero_embeds, zero_hidden)
    if loaded.version == "v1.1":
        per_sequence = [torch.cat(list(hidden[:, i]), dim=0)[None] for i in range(hidden.shape[1])]
        return encoder(embeds[None], per_sequence), negative
    photos = [encoder(embeds[i : i + 1], [h[None] for h in hidden[i]]) for i in range(len(embeds))]
    keep = [photos[0]] + [p if id_mix else p[:, :5] for p in photos[1:]]
    keep_negative = [negative] + [negative if id_mix else negative[:, :5] for _ in photos[1:]]
    return torch.cat(keep, dim=1), torch.cat(keep_negative, dim=1)
