"""PhotoMaker v1 and v2: a person put into the prompt itself. The class word written right before the trigger
("a photo of a man img") is repeated once per ID token, and those positions of the prompt embeddings are fused with
the person's ID embeddings, so the identity follows the text; the steps before ``start_merge`` use the prompt without
the trigger, as the reference does, so the layout settles first.

* v1 (``TencentARC/PhotoMaker``, ``photomaker-v1.bin``): one ID token per photo — the CLIP ViT-L/14 class embedding
  through two projections (one per text encoder's width).
* v2 (``TencentARC/PhotoMaker-V2``, ``photomaker-v2.bin``): two per photo — the raw ArcFace embedding (buffalo_l)
  through a Q-Former that reads the CLIP patch tokens.

Both files hold an ID encoder and a LoRA for every attention layer of the UNet (old diffusers processor names), fused
through the weight channel while the condition acts and removed bit-exactly. CLIP sees the whole photo (resized and
centre-cropped), as in the reference; the face should fill most of it.

Example:
    >>> from sdxl_control.adapters.photomaker import PhotoMaker
    >>> gen.generate("a photo of a man img, in a spacesuit", conditions=[PhotoMaker(["me1.jpg", "me2.jpg"])])  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from ..base.caches import PerModelCache
from ..base.errors import CheckpointError, ConditionError, IncompatibleModelError
from ..preprocessors import load_image
from ..preprocessors.face import DEFAULT_PACK, Identity, identity_features, pack_need
from ..protocol.conditions import (
    Condition,
    Likeness,
    PrepareContext,
    Prepared,
    PromptEdit,
    PromptTokens,
    Stage,
    Window,
    recorded_before,
)
from ..protocol.emphasis import CHUNK_TOKENS, split_chunks
from ..records.infotext import Infotext, model_label, safe_name
from ..weights.checkpoints import read_checkpoint
from ..weights.conversion import processor_lora_deltas
from ..weights.hub import resolve_in, resolve_source
from ..weights.inventory import ModelNeed, weights_need
from ..weights.patches import WeightDelta
from .ip_adapter import checkpoint_family
from .perceiver import PerceiverAttention, feed_forward

__all__ = ["PhotoMaker", "PhotoMakerEncoder", "read_photomaker", "REPOS", "TOKENS_PER_PHOTO"]

REPOS = {"v1": ("TencentARC/PhotoMaker", "photomaker-v1.bin"), "v2": ("TencentARC/PhotoMaker-V2", "photomaker-v2.bin")}
# ID tokens per photo. The reference's HEAD sets 2 for both versions, which breaks v1 ("Sizes of tensors must match",
# TencentARC/PhotoMaker#187); v1 was written for one (commit ccd1f7c).
TOKENS_PER_PHOTO = {"v1": 1, "v2": 2}
# Head widths the published files do not record: CLIP ViT-L/14's 64, the Q-Former's 128 (heads = width // 128).
CLIP_HEAD_WIDTH = 64
QFORMER_HEAD_WIDTH = 128
# The reference apps turn the style-strength slider (default 20 %) into steps so, capped at 30.
MAX_MERGE_STEP = 30


class _MLP(nn.Module):
    def __init__(self, width_in: int, width_out: int, hidden: int, residual: bool) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(width_in)
        self.fc1, self.fc2 = nn.Linear(width_in, hidden), nn.Linear(hidden, width_out)
        self.act_fn, self.residual = nn.GELU(), residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return out + x if self.residual else out


class FuseModule(nn.Module):
    """Fuses prompt rows with ID rows (both (n, width)): ``LN(MLP2(MLP1([prompt, id]) + prompt))``, MLP2 residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp1 = _MLP(2 * width, width, width, residual=False)
        self.mlp2 = _MLP(width, width, width, residual=True)
        self.layer_norm = nn.LayerNorm(width)

    def forward(self, prompt: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        fused = self.mlp1(torch.cat([prompt, ids], dim=-1)) + prompt
        return self.layer_norm(self.mlp2(fused))


class _QFormer(nn.Module):
    """v2: tokens from the face embedding (``token_proj``, ``token_norm``) refined by a perceiver over the photo's CLIP
    patch tokens, added back to them."""

    def __init__(self, face: int, ratio: int, width: int, tokens: int, clip_width: int, depth: int) -> None:
        super().__init__()
        self.tokens, self.width = tokens, width
        self.token_proj = nn.Sequential(
            nn.Linear(face, face * ratio), nn.GELU(), nn.Linear(face * ratio, width * tokens)
        )
        self.token_norm = nn.LayerNorm(width)
        resampler = nn.Module()
        resampler.proj_in = nn.Linear(clip_width, width)
        resampler.proj_out = nn.Linear(width, width)
        resampler.norm_out = nn.LayerNorm(width)
        # width // 128 heads of 128, as model_v2.py; under 128 (tiny test models only) one head of the whole width.
        heads = max(1, width // QFORMER_HEAD_WIDTH)
        resampler.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(width, heads, width // heads), feed_forward(width)]) for _ in range(depth)
        )
        self.perceiver_resampler = resampler

    def forward(self, faces: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        tokens = self.token_norm(self.token_proj(faces).reshape(-1, self.tokens, self.width))
        resampler: Any = self.perceiver_resampler
        context, latents = resampler.proj_in(patches), tokens
        for attention, ff in resampler.layers:
            latents = attention(context, latents) + latents
            latents = ff(latents) + latents
        return tokens + resampler.norm_out(resampler.proj_out(latents))


class PhotoMakerEncoder(nn.Module):
    """PhotoMaker's ID encoder: a CLIP vision tower (transformers' ``CLIPVisionModelWithProjection``), the second
    projection (v1), the Q-Former (v2) and the fuse module, sized from a state dict with the published key names.

    Example:
        >>> encoder = PhotoMakerEncoder.fitting(state)            # doctest: +SKIP
        >>> rows = encoder.id_rows(pixels, faces)                  # (photos * tokens, width)  # doctest: +SKIP
    """

    def __init__(self, clip: Any, width_2: int, qformer: _QFormer | None) -> None:
        super().__init__()
        self.clip = clip
        clip_width = clip.config.hidden_size
        self.visual_projection_2 = nn.Linear(clip_width, width_2, bias=False)
        self.fuse_module = FuseModule(clip.config.projection_dim + width_2)
        self.qformer_perceiver = qformer

    @property
    def version(self) -> str:
        return "v1" if self.qformer_perceiver is None else "v2"

    @classmethod
    def fitting(cls, state: Mapping[str, torch.Tensor]) -> PhotoMakerEncoder:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        width = state["vision_model.embeddings.class_embedding"].shape[0]
        patch = state["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
        config = CLIPVisionConfig(
            hidden_size=width, intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_attention_heads=width // CLIP_HEAD_WIDTH, patch_size=patch,
            num_hidden_layers=1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers.")),
            image_size=math.isqrt(positions - 1) * patch, projection_dim=state["visual_projection.weight"].shape[0],
        )  # fmt: skip
        qformer = None
        if "qformer_perceiver.token_proj.0.weight" in state:
            proj0, proj2 = (
                state["qformer_perceiver.token_proj.0.weight"],
                state["qformer_perceiver.token_proj.2.weight"],
            )
            qwidth = state["qformer_perceiver.token_norm.weight"].shape[0]
            depth = 1 + max(
                int(k.split(".")[3]) for k in state if k.startswith("qformer_perceiver.perceiver_resampler.layers.")
            )
            qformer = _QFormer(
                proj0.shape[1], proj0.shape[0] // proj0.shape[1], qwidth, proj2.shape[0] // qwidth, width, depth
            )
        return cls(CLIPVisionModelWithProjection(config), state["visual_projection_2.weight"].shape[0], qformer)

    def load_published(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the published ``id_encoder`` state dict (``vision_model.*`` and ``visual_projection`` go to CLIP)."""
        clip_keys = ("vision_model.", "visual_projection.")
        clip = {k: v for k, v in state.items() if k.startswith(clip_keys) and not k.endswith("position_ids")}
        rest = {k: v for k, v in state.items() if not k.startswith(clip_keys)}
        self.clip.load_state_dict(clip, strict=True)
        report = super().load_state_dict(rest, strict=False)
        missing = [k for k in report.missing_keys if not k.startswith("clip.")]
        if missing or report.unexpected_keys:
            raise IncompatibleModelError(f"missing {missing[:3]}, unexpected {report.unexpected_keys[:3]}")

    def id_rows(self, pixels: torch.Tensor, faces: torch.Tensor | None) -> torch.Tensor:
        """The ID embeddings to fuse, (photos * tokens per photo, width), photo by photo."""
        vision = self.clip.vision_model(pixels)
        if self.qformer_perceiver is None:
            pooled = vision.pooler_output
            return torch.cat([self.clip.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)
        if faces is None:
            raise ConditionError("PhotoMaker v2 needs the face embedding of every photo")
        rows = self.qformer_perceiver(faces, vision.last_hidden_state)
        return rows.reshape(-1, rows.shape[-1])


def read_photomaker(path: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(version, ID encoder state, LoRA state) of a PhotoMaker file: a pickled ``{"id_encoder", "lora_weights"}``
    dict or the flat safetensors form (``id_encoder.*``, ``lora_weights.*``). Tensors come out in float32 (the
    published files mix float32 and bfloat16)."""
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict")
    if "id_encoder" not in state:  # the flat safetensors form
        nested: dict[str, dict[str, Any]] = {"id_encoder": {}, "lora_weights": {}}
        for key, value in state.items():
            head, _, rest = str(key).partition(".")
            if head in nested:
                nested[head][rest] = value
        state = nested if nested["id_encoder"] else state
    family = checkpoint_family(state)
    if family != "PhotoMaker" or not state.get("id_encoder") or not state.get("lora_weights"):
        what = (
            f"holds {family} weights" if family not in ("unknown", "PhotoMaker") else "is not a PhotoMaker checkpoint"
        )
        raise IncompatibleModelError(f"{path} {what}, not PhotoMaker's (id_encoder and lora_weights)")
    encoder = {k: v.float() for k, v in state["id_encoder"].items()}
    lora = {k: v.float() for k, v in state["lora_weights"].items()}
    return ("v2" if "qformer_perceiver.token_proj.0.weight" in encoder else "v1"), encoder, lora


@dataclass(frozen=True)
class _Loaded:
    encoder: PhotoMakerEncoder
    lora: Mapping[str, torch.Tensor]


_LOADED: PerModelCache[_Loaded] = PerModelCache(size=2)


def _load(path: Path, unet: Any, ctx: PrepareContext) -> _Loaded:
    return _LOADED.get(unet, path, (str(ctx.device), ctx.dtype), lambda: _build(path, unet, ctx))


def _build(path: Path, unet: Any, ctx: PrepareContext) -> _Loaded:
    _, state, lora = read_photomaker(path)
    width = state["vision_model.embeddings.class_embedding"].shape[0]
    if width < CLIP_HEAD_WIDTH or width % CLIP_HEAD_WIDTH:
        raise IncompatibleModelError(
            f"{path}: its image encoder is {width}-wide, not a CLIP vision model (whose width is a multiple of its "
            f"{CLIP_HEAD_WIDTH}-wide heads)"
        )
    try:
        encoder = PhotoMakerEncoder.fitting(state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise IncompatibleModelError(f"{path}: not PhotoMaker's ID encoder ({type(exc).__name__}: {exc})") from None
    try:
        encoder.load_published(state)
    except (IncompatibleModelError, RuntimeError) as exc:
        raise IncompatibleModelError(f"{path}: its ID encoder does not load ({str(exc)[:300]})") from None
    width = encoder.fuse_module.layer_norm.normalized_shape[0]
    if width != unet.config.cross_attention_dim:
        raise IncompatibleModelError(
            f"{path}: its ID embeddings are {width}-wide, this UNet's prompt embeddings "
            f"{unet.config.cross_attention_dim}"
        )
    # As the reference, the encoder runs in the UNet's precision; the LoRA's products are taken on the device.
    encoder = encoder.to(ctx.device, ctx.dtype).eval().requires_grad_(False)
    return _Loaded(encoder, {k: v.to(ctx.device) for k, v in lora.items()})


def _tokens_with_trigger(tokenizer: Any, prompt: str, trigger: str, marker: int, cut: bool = True) -> list[int]:
    """The prompt's ids as the tokenizer gives them with ``trigger`` added as a special token — text cut at every
    occurrence of the trigger (also inside a word: "imgs" is the trigger and "s"), ``marker`` in its place — between
    the start and end tokens; with ``cut``, padded or truncated to the tokenizer's length, as the reference
    tokenises."""
    content: list[int] = []
    for i, piece in enumerate(prompt.split(trigger)):
        if i:
            content.append(marker)
        content += tokenizer(piece, add_special_tokens=False, verbose=False).input_ids
    length = tokenizer.model_max_length
    if not cut:
        return [tokenizer.bos_token_id, *content, tokenizer.eos_token_id]
    ids = [tokenizer.bos_token_id, *content[: length - 2], tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (length - len(ids))


def _windows(tokenizer: Any, ids: list[int], marks: list[bool], trigger: str) -> PromptTokens:
    """A long prompt's content ids (the class word repeated) in 75-token chunks, as every long prompt is cut, each in
    its own window; the marks follow their tokens. The copies of the class word must share a chunk."""
    chunks = split_chunks(list(zip(ids, marks, strict=True)), tokenizer.get_vocab().get(",</w>"))
    held = [any(m for _, m in chunk) for chunk in chunks]
    if sum(held) != 1:
        raise ConditionError(
            f"the class word's copies before {trigger!r} fall across two 75-token chunks of the prompt; add or remove a "
            "few words before it"
        )
    window_ids: list[int] = []
    window_marks: list[bool] = []
    for chunk in chunks:
        padding = CHUNK_TOKENS - len(chunk)
        window_ids += [tokenizer.bos_token_id, *(t for t, _ in chunk), tokenizer.eos_token_id]
        window_ids += [tokenizer.pad_token_id] * padding
        window_marks += [False, *(m for _, m in chunk), False] + [False] * padding
    return PromptTokens(tuple(window_ids), tuple(window_marks))


class _TriggerRemoved(PromptEdit):
    """The prompt without the trigger word (the text the reference encodes before ``start_merge``)."""

    def __init__(self, trigger: str, window: Window | None = None) -> None:
        super().__init__(window or Window())
        self.trigger = trigger

    def text(self, prompt: str, tokenizer: Any) -> str:
        count = prompt.count(self.trigger)
        if count != 1:
            raise ConditionError(_trigger_message(self.trigger, prompt, count))
        # The reference decodes the ids without the trigger; CLIP reads the text without it the same way.
        return prompt.replace(self.trigger, " ", 1)


class _PhotoMakerEdit(_TriggerRemoved):
    """In ``window``: the class word repeated once per ID token, and the identity fused into those positions, at
    ``strength`` (1: the fused embeddings themselves, as the reference; less: that far from the class word's)."""

    rewrites_tokens: ClassVar[bool] = True

    def __init__(self, trigger: str, window: Window, rows: torch.Tensor, fuse: FuseModule, strength: float) -> None:
        super().__init__(trigger, window)
        self.rows, self.fuse, self.strength = rows, fuse, strength

    def tokens(self, prompt: str, tokenizer: Any, encoder: int, *, whole: bool = False) -> PromptTokens:
        marker = -1  # no vocabulary id: the trigger never reaches the text encoder
        length = tokenizer.model_max_length
        content = _tokens_with_trigger(tokenizer, prompt, self.trigger, marker, cut=not whole)
        # Within one window the reference's layout (cut to the window after the class word is repeated); beyond it,
        # with whole, the prompt's chunks as every long prompt is read, the copies in one of them.
        reference = not whole or len(content) <= length
        clean: list[int] = []
        classes = []
        for token in content:
            if token == marker:
                classes.append(len(clean) - 1)  # the token right before the trigger
            else:
                clean.append(token)
        if not classes and prompt.count(self.trigger) == 1:
            raise ConditionError(
                f"the prompt is too long: {self.trigger!r} comes after CLIP's {length}-token limit; put the class word "
                "and trigger earlier, or read long prompts in chunks"
            )
        if len(classes) != 1:
            raise ConditionError(_trigger_message(self.trigger, prompt, len(classes)))
        index, count = classes[0], self.rows.shape[0]
        word = tokenizer.convert_ids_to_tokens(clean[index]).removesuffix("</w>") if index >= 1 else ""
        if not word.isalnum():
            raise ConditionError(
                f"PhotoMaker needs a class word right before {self.trigger!r}, as in 'a photo of a man "
                f"{self.trigger}'; the prompt has {word or 'nothing'!r} there: {prompt!r}"
            )
        ids = clean[:index] + [clean[index]] * count + clean[index + 1 :]
        marks = [index <= i < index + count for i in range(len(ids))]
        if reference and index + count <= length:
            ids = ids[:length] + [tokenizer.pad_token_id] * (length - len(ids))
            return PromptTokens(tuple(ids), tuple(marks[:length] + [False] * (length - len(marks))))
        if not whole:
            raise ConditionError(
                f"the prompt is too long: {self.trigger!r} comes after CLIP's {length}-token limit once its class word "
                f"is repeated {count} times; put the class word and trigger earlier, or read long prompts in chunks"
            )
        return _windows(tokenizer, ids[1:-1], marks[1:-1], self.trigger)

    def embed(self, hidden: torch.Tensor, tokens: Sequence[PromptTokens]) -> torch.Tensor:
        # The reference keeps the last tokenizer's positions; found on the host, so nothing is read from the device.
        positions = torch.tensor([i for i, m in enumerate(tokens[-1].marked) if m], device=hidden.device)
        with torch.no_grad():
            fused = self.fuse(hidden[0].index_select(0, positions).to(self.rows.dtype), self.rows)
        fused = fused.to(hidden.dtype)
        if self.strength != 1.0:
            fused = torch.lerp(hidden[0, positions], fused, self.strength)
        out = hidden.clone()
        out[0, positions] = fused
        return out


def _trigger_message(trigger: str, prompt: str, count: int) -> str:
    found = "does not contain" if count == 0 else f"contains {count} times"
    return (
        f"PhotoMaker needs its trigger word exactly once, right after the class word, as in 'a photo of a man "
        f"{trigger}'; the prompt {found} {trigger!r}: {prompt!r}"
    )


@dataclass(frozen=True, eq=False)
class PhotoMakerPrepared(Prepared):
    """PhotoMaker ready: its LoRA deltas (the weight channel) and the prompt edit per stage (the refiner only loses
    the trigger word).

    Example:
        >>> PhotoMaker("me.jpg").prepare(ctx).prompt_edit(Stage.BASE).window  # doctest: +SKIP
        Window(start=0.35, end=1.0)
    """

    deltas: Mapping[str, WeightDelta]
    edit: PromptEdit
    trigger: str

    def weight_deltas(self, stage: Stage) -> Mapping[str, Mapping[str, WeightDelta]]:
        return {"unet": self.deltas} if stage == Stage.BASE and self.deltas else {}

    def prompt_edit(self, stage: Stage) -> PromptEdit | None:
        return self.edit if stage == Stage.BASE else _TriggerRemoved(self.trigger)


@dataclass(frozen=True)
class PhotoMaker(Condition):
    """PhotoMaker with one or several photos of a person (or a saved identity), for prompts that name them with the
    trigger after the class word: ``"a photo of a man img, ..."``.

    ``version`` picks the published file (``"v2"``, the default, or ``"v1"``; ``weights=`` a file elsewhere, whose
    keys tell its version). ``start_merge`` is the reference's style strength: that fraction of the steps (capped at
    30 steps) uses the prompt without the identity, so more of it gives more of the prompt's style and less likeness
    (default 0.2, as the reference's app). ``scale`` is how far the fused identity embeddings replace the class
    word's (1, as the reference), ``lora_scale`` weighs the checkpoint's LoRA (1, as the reference fuses it); both act
    only at the steps ``window`` holds, and with ``scale`` 0 nothing acts. v2 reads each photo's face embedding
    (insightface ``buffalo_l``, ``face_pack``). ``identity`` takes a file from ``save_identity(..., photomaker=True)``.

    Example:
        >>> PhotoMaker(["me1.jpg", "me2.jpg"], start_merge=0.3)  # doctest: +SKIP
    """

    faces: Any = None
    identity: str | None = None
    version: Literal["v1", "v2"] | None = None
    trigger: str = "img"
    start_merge: float = 0.2
    lora_scale: float = 1.0
    weights: str | None = None
    face_pack: str = DEFAULT_PACK
    face_root: str = "~/.insightface"

    kind: ClassVar[str] = "photomaker"
    supported_stages: ClassVar[Stage] = Stage.BASE
    unsupported_reason: ClassVar[str] = (
        "PhotoMaker fuses the identity into both SDXL text encoders' embeddings; the refiner has only one"
    )
    path_fields: ClassVar[tuple[str, ...]] = ("faces", "identity", "weights", "face_pack", "face_root")
    model_fields: ClassVar[Mapping[str, str]] = {"weights": "photomaker", "face_pack": "insightface"}

    def likeness(self) -> Likeness:
        return Likeness(self.faces, self.identity, None)

    def infotext(self) -> Infotext:
        # A1111 has no PhotoMaker; its own item, in the extension's style (no "Model" key, which readers confuse).
        weights = self._weights_file()
        settings = {"Version": self.version or ("v2" if self.weights is None else None), "Trigger": self.trigger,
                    "Start Merge": f"{self.start_merge:g}", "Weight": f"{self.scale:g}",
                    "LoRA Weight": None if self.lora_scale == 1 else f"{self.lora_scale:g}",
                    "Weights": model_label(weights, weights)}  # fmt: skip
        return Infotext(fields={"PhotoMaker": {k: safe_name(str(v)) for k, v in settings.items() if v is not None}})

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.faces is None) == (self.identity is None):
            raise ConditionError("PhotoMaker takes photos or a saved identity file (one of the two)")
        if not self.trigger or self.trigger != self.trigger.strip():
            raise ConditionError(f"the trigger word must be a word without spaces around it, got {self.trigger!r}")
        if not 0.0 <= self.start_merge <= 1.0:
            raise ConditionError(f"start_merge is a fraction of the steps, got {self.start_merge}")

    def model_needs(self) -> tuple[ModelNeed, ...]:
        version = self.version or "v2"
        repo, name = REPOS[version]
        weights = (weights_need("PhotoMaker", self.weights, ["*.bin", "*.safetensors"]) if self.weights
                   else weights_need("PhotoMaker", repo, [name]))  # fmt: skip
        analysed = version == "v2" and self.faces is not None
        return (weights, *([pack_need(self.face_pack, self.face_root)] if analysed else []))

    def _weights_file(self) -> Path:
        if self.weights is not None:
            return resolve_source(self.weights, allow=["*.bin", "*.safetensors"], allow_pickle=True)
        repo, name = REPOS[self.version or "v2"]
        return resolve_in(repo, name)

    def _inputs(self, version: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(CLIP pixels (photos, 3, S, S), face embeddings (photos, 512) or None for v1)."""
        if self.identity is not None:
            saved = Identity.load(self.identity)
            if saved.clip_images is None:
                raise ConditionError(
                    f"{self.identity} holds no photos for CLIP, which PhotoMaker needs: save it with "
                    "save_identity(..., photomaker=True)"
                )
            if version == "v2" and Path(self.face_pack).name != saved.pack:
                raise ConditionError(
                    f"{self.identity} holds {saved.pack} face embeddings; PhotoMaker v2 reads {self.face_pack}'s: save "
                    f"it with save_identity(..., face_pack={self.face_pack!r}, photomaker=True)"
                )
            photos: list[Any] = list(saved.clip_images)
            faces = saved.embeddings if version == "v2" else None
        else:
            photos = list(self.faces) if isinstance(self.faces, (list, tuple)) else [self.faces]
            faces = None
            if version == "v2":
                faces = identity_features(photos, self.face_pack, self.face_root).embeddings
        pixels = clip_pixels(photos, image_size)
        return pixels, None if faces is None else torch.from_numpy(np.asarray(faces, np.float32))

    def prepare(self, ctx: PrepareContext) -> Prepared:
        unet = ctx.unet(Stage.BASE)
        path = self._weights_file()
        loaded = _load(path, unet, ctx)
        version = loaded.encoder.version
        if self.version is not None and version != self.version:
            raise IncompatibleModelError(
                f"{path} is a PhotoMaker {version} checkpoint, but version={self.version!r} was asked: pass "
                f"version={version!r} or the {REPOS[self.version][1]} file"
            )
        pixels, faces = self._inputs(version, loaded.encoder.clip.config.image_size)
        with torch.no_grad():
            rows = loaded.encoder.id_rows(
                pixels.to(ctx.device, ctx.dtype), None if faces is None else faces.to(ctx.device, ctx.dtype)
            )
        # Steps up to and including start_merge's use the plain prompt (the reference switches after it).
        merge = min(int(self.start_merge * ctx.steps), MAX_MERGE_STEP)
        edit: PromptEdit = _TriggerRemoved(self.trigger)
        if merge + 1 < ctx.steps:
            merging = Window((merge + 1) / ctx.steps, 1.0)
            edit = _PhotoMakerEdit(self.trigger, merging, rows, loaded.encoder.fuse_module, self.scale)
        deltas = processor_lora_deltas(loaded.lora, unet, self.lora_scale, path)
        return PhotoMakerPrepared(deltas, edit, self.trigger)

    @classmethod
    def upgrade_settings(cls, settings: Mapping[str, Any], version: str | None) -> dict[str, Any]:
        # Before 0.2.0, scale weighed the LoRA and the identity was always fused whole.
        if not recorded_before(version, "0.2.0") or "lora_scale" in settings:
            return dict(settings)
        return {**settings, "scale": 1.0, "lora_scale": settings.get("scale", 1.0)}


def clip_pixels(photos: Sequence[Any], size: int) -> torch.Tensor:
    """Photos as PhotoMaker's CLIP reads them: ``CLIPImageProcessor`` defaults (shortest side to ``size``, bicubic,
    centre crop, CLIP's mean and std), the whole photo — no face crop."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    images = [load_image(p, "PhotoMaker photo") for p in photos]
    pixels: torch.Tensor = processor(images=images, return_tensors="pt").pixel_values
    return pixels
