"""A transcription of PhotoMaker's reference math (TencentARC/PhotoMaker @ 060b4fc), for the equivalence tests.

Written for these tests from the reference's definitions; each part names what it mirrors:

* ``MLP`` / ``FuseModule``: ``photomaker/model.py`` (the same in ``model_v2.py``), ``masked_scatter`` included.
* ``PhotoMakerIDEncoder`` (v1, ``model.py``) and ``PhotoMakerIDEncoderV2`` (``model_v2.py``:
  ``PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken``, ``QFormerPerceiver``) with ``FacePerceiverResampler`` /
  ``PerceiverAttention`` (``resampler.py``); widths come from the checkpoint instead of the literals 1024 / 768 / 1280 /
  2048, the Q-Former's heads are ``width // 128`` as there.
* ``PhotoMakerReference``: ``PhotoMakerStableDiffusionXLPipeline`` (``photomaker/pipeline.py``):
  ``load_photomaker_adapter`` (the key check, the strict load, diffusers' ``load_lora_weights`` with
  ``adapter_name="photomaker"``, the trigger added to both tokenizers), ``encode_prompt_with_trigger_word``, and
  ``__call__``'s text-only prompt, ID fuse and start-merge switch; ``fuse_lora()`` as the apps call it. The number of
  ID tokens per photo is 1 for v1 (the HEAD's hard-coded 2 breaks v1, TencentARC/PhotoMaker#187) and 2 for v2.
"""

from __future__ import annotations

import math

import torch
from diffusers import StableDiffusionXLPipeline
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection


class MLP(nn.Module):
    def __init__(self, in_dim, out_dim, hidden_dim, use_residual=True):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.use_residual = use_residual
        self.act_fn = nn.GELU()

    def forward(self, x):
        residual = x
        x = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return x + residual if self.use_residual else x


class FuseModule(nn.Module):
    def __init__(self, embed_dim):
        super().__init__()
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse_fn(self, prompt_embeds, id_embeds):
        stacked_id_embeds = torch.cat([prompt_embeds, id_embeds], dim=-1)
        stacked_id_embeds = self.mlp1(stacked_id_embeds) + prompt_embeds
        stacked_id_embeds = self.mlp2(stacked_id_embeds)
        return self.layer_norm(stacked_id_embeds)

    def forward(self, prompt_embeds, id_embeds, class_tokens_mask):
        id_embeds = id_embeds.to(prompt_embeds.dtype)
        num_inputs = class_tokens_mask.sum().unsqueeze(0)
        batch_size, max_num_inputs = id_embeds.shape[:2]
        seq_length = prompt_embeds.shape[1]
        flat_id_embeds = id_embeds.view(-1, id_embeds.shape[-2], id_embeds.shape[-1])
        valid_id_mask = torch.arange(max_num_inputs, device=flat_id_embeds.device)[None, :] < num_inputs[:, None]
        valid_id_embeds = flat_id_embeds[valid_id_mask.flatten()]
        prompt_embeds = prompt_embeds.view(-1, prompt_embeds.shape[-1])
        class_tokens_mask = class_tokens_mask.view(-1)
        valid_id_embeds = valid_id_embeds.view(-1, valid_id_embeds.shape[-1])
        image_token_embeds = prompt_embeds[class_tokens_mask]
        stacked_id_embeds = self.fuse_fn(image_token_embeds, valid_id_embeds)
        assert class_tokens_mask.sum() == stacked_id_embeds.shape[0]
        prompt_embeds.masked_scatter_(class_tokens_mask[:, None], stacked_id_embeds.to(prompt_embeds.dtype))
        return prompt_embeds.view(batch_size, seq_length, -1)


def feed_forward(dim, mult=4):
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, int(dim * mult), bias=False), nn.GELU(),
                         nn.Linear(int(dim * mult), dim, bias=False))  # fmt: skip


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
        b, seq, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (reshape_tensor(t, self.heads) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return self.to_out((weight @ v).permute(0, 2, 1, 3).reshape(b, seq, -1))


class FacePerceiverResampler(nn.Module):
    def __init__(self, *, dim=768, depth=4, dim_head=64, heads=16, embedding_dim=1280, output_dim=768, ff_mult=4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def forward(self, latents, x):
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class QFormerPerceiver(nn.Module):
    def __init__(self, id_embeddings_dim, cross_attention_dim, num_tokens, embedding_dim=1024, ratio=4):
        super().__init__()
        self.num_tokens, self.cross_attention_dim = num_tokens, cross_attention_dim
        self.token_proj = nn.Sequential(nn.Linear(id_embeddings_dim, id_embeddings_dim * ratio), nn.GELU(),
                                        nn.Linear(id_embeddings_dim * ratio, cross_attention_dim * num_tokens))  # fmt: skip
        self.token_norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=cross_attention_dim, depth=4, dim_head=128, heads=cross_attention_dim // 128,
            embedding_dim=embedding_dim, output_dim=cross_attention_dim, ff_mult=4,
        )  # fmt: skip

    def forward(self, x, last_hidden_state):
        x = self.token_proj(x).reshape(-1, self.num_tokens, self.cross_attention_dim)
        x = self.token_norm(x)
        out = self.perceiver_resampler(x, last_hidden_state)
        return x + 1.0 * out


def _vision_config(state):
    width = state["vision_model.embeddings.class_embedding"].shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision_model.encoder.layers."))
    return CLIPVisionConfig(hidden_size=width, intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_attention_heads=width // 64, num_hidden_layers=layers, patch_size=14, image_size=224,
                            projection_dim=state["visual_projection.weight"].shape[0])  # fmt: skip


class PhotoMakerIDEncoder(CLIPVisionModelWithProjection):
    def __init__(self, state):
        config = _vision_config(state)
        super().__init__(config)
        self.visual_projection_2 = nn.Linear(
            config.hidden_size, state["visual_projection_2.weight"].shape[0], bias=False
        )
        self.fuse_module = FuseModule(state["fuse_module.layer_norm.weight"].shape[0])

    def forward(self, id_pixel_values, prompt_embeds, class_tokens_mask):
        b, num_inputs, c, h, w = id_pixel_values.shape
        id_pixel_values = id_pixel_values.view(b * num_inputs, c, h, w)
        shared_id_embeds = self.vision_model(id_pixel_values)[1]
        id_embeds = self.visual_projection(shared_id_embeds).view(b, num_inputs, 1, -1)
        id_embeds_2 = self.visual_projection_2(shared_id_embeds).view(b, num_inputs, 1, -1)
        id_embeds = torch.cat((id_embeds, id_embeds_2), dim=-1)
        return self.fuse_module(prompt_embeds, id_embeds, class_tokens_mask)


class PhotoMakerIDEncoderV2(CLIPVisionModelWithProjection):
    def __init__(self, state):
        config = _vision_config(state)
        super().__init__(config)
        embed = state["fuse_module.layer_norm.weight"].shape[0]
        self.fuse_module = FuseModule(embed)
        self.visual_projection_2 = nn.Linear(
            config.hidden_size, state["visual_projection_2.weight"].shape[0], bias=False
        )
        self.num_tokens, self.cross_attention_dim = 2, embed
        proj0 = state["qformer_perceiver.token_proj.0.weight"]
        self.qformer_perceiver = QFormerPerceiver(
            proj0.shape[1], embed, 2, config.hidden_size, proj0.shape[0] // proj0.shape[1]
        )

    def forward(self, id_pixel_values, prompt_embeds, class_tokens_mask, id_embeds):
        b, num_inputs, c, h, w = id_pixel_values.shape
        id_pixel_values = id_pixel_values.view(b * num_inputs, c, h, w)
        last_hidden_state = self.vision_model(id_pixel_values)[0]
        id_embeds = id_embeds.view(b * num_inputs, -1)
        id_embeds = self.qformer_perceiver(id_embeds, last_hidden_state)
        id_embeds = id_embeds.view(b, num_inputs, self.num_tokens, -1)
        return self.fuse_module(prompt_embeds, id_embeds, class_tokens_mask)


class PhotoMakerReference(StableDiffusionXLPipeline):
    def load_photomaker_adapter(self, path, pm_version, trigger_word="img"):
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if list(state_dict.keys()) != ["id_encoder", "lora_weights"]:
            raise ValueError("Required keys are (`id_encoder` and `lora_weights`) missing from the state dict.")
        self.num_tokens = 1 if pm_version == "v1" else 2
        self.pm_version, self.trigger_word = pm_version, trigger_word
        cls = PhotoMakerIDEncoder if pm_version == "v1" else PhotoMakerIDEncoderV2
        id_encoder = cls(state_dict["id_encoder"])
        id_encoder.load_state_dict(state_dict["id_encoder"], strict=True)
        self.id_encoder = id_encoder.to(self.device, dtype=self.unet.dtype).eval()
        self.load_lora_weights(state_dict["lora_weights"], adapter_name="photomaker")
        self.tokenizer.add_tokens([self.trigger_word], special_tokens=True)
        self.tokenizer_2.add_tokens([self.trigger_word], special_tokens=True)

    def encode_prompt_with_trigger_word(self, prompt, num_id_images):
        image_token_id = self.tokenizer_2.convert_tokens_to_ids(self.trigger_word)
        prompt_embeds_list, ids_list, masks = [], [], []
        for tokenizer, text_encoder in zip([self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2],
                                           strict=True):  # fmt: skip
            text_input_ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids  # fmt: skip
            clean_index, clean_input_ids, class_token_index = 0, [], []
            for token_id in text_input_ids.tolist()[0]:
                if token_id == image_token_id:
                    class_token_index.append(clean_index - 1)
                else:
                    clean_input_ids.append(token_id)
                    clean_index += 1
            if len(class_token_index) != 1:
                raise ValueError("PhotoMaker currently does not support multiple trigger words in a single prompt.")
            class_token_index = class_token_index[0]
            class_token = clean_input_ids[class_token_index]
            clean_input_ids = (clean_input_ids[:class_token_index] + [class_token] * num_id_images * self.num_tokens
                               + clean_input_ids[class_token_index + 1 :])  # fmt: skip
            max_len = tokenizer.model_max_length
            if len(clean_input_ids) > max_len:
                clean_input_ids = clean_input_ids[:max_len]
            else:
                clean_input_ids = clean_input_ids + [tokenizer.pad_token_id] * (max_len - len(clean_input_ids))
            class_tokens_mask = [class_token_index <= i < class_token_index + (num_id_images * self.num_tokens)
                                 for i in range(len(clean_input_ids))]  # fmt: skip
            ids_list.append(clean_input_ids)
            masks.append(class_tokens_mask)
            clean_input_ids = torch.tensor(clean_input_ids, dtype=torch.long).unsqueeze(0)
            out = text_encoder(clean_input_ids.to(self.device), output_hidden_states=True)
            pooled_prompt_embeds = out[0]
            prompt_embeds_list.append(out.hidden_states[-2])
        prompt_embeds = torch.concat(prompt_embeds_list, dim=-1)
        class_tokens_mask = torch.tensor(masks[-1], dtype=torch.bool).unsqueeze(0)
        return prompt_embeds, pooled_prompt_embeds, class_tokens_mask, ids_list, masks

    @torch.no_grad()
    def __call__(self, prompt, id_pixel_values, *, height, width, num_inference_steps, guidance_scale=5.0,
                 start_merge_step=10, generator=None, id_embeds=None, negative_prompt=None):  # fmt: skip
        self._guidance_scale, self._clip_skip, self._cross_attention_kwargs = guidance_scale, None, None
        self._denoising_end, self._interrupt, self._guidance_rescale = None, False, 0.0
        device = self._execution_device
        num_id_images = id_pixel_values.shape[0]
        prompt_embeds, pooled_prompt_embeds, class_tokens_mask, _, _ = self.encode_prompt_with_trigger_word(
            prompt, num_id_images
        )
        tokens_text_only = self.tokenizer.encode(prompt, add_special_tokens=False)
        tokens_text_only.remove(self.tokenizer.convert_tokens_to_ids(self.trigger_word))
        prompt_text_only = self.tokenizer.decode(tokens_text_only)
        (prompt_embeds_text_only, negative_prompt_embeds, pooled_prompt_embeds_text_only,
         negative_pooled_prompt_embeds) = self.encode_prompt(
            prompt=prompt_text_only, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=self.do_classifier_free_guidance, negative_prompt=negative_prompt,
        )  # fmt: skip
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        dtype = next(self.id_encoder.parameters()).dtype
        id_pixel_values = id_pixel_values.unsqueeze(0).to(device=device, dtype=dtype)
        if id_embeds is not None:
            id_embeds = id_embeds.unsqueeze(0).to(device=device, dtype=dtype)
            prompt_embeds = self.id_encoder(id_pixel_values, prompt_embeds, class_tokens_mask, id_embeds)
        else:
            prompt_embeds = self.id_encoder(id_pixel_values, prompt_embeds, class_tokens_mask)
        latents = self.prepare_latents(1, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device,
                                       generator)  # fmt: skip
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, 0.0)
        add_time_ids = self._get_add_time_ids((height, width), (0, 0), (height, width), dtype=prompt_embeds.dtype,
                                              text_encoder_projection_dim=self.text_encoder_2.config.projection_dim)  # fmt: skip
        cfg = self.do_classifier_free_guidance
        if cfg:
            add_time_ids = torch.cat([add_time_ids, add_time_ids], dim=0)
        for i, t in enumerate(timesteps):
            latent_model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
            if i <= start_merge_step:
                current = (
                    torch.cat([negative_prompt_embeds, prompt_embeds_text_only]) if cfg else prompt_embeds_text_only
                )
                add_text_embeds = (torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds_text_only])
                                   if cfg else pooled_prompt_embeds_text_only)  # fmt: skip
            else:
                current = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
                add_text_embeds = (
                    torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds]) if cfg else pooled_prompt_embeds
                )
            noise_pred = self.unet(latent_model_input, t, encoder_hidden_states=current,
                                   added_cond_kwargs={"text_embeds": add_text_embeds, "time_ids": add_time_ids},
                                   return_dict=False)[0]  # fmt: skip
            if cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
        return latents
