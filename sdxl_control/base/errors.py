"""Errors sdxl-control raises on purpose: each says what is wrong and what to do about it.

Each class carries the exit code the command line ends with, one per class of problem, so scripts can tell a typo
from a missing model from a photo without a face:

====  =====================================================================
code  meaning
====  =====================================================================
0     done
1     an unexpected failure (a bug: ``--debug`` shows the traceback)
2     the request: an option, a value or a condition that cannot be run
3     an input file: missing, unreadable, or not what it claims to be
4     a model: missing weights, the wrong kind, or an unreadable checkpoint
5     no usable face in a face photo
6     the output: it cannot be written where asked
7     the device: unknown, unavailable, or out of memory
130   interrupted (Ctrl-C)
====  =====================================================================
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "SdxlControlError",
    "InvalidRequestError",
    "ConditionError",
    "InputError",
    "ModelError",
    "ModelNotFoundError",
    "MissingWeightsError",
    "IncompatibleModelError",
    "CheckpointError",
    "FaceNotFoundError",
    "OutputError",
    "DeviceError",
    "EXIT_INTERRUPTED",
]

EXIT_INTERRUPTED = 130


class SdxlControlError(Exception):
    """Base class of every error sdxl-control raises deliberately.

    Example:
        >>> InputError("face.png: no such file").exit_code
        3
    """

    exit_code: ClassVar[int] = 1


class InvalidRequestError(SdxlControlError, ValueError):
    """A generation request that cannot be run as asked (bad size, step count, switch point...)."""

    exit_code = 2


class ConditionError(SdxlControlError, ValueError):
    """A condition that cannot be applied as asked (wrong stage, bad input...)."""

    exit_code = 2


class InputError(SdxlControlError, ValueError):
    """An input file (an image, a recipe, an identity file) that is missing, unreadable or not what it claims."""

    exit_code = 3


class ModelError(SdxlControlError):
    """A model that cannot be used: see the subclasses."""

    exit_code = 4


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A model path that does not exist."""


class MissingWeightsError(ModelError):
    """Weights that are neither on disk nor reachable; the message says how to fetch them."""


class IncompatibleModelError(ModelError):
    """A model that exists but is not what was asked for (e.g. an SD 1.5 UNet where SDXL is needed)."""


class CheckpointError(ModelError):
    """A weights file that cannot be read safely: corrupt, truncated, or a pickle."""


class FaceNotFoundError(ConditionError):
    """A face photo in which no usable face was found (none, or too small)."""

    exit_code = 5


class OutputError(SdxlControlError):
    """An output that cannot be written where asked (no such folder, not writable, not a PNG name)."""

    exit_code = 6


class DeviceError(SdxlControlError):
    """A device that does not exist here, or ran out of memory."""

    exit_code = 7
