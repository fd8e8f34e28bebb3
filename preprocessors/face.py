"""Face analysis with insightface: detect, keep the largest face, 5-point alignment, identity embedding.

Used by every identity condition (IP-Adapter FaceID, InstantID, and later PuLID and PhotoMaker): they take a
:class:`FaceInfo`. Models come from an insightface model pack in insightface's own folder layout
(``<root>/models/<pack>/*.onnx``) or from any folder of detection + recognition ONNX files: ``buffalo_l`` for FaceID,
``antelopev2`` (SCRFD-10G detector, glintr100 ArcFace) for InstantID and PuLID, which were trained on its raw
embeddings. A photo is analysed once per process: results are kept by the photo's content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..base.caches import process_cached
from ..base.errors import (
    CheckpointError,
    ConditionError,
    FaceNotFoundError,
    IncompatibleModelError,
    InputError,
    MissingWeightsError,
)
from ..base.images import load_image

if TYPE_CHECKING:
    from ..weights.inventory import ModelNeed

__all__ = [
    "FaceInfo",
    "FaceAnalyzer",
    "analyze_faces",
    "pack_folder",
    "draw_faces",
    "Identity",
    "identity_features",
    "save_identity",
    "identity_similarity",
    "clip_crop",
    "align_face",
    "FFHQ_TEMPLATE",
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
# Where the five landmarks go in a 512-px FFHQ-aligned face (facexlib's template, which PuLID's features are read on).
FFHQ_TEMPLATE = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ]
)
# facexlib fills what lies outside the photo with this grey (it warps BGR images: (135, 133, 132) there).
_ALIGN_BORDER_RGB = (132, 133, 135)


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


def pack_need(pack: str, root: str | os.PathLike[str] = "~/.insightface") -> ModelNeed:
    """The insightface pack a face analysis will look for, as ``sdxl-control models`` reports it."""
    from ..weights.inventory import INSIGHTFACE_LICENCE, ModelNeed

    direct = Path(pack).expanduser()
    folder = direct if direct.is_dir() else Path(root).expanduser() / "models" / pack
    how = str(_missing_pack(pack, folder)).partition("; ")[2]
    return ModelNeed(f"face analysis ({Path(pack).name})", str(folder), ("*.onnx",), how=how,
                     licence=INSIGHTFACE_LICENCE)  # fmt: skip


@process_cached(2)
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
    try:
        app.prepare(ctx_id=-1, det_size=(DETECTOR_SIZE, DETECTOR_SIZE))
    except Exception as exc:
        raise IncompatibleModelError(f"{folder}: insightface could not prepare its models ({exc})") from None
    app.sdxl_control_folder = folder  # named in errors raised while running its models
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


def _detect_at(app: Any, bgr: np.ndarray, size: int, confidence: float | None = None) -> list[Any]:
    """insightface's ``FaceAnalysis.get`` with the detector input ``size`` (and detector ``confidence``, default the
    pack's 0.5): detection, then recognition per face."""
    from insightface.app.common import Face

    detector = app.det_model
    saved = detector.det_thresh
    try:
        if confidence is not None:  # what the detector reads while it runs; put back below
            detector.det_thresh = confidence
        boxes, points = detector.detect(bgr, input_size=(size, size))
        faces = []
        for i in range(boxes.shape[0]):
            face = Face(bbox=boxes[i, 0:4], kps=None if points is None else points[i], det_score=boxes[i, 4])
            app.models["recognition"].get(bgr, face)
            faces.append(face)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        # insightface takes any ONNX with a detector's input shape for one, and fails only when running it.
        raise IncompatibleModelError(
            f"the face models in {getattr(app, 'sdxl_control_folder', 'the pack')} are not ones insightface can run "
            f"({type(exc).__name__}: {exc}): the detector must be an SCRFD or RetinaFace export (5 landmarks) and "
            "the recognition model an ArcFace one, as in the buffalo_l and antelopev2 packs"
        ) from None
    finally:
        detector.det_thresh = saved
    return faces


_FACES: OrderedDict[tuple[str, str, float | None], tuple[list[Any], list[int]]] = OrderedDict()
# EVA-CLIP features per (EVA source, parsing folder, device, aligned face): about 12 MB each for the published EVA, so
# only a few are kept.
_VISION: OrderedDict[tuple[str, str, str, str], tuple[np.ndarray, np.ndarray]] = OrderedDict()
_VISION_CACHE_SIZE = 8


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

    def _faces(self, rgb: Image.Image, confidence: float | None = None) -> tuple[list[Any], list[int]]:
        """(detections largest first, detector sizes tried), cached by the photo's pixels."""
        pixels = np.asarray(rgb)
        digest = hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()
        key = (str(self.folder), digest, confidence)
        if key in _FACES:
            _FACES.move_to_end(key)
            return _FACES[key]
        app = _analysis(str(self.folder))
        bgr = np.ascontiguousarray(pixels[:, :, ::-1])
        tried: list[int] = []
        found: list[Any] = []
        for size in _search_sizes(*rgb.size):
            tried.append(size)
            found = _detect_at(app, bgr, size, confidence)
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

    def detect(self, image: Any, confidence: float) -> list[FaceInfo]:
        """Every face the detector scores at least ``confidence`` (any size), described, largest first."""
        rgb = load_image(image, "image")
        return [self._info(rgb, face) for face in self._faces(rgb, confidence)[0]
                if face.kps is not None and getattr(face, "embedding", None) is not None]  # fmt: skip

    def analyze(self, image: Any, name: str | None = None) -> FaceInfo:
        """The largest face; a clear error when there is none or it is too small."""
        label = name or (str(image) if isinstance(image, (str, os.PathLike)) else "the image")
        rgb = load_image(image, f"face image {label}")
        faces, tried = self._faces(rgb)
        if not faces:
            sizes = ", ".join(f"{s}x{s}" for s in tried)
            raise FaceNotFoundError(
                f"no face found in {label} ({rgb.size[0]}x{rgb.size[1]}; the detector looked at it scaled to {sizes}): "
                f"use a photo where the face is clearly visible, at least {self.min_face} px across, with some margin "
                "around it"
            )
        if len(faces) > 1:
            log.warning("%d faces in %s: using the largest", len(faces), label)
        face = faces[0]
        x0, y0, x1, y1 = (float(v) for v in face.bbox)
        if min(x1 - x0, y1 - y0) < self.min_face:
            raise FaceNotFoundError(
                f"the face in {label} is {x1 - x0:.0f}x{y1 - y0:.0f} px; at least {self.min_face} px is needed for its "
                "identity: use a closer or larger photo"
            )
        if face.kps is None or getattr(face, "embedding", None) is None:
            raise ConditionError(f"the face model pack gave no landmarks or embedding for {label}")
        return self._info(rgb, face)

    @staticmethod
    def _info(rgb: Image.Image, face: Any) -> FaceInfo:
        from insightface.utils import face_align

        aligned = face_align.norm_crop(np.asarray(rgb), landmark=face.kps, image_size=224)
        return FaceInfo(
            bbox=tuple(float(v) for v in face.bbox[:4]),  # type: ignore[arg-type]
            landmarks=np.asarray(face.kps, dtype=np.float32),
            score=float(face.det_score),
            embedding=np.asarray(face.embedding, dtype=np.float32).reshape(-1),
            aligned=Image.fromarray(aligned),
            image_size=rgb.size,
        )


def align_face(image: Any, landmarks: np.ndarray, size: int = 512) -> np.ndarray:
    """The face warped onto the FFHQ five-point template at ``size`` px (RGB uint8), as facexlib aligns faces: a
    similarity transform fitted to the landmarks (least median of squares), grey outside the photo.

    Example:
        >>> face = FaceAnalyzer("antelopev2").analyze("me.jpg"); align_face("me.jpg", face.landmarks).shape  # doctest: +SKIP
        (512, 512, 3)
    """
    import cv2

    rgb = np.asarray(load_image(image, "face image"))
    matrix = cv2.estimateAffinePartial2D(np.asarray(landmarks), FFHQ_TEMPLATE * (size / 512.0), method=cv2.LMEDS)[0]
    if matrix is None:
        raise ConditionError("the face's landmarks do not fit a similarity transform (are they five distinct points?)")
    return cv2.warpAffine(rgb, matrix, (size, size), borderMode=cv2.BORDER_CONSTANT, borderValue=_ALIGN_BORDER_RGB)


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


def draw_faces(image: Any, pack: str = IDENTITY_PACK, root: str | os.PathLike[str] = "~/.insightface") -> Image.Image:
    """The photo with every face the pack detects outlined, its five landmarks and detector score drawn: the largest,
    the one identity methods use, in green, the others in red (``sdxl-control preprocess faces``)."""
    from PIL import ImageDraw

    photo = load_image(image, "face image").copy()
    faces = FaceAnalyzer(pack, root).faces(photo)
    if not faces:
        raise FaceNotFoundError(f"no face found in {image if isinstance(image, (str, os.PathLike)) else 'the image'}")
    draw = ImageDraw.Draw(photo)
    width = max(2, round(max(photo.size) / 300))
    for i, face in enumerate(faces):
        colour = (0, 220, 0) if i == 0 else (230, 40, 40)
        x0, y0, x1, y1 = (float(v) for v in face.bbox)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        for x, y in np.asarray(face.kps, np.float32).reshape(-1, 2):
            draw.ellipse((x - 2 * width, y - 2 * width, x + 2 * width, y + 2 * width), fill=colour)
        draw.text((x0 + width, max(0.0, y0 - 12)), f"{float(face.det_score):.2f}", fill=colour)
    return photo


@dataclass(frozen=True)
class Identity:
    """A person as the identity methods take one, without the photos: the raw embedding of each photo, the five
    keypoints (with their photo's size) that pose the face (InstantID), and optionally, per photo, EVA02-CLIP's
    features of the parsed, aligned face (PuLID: ``eva_cls`` (photos, proj), ``eva_hidden`` (photos, 5, tokens,
    width)) and the photo as CLIP reads it (PhotoMaker: ``clip_images`` (photos, 224, 224, 3) uint8, resized and
    centre-cropped). ``pack`` names the recognition model: embeddings of different models are not comparable.

    Example:
        >>> identity = identity_features(["me1.jpg", "me2.jpg"], eva="QuanSun/EVA-CLIP")  # doctest: +SKIP
        >>> identity.save("me.safetensors"); Identity.load("me.safetensors").embeddings.shape  # doctest: +SKIP
        (2, 512)
    """

    embeddings: np.ndarray
    keypoints: np.ndarray
    image_size: tuple[int, int]
    pack: str = ""
    eva_cls: np.ndarray | None = None
    eva_hidden: np.ndarray | None = None
    clip_images: np.ndarray | None = None

    @classmethod
    def of(cls, faces: list[FaceInfo], keypoints_from: FaceInfo | None = None, pack: str = "") -> Identity:
        pose = keypoints_from or faces[0]
        return cls(np.stack([f.embedding for f in faces]), pose.landmarks.copy(), pose.image_size, Path(pack).name)

    def save(self, path: str | os.PathLike[str]) -> None:
        import torch
        from safetensors.torch import save_file

        arrays = {"embeddings": self.embeddings, "keypoints": self.keypoints, "eva_cls": self.eva_cls,
                  "eva_hidden": self.eva_hidden}  # fmt: skip
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in arrays.items() if v is not None}
        if self.clip_images is not None:
            tensors["clip_images"] = torch.from_numpy(np.ascontiguousarray(self.clip_images, np.uint8))
        width, height = self.image_size
        save_file(tensors, str(path), {"format": "sdxl-control identity 1", "image_size": f"{width}x{height}",
                                       "pack": self.pack})  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        from safetensors import safe_open

        from ..weights.checkpoints import check_safetensors

        file = Path(path).expanduser()
        if not file.is_file():
            raise InputError(f"no identity file at {file}")
        try:
            check_safetensors(file)
        except CheckpointError as exc:
            raise InputError(f"identity file {exc}") from None
        with safe_open(str(file), framework="np") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            if not meta.get("format", "").startswith("sdxl-control identity") or "embeddings" not in keys:
                raise InputError(f"{file} is not an identity file (make one with save_identity)")
            width, _, height = meta.get("image_size", "0x0").partition("x")
            optional = {k: f.get_tensor(k) if k in keys else None for k in ("eva_cls", "eva_hidden", "clip_images")}
            return cls(f.get_tensor("embeddings"), f.get_tensor("keypoints"), (int(width), int(height)),
                       meta.get("pack", ""), **optional)  # fmt: skip


def identity_features(
    photos: Any, pack: str = IDENTITY_PACK, root: str | os.PathLike[str] = "~/.insightface", *,
    keypoints_from: Any = None, vision: bool = False, eva: str | os.PathLike[str] | None = None,
    parsing: str | os.PathLike[str] | None = None, device: Any = "cpu", clip: bool = False,
) -> Identity:  # fmt: skip
    """Everything the identity methods read from ``photos`` of one person: raw embeddings and keypoints, and with
    ``vision`` each photo's largest face aligned on the FFHQ template, parsed (``parsing``: the folder of facexlib's
    BiSeNet weights, default facexlib's own) and read by EVA02-CLIP (``eva``: repo or file, default
    ``QuanSun/EVA-CLIP``); with ``clip`` each photo as CLIP reads it (224 px, resized and centre-cropped).

    The same face serves both: the reference's second detector (facexlib's, which picks the face nearest the centre)
    is not used, so a photo with several people cannot give one person's embedding and another's features.

    Example:
        >>> identity_features(["me1.jpg", "me2.jpg"], vision=True)  # doctest: +SKIP
    """
    items = photos if isinstance(photos, (list, tuple)) else [photos]
    faces = analyze_faces(items, pack, root)
    pose = analyze_faces(keypoints_from, pack, root)[0] if keypoints_from is not None else None
    identity = Identity.of(faces, pose, pack)
    if clip:
        identity = dataclasses.replace(identity, clip_images=np.stack([clip_crop(item) for item in items]))
    if not vision:
        return identity
    from .eva_clip import EVA_REPO, eva_face_features, load_eva_clip
    from .face_parsing import face_only, load_face_parser

    model = load_eva_clip(EVA_REPO if eva is None else eva, device)
    parser = load_face_parser(parsing, device)
    classes, hidden = [], []
    for item, face in zip(items, faces, strict=True):
        if isinstance(item, FaceInfo):
            raise ConditionError("EVA-CLIP face features need the photo itself, not only its FaceInfo")
        aligned = align_face(item, face.landmarks)
        key = (str(eva), str(parsing), str(device), hashlib.sha1(aligned.tobytes()).hexdigest())
        if key not in _VISION:
            cls, sequences = eva_face_features(model, face_only(aligned, parser))
            _VISION[key] = (cls[0].cpu().numpy(), np.stack([h[0].cpu().numpy() for h in sequences]))
            while len(_VISION) > _VISION_CACHE_SIZE:
                _VISION.popitem(last=False)
        _VISION.move_to_end(key)
        classes.append(_VISION[key][0])
        hidden.append(_VISION[key][1])
    return dataclasses.replace(identity, eva_cls=np.stack(classes), eva_hidden=np.stack(hidden))


def save_identity(
    path: str | os.PathLike[str], photos: Any, *, keypoints_from: Any = None, face_pack: str = IDENTITY_PACK,
    face_root: str | os.PathLike[str] = "~/.insightface", pulid: bool = False, eva: str | os.PathLike[str] | None = None,
    parsing: str | os.PathLike[str] | None = None, photomaker: bool = False,
) -> Identity:  # fmt: skip
    """Analyse ``photos`` (one or several of the same person) and keep the person in a ``.safetensors`` file: their
    raw embeddings and the keypoints of ``keypoints_from`` (default: the first photo) — what InstantID reads — with
    ``pulid=True`` the EVA-CLIP face features PuLID reads (``eva``, ``parsing``: where those models are), and with
    ``photomaker=True`` the photos as CLIP reads them (PhotoMaker v2 also reads ``buffalo_l`` embeddings: pass
    ``face_pack="buffalo_l"``). ``face_pack`` and ``face_root`` are the conditions' own option names. Returns what was
    saved.

    Example:
        >>> save_identity("me.safetensors", ["me1.jpg", "me2.jpg"], pulid=True)  # InstantID and PuLID can read it  # doctest: +SKIP
    """
    identity = identity_features(
        photos,
        face_pack,
        face_root,
        keypoints_from=keypoints_from,
        vision=pulid,
        eva=eva,
        parsing=parsing,
        clip=photomaker,
    )
    identity.save(path)
    return identity


def clip_crop(photo: Any, size: int = 224) -> np.ndarray:
    """The photo as a CLIP image processor reads it before normalising: shortest side to ``size`` (bicubic), centre
    crop, RGB uint8 (size, size, 3).

    Example:
        >>> clip_crop("me.jpg").shape  # doctest: +SKIP
        (224, 224, 3)
    """
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   do_rescale=False, do_normalize=False)  # fmt: skip
    crop = processor(images=[load_image(photo, "photo")], return_tensors="np").pixel_values[0]
    return np.clip(np.round(crop), 0, 255).astype(np.uint8).transpose(1, 2, 0)


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
