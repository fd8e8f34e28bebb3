"""People in their regions (issue 38, part 2): a regional prompt and a regional identity given one region act
together (:func:`person`, the preset layout's ``"@name"`` masks); the ``two-people`` preset keeps each person's
identity and description on their own side; the face detailer repaints each face with the identity it resembles and
the prompt of the region that holds it, with the other regions cut to the crop or dropped."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from sdxl_control import GenerationRequest
from sdxl_control.adapters.faceid import FaceID
from sdxl_control.adapters.people import box_mask, person
from sdxl_control.adapters.photomaker import PhotoMaker
from sdxl_control.adapters.pulid import PuLID
from sdxl_control.adapters.regions import Region
from sdxl_control.base.errors import ConditionError, InvalidRequestError
from sdxl_control.passes.detailer import FaceDetailer, detail_faces
from sdxl_control.presets import PresetError, load_preset
from sdxl_control.testing.stand_ins import tiny_condition, tiny_face_pack

PROMPT = "two friends at a cafe"
LEFT, RIGHT = "a red-haired woman in a green dress", "an old man with a grey beard"


# --- one region, given once ------------------------------------------------------------------------------------------


def test_a_person_is_a_region_and_an_identity_on_one_mask():
    """A box gives the Region its box and the identity a mask drawn from it; both weigh the same latent cells (the
    Region reads a mask and a box the same way), so the words and the face land in one place."""
    region, face = person(LEFT, PuLID(faces=["ann.jpg"]), box=(0.0, 0.0, 0.5, 1.0), size=(1216, 832),
                          negative_prompt="a beard", scale=0.9)  # fmt: skip
    assert (region.prompt, region.box, region.negative_prompt, region.scale) == (LEFT, (0.0, 0.0, 0.5, 1.0),
                                                                                "a beard", 0.9)  # fmt: skip
    drawn = Image.open(face.mask)
    assert face.faces == ["ann.jpg"] and drawn.size == (1216, 832) and drawn.getbbox() == (0, 0, 608, 832)
    assert np.array_equal(np.asarray(drawn), np.asarray(box_mask((0.0, 0.0, 0.5, 1.0), (1216, 832))))
    as_mask = Region(LEFT, mask=face.mask, scale=0.9)
    assert torch_equal(region.weight((1216, 832)), as_mask.weight((1216, 832)))
    assert torch_equal(region.weight((640, 448)), as_mask.weight((640, 448)))  # drawn at one size, read at another
    given = Image.new("L", (64, 64), 0)
    region, face = person(RIGHT, FaceID("faceid", faces=["bob.jpg"]), mask=given)
    assert region.mask is given and face.mask is given  # one mask, given once, that both use


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_a_person_is_refused_where_the_region_would_be_two():
    with pytest.raises(ConditionError, match="give mask= .* or box="):
        person(LEFT, PuLID(faces=["ann.jpg"]))
    with pytest.raises(ConditionError, match="mask of its own"):
        person(LEFT, PuLID(faces=["ann.jpg"], mask=Image.new("L", (8, 8))), box=(0, 0, 0.5, 1))
    with pytest.raises(ConditionError, match="photomaker condition takes no region mask"):
        person(LEFT, PhotoMaker(faces=["ann.jpg"]), box=(0, 0, 0.5, 1))
    with pytest.raises(ConditionError, match="fractions"):
        box_mask((0.5, 0.0, 0.5, 1.0))


# --- the preset format: text inputs and a layout -------------------------------------------------------------------


def _preset_file(tmp_path, **changes):
    data = {
        "description": "a test preset",
        "inputs": {"who": {"help": "a person", "required": True, "text": True},
                   "face": {"help": "their face", "many": True}, "where": {"help": "their mask"}},
        "layout": {"side": {"box": [0.25, 0.0, 1.0, 0.5], "input": "where"}},
        "size": [64, 32],
        "conditions": {"words": {"kind": "region", "prompt": "$who", "mask": "@side"},
                       "look": {"kind": "faceid", "faces": "$face", "mask": "@side"}},
    }  # fmt: skip
    data.update(changes)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_a_preset_takes_a_text_input_and_a_layout_of_masks(tmp_path):
    preset = load_preset(_preset_file(tmp_path))
    words, look = preset.conditions({"who": LEFT, "face": ["me.png"]})
    assert words.prompt == LEFT and words.mask == look.mask  # one mask for both
    drawn = Image.open(words.mask)
    assert drawn.size == (64, 32) and drawn.getbbox() == (16, 0, 64, 16)
    assert np.asarray(drawn).min() == 0 and np.asarray(drawn).max() == 255
    (words,) = preset.conditions({"who": LEFT, "where": "mine.png"})  # the mask input replaces the box
    assert words.mask == "mine.png"
    with pytest.raises(InvalidRequestError, match="needs its who input .*--input who=TEXT"):
        preset.conditions({"face": ["me.png"]})
    with pytest.raises(InvalidRequestError, match="who input is a text"):
        preset.conditions({"who": "  "})
    bad = {"words": {"kind": "region", "prompt": "$who", "mask": "@elsewhere"}}
    with pytest.raises(
        PresetError, match=r"conditions.words.mask: names no region of the layout '@elsewhere' \(side\)"
    ):
        load_preset(_preset_file(tmp_path, conditions=bad))
    with pytest.raises(PresetError, match=r"layout.side.box must be \[x0, y0, x1, y1\] fractions"):
        load_preset(_preset_file(tmp_path, layout={"side": {"box": [0.5, 0, 0.25, 1]}}))
    with pytest.raises(PresetError, match="layout.side.input must be a declared input of one mask image"):
        load_preset(_preset_file(tmp_path, layout={"side": {"box": [0, 0, 1, 1], "input": "face"}}))
    with pytest.raises(PresetError, match=r"layout.side has unknown key\(s\) 'mask'; its keys are box, input"):
        load_preset(_preset_file(tmp_path, layout={"side": {"box": [0, 0, 1, 1], "mask": "x.png"}}))


# --- the two-people preset -------------------------------------------------------------------------------------------

INPUTS = {"left_face": ["ann.jpg"], "right_face": ["bob.jpg"], "left_prompt": LEFT, "right_prompt": RIGHT}


def test_the_two_people_preset_keeps_each_person_on_their_side():
    """Its request: for each person a Region of their words and a PuLID of their face on one mask, that person's half
    (or the mask given), which the other person's conditions leave out."""
    request = load_preset("two-people").request(PROMPT, INPUTS)
    assert request.prompt == PROMPT and request.detailer is not None
    kinds = [(c.kind, getattr(c, "prompt", None), getattr(c, "faces", None)) for c in request.conditions]
    assert kinds == [("region", LEFT, None), ("pulid", None, ["ann.jpg"]), ("region", RIGHT, None),
                     ("pulid", None, ["bob.jpg"])]  # fmt: skip
    left, ann, right, bob = request.conditions
    assert left.mask == ann.mask and right.mask == bob.mask
    width, height = request.size
    halves = np.zeros((height, width), bool)
    halves[:, : width // 2] = True
    assert np.array_equal(np.asarray(Image.open(left.mask)) == 255, halves)
    assert np.array_equal(np.asarray(Image.open(right.mask)) == 255, ~halves)
    masked = load_preset("two-people").request(PROMPT, {**INPUTS, "right_mask": "his.png"})
    assert masked.conditions[2].mask == masked.conditions[3].mask == "his.png"
    assert Image.open(masked.conditions[0].mask).getbbox() == (0, 0, width // 2, height)


def test_a_job_fills_the_two_people_preset_with_texts(tmp_path):
    """A job (what job files, the page's More inputs and the server hand on) names the texts as it names files."""
    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.jobs.spec import JobSpec, resolve

    for name in ("ann.png", "bob.png"):
        Image.new("RGB", (32, 32), (200, 100, 50)).save(tmp_path / name)
    inputs = {"left_face": [str(tmp_path / "ann.png")], "right_face": [str(tmp_path / "bob.png")],
              "left_prompt": LEFT, "right_prompt": [RIGHT]}  # fmt: skip
    job = resolve(JobSpec(PROMPT, preset="two-people", inputs=inputs), TinyResolver())
    left, ann, right, bob = job.request.conditions
    assert (left.prompt, right.prompt) == (LEFT, RIGHT)
    assert left.mask == ann.mask != right.mask == bob.mask


def test_the_two_people_preset_runs_and_re_makes_its_pixels(tiny, tmp_path):
    """On the tiny models through the command line: both people's conditions run, the detailer repaints the face the
    stand-in finds (the centre, on the right half) with the right person's identity and words; the recipe re-makes
    the image."""
    from sdxl_control.cli import main
    from sdxl_control.records.recipe import read_recipe

    rng = np.random.default_rng(4)
    for name in ("ann.png", "bob.png"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    out, again = tmp_path / "two.png", tmp_path / "again.png"
    argv = ["generate", PROMPT, "--preset", "two-people", "--input", f"left_face={tmp_path / 'ann.png'}",
            "--input", f"right_face={tmp_path / 'bob.png'}", "--input", f"left_prompt={LEFT}",
            "--input", f"right_prompt={RIGHT}", "--tiny", "--size", "128x64", "--steps", "3", "--seed", "3",
            "-q"]  # fmt: skip
    assert main([*argv, "-o", str(out)]) == 0
    recipe = read_recipe(out)
    assert [c["kind"] for c in recipe["conditions"]] == ["region", "pulid", "region", "pulid"]
    (face,) = recipe["measurements"]["detailer"]["faces"]
    assert (face["identity"], face["matched_by"], face["region"], face["repainted"]) == (3, "mask", 2, True)
    assert main(["generate", "--recipe", str(out), "--tiny", "-q", "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))


# --- the face detailer: each face its identity and its region's prompt ----------------------------------------------

SIZE = 256


def _faceid(photo, pack, mask=None, **fields):
    return tiny_condition(FaceID("faceid", faces=[photo], face_pack=pack, scale=1.0, mask=mask, **fields))


def _halves(split):
    left = np.zeros((SIZE, SIZE), np.uint8)
    left[:, :split] = 255
    return Image.fromarray(left), Image.fromarray(255 - left)


def test_the_detailer_repaints_a_face_with_its_identity_and_its_regions_prompt(tmp_path):
    """The stand-in detector finds the centred face, which the right person's region holds: its repaint gets the
    right identity alone and the right region's prompt and negative (the region itself, whose prompt is the whole
    crop's now, is not handed on); the left region, which reaches into the crop, is cut to it; a region outside the
    crop is dropped. A face no region holds keeps the request's prompt."""
    pack = str(tiny_face_pack("buffalo_l", 0))
    photo = tmp_path / "me.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(photo)
    left_mask, right_mask = _halves(100)
    ann, left = person(LEFT, _faceid(str(photo), pack), mask=left_mask)[::-1]
    right, bob = person(RIGHT, _faceid(str(photo), pack, s_scale=0.5), mask=right_mask, negative_prompt="a hat")
    far = Region("a window", box=(0.0, 0.0, 0.1, 1.0))  # the crop starts past x = 26 px
    request = GenerationRequest(PROMPT, negative_prompt="blurry", steps=4, size=(SIZE, SIZE), seed=2,
                                conditions=(ann, left, bob, right, far),
                                detailer=FaceDetailer(face_pack=pack, padding=0))  # fmt: skip
    image = Image.new("RGB", (SIZE, SIZE), (90, 90, 90))
    asked: list[GenerationRequest] = []
    _, record = detail_faces(image, request, 2, lambda r: asked.append(r) or r.init_image)
    (face_request,) = asked
    assert (face_request.prompt, face_request.negative_prompt) == (RIGHT, "a hat")
    assert [(type(c).__name__, getattr(c, "prompt", None)) for c in face_request.conditions] == [
        ("Region", LEFT), ("FaceID", None)]  # fmt: skip
    cut, identity = face_request.conditions
    assert identity.s_scale == 0.5  # bob's
    assert cut.mask.size == face_request.size and np.asarray(cut.mask).max() == 255 != np.asarray(cut.mask).min()
    (found,) = record["faces"]
    assert (found["identity"], found["matched_by"], found["region"]) == (2, "mask", 3)

    # Regions that do not hold the face: the request's own prompt and negative, both regions cut to the crop.
    elsewhere = Region("a lamp", box=(0.0, 0.0, 0.45, 1.0))
    asked.clear()
    _, record = detail_faces(image, dataclasses.replace(request, conditions=(elsewhere, ann)), 2,
                             lambda r: asked.append(r) or r.init_image)  # fmt: skip
    assert (asked[0].prompt, asked[0].negative_prompt) == (PROMPT, "blurry")
    # ann resembles the face (one photo for both) and her mask reaches into the crop: both cut to it
    assert [(type(c).__name__, getattr(c, "prompt", None)) for c in asked[0].conditions] == [
        ("Region", "a lamp"), ("FaceID", None)]  # fmt: skip
    assert record["faces"][0]["region"] is None
    # Without regions the record is as it was (recipes of detailed images before regions keep their text).
    _, record = detail_faces(image, dataclasses.replace(request, conditions=(bob,)), 2, lambda r: r.init_image)
    assert "region" not in record["faces"][0]


def test_two_real_faces_get_their_identities_and_their_regions_prompts(shared_dir, insightface_root):
    """Real photos and the real SCRFD detector (the recognition model is a tiny random stand-in: no ArcFace pack is
    reachable here), two people each given as a Region of their words on their half of the group picture and an
    identity matched by likeness: each face found is repainted with its own person's identity and words, either way
    round."""
    pack = str(insightface_root / "models" / "buffalo_l")
    photos = {name: Image.open(shared_dir / "images" / f"{name}.jpg").convert("RGB") for name in ("obama", "biden")}
    photos = {k: v.resize((round(v.width * 300 / v.height), 300)) for k, v in photos.items()}
    identities = {k: _faceid(str(shared_dir / "images" / f"{k}.jpg"), pack) for k in photos}
    words = {"obama": "a man in a dark suit", "biden": "a man in a blue tie"}
    asked: list[GenerationRequest] = []
    for order in (("obama", "biden"), ("biden", "obama")):
        first, second = (photos[k] for k in order)
        group = Image.new("RGB", (first.width + second.width, 300))
        group.paste(first, (0, 0))
        group.paste(second, (first.width, 0))
        split = first.width / group.width
        regions = {order[0]: Region(words[order[0]], box=(0.0, 0.0, split, 1.0)),
                   order[1]: Region(words[order[1]], box=(split, 0.0, 1.0, 1.0))}  # fmt: skip
        conditions = (regions["obama"], identities["obama"], regions["biden"], identities["biden"])
        request = GenerationRequest(PROMPT, steps=4, size=(128, 128), seed=2, conditions=conditions,
                                    detailer=FaceDetailer(face_pack=pack))  # fmt: skip
        asked.clear()
        _, record = detail_faces(group, request, 2, lambda r: asked.append(r) or r.init_image)
        assert record["found"] == 2 and record["repainted"] == 2
        for face, face_request in zip(record["faces"], asked, strict=True):
            side = order[0] if (face["box"][0] + face["box"][2]) / 2 < first.width else order[1]
            assert face["identity"] == conditions.index(identities[side]) and face["matched_by"] == "embedding"
            assert face["region"] == conditions.index(regions[side])
            assert face_request.prompt == words[side]
            handed = [c for c in face_request.conditions if isinstance(c, FaceID)]
            assert handed == [identities[side]]  # no mask: nothing of it to cut to the crop
            assert all(c.prompt != words[side] for c in face_request.conditions if isinstance(c, Region))
        assert {f["region"] for f in record["faces"]} == {0, 2}
