"""Face analysis with insightface: detect, keep the largest face, 5-point alignment, identity embedding.

Used by every identity condition (IP-Adapter FaceID, InstantID, and later PuLID and PhotoMaker): they take a
:class:`FaceInfo`. Models come from an insightface model pack in insightface's own folder layout
(``<root>/models/<pack>/*.onnx``) or from any folder of detection + recognition ONNX files: ``buffalo_l`` for FaceID,
``antelopev2`` (SCRFD-10G detector, glintr100 ArcFace) for InstantID and PuLID, which were trained on its raw
embeddings. A photo is analysed once per process: results are kept by the photo's content.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import CheckpointError, ConditionError, MissingWeightsError
from .images import load_image

__all__ = [
    "FaceInfo",
    "FaceAnalyzer",
    "analyze_faces",
    "pack_folder",
    "Identity",
    "save_identity",
    "identity_similarity",
    "DEFAULT_PACK",
    "IDENTITY_PACK",
    "MIN_FACE",
    "DETECTOR_SIZE",
]

log = logging.getLogger(__name__)

DEFAULT_PACK = "buffalo_l"
IDENTITY_PACK = "antelopev2"
# Smaller faces carry too little identity for a 112 px recognition crop.
MIN_FACE = 32
# The detector input InstantID and PuLID use (insightface's det_size); other sizes are only tried when it finds nothing.
DETECTOR_SIZE = 640
# What the published packs hold, for the missing-pack message.
PACK_FILES = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}
# antelopev2's release asset is gone (insightface cannot fetch it); InstantID's README points here instead.
ANTELOPEV2_LINK = "https://github.com/deepinsight/insightface/issues/1896#issuecomment-1023867304"
_CACHE_SIZE = 64


@dataclass(frozen=True)
class FaceInfo:
    """One analysed face: box (x0, y0, x1, y1), five landmarks (eyes, nose, mouth corners) in image pixels, detector
    score, the recognition model's raw embedding (as insightface's ``face.embedding``: InstantID and PuLID take it
    un-normalised), the face aligned the ArcFace way at 224 px (for CLIP-based adapters), and the photo's size.

    Example:
        >>> face = FaceAnalyzer("antelopev2").analyze("portrait.jpg")  # doctest: +SKIP
        >>> face.embedding.shape, float(np.linalg.norm(face.normed_embedding))  # doctest: +SKIP
        ((512,), 1.0)
    """

    bbox: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float
    embedding: np.ndarray
    aligned: Image.Image
    image_size: tuple[int, int]

    @property
    def normed_embedding(self) -> np.ndarray:
        """The embedding scaled to unit length (insightface's ``normed_embedding``; what FaceID takes)."""
        return (self.embedding / np.linalg.norm(self.embedding)).astype(np.float32)

    @property
    def size(self) -> float:
        return min(self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1])


def _missing_pack(pack: str, folder: Path) -> MissingWeightsError:
    name = Path(pack).name
    holds = f" (it holds {' and '.join(PACK_FILES[name])}, among others)" if name in PACK_FILES else ""
    if name == IDENTITY_PACK:
        how = (
            f"insightface cannot download antelopev2 itself (its release link is gone): fetch antelopev2.zip by hand "
            f"(InstantID's README points to {ANTELOPEV2_LINK}) and unzip it into {folder}{holds}"
        )
    else:
        how = (
            f"download {name}.zip from the insightface model zoo (github.com/deepinsight/insightface, releases) and "
            f"unzip it into {folder}{holds}"
        )
    return MissingWeightsError(
        f"insightface model pack {pack!r} not found (looked in {folder}); {how}, or pass a folder of detection + "
        "recognition .onnx files"
    )


def pack_folder(pack: str, root: str | os.PathLike[str] = "~/.insightface") -> Path:
    """The folder of ONNX files for a pack name (under ``<root>/models/``) or a folder path."""
    direct = Path(pack).expanduser()
    folder = direct if direct.is_dir() else Path(root).expanduser() / "models" / pack
    if folder.is_dir() and not any(folder.glob("*.onnx")):
        # A zip unpacked into a folder of its own name leaves the models one level down (antelopev2/antelopev2/).
        nested = folder / folder.name
        if nested.is_dir() and any(nested.glob("*.onnx")):
            folder = nested
    if not folder.is_dir() or not any(folder.glob("*.onnx")):
        raise _missing_pack(pack, folder)
    return folder


@lru_cache(maxsize=2)
def _analysis(folder: str) -> Any:
    from insightface.app import FaceAnalysis

    try:
        app = FaceAnalysis(
            name=folder, allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"]
        )
    except AssertionError:  # insightface asserts that a detector was among the files
        raise MissingWeightsError(f"{folder} holds no face detector .onnx (SCRFD or RetinaFace)") from None
    except Exception as exc:
        raise CheckpointError(f"{folder}: insightface could not load its models ({exc})") from None
    app.prepare(ctx_id=-1, det_size=(DETECTOR_SIZE, DETECTOR_SIZE))
    if "recognition" not in app.models:
        raise MissingWeightsError(f"{folder} has a face detector but no recognition model (an ArcFace .onnx)")
    return app


def _search_sizes(width: int, height: int) -> list[int]:
    """Detector inputs to try in turn: the standard one; the photo's own size for faces too small at 640 (a big
    photo shrunk to 640 loses them); and 320 for close-ups, whose faces outgrow the detector's anchors at 640."""
    sizes = [DETECTOR_SIZE]
    longest = max(width, height)
    if longest > DETECTOR_SIZE:
        sizes.append(min(2048, 32 * math.ceil(longest / 32)))
    return [*sizes, DETECTOR_SIZE // 2]


def _detect_at(app: Any, bgr: np.ndarray, size: int) -> list[Any]:
    """insightface's ``FaceAnalysis.get`` with the detector input ``size``: detection, then recognition per face."""
    from insightface.app.common import Face

    boxes, points = app.det_model.detect(bgr, input_size=(size, size))
    faces = []
    for i in range(boxes.shape[0]):
        face = Face(bbox=boxes[i, 0:4], kps=None if points is None else points[i], det_score=boxes[i, 4])
        app.models["recognition"].get(bgr, face)
        faces.append(face)
    return faces


_FACES: OrderedDict[tuple[str, str], tuple[list[Any], list[int]]] = OrderedDict()


class FaceAnalyzer:
    """Finds the main face of an image and describes it; models load once per process, photos are analysed once.

    Example:
        >>> analyzer = FaceAnalyzer("antelopev2")           # doctest: +SKIP
        >>> analyzer.analyze(photo).embedding[:3]            # doctest: +SKIP
    """

    def __init__(
        self, pack: str = DEFAULT_PACK, root: str | os.PathLike[str] = "~/.insightface", min_face: int = MIN_FACE
    ) -> None:
        self.folder = pack_folder(pack, root)
        self.min_face = min_face

    def _faces(self, rgb: Image.Image) -> tuple[list[Any], list[int]]:
        """(detections largest first, detector sizes tried), cached by the photo's pixels."""
        pixels = np.asarray(rgb)
        key = (str(self.folder), hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).hexdigest())
        if key in _FACES:
            _FACES.move_to_end(key)
            return _FACES[key]
        app = _analysis(str(self.folder))
        bgr = np.ascontiguousarray(pixels[:, :, ::-1])
        tried: list[int] = []
        found: list[Any] = []
        for size in _search_sizes(*rgb.size):
            tried.append(size)
            found = _detect_at(app, bgr, size)
            if found:
                break
        # Largest box area first, as InstantID and PuLID choose (insightface lists faces by detector score).
        found.sort(key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])), reverse=True)
        _FACES[key] = (found, tried)
        while len(_FACES) > _CACHE_SIZE:
            _FACES.popitem(last=False)
        return found, tried

    def faces(self, image: Any) -> list[Any]:
        """All insightface detections, largest first."""
        return list(self._faces(load_image(image, "face image"))[0])

    def analyze(self, image: Any, name: str | None = None) -> FaceInfo:
        """The largest face; a clear error when there is none or it is too small."""
        from insightface.utils import face_align

        label = name or (str(image) if isinstance(image, (str, os.PathLike)) else "the image")
        rgb = load_image(image, f"face image {label}")
        faces, tried = self._faces(rgb)
        if not faces:
            sizes = ", ".join(f"{s}x{s}" for s in tried)
            raise ConditionError(
                f"no face found in {label} ({rgb.size[0]}x{rgb.size[1]}; the detector looked at it scaled to {sizes}): "
                f"use a photo where the face is clearly visible, at least {self.min_face} px across, with some margin "
                "around it"
            )
        if len(faces) > 1:
            log.warning("%d faces in %s: using the largest", len(faces), label)
        face = faces[0]
        x0, y0, x1, y1 = (float(v) for v in face.bbox)
        if min(x1 - x0, y1 - y0) < self.min_face:
            raise ConditionError(
                f"the face in {label} is {x1 - x0:.0f}x{y1 - y0:.0f} px; at least {self.min_face} px is needed for its "
                "identity: use a closer or larger photo"
            )
        if face.kps is None or getattr(face, "embedding", None) is None:
            raise ConditionError(f"the face model pack gave no landmarks or embedding for {label}")
        aligned = face_align.norm_crop(np.asarray(rgb), landmark=face.kps, image_size=224)
        return FaceInfo(
            bbox=(x0, y0, x1, y1),
            landmarks=np.asarray(face.kps, dtype=np.float32),
            score=float(face.det_score),
            embedding=np.asarray(face.embedding, dtype=np.float32).reshape(-1),
            aligned=Image.fromarray(aligned),
            image_size=rgb.size,
        )


def analyze_faces(
    faces: Any, pack: str = DEFAULT_PACK, root: str | os.PathLike[str] = "~/.insightface"
) -> list[FaceInfo]:
    """Analyse each face image of ``faces`` (one or a list; :class:`FaceInfo` pass through unchanged).

    Example:
        >>> [face.score for face in analyze_faces(["me1.jpg", "me2.jpg"], "antelopev2")]  # doctest: +SKIP
    """
    items = faces if isinstance(faces, (list, tuple)) else [faces]
    analyzer: FaceAnalyzer | None = None
    out = []
    for i, item in enumerate(items):
        if isinstance(item, FaceInfo):
            out.append(item)
            continue
        analyzer = analyzer or FaceAnalyzer(pack, root)
        label = str(item) if isinstance(item, (str, os.PathLike)) else f"face image {i + 1}"
        out.append(analyzer.analyze(item, label))
    return out


@dataclass(frozen=True)
class Identity:
    """A person as the identity methods take one, without the photos: the raw embedding of each photo, and the five
    keypoints (with their photo's size) that pose the face. ``pack`` names the recognition model: embeddings of
    different models are not comparable.

    Example:
        >>> Identity.of(analyze_faces(["me1.jpg", "me2.jpg"], "antelopev2"), pack="antelopev2").save("me.safetensors")  # doctest: +SKIP
        >>> Identity.load("me.safetensors").embeddings.shape  # doctest: +SKIP
        (2, 512)
    """

    embeddings: np.ndarray
    keypoints: np.ndarray
    image_size: tuple[int, int]
    pack: str = ""

    @classmethod
    def of(cls, faces: list[FaceInfo], keypoints_from: FaceInfo | None = None, pack: str = "") -> Identity:
        pose = keypoints_from or faces[0]
        return cls(np.stack([f.embedding for f in faces]), pose.landmarks.copy(), pose.image_size, Path(pack).name)

    def save(self, path: str | os.PathLike[str]) -> None:
        import torch
        from safetensors.torch import save_file

        tensors = {
            "embeddings": torch.from_numpy(np.ascontiguousarray(self.embeddings, np.float32)),
            "keypoints": torch.from_numpy(np.ascontiguousarray(self.keypoints, np.float32)),
        }
        width, height = self.image_size
        save_file(tensors, str(path), {"format": "sdxl-control identity 1", "image_size": f"{width}x{height}",
                                       "pack": self.pack})  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        from safetensors import safe_open

        from ..models import check_safetensors

        file = Path(path).expanduser()
        if not file.is_file():
            raise ConditionError(f"no identity file at {file}")
        check_safetensors(file)
        with safe_open(str(file), framework="np") as f:
            meta = f.metadata() or {}
            if not meta.get("format", "").startswith("sdxl-control identity") or "embeddings" not in f.keys():
                raise ConditionError(f"{file} is not an identity file (make one with save_identity)")
            width, _, height = meta.get("image_size", "0x0").partition("x")
            return cls(
                f.get_tensor("embeddings"), f.get_tensor("keypoints"), (int(width), int(height)), meta.get("pack", "")
            )


def save_identity(
    path: str | os.PathLike[str], photos: Any, *, keypoints_from: Any = None, pack: str = IDENTITY_PACK,
    root: str | os.PathLike[str] = "~/.insightface",
) -> Identity:  # fmt: skip
    """Analyse ``photos`` (one or several of the same person) and keep the person in a small ``.safetensors`` file:
    their raw embeddings and the keypoints of ``keypoints_from`` (default: the first photo). Returns what was saved.

    Example:
        >>> save_identity("me.safetensors", ["me1.jpg", "me2.jpg"])  # then InstantID(identity="me.safetensors")  # doctest: +SKIP
    """
    faces = analyze_faces(photos, pack, root)
    pose = analyze_faces(keypoints_from, pack, root)[0] if keypoints_from is not None else None
    identity = Identity.of(faces, pose, pack)
    identity.save(path)
    return identity


def identity_similarity(
    reference: Any, image: Any, *, pack: str = IDENTITY_PACK, root: str | os.PathLike[str] = "~/.insightface"
) -> float:
    """Cosine similarity of the ArcFace embeddings of the largest faces in ``reference`` and ``image`` — the face
    similarity the identity papers report (1 = the same embedding; unrelated people score near 0).

    Example:
        >>> identity_similarity("me.jpg", result.images[0])  # doctest: +SKIP
        0.71
    """
    first, second = analyze_faces([reference, image], pack, root)
    return float(np.dot(first.normed_embedding, second.normed_embedding))
