"""The command line, in process and through the installed console script."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdxl_control import read_recipe
from sdxl_control.base.files import sha256_of
from sdxl_control.cli import main


def test_tiny_generate_writes_png_whose_recipe_round_trips(tiny, tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["generate", "a lighthouse", "--tiny", "-o", str(out), "--steps", "4", "--seed", "3",
                 "--refiner-switch", "0.5", "--num-images", "2", "-q"]) == 0  # fmt: skip
    assert f"{out}  seed=3" in capsys.readouterr().out
    recipe = read_recipe(out)
    assert recipe["prompt"] == "a lighthouse" and recipe["size"] == [128, 128] and recipe["refiner_switch"] == 0.5
    assert read_recipe(tmp_path / "demo-1.png")["seed"] == 4
    for original in (out, tmp_path / "demo-1.png"):
        again = tmp_path / f"again-{original.name}"
        assert main(["generate", "--recipe", str(original), "-o", str(again), "-q"]) == 0
        assert np.array_equal(np.asarray(Image.open(original)), np.asarray(Image.open(again)))
        assert read_recipe(again)["seed"] == read_recipe(original)["seed"]


def test_preset_and_explicit_options(tiny, tmp_path):
    out = tmp_path / "p.png"
    assert main(["generate", "x", "--tiny", "--preset", "quality", "--steps", "5", "-o", str(out), "-q"]) == 0
    recipe = read_recipe(out)
    assert recipe["steps"] == 5 and recipe["refiner_switch"] == 0.8 and recipe["scheduler"]["requested"] == "euler"


def test_errors_exit_with_their_class_code_and_a_message(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:  # refused as the flag is read, before torch is imported
        main(["generate", "x", "--tiny", "--size", "100x64", "-o", str(tmp_path / "x.png")])
    assert exited.value.code == 2 and "multiples of 8" in capsys.readouterr().err
    assert main(["generate", "x", "--base", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 4
    assert "no such file or folder" in capsys.readouterr().err


def test_console_script(tiny, tmp_path):
    out = tmp_path / "cli.png"
    script = os.path.join(os.path.dirname(sys.executable), "sdxl-control")
    run = subprocess.run([script, "generate", "a cat", "--tiny", "--steps", "3", "-o", str(out), "-q"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert read_recipe(out)["steps"] == 3


def test_controlnets_from_the_cli_and_their_recipe(tiny, tmp_path, capsys):
    from skimage.data import astronaut

    photo = tmp_path / "photo.png"
    Image.fromarray(astronaut()).resize((96, 64)).save(photo)
    out = tmp_path / "cn.png"
    args = ["generate", "a portrait", "--tiny", "--steps", "4", "--seed", "1", "-q", "--edges", str(photo),
            "--edges-scale", "0.6", "--edges-window", "0:0.7", "--depth", str(photo), "--pose-map", str(photo)]  # fmt: skip
    assert main([*args, "-o", str(out)]) == 0
    conditions = read_recipe(out)["conditions"]
    assert [(c["kind"], c["preprocess"]) for c in conditions] == [
        ("controlnet", "canny"), ("controlnet", "depth"), ("controlnet", None),
    ]  # fmt: skip
    assert conditions[0]["scale"] == 0.6 and conditions[0]["window"] == [0.0, 0.7]
    plain = tmp_path / "plain.png"
    assert main(["generate", "a portrait", "--tiny", "--steps", "4", "--seed", "1", "-q", "-o", str(plain)]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))
    again = tmp_path / "again.png"
    assert main(["generate", "--recipe", str(out), "-o", str(again), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_union_from_the_cli(tiny, tmp_path):
    from skimage.data import astronaut

    photo = tmp_path / "photo.png"
    Image.fromarray(astronaut()).resize((64, 64)).save(photo)
    out = tmp_path / "union.png"
    assert main(["generate", "x", "--tiny", "--steps", "3", "-q", "--union", "--edges", str(photo), "--depth-map",
                 str(photo), "-o", str(out)]) == 0  # fmt: skip
    (condition,) = read_recipe(out)["conditions"]
    assert condition["kind"] == "controlnet-union" and condition["preprocess"] == ["canny"]
    assert condition["canny"] == condition["depth"] == {"file": "photo.png", "sha256": sha256_of(photo)}


def test_control_flag_errors(tiny, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    photo = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(photo)
    assert main(["generate", "x", "--tiny", "--edges", str(photo), "--edges-map", str(photo), "-o", out]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["generate", "x", "--tiny", "--union", "-o", out]) == 2
    assert "--union needs" in capsys.readouterr().err


def test_loras_from_the_cli_and_their_recipe(tiny, tmp_path, capsys):
    from sdxl_control.testing.lora import write_tiny_lora

    lora = write_tiny_lora(tmp_path / "style.safetensors", tiny.base, "kohya", seed=2)
    out, again = tmp_path / "lora.png", tmp_path / "again.png"
    assert (
        main(["generate", "x", "--tiny", "--steps", "3", "--seed", "5", "-q", "--lora", f"{lora}:0.7", "-o", str(out)])
        == 0
    )
    (condition,) = read_recipe(out)["conditions"]
    assert condition["kind"] == "lora" and condition["scale"] == 0.7
    assert condition["source"] == {"file": "style.safetensors", "sha256": sha256_of(lora)}
    assert main(["generate", "--recipe", str(out), "-o", str(again), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    capsys.readouterr()
    # Without --tiny, a preset's LoRA that is not here is named with the command that fetches it.
    assert main(["generate", "x", "--base", str(tiny.base), "--size", "64x64", "--preset", "lightning-4step", "-q",
                 "-o", str(tmp_path / "d.png")]) == 4  # fmt: skip
    assert "hf download ByteDance/SDXL-Lightning sdxl_lightning_4step_lora.safetensors" in capsys.readouterr().err


def test_style_reference_and_face_from_the_cli(tiny, tmp_path, photos_dir, insightface_root):
    pack = insightface_root / "models" / "buffalo_l"
    out, again = tmp_path / "refs.png", tmp_path / "again.png"
    face = str(photos_dir / "obama.jpg")
    args = ["generate", "a portrait", "--tiny", "--steps", "3", "--seed", "2", "-q", "--style", face, "--reference", face,
            "--reference-layers", "composition", "--face", face, "--face-pack", str(pack), "--face-variant", "faceid"]  # fmt: skip
    assert main([*args, "-o", str(out)]) == 0
    kinds = [(c["kind"], c.get("layers"), c.get("variant")) for c in read_recipe(out)["conditions"]]
    assert kinds == [
        ("ip-adapter", "style", "sdxl"),
        ("ip-adapter", "composition", "plus"),
        ("faceid", "all", "faceid"),
    ]
    assert main(["generate", "--recipe", str(out), "-o", str(again), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_speed_and_memory_flags_keep_the_image(tiny, tmp_path):
    args = ["generate", "x", "--tiny", "--steps", "3", "--seed", "2", "--size", "256x192", "-q"]
    assert main([*args, "-o", str(tmp_path / "plain.png")]) == 0
    assert main([*args, "--fast", "layout", "--offload", "-o", str(tmp_path / "fast.png")]) == 0
    assert main([*args, "--vae-tiling", "-o", str(tmp_path / "tiled.png")]) == 0
    plain, fast, tiled = (np.asarray(Image.open(tmp_path / f"{n}.png"), np.int16) for n in ("plain", "fast", "tiled"))
    assert np.abs(plain - fast).max() <= 1  # rounding only
    assert np.abs(plain - tiled).max() > 0 and read_recipe(tmp_path / "tiled.png")["vae_tiling"] is True


def test_instantid_from_the_cli(tiny, tmp_path, photos_dir, insightface_root, real_detector, caplog):
    pack = insightface_root / "models" / "antelopev2"
    obama, biden = str(photos_dir / "obama.jpg"), str(photos_dir / "biden.jpg")
    out, again = tmp_path / "iid.png", tmp_path / "again.png"
    args = ["generate", "a portrait", "--tiny", "--steps", "3", "--seed", "2", "-q", "--identity", "instantid",
            "--face", obama, "--face-keypoints", biden, "--face-scale", "0.7", "--identitynet-scale", "0.6",
            "--identitynet-window", "0:0.8", "--face-pack", str(pack), "--score"]  # fmt: skip
    assert main([*args, "-o", str(out)]) == 0
    recipe = read_recipe(out)
    (condition,) = recipe["conditions"]
    assert condition["kind"] == "instantid"
    assert condition["faces"] == [{"file": "obama.jpg", "sha256": sha256_of(obama)}]
    assert condition["keypoints_from"] == {"file": "biden.jpg", "sha256": sha256_of(biden)}
    assert (condition["scale"], condition["controlnet_scale"], condition["controlnet_window"]) == (0.7, 0.6, [0.0, 0.8])
    # The tiny models paint noise, in which no face is found: the image is kept, its score recorded as missing.
    if real_detector:
        assert recipe["measurements"]["identity_similarity"] is None and "no identity similarity" in caplog.text
    else:  # the stand-in detector finds a face in the noise too
        assert -1.0 <= recipe["measurements"]["identity_similarity"] <= 1.0
    assert main(["generate", "--recipe", str(out), "-o", str(again), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_preprocess_face_and_score(tiny, tmp_path, shared_dir, insightface_root, capsys):
    from sdxl_control.preprocessors.face import identity_similarity
    from sdxl_control.preprocessors.keypoints import face_keypoint_map

    pack = str(insightface_root / "models" / "antelopev2")
    obama, biden = str(shared_dir / "images" / "obama.jpg"), str(shared_dir / "images" / "biden.jpg")
    assert (
        main(["preprocess", "face", obama, "-o", str(tmp_path / "kps.png"), "--size", "96x128", "--face-pack", pack])
        == 0
    )
    expected = face_keypoint_map(obama, size=(96, 128), pack=pack)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "kps.png")), np.asarray(expected))
    assert main(["preprocess", "canny", obama, "-o", str(tmp_path / "edges.png")]) == 0
    # faces: each detected face boxed, with its landmarks; two people, the larger in green.
    two = str(shared_dir / "images" / "two_people.jpg")
    assert main(["preprocess", "faces", two, "-o", str(tmp_path / "faces.png"), "--face-pack", pack]) == 0
    drawn, photo = np.asarray(Image.open(tmp_path / "faces.png")), np.asarray(Image.open(two).convert("RGB"))
    from sdxl_control.preprocessors.face import FaceAnalyzer

    found = FaceAnalyzer(pack).faces(two)
    assert len(found) == 2
    for face, colour in zip(found, [(0, 220, 0), (230, 40, 40)], strict=True):
        x0, y0, x1, y1 = (int(round(float(v))) for v in face.bbox)
        row = drawn[(y0 + y1) // 2]
        for edge in (x0, x1):  # the box's left and right sides, give or take PIL's rounding
            assert any(tuple(row[x]) == colour for x in range(edge - 2, edge + 3))
        x, y = (int(round(float(v))) for v in face.kps[2])  # the nose
        assert tuple(drawn[y, x]) == colour
    outside = np.ones(photo.shape[:2], bool)
    for face in found:
        x0, y0, x1, y1 = (int(float(v)) for v in face.bbox)
        outside[max(0, y0 - 20) : y1 + 6, max(0, x0 - 6) : x1 + 6] = False
    assert np.array_equal(drawn[outside], photo[outside])  # nothing else changed
    capsys.readouterr()
    assert main(["score", "--face", obama, obama, biden, "--face-pack", pack]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{obama}  1.0000"
    assert lines[1] == f"{biden}  {identity_similarity(obama, biden, pack=pack):.4f}"
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "grey.png")
    # An image without a face is reported, and the others are scored still.
    assert main(["score", "--face", obama, str(tmp_path / "grey.png"), obama, "--face-pack", pack]) == 5
    captured = capsys.readouterr()
    assert "no face found in" in captured.err
    assert captured.out.splitlines() == [f"{tmp_path / 'grey.png'}  -", f"{obama}  1.0000"]
    assert main(["generate", "x", "--tiny", "--score", "-o", str(tmp_path / "x.png")]) == 2
    assert "--score needs --face" in capsys.readouterr().err


def test_pulid_from_the_cli(tiny, tmp_path, photos_dir, insightface_root, capsys):
    pack = str(insightface_root / "models" / "antelopev2")
    obama = str(photos_dir / "obama.jpg")
    base = ["generate", "a portrait", "--tiny", "--steps", "2", "--size", "64x64", "--seed", "4", "-q",
            "--identity", "pulid", "--face", obama, "--face-pack", pack]  # fmt: skip
    out = tmp_path / "v1.png"
    assert main([*base, "--pulid-version", "v1", "--identity-mode", "style", "-o", str(out)]) == 0
    (condition,) = read_recipe(out)["conditions"]
    assert (condition["version"], condition["mode"], condition["scale"]) == ("v1", "style", 0.8)
    capsys.readouterr()
    wrong = ["generate", "x", "--tiny", "--identity", "instantid", "--face", obama, "--identity-mode", "style"]
    assert main([*wrong, "-o", str(out)]) == 2
    assert "--identity-mode: for --identity pulid, not instantid" in capsys.readouterr().err


def test_photomaker_from_the_cli(tiny, tmp_path, photos_dir, insightface_root, capsys):
    obama = str(photos_dir / "obama.jpg")
    out = tmp_path / "pm.png"
    args = ["generate", "a photo of a man img, smiling", "--tiny", "--steps", "4", "--seed", "3", "-q", "--identity",
            "photomaker", "--face", obama, "--face-pack", str(insightface_root / "models" / "buffalo_l"),
            "--start-merge", "0.25", "--identity-scale", "0.9"]  # fmt: skip
    assert main([*args, "-o", str(out)]) == 0
    (condition,) = read_recipe(out)["conditions"]
    assert (condition["kind"], condition["trigger"], condition["start_merge"], condition["scale"]) == (
        "photomaker", "img", 0.25, 0.9,
    )  # fmt: skip
    again = tmp_path / "again.png"
    assert main(["generate", "--recipe", str(out), "-o", str(again), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    capsys.readouterr()
    assert main(["generate", "a man", "--tiny", "--steps", "2", "-q", "--identity", "photomaker", "--face", obama,
                 "--photomaker-version", "v1", "-o", str(tmp_path / "x.png")]) == 2  # fmt: skip
    assert "trigger word exactly once" in capsys.readouterr().err


def test_the_libraries_loading_bars_show_only_with_verbose(tiny, tmp_path, capsys):
    from sdxl_control.cli.options import library_output

    argv = ["generate", "a fox", "--tiny", "--size", "64x64", "--steps", "2", "-q", "-o", str(tmp_path / "fox.png")]
    assert main(argv) == 0
    assert "Loading weights" not in capsys.readouterr().err
    try:
        assert main([*argv, "-v"]) == 0
        assert "Loading weights" in capsys.readouterr().err  # transformers' own bar, as it loads the text encoders
    finally:
        library_output(verbose=False)


def test_schedulers_by_their_a1111_and_comfyui_names(tiny, tmp_path):
    """ "DPM++ 2M Karras" (A1111's infotext) and "euler_ancestral" (ComfyUI's KSampler) are our dpmpp_2m_karras and
    euler_a: the same pixels, recorded by our name."""
    common = ["generate", "a fox", "--tiny", "--size", "64x64", "--steps", "3", "--seed", "2", "-q"]
    for theirs, ours in (("DPM++ 2M Karras", "dpmpp_2m_karras"), ("euler_ancestral", "euler_a")):
        images = []
        for name in (theirs, ours):
            out = tmp_path / f"{name.replace(' ', '_')}.png"
            assert main([*common, "--scheduler", name, "-o", str(out)]) == 0
            assert read_recipe(out)["scheduler"]["name"] == ours
            images.append(np.asarray(Image.open(out)))
        assert np.array_equal(*images)
    # A1111's DPM++ 2S a, which diffusers has not: refused with the reason the PNG import gives.
    assert main([*common, "--scheduler", "DPM++ 2S a", "-o", str(tmp_path / "x.png")]) == 2


def test_refiner_prompts_cfg_rescale_and_prediction_overrides_are_flags(tiny, capsys):
    """The request fields issue 36 added for imported PNGs (a refiner's own prompts, CFG rescale, a v-prediction
    override) are command-line flags too: they reach the job line, and their checks hold (zero terminal SNR for an
    epsilon model is refused, exit 2)."""
    import json

    flags = ["--refiner-prompt", "a fox, sharp", "--refiner-negative-prompt", "blur", "--guidance-rescale", "0.7",
             "--prediction-type", "v_prediction", "--zero-terminal-snr"]  # fmt: skip
    assert main(["generate", "a fox", "--tiny", "--steps", "2", *flags, "--dry-run"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["refiner_prompt"], line["refiner_negative_prompt"]) == ("a fox, sharp", "blur")
    assert (line["guidance_rescale"], line["prediction_type"], line["zero_terminal_snr"]) == (0.7, "v_prediction", True)
    assert main(["generate", "a fox", "--tiny", "--steps", "2", "--no-zero-terminal-snr", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["zero_terminal_snr"] is False
    refused = ["generate", "a fox", "--tiny", "--prediction-type", "epsilon", "--zero-terminal-snr", "--dry-run"]
    assert main(refused) == 2
    assert "zero_terminal_snr with prediction_type 'epsilon'" in capsys.readouterr().err
