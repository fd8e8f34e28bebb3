"""sdxl-control: controllable, identity-preserving SDXL generation.

Example:
    >>> from sdxl_control import Generator
    >>> gen = Generator.from_pretrained()                     # doctest: +SKIP
    >>> gen.generate("a portrait", seed=7).images[0].save("out.png")  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .conditions import (
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
from .errors import (
    CheckpointError,
    ConditionError,
    IncompatibleModelError,
    InvalidRequestError,
    MissingWeightsError,
    ModelNotFoundError,
    SdxlControlError,
)
from .fast import FastPath
from .generator import GenerationRequest, Generator
from .loop import ProgressEvent
from .recipe import RecipeImage, Result, read_recipe

__all__ = [
    "__version__",
    "Generator",
    "GenerationRequest",
    "FastPath",
    "Result",
    "RecipeImage",
    "read_recipe",
    "ProgressEvent",
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
    "ModelNotFoundError",
    "MissingWeightsError",
    "IncompatibleModelError",
    "CheckpointError",
    "ConditionError",
]
