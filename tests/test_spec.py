"""The one request path: the command line, the page and a job file given the same request hand Generator.run the
same request on the same models; resolve() applies one model rule for all; the model policy (hub or tiny) is a
Resolver; a condition family's flags come from its declaration, with no code in the front-ends."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import fields

import numpy as np
import pytest
from PIL import Image

from sdxl_control import adapters
from sdxl_control.adapters import CONDITION_KINDS, Family, Flag, condition_class, identity_kinds
from sdxl_control.base.defaults import DEFAULT_BASE, STRUCTURE_CONTROLS
from sdxl_control.base.errors import InvalidRequestError
from sdxl_control.base.model_refs import ModelRef
from sdxl_control.cli import main
from sdxl_control.jobs.resolvers import HubResolver, TinyResolver
from sdxl_control.jobs.spec import JobSpec, resolve
from sdxl_control.presets import load_preset

PROMPT = "a portrait by the sea"
NEGATIVE = "blurry"


def _photo(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 255, (96, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture
def calls(monkeypatch):
    """What reaches Generator.from_pretrained (the models) and Generator.run (the request, as its recipe records
    it), for every front-end in this process."""
    from sdxl_control.passes.generator import Generator

    seen: list[tuple[str, object]] = []
    load, run = Generator.from_pretrained.__func__, Generator.run

    def from_pretrained(cls, base=DEFAULT_BASE, refiner=None, **kwargs):
        seen.append(("models", (str(base), str(refiner) if refiner else None, kwargs.get("unet"))))
        return load(cls, base, refiner, **kwargs)

    def recorded_run(self, request, **kwargs):
        seen.append(("request", json.dumps(request.settings(), sort_keys=True)))
        return run(self, request, **kwargs)

    monkeypatch.setattr(Generator, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(Generator, "run", recorded_run)
    return seen


def _page_generate(config, form):
    """The page's Generate handler, called as Gradio calls it: the form's values in order, then its state."""
    from sdxl_control.ui import PageForm, build_app

    app = build_app(config)
    (handler,) = [f.fn for f in app.fns.values() if getattr(f, "api_name", None) == "generate"]
    updates = list(handler(*[getattr(form, f.name) for f in fields(PageForm)], None))
    return updates[-1][2]  # the gallery's paths


def test_cli_page_and_batch_hand_generator_run_the_same_job(tiny, tmp_path, calls):
    from sdxl_control.ui import PageForm, UiConfig

    face, edges = _photo(tmp_path / "me.jpg", 1), _photo(tmp_path / "edges.jpg", 2)
    numbers = {"seed": 5, "steps": 3, "guidance": 4.0}
    cli = ["generate", PROMPT, "-n", NEGATIVE, "--preset", "portrait", "--face", face, "--edges", edges,
           "--edges-scale", "0.6", "--size", "64x64", "--tiny", "-q", "-o", str(tmp_path / "cli.png"),
           *[x for k, v in numbers.items() for x in (f"--{k}", str(v))]]  # fmt: skip
    assert main(cli) == 0
    page = PageForm(PROMPT, NEGATIVE, "portrait", width=64, height=64, random_seed=False, faces=[face],
                    structure=edges, structure_kind="edges", structure_scale=0.6, **numbers)  # fmt: skip
    (page_png,) = _page_generate(UiConfig(resolver=TinyResolver(), outputs=tmp_path), page)
    job = {"id": "job", "prompt": PROMPT, "negative_prompt": NEGATIVE, "preset": "portrait",
           "inputs": {"face": ["me.jpg"]}, "size": [64, 64], **numbers,
           "conditions": [{"kind": "controlnet", "model": STRUCTURE_CONTROLS["edges"].model, "image": "edges.jpg",
                           "preprocess": "canny", "scale": 0.6}]}  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
    assert main(["batch", str(tmp_path / "jobs.jsonl"), "-o", str(tmp_path / "out"), "--tiny", "-q"]) == 0

    requests = [value for kind, value in calls if kind == "request"]
    models = [value for kind, value in calls if kind == "models"]
    assert len(requests) == 3 and len(models) == 3
    assert requests[0] == requests[1] == requests[2]
    assert models[0] == models[1] == models[2]
    recorded = json.loads(requests[0])
    assert [c["kind"] for c in recorded["conditions"]] == ["pulid", "controlnet"]
    assert (recorded["steps"], recorded["size"], recorded["negative_prompt"]) == (3, [64, 64], NEGATIVE)
    images = [tmp_path / "cli.png", page_png, tmp_path / "out" / "job.png"]
    pixels = [np.asarray(Image.open(p)) for p in images]
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2])


def test_resolve_with_the_hub_policy_names_the_published_models_and_loads_nothing(tmp_path):
    job = resolve(JobSpec("x", preset="portrait-draft", inputs={"face": [_photo(tmp_path / "me.jpg", 0)]}))
    assert (job.base, job.refiner) == (DEFAULT_BASE, None)
    assert job.unet == ModelRef("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors")
    (pulid,) = job.request.conditions
    assert (pulid.kind, pulid.source, pulid.face_pack) == ("pulid", "guozinan/PuLID", "antelopev2")


def test_a_base_named_alone_drops_the_presets_unet_and_a_named_unet_stays(tmp_path):
    spec = JobSpec("x", preset="portrait-draft", inputs={"face": [_photo(tmp_path / "me.jpg", 0)]})
    assert resolve(dataclasses.replace(spec, models={"base": "me/my-base"})).models == ("me/my-base", None, None)
    mine = {"base": "me/my-base", "unet": {"source": "me/unet", "weight_name": "u.safetensors"}}
    assert resolve(dataclasses.replace(spec, models=mine)).unet == ModelRef("me/unet", "u.safetensors")
    refined = resolve(JobSpec("x", settings={"refiner_switch": 0.8}, models={"refiner": "me/refiner"}))
    assert refined.refiner == "me/refiner"
    with pytest.raises(InvalidRequestError, match="unknown key"):
        resolve(JobSpec("x", models={"bsae": "me/base"}))


def test_the_tiny_policy_swaps_every_model_a_job_loads(tiny, tmp_path):
    face = _photo(tmp_path / "me.jpg", 3)
    job = resolve(JobSpec("x", preset="portrait", inputs={"face": [face]}, settings={"decoder": "madebyollin/taesdxl"}),
                  TinyResolver())  # fmt: skip
    assert job.base == str(tiny.base) and job.request.size == (112, 144)  # the preset's 896x1152 at the tiny scale
    (pulid,) = job.request.conditions
    cache = tiny.base.parent
    for name in ("source", "eva", "parsing", "face_pack"):
        assert str(getattr(pulid, name)).startswith(str(cache)), name
    assert job.request.decoder.startswith(str(cache)) and pulid.faces == [face]  # the user's own files stay
    assert resolve(JobSpec("x"), TinyResolver()).request.size == (128, 128)
    assert resolve(JobSpec("x"), HubResolver()).request.size == (1024, 1024)


def test_every_family_flag_names_a_field_of_its_class_with_its_choices():
    names = [f.name for family in CONDITION_KINDS.values() for f in family.flags]
    assert len(names) == len(set(names))
    for kind, family in CONDITION_KINDS.items():
        hints = typing.get_type_hints(condition_class(kind))
        for flag in family.flags:
            assert flag.field in hints, (kind, flag)
            choices = {a for a in typing.get_args(hints[flag.field]) if typing.get_origin(a) is typing.Literal}
            literal = next(iter(choices), hints[flag.field])
            if typing.get_origin(literal) is typing.Literal:
                assert set(flag.choices) == set(typing.get_args(literal)), (kind, flag)
    assert set(identity_kinds()) == {"faceid", "instantid", "pulid", "photomaker"}


def test_a_family_registered_with_flags_needs_no_front_end_code(tiny, tmp_path, monkeypatch, capsys):
    """A second identity family, declared only in the registry (FaceID's class under another name, with a flag for
    its s_scale): the command line takes --identity and its flag, and the page offers it."""
    flag = Flag("faceid-shortcut", "s_scale", "the shortcut's weight", "number")
    monkeypatch.setitem(adapters.CONDITION_KINDS, "faceid-shortcut", Family("faceid", "FaceID", "identity", (flag,)))
    face = _photo(tmp_path / "me.jpg", 4)
    args = ["generate", "x", "--tiny", "--face", face, "--identity", "faceid-shortcut", "--dry-run"]
    assert main([*args, "--faceid-shortcut", "0.25"]) == 0
    (condition,) = json.loads(capsys.readouterr().out)["conditions"]
    assert (condition["kind"], condition["s_scale"]) == ("faceid", 0.25)
    assert main(["generate", "x", "--tiny", "--face", face, "--identity", "pulid", "--faceid-shortcut", "1"]) == 2
    assert "--faceid-shortcut: for --identity faceid-shortcut, not pulid" in capsys.readouterr().err
    from sdxl_control.ui import UiConfig, build_app

    app = build_app(UiConfig(resolver=TinyResolver(), outputs=tmp_path))
    dropdowns = [b for b in app.blocks.values() if getattr(b, "label", None) == "Method"]
    assert "faceid-shortcut" in [c[0] if isinstance(c, tuple) else c for c in dropdowns[0].choices]


def test_identity_flags_without_a_face_are_refused(capsys):
    assert main(["generate", "x", "--tiny", "--pulid-version", "v1", "--dry-run"]) == 2
    assert "--pulid-version: identity options need --face" in capsys.readouterr().err


def test_the_portrait_preset_is_resolved_like_its_own_request(tmp_path):
    """Preset.request (the Python form) and resolve() agree: one way a preset becomes a request."""
    preset = load_preset("portrait")
    face = _photo(tmp_path / "me.jpg", 0)
    spec = JobSpec("a portrait", preset="portrait", inputs={"face": [face]}, settings={"seed": 3})
    assert resolve(spec).request == preset.request("a portrait", {"face": [face]}, seed=3)


def test_preprocess_with_tiny_analyses_faces_with_the_stand_in_pack(tiny, tmp_path):
    photo = _photo(tmp_path / "me.jpg", 5)
    for kind in ("face", "faces"):
        out = tmp_path / f"{kind}.png"
        assert main(["preprocess", kind, photo, "-o", str(out), "--tiny"]) == 0
        assert Image.open(out).size == Image.open(photo).size


def test_the_page_starts_from_an_image_with_a_painted_mask_as_the_cli_does(tiny, tmp_path):
    """The editor's background is the init image, its painted strokes the mask (saved beside the outputs, so the
    recipe names it); the page's image equals the CLI's with the same files."""
    from sdxl_control.ui import PageForm, UiConfig

    init = _photo(tmp_path / "init.png", 6)
    Image.open(init).resize((64, 64)).save(init)
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[8:40, 16:48] = (255, 0, 0, 255)  # a red stroke
    Image.fromarray(layer).save(tmp_path / "layer.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    outputs = tmp_path / "page"
    outputs.mkdir()
    editor = {"background": init, "layers": [str(tmp_path / "layer.png")], "composite": init}
    form = PageForm(PROMPT, width=64, height=64, steps=3, seed=4, random_seed=False, init_image=editor, strength=0.8)
    (page_png,) = _page_generate(UiConfig(resolver=TinyResolver(), outputs=outputs), form)
    cli = tmp_path / "cli.png"
    assert main(["generate", PROMPT, "--init-image", init, "--mask", str(tmp_path / "mask.png"), "--strength", "0.8",
                 "--size", "64x64", "--steps", "3", "--seed", "4", "--tiny", "-q", "-o", str(cli)]) == 0  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(page_png)), np.asarray(Image.open(cli)))
    from sdxl_control.records.recipe import read_recipe

    recipe = read_recipe(page_png)
    assert recipe["mask"]["file"].startswith("mask-") and recipe["strength"] == 0.8
    hires = PageForm(PROMPT, width=64, height=64, steps=2, seed=4, random_seed=False, hires_scale=1.5)
    (big,) = _page_generate(UiConfig(resolver=TinyResolver(), outputs=outputs), hires)
    assert Image.open(big).size == (96, 96) and read_recipe(big)["hires_scale"] == 1.5


def test_a_tiny_dry_run_writes_no_weights_and_no_cache_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDXL_CONTROL_CACHE", str(tmp_path / "cache"))
    assert main(["generate", "a fox", "--tiny", "--preset", "draft", "--dry-run"]) == 0
    line = capsys.readouterr().out
    assert not (tmp_path / "cache").exists() and str(tmp_path) not in line
    assert json.loads(line)["size"] == [128, 128]  # the tiny policy's size stays: the line runs as --tiny did


def test_tiny_runs_every_size_at_the_tiny_models_scale_in_every_front_end(tiny, tmp_path, capsys, caplog):
    """One rule in ``resolve``: under ``--tiny`` a preset's size, a typed one (with a warning), an init image's and a
    job's are brought to at most 128x128's area, aspect kept, alike for the command line, a job line and the page;
    the named models' policy keeps them; small sizes and an outpainted canvas stay."""
    import logging

    from sdxl_control.jobs.batch import read_jobs
    from sdxl_control.jobs.resolvers import tiny_scale
    from sdxl_control.ui import PageForm, UiConfig, _Page, form_spec

    face = _photo(tmp_path / "me.jpg", 1)
    portrait = JobSpec("x", preset="portrait", inputs={"face": [face]})
    assert resolve(portrait, HubResolver()).request.size == (896, 1152)
    assert resolve(portrait, TinyResolver()).request.size == (112, 144) == tiny_scale((896, 1152))
    capsys.readouterr()
    assert main(["generate", "x", "--preset", "portrait", "--face", face, "--tiny", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["size"] == [112, 144]
    job_line = {"prompt": "x", "preset": "portrait", "inputs": {"face": ["me.jpg"]}}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job_line) + "\n")
    (job,), problems = read_jobs(tmp_path / "jobs.jsonl", resolver=TinyResolver())
    assert not problems and job.request.size == (112, 144)
    config = UiConfig(resolver=TinyResolver(), outputs=tmp_path)
    width, height = _Page(config).apply_preset("portrait")[2:4]
    assert (width, height) == (112, 144)  # choosing the preset on a --tiny page shows the size it runs at
    form = PageForm("x", preset="portrait", width=896, height=1152, faces=[face])
    assert resolve(form_spec(form, config, seed=1), TinyResolver()).request.size == (112, 144)

    with caplog.at_level(logging.WARNING, logger="sdxl_control.jobs.spec"):
        assert resolve(JobSpec("x", settings={"size": (1024, 768)}), TinyResolver()).request.size == (144, 112)
    assert "size 1024x768 runs as 144x112" in caplog.text
    Image.new("RGB", (800, 600)).save(tmp_path / "photo.png")
    started = resolve(JobSpec("x", settings={"init_image": str(tmp_path / "photo.png")}), TinyResolver())
    assert started.request.size == (144, 112)
    assert resolve(JobSpec("x", settings={"size": (64, 64)}), TinyResolver()).request.size == (64, 64)
    outpainted = JobSpec("x", settings={"init_image": str(tmp_path / "photo.png"), "outpaint": (64, 0, 64, 0)})
    assert resolve(outpainted, TinyResolver()).request.size == (928, 600)  # the image and its new borders


@pytest.fixture
def runs(monkeypatch):
    """Every job handed to Runner.run in this process: the job, the runner, and what its models ran with (offloaded
    to which device, the fast path in force, the UNet's convolutions in channels-last layout)."""
    import torch

    from sdxl_control.jobs.runner import Runner

    seen: list[dict] = []
    real = Runner.run

    def spy(self, job, **kwargs):
        result = real(self, job, **kwargs)
        gen = self._generator
        conv = next(m for m in gen.base.unet.modules() if isinstance(m, torch.nn.Conv2d))
        seen.append({"job": job, "runner": self, "offload": gen._offload,
                     "fast": None if gen._fast is None else gen._fast.fast,
                     "channels_last": conv.weight.is_contiguous(memory_format=torch.channels_last)
                     and not conv.weight.is_contiguous()})  # fmt: skip
        return result

    monkeypatch.setattr(Runner, "run", spy)
    return seen


def _as_line(job) -> str:
    from sdxl_control.jobs.job_file import job_line

    line = job_line(job.request, *job.models, weight_storage=job.weight_storage, fast=job.fast, offload=job.offload)
    return json.dumps({**line, "keep": job.keep}, sort_keys=True)


def test_cli_page_batch_and_ray_hand_the_same_job_to_the_runner_which_offloads_and_takes_the_fast_path(
    tiny, tmp_path, runs
):
    """The same request with offloading and the fast path asked for, from each front-end: each hands one Runner the
    same resolved job, and the Runner applies both (offloaded to the CPU, channels-last layout without fused
    projections, which cannot follow offloading)."""
    from sdxl_control.jobs.batch import read_jobs
    from sdxl_control.jobs.ray_batch import RayWorker
    from sdxl_control.jobs.runner import Runner
    from sdxl_control.protocol.fast import FastPath
    from sdxl_control.ui import PageForm, UiConfig

    numbers = {"seed": 5, "steps": 2, "guidance": 4.0}
    cli = ["generate", PROMPT, "--size", "64x64", "--tiny", "-q", "--fast", "layout", "--offload",
           "-o", str(tmp_path / "cli.png"), *[x for k, v in numbers.items() for x in (f"--{k}", str(v))]]  # fmt: skip
    assert main(cli) == 0
    page = PageForm(PROMPT, width=64, height=64, random_seed=False, offload=True, fast="layout", **numbers)
    _page_generate(UiConfig(resolver=TinyResolver(), outputs=tmp_path), page)
    job = {"id": "job", "prompt": PROMPT, "size": [64, 64], **numbers, "models": {"fast": "layout", "offload": True}}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
    assert main(["batch", str(tmp_path / "jobs.jsonl"), "-o", str(tmp_path / "out"), "--tiny", "-q"]) == 0
    (parsed,), problems = read_jobs(tmp_path / "jobs.jsonl", resolver=TinyResolver())
    assert not problems
    # What each Ray actor runs (here in this process, as the actor would): a BatchWorker reading the job again.
    assert RayWorker(str(tmp_path / "ray"), "cpu", None, "names").run(parsed)["error"] is None

    assert len(runs) == 4 and all(type(r["runner"]) is Runner for r in runs)
    lines = [_as_line(r["job"]) for r in runs]
    assert lines[0] == lines[1] == lines[2] == lines[3]
    models = json.loads(lines[0])["models"]
    assert (models["fast"], models["offload"]) == ("layout", True)
    for r in runs:
        assert str(r["offload"]) == "cpu"
        assert r["fast"] == FastPath(compile="off", fuse_qkv=False) and r["channels_last"]


def test_a_page_and_a_batch_without_offload_or_fast_path_run_the_plain_models(tiny, tmp_path, runs):
    """The settings' absence reaches the Runner too: nothing offloaded, no fast path, the layout untouched (the test
    above can tell them apart)."""
    from sdxl_control.ui import PageForm, UiConfig

    page = PageForm(PROMPT, width=64, height=64, steps=2, random_seed=False, seed=1)
    _page_generate(UiConfig(resolver=TinyResolver(), outputs=tmp_path), page)
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": PROMPT, "size": [64, 64], "steps": 2}) + "\n")
    assert main(["batch", str(tmp_path / "jobs.jsonl"), "-o", str(tmp_path / "out"), "--tiny", "-q"]) == 0
    assert [(r["offload"], r["fast"], r["channels_last"]) for r in runs] == [(None, None, False)] * 2
    assert all((r["job"].fast, r["job"].offload) == (None, False) for r in runs)


def test_the_runner_reloads_only_when_models_or_weight_storage_change(tiny, monkeypatch):
    """Offloading and the fast path switch on the loaded models (and off again exactly); another weight storage, or
    other models, load again."""
    import torch

    from sdxl_control.jobs.runner import Runner
    from sdxl_control.passes.generator import Generator
    from sdxl_control.protocol.fast import FastPath

    loads: list[str] = []
    load = Generator.from_pretrained.__func__

    def counted(cls, base, refiner=None, **kwargs):
        loads.append(str(kwargs["device"]))
        return load(cls, base, refiner, **kwargs)

    monkeypatch.setattr(Generator, "from_pretrained", classmethod(counted))
    runner = Runner(device="cpu")

    def job(**models):
        return resolve(JobSpec("x", settings={"seed": 1, "steps": 2, "size": (64, 64)}, models=models), TinyResolver())

    plain = runner.run(job()).latents
    gen = runner.generator(job())
    fast = runner.run(job(offload=True, fast="layout")).latents
    assert runner._generator is gen and str(gen._offload) == "cpu"
    assert gen._fast.fast == FastPath(compile="off", fuse_qkv=False)
    again = runner.run(job()).latents
    assert runner._generator is gen and gen._offload is None and gen._fast is None
    torch.testing.assert_close(again, plain, rtol=0, atol=0)  # undone exactly
    torch.testing.assert_close(fast, plain)  # rounding only
    assert loads == ["cpu"]
    runner.run(job(weight_storage="fp8_e4m3fn"))
    assert runner._generator is not gen and runner._generator.weight_storage == "fp8_e4m3fn" and len(loads) == 2


def test_the_runner_says_missing_weights_and_refuses_a_fast_path_before_loading(tiny, tmp_path, monkeypatch):
    from sdxl_control.adapters.controlnet import ControlNet
    from sdxl_control.base.errors import MissingWeightsError
    from sdxl_control.jobs.runner import Runner
    from sdxl_control.passes.generator import Generator

    loads: list[object] = []
    monkeypatch.setattr(Generator, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    edges = _photo(tmp_path / "edges.jpg", 4)
    absent = ControlNet("nobody/no-such-controlnet", image=edges, preprocess="canny")
    job = resolve(JobSpec("x", conditions=(absent,), models={"base": str(tiny.base)}), HubResolver())
    with pytest.raises(MissingWeightsError, match="nobody/no-such-controlnet"):
        Runner(device="cpu").run(job)
    stored = resolve(JobSpec("x", models={"fast": "blocks", "weight_storage": "fp8_e4m3fn"}), TinyResolver())
    with pytest.raises(InvalidRequestError, match="fp8 weight storage"):
        Runner(device="cpu").run(stored)
    assert loads == []


@pytest.mark.parametrize(
    ("models", "named"),
    [({"fast": "warp"}, "models.fast"), ({"fast": ["layout"]}, "models.fast"), ({"offload": "yes"}, "models.offload")],
)
def test_a_jobs_fast_and_offload_are_checked_as_it_resolves(models, named):
    with pytest.raises(InvalidRequestError, match=named):
        resolve(JobSpec("x", models=models))


def test_a_dry_run_names_fast_and_offload_only_when_they_are_set(capsys):
    args = ["generate", "x", "--dry-run", "--seed", "1"]
    assert main(args) == 0
    assert set(json.loads(capsys.readouterr().out)["models"]) == {"base", "refiner", "unet"}
    assert main([*args, "--fast", "layout", "--offload"]) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    assert (models["fast"], models["offload"]) == ("layout", True)
    assert main([*args, "--fast", "off"]) == 0
    assert "fast" not in json.loads(capsys.readouterr().out)["models"]


def _cli_spec(argv):
    """The JobSpec the command line makes of ``argv`` (``generate`` and its flags), with nothing resolved."""
    from sdxl_control.cli import build_parser
    from sdxl_control.cli.generate import job_spec

    spec, _ = job_spec(build_parser().parse_args(["generate", *argv]), HubResolver())
    return spec


def test_the_cli_and_the_page_fill_the_same_slots_and_resolve_the_same_conditions(tmp_path):
    """Structure (a ready depth map with its strength and window), style, two LoRAs with their weights and a PuLID
    face: the command line's flags and the page's fields both become input slots and options only (no hand-built
    condition), and resolve() builds the same conditions from them, in the registry's order."""
    from sdxl_control.ui import PageForm, UiConfig, form_spec

    face, style, depth = (_photo(tmp_path / f"{n}.png", i) for i, n in enumerate(("me", "look", "depth")))
    loras = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    for lora in loras:  # resolve() checks the files are there; nothing reads them
        open(lora, "wb").close()
    cli = _cli_spec(["x", "--seed", "3", "--face", face, "--identity", "pulid", "--face-scale", "0.7", "--style", style,
                     "--style-scale", "0.5", "--depth-map", depth, "--depth-scale", "0.6", "--depth-window", "0.2:0.9",
                     "--lora", f"{loras[0]}:0.5", "--lora", f"{loras[1]}:0.25"])  # fmt: skip
    form = PageForm("x", seed=3, random_seed=False, faces=[face], identity="pulid", identity_scale=0.7, style=style,
                    style_scale=0.5, style_layers="style", structure=depth, structure_kind="depth",
                    structure_is_map=True, structure_scale=0.6, structure_start=0.2, structure_end=0.9, loras=loras,
                    lora_weights="0.5, 0.25")  # fmt: skip
    page = form_spec(form, UiConfig(outputs=tmp_path), seed=3)
    assert cli.conditions == page.conditions == ()  # neither front-end builds a condition itself
    assert cli.inputs == page.inputs == {"face": [face], "style": [style], "depth": [depth], "lora": loras}
    from_cli, from_page = resolve(cli).request.conditions, resolve(page).request.conditions
    assert from_cli == from_page
    assert [c.kind for c in from_cli] == ["lora", "lora", "controlnet", "ip-adapter", "pulid"]
    (a, b, control, look, pulid) = from_cli
    assert (a.scale, b.scale, control.preprocess, control.scale) == (0.5, 0.25, None, 0.6)
    assert (control.window.start, control.window.end) == (0.2, 0.9)
    assert control.model == STRUCTURE_CONTROLS["depth"].model
    assert (look.variant, look.layers, look.scale, pulid.scale) == ("sdxl", "style", 0.5, 0.7)


def test_a_slot_left_at_its_defaults_builds_its_familys_condition_as_the_cli_always_did(tmp_path):
    """The slots' defaults are the families' (the class's fields, under the slot's own): what the command line's
    --style, --reference, --edges, --union, --lora and --face made before the slots, written here with the classes."""
    from sdxl_control.adapters.controlnet import ControlNet, ControlNetUnion
    from sdxl_control.adapters.ip_adapter import IPAdapter
    from sdxl_control.adapters.lora import LoRA
    from sdxl_control.base.defaults import DEFAULT_IDENTITY, DEFAULT_UNION
    from sdxl_control.jobs.slots import slot_conditions

    photo = _photo(tmp_path / "p.png", 0)
    edges = STRUCTURE_CONTROLS["edges"]
    assert slot_conditions({"style": [photo]}, {}) == [IPAdapter.style([photo], scale=0.8)]
    assert slot_conditions({"reference": [photo]}, {}) == [IPAdapter("plus", [photo], scale=0.6)]
    assert slot_conditions({"edges": photo}, {}) == [ControlNet(edges.model, image=photo, preprocess="canny")]
    assert slot_conditions({"edges": [photo]}, {"edges.map": True}) == [ControlNet(edges.model, image=photo)]
    union = slot_conditions({"edges": [photo], "pose": [photo]}, {"union.scale": 0.5, "pose.map": True})
    assert union == [ControlNetUnion(DEFAULT_UNION, canny=photo, pose=photo, preprocess=("canny",), scale=0.5)]
    assert slot_conditions({"face": [photo]}, {}) == [condition_class(DEFAULT_IDENTITY)(faces=[photo])]
    three = slot_conditions({"lora": ["a", "b", "c"]}, {"lora.scale": [0.5, None]})
    assert three == [LoRA("a", scale=0.5), LoRA("b"), LoRA("c")]  # None: the LoRA's own weight; the last repeats
    assert adapters.input_slots()["face"][0] == DEFAULT_IDENTITY  # the default method declares the shared slot


@pytest.mark.parametrize(
    ("inputs", "options", "message"),
    [
        ({"sktech": ["p.png"]}, {}, "'sktech' names no slot, and the job names no 'preset'"),
        ({}, {"edges.scale": 0.5}, "edges.scale: options of the edges input, which is not given"),
        ({"edges": ["p.png", "q.png"]}, {}, "the edges input takes one file, got 2"),
        ({"face": ["p.png"]}, {"face.kind": "controlnet"}, "face.kind is one of faceid, instantid, pulid, photomaker"),
        ({"style": ["p.png"]}, {"style.scael": 0.5}, "'scael' (did you mean 'scale'?)"),
        ({"edges": ["p.png"]}, {"edges.map": "yes"}, "edges.map is true or false, got 'yes'"),
        ({"edges": ["p.png"]}, {"union.model": "m", "edges.scale": 0.5}, "edges.scale: with the union on"),
        ({}, {"union.scale": 0.5}, "the union input: it drives the structure inputs through one model"),
    ],
)
def test_slot_inputs_and_options_are_checked_and_name_what_is_wrong(inputs, options, message):
    from sdxl_control.base.errors import ConditionError

    with pytest.raises((InvalidRequestError, ConditionError), match=re.escape(message)) as raised:
        resolve(JobSpec("x", inputs=inputs, set=options))
    assert raised.value.exit_code == 2


def test_a_preset_takes_its_own_inputs_and_settings_and_the_slots_the_rest(tmp_path):
    """Beside a preset, its inputs and templates win (``face.scale`` changes its PuLID template) and the other names
    fill the families' slots (``edges`` adds a ControlNet as the command line's --edges does)."""
    face, edges = _photo(tmp_path / "me.jpg", 0), _photo(tmp_path / "edges.jpg", 1)
    spec = JobSpec("x", preset="portrait", inputs={"face": [face], "edges": [edges]},
                   set={"face.scale": 0.6, "edges.scale": 0.3, "steps": 5})  # fmt: skip
    job = resolve(spec)
    pulid, control = job.request.conditions
    assert (pulid.kind, pulid.scale, control.kind, control.scale, job.request.steps) == ("pulid", 0.6, "controlnet",
                                                                                         0.3, 5)  # fmt: skip
    from_cli = _cli_spec(["x", "--preset", "portrait", "--face", face, "--set", "face.scale=0.6", "--set", "steps=5",
                          "--edges", edges, "--edges-scale", "0.3"])  # fmt: skip
    assert resolve(from_cli).request.conditions == job.request.conditions
    with pytest.raises(InvalidRequestError, match="preset portrait has unknown input"):
        resolve(JobSpec("x", preset="portrait", inputs={"face": [face], "fcae": [face]}))


def test_a_job_line_fills_slots_with_files_beside_the_job_file(tmp_path):
    from sdxl_control.jobs.batch import read_jobs

    _photo(tmp_path / "edges.png", 2)
    (tmp_path / "style.safetensors").write_bytes(b"")  # checked to be there, not read
    line = {"prompt": "x", "inputs": {"edges": "edges.png", "lora": ["style.safetensors"]},
            "set": {"edges.scale": 0.5, "lora.scale": 0.7}}  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text(json.dumps(line) + "\n")
    (job,), problems = read_jobs(tmp_path / "jobs.jsonl")
    assert not problems
    lora, control = job.request.conditions
    assert (lora.source, lora.scale) == (str(tmp_path / "style.safetensors"), 0.7)
    assert (control.image, control.scale) == (str(tmp_path / "edges.png"), 0.5)


def test_a_family_registered_with_a_slot_needs_no_front_end_code(tiny, tmp_path, monkeypatch, capsys):
    """A family declared only in the registry with an input slot (a sketch ControlNet: ControlNet's class, its own
    model, ready maps, a flag for its strength): the command line gets --sketch and --sketch-scale, a job fills it by
    name, and resolve() builds it from either alike; its photo is checked as an image before anything loads."""
    from sdxl_control.adapters import Slot
    from sdxl_control.adapters.controlnet import ControlNet

    slot = Slot("sketch", "a sketch to follow", "image", fields={"model": "me/sketch-controlnet"},
                flags=(Flag("sketch-scale", "scale", "the sketch's strength", "number"),))  # fmt: skip
    monkeypatch.setitem(adapters.CONDITION_KINDS, "sketch", Family("controlnet", "ControlNet", slots=(slot,)))
    sketch = _photo(tmp_path / "sketch.png", 7)
    assert main(["generate", "x", "--seed", "1", "--sketch", sketch, "--sketch-scale", "0.4", "--dry-run"]) == 0
    (recorded,) = json.loads(capsys.readouterr().out)["conditions"]
    assert (recorded["kind"], recorded["model"], recorded["scale"]) == ("controlnet", "me/sketch-controlnet", 0.4)
    built = resolve(JobSpec("x", inputs={"sketch": [sketch]}, set={"sketch.scale": 0.4})).request.conditions
    assert built == resolve(_cli_spec(["x", "--sketch", sketch, "--sketch-scale", "0.4"])).request.conditions
    assert built == (ControlNet("me/sketch-controlnet", image=sketch, scale=0.4),)
    from sdxl_control.ui import PageForm, UiConfig, form_spec

    more = json.dumps({"inputs": {"sketch": [sketch]}, "set": {"sketch.scale": 0.4}})  # the page's More inputs
    page = form_spec(PageForm("x", more_inputs=more), UiConfig(outputs=tmp_path), seed=1)
    assert resolve(page).request.conditions == built
    (tmp_path / "not.png").write_text("text")
    assert main(["generate", "x", "--sketch", str(tmp_path / "not.png"), "--dry-run"]) == 3
    assert main(["generate", "x", "--sketch-scale", "0.4", "--dry-run"]) == 2
    assert "--sketch-scale: options of --sketch, which is not given" in capsys.readouterr().err


def test_the_pages_more_inputs_fill_any_slot_and_are_checked(tmp_path):
    """The page's More inputs field (JSON, a job line's inputs and set) fills a slot the page has no field for, as the
    command line's flags do; a slot its own fields fill, or text that is not the expected JSON, is refused by name."""
    from sdxl_control.ui import PageForm, UiConfig, form_spec

    ref = _photo(tmp_path / "ref.png", 8)
    config = UiConfig(outputs=tmp_path)
    more = json.dumps(
        {"inputs": {"reference": [ref]}, "set": {"reference.scale": 0.3, "reference.variant": "plus-face"}}
    )
    page = resolve(form_spec(PageForm("x", more_inputs=more), config, seed=1)).request.conditions
    cli = resolve(_cli_spec(["x", "--reference", ref, "--reference-scale", "0.3", "--reference-variant", "plus-face"]))
    assert page == cli.request.conditions and page[0].variant == "plus-face"
    taken = json.dumps({"inputs": {"style": [ref]}})
    for text, message in [("{", "More inputs: not JSON"), ('{"input": {}}', "an object of 'inputs' and 'set'"),
                          (taken, "style is filled by the page's own field")]:  # fmt: skip
        with pytest.raises(InvalidRequestError, match=re.escape(message)):
            form_spec(PageForm("x", style=ref, more_inputs=text), config, seed=1)


def test_a_flag_filling_a_presets_input_leaves_its_template_to_the_preset(tmp_path, capsys):
    """--pose beside the portrait preset fills the preset's pose input: its template sets the ControlNet up (scale 0.4;
    --set pose.scale changes it), --pose-scale does not reach it, and a ready map there is refused with the way to
    give one."""
    face, pose = _photo(tmp_path / "me.jpg", 0), _photo(tmp_path / "pose.png", 1)
    base = ["generate", "x", "--seed", "1", "--preset", "portrait", "--face", face, "--dry-run"]
    assert main([*base, "--pose", pose, "--pose-scale", "0.2"]) == 0
    assert [c["scale"] for c in json.loads(capsys.readouterr().out)["conditions"]] == [0.8, 0.4]
    assert main([*base, "--pose", pose, "--set", "pose.scale=0.2"]) == 0
    assert [c["scale"] for c in json.loads(capsys.readouterr().out)["conditions"]] == [0.8, 0.2]
    assert main([*base, "--pose-map", pose]) == 2
    assert "--pose MAP --set pose.preprocess=null" in capsys.readouterr().err


def test_an_empty_prompt_is_a_prompt_and_none_is_refused(tiny):
    """``""`` is the empty prompt (an unconditional image, as A1111's API and ComfyUI make one); no prompt at all,
    without a recipe, is refused naming what to give."""
    from sdxl_control.jobs.resolvers import TinyResolver

    assert resolve(JobSpec("", settings={"steps": 2}), TinyResolver()).request.prompt == ""
    with pytest.raises(InvalidRequestError, match="a prompt is required"):
        resolve(JobSpec(None), TinyResolver())
