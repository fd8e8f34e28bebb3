"""A transcription of InstantID's reference math (instantX-research/InstantID @ 2145b67), for the equivalence tests.

Written for these tests from the reference's definitions; each part names what it mirrors:

* ``Resampler`` / ``PerceiverAttention`` / ``feed_forward``: ``ip_adapter/resampler.py``.
* ``AttnProcessor`` / ``IPAttnProcessor``: ``ip_adapter/attention_processor.py`` (``AttnProcessor2_0``,
  ``IPAttnProcessor2_0``), with the region mask of the full pipeline held by the processor instead of the module-level
  ``region_control`` singleton.
* ``draw_kps``: ``pipeline_stable_diffusion_xl_instantid.py``.
* ``InstantIDReference``: ``StableDiffusionXLInstantIDPipeline`` of ``pipeline_stable_diffusion_xl_instantid.py``
  (``load_ip_adapter_instantid``, ``_encode_prompt_image_emb``, ``__call__``), with the two additions of
  ``pipeline_stable_diffusion_xl_instantid_full.py``: with several ControlNets only the first (IdentityNet) reads the
  face tokens and the others the prompt, and ``control_mask`` weighs IdentityNet's residuals and the face branch. The
  full pipeline's long-prompt-weighting text encoder is not InstantID's method and is left out: prompts are encoded
  by diffusers' ``encode_prompt``, as the base pipeline does.

The reference builds its Resampler at the published widths (1280, 20 heads); here the widths come from the tiny
checkpoint, with the reference's structure and key names (loaded with ``strict=True``).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import MultiControlNetModel, StableDiffusionXLControlNetPipeline
from torch import nn


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2).reshape(batch, heads, length, -1)


class PerceiverAttention(nn.Module):
    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        batch, length, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))  # both factors scaled before the product, as the reference
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(batch, length, -1)
        return self.to_out(out)


class Resampler(nn.Module):
    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int = 4) -> None:  # fmt: skip
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def _attention_prologue(attn, hidden_states, encoder_hidden_states, temb):
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = None
    if hidden_states.ndim == 4:
        shape = hidden_states.shape
        hidden_states = hidden_states.view(shape[0], shape[1], shape[2] * shape[3]).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, shape


def _attention_epilogue(attn, hidden_states, residual, shape):
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if shape is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _sdpa(attn, query, key, value, batch):
    head_dim = key.shape[-1] // attn.heads
    q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype), q


class AttnProcessor(nn.Module):
    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        hidden_states, shape = _attention_prologue(attn, hidden_states, encoder_hidden_states, temb)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out, _ = _sdpa(attn, query, attn.to_k(context), attn.to_v(context), batch)
        return _attention_epilogue(attn, out, residual, shape)


class IPAttnProcessor(nn.Module):
    """Text attention plus ``scale`` times attention over the last ``num_tokens`` tokens (the face tokens)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, scale: float = 1.0, num_tokens: int = 16) -> None:
        super().__init__()
        self.scale, self.num_tokens = scale, num_tokens
        self.region_mask: torch.Tensor | None = None  # the full pipeline's region_control
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        hidden_states, shape = _attention_prologue(attn, hidden_states, encoder_hidden_states, temb)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        end = encoder_hidden_states.shape[1] - self.num_tokens
        text, ip_tokens = encoder_hidden_states[:, :end, :], encoder_hidden_states[:, end:, :]
        out, q = _sdpa(attn, query, attn.to_k(text), attn.to_v(text), batch)
        ip_out, _ = _sdpa(attn, query, self.to_k_ip(ip_tokens), self.to_v_ip(ip_tokens), batch)
        if self.region_mask is not None:
            h, w = self.region_mask.shape[:2]
            ratio = (h * w / q.shape[2]) ** 0.5
            mask = F.interpolate(self.region_mask[None, None], scale_factor=1 / ratio, mode="nearest")
            ip_out = ip_out * mask.reshape([1, -1, 1])
        out = out + self.scale * ip_out
        return _attention_epilogue(attn, out, residual, shape)


def draw_kps(image_pil, kps, color_list=((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))):
    stickwidth = 4
    limb_seq = np.array([[0, 2], [1, 2], [3, 2], [4, 2]])
    kps = np.array(kps)
    w, h = image_pil.size
    out_img = np.zeros([h, w, 3])
    for index in limb_seq:
        color = color_list[index[0]]
        x, y = kps[index][:, 0], kps[index][:, 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly(
            (int(np.mean(x)), int(np.mean(y))), (int(length / 2), stickwidth), int(angle), 0, 360, 1
        )
        out_img = cv2.fillConvexPoly(out_img.copy(), polygon, color)
    out_img = (out_img * 0.6).astype(np.uint8)
    for idx, kp in enumerate(kps):
        x, y = kp
        out_img = cv2.circle(out_img.copy(), (int(x), int(y)), 10, color_list[idx], -1)
    return PIL.Image.fromarray(out_img.astype(np.uint8))


def hidden_size(unet, name):
    """The width of an attention layer by its block, as ``set_ip_adapter`` (and PuLID's ``hack_unet_attn_layers``)
    derive it from the UNet config."""
    if name.startswith("mid_block"):
        return unet.config.block_out_channels[-1]
    if name.startswith("up_blocks"):
        return list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
    return unet.config.block_out_channels[int(name[len("down_blocks.")])]


class InstantIDReference(StableDiffusionXLControlNetPipeline):
    def load_ip_adapter_instantid(self, model_ckpt: str, image_emb_dim: int = 512, num_tokens: int = 16,
                                  scale: float = 0.5) -> None:  # fmt: skip
        state = torch.load(model_ckpt, map_location="cpu", weights_only=True)
        proj = state["image_proj"]
        dim, heads = proj["latents"].shape[-1], proj["layers.0.0.to_q.weight"].shape[0] // 64
        self.image_proj_model = Resampler(dim=dim, depth=4, dim_head=64, heads=heads, num_queries=num_tokens,
                                          embedding_dim=image_emb_dim, output_dim=self.unet.config.cross_attention_dim,
                                          ff_mult=4).eval()  # fmt: skip
        self.image_proj_model.load_state_dict(proj)
        self.image_proj_model_in_features = image_emb_dim
        unet = self.unet
        procs = {}
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                procs[name] = AttnProcessor()
                continue
            procs[name] = IPAttnProcessor(hidden_size(unet, name), unet.config.cross_attention_dim, scale, num_tokens)
        unet.set_attn_processor(procs)
        nn.ModuleList(unet.attn_processors.values()).load_state_dict(state["ip_adapter"])

    def set_ip_adapter_scale(self, scale: float) -> None:
        for processor in self.unet.attn_processors.values():
            if isinstance(processor, IPAttnProcessor):
                processor.scale = scale

    def _encode_prompt_image_emb(self, prompt_image_emb, device, num_images_per_prompt, dtype, cfg):
        emb = torch.tensor(np.asarray(prompt_image_emb)).reshape([1, -1, self.image_proj_model_in_features])
        emb = torch.cat([torch.zeros_like(emb), emb], dim=0) if cfg else emb
        emb = self.image_proj_model(emb.to(self.image_proj_model.latents.device, self.image_proj_model.latents.dtype))
        batch, length, _ = emb.shape
        emb = emb.repeat(1, num_images_per_prompt, 1).view(batch * num_images_per_prompt, length, -1)
        return emb.to(device=device, dtype=dtype)

    @torch.no_grad()
    def __call__(self, prompt, image_embeds, image, *, height, width, num_inference_steps, guidance_scale=5.0,
                 negative_prompt=None, num_images_per_prompt=1, generator=None, controlnet_conditioning_scale=1.0,
                 control_guidance_start=0.0, control_guidance_end=1.0, ip_adapter_scale=None, control_mask=None):  # fmt: skip
        controlnet = self.controlnet
        multi = isinstance(controlnet, MultiControlNetModel)
        nets = list(controlnet.nets) if multi else [controlnet]
        scales = controlnet_conditioning_scale if multi else [controlnet_conditioning_scale]
        starts = (
            control_guidance_start if isinstance(control_guidance_start, list) else [control_guidance_start] * len(nets)
        )
        ends = control_guidance_end if isinstance(control_guidance_end, list) else [control_guidance_end] * len(nets)
        if ip_adapter_scale is not None:
            self.set_ip_adapter_scale(ip_adapter_scale)
        self._guidance_scale, self._clip_skip, self._cross_attention_kwargs = guidance_scale, None, None
        cfg = self.do_classifier_free_guidance
        device = self._execution_device
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt, None, device, num_images_per_prompt, cfg, negative_prompt
        )
        prompt_image_emb = self._encode_prompt_image_emb(
            image_embeds, device, num_images_per_prompt, self.unet.dtype, cfg
        )
        images = [
            self.prepare_image(image=im, width=width, height=height, batch_size=num_images_per_prompt,
                               num_images_per_prompt=num_images_per_prompt, device=device, dtype=controlnet.dtype,
                               do_classifier_free_guidance=cfg, guess_mode=False)
            for im in (image if multi else [image])
        ]  # fmt: skip
        masks = None
        for processor in self.unet.attn_processors.values():
            if isinstance(processor, IPAttnProcessor):
                processor.region_mask = None
        if control_mask is not None:
            weight = torch.from_numpy(np.array(control_mask)).to(device, prompt_embeds.dtype)[:, :, 0] / 255.0
            weight = weight[None, None]
            h, w = weight.shape[-2:]
            masks = [
                F.interpolate(weight, (h // s, w // s), mode="bilinear") for s in (8, 8, 8, 16, 16, 16, 32, 32, 32)
            ]
            region = torch.from_numpy(np.array(control_mask)[:, :, 0]).to(device, self.unet.dtype) / 255.0
            for processor in self.unet.attn_processors.values():
                if isinstance(processor, IPAttnProcessor):
                    processor.region_mask = region
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(num_images_per_prompt, self.unet.config.in_channels, height, width,
                                       prompt_embeds.dtype, device, generator)  # fmt: skip
        extra = self.prepare_extra_step_kwargs(generator, 0.0)
        n = len(timesteps)
        keep = [
            [1.0 - float(i / n < s or (i + 1) / n > e) for s, e in zip(starts, ends, strict=True)] for i in range(n)
        ]
        add_time_ids = self._get_add_time_ids(tuple(images[0].shape[-2:]), (0, 0), (height, width),
                                              dtype=prompt_embeds.dtype,
                                              text_encoder_projection_dim=self.text_encoder_2.config.projection_dim)  # fmt: skip
        add_text_embeds = pooled
        if cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            add_text_embeds = torch.cat([negative_pooled, pooled])
            add_time_ids = torch.cat([add_time_ids, add_time_ids])
        add_time_ids = add_time_ids.to(device).repeat(num_images_per_prompt, 1)
        encoder_hidden_states = torch.cat([prompt_embeds, prompt_image_emb], dim=1)
        for i, t in enumerate(timesteps):
            latent_in = self.scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
            added = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}
            downs, mids = [], []
            for k, net in enumerate(nets):
                context = prompt_image_emb if k == 0 else prompt_embeds  # nets[0] is IdentityNet
                down, mid = net(latent_in, t, encoder_hidden_states=context, controlnet_cond=images[k],
                                conditioning_scale=scales[k] * keep[i][k], guess_mode=False, added_cond_kwargs=added,
                                return_dict=False)  # fmt: skip
                if k == 0 and masks is not None:
                    down = [d * m for d, m in zip(down, masks, strict=True)]
                    mid = mid * masks[-1]
                downs.append(down)
                mids.append(mid)
            if multi:
                mid = torch.stack(mids).sum(dim=0)
                down = [torch.stack(group).sum(dim=0) for group in zip(*downs, strict=True)]
            noise = self.unet(latent_in, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                              down_block_additional_residuals=down, mid_block_additional_residual=mid,
                              return_dict=False)[0]  # fmt: skip
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        return latents
