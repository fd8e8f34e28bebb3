"""The face detailer: ADetailer's mask, dilation, blur, crop and paste (transcribed here from ADetailer and A1111) equal
ours; each face is repainted by the one loop's inpainting of a crop, pixels outside the masks untouched; faces are
matched to the identity they resemble (or whose region holds them) and only that identity acts on their repaint; no
face found keeps the image; recipes record what was done and re-make it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageDraw, ImageOps

from sdxl_control import GenerationRequest
from sdxl_control.adapters.controlnet import ControlNet
from sdxl_control.adapters.faceid import FaceID
from sdxl_control.adapters.instantid import InstantID
from sdxl_control.adapters.ip_adapter import IPAdapter
from sdxl_control.adapters.lora import LoRA
from sdxl_control.base.errors import InvalidRequestError
from sdxl_control.engine.start import _overlay
from sdxl_control.passes.detailer import (
    FaceDetailer,
    Match,
    Reference,
    crop_region,
    detail_faces,
    face_mask,
    match_faces,
)
from sdxl_control.preprocessors.face import FaceInfo
from sdxl_control.protocol.conditions import Crop
from sdxl_control.testing.stand_ins import tiny_condition, tiny_face_pack

PROMPT = "a portrait, soft light"
SIZE = 128


# --- ADetailer and A1111, transcribed (bbox mask, dilation, mask blur, inpaint-only-masked region, paste) ----------


def adetailer_mask(bbox, shape, dilate, blur):
    mask = Image.new("L", shape, 0)  # ADetailer: create_mask_from_bbox
    ImageDraw.Draw(mask).rectangle(bbox, fill=255)
    arr = np.array(mask)  # ADetailer: dilate_erode -> _dilate
    arr = cv2.dilate(arr, cv2.getStructuringElement(cv2.MORPH_RECT, (dilate, dilate)), iterations=1)
    kernel_size = 2 * int(2.5 * blur + 0.5) + 1  # A1111 img2img: mask_blur_x, then mask_blur_y
    arr = cv2.GaussianBlur(arr, (kernel_size, 1), blur)
    arr = cv2.GaussianBlur(arr, (1, kernel_size), blur)
    return Image.fromarray(arr)


def a1111_crop_region(mask, pad, width, height):
    """A1111 masking.get_crop_region then expand_crop_region (inpaint_full_res)."""
    m = np.array(mask)
    h, w = m.shape
    left = next(i for i in range(w) if m[:, i].any())
    right = next(i for i in range(w) if m[:, w - 1 - i].any())
    top = next(i for i in range(h) if m[i].any())
    bottom = next(i for i in range(h) if m[h - 1 - i].any())
    x1, y1 = int(max(left - pad, 0)), int(max(top - pad, 0))
    x2, y2 = int(min(w - right + pad, w)), int(min(h - bottom + pad, h))
    if (x2 - x1) / (y2 - y1) > width / height:
        diff = int((x2 - x1) / (width / height) - (y2 - y1))
        y1 -= diff // 2
        y2 += diff - diff // 2
        if y2 >= h:
            y1, y2 = y1 - (y2 - h), h
        if y1 < 0:
            y1, y2 = 0, y2 - y1
        y2 = min(y2, h)
    else:
        diff = int((y2 - y1) * (width / height) - (x2 - x1))
        x1 -= diff // 2
        x2 += diff - diff // 2
        if x2 >= w:
            x1, x2 = x1 - (x2 - w), w
        if x1 < 0:
            x1, x2 = 0, x2 - x1
        x2 = min(x2, w)
    return x1, y1, x2, y2


def a1111_paste(original, mask, repainted, region):
    overlay = Image.new("RGBa", original.size)  # A1111: overlay_images
    overlay.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    overlay = overlay.convert("RGBA")
    x1, y1, x2, y2 = region  # A1111: apply_overlay with paste_to
    base = Image.new("RGBA", original.size)
    base.paste(repainted.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
    base.alpha_composite(overlay)
    return base.convert("RGB")


@pytest.mark.parametrize(
    "bbox, shape, size",
    [((40.3, 52.8, 91.6, 110.2), (160, 200), (128, 128)), ((5, 120, 60, 190), (320, 200), (128, 192))],
)
def test_mask_crop_and_paste_are_adetailers(bbox, shape, size):
    ours = face_mask(bbox, shape, dilation=4, blur=4)
    assert np.array_equal(np.asarray(ours), np.asarray(adetailer_mask(bbox, shape, 4, 4)))
    other = np.asarray(adetailer_mask(bbox, shape, 5, 4))
    assert not np.array_equal(np.asarray(ours), other)  # a pixel more of dilation shows
    region = crop_region(ours, size, padding=32)
    assert region == a1111_crop_region(ours, 32, *size)
    assert crop_region(ours, size, padding=31) != region
    rng = np.random.default_rng(1)
    original = Image.fromarray(rng.integers(0, 255, (shape[1], shape[0], 3), dtype=np.uint8))
    repainted = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    pasted = _overlay(VaeImageProcessor(vae_scale_factor=8), original, ours, region)(repainted)
    assert np.array_equal(np.asarray(pasted), np.asarray(a1111_paste(original, ours, repainted, region)))


# --- matching -------------------------------------------------------------------------------------------------------


def _face(bbox, embedding, size=(200, 100)):
    points = np.zeros((5, 2), np.float32)
    return FaceInfo(tuple(map(float, bbox)), points, 0.9, np.asarray(embedding, np.float32), Image.new("RGB", (8, 8)),
                    size)  # fmt: skip


def test_each_face_is_matched_to_whom_it_resembles_or_whose_region_holds_it():
    a, b = np.eye(4)[0], np.eye(4)[1]
    faces = [_face((10, 10, 40, 40), a + 0.1 * b), _face((150, 10, 190, 50), 0.2 * a + b), _face((90, 60, 99, 69), -a)]
    people = [Reference(a.astype(np.float32)), Reference(b.astype(np.float32))]
    matches = match_faces(faces, people, threshold=0.2)
    assert [m.person for m in matches] == [0, 1, None]
    assert matches[0].by == "embedding" and matches[0].similarity == pytest.approx(1 / np.sqrt(1.01))
    assert matches[2].similarity == pytest.approx(0.0)  # the best of those it resembles least, kept for the record
    region = np.zeros((100, 200), bool)
    region[:, 100:] = True  # person 0 was placed on the right: a region outranks likeness
    placed = match_faces(faces, [Reference(a.astype(np.float32), region), people[1]], threshold=0.2)
    assert [(m.person, m.by) for m in placed] == [(0, "embedding"), (0, "mask"), (None, None)]
    assert match_faces(faces, people, threshold=0.999)[0] == Match(None, matches[0].similarity)


# --- crops of conditions --------------------------------------------------------------------------------------------


def test_conditions_in_a_crop(tmp_path):
    picture = np.zeros((100, 200, 3), np.uint8)
    picture[:, 100:] = 255
    crop = Crop((100, 0, 200, 100), (200, 100), (64, 64))
    control = ControlNet("some/controlnet", image=Image.fromarray(picture)).in_crop(crop)
    assert control is not None and np.asarray(control.image).min() == 255 and control.image.size == (64, 64)
    left = np.zeros((100, 200), np.uint8)
    left[:, :100] = 255
    assert IPAdapter("plus", Image.new("RGB", (8, 8)), mask=Image.fromarray(left)).in_crop(crop) is None
    right = IPAdapter("plus", Image.new("RGB", (8, 8)), mask=Image.fromarray(255 - left)).in_crop(crop)
    assert right is not None and np.asarray(right.mask).min() == 255
    lora = LoRA("some/lora")
    assert lora.in_crop(crop) is lora  # nothing of it is aligned with the picture
    face = _face((110, 20, 150, 60), np.ones(4))
    instant = InstantID(faces=["me.png"], mask=Image.fromarray(255 - left)).in_crop(
        dataclasses.replace(crop, face=face)
    )
    assert instant.keypoints_from is face and instant.mask is None  # posed by the face found, not the region


# --- the detailer on the tiny models --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack():
    return str(tiny_face_pack("buffalo_l", 0))  # finds one face: a centred square half the picture's side


def _plain(generator, **options):
    return generator.generate(PROMPT, steps=6, size=(SIZE, SIZE), seed=5, progress_bar=False, **options).images[0]


def test_the_detailer_repaints_the_face_as_inpainting_its_crop_would(generator, pack, fresh):
    from tests.test_conditions import assert_same_as_fresh

    plain = _plain(generator)
    detailer = FaceDetailer(face_pack=pack, strength=0.5)
    detailed = _plain(generator, detailer=detailer)
    record = detailed.recipe["measurements"]["detailer"]
    assert (record["found"], record["repainted"]) == (1, 1)
    bbox = record["faces"][0]["box"]
    assert bbox == [32.0, 32.0, 96.0, 96.0] and record["faces"][0]["identity"] is None
    mask = face_mask(bbox, (SIZE, SIZE), 4, 4)
    by_hand = generator.generate(PROMPT, init_image=plain, mask=mask, padding_mask_crop=32, strength=0.5, steps=6,
                                 size=(SIZE, SIZE), seed=5, progress_bar=False).images[0]  # fmt: skip
    ours = np.asarray(detailed)
    assert np.array_equal(ours, np.asarray(by_hand))
    outside = np.asarray(mask) == 0
    assert np.array_equal(ours[outside], np.asarray(plain)[outside])
    assert not np.array_equal(ours[~outside], np.asarray(plain)[~outside])
    assert detailed.recipe["detailer"]["strength"] == 0.5
    assert_same_as_fresh(generator, fresh)


def test_no_face_keeps_the_image_with_a_warning(generator, pack, caplog):
    plain = _plain(generator)
    with caplog.at_level(logging.WARNING):
        kept = _plain(generator, detailer=FaceDetailer(face_pack=pack, confidence=0.95))  # the stand-in scores 0.9
    assert np.array_equal(np.asarray(kept), np.asarray(plain))
    assert kept.recipe["measurements"]["detailer"] == {"found": 0, "repainted": 0, "faces": []}
    assert "found no face" in caplog.text


def test_a_detailed_recipe_re_makes_its_pixels(generator, pack):
    detailed = _plain(generator, detailer={"face_pack": pack, "strength": 0.3}, num_images=2)
    again = generator.run(GenerationRequest.from_recipe(detailed.recipe), progress_bar=False).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(detailed))


def test_bad_detailer_settings_are_refused():
    with pytest.raises(InvalidRequestError, match="strength must lie in"):
        FaceDetailer(strength=0)
    with pytest.raises(InvalidRequestError, match="stregth"):
        GenerationRequest("x", detailer={"stregth": 0.3})
    with pytest.raises(InvalidRequestError, match="unmatched"):
        FaceDetailer(unmatched="ignore")  # type: ignore[arg-type]
    assert GenerationRequest("x", detailer=True).detailer == FaceDetailer()
    assert GenerationRequest("x", detailer=False).detailer is None


def _faceid(photo, pack, **fields):
    return tiny_condition(FaceID("faceid", faces=[photo], face_pack=pack, scale=1.0, **fields))


def test_only_the_matched_identity_acts_on_a_face(generator, pack, tmp_path):
    """Two identities placed by region masks: the stand-in finds the centred face, which the right one's region holds,
    so its repaint carries that identity and the other conditions, not the left one."""
    photo = tmp_path / "me.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(photo)
    left, right = np.zeros((SIZE, SIZE), np.uint8), np.zeros((SIZE, SIZE), np.uint8)
    left[:, :40], right[:, 40:] = 255, 255
    alice = _faceid(str(photo), pack, mask=Image.fromarray(left))
    bob = _faceid(str(photo), pack, mask=Image.fromarray(right), s_scale=0.5)
    style = tiny_condition(LoRA("some/hub-lora", weight_name="style.safetensors", scale=0.5))
    request = GenerationRequest(PROMPT, steps=4, size=(SIZE, SIZE), seed=2, conditions=(alice, bob, style),
                                detailer=FaceDetailer(face_pack=pack))  # fmt: skip
    image = Image.new("RGB", (SIZE, SIZE), (90, 90, 90))
    asked = []
    _, record = detail_faces(image, request, 2, lambda r: asked.append(r) or r.init_image)
    (face_request,) = asked
    assert [type(c).__name__ for c in face_request.conditions] == ["LoRA", "FaceID"]
    assert face_request.conditions[1].s_scale == 0.5  # bob, his region cut to the crop
    assert face_request.strength == 0.4 and face_request.padding_mask_crop == 32 and face_request.detailer is None
    assert record["faces"][0]["identity"] == 1 and record["faces"][0]["matched_by"] == "mask"
    unmatched = dataclasses.replace(request, conditions=(alice, style))
    asked.clear()
    _, record = detail_faces(image, dataclasses.replace(unmatched, detailer=FaceDetailer(face_pack=pack,
                                                        unmatched="skip", match_threshold=1.0)), 2, asked.append)  # fmt: skip
    assert asked == [] and record["repainted"] == 0
    detail_faces(image, dataclasses.replace(unmatched, detailer=FaceDetailer(face_pack=pack, match_threshold=1.0)), 2,
                 lambda r: asked.append(r) or r.init_image)  # fmt: skip
    assert [type(c).__name__ for c in asked[0].conditions] == ["LoRA"]  # a neutral pass: no identity


def test_two_people_are_matched_to_their_identities(generator, shared_dir, insightface_root):
    """Real photos and the real SCRFD detector (the recognition model is a tiny random stand-in: no ArcFace pack is
    reachable here), two identities: each face of the group picture is repainted with its own person, either way
    round, and nothing outside the two masks changes."""
    pack = str(insightface_root / "models" / "buffalo_l")
    photos = {name: Image.open(shared_dir / "images" / f"{name}.jpg").convert("RGB") for name in ("obama", "biden")}
    photos = {k: v.resize((round(v.width * 300 / v.height), 300)) for k, v in photos.items()}
    people = {k: _faceid(str(shared_dir / "images" / f"{k}.jpg"), pack) for k in photos}
    for order in (("obama", "biden"), ("biden", "obama")):
        first, second = (photos[k] for k in order)
        group = Image.new("RGB", (first.width + second.width, 300))
        group.paste(first, (0, 0))
        group.paste(second, (first.width, 0))
        request = GenerationRequest(PROMPT, steps=4, size=(SIZE, SIZE), seed=2,
                                    conditions=(people["obama"], people["biden"]), detailer=FaceDetailer(face_pack=pack))  # fmt: skip
        done, record = detail_faces(group, request, 2, lambda r: generator.run(r, progress_bar=False).images[0])
        assert record["found"] == 2 and record["repainted"] == 2
        by_side = sorted(record["faces"], key=lambda f: f["box"][0])
        assert [f["identity"] for f in by_side] == [("obama", "biden").index(k) for k in order]
        untouched = np.ones((300, group.width), bool)
        for face in record["faces"]:
            untouched &= np.asarray(face_mask(face["box"], group.size, 4, 4)) == 0
        assert np.array_equal(np.asarray(done)[untouched], np.asarray(group)[untouched])
        assert not np.array_equal(np.asarray(done), np.asarray(group))


def test_the_tiny_resolver_gives_the_detailer_its_stand_in_pack():
    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.jobs.spec import JobSpec, resolve

    job = resolve(JobSpec(PROMPT, settings={"detailer": {"strength": 0.3}}), TinyResolver())
    assert job.request.detailer.strength == 0.3
    assert Path(job.request.detailer.face_pack).is_dir()


def test_portrait_fix_keeps_the_photo_and_repaints_its_face(tiny, tmp_path):
    """The preset on the command line: the photo's own pixels everywhere but the face's mask, the face repainted with
    the identity, and the recipe re-makes it."""
    from sdxl_control.cli import main
    from sdxl_control.records.recipe import read_recipe

    rng = np.random.default_rng(4)
    for name in ("photo.png", "me.png"):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / name)
    out, again = tmp_path / "fixed.png", tmp_path / "again.png"
    argv = ["generate", "a portrait", "--preset", "portrait-fix", "--init-image", str(tmp_path / "photo.png"), "--face",
            str(tmp_path / "me.png"), "--tiny", "--steps", "4", "--seed", "3", "-q"]  # fmt: skip
    assert main([*argv, "-o", str(out)]) == 0
    recipe = read_recipe(out)
    assert recipe["strength"] == 0.0 and recipe["detailer"]["strength"] == 0.5
    assert [c["kind"] for c in recipe["conditions"]] == ["pulid"]
    (face,) = recipe["measurements"]["detailer"]["faces"]
    assert face["repainted"]
    photo, fixed = np.asarray(Image.open(tmp_path / "photo.png")), np.asarray(Image.open(out).convert("RGB"))
    outside = np.asarray(face_mask(face["box"], (SIZE, SIZE), 4, 4)) == 0
    assert np.array_equal(fixed[outside], photo[outside]) and not np.array_equal(fixed, photo)
    assert main(["generate", "--recipe", str(out), "--tiny", "-q", "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))


def test_a_dry_run_line_with_a_start_image_and_the_detailer_runs_as_a_job(tiny, tmp_path, capsys):
    """What --dry-run prints names the init image by content and the stand-in face pack by fingerprint; as a job
    file's line it finds both again and makes the CLI's pixels."""
    import json

    from sdxl_control.cli import main

    Image.fromarray(np.random.default_rng(6).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    argv = ["generate", "a fox", "--init-image", str(tmp_path / "p.png"), "--strength", "0.5", "--steps", "4",
            "--seed", "2", "--tiny", "--detail-faces", "--detail-strength", "0.6", "-q"]  # fmt: skip
    assert main([*argv, "-o", str(tmp_path / "cli.png")]) == 0
    capsys.readouterr()
    assert main([*argv, "--dry-run"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["init_image"]["file"] == "p.png" and line["detailer"]["face_pack"] == "buffalo_l"  # as named
    (tmp_path / "jobs.jsonl").write_text(json.dumps({**line, "id": "fox"}) + "\n")
    assert main(["batch", str(tmp_path / "jobs.jsonl"), "--tiny", "-q", "-o", str(tmp_path / "out")]) == 0
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "out" / "fox.png")), np.asarray(Image.open(tmp_path / "cli.png"))
    )
