"""Tiny random SDXL models in the real diffusers layout: offline demos (``--tiny``) and tests use them through
the normal loading path."""

from .tiny import TinyModels, clip_bpe, tiny_models, write_tiny_base, write_tiny_refiner

__all__ = ["TinyModels", "clip_bpe", "tiny_models", "write_tiny_base", "write_tiny_refiner"]
