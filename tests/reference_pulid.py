"""A transcription of PuLID's reference math (ToTheBeginning/PuLID @ 1aa2fc7), for the equivalence tests.

Written for these tests from the reference's definitions; each part names what it mirrors:

* ``EVAVisionTransformer``: ``eva_clip/eva_vit_model.py`` (``EVAVisionTransformer``, ``Block``, ``Attention``, ``SwiGLU``)
  and ``eva_clip/rope.py`` (``VisionRotaryEmbeddingFast``) in the EVA02-CLIP-L-14-336 configuration (q/k/v projections
  with q and v biases, rotary positions on the patch tokens, SwiGLU with ``ffn_ln``, ``inner_attn_ln``, pre-norm,
  LayerNorm eps 1e-6, no layer scale); ``forward(return_hidden=True)``. The reference drops the checkpoint's rotary
  tables and recomputes them; so does this.
* ``IDEncoder``: ``pulid/encoders.py``; ``IDFormer``: ``pulid/encoders_transformer.py`` (widths from the checkpoint
  instead of the hard-coded 1024 / 1280).
* ``AttnProcessor`` / ``IDAttnProcessor``: ``pulid/attention_processor.py`` (``AttnProcessor2_0``,
  ``IDAttnProcessor2_0``), the module globals ``NUM_ZERO`` / ``ORTHO`` / ``ORTHO_v2`` held by each processor.
* ``id_features``: ``PuLIDPipeline.get_id_embedding`` (``pulid/pipeline.py``, the same in ``pipeline_v1_1.py``) from the
  photo to ``id_cond`` and ``id_vit_hidden``. Alignment is facexlib's ``FaceRestoreHelper.align_warp_face`` on the BGR
  photo, fed the landmarks of insightface's largest face: facexlib's RetinaFace detector (which the product does not
  use, see ``identity_features``) has no weights here.
* ``v1_embedding`` / ``v1_app``: ``get_id_embedding``'s uncond/cond pair and ``app.py``'s combination of photos;
  ``v11_embedding``: ``pipeline_v1_1.get_id_embedding``.
* ``pulid_pipe``: ``PuLIDPipeline.__init__`` / ``hack_unet_attn_layers`` / ``load_pretrain`` on a diffusers SDXL pipeline;
  generation is its ``inference`` (``pipe(..., cross_attention_kwargs={'id_embedding', 'id_scale'})``). v1.1's own
  k-diffusion loop runs the UNet on the positive and the negative inputs separately; the batched pipeline computes the
  same rows.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLPipeline
from torch import nn

from .conftest import as_reference
from .reference_instantid import hidden_size

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- eva_clip ----


def rotate_half(x):
    x = x.reshape(*x.shape[:-1], -1, 2)
    x1, x2 = x.unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).reshape(*x.shape[:-2], -1)


class VisionRotaryEmbeddingFast(nn.Module):
    def __init__(self, dim, pt_seq_len, ft_seq_len=None, theta=10000):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
        ft_seq_len = ft_seq_len or pt_seq_len
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        freqs = torch.einsum("..., f -> ... f", t, freqs)
        freqs = freqs.repeat_interleave(2, dim=-1)  # '... n -> ... (n r)', r=2
        rows = freqs[:, None, :].expand(ft_seq_len, ft_seq_len, -1)
        cols = freqs[None, :, :].expand(ft_seq_len, ft_seq_len, -1)
        freqs = torch.cat([rows, cols], dim=-1)  # broadcat
        self.register_buffer("freqs_cos", freqs.cos().view(-1, freqs.shape[-1]), persistent=False)
        self.register_buffer("freqs_sin", freqs.sin().view(-1, freqs.shape[-1]), persistent=False)

    def forward(self, t):
        return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


def layer_norm(width):
    return nn.LayerNorm(width, eps=1e-6)


class SwiGLU(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.w1, self.w2 = nn.Linear(width, hidden), nn.Linear(width, hidden)
        self.ffn_ln = layer_norm(hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads, rope):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.inner_attn_ln = layer_norm(dim)
        self.proj = nn.Linear(dim, dim)
        self.rope = [rope]  # shared, not a submodule of each block

    def forward(self, x):
        B, N, _ = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        k = F.linear(x, self.k_proj.weight, None).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        v = F.linear(x, self.v_proj.weight, self.v_bias).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        rope = self.rope[0]
        q = torch.cat((q[:, :, :1, :], rope(q[:, :, 1:, :])), -2).type_as(v)
        k = torch.cat((k[:, :, :1, :], rope(k[:, :, 1:, :])), -2).type_as(v)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(self.inner_attn_ln(x))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, rope):
        super().__init__()
        self.norm1, self.norm2 = layer_norm(dim), layer_norm(dim)
        self.attn = Attention(dim, num_heads, rope)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EVAVisionTransformer(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, num_classes, pt_hw_seq_len=16):
        super().__init__()
        self.image_size = img_size
        grid = img_size // patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.rope = VisionRotaryEmbeddingFast(embed_dim // num_heads // 2, pt_hw_seq_len, grid)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, self.rope) for _ in range(depth))
        self.norm = layer_norm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    @classmethod
    def from_checkpoint(cls, state, mlp_ratio=2.6667):
        visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        visual = {k: v for k, v in visual.items() if "freqs_cos" not in k and "freqs_sin" not in k}
        width = visual["cls_token"].shape[-1]
        patch = visual["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(visual["pos_embed"].shape[1] - 1)
        depth = 1 + max(int(k.split(".")[1]) for k in visual if k.startswith("blocks."))
        model = cls(grid * patch, patch, width, depth, width // 64, mlp_ratio, visual["head.weight"].shape[0])
        model.load_state_dict(visual, strict=True)
        return model.eval()

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        hidden_states = []
        for idx, blk in enumerate(self.blocks):
            if (0 < idx <= 20) and (idx % 4 == 0):
                hidden_states.append(x)
            x = blk(x)
        return self.head(self.norm(x)[:, 0]), hidden_states


# ---- pulid/encoders.py, pulid/encoders_transformer.py ----


def mlp(a, b, c, d):
    return nn.Sequential(nn.Linear(a, b), nn.LayerNorm(b), nn.LeakyReLU(), nn.Linear(b, c), nn.LayerNorm(c),
                         nn.LeakyReLU(), nn.Linear(c, d))  # fmt: skip


class IDEncoder(nn.Module):
    def __init__(self, width=1280, context_dim=2048, num_token=5, vit_width=1024, hidden=1024):
        super().__init__()
        self.num_token, self.context_dim = num_token, context_dim
        h1 = min((context_dim * num_token) // 4, hidden)
        h2 = min((context_dim * num_token) // 2, hidden)
        self.body = mlp(width, h1, h2, context_dim * num_token)
        for i in range(5):
            setattr(self, f"mapping_{i}", mlp(vit_width, hidden, hidden, context_dim))
            setattr(self, f"mapping_patch_{i}", mlp(vit_width, hidden, hidden, context_dim))

    def forward(self, x, y):
        x = self.body(x).reshape(-1, self.num_token, self.context_dim)
        hidden_states = ()
        for i, emb in enumerate(y):
            hidden_state = getattr(self, f"mapping_{i}")(emb[:, :1]) + getattr(self, f"mapping_patch_{i}")(
                emb[:, 1:]
            ).mean(dim=1, keepdim=True)
            hidden_states += (hidden_state,)
        return torch.cat([x, torch.cat(hidden_states, dim=1)], dim=1)


def reshape_tensor(x, heads):
    bs, length, _ = x.shape
    return x.view(bs, length, heads, -1).transpose(1, 2).reshape(bs, heads, length, -1)


class PerceiverAttention(nn.Module):
    def __init__(self, *, dim, dim_head=64, heads=8):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner_dim = dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        b, seq_len, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (reshape_tensor(t, self.heads) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(b, seq_len, -1)
        return self.to_out(out)


def feed_forward(dim, mult=4):
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))  # fmt: skip


class IDFormer(nn.Module):
    def __init__(self, dim=1024, depth=10, dim_head=64, heads=16, num_id_token=5, num_queries=32, output_dim=2048,
                 ff_mult=4, vit_width=1024, id_width=1280, hidden=1024):  # fmt: skip
        super().__init__()
        self.num_id_token, self.dim, self.num_queries = num_id_token, dim, num_queries
        self.depth = depth // 5
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) * dim**-0.5)
        self.proj_out = nn.Parameter(dim**-0.5 * torch.randn(dim, output_dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        for i in range(5):
            setattr(self, f"mapping_{i}", mlp(vit_width, hidden, hidden, dim))
        self.id_embedding_mapping = mlp(id_width, hidden, hidden, dim * num_id_token)

    def forward(self, x, y):
        latents = self.latents.repeat(x.size(0), 1, 1)
        num_duotu = x.shape[1] if x.ndim == 3 else 1
        x = self.id_embedding_mapping(x).reshape(-1, self.num_id_token * num_duotu, self.dim)
        latents = torch.cat((latents, x), dim=1)
        for i in range(5):
            vit_feature = getattr(self, f"mapping_{i}")(y[i])
            ctx_feature = torch.cat((x, vit_feature), dim=1)
            for attn, ff in self.layers[i * self.depth : (i + 1) * self.depth]:
                latents = attn(ctx_feature, latents) + latents
                latents = ff(latents) + latents
        return latents[:, : self.num_queries] @ self.proj_out


def encoder_from_checkpoint(state):
    """The reference's encoder for a checkpoint (``load_pretrain``: split at the first dot, ``strict=True``)."""
    enc = {k[len("id_adapter.") :]: v for k, v in state.items() if k.startswith("id_adapter.")}
    vit_width = enc["mapping_0.0.weight"].shape[1]
    hidden = enc["mapping_0.0.weight"].shape[0]
    if "body.0.weight" in enc:
        model = IDEncoder(enc["body.0.weight"].shape[1], enc["mapping_0.6.weight"].shape[0], 5, vit_width, hidden)
    else:
        dim = enc["latents"].shape[-1]
        model = IDFormer(dim=dim, heads=enc["layers.0.0.to_q.weight"].shape[0] // 64,
                         output_dim=enc["proj_out"].shape[1], vit_width=vit_width,
                         id_width=enc["id_embedding_mapping.0.weight"].shape[1], hidden=hidden)  # fmt: skip
    model.load_state_dict(enc, strict=True)
    return model.eval()


# ---- pulid/attention_processor.py ----


class AttnProcessor(nn.Module):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_embedding=None, id_scale=1.0):  # fmt: skip
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class IDAttnProcessor(nn.Module):
    def __init__(self, hidden_size, cross_attention_dim, num_zero=0, ortho=False, ortho_v2=False):
        super().__init__()
        self.id_to_k = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.id_to_v = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.num_zero, self.ortho, self.ortho_v2 = num_zero, ortho, ortho_v2

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_embedding=None, id_scale=1.0):  # fmt: skip
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if id_embedding is not None:
            if self.num_zero:
                zeros = torch.zeros((id_embedding.size(0), self.num_zero, id_embedding.size(-1)),
                                    dtype=id_embedding.dtype, device=id_embedding.device)  # fmt: skip
                id_embedding = torch.cat((id_embedding, zeros), dim=1)
            id_key = self.id_to_k(id_embedding).to(query.dtype)
            id_value = self.id_to_v(id_embedding).to(query.dtype)
            id_key = id_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            id_value = id_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            id_hidden = F.scaled_dot_product_attention(query, id_key, id_value, attn_mask=None, dropout_p=0.0)
            id_hidden = id_hidden.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            if not self.ortho and not self.ortho_v2:
                hidden_states = hidden_states + id_scale * id_hidden
            else:
                orig_dtype = hidden_states.dtype
                hidden_states, id_hidden = hidden_states.to(torch.float32), id_hidden.to(torch.float32)
                projection = (torch.sum(hidden_states * id_hidden, dim=-2, keepdim=True)
                              / torch.sum(hidden_states * hidden_states, dim=-2, keepdim=True) * hidden_states)  # fmt: skip
                if self.ortho_v2:
                    attn_map = query @ id_key.transpose(-2, -1)
                    attn_mean = attn_map.softmax(dim=-1).mean(dim=1)
                    attn_mean = attn_mean[:, :, :5].sum(dim=-1, keepdim=True)
                    orthogonal = id_hidden + (attn_mean - 1) * projection
                else:
                    orthogonal = id_hidden - projection
                hidden_states = (hidden_states + id_scale * orthogonal).to(orig_dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# ---- pulid/pipeline.py, pulid/pipeline_v1_1.py, app.py ----

FACE_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]])  # fmt: skip
BG_LABEL = [0, 16, 18, 7, 8, 9, 14, 15]


def to_gray(img):
    return (0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]).repeat(1, 3, 1, 1)


@torch.no_grad()
def id_features(image_rgb, app, parser, eva):
    """(id_cond (1, 512 + proj), id_vit_hidden) of an RGB uint8 photo, as ``get_id_embedding`` computes them."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import normalize, resize

    image_bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    face_info = sorted(app.get(image_bgr), key=lambda x: (x["bbox"][2] - x["bbox"][0]) * (x["bbox"][3] - x["bbox"][1]))[
        -1
    ]
    id_ante_embedding = torch.from_numpy(face_info["embedding"]).unsqueeze(0)
    affine_matrix = cv2.estimateAffinePartial2D(face_info["kps"], FACE_TEMPLATE, method=cv2.LMEDS)[0]
    align_face = cv2.warpAffine(image_bgr, affine_matrix, (512, 512), borderMode=cv2.BORDER_CONSTANT,
                                borderValue=(135, 133, 132))  # fmt: skip
    rgb = cv2.cvtColor(align_face, cv2.COLOR_BGR2RGB).astype(np.float32)  # img2tensor(bgr2rgb=True)
    input = torch.from_numpy(rgb.transpose(2, 0, 1)).unsqueeze(0) / 255.0
    parsing_out = parser(normalize(input, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))[0]
    parsing_out = parsing_out.argmax(dim=1, keepdim=True)
    bg = sum(parsing_out == i for i in BG_LABEL).bool()
    face_features_image = torch.where(bg, torch.ones_like(input), to_gray(input))
    # torchvision 0.15.2 (the reference's pin) resized tensors without antialiasing.
    face_features_image = resize(face_features_image, eva.image_size, InterpolationMode.BICUBIC, antialias=False)
    face_features_image = normalize(face_features_image, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    id_cond_vit, id_vit_hidden = eva(face_features_image)
    id_cond_vit = torch.div(id_cond_vit, torch.norm(id_cond_vit, 2, 1, True))
    return torch.cat([id_ante_embedding, id_cond_vit], dim=-1), id_vit_hidden


@torch.no_grad()
def v1_embedding(encoder, id_cond, id_vit_hidden):
    id_embedding = encoder(id_cond, id_vit_hidden)
    uncond = encoder(torch.zeros_like(id_cond), [torch.zeros_like(h) for h in id_vit_hidden])
    return torch.cat((uncond, id_embedding), dim=0)


def v1_app(embeddings, id_mix=False):
    """app.py: the main photo's embedding, then each auxiliary photo's (its first 5 tokens without id_mix)."""
    out = embeddings[0]
    for supp in embeddings[1:]:
        out = torch.cat((out, supp if id_mix else supp[:, :5]), dim=1)
    return out


@torch.no_grad()
def v11_embedding(encoder, features):
    id_cond = torch.stack([c for c, _ in features], dim=1)
    id_vit_hidden = list(features[0][1])
    for _, hidden in features[1:]:
        for j, x in enumerate(hidden):
            id_vit_hidden[j] = torch.cat([id_vit_hidden[j], x], dim=1)
    uncond = encoder(torch.zeros_like(features[0][0]), [torch.zeros_like(h) for h in features[0][1]])
    return uncond, encoder(id_cond, id_vit_hidden)


def pulid_pipe(base, state, num_zero, ortho=False, ortho_v2=False):
    """A diffusers SDXL pipeline with the reference's ID processors loaded from the checkpoint's attention weights."""
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    as_reference(pipe)
    unet = pipe.unet
    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = AttnProcessor()
            continue
        procs[name] = IDAttnProcessor(
            hidden_size(unet, name), unet.config.cross_attention_dim, num_zero, ortho, ortho_v2
        )
    unet.set_attn_processor(procs)
    layers = {
        k[len("id_adapter_attn_layers.") :]: v for k, v in state.items() if k.startswith("id_adapter_attn_layers.")
    }
    nn.ModuleList(unet.attn_processors.values()).load_state_dict(layers, strict=True)
    return pipe
