"""What an SDXL UNet predicts (noise, ``"epsilon"``, or velocity, ``"v_prediction"``) and whether its noise schedule
ends at zero SNR: read from a single-file checkpoint's marker keys as ComfyUI and Forge read them, overridden by a
request, and written into the scheduler config diffusers' schedulers take.

* A top-level ``v_pred`` key marks a v-prediction checkpoint; ``ztsnr`` beside it, one trained to zero terminal SNR
  (NoobAI-XL v-pred and its derivatives). ComfyUI (``comfy/supported_models.py`` ``SDXL.model_type``) and Forge
  (``backend/loader.py``, through ``huggingface_guess``) switch on them; diffusers' single-file loader ignores them,
  so a file loaded there as is makes noise.
* Zero terminal SNR is diffusers' ``rescale_betas_zero_snr=True``, with ``timestep_spacing="trailing"`` so the first
  step sits at t=999, the zero-SNR point (ComfyUI a125cd84's default "simple" schedule, ``comfy/samplers.py``
  ``simple_scheduler``, picks the same timesteps; Forge dfdcbab6's default for Euler, ``k_diffusion/external.py``
  ``get_sigmas``, spaces 999..0 evenly: diffusers' ``"linspace"``). One difference remains: diffusers sets the
  last ``alphas_cumprod`` to ``2**-24`` (first sigma ~4096), ComfyUI, Forge and A1111 to ``4.8973451890853435e-08``
  (first sigma ~4519); sdxl-control follows diffusers.
* EDM checkpoints (Playground 2.5's ``edm_mean``/``edm_std``; ``edm_vpred.sigma_max``) are refused by name: their
  sampling is another family.

Example:
    >>> checkpoint_prediction(["model.diffusion_model.out.2.bias", "v_pred", "ztsnr"], "noob.safetensors")
    {'prediction_type': 'v_prediction', 'rescale_betas_zero_snr': True, 'timestep_spacing': 'trailing'}
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import diffusers

from ..base.errors import IncompatibleModelError, InvalidRequestError

__all__ = ["PREDICTION_TYPES", "checkpoint_prediction", "predicted_config", "check_zero_snr", "zero_snr_schedulers"]

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
# What zero terminal SNR sets in a diffusers scheduler config (see the module's docstring for the spacing).
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def checkpoint_prediction(keys: Iterable[str], where: str) -> dict[str, Any]:
    """The scheduler config a single-file checkpoint's marker keys ask for (``{}``: none, an epsilon model), in
    ComfyUI's order of tests; an EDM checkpoint is refused, naming its key."""
    names = set(keys)
    for marks, what in (
        (("edm_mean", "edm_std"), "Playground 2.5's EDM schedule"),
        (("edm_vpred.sigma_max",), "an EDM v-prediction schedule"),
    ):
        if all(m in names for m in marks):
            raise IncompatibleModelError(
                f"{where} carries {' and '.join(repr(m) for m in marks)}: a model trained for {what}, which "
                "sdxl-control does not sample (ComfyUI does); use an epsilon or v-prediction SDXL checkpoint"
            )
    if "v_pred" not in names:
        return {}
    return {"prediction_type": "v_prediction", **(ZERO_SNR if "ztsnr" in names else {})}


def predicted_config(
    config: Mapping[str, Any],
    marked: Mapping[str, Any],
    prediction_type: str | None,
    zero_terminal_snr: bool | None,
    model: str,
) -> dict[str, Any]:
    """The scheduler config a model is sampled with: its own ``config``, what its file's marker keys ask for
    (``marked``, from :func:`checkpoint_prediction`), then a request's overrides (``None`` keeps the model's). An
    override against the model's own is done, with a warning; ``zero_terminal_snr=False`` reads a marked file exactly
    as a release that did not read the markers did; zero terminal SNR for an epsilon model is refused (at t=999 its
    noise estimate would be multiplied by ~4096)."""
    out = {**config, **marked}
    own = out.get("prediction_type", "epsilon")
    if prediction_type is not None:
        if prediction_type != own:
            marker = "a 'v_pred' key in its file" if marked else "its scheduler config; no 'v_pred' key in its file"
            log.warning(
                "%s: prediction_type %r overrides the model's own %r (%s); if it was not trained for %r, the images "
                "will be noise",
                model, prediction_type, own, marker, prediction_type,
            )  # fmt: skip
        out["prediction_type"] = prediction_type
    if zero_terminal_snr is True and not out.get("rescale_betas_zero_snr"):
        out.update(ZERO_SNR)
    elif zero_terminal_snr is False and out.get("rescale_betas_zero_snr"):
        # The model's own spacing: the marker's "trailing" goes with the marker.
        out["rescale_betas_zero_snr"] = False
        if "timestep_spacing" in marked:
            out["timestep_spacing"] = config.get("timestep_spacing", "linspace")
    if out.get("rescale_betas_zero_snr") and out.get("prediction_type", "epsilon") == "epsilon":
        raise InvalidRequestError(
            f"{model}: zero_terminal_snr with an epsilon-prediction model: at the zero-SNR step its noise estimate "
            "is multiplied by ~4096, which only a v-prediction model survives; give prediction_type='v_prediction' "
            "if it is one, or leave zero_terminal_snr out"
        )
    return out


def zero_snr_schedulers() -> list[str]:
    """The named schedulers (:data:`~sdxl_control.base.defaults.SCHEDULERS`) that can sample on a zero-terminal-SNR
    schedule: those whose diffusers class takes ``rescale_betas_zero_snr``."""
    from ..base.defaults import SCHEDULERS

    return [name for name, (cls_name, _) in SCHEDULERS.items() if _takes_zero_snr(cls_name)]


def check_zero_snr(cls_name: str, name: str | None, config: Mapping[str, Any]) -> None:
    """Refuse a scheduler that would silently drop ``rescale_betas_zero_snr`` (diffusers' ``from_config`` ignores
    what a class does not take): it would sample a zero-terminal-SNR model on the plain schedule."""
    if not config.get("rescale_betas_zero_snr"):
        return
    if _takes_zero_snr(cls_name):
        return
    shown = f"{name!r} ({cls_name})" if name is not None and name != cls_name else cls_name
    raise InvalidRequestError(
        f"scheduler {shown} cannot sample on a zero-terminal-SNR schedule (it has no rescale_betas_zero_snr), which "
        f"this model uses: choose one that has it ({', '.join(zero_snr_schedulers())}), or give "
        "zero_terminal_snr=False"
    )


def _takes_zero_snr(cls_name: str) -> bool:
    try:
        return "rescale_betas_zero_snr" in inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    except (TypeError, ValueError, AttributeError):
        return False
