"""sdxl-control: controllable, identity-preserving SDXL generation.

The names below are imported on first use, so ``import sdxl_control`` (and the command line's ``--help``) costs
milliseconds, not the seconds torch and diffusers take to load.

Example:
    >>> from sdxl_control import Generator
    >>> gen = Generator.from_pretrained()                     # doctest: +SKIP
    >>> gen.generate("a portrait", seed=7).images[0].save("out.png")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import TYPE_CHECKING, Any

from . import old_paths
from .base.errors import (
    CheckpointError,
    ConditionError,
    DeviceError,
    FaceNotFoundError,
    IncompatibleModelError,
    InputError,
    InvalidRequestError,
    MissingWeightsError,
    ModelError,
    ModelNotFoundError,
    OutputError,
    SdxlControlError,
)
from .base.version import VERSION as __version__

# With torchao installed (weight storage "fp8_matmul"), importing it (diffusers does, on its first model) makes two
# libraries warn about each other's versions on every run: diffusers, that it cannot register tensor classes older
# torchao releases had (for torchao-serialized checkpoints, which sdxl-control never reads), and torch, that torchao
# registers its enums in a way newer torch deprecates. Neither is the user's to act on.
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)


def _not_torchaos_enums(record: logging.LogRecord) -> bool:
    return "register_constant() on Enum subclasses" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_not_torchaos_enums)

# `import sdxl_control.generator` and the other paths of release 0.2 keep working for one release.
old_paths.install()

# public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(
        [
            "Attachment",
            "Condition",
            "Parts",
            "PrepareContext",
            "Prepared",
            "PromptEdit",
            "PromptTokens",
            "Residuals",
            "Stage",
            "StepInfo",
            "Tokens",
            "Window",
            "acts",
        ],
        "protocol.conditions",
    ),  # fmt: skip
    "FastPath": "protocol.fast",
    "GenerationRequest": "passes.request",
    "Generator": "passes.generator",
    "ProgressEvent": "engine.loop",
    "RecipeImage": "records.recipe",
    "Result": "records.recipe",
    "read_recipe": "records.recipe",
    "Infotext": "records.infotext",
    "Locator": "base.files",
    "clear_caches": "base.caches",
    "ModelRef": "base.model_refs",
    "Runner": "jobs.runner",
}

if TYPE_CHECKING:
    from .base.caches import clear_caches
    from .base.files import Locator
    from .base.model_refs import ModelRef
    from .engine.loop import ProgressEvent
    from .jobs.runner import Runner
    from .passes.generator import Generator
    from .passes.request import GenerationRequest
    from .protocol.conditions import (
        Attachment,
        Condition,
        Parts,
        PrepareContext,
        Prepared,
        PromptEdit,
        PromptTokens,
        Residuals,
        Stage,
        StepInfo,
        Tokens,
        Window,
        acts,
    )
    from .protocol.fast import FastPath
    from .records.infotext import Infotext
    from .records.recipe import RecipeImage, Result, read_recipe


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "__version__",
    "Generator",
    "GenerationRequest",
    "Runner",
    "FastPath",
    "Result",
    "RecipeImage",
    "read_recipe",
    "ProgressEvent",
    "Infotext",
    "Locator",
    "clear_caches",
    "ModelRef",
    "Condition",
    "Prepared",
    "Attachment",
    "PrepareContext",
    "Residuals",
    "Tokens",
    "PromptEdit",
    "PromptTokens",
    "Parts",
    "acts",
    "StepInfo",
    "Stage",
    "Window",
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
]
