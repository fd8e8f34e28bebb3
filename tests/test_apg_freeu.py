"""APG and FreeU equal diffusers 0.42.1 on the tiny models.

APG, two references, both diffusers' own ``AdaptiveProjectedGuidance`` guider (guiders/adaptive_projected_guidance.py):
- the modular SDXL pipeline (``StableDiffusionXLAutoBlocks``, diffusers.modular_pipelines), whose loop the guider
  drives; it runs offline on the tiny models (``init_pipeline(folder)``, ``load_components``; it warns it cannot load an
  image encoder, which text-to-image does not use). Base, text to image.
- the guider called at every step inside diffusers' classic SDXL pipelines, for what the modular pipeline would need
  other block setups for (refiner with ``denoising_start``, ControlNet with IP-Adapter, a window, our ``scale``): a
  forward hook on the pipeline's UNet hands the step's ``[uncond, cond]`` predictions to the guider (``set_state``,
  ``prepare_inputs`` at step 0, which makes its momentum buffer, ``forward``) and gives the pipeline back the pair
  ``[u', cond]`` whose CFG ``u' + g (cond - u')`` is the guider's prediction: every other part of the step is the
  pipeline's own (its guidance_rescale off: the guider rescales, after APG, against cond).

FreeU: diffusers' pipelines after ``pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)``, base, refiner, with a
ControlNet and an IP-Adapter, and with DeepCache's helper for the step cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
from diffusers.guiders import AdaptiveProjectedGuidance
from PIL import Image

from sdxl_control import ConditionError
from sdxl_control.adapters.apg import APG
from sdxl_control.adapters.freeu import FreeU
from sdxl_control.protocol.conditions import Window

from .conftest import as_reference

PROMPT = "a portrait of an astronaut, studio light"
STEPS, SEED, G = 6, 5, 5.0
RUN = dict(steps=STEPS, size=(64, 64), seed=SEED, guidance=G, negative_prompt="blurry", progress_bar=False)
CLOSE = dict(rtol=1e-4, atol=1e-5)
FACTORS = dict(s1=0.9, s2=0.2, b1=1.3, b2=1.4)


def _common() -> dict:
    return dict(num_inference_steps=STEPS, guidance_scale=G, negative_prompt="blurry", output_type="latent",
                generator=[torch.Generator().manual_seed(SEED)])  # fmt: skip


class GuiderHook:
    """diffusers' APG guider at every step of ``pipe``'s loop (see the module's docstring). A new guider per pipeline
    call, as each of our stages starts its own momentum. ``blend``: our ``scale`` (CFG + scale * (APG - CFG)); steps
    where the guider is not enabled (outside its start/stop) are left to the pipeline's plain CFG, our rule for a
    window (diffusers' guider would give the conditional prediction alone there)."""

    def __init__(self, pipe, blend: float = 1.0, **settings) -> None:
        self.pipe, self.blend = pipe, blend
        self.guider = AdaptiveProjectedGuidance(guidance_scale=G, **settings)
        self.step = 0

    def __call__(self, module, args, kwargs, output):
        uncond, cond = output[0].chunk(2)
        self.guider.set_state(self.step, self.pipe.num_timesteps, args[1])
        if self.step == 0:
            self.guider.prepare_inputs({})
        self.step += 1
        if not self.guider._is_apg_enabled():
            return output
        pred = self.guider.forward(pred_cond=cond, pred_uncond=uncond).pred
        if self.blend != 1.0:
            cfg = uncond + G * (cond - uncond)
            pred = cfg + self.blend * (pred - cfg)
        return (torch.cat([(pred - G * cond) / (1 - G), cond]),)


def _guided(pipe, call, **settings):
    hook = pipe.unet.register_forward_hook(GuiderHook(pipe, **settings), with_kwargs=True)
    try:
        with torch.no_grad():
            return call()
    finally:
        hook.remove()


def _apg_settings(eta, threshold, momentum, rescale=0.0, start=0.0):
    return dict(eta=eta, adaptive_projected_guidance_rescale=threshold, adaptive_projected_guidance_momentum=momentum,
                guidance_rescale=rescale, start=start)  # fmt: skip


@pytest.mark.parametrize(
    ("eta", "threshold", "momentum", "rescale"),
    [(1.0, 15.0, 0.0, 0.0), (0.0, 15.0, 0.0, 0.0), (1.0, 0.5, -0.5, 0.0), (0.0, 0.8, 0.3, 0.7), (1.0, 0.0, 0.5, 0.5)],
)
def test_apg_equals_diffusers_guider(generator, sdxl_pipes, eta, threshold, momentum, rescale):
    base, _ = sdxl_pipes
    ours = generator.generate(PROMPT, conditions=[APG(eta=eta, norm_threshold=threshold, momentum=momentum)],
                              guidance_rescale=rescale, **RUN)  # fmt: skip
    theirs = _guided(base, lambda: base(PROMPT, height=64, width=64, **_common()).images,
                     **_apg_settings(eta, threshold, momentum, rescale))  # fmt: skip
    torch.testing.assert_close(ours.latents, theirs, **CLOSE)
    if (eta, momentum, threshold) != (1.0, 0.0, 15.0):  # the defaults are CFG where the guidance's norm stays below 15
        plain = generator.generate(PROMPT, guidance_rescale=rescale, **RUN)
        assert (ours.latents - plain.latents).abs().max() > 1e-3  # APG changed something


@pytest.mark.parametrize(("eta", "threshold", "momentum", "rescale"), [(0.0, 1.0, 0.3, 0.0), (1.0, 0.5, -0.5, 0.7)])
def test_apg_equals_diffusers_modular_pipeline_with_the_apg_guider(generator, tiny, eta, threshold, momentum, rescale):
    from diffusers.modular_pipelines.stable_diffusion_xl import StableDiffusionXLAutoBlocks

    pipe = StableDiffusionXLAutoBlocks().init_pipeline(str(tiny.base))
    pipe.load_components(torch_dtype=torch.float32)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)  # as as_reference does, for the same reason
    guider = AdaptiveProjectedGuidance(guidance_scale=G, **_apg_settings(eta, threshold, momentum, rescale))
    pipe.update_components(guider=guider)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, height=64, width=64,
                      generator=torch.Generator().manual_seed(SEED), output="latents")  # fmt: skip
    ours = generator.generate(PROMPT, conditions=[APG(eta=eta, norm_threshold=threshold, momentum=momentum)],
                              guidance_rescale=rescale, **RUN)  # fmt: skip
    torch.testing.assert_close(ours.latents, theirs, **CLOSE)


def test_apg_on_base_and_refiner_restarts_its_momentum(generator, sdxl_pipes):
    base, refiner = sdxl_pipes
    apg = APG(eta=0.0, norm_threshold=0.8, momentum=0.5, stage="both")
    ours = generator.generate(PROMPT, conditions=[apg], refiner_switch=0.5, **RUN)
    settings = _apg_settings(0.0, 0.8, 0.5)
    with torch.no_grad():
        latents = _guided(base, lambda: base(PROMPT, height=64, width=64, denoising_end=0.5, **_common()).images,
                          **settings)  # fmt: skip
        theirs = _guided(refiner, lambda: refiner(PROMPT, image=latents, denoising_start=0.5, **_common()).images,
                         **settings)  # fmt: skip
    torch.testing.assert_close(ours.latents, theirs, **CLOSE)


def test_apg_window_is_plain_cfg_outside_and_scale_blends(generator, sdxl_pipes):
    base, _ = sdxl_pipes
    settings = _apg_settings(0.0, 1.0, 0.2)
    ours = generator.generate(PROMPT, conditions=[APG(eta=0.0, norm_threshold=1.0, momentum=0.2,
                                                      window=Window(0.5, 1.0), scale=0.6)], **RUN)  # fmt: skip
    theirs = _guided(base, lambda: base(PROMPT, height=64, width=64, **_common()).images,
                     blend=0.6, **{**settings, "start": 0.5})  # fmt: skip
    torch.testing.assert_close(ours.latents, theirs, **CLOSE)


def test_apg_without_cfg_changes_nothing(generator):
    run = {**RUN, "guidance": 1.0}
    assert torch.equal(generator.generate(PROMPT, conditions=[APG()], **run).latents,
                       generator.generate(PROMPT, **run).latents)  # fmt: skip


def test_apg_refuses_a_negative_eta_and_records_itself():
    with pytest.raises(ConditionError, match="eta"):
        APG(eta=-0.5)
    assert APG().infotext().fields == {"APG": "eta 1, threshold 15, momentum 0"}
    text = APG(eta=0.0, momentum=-0.25, scale=0.5, window=(0.2, 0.9)).infotext().fields["APG"]
    assert text == "eta 0, threshold 15, momentum -0.25, scale 0.5, window 0.2-0.9"


def _freeu_pipe(pipe, call):
    pipe.enable_freeu(**FACTORS)
    try:
        with torch.no_grad():
            return call()
    finally:
        pipe.disable_freeu()


def test_freeu_equals_diffusers_enable_freeu(generator, sdxl_pipes):
    base, _ = sdxl_pipes
    ours = generator.generate(PROMPT, conditions=[FreeU()], **RUN)
    theirs = _freeu_pipe(base, lambda: base(PROMPT, height=64, width=64, **_common()).images)
    torch.testing.assert_close(ours.latents, theirs, **CLOSE)
    assert (ours.latents - generator.generate(PROMPT, **RUN).latents).abs().max() > 1e-3
    assert not any(n in b.__dict__ for b in generator.base.unet.up_blocks for n in FACTORS)  # taken off again


def test_freeu_on_base_and_refiner(generator, sdxl_pipes):
    base, refiner = sdxl_pipes
    ours = generator.generate(PROMPT, conditions=[FreeU(stage="both")], refiner_switch=0.5, **RUN)
    latents = _freeu_pipe(base, lambda: base(PROMPT, height=64, width=64, denoising_end=0.5, **_common()).images)
    theirs = _freeu_pipe(refiner, lambda: refiner(PROMPT, image=latents, denoising_start=0.5, **_common()).images)
    torch.testing.assert_close(ours.latents, theirs, **CLOSE)


def test_freeu_scale_moves_each_factor_from_one():
    assert FreeU(scale=0.5).factors() == pytest.approx(dict(s1=0.95, s2=0.6, b1=1.15, b2=1.2))
    assert FreeU(scale=0.0).factors() == dict(s1=1.0, s2=1.0, b1=1.0, b2=1.0)


def test_freeu_and_apg_stacked_with_a_controlnet_and_an_ip_adapter(tiny, generator, tmp_path):
    """FreeU, then APG, each with a ControlNet and an IP-Adapter, against diffusers' ControlNet pipeline with the same
    IP-Adapter loaded (load_ip_adapter) and enable_freeu / the APG guider."""
    from sdxl_control.adapters.controlnet import ControlNet
    from sdxl_control.adapters.ip_adapter import VARIANTS, IPAdapter
    from sdxl_control.testing import write_tiny_controlnet
    from sdxl_control.testing.ip_adapter import write_tiny_ip_adapter_repo

    folder = write_tiny_controlnet(tmp_path / "cn", tiny.base, seed=4)
    repo = write_tiny_ip_adapter_repo(tmp_path / "h94-IP-Adapter", tiny.base)
    rng = np.random.default_rng(1)
    edges = Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8))
    face = Image.fromarray(rng.integers(0, 255, (80, 60, 3), np.uint8))
    others = [ControlNet(str(folder), image=edges, scale=0.8), IPAdapter("plus", face, source=str(repo), scale=0.7)]
    pipe = as_reference(StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny.base, controlnet=ControlNetModel.from_pretrained(folder)))  # fmt: skip
    pipe.load_ip_adapter(str(repo), subfolder="sdxl_models", weight_name=VARIANTS["plus"].weights.split("/")[-1],
                         image_encoder_folder=VARIANTS["plus"].encoder)  # fmt: skip
    as_reference(pipe)
    pipe.set_ip_adapter_scale(0.7)

    def call():
        return pipe(PROMPT, image=edges, ip_adapter_image=face, controlnet_conditioning_scale=0.8, height=64, width=64,
                    **_common()).images  # fmt: skip

    ours = generator.generate(PROMPT, conditions=[*others, FreeU()], **RUN)
    torch.testing.assert_close(ours.latents, _freeu_pipe(pipe, call), **CLOSE)
    ours = generator.generate(PROMPT, conditions=[*others, APG(eta=0.0, momentum=0.3, norm_threshold=1.0)], **RUN)
    torch.testing.assert_close(ours.latents, _guided(pipe, call, **_apg_settings(0.0, 1.0, 0.3)), **CLOSE)


def test_freeu_with_the_step_cache_equals_deepcache_or_is_refused(generator, sdxl_pipes):
    """Branch 0 reuses the up blocks FreeU changes whole: equal to DeepCache's helper on diffusers' pipeline with
    enable_freeu. A branch that reuses part of one would scale a remembered tensor again at each cached step
    (apply_freeu scales its input in place): refused, naming the setting."""
    DeepCache = pytest.importorskip("DeepCache")
    base, _ = sdxl_pipes
    ours = generator.generate(PROMPT, conditions=[FreeU()], step_cache=3, **RUN)
    helper = DeepCache.DeepCacheSDHelper(pipe=base)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        theirs = _freeu_pipe(base, lambda: base(PROMPT, height=64, width=64, **_common()).images)
    finally:
        helper.disable()
    torch.testing.assert_close(ours.latents, theirs, **CLOSE)
    with pytest.raises(ConditionError, match="step_cache_branch"):
        generator.generate(PROMPT, conditions=[FreeU()], step_cache=3, step_cache_branch=3, **RUN)
    assert not any(n in b.__dict__ for b in generator.base.unet.up_blocks for n in FACTORS)


def test_freeu_records_forges_keys():
    fields = dataclasses.replace(FreeU(), scale=0.5, window=Window(0.1, 0.8)).infotext().fields
    assert fields == {"freeu_enabled": "True", "freeu_b1": "1.15", "freeu_b2": "1.2", "freeu_s1": "0.95",
                      "freeu_s2": "0.6", "freeu_start": "0.1", "freeu_end": "0.8"}  # fmt: skip
    with pytest.raises(ConditionError, match="s2"):
        FreeU(s2=0.0)


def test_freeu_window_equals_enable_freeu_from_its_first_step(generator, sdxl_pipes):
    """A window: FreeU set from step 3 of 6 on, as diffusers' pipeline with enable_freeu called after step 2."""
    base, _ = sdxl_pipes
    ours = generator.generate(PROMPT, conditions=[FreeU(window=(0.5, 1.0))], **RUN)

    def switch(pipe, i, t, kwargs):
        if i == 2:
            pipe.enable_freeu(**FACTORS)
        return {}

    try:
        with torch.no_grad():
            theirs = base(PROMPT, height=64, width=64, callback_on_step_end=switch, **_common()).images
    finally:
        base.disable_freeu()
    torch.testing.assert_close(ours.latents, theirs, **CLOSE)
    whole = generator.generate(PROMPT, conditions=[FreeU()], **RUN)
    assert (ours.latents - whole.latents).abs().max() > 1e-3


def test_the_png_records_apg_and_freeu(generator, tmp_path):
    from .test_infotext import a1111_parse

    conditions = [APG(eta=0.0, momentum=0.3, norm_threshold=1.0), FreeU(scale=0.5)]
    result = generator.generate(PROMPT, conditions=conditions, **RUN)
    result.images[0].save(tmp_path / "out.png")
    _, _, fields = a1111_parse(Image.open(tmp_path / "out.png").info["parameters"])
    assert fields["APG"] == "eta 0, threshold 1, momentum 0.3"
    assert {k: fields[k] for k in ("freeu_enabled", "freeu_b1", "freeu_s2", "freeu_start", "freeu_end")} == {
        "freeu_enabled": "True", "freeu_b1": "1.15", "freeu_s2": "0.6", "freeu_start": "0", "freeu_end": "1"}  # fmt: skip


def test_bad_apg_and_freeu_values_are_refused(generator):
    with pytest.raises(ConditionError, match="eta is 0 or more"):
        APG(eta=-1.0)
    with pytest.raises(ConditionError, match="norm_threshold is 0"):
        APG(norm_threshold=-1.0)
    with pytest.raises(ConditionError, match="FreeU b2 is above 0"):
        FreeU(b2=0.0)
    with pytest.raises(ConditionError, match="makes a factor 0 or less"):
        generator.generate(PROMPT, conditions=[FreeU(scale=2.0)], **RUN)  # s2 0.2 at scale 2: -0.6
    with pytest.raises(ConditionError, match="each compute the guidance anew"):
        generator.generate(PROMPT, conditions=[APG(), APG(eta=0.5)], **RUN)
