"""Numbers past what the models can carry, options that would do nothing, and the messages that refuse them: each names
the option, field or file to change and the value given (issue 34, parts 4 and 5). A1111's own parser
(``tests/reference_prompts.py``) is the reference for the weights a prompt's brackets give."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sdxl_control.engine.vae as vae_module
from sdxl_control import GenerationRequest, Generator, InvalidRequestError
from sdxl_control.base.errors import InputError, ModelNotFoundError
from sdxl_control.cli import main
from sdxl_control.engine.vae import NonFiniteLatentsError
from sdxl_control.passes.detailer import FaceDetailer
from sdxl_control.protocol.emphasis import MAX_NESTING, MAX_WEIGHT, check_syntax
from sdxl_control.testing.stand_ins import tiny_face_pack

from .reference_prompts import a1111_parse

SMALL = dict(steps=2, size=(64, 64), seed=1)


def _cli(argv, capsys, code: int) -> str:
    """``generate argv``'s message, checked to come with ``code`` and no traceback."""
    capsys.readouterr()
    assert main(["generate", *argv]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected" not in err
    return err


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    return path


# --- part 4: bounds on numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, emphasis",
    [("a (cat:1000000000) in snow", "a1111"), ("a (cat:1e9) in snow", "comfyui"), ("a (cat:-150) in snow", "a1111"),
     ("a (cat:nan) in snow", "comfyui"), ("a " + "(" * 60 + "cat" + ")" * 60 + " in snow", "a1111")],
    ids=["a1111-1e9", "comfyui-1e9", "negative", "nan", "60-brackets"],
)  # fmt: skip
def test_a_word_weighed_beyond_the_bound_is_refused_naming_it(text, emphasis):
    with pytest.raises(InvalidRequestError, match=r"the prompt weighs 'cat' by (\S+), beyond the 100") as refused:
        GenerationRequest(text, emphasis=emphasis, **SMALL)
    if emphasis == "a1111":  # the weight named is the one A1111's own parser gives the word
        (weight,) = [w for t, w in a1111_parse(text) if t == "cat"]
        assert f"by {weight:g}," in str(refused.value)
    GenerationRequest(text, emphasis="off", **SMALL)  # brackets read as text weigh nothing


def test_weights_within_the_bound_are_kept_as_written():
    for text in ("(cat:100)", "(cat:-100)", "(" * 48 + "cat" + ")" * 48, "[" * 200 + "cat" + "]" * 200):
        if text.startswith("["):  # deeper than MAX_NESTING: refused for its depth, not its (tiny) weight
            with pytest.raises(InvalidRequestError, match="200 nested brackets"):
                check_syntax(text, "a1111")
            continue
        check_syntax(text, "a1111")
        (weight,) = [w for t, w in a1111_parse(text) if t == "cat"]
        assert abs(weight) <= MAX_WEIGHT


@pytest.mark.parametrize("emphasis", ["a1111", "comfyui"])
def test_a_thousand_nested_brackets_are_refused_naming_the_word(emphasis, capsys):
    text = "a " + "(" * 1000 + "cat" + ")" * 1000
    with pytest.raises(InvalidRequestError, match=rf"puts 'cat' in 1000 nested brackets, beyond the {MAX_NESTING}"):
        GenerationRequest(text, emphasis=emphasis, **SMALL)
    err = _cli([text, "--tiny", "--emphasis", emphasis, "-o", "never.png"], capsys, 2)
    assert "'cat' in 1000 nested brackets" in err and "(cat:1.5)" in err


def test_a_bad_weight_in_the_negative_prompt_names_the_negative_prompt(capsys):
    err = _cli(["a fox", "--tiny", "--negative-prompt", "blurry, (ugly:1.2.3)", "-o", "never.png"], capsys, 2)
    assert "the negative prompt's weight '1.2.3' in 'blurry, (ugly:1.2.3)' is not a number" in err
    err = _cli(["a fox", "--tiny", "-n", "(ugly:1000)", "-o", "never.png"], capsys, 2)
    assert "the negative prompt weighs 'ugly' by 1000" in err


def test_nan_latents_are_refused_before_the_vae_naming_the_likely_cause(generator, monkeypatch):
    decoded = []
    real = vae_module._decode
    monkeypatch.setattr(vae_module, "_decode", lambda *a, **k: decoded.append(1) or real(*a, **k))
    assert generator.generate("a fox", guidance=7.0, progress_bar=False, **SMALL).images  # a finite run decodes
    assert decoded == [1]
    # A guidance this large overflows the float32 noise prediction: the latents come out NaN.
    with pytest.raises(NonFiniteLatentsError, match=r"NaN or infinite .* nothing was decoded.*guidance 1e\+38"):
        generator.generate("a fox", guidance=1e38, progress_bar=False, **SMALL)
    assert decoded == [1]  # the VAE never saw them


def test_an_option_with_no_effect_in_the_combination_is_refused(photo, tmp_path, capsys):
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    out = str(tmp_path / "never.png")
    err = _cli(["x", "--tiny", "--step-cache-branch", "2", "-o", out], capsys, 2)
    assert "step_cache_branch (--step-cache-branch) 2" in err and "--step-cache 3" in err
    err = _cli(["x", "--tiny", "--init-image", str(photo), "--mask-blur", "4", "-o", out], capsys, 2)
    assert "mask_blur (--mask-blur) 4 feathers a mask's edge, and there is none" in err
    err = _cli(["x", "--tiny", "--init-image", str(photo), "--mask", str(mask), "--mask-blur", "100000", "-o", out],
               capsys, 2)  # fmt: skip
    assert "mask_blur (--mask-blur) 100000 is wider than the image (64x64)" in err and "at most 64" in err
    GenerationRequest("x", init_image=str(photo), mask=str(mask), mask_blur=64, **SMALL)  # the bound itself is kept


# --- part 5: messages -----------------------------------------------------------------------------------------------


def test_a_detailer_dilation_that_erodes_the_face_away_is_named(generator):
    pack = str(tiny_face_pack("buffalo_l", 0))  # one face: a centred square half the picture's side (32 px here)
    with pytest.raises(InvalidRequestError, match=r"dilation \(a job's detailer.dilation\) -100 erodes the 32x32"):
        generator.generate("a face", detailer={"face_pack": pack, "dilation": -100}, progress_bar=False,
                           **{**SMALL, "steps": 4})  # fmt: skip
    with pytest.raises(InvalidRequestError, match=r"dilation .* must lie in \[-128, 128\] .* got 100000"):
        FaceDetailer(dilation=100000)


def test_a_jobs_detailer_dilation_is_named_in_the_batch_report(tiny, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a face", "steps": 2, "size": [64, 64], "detailer": {"dilation": -1000}}\n')
    assert main(["batch", str(jobs), "-o", str(tmp_path / "out"), "--tiny"]) == 2
    err = capsys.readouterr().err
    assert "dilation" in err and "-1000" in err and "ZeroDivisionError" not in err


@pytest.mark.parametrize(
    "settings, words, ways_out",
    [({"steps": 2, "detailer": True},
      "the face detailer's strength (a job's detailer.strength) 0.4 (its default, ADetailer's) with 2 steps (--steps",
      ("--detail-strength 0.5 or more, or 3 steps", {"detailer": {"strength": 0.5}}, {"steps": 3})),
     ({"steps": 1, "hires_scale": 1.5}, "the hires fix's strength (hires_strength) 0.5 (its default) with 1 steps",
      ("--hires-strength 1 or more, or 2 steps", {"hires_strength": 1.0}, {"steps": 2})),
     ({"steps": 2, "hires_scale": 1.5, "hires_strength": 0.3, "hires_steps": 3},
      "hires_strength) 0.3 (--hires-strength, or the preset's) with 3 steps (--hires-steps)",
      ("--hires-strength 0.34 or more, or 4 steps", {"hires_strength": 0.34}, {"hires_steps": 4})),
     ({"steps": 1, "init_image": "PHOTO"}, "strength 0.75 (the default for an init image, A1111's) with 1 steps",
      ("--strength 1 or more, or 2 steps", {"strength": 1.0}, {"steps": 2}))],
    ids=["detailer-default", "hires-default", "hires-given", "img2img-default"],
)  # fmt: skip
def test_a_strength_that_runs_no_step_names_where_it_came_from(settings, words, ways_out, photo):
    settings = {k: str(photo) if v == "PHOTO" else v for k, v in settings.items()}
    with pytest.raises(InvalidRequestError, match="runs no step") as refused:
        GenerationRequest("x", size=(64, 64), **settings)
    assert words in str(refused.value) and ways_out[0] in str(refused.value), str(refused.value)
    for fix in ways_out[1:]:  # each way out it names runs a step
        GenerationRequest("x", size=(64, 64), **{**settings, **fix})


def test_the_detailer_default_is_named_on_the_command_line(capsys):
    err = _cli(["x", "--tiny", "--steps", "2", "--detail-faces", "-o", "never.png"], capsys, 2)
    assert "the face detailer's strength" in err and "0.4 (its default" in err and "--detail-strength 0.5" in err


def test_an_outpainted_size_names_the_outpaint_and_the_image(photo, capsys):
    err = _cli(["x", "--tiny", "--init-image", str(photo), "--outpaint", "right=8192", "-o", "never.png"], capsys, 2)
    assert "size (--size) 8256x64 (no size given: the init image's own size grown by outpaint (--outpaint)" in err
    assert "(0, 0, 8192, 0)" in err and "smaller outpaint margins" in err


def test_a_missing_models_dir_names_where_it_was_set(monkeypatch, tmp_path, capsys):
    missing = str(tmp_path / "ComfyUI")
    monkeypatch.setenv("SDXL_CONTROL_MODELS_DIR", missing)
    err = _cli(["x", "--tiny", "-o", "never.png"], capsys, InputError.exit_code)
    assert f"SDXL_CONTROL_MODELS_DIR={missing!r}: models folder {missing}: no such folder" in err and "unset it" in err
    monkeypatch.delenv("SDXL_CONTROL_MODELS_DIR")
    err = _cli(["x", "--tiny", "--models-dir", missing, "-o", "never.png"], capsys, InputError.exit_code)
    assert f"--models-dir {missing!r}: models folder {missing}: no such folder" in err


def test_an_unknown_upscaler_is_named_before_the_first_pass(tiny, monkeypatch, capsys):
    def first_pass(*args, **kwargs):
        raise AssertionError("the first pass ran before the upscaler was checked")

    monkeypatch.setattr(Generator, "_run", first_pass)
    err = _cli(["x", "--tiny", "--steps", "2", "--hires", "1.5", "--upscaler", "4x-Nope", "-o", "never.png"],
               capsys, ModelNotFoundError.exit_code)  # fmt: skip
    assert "the hires fix's upscaler (--upscaler; a job's or recipe's \"upscaler\") '4x-Nope': no such file" in err


def test_a_presets_missing_input_names_the_real_flag(capsys):
    err = _cli(["x", "--tiny", "--preset", "upscale", "-o", "never.png"], capsys, 2)
    assert "needs its init_image input" in err and "--init-image FILE" in err and "--init_image" not in err
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "--init-image FILE" in listing and "--init_image" not in listing


@pytest.mark.parametrize(
    "argv, words",
    [(["generate", "x", "--stesp", "3"], "unrecognized arguments: --stesp 3 (did you mean --steps?)"),
     (["generate", "x", "--init_image", "a.png"], "(did you mean --init-image?)"),
     (["generate", "x", "--sede=3"], "(did you mean --seed?)"),
     (["generat", "x"], "invalid choice: 'generat'"),
     (["generate", "x", "--dtype", "bf61"], "(did you mean 'bf16'?)"),
     (["batch", "jobs.jsonl", "-o", "out", "--skip-invaild"], "(did you mean --skip-invalid?)")],
)  # fmt: skip
def test_a_mistyped_flag_or_choice_gets_the_nearest_right_one(argv, words, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and words in err
    if argv[0] == "generat":
        assert "(did you mean 'generate'?)" in err
    if "--stesp" in argv:  # nothing else is suggested where nothing is near
        with pytest.raises(SystemExit):
            main(["generate", "x", "--zzzzqqq"])
        assert "did you mean" not in capsys.readouterr().err


def test_a_mistyped_flag_answers_before_torch_loads():
    probe = (
        "import sys\n"
        "from sdxl_control.cli import main\n"
        "try:\n"
        "    main(['generate', 'x', '--stesp', '3'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 2, exc.code\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]" and "did you mean --steps?" in run.stderr
