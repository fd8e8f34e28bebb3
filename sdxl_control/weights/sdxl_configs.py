"""SDXL 1.0's published component configs, shipped with the package (``sdxl_control/configs``).

A single-file checkpoint (``juggernautXL_v9.safetensors``) holds weights only; diffusers reads it with a pipeline
folder's configs and tokenizers. The folder for SDXL 1.0's base or refiner is assembled here from the packaged JSON
files and the CLIP tokenizer rebuilt offline (:mod:`sdxl_control.weights.clip_vocab`), so a single file loads with no
hub and no HF cache. The same configs give the benchmark its full-size architectures.

Example:
    >>> with sdxl_config_folder(Stage.BASE) as folder:                      # doctest: +SKIP
    ...     pipe = StableDiffusionXLPipeline.from_single_file(file, config=str(folder), local_files_only=True)
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..base.stages import Stage
from .clip_vocab import write_clip_tokenizer

__all__ = ["CONFIGS", "SDXL_SCHEDULER", "published_config", "sdxl_config_folder"]

CONFIGS = Path(__file__).resolve().parent / "configs"

# Where each packaged file goes in a diffusers pipeline folder, per stage; and each tokenizer's padding token.
_LAYOUT: dict[Stage, dict[str, str]] = {
    Stage.BASE: {
        "model_index.json": "model_index_base",
        "scheduler/scheduler_config.json": "scheduler",
        "unet/config.json": "unet_base",
        "vae/config.json": "vae",
        "text_encoder/config.json": "text_encoder",
        "text_encoder_2/config.json": "text_encoder_2",
    },
    Stage.REFINER: {
        "model_index.json": "model_index_refiner",
        "scheduler/scheduler_config.json": "scheduler",
        "unet/config.json": "unet_refiner",
        "vae/config.json": "vae",
        "text_encoder_2/config.json": "text_encoder_2",
    },
}
_PADDING: dict[Stage, dict[str, str]] = {
    Stage.BASE: {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
    Stage.REFINER: {"tokenizer_2": "!"},
}


def published_config(name: str) -> dict[str, Any]:
    """One packaged config by name: ``unet_base``, ``unet_refiner``, ``vae``, ``text_encoder``, ``text_encoder_2``,
    ``scheduler``, ``model_index_base``, ``model_index_refiner``."""
    data: dict[str, Any] = json.loads((CONFIGS / f"{name}.json").read_text(encoding="utf-8"))
    return data


SDXL_SCHEDULER = published_config("scheduler")


def write_sdxl_config_folder(stage: Stage, folder: Path) -> Path:
    """Write SDXL 1.0's pipeline folder for ``stage`` without weights: every component's config and tokenizer."""
    for target, name in _LAYOUT[stage].items():
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        (folder / target).write_text(json.dumps(published_config(name), indent=1), encoding="utf-8")
    for tokenizer, pad in _PADDING[stage].items():
        write_clip_tokenizer(folder / tokenizer, pad)
    return folder


@contextmanager
def sdxl_config_folder(stage: Stage) -> Iterator[Path]:
    """SDXL 1.0's pipeline folder for ``stage`` (configs and tokenizers, no weights), for as long as the block runs."""
    with tempfile.TemporaryDirectory(prefix="sdxl-control-config-") as tmp:
        yield write_sdxl_config_folder(stage, Path(tmp))
