"""The face detailer (A1111's ADetailer, ComfyUI Impact Pack's FaceDetailer): after an image is made, every face in it
is found, and each is repainted on its own — a crop around it at the request's size, at low strength — then pasted back
with a feathered mask. Small or distant faces, which keep less identity, get the model's whole resolution.

The mask, its dilation and blur, the crop and the paste are ADetailer's (with A1111's "inpaint only masked"): the
face's box filled, dilated by a square kernel of ``dilation`` pixels, blurred by A1111's separable Gaussian of radius
``blur``; the crop is the mask's extent grown by ``padding`` and widened to the request's aspect; the repaint is pasted
back through the blurred mask. The repaint itself is :class:`~sdxl_control.passes.generator.GenerationRequest`
inpainting with ``padding_mask_crop``: the one loop, every condition stacked.

Several people: each face found is matched to the identity condition it resembles most (ArcFace cosine similarity of
its embedding and the condition's photos, at least ``match_threshold``), or to the condition whose region ``mask``
holds its centre; only that identity acts on its repaint. Faces matching no one get a pass without identity
(``unmatched="neutral"``) or are left alone (``"skip"``). A regional prompt whose region holds a face's centre gives
its repaint the prompt (as ADetailer's per-face prompts replace the main one); other regions are cut to the crop, or
dropped where they miss it. What was found, matched and repainted goes into each image's recipe, under
``measurements["detailer"]``.

Example:
    >>> gen.generate("two friends", conditions=(alice, bob), detailer=FaceDetailer(strength=0.35))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from ..base.errors import InvalidRequestError
from ..base.validation import check_fields, unknown_keys
from ..protocol.conditions import Condition, Crop, Likeness, Stage
from ..records.recipe import RecipeImage, Result

if TYPE_CHECKING:
    from ..preprocessors.face import FaceInfo
    from .request import GenerationRequest

__all__ = [
    "FaceDetailer", "face_mask", "crop_region", "match_faces", "Match", "detail_faces", "detail_result",
    "detailer_pack",
]  # fmt: skip

log = logging.getLogger(__name__)


MAX_DILATION = 128


@dataclass(frozen=True)
class FaceDetailer:
    """How the face detailer works; its defaults are ADetailer's (detector confidence 0.3, dilation 4 px, blur 4,
    strength 0.4, padding 32 px). ``steps`` (default: the request's) is the schedule the repaint enters at
    ``1 - strength``. ``face_pack`` analyses faces (default: the first identity condition's pack, else ``buffalo_l``);
    identity photos are analysed with the same pack, so their embeddings compare.

    Example:
        >>> FaceDetailer(strength=0.35, unmatched="skip").padding
        32
    """

    strength: float = 0.4
    confidence: float = 0.3
    dilation: int = 4
    blur: int = 4
    padding: int = 32
    steps: int | None = None
    unmatched: Literal["neutral", "skip"] = "neutral"
    match_threshold: float = 0.2
    face_pack: str | None = None
    face_root: str = "~/.insightface"

    def __post_init__(self) -> None:
        check_fields(self, "the face detailer")
        if not 0.0 < self.strength <= 1.0:
            raise InvalidRequestError(f"the face detailer's strength must lie in (0, 1], got {self.strength}")
        if not 0.0 < self.confidence <= 1.0:
            raise InvalidRequestError(f"the face detailer's confidence must lie in (0, 1], got {self.confidence}")
        if min(self.blur, self.padding) < 0:
            raise InvalidRequestError(
                f"the face detailer's blur and padding are pixels, >= 0, got blur {self.blur}, padding {self.padding}"
            )
        # ADetailer's own range for its "mask erosion (-) / dilation (+)": a wider kernel costs time and means nothing.
        if not -MAX_DILATION <= self.dilation <= MAX_DILATION:
            raise InvalidRequestError(
                f"the face detailer's dilation (a job's detailer.dilation) must lie in [-{MAX_DILATION}, "
                f"{MAX_DILATION}] pixels (negative erodes the face's box), got {self.dilation}"
            )
        if self.steps is not None and self.steps < 1:
            raise InvalidRequestError(f"the face detailer's steps must be >= 1, got {self.steps}")
        if not -1.0 <= self.match_threshold <= 1.0:
            raise InvalidRequestError(f"match_threshold is a cosine similarity in [-1, 1], got {self.match_threshold}")

    @classmethod
    def of(cls, value: FaceDetailer | Mapping[str, Any] | bool | None) -> FaceDetailer | None:
        """A detailer from what a job file or recipe holds: ``true`` (the defaults), its settings, or ``false``."""
        if isinstance(value, FaceDetailer) or value is None:
            return value
        if isinstance(value, bool):
            return cls() if value else None
        if not isinstance(value, Mapping):
            raise InvalidRequestError(f"detailer: true, or an object of its settings, got {value!r:.60}")
        message = unknown_keys(value, [f for f in cls.__dataclass_fields__], "the face detailer", "setting")
        if message:
            raise InvalidRequestError(message)
        return cls(**value)

    def settings(self) -> dict[str, Any]:
        return asdict(self)


def a1111_blur(mask: Image.Image, radius: int) -> Image.Image:
    """A1111's mask blur: a Gaussian of sigma ``radius`` along x, then along y, each kernel ``2 * int(2.5r + 0.5) + 1``
    wide."""
    import cv2

    if radius <= 0:
        return mask
    kernel = 2 * int(2.5 * radius + 0.5) + 1
    pixels = cv2.GaussianBlur(np.asarray(mask), (kernel, 1), radius)
    return Image.fromarray(cv2.GaussianBlur(pixels, (1, kernel), radius))


def face_mask(bbox: Sequence[float], size: tuple[int, int], dilation: int = 4, blur: int = 4) -> Image.Image:
    """The repaint mask of one face, as ADetailer makes it: the box filled white on a black ``size`` (width, height),
    dilated by a ``dilation`` px square (eroded if negative), then blurred as A1111 blurs masks."""
    import cv2

    mask = Image.new("L", (size[0], size[1]), 0)
    ImageDraw.Draw(mask).rectangle([float(v) for v in bbox[:4]], fill=255)
    if dilation:
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (abs(dilation), abs(dilation)))
        morph = cv2.dilate if dilation > 0 else cv2.erode
        mask = Image.fromarray(morph(np.asarray(mask), kernel, iterations=1))
    return a1111_blur(mask, blur)


def crop_region(mask: Image.Image, size: tuple[int, int], padding: int) -> tuple[int, int, int, int]:
    """The box repainted for ``mask``: every pixel it touches, grown by ``padding``, widened to the aspect of ``size``
    (A1111's inpaint-only-masked region, as diffusers' ``padding_mask_crop`` computes it)."""
    from diffusers.image_processor import VaeImageProcessor

    x0, y0, x1, y1 = VaeImageProcessor.get_crop_region(mask, size[0], size[1], pad=padding)
    return int(x0), int(y0), int(x1), int(y1)


@dataclass(frozen=True)
class Match:
    """Whom a face was matched to: ``person`` (an index into the references), its ``similarity`` (cosine), and
    ``by`` (``"mask"`` or ``"embedding"``); ``person`` is ``None`` for a face that resembles no one enough.

    Example:
        >>> Match(None).by is None
        True
    """

    person: int | None
    similarity: float | None = None
    by: Literal["mask", "embedding"] | None = None


@dataclass(frozen=True)
class Reference:
    """A person as the detailer compares faces to them: a unit embedding (or ``None``) and a region (a boolean
    (height, width) array of the image, or ``None``)."""

    embedding: np.ndarray | None
    region: np.ndarray | None = None


def match_faces(faces: Sequence[FaceInfo], people: Sequence[Reference], threshold: float) -> list[Match]:
    """Each face's person: the first whose region holds the face's centre, else the one whose embedding is most
    similar to the face's, if at least ``threshold``."""
    matches = []
    for face in faces:
        similarities = [
            float(np.dot(face.normed_embedding, p.embedding)) if p.embedding is not None else None for p in people
        ]
        cx, cy = (face.bbox[0] + face.bbox[2]) / 2, (face.bbox[1] + face.bbox[3]) / 2
        inside = [i for i, p in enumerate(people) if p.region is not None and _holds(p.region, cx, cy)]
        if inside:
            matches.append(Match(inside[0], similarities[inside[0]], "mask"))
            continue
        scored = [(s, i) for i, s in enumerate(similarities) if s is not None]
        best = max(scored, default=None)
        if best is not None and best[0] >= threshold:
            matches.append(Match(best[1], best[0], "embedding"))
        else:
            matches.append(Match(None, best[0] if best is not None else None))
    return matches


def _holds(region: np.ndarray, x: float, y: float) -> bool:
    height, width = region.shape
    return bool(region[min(max(int(y), 0), height - 1), min(max(int(x), 0), width - 1)])


def detailer_pack(conditions: Sequence[Condition]) -> str:
    """The pack the detailer analyses faces with when none is named: the first identity condition's, else
    ``buffalo_l`` (one pack for the image and the photos, so that their embeddings compare)."""
    from ..preprocessors.face import DEFAULT_PACK

    for condition in conditions:
        pack = getattr(condition, "face_pack", None)
        if condition.likeness() is not None and isinstance(pack, str):
            return pack
    return DEFAULT_PACK


def _reference(likeness: Likeness, pack: str, root: str, image_size: tuple[int, int]) -> Reference:
    from pathlib import Path

    from ..preprocessors.face import Identity, analyze_faces

    embedding = None
    if likeness.faces is not None:
        found = analyze_faces(likeness.faces, pack, root)
        embedding = np.mean([f.normed_embedding for f in found], axis=0)
    elif likeness.identity is not None:
        saved = Identity.load(likeness.identity)
        if Path(saved.pack).name == Path(pack).name:
            embedding = np.mean([e / np.linalg.norm(e) for e in np.asarray(saved.embeddings, np.float32)], axis=0)
        else:
            log.warning("identity %s was saved with the %s pack, the detailer analyses faces with %s: it is matched "
                        "by its region only", likeness.identity, saved.pack, pack)  # fmt: skip
    if embedding is not None:
        embedding = (embedding / np.linalg.norm(embedding)).astype(np.float32)
    region = None
    if likeness.mask is not None:
        from ..base.images import load_image

        mask = load_image(likeness.mask, "region mask").convert("L").resize(image_size, Image.Resampling.NEAREST)
        region = np.asarray(mask) >= 128
    return Reference(embedding, region)


def _face_in_crop(face: FaceInfo, box: tuple[int, int, int, int], size: tuple[int, int]) -> FaceInfo:
    """``face`` in the pixels of the repaint of ``box`` at ``size``."""
    x0, y0, x1, y1 = box
    scale = np.array([size[0] / (x1 - x0), size[1] / (y1 - y0)], np.float32)
    origin = np.array([x0, y0], np.float32)
    corners = (np.asarray(face.bbox, np.float32).reshape(2, 2) - origin) * scale
    return replace(face, bbox=tuple(float(v) for v in corners.reshape(-1)),
                   landmarks=(face.landmarks - origin) * scale, image_size=tuple(size))  # fmt: skip


def detail_faces(
    image: Image.Image,
    request: GenerationRequest,
    seed: int,
    repaint: Callable[[GenerationRequest], Image.Image],
) -> tuple[Image.Image, dict[str, Any]]:
    """``image`` (made by ``request`` with ``seed``) with every face repainted by ``repaint`` (the generator's run of
    one request), and the record of what was found, matched and repainted."""
    from ..preprocessors.face import FaceAnalyzer

    detailer = request.detailer
    assert detailer is not None
    pack = detailer.face_pack or detailer_pack(request.conditions)
    faces = FaceAnalyzer(pack, detailer.face_root).detect(image, detailer.confidence)
    if not faces:
        log.warning("the face detailer found no face (detector confidence %.2f): the image is kept as it was",
                    detailer.confidence)  # fmt: skip
        return image, {"found": 0, "repainted": 0, "faces": []}
    people = [(i, c) for i, c in enumerate(request.conditions) if c.likeness() is not None]
    references = [_reference(c.likeness(), pack, detailer.face_root, image.size) for _, c in people]  # type: ignore[arg-type]
    matches = match_faces(faces, references, detailer.match_threshold) if people else [Match(None)] * len(faces)
    others = [c for c in request.conditions if c.likeness() is None]
    regions = _regions(request.conditions)
    current, records = image, []
    for face, match in zip(faces, matches, strict=True):
        chosen = [*others, *([people[match.person][1]] if match.person is not None else [])]
        region = _face_region(face, regions, image.size)
        if region is not None:  # its prompt is the whole crop's now: the region itself would only repeat it
            chosen = [c for c in chosen if c is not regions[region]]
        redo = match.person is not None or not people or detailer.unmatched == "neutral"
        if redo:
            mask = face_mask(face.bbox, image.size, detailer.dilation, detailer.blur)
            if mask.getbbox() is None:  # eroded to nothing: there is no crop to repaint (a division by zero below)
                width, height = (round(face.bbox[2] - face.bbox[0]), round(face.bbox[3] - face.bbox[1]))
                raise InvalidRequestError(
                    f"the face detailer's dilation (a job's detailer.dilation) {detailer.dilation} erodes the "
                    f"{width}x{height} px box of the face at {[round(v) for v in face.bbox[:2]]} to nothing: give a "
                    f"dilation above -{min(width, height)} (ADetailer's default is 4)"
                )
            box = crop_region(mask, request.size, detailer.padding)
            crop = Crop(box, image.size, request.size, _face_in_crop(face, box, request.size))
            conditions = tuple(
                c2 for c in chosen if Stage.BASE in c.stage and (c2 := c.in_crop(crop)) is not None
            )  # fmt: skip
            described = regions[region] if region is not None else None
            current = repaint(request.face_pass(current, mask, seed, conditions, region=described))
        records.append({
            "box": [round(v, 1) for v in face.bbox], "score": round(face.score, 3),
            "identity": people[match.person][0] if match.person is not None else None,
            "similarity": None if match.similarity is None else round(match.similarity, 4),
            "matched_by": match.by, "repainted": redo,
        })  # fmt: skip
        if regions:  # which of the request's conditions is the region whose prompt repainted the face
            found = (
                None if region is None else next(i for i, c in enumerate(request.conditions) if c is regions[region])
            )
            records[-1]["region"] = found  # by identity: a mask given as an array has no plain equality
    return current, {"found": len(faces), "repainted": sum(r["repainted"] for r in records), "faces": records}


def _regions(conditions: Sequence[Condition]) -> list[Any]:
    """The regional prompts among ``conditions`` that act on the base (the stage the detailer repaints on)."""
    from ..adapters.regions import Region

    return [c for c in conditions if isinstance(c, Region) and Stage.BASE in c.stage and c.scale > 0]


def _face_region(face: FaceInfo, regions: Sequence[Any], size: tuple[int, int]) -> int | None:
    """The index of the first region of ``regions`` that holds the centre of ``face`` in an image of ``size`` (a box
    by its fractions; a mask where it is at least half white, as the detailer reads identity masks), else ``None``."""
    from ..base.images import load_image

    cx, cy = (face.bbox[0] + face.bbox[2]) / 2, (face.bbox[1] + face.bbox[3]) / 2
    for i, region in enumerate(regions):
        if region.box is not None:
            x0, y0, x1, y1 = region.box
            if x0 * size[0] <= cx < x1 * size[0] and y0 * size[1] <= cy < y1 * size[1]:
                return i
            continue
        mask = load_image(region.mask, "Region mask").convert("L").resize(size, Image.Resampling.NEAREST)
        if _holds(np.asarray(mask) >= 128, cx, cy):
            return i
    return None


def detail_result(
    result: Result, request: GenerationRequest, repaint: Callable[[GenerationRequest], Image.Image]
) -> Result:
    """``result`` (made by ``request``) with the faces of each image repainted by ``repaint`` (one pass of one
    request); each image keeps its recipe, with what the detailer did under ``measurements["detailer"]``."""
    images = []
    for image, seed in zip(result.images, request.seeds, strict=True):
        detailed, record = detail_faces(image, request, seed, repaint)
        out = RecipeImage.wrap(detailed, image.recipe)
        out.annotate(detailer=record)
        images.append(out)
    return Result(images=images, latents=result.latents)
