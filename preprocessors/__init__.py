"""Image preprocessors for conditions (edges, depth, pose, face keypoints), imported as ``sdxl_control.preprocessors``.

Every preprocessor takes an RGB image and returns the control image; models are loaded once per process.

Example:
    >>> from sdxl_control.preprocessors import preprocess
    >>> preprocess("canny", photo).size == photo.size  # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..base.errors import ConditionError
from ..base.images import ImageInput, load_image

if TYPE_CHECKING:
    from ..weights.inventory import ModelNeed

__all__ = ["PREPROCESSORS", "preprocess", "preprocessor_needs", "load_image", "ImageInput", "a1111_module"]


def _canny(image: Image.Image, **options: Any) -> Image.Image:
    from .edges import canny

    return canny(image, **options)


def _depth(image: Image.Image, **options: Any) -> Image.Image:
    from .depth import estimate_depth

    return estimate_depth(image, **options)


def _pose(image: Image.Image, **options: Any) -> Image.Image:
    from .pose import detect_pose

    return detect_pose(image, **options)


def _face(image: Image.Image, **options: Any) -> Image.Image:
    from .keypoints import face_keypoint_map

    return face_keypoint_map(image, **options)


def _faces(image: Image.Image, **options: Any) -> Image.Image:
    from .face import draw_faces

    return draw_faces(image, **options)


def _as_is(image: Image.Image, **options: Any) -> Image.Image:
    if options:
        raise ConditionError(f"'none' takes no options, got {sorted(options)}")
    return image


PREPROCESSORS: dict[str, Callable[..., Image.Image]] = {
    "canny": _canny,
    "edges": _canny,
    "depth": _depth,
    "pose": _pose,
    "face": _face,
    "faces": _faces,
    "none": _as_is,
}


def preprocess(name: str | None, image: ImageInput, **options: Any) -> Image.Image:
    """Load ``image`` (any mode, path or array) and run the named preprocessor on it (``None``: use as is)."""
    key = name or "none"
    if key not in PREPROCESSORS:
        raise ConditionError(f"unknown preprocessor {name!r}: use one of {', '.join(sorted(PREPROCESSORS))}")
    return PREPROCESSORS[key](load_image(image, "control image"), **options)


def preprocessor_needs(name: str | None, options: Mapping[str, Any]) -> tuple[ModelNeed, ...]:
    """The weights a preprocessor loads with these options (canny and ready maps need none)."""
    from ..weights.inventory import ModelNeed

    if name == "depth":
        from .depth import DEFAULT_DEPTH_MODEL, DEPTH_FILES

        return (ModelNeed("depth estimator", str(options.get("model", DEFAULT_DEPTH_MODEL)), DEPTH_FILES),)
    if name == "pose":
        from .pose import DEFAULT_POSE_MODEL, POSE_FILES

        return (ModelNeed("pose detector", str(options.get("model", DEFAULT_POSE_MODEL)), POSE_FILES),)
    if name in ("face", "faces"):
        from .face import IDENTITY_PACK, pack_need

        return (pack_need(options.get("pack") or IDENTITY_PACK, options.get("root", "~/.insightface")),)
    return ()


# Our preprocessors under the names the A1111 ControlNet extension gives its own ("modules").
_A1111_MODULES = {"canny": "canny", "edges": "canny", "depth": "depth_midas", "face": "instant_id_face_keypoints"}


def a1111_module(name: str | None, options: Mapping[str, Any]) -> str:
    """The ControlNet extension's module name for one of our preprocessors (``none`` for a ready map).

    Example:
        >>> a1111_module("pose", {"hands": True, "face": True})
        'openpose_full'
    """
    if name == "pose":
        hands, face = bool(options.get("hands")), bool(options.get("face"))
        return "openpose" + {(True, True): "_full", (True, False): "_hand", (False, True): "_face"}.get(
            (hands, face), ""
        )
    return _A1111_MODULES.get(name or "none", name or "none")
