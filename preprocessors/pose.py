"""Body pose maps with controlnet-aux's OpenPose detector."""

from __future__ import annotations

import os
from typing import Any

from PIL import Image

from ..base.caches import process_cached
from ..weights.hub import resolve_source

__all__ = ["DEFAULT_POSE_MODEL", "POSE_FILES", "detect_pose"]

# controlnet-aux's annotator repo: body_pose_model.pth, hand_pose_model.pth, facenet.pth.
DEFAULT_POSE_MODEL = "lllyasviel/Annotators"
POSE_FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")


@process_cached(2)
def _detector(source: str, device: str) -> Any:
    import warnings

    with warnings.catch_warnings():
        # Importing controlnet-aux imports every annotator it has: a hint to install mediapipe (which the OpenPose
        # annotator does not use) and deprecation notices of its dependencies, none of them the user's to act on.
        warnings.simplefilter("ignore")
        from controlnet_aux import OpenposeDetector

    folder = resolve_source(source, allow=list(POSE_FILES))
    # controlnet-aux reads these with torch.load, which defaults to weights_only=True in torch >= 2.6.
    return OpenposeDetector.from_pretrained(str(folder)).to(device)


def detect_pose(
    image: Image.Image,
    model: str | os.PathLike[str] = DEFAULT_POSE_MODEL,
    device: str = "cpu",
    hands: bool = False,
    face: bool = False,
) -> Image.Image:
    """An OpenPose skeleton map at the image's size (black where no person is found).

    Example:
        >>> detect_pose(photo)  # doctest: +SKIP
    """
    detector = _detector(str(model), device)
    result = detector(image.convert("RGB"), include_body=True, include_hand=hands, include_face=face,
                      detect_resolution=min(512, max(image.size)), image_resolution=max(image.size))  # fmt: skip
    return result.resize(image.size) if result.size != image.size else result
