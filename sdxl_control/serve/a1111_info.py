"""What the A1111 web API lists and reports, in A1111 1.10's shapes: its samplers and schedule types (those
:mod:`sdxl_control.base.samplers` runs exactly), upscalers and latent upscale modes, the options a client may read and
set, the ``parameters`` of an infotext as ``/sdapi/v1/png-info`` answers them, and the ``info`` JSON of a generation.

The lists are A1111's own (``modules/sd_samplers_kdiffusion.py``, ``modules/sd_schedulers.py``, ``modules/shared.py``
of A1111 1.10, read at Forge dfdcbab6, which keeps them), cut to what this server runs: a client that offers its user
the list never offers what would be refused.

Example:
    >>> [s["name"] for s in SAMPLERS][:3]
    ['DPM++ 2M', 'DPM++ SDE', 'DPM++ 2M SDE']
    >>> parse_parameters("a fox\\nNegative prompt: blur\\nSteps: 2, Seed: 3, Size: 64x32")["Size-1"]
    '64'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..base.errors import InvalidRequestError

__all__ = [
    "SAMPLERS", "SCHEDULERS", "LATENT_UPSCALE_MODES", "sampler_alias", "parse_parameters", "Options",
]  # fmt: skip

# A1111's samplers_k_diffusion entries (label, aliases, options), in its order, for the labels we run
# (base.samplers.A1111_SAMPLERS).
_A1111_SAMPLER_ENTRIES: tuple[tuple[str, list[str], dict[str, Any]], ...] = (
    ("DPM++ 2M", ["k_dpmpp_2m"], {"scheduler": "karras"}),
    ("DPM++ SDE", ["k_dpmpp_sde"], {"scheduler": "karras", "second_order": True, "brownian_noise": True}),
    ("DPM++ 2M SDE", ["k_dpmpp_2m_sde"], {"scheduler": "exponential", "brownian_noise": True}),
    ("DPM++ 2M SDE Heun", ["k_dpmpp_2m_sde_heun"],
     {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"}),
    ("Euler a", ["k_euler_a", "k_euler_ancestral"], {"uses_ensd": True}),
    ("Euler", ["k_euler"], {}),
    ("LMS", ["k_lms"], {}),
    ("Heun", ["k_heun"], {"second_order": True}),
)  # fmt: skip


def _samplers() -> list[dict[str, Any]]:
    from ..base.samplers import A1111_SAMPLERS

    return [
        {"name": name, "aliases": list(aliases), "options": dict(options)}
        for name, aliases, options in _A1111_SAMPLER_ENTRIES
        if name in A1111_SAMPLERS
    ]


SAMPLERS = _samplers()

# A1111's schedule types (name, label, aliases, default_rho, need_inner_model) that base.samplers runs ("Simple" when
# the step count divides 1000; a request that cannot is refused naming it).
SCHEDULERS: list[dict[str, Any]] = [
    {"name": name, "label": label, "aliases": aliases, "default_rho": rho, "need_inner_model": inner}
    for name, label, aliases, rho, inner in (
        ("automatic", "Automatic", None, -1.0, False),
        ("uniform", "Uniform", None, -1.0, True),
        ("karras", "Karras", None, 7.0, False),
        ("exponential", "Exponential", None, -1.0, False),
        ("simple", "Simple", None, -1.0, True),
        ("normal", "Normal", None, -1.0, True),
        ("beta", "Beta", None, -1.0, True),
    )
]

# A1111's latent upscale modes (shared.latent_upscale_modes) -> ours (engine.upscale.LATENT_MODES); its antialiased
# and plain "nearest" modes have no equivalent here.
LATENT_UPSCALE_MODES = {"Latent": "latent", "Latent (bicubic)": "latent-bicubic",
                        "Latent (nearest-exact)": "latent-nearest-exact"}  # fmt: skip


def sampler_alias(name: str) -> str:
    """A1111's sampler label for one of its aliases (``k_euler_a``), as listed by ``/sdapi/v1/samplers``; any other
    name as given."""
    for entry in SAMPLERS:
        if name in entry["aliases"]:
            return str(entry["name"])
    return name


def parse_parameters(text: str) -> dict[str, Any]:
    """An infotext as A1111's ``parse_generation_parameters`` gives it to ``/png-info``: ``Prompt``, ``Negative
    prompt``, each ``Key: value`` of the settings line as a string, ``Size`` also as ``Size-1``/``Size-2``, and its
    default ``Clip skip`` of "1". Read with the PNG importer's reading of the settings line."""
    from ..jobs.png_import import split_infotext

    parts = split_infotext(text)
    items = parts.items
    out: dict[str, Any] = {"Prompt": parts.prompt, "Negative prompt": parts.negative or ""}
    out.update(items)
    size = str(items.get("Size", ""))
    if "x" in size:
        out["Size-1"], out["Size-2"] = (part.strip() for part in size.split("x", 1))
    out.setdefault("Clip skip", "1")
    return out


class Options:
    """The A1111 options this server keeps (``GET``/``POST /sdapi/v1/options``): each with its value now. Those a
    client may set change what the next jobs do; the others report how this server works, and a ``POST`` that
    changes one is refused naming it (a ``POST`` of what ``GET`` returned, as Open WebUI sends, changes nothing)."""

    SETTABLE = ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "live_previews_enable")

    def __init__(self, preview_every: int) -> None:
        self.values: dict[str, Any] = {
            "sd_model_checkpoint": None,  # the server's checkpoint (its title), filled by the state
            "sd_checkpoint_hash": None,  # files are not hashed (the catalogue lists them by name)
            "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1,
            "live_previews_enable": True,
            "show_progress_every_n_steps": preview_every,
            "samples_format": "png",
            "enable_pnginfo": True,
            "samples_save": False,
            "return_grid": False,
            "face_restoration": False,
            "tiling": False,
            "sd_checkpoints_limit": 1,
            # Inpainting models' conditioning mask strength: ours are not used that way, so A1111's default, which
            # the Photoshop plugin sets on start (sdapi.ts setInpaintMaskWeight(1.0)), is what this server does.
            "inpainting_mask_weight": 1.0,
        }

    def check(self, key: str, value: Any) -> Any:
        """``value`` as the option ``key`` keeps it, or refused naming the option (no option is set before every one
        of a request is checked)."""
        if key not in self.values:
            raise InvalidRequestError(
                f"options: {key!r} is not an option of this server (it keeps {', '.join(self.values)})"
            )
        if key == "CLIP_stop_at_last_layers":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= int(value) <= 12:
                raise InvalidRequestError(f"options: CLIP_stop_at_last_layers is 1..12 (A1111's range), got {value!r}")
            return int(value)
        if key == "live_previews_enable":
            if not isinstance(value, bool):
                raise InvalidRequestError(f"options: live_previews_enable is true or false, got {value!r}")
            return value
        if key not in self.SETTABLE and value != self.values[key]:
            raise InvalidRequestError(
                f"options: {key} is {self.values[key]!r} on this server and cannot be changed (got {value!r})"
            )
        return value

    def current(self) -> dict[str, Any]:
        return dict(self.values)


def not_neutral(payload: Mapping[str, Any], neutral: Mapping[str, Sequence[Any]]) -> list[str]:
    """The fields of ``payload`` whose value is not one of those that leave A1111's result as ours (``None`` and
    A1111's defaults, and what its clients send by default)."""
    out = []
    for key, values in neutral.items():
        if key in payload and payload[key] is not None and payload[key] not in values:
            out.append(key)
    return out
