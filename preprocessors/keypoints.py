"""The face keypoint map InstantID's IdentityNet reads: five landmarks on black, drawn by the rules of the reference's
``draw_kps`` (instantX-research/InstantID) — four limbs from the eyes and mouth corners to the nose, dimmed to 60 %,
then full-intensity dots — so that IdentityNet sees what it was trained on.

Keypoints are drawn at the output size: the photo they come from is scaled to cover the canvas (or a region's box)
and centred, the way a resize-and-centre-crop would move them, so the face keeps its proportions.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["keypoint_image", "place_keypoints", "face_keypoint_map", "KEYPOINT_COLORS"]

# RGB, per landmark: left eye, right eye, nose, left and right mouth corner.
KEYPOINT_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
# Every limb ends at the nose and takes the colour of its other end; later limbs paint over earlier ones.
_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
_LIMB_HALF_WIDTH = 4
_LIMB_DIM = 0.6
_DOT_RADIUS = 10


def keypoint_image(landmarks: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The keypoint map of five ``landmarks`` (x, y in pixels of the map) on a black RGB image of ``size``
    (width, height).

    Example:
        >>> keypoint_image(face.landmarks, face.image_size).save("kps.png")  # doctest: +SKIP
    """
    import cv2

    points = np.asarray(landmarks)
    if points.shape != (5, 2):
        raise ValueError(f"five (x, y) landmarks expected, got an array of shape {points.shape}")
    width, height = size
    # Limbs are filled on a float canvas and dimmed before the dots, which stay at full intensity.
    canvas: Any = np.zeros([height, width, 3])
    for a, b in _LIMBS:
        xs, ys = points[[a, b], 0], points[[a, b], 1]
        length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        centre = (int(np.mean(xs)), int(np.mean(ys)))
        polygon = np.asarray(cv2.ellipse2Poly(centre, (int(length / 2), _LIMB_HALF_WIDTH), int(angle), 0, 360, 1))
        canvas = cv2.fillConvexPoly(canvas, polygon, KEYPOINT_COLORS[a])
    image: Any = (canvas * _LIMB_DIM).astype(np.uint8)
    for (x, y), color in zip(points, KEYPOINT_COLORS, strict=True):
        image = cv2.circle(image, (int(x), int(y)), _DOT_RADIUS, color, -1)
    return Image.fromarray(image)


def place_keypoints(
    landmarks: np.ndarray, source_size: tuple[int, int], box: tuple[float, float, float, float]
) -> np.ndarray:
    """Move landmarks of a photo of ``source_size`` (width, height) to where they land when the photo is scaled to
    cover ``box`` (x0, y0, x1, y1) and centred on it.

    Example:
        >>> place_keypoints(np.array([[50.0, 50.0]] * 5), (100, 100), (0, 0, 200, 100))[0].tolist()
        [100.0, 50.0]
    """
    width, height = source_size
    x0, y0, x1, y1 = box
    scale = max((x1 - x0) / width, (y1 - y0) / height)
    points = np.asarray(landmarks, dtype=np.float64)
    placed = (points - [width / 2, height / 2]) * scale + [(x0 + x1) / 2, (y0 + y1) / 2]
    return placed.astype(np.float32)


def face_keypoint_map(
    image: Any, *, size: tuple[int, int] | None = None, pack: str | None = None,
    root: str | os.PathLike[str] = "~/.insightface",
) -> Image.Image:  # fmt: skip
    """The keypoint map of the largest face in ``image``, at the photo's size or placed into ``size`` — what
    InstantID's IdentityNet sees for this photo (``sdxl-control preprocess face``).

    Example:
        >>> face_keypoint_map("me.jpg", size=(1024, 1024)).save("kps.png")  # doctest: +SKIP
    """
    from .face import IDENTITY_PACK, FaceAnalyzer

    face = FaceAnalyzer(pack or IDENTITY_PACK, root).analyze(image)
    target = size or face.image_size
    points = place_keypoints(face.landmarks, face.image_size, (0, 0, *target)) if size else face.landmarks
    return keypoint_image(points, target)
