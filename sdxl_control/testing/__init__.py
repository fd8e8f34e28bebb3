"""Tiny random SDXL models in the real diffusers layout: offline demos (``--tiny``) and tests use them through
the normal loading path."""

from .annotators import tiny_control_models, write_random_openpose, write_tiny_controlnet, write_tiny_depth_estimator
from .tiny import TinyModels, clip_bpe, tiny_models, write_tiny_base, write_tiny_refiner, write_tiny_taesd

__all__ = [
    "TinyModels",
    "clip_bpe",
    "tiny_models",
    "write_tiny_base",
    "write_tiny_refiner",
    "write_tiny_taesd",
    "write_tiny_controlnet",
    "write_tiny_depth_estimator",
    "write_random_openpose",
    "tiny_control_models",
]
