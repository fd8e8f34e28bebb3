"""Bad and awkward inputs, walked by table: each is a clear error of its class that names the input (through the API),
or the documented exit code with such a message and no traceback (through the command line). After every failing
call the same Generator still makes exactly the image a fresh one makes."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdxl_control import (
    CheckpointError,
    ConditionError,
    DeviceError,
    IncompatibleModelError,
    InputError,
    InvalidRequestError,
)
from sdxl_control.adapters.controlnet import ControlNet
from sdxl_control.adapters.faceid import FaceID
from sdxl_control.adapters.instantid import InstantID
from sdxl_control.adapters.ip_adapter import IPAdapter
from sdxl_control.adapters.lora import LoRA
from sdxl_control.adapters.photomaker import PhotoMaker
from sdxl_control.adapters.pulid import PuLID
from sdxl_control.cli import main
from sdxl_control.passes.generator import Generator
from sdxl_control.presets import load_preset
from sdxl_control.testing import tiny_control_models
from sdxl_control.testing.lora import write_tiny_lora


class OutOfMemoryError(RuntimeError):
    """Named as torch.cuda's, which the command line recognises without importing torch."""


GOOD = dict(seed=3, steps=2, size=(64, 64), refiner_switch=0.5, progress_bar=False)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0])


def _bomb(path: Path) -> Path:
    """A PNG whose header declares 100000 x 100000 pixels (and holds none)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    photo = folder / "photo.png"
    Image.new("RGB", (64, 64), (120, 80, 40)).save(photo)
    (folder / "notes.png").write_text("not an image")
    (folder / "empty.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    (folder / "lying.safetensors").write_text("I am not a safetensors file")
    (folder / "evil.ckpt").write_bytes(b"\x80\x04cos\nsystem\n.")
    (folder / "a folder.png").mkdir()
    plain = folder / "plain.png"
    Image.new("RGB", (64, 64)).save(plain)
    shutil.copytree(tiny.base, folder / "broken-base")
    (folder / "broken-base" / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel",')
    return SimpleNamespace(
        folder=folder, photo=photo, notes=folder / "notes.png", bomb=_bomb(folder / "bomb.png"), plain=plain,
        empty=folder / "empty.safetensors", lying=folder / "lying.safetensors", evil=folder / "evil.ckpt",
        dir_png=folder / "a folder.png", lora=Path(write_tiny_lora(folder / "lora.safetensors", tiny.base, "kohya")),
        edges=str(tiny_control_models("controlnet-edges")), ip=str(tiny_control_models("ip-adapter")),
        instantid=str(tiny_control_models("instantid")), base=str(tiny.base), broken_base=folder / "broken-base",
        narrow_photomaker=_narrow_photomaker(folder / "narrow-photomaker.bin", tiny.base),
    )  # fmt: skip


def _narrow_photomaker(path: Path, base: Path) -> Path:
    """A PhotoMaker file whose image encoder is 32 wide: narrower than one of CLIP's 64-wide attention heads."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdxl_control.testing.photomaker import TINY_CLIP, write_photomaker_checkpoint

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    write_photomaker_checkpoint(path, unet, "v1", widths=(32, 32), **TINY_CLIP)
    state = torch.load(path, weights_only=True)
    state["id_encoder"]["vision_model.embeddings.class_embedding"] = torch.zeros(32)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def reference(fresh) -> np.ndarray:
    return _pixels(fresh.generate("a lighthouse", **GOOD))


def _cn(f, **options):
    return ControlNet(f.edges, image=str(f.photo), **options)


def _interrupt(event):
    if event.index == 1:
        raise KeyboardInterrupt


# (id, what the call does, error class, words the message must hold)
API_CASES = [
    ("guidance-nan", lambda g, f: g.generate("x", guidance=float("nan"), **GOOD), InvalidRequestError,
     "guidance must be a finite number"),
    ("guidance-inf", lambda g, f: g.generate("x", guidance=float("inf"), **GOOD), InvalidRequestError,
     "guidance must be a finite number"),
    ("seed-65-bits", lambda g, f: g.generate("x", **{**GOOD, "seed": 2**64}), InvalidRequestError,
     "seed must be a whole number from 0"),
    ("seed-negative", lambda g, f: g.generate("x", **{**GOOD, "seed": -1}), InvalidRequestError, "seed must be"),
    ("seed-batch-overflow", lambda g, f: g.generate("x", num_images=2, **{**GOOD, "seed": 2**64 - 1}),
     InvalidRequestError, "room for the batch"),
    ("steps-bool", lambda g, f: g.generate("x", **{**GOOD, "steps": True}), InvalidRequestError,
     "steps must be a whole number"),
    ("steps-fraction", lambda g, f: g.generate("x", **{**GOOD, "steps": 2.5}), InvalidRequestError,
     "steps must be a whole number"),
    ("steps-huge", lambda g, f: g.generate("x", **{**GOOD, "steps": 10**6}), InvalidRequestError, "from 1 to 1000"),
    ("size-strings", lambda g, f: g.generate("x", **{**GOOD, "size": ("64", "64")}), InvalidRequestError,
     "size must be (width, height) in whole pixels"),
    ("size-one-side", lambda g, f: g.generate("x", **{**GOOD, "size": (64,)}), InvalidRequestError, "size must be"),
    ("size-huge", lambda g, f: g.generate("x", **{**GOOD, "size": (65536, 64)}), InvalidRequestError,
     "beyond 8192 pixels"),
    ("prompt-none", lambda g, f: g.generate(None, **GOOD), InvalidRequestError, "prompt must be a string"),
    ("num-images-huge", lambda g, f: g.generate("x", num_images=10**6, **GOOD), InvalidRequestError,
     "num_images must be from 1 to 64"),
    ("switch-nan", lambda g, f: g.generate("x", **{**GOOD, "refiner_switch": float("nan")}), InvalidRequestError,
     "refiner_switch must be a finite number"),
    ("option-misspelt", lambda g, f: g.generate("x", stesp=3, **GOOD), InvalidRequestError,
     "unknown option(s) 'stesp' (did you mean 'steps'?)"),
    ("scheduler-typo", lambda g, f: g.generate("x", scheduler="euler-a", **GOOD), InvalidRequestError,
     "unknown scheduler 'euler-a' (did you mean 'euler_a'?)"),
    ("scheduler-options-not-mapping", lambda g, f: g.generate("x", scheduler_options="karras", **GOOD),
     InvalidRequestError, "scheduler_options must be a Mapping"),
    ("not-a-condition", lambda g, f: g.generate("x", conditions=[object()], **GOOD), ConditionError,
     "is not a Condition"),
    ("condition-twice", lambda g, f: g.generate("x", conditions=[(c := _cn(f)), c], **GOOD), ConditionError,
     "given twice"),
    ("scale-string", lambda g, f: _cn(f, scale="high"), ConditionError, "ControlNet: scale must be a number"),
    ("scale-nan", lambda g, f: _cn(f, scale=float("nan")), ConditionError, "scale must be a finite number"),
    ("window-backwards", lambda g, f: _cn(f, window=(0.8, 0.2)), ConditionError, "0 <= start < end <= 1"),
    ("window-word", lambda g, f: _cn(f, window="early"), ConditionError,
     "window must be (start, end) fractions of the schedule"),
    ("window-nan", lambda g, f: _cn(f, window=(float("nan"), 1.0)), ConditionError, "start < end"),
    ("stage-unknown", lambda g, f: _cn(f, stage="middle"), ConditionError, "unknown stage 'middle'"),
    ("guess-mode-string", lambda g, f: _cn(f, guess_mode="yes"), ConditionError, "guess_mode must be true or false"),
    ("image-missing", lambda g, f: g.generate("x", conditions=[ControlNet(f.edges, image="gone.png")], **GOOD),
     InputError, "ControlNet image: no such file or folder gone.png"),
    ("image-not-an-image", lambda g, f: g.generate("x", conditions=[ControlNet(f.edges, image=str(f.notes))],
     **GOOD), InputError, "notes.png is not a readable image"),
    ("image-bomb", lambda g, f: g.generate("x", conditions=[ControlNet(f.edges, image=str(f.bomb))], **GOOD),
     InputError, "too large to decode safely"),
    ("float-array-0-255", lambda g, f: g.generate("x", conditions=[ControlNet(f.edges, image=np.full(
        (64, 64, 3), 200.0))], **GOOD), ConditionError, "must hold values in 0..1, this one spans 200..200"),
    ("int-array-wraps", lambda g, f: g.generate("x", conditions=[ControlNet(f.edges, image=np.full(
        (64, 64, 3), 300))], **GOOD), ConditionError, "must hold values in 0..255, this one spans 300..300"),
    ("array-nan", lambda g, f: g.generate("x", conditions=[ControlNet(f.edges, image=np.full(
        (64, 64, 3), np.nan))], **GOOD), ConditionError, "NaN or infinite"),
    ("ip-variant-typo", lambda g, f: IPAdapter("pluss", str(f.photo), source=f.ip), ConditionError,
     "unknown IP-Adapter variant 'pluss' (did you mean 'plus'?)"),
    ("faceid-variant-typo", lambda g, f: FaceID("plusv3", str(f.photo)), ConditionError,
     "unknown FaceID variant 'plusv3' (did you mean 'plusv2'?): one of faceid, plusv2"),
    ("pulid-version", lambda g, f: PuLID(str(f.photo), version="v3"), ConditionError,
     "version must be one of 'v1', 'v1.1'"),
    ("photomaker-merge", lambda g, f: PhotoMaker(str(f.photo), start_merge=2.0), ConditionError,
     "start_merge is a fraction"),
    ("instantid-window", lambda g, f: InstantID(str(f.photo), controlnet_window=(0.0, 2.0)), ConditionError,
     "0 <= start < end <= 1"),
    ("lora-empty", lambda g, f: g.generate("x", conditions=[LoRA(str(f.empty))], **GOOD), CheckpointError,
     "holds no tensors"),
    ("lora-lying", lambda g, f: g.generate("x", conditions=[LoRA(str(f.lying))], **GOOD), CheckpointError,
     "lying.safetensors is not a readable safetensors file"),
    ("lora-pickle", lambda g, f: g.generate("x", conditions=[LoRA(str(f.evil))], **GOOD), CheckpointError,
     "is a pickle checkpoint"),
    ("lora-scale-bool", lambda g, f: LoRA(str(f.lora), scale=True), ConditionError, "scale must be a number"),
    ("identity-not-a-file", lambda g, f: g.generate("x", conditions=[InstantID(identity=str(f.notes),
     source=f.instantid)], **GOOD), InputError, "identity file"),
    ("device-unknown", lambda g, f: Generator.from_pretrained(f.base, device="gpu0"), DeviceError,
     "unknown device 'gpu0'"),
    ("dtype-string", lambda g, f: Generator.from_pretrained(f.base, dtype="fp16"), InvalidRequestError,
     "dtype must be a torch floating-point dtype"),
    ("preset-typo", lambda g, f: load_preset("lightning-4-step"), InvalidRequestError,
     "unknown preset 'lightning-4-step'"),
    ("interrupted-mid-run", lambda g, f: g.generate("x", conditions=[LoRA(str(f.lora)), _cn(f)],
     progress=_interrupt, **GOOD), KeyboardInterrupt, ""),
    ("control-map-extreme-aspect", lambda g, f: g.generate("x", conditions=[ControlNet(f.edges, image=np.zeros(
        (16, 4000, 3), np.uint8))], **GOOD), ConditionError, "would be stretched 250.0 times out of shape"),
    ("offload-to-a-missing-device", lambda g, f: g.set_offload("cuda:99"), DeviceError, "cuda:99"),
    ("model-config-not-json", lambda g, f: Generator.from_pretrained(f.broken_base), CheckpointError,
     "unet/config.json: not valid JSON"),
    ("photomaker-narrow-encoder", lambda g, f: g.generate("a photo of a man img", conditions=[PhotoMaker(
        str(f.photo), weights=str(f.narrow_photomaker))], **GOOD), IncompatibleModelError, "32-wide"),
]  # fmt: skip


@pytest.mark.parametrize("case, error, words", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_and_leaves_the_generator_as_it_was(generator, files, reference, case, error, words):
    with pytest.raises(error) as raised:
        case(generator, files)
    assert words in str(raised.value)
    assert np.array_equal(_pixels(generator.generate("a lighthouse", **GOOD)), reference)


def _recipe_png(folder: Path, name: str, edit) -> str:
    """A PNG written by sdxl-control with its recipe edited as a user might by hand."""
    from sdxl_control.records.recipe import RECIPE_KEY

    source = folder / "made.png"
    if not source.exists():
        assert main(["generate", "x", "--tiny", "--steps", "2", "--size", "64x64", "-q", "-o", str(source)]) == 0
    recipe = json.loads(Image.open(source).info[RECIPE_KEY])
    edit(recipe)
    info = PngImagePlugin.PngInfo()
    info.add_itxt(RECIPE_KEY, json.dumps(recipe))
    target = folder / name
    Image.open(source).save(target, pnginfo=info)
    return str(target)


def _set(key, value):
    return lambda recipe: recipe.update({key: value})


def _rename(old, new):
    return lambda recipe: recipe.update({new: recipe.pop(old)})


# (id, arguments after "generate" (a callable of the files), exit code, words on stderr)
CLI_CASES = [
    ("seed-65-bits", lambda f: ["x", "--tiny", "--seed", str(2**64)], 2, "seed must be a whole number from 0"),
    ("device-unknown", lambda f: ["x", "--tiny", "--device", "gpu0"], 7, "unknown device 'gpu0'"),
    ("output-folder-missing", lambda f: ["x", "--tiny", "-o", str(f.folder / "nowhere" / "x.png")], 6,
     "nowhere does not exist"),
    ("output-not-png", lambda f: ["x", "--tiny", "-o", str(f.folder / "x.jpg")], 6, "must be a .png file"),
    ("output-is-a-folder", lambda f: ["x", "--tiny", "-o", str(f.dir_png)], 6, "is a folder"),
    ("recipe-missing", lambda f: ["--recipe", str(f.folder / "gone.png")], 3, "gone.png: no such file"),
    ("recipe-not-an-image", lambda f: ["--recipe", str(f.notes)], 3, "not a readable image"),
    ("recipe-absent", lambda f: ["--recipe", str(f.plain)], 3, "carries no settings this can read: no sdxl-control recipe"),
    ("recipe-size-string", lambda f: ["--recipe", _recipe_png(f.folder, "size.png", _set("size", "64x64"))], 2,
     "'size' should be a list"),
    ("recipe-size-values", lambda f: ["--recipe", _recipe_png(f.folder, "size2.png", _set("size", ["a", 64]))], 2,
     "size must be (width, height) in whole pixels"),
    ("recipe-key-misspelt", lambda f: ["--recipe", _recipe_png(f.folder, "key.png", _rename("steps", "stpes"))], 2,
     "'stpes' (did you mean 'steps'?)"),
    ("recipe-condition-key-misspelt", lambda f: ["--recipe", _recipe_png(f.folder, "cond.png", _set(
        "conditions", [{"kind": "controlnet", "model": f.edges, "image": str(f.photo), "scael": 0.0}]))], 2,
     "controlnet condition has unknown key(s) 'scael' (did you mean 'scale'?)"),
    ("recipe-guidance-nan", lambda f: ["--recipe", _recipe_png(f.folder, "nan.png", _set("guidance", float("nan")))],
     2, "guidance must be a finite number"),
    ("image-bomb", lambda f: ["x", "--tiny", "--edges", str(f.bomb)], 3, "too large to decode safely"),
    ("image-folder", lambda f: ["x", "--tiny", "--edges", str(f.folder)], 3, "is a folder, not an image"),
    ("image-missing", lambda f: ["x", "--tiny", "--face", str(f.folder / "me.jpg")], 3, "--face: no such file"),
    ("model-config-not-json", lambda f: ["x", "--base", str(f.broken_base), "--size", "64x64"], 4,
     "unet/config.json: not valid JSON"),
    ("inputs-from-alone", lambda f: ["x", "--tiny", "--inputs-from", str(f.folder)], 2, "give --recipe"),
    ("no-prompt", lambda f: ["--tiny"], 2, "a prompt is required"),
    ("steps-huge", lambda f: ["x", "--tiny", "--steps", "5000"], 2, "from 1 to 1000"),
    ("scheduler-typo", lambda f: ["x", "--tiny", "--scheduler", "dpmpp2m"], 2, "(did you mean 'dpmpp_2m'?)"),
    ("faceid-variant-typo", lambda f: ["x", "--tiny", "--face", str(f.photo), "--face-variant", "plusv3"], 2,
     "unknown FaceID variant 'plusv3'"),
    ("lora-empty", lambda f: ["x", "--tiny", "--steps", "2", "--lora", str(f.empty)], 4, "holds no tensors"),
    ("base-pickle", lambda f: ["x", "--base", str(f.evil)], 4, "is a pickle checkpoint"),
    ("base-lying", lambda f: ["x", "--base", str(f.lying)], 4, "not a readable safetensors file"),
    ("preset-unknown", lambda f: ["x", "--preset", "lightnin"], 2, "unknown preset 'lightnin' (did you mean"),
    ("preset-set-typo", lambda f: ["x", "--preset", "portrait", "--face", str(f.photo), "--set", "face.scael=1"], 2,
     "unknown key(s) 'scael' (did you mean 'scale'?)"),
    ("preset-set-without-preset", lambda f: ["x", "--set", "steps=4"], 2, "give --preset"),
    ("preset-input-missing", lambda f: ["x", "--tiny", "--preset", "portrait"], 2,
     "preset portrait needs its face input"),
    ("preset-identity-flag", lambda f: ["x", "--preset", "portrait", "--face", str(f.photo), "--identity-scale", "1"],
     2, "--set face.KEY=VALUE"),
    ("preset-unknown-input", lambda f: ["x", "--preset", "portrait", "--face", str(f.photo), "--input",
                                        f"fcae={f.photo}"], 2, "'fcae' (did you mean 'face'?)"),
    ("structure-without-preset", lambda f: ["x", "--tiny", "--structure", str(f.photo)], 2,
     "--structure fills a preset's structure input"),
]  # fmt: skip


@pytest.mark.parametrize("args, code, words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_answers_with_the_exit_code_of_the_error_class(tiny, files, capsys, args, code, words):
    argv = ["generate", *args(files)]
    if "-o" not in argv:
        argv += ["-o", str(files.folder / "out.png")]
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, words",
    [(["generate", "x", "--guidance", "nan"], "expected a finite number, got 'nan'"),
     (["generate", "x", "--edges-scale", "inf"], "expected a finite number, got 'inf'"),
     (["generate", "x", "--edges-window", "0.8:0.2"], "a window needs 0 <= start < end <= 1"),
     (["generate", "x", "--steps", "many"], "expected a whole number, got 'many'"),
     (["generate", "x", "--size=-64x64"], "size must be positive"),
     (["generate", "x", "--size", "1000x1001"], "size must be positive multiples of 8, got 1000x1001"),
     (["generate", "x", "--size", "100000x64"], "beyond 8192 pixels"),
     (["generate", "x", "--edges", "a.png", "--edges", "b.png"], "--edges was given twice"),
     (["generate", "x", "--dtype", "fp8"], "invalid choice: 'fp8'")],
)  # fmt: skip
def test_argument_errors_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize(
    "raised, code, words",
    [(KeyboardInterrupt(), 130, "interrupted"),
     (RuntimeError("boom"), 1, "unexpected RuntimeError: boom"),
     (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 7, "out of memory (CUDA out of memory"),
     (MemoryError(), 7, "out of memory"),
     (DeviceError("device 'cuda:3': this machine has 1 CUDA device(s)"), 7, "cuda:3")],
)  # fmt: skip
def test_interruptions_and_failures_during_a_run(tiny, tmp_path, monkeypatch, capsys, raised, code, words):
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(Generator, "run", fail)
    assert main(["generate", "x", "--tiny", "-q", "-o", str(tmp_path / "x.png")]) == code
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and not (tmp_path / "x.png").exists()
    if code == 1:
        assert "--debug" in err
        with pytest.raises(RuntimeError):  # --debug lets the traceback through
            main(["generate", "x", "--tiny", "-q", "--debug", "-o", str(tmp_path / "x.png")])


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    assert main(["generate", "x", "--tiny", "--debug", "-o", str(tmp_path / "no" / "x.png")]) == 6
    err = capsys.readouterr().err
    assert "Traceback" in err and "OutputError" in err


def test_help_and_argument_errors_answer_without_torch(tmp_path):
    probe = (
        "import sys\n"
        "from sdxl_control.cli import main\n"
        "for argv in (['generate', '--help'], ['--help'], ['generate', 'x', '--steps', 'many']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, 2), exc.code\n"
        "assert main(['generate', '--tiny', '-o', 'out.png']) == 2\n"  # no prompt: said before torch and the tiny build
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert "a prompt is required" in run.stderr
    assert "exit codes:" in run.stdout and "expected a whole number, got 'many'" in run.stderr
