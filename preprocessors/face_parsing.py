"""Face parsing with facexlib's BiSeNet (19 CelebAMask-HQ classes), loaded through facexlib's own code, and the
face-only image PuLID reads its EVA-CLIP features from: background, ears, neck, clothes and hat white, the rest of
the face in grey.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..base.caches import process_cached
from ..base.errors import MissingWeightsError

__all__ = ["PARSING_FILE", "PARSING_URL", "default_parsing_folder", "load_face_parser", "face_only"]

PARSING_FILE = "parsing_bisenet.pth"
PARSING_URL = "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth"
# CelebAMask-HQ labels PuLID treats as not-face: background, left/right ear, earring, neck, necklace, cloth, hat.
NOT_FACE_LABELS = (0, 7, 8, 9, 14, 15, 16, 18)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def default_parsing_folder() -> Path:
    """Where facexlib keeps its weights when it downloads them itself (inside its package)."""
    import facexlib

    return Path(facexlib.__file__).parent / "weights"


@process_cached(2)
def _parser(folder: str, device: str) -> Any:
    from facexlib.parsing import init_parsing_model

    try:
        return init_parsing_model(model_name="bisenet", device=device, model_rootpath=folder).requires_grad_(False)
    except RuntimeError as exc:
        raise MissingWeightsError(f"{Path(folder) / PARSING_FILE} is not facexlib's BiSeNet ({exc})") from None


def load_face_parser(folder: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu") -> Any:
    """facexlib's BiSeNet face parser from ``folder`` (default: facexlib's own weights folder), once per process.

    facexlib would download a missing file; here a missing file is an error that says where to put it.

    Example:
        >>> parser = load_face_parser("~/models/facexlib")  # doctest: +SKIP
    """
    where = Path(folder).expanduser() if folder is not None else default_parsing_folder()
    if not (where / PARSING_FILE).is_file():
        raise MissingWeightsError(
            f"face parsing model {PARSING_FILE} not found in {where}: download {PARSING_URL} into that folder (or "
            "pass the folder that holds it)"
        )
    return _parser(str(where), str(device))


@torch.no_grad()
def face_only(aligned: np.ndarray, parser: Any) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] on the parser's device: the aligned face (RGB uint8) in grey (luma 0.299/0.587/0.114),
    everything BiSeNet does not label as face white.

    Example:
        >>> face_only(align_face(photo, face.landmarks), load_face_parser()).shape  # doctest: +SKIP
        torch.Size([1, 3, 512, 512])
    """
    from torchvision.transforms.functional import normalize

    device = next(parser.parameters()).device
    image = torch.from_numpy(aligned.transpose(2, 0, 1).astype(np.float32)).unsqueeze(0).to(device) / 255.0
    labels = parser(normalize(image, _IMAGENET_MEAN, _IMAGENET_STD))[0].argmax(dim=1, keepdim=True)
    not_face = torch.zeros_like(labels, dtype=torch.bool)
    for label in NOT_FACE_LABELS:
        not_face |= labels == label
    grey = (0.299 * image[:, 0:1] + 0.587 * image[:, 1:2] + 0.114 * image[:, 2:3]).repeat(1, 3, 1, 1)
    return torch.where(not_face, torch.ones_like(image), grey)
