"""Face analysis with insightface: detect, keep the largest face, 5-point alignment, identity embedding.

Used by every identity condition (IP-Adapter FaceID, PhotoMaker, PuLID, InstantID): they take a :class:`FaceInfo`.
Models come from an insightface model pack (``buffalo_l``, ``antelopev2``) in insightface's own folder layout
(``<root>/models/<pack>/*.onnx``) or from any folder of ONNX files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ConditionError, MissingWeightsError
from .images import load_image

__all__ = ["FaceInfo", "FaceAnalyzer", "DEFAULT_PACK", "MIN_FACE"]

log = logging.getLogger(__name__)

DEFAULT_PACK = "buffalo_l"
# Smaller faces carry too little identity for a 112 px recognition crop.
MIN_FACE = 32


@dataclass(frozen=True)
class FaceInfo:
    """One analysed face: box (x0, y0, x1, y1), five landmarks (eyes, nose, mouth corners), detector score,
    L2-normalised identity embedding, and the face aligned the ArcFace way at 224 px (for CLIP-based adapters).

    Example:
        >>> face = FaceAnalyzer().analyze("portrait.jpg")  # doctest: +SKIP
        >>> face.embedding.shape                            # doctest: +SKIP
        (512,)
    """

    bbox: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float
    embedding: np.ndarray
    aligned: Image.Image

    @property
    def size(self) -> float:
        return min(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1])


def _pack_folder(pack: str, root: str | os.PathLike[str]) -> Path:
    direct = Path(pack).expanduser()
    if direct.is_dir():
        folder = direct
    else:
        folder = Path(root).expanduser() / "models" / pack
    if not folder.is_dir() or not any(folder.glob("*.onnx")):
        raise MissingWeightsError(
            f"insightface model pack {pack!r} not found (looked in {folder}); download {pack}.zip from the insightface "
            f"model zoo (github.com/deepinsight/insightface, releases) and unzip it into {folder}, or pass a folder "
            "of detection + recognition .onnx files"
        )
    return folder


@lru_cache(maxsize=2)
def _analysis(folder: str, det_size: tuple[int, int]) -> Any:
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=folder, allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=det_size)
    if "recognition" not in app.models:
        raise MissingWeightsError(f"{folder} has a face detector but no recognition model (an ArcFace .onnx)")
    return app


class FaceAnalyzer:
    """Finds the main face of an image and describes it; models load once per process.

    Example:
        >>> analyzer = FaceAnalyzer("antelopev2")           # doctest: +SKIP
        >>> analyzer.analyze(photo).embedding[:3]            # doctest: +SKIP
    """

    def __init__(
        self, pack: str = DEFAULT_PACK, root: str | os.PathLike[str] = "~/.insightface", det_size: int = 640,
        min_face: int = MIN_FACE,
    ) -> None:  # fmt: skip
        self.folder = _pack_folder(pack, root)
        self.det_size = (det_size, det_size)
        self.min_face = min_face

    def faces(self, image: Any) -> list[Any]:
        """All insightface detections, largest first."""
        rgb = load_image(image, "face image")
        bgr = np.asarray(rgb)[:, :, ::-1].copy()
        found = _analysis(str(self.folder), self.det_size).get(bgr)
        return sorted(found, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]), reverse=True)

    def analyze(self, image: Any, name: str | None = None) -> FaceInfo:
        """The largest face; a clear error when there is none or it is too small."""
        from insightface.utils import face_align

        label = name or (str(image) if isinstance(image, (str, os.PathLike)) else "the image")
        faces = self.faces(image)
        if not faces:
            raise ConditionError(f"no face found in {label}")
        if len(faces) > 1:
            log.warning("%d faces in %s: using the largest", len(faces), label)
        face = faces[0]
        x0, y0, x1, y1 = (float(v) for v in face.bbox)
        if min(x1 - x0, y1 - y0) < self.min_face:
            raise ConditionError(
                f"the face in {label} is {x1 - x0:.0f}x{y1 - y0:.0f} px; at least {self.min_face} px is needed for its "
                "identity: use a closer or larger photo"
            )
        if face.kps is None or getattr(face, "normed_embedding", None) is None:
            raise ConditionError(f"the face model pack gave no landmarks or embedding for {label}")
        rgb = np.asarray(load_image(image, "face image"))
        aligned = face_align.norm_crop(rgb, landmark=face.kps, image_size=224)
        return FaceInfo(
            bbox=(x0, y0, x1, y1),
            landmarks=np.asarray(face.kps, dtype=np.float32),
            score=float(face.det_score),
            embedding=np.asarray(face.normed_embedding, dtype=np.float32),
            aligned=Image.fromarray(aligned),
        )
