"""Presets as data: every shipped preset resolves and runs (its README command, on the tiny models), bad preset files
and --set values are named, --dry-run matches committed golden files, and `models` reports a fake cache right."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_control import GenerationRequest
from sdxl_control.cli import main
from sdxl_control.presets import PresetError, available_presets, load_preset
from sdxl_control.records.recipe import read_recipe
from sdxl_control.weights.inventory import ModelNeed, check, human_size

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "dry-run"
EVERYDAY = ("portrait", "portrait-draft", "style-transfer", "draft", "quality")
# A diffusers SDXL base repo's files, one per pattern the loader looks for.
BASE_FILES = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
              "tokenizer/vocab.json", "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
              "tokenizer_2/vocab.json", "scheduler/scheduler_config.json"]  # fmt: skip


def readme_commands() -> dict[str, list[str]]:
    """The generate command for each preset, from the presets page of the documentation (docs/guides/presets.md)."""
    commands = {}
    for line in (ROOT / "docs" / "guides" / "presets.md").read_text().splitlines():
        if line.startswith("sdxl-control generate") and "--preset" in line:
            argv = shlex.split(line)[1:]
            commands.setdefault(argv[argv.index("--preset") + 1], argv)
    return commands


@pytest.fixture(scope="module")
def files(photos_dir):
    images = photos_dir
    return {"me.jpg": images / "obama.jpg", "painting.jpg": images / "biden.jpg", "photo.jpg": images / "two_people.jpg",
            "pose.jpg": images / "obama2.jpg"}  # fmt: skip


def test_every_shipped_preset_resolves():
    for name in available_presets():
        preset = load_preset(name)
        inputs = preset.placeholder_inputs()
        if "init_image" in inputs:  # a setting's input is read (an image's size decides the request's)
            inputs["init_image"] = Image.new("RGB", (1024, 1024))
        request = preset.request("a test", inputs)
        assert isinstance(request, GenerationRequest) and preset.description
        kinds = [c.kind for c in request.conditions]
        assert kinds.count("lora") == len(preset.loras)
        assert len(kinds) == len(preset.loras) + len(preset.templates)


def test_the_readme_has_a_command_for_each_everyday_preset():
    assert set(EVERYDAY) <= set(readme_commands())


def test_portrait_stacks_identity_and_pose_and_re_runs(tiny, files, insightface_root, tmp_path, capsys):
    """The pose template joins the identity when --pose is given (a ready map here, so no annotator runs), --set
    reaches into a template, and the PNG's recipe re-makes the image."""
    pose_map = tmp_path / "pose-map.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(pose_map)
    out, again = tmp_path / "p.png", tmp_path / "again.png"
    argv = ["generate", "a portrait", "--preset", "portrait", "--face", str(files["me.jpg"]), "--pose", str(pose_map),
            "--set", "face.scale=0.6", "--set", "pose.preprocess=null", "--set", "pose.window=[0,0.5]", "--tiny",
            "--size", "64x64", "--steps", "3", "--seed", "1", "-q", "--face-pack",
            str(insightface_root / "models" / "antelopev2"), "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    face, pose = read_recipe(out)["conditions"]
    assert (face["kind"], face["version"], face["mode"], face["scale"]) == ("pulid", "v1.1", "fidelity", 0.6)
    assert (pose["kind"], pose["scale"], pose["window"], pose["preprocess"]) == ("controlnet", 0.4, [0.0, 0.5], None)
    assert main(["generate", "--recipe", str(out), "-o", str(again), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_contact_sheet_shows_each_image_with_its_seed(tiny, tmp_path, capsys):
    out = tmp_path / "b.png"
    argv = ["generate", "x", "--tiny", "--size", "64x64", "--steps", "2", "--seed", "7", "--num-images", "3", "--grid"]
    assert main([*argv, "-q", "-o", str(out)]) == 0
    sheet = Image.open(tmp_path / "b-grid.png")
    assert sheet.size == (2 * 64, 2 * (64 + 16))  # 3 images: 2 columns, 2 rows, a label strip under each
    for i, name in enumerate(["b.png", "b-1.png", "b-2.png"]):
        x, y = (i % 2) * 64, (i // 2) * 80
        cell = np.asarray(sheet.crop((x, y, x + 64, y + 64)))
        assert np.array_equal(cell, np.asarray(Image.open(tmp_path / name).convert("RGB")))
        label = np.asarray(sheet.crop((x, y + 64, x + 64, y + 80)).convert("L"))
        assert label.min() < 128  # text drawn
    assert "contact sheet" in capsys.readouterr().out
    recipe = read_recipe(tmp_path / "b-grid.png")  # the batch's recipe: --recipe re-makes the batch's first image
    assert (recipe["num_images"], recipe["batch_index"]) == (3, 0)
    assert main(["generate", "x", "--tiny", "--grid", "-o", str(tmp_path / "one.png")]) == 2
    assert "--grid makes a contact sheet of a batch" in capsys.readouterr().err


def _write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    return str(path)


BASE = {"description": "mine", "inputs": {"face": {"help": "a photo", "required": True}},
        "conditions": {"face": {"kind": "faceid", "variant": "plusv2", "faces": "$face"}}}  # fmt: skip


@pytest.mark.parametrize(
    "change, words",
    [({"stpes": 8}, "unknown key(s) 'stpes' (did you mean 'steps'?)"),
     ({"steps": "eight"}, "steps must be a whole number"),
     ({"guidance": float("inf")}, "guidance must be a finite number"),
     ({"size": [1001, 64]}, "multiples of 8"),
     ({"description": 3}, "description must be a text"),
     ({"models": {"bsae": "x/y"}}, "'bsae' (did you mean 'base'?)"),
     ({"models": {"unet": "x/y"}}, 'models.unet must be {"source": REPO, "weight_name": FILE}'),
     ({"inputs": {"face": {"help": "a photo", "requried": True}}}, "'requried' (did you mean 'required'?)"),
     ({"conditions": {"face": {"kind": "faceid", "variant": "plusv2", "faces": "$fcae"}}},
      "conditions.face.faces: names no declared input '$fcae' (inputs: face)"),
     ({"conditions": {"face": {"kind": "faceidd", "faces": "$face"}}}, "conditions.face.kind: must be one of"),
     ({"conditions": {"face": {"kind": "faceid", "variant": "plusv2", "faces": "$face", "scael": 1}}},
      "'scael' (did you mean 'scale'?)"),
     ({"conditions": {"face": {"kind": "faceid", "variant": "plusv3", "faces": "$face"}}},
      "unknown FaceID variant 'plusv3'"),
     ({"conditions": {"face": {"kind": "faceid", "variant": "plusv2", "faces": "$face", "scale": "high"}}},
      "scale must be a number"),
     ({"loras": [{"sauce": "x/y"}]}, "loras[0]")],
)  # fmt: skip
def test_a_bad_preset_file_names_the_file_and_the_key(change, words, tmp_path, capsys):
    path = _write(tmp_path, {**BASE, **change})
    with pytest.raises(PresetError) as raised:
        load_preset(path)
    assert path in str(raised.value) and words in str(raised.value)
    assert main(["generate", "x", "--preset", path, "--dry-run", "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert path in err and words in err and "Traceback" not in err


def test_preset_inputs_and_missing_models_are_named(tiny, tmp_path, files, capsys):
    path = _write(tmp_path, BASE)
    argv = ["generate", "x", "--preset", path, "--base", str(tiny.base), "--size", "64x64", "-q"]
    assert main([*argv, "-o", str(tmp_path / "a.png")]) == 2
    assert "preset mine needs its face input (a photo): --face FILE" in capsys.readouterr().err
    two = ["--face", str(files["me.jpg"]), "--face", str(files["pose.jpg"])]
    assert main([*argv, *two, "-o", str(tmp_path / "a.png")]) == 2
    assert "preset mine takes one face input, got 2" in capsys.readouterr().err
    # A model the preset names that is not here: the exit code for models, and the command that fetches it.
    missing = _write(tmp_path, {**BASE, "loras": [{"source": "someone/absent-lora", "weight_name": "a.safetensors"}]})
    assert main(["generate", "x", "--preset", missing, "--base", str(tiny.base), "--size", "64x64", "--face",
                 str(files["me.jpg"]), "-q", "-o", str(tmp_path / "b.png")]) == 4  # fmt: skip
    assert "hf download someone/absent-lora a.safetensors" in capsys.readouterr().err


def test_set_checks_what_it_changes():
    preset = load_preset("portrait")
    with pytest.raises(PresetError, match=r"--set fcae.scale: the preset has unknown key\(s\) 'fcae' \(did you mean"):
        preset.with_settings({"fcae.scale": 0.5})
    with pytest.raises(PresetError, match="preset portrait .*with --set.*steps must be a whole number from 1"):
        preset.with_settings({"steps": 0})
    changed = preset.with_settings({"face.scale": 0.5, "refiner_switch": 0.9, "pose": None})
    assert changed.templates["face"]["scale"] == 0.5 and "pose" not in changed.templates
    assert changed.settings["refiner_switch"] == 0.9
    assert preset.templates["face"]["scale"] == 0.8  # the original is untouched


def _dry_run(argv: list[str], capsys) -> dict:
    capsys.readouterr()
    assert main(["generate", *argv, "--seed", "11", "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", EVERYDAY)
def test_dry_run_matches_the_golden_file(name, files, capsys, monkeypatch):
    """What each preset resolves to for its README command (inputs recorded by name and hash, nothing loaded).
    Regenerate after a deliberate change with SDXL_CONTROL_UPDATE_GOLDEN=1."""
    from sdxl_control import Generator

    def no_loading(*args, **kwargs):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr(Generator, "from_pretrained", no_loading)
    argv = [str(files.get(a, a)) for a in readme_commands()[name][1:]]
    plan = _dry_run(argv, capsys)
    golden = GOLDEN / f"{name}.json"
    if os.environ.get("SDXL_CONTROL_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(json.dumps(plan, indent=2) + "\n")
    # The photos are ../shared's or, in a clone without it, others under the same names: compared by name.
    assert _photos_by_name(plan, files) == _photos_by_name(json.loads(golden.read_text()), files)


def _photos_by_name(value, files):
    if isinstance(value, dict):
        if value.get("file") in {Path(f).name for f in files.values()}:
            return {"file": value["file"]}
        return {k: _photos_by_name(v, files) for k, v in value.items()}
    if isinstance(value, list):
        return [_photos_by_name(v, files) for v in value]
    return value


def _fake_cache(root: Path, repo: str, files: dict[str, int]) -> None:
    """A repo in the HF cache layout: refs/main naming a snapshot that holds ``files`` of the given sizes."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    for name, size in files.items():
        path = folder / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)


def test_models_reports_a_fake_cache(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    base_files = {f: 1000 for f in BASE_FILES}
    _fake_cache(cache, "stabilityai/stable-diffusion-xl-base-1.0", base_files)
    _fake_cache(cache, "h94/IP-Adapter", {"sdxl_models/ip-adapter_sdxl.safetensors": 2_500_000,
                                          "sdxl_models/image_encoder/config.json": 10,
                                          "sdxl_models/image_encoder/model.safetensors": 3_000_000})  # fmt: skip
    assert main(["models", "--preset", "style-transfer"]) == 4
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "style-transfer: some missing"
    assert out[1].split() == ["present", f"{len(base_files) * 1000 / 1000:.1f}", "KB", "base", "model:",
                              "stabilityai/stable-diffusion-xl-base-1.0", f"[{len(base_files)}", "files]"]  # fmt: skip
    assert out[2].split()[:3] == ["present", "2.5", "MB"] and "ip-adapter_sdxl.safetensors" in out[2]
    assert out[3].split()[:3] == ["present", "3.0", "MB"] and "image_encoder/*" in out[3]
    assert out[4].split()[:3] == ["MISSING", "size", "?"] and "diffusers/controlnet-canny-sdxl-1.0" in out[4]
    assert out[5].strip() == "1 missing, sizes unknown; get them with:"
    assert (
        out[6].strip()
        == "hf download diffusers/controlnet-canny-sdxl-1.0 config.json diffusion_pytorch_model.safetensors"
    )
    assert len(out) == 7
    # The missing ControlNet fetched (a fake hub that writes into the cache) makes the list complete.
    _fake_cache(cache, "diffusers/controlnet-canny-sdxl-1.0", {"config.json": 5})
    assert check(ModelNeed("x", "diffusers/controlnet-canny-sdxl-1.0", ("config.json", "*.safetensors"))).missing == (
        "*.safetensors",
    )
    fetched = []

    def fake_download(repo, allow_patterns=None, **kwargs):
        assert not kwargs.get("local_files_only")
        fetched.append((repo, tuple(allow_patterns)))
        _fake_cache(cache, repo, {"config.json": 5, "diffusion_pytorch_model.safetensors": 4_000_000})

    import huggingface_hub

    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo, **kw: real(repo, **kw) if kw.get("local_files_only") else fake_download(repo, **kw),
    )
    assert main(["models", "--preset", "style-transfer", "--fetch"]) == 0
    assert fetched == [("diffusers/controlnet-canny-sdxl-1.0", ("config.json", "diffusion_pytorch_model.safetensors"))]
    captured = capsys.readouterr()
    assert "style-transfer: all present" in captured.out and "fetching ControlNet" in captured.err


def test_models_marks_restricted_licences_and_hand_fetched_weights(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    root = tmp_path / "insightface"
    pack = root / "models" / "antelopev2"
    pack.mkdir(parents=True)
    (pack / "glintr100.onnx").write_bytes(b"\0" * 100)
    assert main(["models", "--preset", "portrait", "--set", f"face.face_root={root}", "--set",
                 f"face.parsing={tmp_path / 'facexlib'}"]) == 4  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"present +100 B +face analysis \(antelopev2\): .*antelopev2 \[\*\.onnx\]", out)
    assert "licence: insightface's models are for non-commercial research only" in out
    assert (
        "\n    download https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth into " in out
    )
    assert "\n    hf download guozinan/PuLID pulid_v1.1.safetensors\n" in out
    assert "\n    hf download QuanSun/EVA-CLIP EVA02_CLIP_L_336_psz14_s6B.pt\n" in out
    assert "\n    hf download lllyasviel/Annotators body_pose_model.pth hand_pose_model.pth facenet.pth\n" in out
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["models", "--preset", "portrait", "--fetch"]) == 4
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_models_is_one_line_per_model_a_total_and_one_command_per_repository(tmp_path, monkeypatch, capsys):
    """Every shipped preset's models on a machine that has none: each model once (with the presets that load it),
    its size or ``size ?``, the total, and each repository's ``hf download`` once; no home folder path."""
    from huggingface_hub import constants

    from sdxl_control.weights.inventory import download_size, unique

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["models"]) == 4
    out = capsys.readouterr().out
    needs = unique(n for name in available_presets() for n in load_preset(name).model_needs())
    rows = [line for line in out.splitlines() if line.startswith(("  MISSING", "  present"))]
    assert len(rows) == len(needs) == len({(n.source, n.files) for n in needs})
    missing = [n for n in needs if not check(n).present]  # face packs or facexlib's weights may be on this machine
    for need, row in zip(needs, rows, strict=True):
        size = download_size(need)
        assert f" {need.what}: " in row
        if need in missing:
            assert row.split()[0] == "MISSING" and (human_size(size) if size is not None else "size ?") in row
    known = sum(s for n in missing if (s := download_size(n)) is not None)
    assert f"{len(missing)} missing, at least {human_size(known)} in all; get them with:" in out
    commands = [line.split()[2] for line in out.splitlines() if line.startswith("    hf download ")]
    assert sorted(commands) == sorted({n.source for n in missing if n.on_hub})  # each repository once
    assert str(Path.home()) + "/" not in out
    assert len(out.splitlines()) < 2 * len(needs) + 5


def test_presets_lists_each_preset_with_its_inputs(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in available_presets():
        assert f"\n{name}\n" in f"\n{out}"
    assert "--structure FILE  (required) the photo whose composition to keep" in out
    assert "--pose FILE  (optional) a photo whose body pose to copy" in out


def test_each_familys_needs_are_the_files_it_loads(tiny, insightface_root):
    """On the tiny stand-ins (written in the published layouts), every need a condition lists is found: the patterns
    name the files the loaders read."""
    from sdxl_control.adapters.controlnet import ControlNet, ControlNetUnion
    from sdxl_control.adapters.faceid import FaceID
    from sdxl_control.adapters.instantid import InstantID
    from sdxl_control.adapters.ip_adapter import IPAdapter
    from sdxl_control.adapters.lora import LoRA
    from sdxl_control.adapters.photomaker import PhotoMaker
    from sdxl_control.adapters.pulid import PuLID
    from sdxl_control.testing.stand_ins import tiny_condition

    packs = insightface_root / "models"
    conditions = [
        ControlNet("diffusers/controlnet-depth-sdxl-1.0", image="x.png", preprocess="depth"),
        ControlNetUnion("xinsir/controlnet-union-sdxl-1.0", depth="x.png", canny="y.png", preprocess=("depth",)),
        IPAdapter("plus", "x.png"), IPAdapter("sdxl", "x.png"),
        FaceID("plusv2", "x.png", face_pack=str(packs / "buffalo_l")),
        InstantID("x.png", face_pack=str(packs / "antelopev2")),
        PuLID("x.png", face_pack=str(packs / "antelopev2")),
        PhotoMaker("x.png", version="v1"), PhotoMaker("x.png", face_pack=str(packs / "buffalo_l")),
        LoRA("ByteDance/SDXL-Lightning", weight_name="sdxl_lightning_4step_lora.safetensors"),
    ]  # fmt: skip
    kinds = set()
    for condition in conditions:
        needs = tiny_condition(condition).model_needs()
        assert needs, condition
        for need in needs:
            found = check(need)
            assert found.present and found.size > 0, (condition.kind, need, found.missing)
            kinds.add(need.what)
    assert {"depth estimator", "face analysis (antelopev2)", "face analysis (buffalo_l)", "EVA02-CLIP-L-336",
            "face parsing (facexlib BiSeNet)", "IdentityNet", "IP-Adapter image encoder"} <= kinds  # fmt: skip
