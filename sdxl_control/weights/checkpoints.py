"""Reading weights files, and the pickle policy: safetensors are checked before anything loads and read once per
process while unchanged; a pickle is read only where a caller opted in, and then as plain tensors
(``torch.load(weights_only=True)``), never as code.

Example:
    >>> state = read_checkpoint(Path("ip-adapter-faceid_sdxl.bin"))  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..base.caches import process_cached
from ..base.errors import CheckpointError

__all__ = [
    "PICKLE_SUFFIXES", "check_safetensors", "read_safetensors", "read_checkpoint", "refuse_pickle", "checkpoint_kind",
]  # fmt: skip


PICKLE_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"}


def check_safetensors(path: Path) -> None:
    """Read a safetensors header; a truncated or foreign file fails here with its name, before any loading."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); re-download or re-convert it"
        ) from None


@process_cached(8)
def _read_weights_cached(path: str, size: int, mtime_ns: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A checked safetensors file's tensors, read once per process while the file is unchanged (adapters and LoRAs
    are reused across calls; re-reading hundreds of MB per image would dominate a few-step draft). Treat as
    read-only."""
    check_safetensors(path)
    stat = path.stat()
    return _read_weights_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def read_checkpoint(path: Path) -> Any:
    """A weights file's contents: safetensors (checked; kept per process, see :func:`read_safetensors`), or a pickle
    read as plain tensors only (``torch.load(weights_only=True)``) — the published FaceID, InstantID, PuLID v1 and
    EVA-CLIP files are pickles, whose callers opt in with ``resolve_source(allow_pickle=True)``."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read as weights only ({exc})") from None


def refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickle checkpoint; sdxl-control only loads safetensors, because unpickling can run arbitrary "
        'code. Convert it once where you trust it: `python -c "import torch, safetensors.torch as s; '
        f"s.save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\"`"
    )


# What a weights file is, told by the key names its format publishes (first match wins); for messages only.
_KINDS = (
    ("a LoRA (give it with --lora)", ("lora_unet_", "lora_te", ".lora_down.", ".lora_A.", ".lora.down.")),
    ("an SDXL checkpoint", ("conditioner.embedders.",)),
    ("an SD 1.x checkpoint (SDXL takes SDXL checkpoints)", ("cond_stage_model.transformer.",)),
    ("an SD 2.x checkpoint (SDXL takes SDXL checkpoints)", ("cond_stage_model.model.",)),
    ("a ControlNet", ("control_model.", "controlnet_cond_embedding.", "input_hint_block.")),
    ("an IP-Adapter", ("image_proj.", "ip_adapter.")),
    ("a VAE", ("encoder.down.", "decoder.up.", "encoder.down_blocks.")),
    ("a UNet-only checkpoint (load it with unet=)", ("down_blocks.", "input_blocks.", "model.diffusion_model.")),
)


def checkpoint_kind(keys: Any) -> str:
    """What a weights file holds, by its key names: "a LoRA (give it with --lora)", "an SD 1.x checkpoint ...", ...

    Example:
        >>> checkpoint_kind(["lora_unet_down_blocks_0.lora_down.weight"])
        'a LoRA (give it with --lora)'
    """
    names = list(keys)
    for kind, marks in _KINDS:
        if any(mark in name for name in names for mark in marks):
            return kind
    return "no model this knows"
