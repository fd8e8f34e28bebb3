"""Samplers and schedules by name: ours, and what A1111's and ComfyUI's names for them mean here.

Our scheduler names are a sampler, then optionally a schedule: ``dpmpp_2m_sde_karras`` is DPM++ 2M SDE on Karras
sigmas, ``euler_linspace`` is Euler on evenly spaced timesteps (A1111's "Uniform", ComfyUI's "normal"); a sampler
alone keeps the model's own schedule (SDXL's: "leading" timesteps). Each name is a diffusers scheduler class and the
config it is built with, so a name means exactly what diffusers' own pipeline does with that scheduler.

A1111's and ComfyUI's names are read with each tool's own meaning (A1111's "Beta" is diffusers' beta sigmas, ComfyUI's
"beta" is not; A1111's "DPM++ 2M" with its "Automatic" schedule is Karras). Those diffusers cannot run exactly are
listed with the reason, in :data:`A1111_UNEXPRESSIBLE` and the like, never replaced by something close.

Example:
    >>> SCHEDULER_TABLE["dpmpp_2m_sde_karras"]
    ('DPMSolverMultistepScheduler', {'algorithm_type': 'sde-dpmsolver++', 'use_karras_sigmas': True})
    >>> "euler_a_karras" in SCHEDULER_TABLE  # diffusers' Euler ancestral takes no sigma schedule
    False
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "SAMPLERS", "SCHEDULES", "SCHEDULER_TABLE", "RENAMED_SCHEDULERS", "SAMPLER_ALIASES",
    "A1111_SAMPLERS", "A1111_DEFAULT_SCHEDULES", "A1111_SCHEDULES", "A1111_UNEXPRESSIBLE",
    "A1111_UNEXPRESSIBLE_SCHEDULES", "COMFYUI_SAMPLERS", "COMFYUI_SCHEDULES", "COMFYUI_UNEXPRESSIBLE",
    "COMFYUI_UNEXPRESSIBLE_SCHEDULES", "tool_scheduler",
]  # fmt: skip

# Our samplers: (diffusers class, config overrides).
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_heun": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    # k-diffusion's sample_dpmpp_sde (A1111's "DPM++ SDE"): a Brownian tree, seeded from the request's seeds.
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
# Schedules: the suffix of a name -> config overrides. Karras, exponential and beta place the sigmas themselves;
# trailing and linspace space the timesteps.
SCHEDULES: dict[str, dict[str, Any]] = {
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
}
_SIGMA_SCHEDULES = ("karras", "exponential", "beta")
# Samplers whose diffusers class has no sigma schedule (no use_karras_sigmas: from_config would drop it silently).
_NO_SIGMA_SCHEDULE = ("euler_a", "ddim")
# LCM and TCD run their own skipping schedule (original_inference_steps); spacing options do not apply to it.
_NO_SCHEDULE = ("lcm", "tcd")
# These classes take a sigma schedule's ends from the sigmas at their spaced timesteps (SDXL's "leading" spacing
# starts at t=901 of 999 for 10 steps: sigma_max 8.39 instead of 14.61); linspace gives the model's whole range, which
# A1111's and ComfyUI's Karras, exponential and beta use. The DPM-Solver and UniPC classes use the whole range anyway.
_SPACED_SIGMA_ENDS = ("euler", "heun", "lms", "dpm2", "dpm2_a", "dpmpp_sde")


def _table() -> dict[str, tuple[str, dict[str, Any]]]:
    table: dict[str, tuple[str, dict[str, Any]]] = {}
    for sampler, (cls, options) in SAMPLERS.items():
        table[sampler] = (cls, options)
        if sampler in _NO_SCHEDULE:
            continue
        for schedule, extra in SCHEDULES.items():
            if schedule in _SIGMA_SCHEDULES and sampler in _NO_SIGMA_SCHEDULE:
                continue
            if schedule in _SIGMA_SCHEDULES and sampler in _SPACED_SIGMA_ENDS:
                extra = {**extra, "timestep_spacing": "linspace"}
            table[f"{sampler}_{schedule}"] = (cls, {**options, **extra})
    return table


# Every scheduler name: sampler [+ schedule] -> (diffusers class, config overrides).
SCHEDULER_TABLE = _table()

# Names whose meaning changed in 0.3.0 -> what they ran before, so that a recipe recorded by 0.2 re-makes its pixels:
# 0.2's "dpmpp_sde" was DPMSolverSinglestepScheduler (as diffusers' docs table has it), not A1111's DPM++ SDE.
RENAMED_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {"dpmpp_sde": ("DPMSolverSinglestepScheduler", {})}

# A1111's sampler labels (modules/sd_samplers_kdiffusion.py, 1.9+; Forge HEAD dfdcbab6) -> our samplers.
A1111_SAMPLERS = {
    "Euler": "euler", "Euler a": "euler_a", "Heun": "heun", "LMS": "lms", "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M SDE": "dpmpp_2m_sde", "DPM++ 2M SDE Heun": "dpmpp_2m_sde_heun", "DPM++ SDE": "dpmpp_sde",
}  # fmt: skip
# The schedule A1111 1.9+ runs for "Schedule type: Automatic" (its samplers' options['scheduler']); the others run the
# model's sigmas at evenly spaced timesteps, "Uniform" (k-diffusion's get_sigmas), which is diffusers' linspace.
A1111_DEFAULT_SCHEDULES = {
    "DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2M SDE": "exponential", "DPM++ 2M SDE Heun": "exponential",
}  # fmt: skip
# A1111's schedule types (modules/sd_schedulers.py, labels and names) -> our schedules. A1111's Beta is
# sigma_min + ppf(alpha=beta=0.6) * (sigma_max - sigma_min), diffusers' use_beta_sigmas; "Normal" places
# linspace(t_max, t_min) = linspace(999, 0), as "Uniform" does. "Simple" maps only where its timesteps are trailing's
# (see _simple_is_trailing).
A1111_SCHEDULES = {
    "uniform": "linspace", "normal": "linspace", "karras": "karras", "exponential": "exponential", "beta": "beta",
    "simple": "trailing",
}  # fmt: skip
_SGM = (
    "it places steps at fractional timesteps, linspace(999, 0, steps + 1)[:-1]; diffusers' trailing spacing rounds "
    "them to whole timesteps (sigmas up to 1% apart)"
)
_DISCARDS = "it drops the next-to-last sigma of a schedule one step longer, which diffusers' {cls} cannot"
_TIMESTEPS_SAMPLER = "A1111 runs its own {what}, which diffusers' {cls} does not follow"
# A1111 samplers and schedule types diffusers cannot run exactly -> why.
A1111_UNEXPRESSIBLE = {
    "DPM2": _DISCARDS.format(cls="KDPM2DiscreteScheduler"),
    "DPM2 a": _DISCARDS.format(cls="KDPM2AncestralDiscreteScheduler"),
    "DPM++ 3M SDE": _DISCARDS.format(cls="DPMSolverMultistepScheduler"),
    "DPM++ 2S a": "diffusers has no single-step ancestral DPM++ solver",
    "DPM fast": "diffusers has no DPM-Solver-fast", "DPM adaptive": "diffusers has no adaptive DPM-Solver",
    "Restart": "diffusers has no Restart sampler",
    "DDIM": _TIMESTEPS_SAMPLER.format(what="DDIM loop (timesteps 1000 // steps apart from 1, one step fewer)",
                                      cls="DDIMScheduler"),
    "DDIM CFG++": "diffusers has no CFG++ sampler", "PLMS": "diffusers' PNDMScheduler is another PLMS",
    "UniPC": _TIMESTEPS_SAMPLER.format(what="UniPC (order 3, bh1 by default)", cls="UniPCMultistepScheduler"),
    "LCM": "A1111's LCM is k-diffusion's sample_lcm on its sigmas, not diffusers' LCMScheduler schedule",
    "HeunPP2": "diffusers has no Heun++ sampler", "IPNDM": "diffusers' IPNDMScheduler is another IPNDM",
    "IPNDM_V": "diffusers has no variable-step IPNDM", "DEIS": "diffusers' DEISMultistepScheduler is another DEIS",
    "DDPM": "Forge's DDPM is k-diffusion's, not diffusers' DDPMScheduler",
}  # fmt: skip
A1111_UNEXPRESSIBLE_SCHEDULES = {
    "sgm uniform": _SGM, "sgm_uniform": _SGM, "sgmuniform": _SGM,
    "polyexponential": "diffusers has no polyexponential schedule", "kl optimal": "diffusers has no KL-optimal schedule",
    "ddim": "diffusers has no schedule of every (1000 // steps)-th model sigma",
    "align your steps": "A1111 interpolates Align Your Steps' 11 sigmas to the step count (ComfyUI to one more); only "
    "diffusers' Euler and UniPC take a sigma list, and a request has none",
    "align your steps gits": "diffusers has no GITS schedule", "align your steps 11": "Forge's own schedule",
    "align your steps 32": "Forge's own schedule", "turbo": "Forge's own schedule",
}  # fmt: skip

# ComfyUI's sampler_name (comfy/samplers.py KSAMPLER_NAMES + SAMPLER_NAMES, Comfy-Org/ComfyUI a125cd84) -> ours.
# Its *_gpu samplers differ from the plain ones only in where their Brownian noise is drawn, and ComfyUI's noise is
# never ours; "ddim" is its Euler sampler (sampler_object maps it to ksampler("euler")).
COMFYUI_SAMPLERS = {
    "euler": "euler", "ddim": "euler", "euler_ancestral": "euler_a", "heun": "heun",
    "dpmpp_2m": "dpmpp_2m", "dpmpp_2m_sde": "dpmpp_2m_sde", "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
    "dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun",
    "dpmpp_sde": "dpmpp_sde", "dpmpp_sde_gpu": "dpmpp_sde",
}  # fmt: skip
# ComfyUI's schedulers (SCHEDULER_HANDLERS) -> ours. Its "normal" is linspace(t_max, t_min, steps) + [0], as
# diffusers' linspace; its "simple" maps only where its timesteps are trailing's (see _simple_is_trailing).
COMFYUI_SCHEDULES = {"normal": "linspace", "karras": "karras", "exponential": "exponential", "simple": "trailing"}
_COMFY_DISCARDS = (
    "ComfyUI drops its next-to-last sigma (DISCARD_PENULTIMATE_SIGMA_SAMPLERS), which diffusers' {cls} cannot"
)
COMFYUI_UNEXPRESSIBLE = {
    "dpm_2": _COMFY_DISCARDS.format(cls="KDPM2DiscreteScheduler"),
    "dpm_2_ancestral": _COMFY_DISCARDS.format(cls="KDPM2AncestralDiscreteScheduler"),
    "uni_pc": _COMFY_DISCARDS.format(cls="UniPCMultistepScheduler"),
    "uni_pc_bh2": _COMFY_DISCARDS.format(cls="UniPCMultistepScheduler"),
    "dpmpp_3m_sde": "k-diffusion's third-order SDE step is not diffusers' DPMSolverMultistepScheduler's",
    "dpmpp_3m_sde_gpu": "k-diffusion's third-order SDE step is not diffusers' DPMSolverMultistepScheduler's",
    "dpmpp_2s_ancestral": "diffusers has no single-step ancestral DPM++ solver",
    "lms": "ComfyUI's lms ends on a plain denoise (x = denoised) where diffusers' LMSDiscreteScheduler (and A1111's "
    "LMS) takes a last multistep step",
    "lcm": "ComfyUI's lcm is k-diffusion's sample_lcm on its sigmas, not diffusers' LCMScheduler schedule",
    "ddpm": "ComfyUI's ddpm is k-diffusion's, not diffusers' DDPMScheduler",
    "dpm_fast": "diffusers has no DPM-Solver-fast", "dpm_adaptive": "diffusers has no adaptive DPM-Solver",
    "ipndm": "diffusers' IPNDMScheduler is another IPNDM", "ipndm_v": "diffusers has no variable-step IPNDM",
    "deis": "diffusers' DEISMultistepScheduler is another DEIS", "heunpp2": "diffusers has no Heun++ sampler",
}  # fmt: skip
COMFYUI_UNEXPRESSIBLE_SCHEDULES = {
    "sgm_uniform": _SGM,
    "beta": "ComfyUI's beta picks the model's own sigmas at the beta quantiles and drops repeats; diffusers' beta "
    "sigmas are spaced linearly between sigma_min and sigma_max",
    "ddim_uniform": "diffusers has no schedule of every (1000 // steps)-th model sigma from timestep 1",
    "linear_quadratic": "diffusers has no linear-quadratic schedule", "kl_optimal": "diffusers has no KL-optimal schedule",
}  # fmt: skip
_NO_CFG_PP = "CFG++ changes the guidance itself; diffusers has no such sampler"
for _name in ("euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp",
              "res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp", "gradient_estimation_cfg_pp"):  # fmt: skip
    COMFYUI_UNEXPRESSIBLE[_name] = _NO_CFG_PP
for _name in ("res_multistep", "res_multistep_ancestral", "gradient_estimation", "er_sde", "seeds_2", "seeds_3",
              "sa_solver", "sa_solver_pece"):  # fmt: skip
    COMFYUI_UNEXPRESSIBLE[_name] = f"diffusers has no {_name} sampler"

# Names users type for our samplers and schedules (A1111's labels, alone or with a schedule label as its old
# combined labels were, and ComfyUI's sampler names); matched without regard to case.
_A1111_SCHEDULE_LABELS = {"Karras": "karras", "Exponential": "exponential", "Beta": "beta",
                          "SGM Uniform": "trailing", "Uniform": "linspace"}  # fmt: skip
SAMPLER_ALIASES: dict[str, str] = {
    **{label.casefold(): ours for label, ours in A1111_SAMPLERS.items()},
    **{
        f"{label} {schedule_label}".casefold(): f"{ours}_{schedule}"
        for label, ours in {**A1111_SAMPLERS, "DPM2": "dpm2", "DPM2 a": "dpm2_a", "DPM++ 3M SDE": "dpmpp_3m_sde",
                            "UniPC": "unipc", "DDIM": "ddim"}.items()  # fmt: skip
        for schedule_label, schedule in _A1111_SCHEDULE_LABELS.items()
        if f"{ours}_{schedule}" in SCHEDULER_TABLE
    },
    "dpm2": "dpm2", "dpm2 a": "dpm2_a", "dpm++ 3m sde": "dpmpp_3m_sde", "unipc": "unipc", "ddim": "ddim", "lcm": "lcm",
    "euler_ancestral": "euler_a", "dpm_2": "dpm2", "dpm_2_ancestral": "dpm2_a", "uni_pc": "unipc",
    "uni_pc_bh2": "unipc",
}  # fmt: skip

# A1111's schedule labels that an old (before 1.9) combined sampler label ends with, as its get_sampler_and_scheduler
# strips them ("DPM++ 2M SDE Karras" is DPM++ 2M SDE on Karras); longest first, so "SGM Uniform" is not "Uniform".
_A1111_SUFFIXES = sorted([*A1111_SCHEDULES, *A1111_UNEXPRESSIBLE_SCHEDULES, "automatic"], key=len, reverse=True)


def _a1111_label(label: str) -> str | None:
    known = [*A1111_SAMPLERS, *A1111_UNEXPRESSIBLE]
    return next((k for k in known if k.casefold() == label.casefold()), None)


def _simple_is_trailing(steps: int) -> bool:
    """Whether A1111's and ComfyUI's "simple" schedule (the model's sigmas at t = 999 - int(i * 1000 / steps)) runs the
    timesteps diffusers' trailing spacing does (round(1000 - i * 1000 / steps) - 1): when steps divides 1000."""
    import numpy as np

    simple = [999 - int(i * 1000 / steps) for i in range(steps)]
    trailing = (np.round(np.arange(1000, 0, -1000 / steps)) - 1).astype(int).tolist()
    return simple == trailing


def tool_scheduler(tool: str, sampler: str, schedule: str | None, steps: Sequence[int] = ()) -> tuple[str | None, str]:
    """Our scheduler name for a sampler and schedule as ``tool`` names them (and ""), or ``None`` and why diffusers
    cannot run it exactly.

    ``tool`` is "A1111", "ComfyUI" (its KSampler, which drops the next-to-last sigma for some samplers) or "ComfyUI
    custom" (SamplerCustom's KSamplerSelect, which runs the sigmas it is given). ``schedule`` is A1111's "Schedule
    type" (``None``: an infotext written before 1.9, whose plain labels ran the model's own sigmas, evenly spaced) or
    ComfyUI's scheduler. ``steps``: the step counts the schedule runs with (the "simple" schedule is exact for some).

    Example:
        >>> tool_scheduler("A1111", "DPM++ 2M", "Automatic")
        ('dpmpp_2m_karras', '')
        >>> tool_scheduler("A1111", "Euler a Karras", None)[1]
        "diffusers' EulerAncestralDiscreteScheduler takes no karras schedule"
    """
    kind = (schedule or "").strip().casefold()
    if tool.startswith("ComfyUI"):
        found: str | None = sampler.strip()
        samplers, schedules = COMFYUI_SAMPLERS, COMFYUI_SCHEDULES
        unexpressible, unexpressible_schedules = COMFYUI_UNEXPRESSIBLE, COMFYUI_UNEXPRESSIBLE_SCHEDULES
        if tool == "ComfyUI custom":  # no sigma dropped: ComfyUI's dpm_2 and dpm_2_ancestral are diffusers' KDPM2
            samplers = {**samplers, "dpm_2": "dpm2", "dpm_2_ancestral": "dpm2_a"}
            unexpressible = {k: v for k, v in unexpressible.items() if k not in samplers}
    else:
        found = _a1111_label(sampler.strip())
        if found is None:  # an old combined label, "DPM++ 2M Karras"
            for suffix in _A1111_SUFFIXES:
                head = sampler.strip()[: -len(suffix) - 1]
                if sampler.strip().casefold().endswith(" " + suffix) and _a1111_label(head) is not None:
                    return tool_scheduler(tool, head, suffix)
        samplers, schedules = A1111_SAMPLERS, A1111_SCHEDULES
        unexpressible, unexpressible_schedules = A1111_UNEXPRESSIBLE, A1111_UNEXPRESSIBLE_SCHEDULES
        if not kind:  # no "Schedule type": A1111 before 1.9 ran the model's sigmas (Uniform) for a plain label
            kind = "uniform"
        elif kind == "automatic":
            kind = A1111_DEFAULT_SCHEDULES.get(found or "", "uniform")
    if found in unexpressible:
        return None, unexpressible[found]
    if found not in samplers:
        return None, f"{tool} sampler {sampler!r} is unknown here"
    if kind in unexpressible_schedules:
        return None, f"the {schedule!r} schedule: {unexpressible_schedules[kind]}"
    if kind not in schedules:
        return None, f"{tool} schedule {schedule!r} is unknown here"
    if kind == "simple" and not (steps and all(_simple_is_trailing(n) for n in steps)):
        counts = f" with {', '.join(str(n) for n in steps)} steps" if steps else " (no step count given)"
        why = "its timesteps (999 - int(i * 1000 / steps)) are diffusers' trailing ones only when the step count divides 1000"
        return None, f"the {schedule!r} schedule{counts}: {why}"
    ours, suffix = samplers[found], schedules[kind]
    if f"{ours}_{suffix}" not in SCHEDULER_TABLE:
        return None, f"diffusers' {SAMPLERS[ours][0]} takes no {suffix} schedule"
    return f"{ours}_{suffix}", ""
