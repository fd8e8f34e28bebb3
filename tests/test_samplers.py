"""Samplers and schedules (issue 36, part 1): every name is a diffusers scheduler our loop runs exactly as diffusers'
own SDXL pipelines do (base alone, and base -> refiner for the second-order ones); DPM++ SDE's Brownian noise is
seeded by the request's seeds and re-made from a recipe; a 0.2 recipe's "dpmpp_sde" keeps its pixels; A1111's and
ComfyUI's names mean here what they mean in each tool, and those diffusers cannot run exactly are listed by name.

The tools' names and schedules follow ComfyUI's comfy/samplers.py and comfy/k_diffusion/sampling.py at Comfy-Org/ComfyUI
a125cd84b054a57729b5eecab930ca9408719832, and A1111's modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py
and sd_schedulers.py as in lllyasviel/stable-diffusion-webui-forge dfdcbab685e57677014f05a3309b48cc87383167 (A1111
1.10 plus Forge's additions; A1111's own sd_schedulers.py at 5bbbda473fc87c161ec7f5351d78b8c43799d436 has the same
list). The schedule formulas in _tool_sigmas were checked against those files' own functions, run on the same model
sigmas (to 1e-6). With their noise left out, ComfyUI's sample_dpmpp_2m, sample_dpmpp_2m_sde (midpoint and heun) and
sample_dpmpp_sde (comfy/k_diffusion/sampling.py, same commit) were run against our schedulers on a toy denoiser:
equal to 1e-6, as are sample_heun, sample_dpm_2 and sample_euler; sample_dpmpp_3m_sde differs from diffusers'
third-order step by 0.1 or more, so the tools' 3M SDE is listed, not mapped, and ComfyUI's sample_lms (a plain denoise
for its last step) by 1e-3 or more, so ComfyUI's lms is listed; A1111's sample_lms (Forge's k_diffusion/sampling.py,
same commit) equals diffusers' LMS.
"""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest
import scipy.stats
import torch

from sdxl_control import GenerationRequest
from sdxl_control.base.defaults import SCHEDULER_ALIASES, SCHEDULERS
from sdxl_control.base.errors import InvalidRequestError
from sdxl_control.base.samplers import (
    A1111_SAMPLERS,
    A1111_UNEXPRESSIBLE,
    A1111_UNEXPRESSIBLE_SCHEDULES,
    COMFYUI_SAMPLERS,
    COMFYUI_UNEXPRESSIBLE,
    COMFYUI_UNEXPRESSIBLE_SCHEDULES,
    tool_scheduler,
)
from sdxl_control.jobs.png_import import read_a1111, read_comfyui
from sdxl_control.protocol.schedule import make_scheduler
from sdxl_control.records.infotext import sampler_label
from sdxl_control.weights.sdxl_configs import SDXL_SCHEDULER

PROMPT = "a lighthouse at dusk"
ARGS = {"steps": 3, "size": (64, 64), "guidance": 5.0, "progress_bar": False}

# The names as the tools list them (see the module docstring for the files and commits).
COMFYUI_SAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
    "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde",
    "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis",
    "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
    "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]  # fmt: skip
COMFYUI_SCHEDULER_NAMES = [
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic", "kl_optimal",
]  # fmt: skip
A1111_SAMPLER_LABELS = [
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a", "Euler",
    "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "HeunPP2", "IPNDM", "IPNDM_V", "DEIS",
    "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM", "DDPM",
]  # fmt: skip
A1111_SCHEDULE_LABELS = [
    "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal", "Align Your Steps",
    "Simple", "Normal", "DDIM", "Beta", "Turbo", "Align Your Steps GITS", "Align Your Steps 11", "Align Your Steps 32",
]  # fmt: skip
# 0.2's table (sdxl_control/defaults.py at e8627a7): every name keeps its meaning but those RENAMED_SCHEDULERS lists.
SCHEDULERS_0_2 = {
    "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}), "ddim": ("DDIMScheduler", {}), "unipc": ("UniPCMultistepScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}), "lcm": ("LCMScheduler", {}),
    "euler_trailing": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "ddim_trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
}  # fmt: skip


def _model_sigmas() -> torch.Tensor:
    """SDXL's 1000 training sigmas (scaled-linear betas), as ComfyUI's ModelSamplingDiscrete and k-diffusion hold them."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def _tool_sigmas(schedule: str, steps: int) -> np.ndarray:
    """The sigmas A1111 and ComfyUI run for ``schedule`` (without the final 0): k-diffusion's get_sigmas_karras and
    get_sigmas_exponential (rho 7), A1111's uniform (k-diffusion DiscreteSchedule.get_sigmas: t = linspace(999, 0),
    sigma interpolated in log) = ComfyUI's normal_scheduler, A1111's beta (alpha = beta = 0.6, linear in sigma) and
    simple_scheduler (the model's sigmas at t = 999 - int(i * 1000 / steps))."""
    sigmas = _model_sigmas()
    low, high = float(sigmas[0]), float(sigmas[-1])
    if schedule == "karras":
        ramp = np.linspace(0, 1, steps)
        return (high ** (1 / 7) + ramp * (low ** (1 / 7) - high ** (1 / 7))) ** 7
    if schedule == "exponential":
        return np.exp(np.linspace(np.log(high), np.log(low), steps))
    if schedule == "beta":
        return low + scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps), 0.6, 0.6) * (high - low)
    if schedule == "simple":
        return np.array([float(sigmas[-(1 + int(x * 1000 / steps))]) for x in range(steps)])
    assert schedule == "uniform"
    t = torch.linspace(999, 0, steps, dtype=torch.float64)
    log = sigmas.log()
    weight = t.frac()
    return ((1 - weight) * log[t.floor().long()] + weight * log[t.ceil().long()]).exp().numpy()


def _run_sigmas(name: str, steps: int) -> np.ndarray:
    """The distinct sigmas a scheduler of ours steps through (second-order ones repeat or interleave theirs)."""
    scheduler = make_scheduler(SDXL_SCHEDULER, name)
    scheduler.set_timesteps(steps)
    sigmas = torch.unique_consecutive(scheduler.sigmas)
    return sigmas[sigmas > 0].double().numpy()


# ---- names -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_name_is_a_config_its_class_takes(name):
    """from_config drops an option its class lacks with a warning only: each of ours must be a real parameter."""
    cls_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    assert set(overrides) <= set(inspect.signature(cls.__init__).parameters), (name, overrides)
    scheduler = make_scheduler(SDXL_SCHEDULER, name)
    assert type(scheduler) is cls and all(scheduler.config[k] == v for k, v in overrides.items())
    scheduler.set_timesteps(3)


def test_names_of_0_2_keep_their_meaning_but_dpmpp_sde():
    changed = {n for n, spec in SCHEDULERS_0_2.items() if SCHEDULERS[n] != spec}
    assert changed == {"dpmpp_sde"} and SCHEDULERS["dpmpp_sde"] == ("DPMSolverSDEScheduler", {})


@pytest.mark.parametrize(
    ("name", "label"),
    [("dpmpp_2m_sde_exponential", ("DPM++ 2M SDE", "Exponential")), ("dpmpp_2m_sde_heun", ("DPM++ 2M SDE Heun", None)),
     ("dpmpp_3m_sde_karras", ("DPM++ 3M SDE", "Karras")), ("dpmpp_sde_karras", ("DPM++ SDE", "Karras")),
     ("dpm2_a_beta", ("DPM2 a", "Beta")), ("lms_linspace", ("LMS", "Uniform")), ("euler_a_trailing", ("Euler a", "SGM Uniform")),
     ("tcd", ("TCDScheduler", None)), ("DPMSolverSinglestepScheduler", ("DPMSolverSinglestepScheduler", None))],
)  # fmt: skip
def test_a1111_labels_written_for_the_new_samplers(name, label):
    """As A1111 writes "Sampler" and "Schedule type"; what it has no label for keeps diffusers' class name."""
    scheduler = make_scheduler(SDXL_SCHEDULER, name)
    assert sampler_label(type(scheduler).__name__, scheduler.config) == label


# ---- equal to diffusers' pipelines --------------------------------------------------------------------------------

# Our name -> the scheduler diffusers' docs and sources give for it, spelled out here rather than read from our table.
REFERENCES = {
    "dpmpp_2m_sde_exponential": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                 "use_exponential_sigmas": True}),
    "dpmpp_2m_sde_heun_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                 "solver_type": "heun", "use_karras_sigmas": True}),
    "dpmpp_3m_sde_beta": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                                          "use_beta_sigmas": True}),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True, "timestep_spacing": "linspace"}),
    "dpm2_linspace": ("KDPM2DiscreteScheduler", {"timestep_spacing": "linspace"}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "linspace"}),
    "lms_exponential": ("LMSDiscreteScheduler", {"use_exponential_sigmas": True, "timestep_spacing": "linspace"}),
    "heun_beta": ("HeunDiscreteScheduler", {"use_beta_sigmas": True, "timestep_spacing": "linspace"}),
    "unipc_karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "euler_a_linspace": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "ddim_linspace": ("DDIMScheduler", {"timestep_spacing": "linspace"}),
    "tcd": ("TCDScheduler", {}),
}  # fmt: skip
SECOND_ORDER = ["dpmpp_sde_karras", "dpm2_a_karras"]  # Heun: tests/test_handoff_equivalence.py


def _reference(sdxl_pipes, name, seeds, switch=None):
    """diffusers' own pipelines with the scheduler REFERENCES names (DPM++ SDE's noise seeded as ours: one Brownian
    tree per image, on that image's seed), base alone or handing over at ``switch``."""
    base, refiner = sdxl_pipes
    cls_name, overrides = REFERENCES[name]
    if cls_name == "DPMSolverSDEScheduler":
        overrides = {**overrides, "noise_sampler_seed": list(seeds)}
    base.scheduler = getattr(diffusers, cls_name).from_config(SDXL_SCHEDULER, **overrides)
    refiner.scheduler = getattr(diffusers, cls_name).from_config(SDXL_SCHEDULER, **overrides)
    common = {
        "num_inference_steps": ARGS["steps"], "guidance_scale": ARGS["guidance"], "num_images_per_prompt": len(seeds),
        "generator": [torch.Generator().manual_seed(s) for s in seeds], "output_type": "latent",
        # TCD's gamma: our loop steps with the scheduler's default (0.3, as TCD's authors advise); the pipeline's
        # default eta is 0.
        **({"eta": 0.3} if cls_name == "TCDScheduler" else {}),
    }  # fmt: skip
    if switch is None:
        return base(PROMPT, height=64, width=64, **common).images
    handed = base(PROMPT, height=64, width=64, denoising_end=switch, **common).images
    return refiner(PROMPT, image=handed, denoising_start=switch, **common).images


@pytest.mark.parametrize("name", list(REFERENCES))
def test_each_new_sampler_equals_diffusers_pipeline(generator, sdxl_pipes, name):
    ours = generator.generate(PROMPT, seed=7, scheduler=name, **ARGS)
    torch.testing.assert_close(ours.latents, _reference(sdxl_pipes, name, [7]), rtol=0, atol=0)


@pytest.mark.parametrize("name", SECOND_ORDER)
def test_second_order_samplers_hand_off_to_the_refiner_as_diffusers_does(generator, sdxl_pipes, name):
    """Two UNet calls a step, on interleaved timesteps: the split keeps a step's two halves in one stage."""
    ours = generator.generate(PROMPT, seed=3, scheduler=name, refiner_switch=0.6, **ARGS)
    torch.testing.assert_close(ours.latents, _reference(sdxl_pipes, name, [3], switch=0.6), rtol=0, atol=0)


# ---- DPM++ SDE: seeded, reproducible, re-made --------------------------------------------------------------------


def test_dpmpp_sde_noise_is_the_requests_seeds(generator):
    first = generator.generate(PROMPT, seed=11, num_images=2, scheduler="dpmpp_sde", **ARGS)
    again = generator.generate(PROMPT, seed=11, num_images=2, scheduler="dpmpp_sde", **ARGS)
    assert torch.equal(first.latents, again.latents)
    assert first.recipes[0]["scheduler"]["config"]["noise_sampler_seed"] == [11, 12]
    # One tree per image, on its own seed: the batch's second image is the image of seed 12 alone.
    # (To the UNet's last bits: CPU kernels round a batch of 2 and of 1 differently. A tree for the whole batch
    # would give another image altogether.)
    alone = generator.generate(PROMPT, seed=12, scheduler="dpmpp_sde", **ARGS)
    torch.testing.assert_close(first.latents[1:], alone.latents, rtol=1e-4, atol=1e-4)
    # The Brownian noise acts: a tree on other seeds (initial noise unchanged) gives another image.
    other = generator.generate(PROMPT, seed=11, num_images=2, scheduler="dpmpp_sde",
                               scheduler_options={"noise_sampler_seed": [5, 6]}, **ARGS)  # fmt: skip
    assert not torch.equal(first.latents, other.latents)
    remade = generator.run(GenerationRequest.from_recipe(first.recipes[1]), progress_bar=False)
    assert torch.equal(remade.latents, first.latents)


@pytest.mark.parametrize("version", ["0.2.0", "0.3.0"])
def test_a_0_2_recipe_of_dpmpp_sde_re_makes_its_pixels(generator, sdxl_pipes, version):
    """0.2 ran "dpmpp_sde" as DPMSolverSinglestepScheduler; its recipes keep that, newer ones run DPM++ SDE."""
    recipe = generator.generate(PROMPT, seed=5, scheduler="dpmpp_sde", **ARGS).recipes[0]
    request = GenerationRequest.from_recipe({**recipe, "version": version})
    ours = generator.run(request, progress_bar=False)
    base, _ = sdxl_pipes
    if version == "0.2.0":
        base.scheduler = diffusers.DPMSolverSinglestepScheduler.from_config(SDXL_SCHEDULER)
    else:
        base.scheduler = diffusers.DPMSolverSDEScheduler.from_config(SDXL_SCHEDULER, noise_sampler_seed=[5])
    ref = base(PROMPT, height=64, width=64, num_inference_steps=3, guidance_scale=5.0, output_type="latent",
               generator=[torch.Generator().manual_seed(5)]).images  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, rtol=0, atol=0)


# ---- the tools' names ---------------------------------------------------------------------------------------------


def test_every_tool_name_is_mapped_or_listed():
    assert set(COMFYUI_SAMPLER_NAMES) == set(COMFYUI_SAMPLERS) | set(COMFYUI_UNEXPRESSIBLE)
    assert set(A1111_SAMPLER_LABELS) == set(A1111_SAMPLERS) | set(A1111_UNEXPRESSIBLE)
    for name in COMFYUI_SCHEDULER_NAMES:
        assert "unknown" not in tool_scheduler("ComfyUI", "euler", name, [20])[1], name
    for label in A1111_SCHEDULE_LABELS:
        assert "unknown" not in tool_scheduler("A1111", "Euler", label, [20])[1], label
    assert set(COMFYUI_UNEXPRESSIBLE_SCHEDULES) <= set(COMFYUI_SCHEDULER_NAMES)
    assert set(A1111_UNEXPRESSIBLE_SCHEDULES) <= {s.casefold() for s in A1111_SCHEDULE_LABELS} | {
        "sgm_uniform",
        "sgmuniform",
    }


@pytest.mark.parametrize(
    ("tool", "sampler", "schedule", "ours"),
    [("A1111", "DPM++ 2M", "Automatic", "dpmpp_2m_karras"), ("A1111", "DPM++ SDE", "Automatic", "dpmpp_sde_karras"),
     ("A1111", "DPM++ 2M SDE", "Automatic", "dpmpp_2m_sde_exponential"),
     ("A1111", "DPM++ 2M SDE Heun", "Automatic", "dpmpp_2m_sde_heun_exponential"),
     ("A1111", "Euler", "Automatic", "euler_linspace"), ("A1111", "LMS", "Beta", "lms_beta"),
     ("A1111", "Heun", "Normal", "heun_linspace"),
     # Before 1.9 (no "Schedule type"): a plain label ran the model's sigmas, a combined one names its schedule.
     ("A1111", "DPM++ 2M", None, "dpmpp_2m_linspace"), ("A1111", "DPM++ 2M SDE Karras", None, "dpmpp_2m_sde_karras"),
     ("A1111", "DPM++ SDE Karras", None, "dpmpp_sde_karras"), ("A1111", "LMS Karras", None, "lms_karras"),
     ("A1111", "DPM++ 2M SDE Heun Exponential", None, "dpmpp_2m_sde_heun_exponential"),
     ("ComfyUI", "euler", "normal", "euler_linspace"), ("ComfyUI", "ddim", "normal", "euler_linspace"),
     ("ComfyUI", "dpmpp_2m_sde_gpu", "karras", "dpmpp_2m_sde_karras"), ("ComfyUI", "dpmpp_sde", "simple", "dpmpp_sde_trailing"),
     ("ComfyUI", "euler_ancestral", "normal", "euler_a_linspace"),
     ("ComfyUI custom", "dpm_2", "karras", "dpm2_karras")],
)  # fmt: skip
def test_tool_names_with_each_tools_meaning(tool, sampler, schedule, ours):
    assert tool_scheduler(tool, sampler, schedule, [20]) == (ours, "")


@pytest.mark.parametrize(
    ("tool", "sampler", "schedule", "why"),
    [("A1111", "DPM2 a", "Automatic", "next-to-last sigma"), ("A1111", "DPM++ 3M SDE Exponential", None, "next-to-last"),
     ("A1111", "DPM++ 2S a", "Karras", "single-step ancestral"), ("A1111", "Euler a", "Karras", "no karras schedule"),
     ("A1111", "Euler", "SGM Uniform", "fractional timesteps"), ("A1111", "Euler", "Align Your Steps", "interpolates"),
     ("A1111", "DDIM", "Automatic", "DDIM loop"), ("A1111", "UniPC", "Automatic", "order 3"),
     ("ComfyUI", "dpm_2", "karras", "next-to-last sigma"), ("ComfyUI", "uni_pc_bh2", "normal", "next-to-last sigma"),
     ("ComfyUI", "euler", "beta", "model's own sigmas"), ("ComfyUI", "euler", "sgm_uniform", "fractional"),
     ("ComfyUI", "euler", "ddim_uniform", "1000 // steps"), ("ComfyUI", "dpmpp_3m_sde", "karras", "third-order"),
     ("ComfyUI", "euler_cfg_pp", "normal", "CFG++"), ("ComfyUI", "lcm", "sgm_uniform", "sample_lcm"),
     ("ComfyUI", "lms", "karras", "plain denoise")],
)  # fmt: skip
def test_what_diffusers_cannot_run_exactly_is_listed_with_the_reason(tool, sampler, schedule, why):
    name, reason = tool_scheduler(tool, sampler, schedule, [20])
    assert name is None and why in reason


@pytest.mark.parametrize("steps", [2, 3, 4, 7, 10, 20, 30])
@pytest.mark.parametrize(
    ("tool", "sampler", "schedule"),
    [("A1111", "Euler", "Automatic"), ("A1111", "DPM++ 2M", "Automatic"), ("A1111", "DPM++ SDE", "Karras"),
     ("A1111", "DPM++ 2M SDE", "Automatic"), ("A1111", "LMS", "Beta"), ("A1111", "Heun", "Exponential"),
     ("A1111", "Euler a", "Uniform"), ("ComfyUI", "heun", "normal"),
     ("ComfyUI", "euler", "simple"), ("ComfyUI", "dpmpp_2m", "karras"), ("ComfyUI custom", "dpm_2_ancestral", "karras")],
)  # fmt: skip
def test_mapped_schedules_run_the_tools_sigmas(tool, sampler, schedule, steps):
    """Where a name maps, its scheduler steps through the sigmas the tool computes, to float32's precision."""
    name, why = tool_scheduler(tool, sampler, schedule, [steps])
    kind = {"automatic": {"Euler": "uniform", "DPM++ 2M": "karras", "DPM++ 2M SDE": "exponential"}.get(sampler),
            "normal": "uniform"}.get(schedule.casefold(), schedule.casefold())  # fmt: skip
    if name is None:  # only "simple" at step counts where it is not trailing
        assert schedule == "simple" and steps in (3, 7, 30) and "divides 1000" in why
        return
    np.testing.assert_allclose(_run_sigmas(name, steps), _tool_sigmas(kind, steps), rtol=5e-5)


def test_imports_restore_the_sampler_or_list_it():
    a1111 = read_a1111("a fox\nSteps: 12, Sampler: DPM++ 2M SDE Karras, CFG scale: 5, Seed: 1")
    assert a1111.settings["scheduler"] == "dpmpp_2m_sde_karras"
    graph = {
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 7, "cfg": 5.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    }  # fmt: skip
    comfy = read_comfyui(graph)
    assert "scheduler" not in comfy.settings
    assert any(u.startswith("KSampler (node 3): the 'simple' schedule with 7 steps") for u in comfy.unmapped)


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [({"scheduler": "dpmpp_2m_sde_karas"}, "unknown scheduler 'dpmpp_2m_sde_karas' (did you mean 'dpmpp_2m_sde_karras'?)"),
     ({"scheduler": "DPM++ 2M SDE Karas"}, "(did you mean 'dpm++ 2m sde karras'?)"),
     ({"scheduler": "euler_a_karras"}, "EulerAncestralDiscreteScheduler takes no karras schedule; use 'euler_a' or one"),
     ({"scheduler": "tcd_trailing"}, "use 'tcd' (it runs its own)"),
     ({"scheduler": "dpmpp_sde", "timesteps": (999, 499)}, "DPMSolverSDEScheduler takes no timestep list"),
     ({"scheduler": "dpmpp_2m_karras", "timesteps": (999, 499)}, "its use_karras_sigmas places the sigmas itself"),
     ({"scheduler": "DPM++ 2S a"}, "A1111's DPM++ 2S a cannot run here exactly: diffusers has no single-step ancestral"),
     ({"scheduler": "Euler a Karras"}, "A1111's Euler a Karras cannot run here exactly: diffusers' EulerAncestral"),
     ({"scheduler": "res_multistep"}, "ComfyUI's res_multistep cannot run here exactly: diffusers has no")],
)  # fmt: skip
def test_bad_sampler_names_are_refused_before_anything_loads(options, message):
    with pytest.raises(InvalidRequestError) as error:
        GenerationRequest(PROMPT, **options)
    assert message in str(error.value)


def test_tool_names_are_accepted_as_requests():
    assert GenerationRequest(PROMPT, scheduler="DPM++ 2M SDE Karras").scheduler == "dpmpp_2m_sde_karras"
    assert GenerationRequest(PROMPT, scheduler="dpm_2_ancestral").scheduler == "dpm2_a"
    assert all(target in SCHEDULERS for target in SCHEDULER_ALIASES.values())
