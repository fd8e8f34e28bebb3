"""Errors sdxl-control raises on purpose: each says what is wrong and what to do about it."""

from __future__ import annotations

__all__ = [
    "SdxlControlError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "MissingWeightsError",
    "IncompatibleModelError",
    "CheckpointError",
    "ConditionError",
]


class SdxlControlError(Exception):
    """Base class of every error sdxl-control raises deliberately."""


class InvalidRequestError(SdxlControlError, ValueError):
    """A generation request that cannot be run as asked (bad size, step count, switch point...)."""


class ModelNotFoundError(SdxlControlError, FileNotFoundError):
    """A model path that does not exist."""


class MissingWeightsError(SdxlControlError):
    """Weights that are neither on disk nor reachable; the message says how to fetch them."""


class IncompatibleModelError(SdxlControlError):
    """A model that exists but is not what was asked for (e.g. an SD 1.5 UNet where SDXL is needed)."""


class CheckpointError(SdxlControlError):
    """A weights file that cannot be read safely: corrupt, truncated, or a pickle."""


class ConditionError(SdxlControlError, ValueError):
    """A condition that cannot be applied as asked (wrong stage, bad input...)."""
