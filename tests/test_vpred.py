"""v-prediction / zero-terminal-SNR SDXL checkpoints (issue 36, part 5): a single file marked as NoobAI-XL v-pred
marks itself (top-level ``v_pred`` and ``ztsnr`` keys, read as ComfyUI a125cd84's ``comfy/supported_models.py``
``SDXL.model_type`` reads them) makes diffusers' pixels with ``prediction_type="v_prediction"``,
``rescale_betas_zero_snr=True``, ``timestep_spacing="trailing"`` and ``guidance_rescale``; a file without the keys
reads as before; a request overrides either, with a warning against the model's own; what cannot run is refused by
name before a step runs; the recipe re-makes its pixels, and a recipe of 0.2 (which did not read the keys) its own.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl_control import GenerationRequest, Generator, IncompatibleModelError, InvalidRequestError
from sdxl_control.engine.models import load_stage
from sdxl_control.protocol.conditions import Stage
from sdxl_control.protocol.prediction import checkpoint_prediction, zero_snr_schedulers
from sdxl_control.testing.single_file import write_single_file
from sdxl_control.testing.tiny import write_tiny_base

from .conftest import as_reference

PROMPT = "a fox in the snow, anime style"
RUN = dict(steps=4, guidance=6.0, size=(64, 64), seed=5, negative_prompt="lowres", progress_bar=False)
VPRED = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def _marked(plain, target, *marks):
    """``plain``'s tensors with the marker keys as ComfyUI writes them: empty top-level tensors."""
    state = load_file(str(plain))
    save_file({**state, **{m: torch.tensor([]) for m in marks}}, str(target))
    return target


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vpred")
    # SDXL's two text encoders differ in width: that is how a single file's encoders are told apart.
    folder = write_tiny_base(root / "base", seed=11, first_width=24)
    plain = write_single_file(folder, root / "plain.safetensors")
    return {
        "folder": folder,
        "plain": plain,
        "noob": _marked(plain, root / "noob_vpred_tiny.safetensors", "v_pred", "ztsnr"),
        "vonly": _marked(plain, root / "vonly.safetensors", "v_pred"),
    }


@pytest.fixture(scope="module")
def loaded(files):
    def load(name):
        return Generator.from_pretrained(files[name], device="cpu", base_config=files["folder"])

    return {name: load(name) for name in ("plain", "noob", "vonly")}


@pytest.fixture(scope="module")
def reference(files):
    """diffusers' own SDXL pipeline on the folder the files were written from, each call with a fresh scheduler."""
    from diffusers import StableDiffusionXLPipeline

    pipe = as_reference(StableDiffusionXLPipeline.from_pretrained(files["folder"]))
    published = dict(pipe.scheduler.config)

    @torch.no_grad()
    def run(scheduler_cls, rescale, **config):
        pipe.scheduler = scheduler_cls.from_config(published, **config)
        return _diffusers(pipe, rescale)

    return run


def _diffusers(pipe, rescale):
    out = pipe(
        PROMPT, negative_prompt=RUN["negative_prompt"], num_inference_steps=RUN["steps"], guidance_scale=RUN["guidance"],
        guidance_rescale=rescale, height=64, width=64, generator=torch.Generator().manual_seed(RUN["seed"]),
        output_type="latent",
    )  # fmt: skip
    latents = out.images
    pixels = pipe.image_processor.postprocess(pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample)
    return latents, pixels[0]


@pytest.mark.parametrize(
    ("keys", "config"),
    [
        ([], {}),
        (["v_pred"], {"prediction_type": "v_prediction"}),
        (["v_pred", "ztsnr"], VPRED),
        (["ztsnr"], {}),  # ComfyUI reads ztsnr only beside v_pred
    ],
    ids=["none", "v_pred", "v_pred+ztsnr", "ztsnr-alone"],
)
def test_the_marker_keys_as_comfyui_reads_them(keys, config):
    assert checkpoint_prediction(["model.diffusion_model.out.2.bias", *keys], "x.safetensors") == config


@pytest.mark.parametrize(
    ("keys", "named"),
    [(["edm_mean", "edm_std"], "'edm_mean' and 'edm_std'"), (["edm_vpred.sigma_max"], "'edm_vpred.sigma_max'")],
    ids=["playground-2.5", "edm-vpred"],
)
def test_an_edm_checkpoint_is_refused_by_its_key_before_it_loads(files, tmp_path, keys, named, monkeypatch):
    path = _marked(files["plain"], tmp_path / "edm.safetensors", *keys)
    from diffusers import StableDiffusionXLPipeline

    def never(*args, **kwargs):  # the header decides: nothing is converted
        raise AssertionError("loaded")

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", never)
    with pytest.raises(IncompatibleModelError, match=f"edm.safetensors carries {named}.*does not sample"):
        load_stage(path, Stage.BASE, device="cpu")


@pytest.mark.parametrize(
    ("scheduler", "cls_name"),
    [(None, "EulerDiscreteScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler"),
     ("euler_a", "EulerAncestralDiscreteScheduler")],
)  # fmt: skip
def test_a_marked_file_makes_diffusers_v_prediction_zero_snr_pixels_with_cfg_rescale(reference, loaded, scheduler,
                                                                                    cls_name):  # fmt: skip
    import diffusers

    ours = loaded["noob"].generate(PROMPT, scheduler=scheduler, guidance_rescale=0.7, **RUN)
    latents, pixels = reference(getattr(diffusers, cls_name), 0.7, **VPRED)
    torch.testing.assert_close(ours.latents, latents, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(ours.images[0], dtype=int) - np.asarray(pixels, dtype=int)).max() <= 1
    recipe = ours.images[0].recipe
    assert (recipe["prediction_type"], recipe["zero_terminal_snr"]) == ("v_prediction", True)
    assert recipe["scheduler"]["config"]["rescale_betas_zero_snr"] is True
    if scheduler is None:  # the epsilon reading of the same weights is another image: the keys decided it
        eps, _ = reference(getattr(diffusers, cls_name), 0.7)
        assert not torch.allclose(ours.latents, eps, atol=1e-3)


def test_v_pred_alone_keeps_the_schedule(reference, loaded):
    from diffusers import EulerDiscreteScheduler

    ours = loaded["vonly"].generate(PROMPT, **RUN)
    latents, _ = reference(EulerDiscreteScheduler, 0.0, prediction_type="v_prediction")
    torch.testing.assert_close(ours.latents, latents, rtol=1e-4, atol=1e-5)
    assert (ours.recipes[0]["prediction_type"], ours.recipes[0]["zero_terminal_snr"]) == ("v_prediction", False)


def test_a_file_without_the_keys_reads_as_before(files, loaded, reference):
    """No keys: the scheduler config diffusers' conversion gives, untouched, and the recipe without the new fields;
    the pixels are the model folder's (whose loading this part does not touch) and diffusers' epsilon pipeline's."""
    from diffusers import EulerDiscreteScheduler

    models = loaded["plain"].base
    assert models.marked == {}
    ours = loaded["plain"].generate(PROMPT, **RUN)
    folder = Generator.from_pretrained(files["folder"], device="cpu").generate(PROMPT, **RUN)
    assert torch.equal(ours.latents, folder.latents)
    latents, _ = reference(EulerDiscreteScheduler, 0.0)
    torch.testing.assert_close(ours.latents, latents, rtol=1e-4, atol=1e-5)
    assert not {"prediction_type", "zero_terminal_snr"} & ours.recipes[0].keys()
    assert ours.recipes[0]["scheduler"]["config"]["prediction_type"] == "epsilon"


def test_a_model_folder_keeps_its_scheduler_configs_prediction(files, reference, tmp_path):
    """A diffusers folder says its prediction type in scheduler/scheduler_config.json: respected as it is."""
    import json
    import shutil

    from diffusers import EulerDiscreteScheduler

    folder = shutil.copytree(files["folder"], tmp_path / "vpred-folder")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **VPRED}))
    ours = Generator.from_pretrained(folder, device="cpu").generate(PROMPT, guidance_rescale=0.5, **RUN)
    latents, _ = reference(EulerDiscreteScheduler, 0.5, **VPRED)
    torch.testing.assert_close(ours.latents, latents, rtol=1e-4, atol=1e-5)


def test_a_request_overrides_the_keys_with_a_stated_warning(loaded, caplog):
    """An override on a file without the keys reads it as the marked file (as ComfyUI's ModelSamplingDiscrete node
    forces it); against its own, a warning names the model and both values."""
    marked = loaded["noob"].generate(PROMPT, **RUN)
    with caplog.at_level(logging.WARNING, logger="sdxl_control.protocol.prediction"):
        forced = loaded["plain"].generate(PROMPT, prediction_type="v_prediction", zero_terminal_snr=True, **RUN)
    assert torch.equal(forced.latents, marked.latents)
    assert (
        "plain.safetensors: prediction_type 'v_prediction' overrides the model's own 'epsilon' (its scheduler config; "
        "no 'v_pred' key in its file); if it was not trained for 'v_prediction', the images will be noise"
    ) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdxl_control.protocol.prediction"):
        unmarked = loaded["noob"].generate(PROMPT, prediction_type="epsilon", zero_terminal_snr=False, **RUN)
    assert torch.equal(unmarked.latents, loaded["plain"].generate(PROMPT, **RUN).latents)
    assert (
        "noob_vpred_tiny.safetensors: prediction_type 'epsilon' overrides the model's own 'v_prediction' (a 'v_pred' "
        "key in its file)"
    ) in caplog.text
    assert unmarked.recipes[0]["prediction_type"] == "epsilon"  # given, so recorded


def test_the_recipe_re_makes_its_pixels(loaded):
    made = loaded["noob"].generate(PROMPT, guidance_rescale=0.3, **RUN)
    again = loaded["noob"].run(GenerationRequest.from_recipe(made.recipes[0]), progress_bar=False)
    assert torch.equal(made.latents, again.latents)
    # Recorded, so the same weights re-make it even from a file that lost its keys.
    copy = loaded["plain"].run(GenerationRequest.from_recipe(made.recipes[0]), progress_bar=False)
    assert torch.equal(made.latents, copy.latents)


def test_a_recipe_of_0_2_re_makes_what_0_2_made_and_of_0_3_reads_the_keys(loaded):
    """0.2 read every single file as epsilon with SDXL's schedule: its recipe of a marked file keeps that reading;
    a recipe of 0.3 without the fields (an epsilon reading not forced) reads the keys."""
    old = dict(loaded["plain"].generate(PROMPT, **RUN).recipes[0])  # what 0.2 recorded for the marked file
    old["models"] = {**old["models"], "base": {**old["models"]["base"], "name": "noob_vpred_tiny.safetensors"}}
    as_02 = GenerationRequest.from_recipe({**old, "version": "0.2.0"})
    assert (as_02.prediction_type, as_02.zero_terminal_snr) == ("epsilon", False)
    assert torch.equal(
        loaded["noob"].run(as_02, progress_bar=False).latents, loaded["plain"].generate(PROMPT, **RUN).latents
    )
    as_03 = GenerationRequest.from_recipe({**old, "version": "0.3.0"})
    assert (as_03.prediction_type, as_03.zero_terminal_snr) == (None, None)
    assert torch.equal(
        loaded["noob"].run(as_03, progress_bar=False).latents, loaded["noob"].generate(PROMPT, **RUN).latents
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prediction_type": "v"}, "prediction_type must be one of 'epsilon', 'v_prediction'"),
        ({"zero_terminal_snr": "yes"}, "zero_terminal_snr must be true or false"),
        ({"prediction_type": "epsilon", "zero_terminal_snr": True}, "zero_terminal_snr with prediction_type 'epsilon'"),
        ({"zero_terminal_snr": True, "scheduler": "heun"},
         r"scheduler 'heun' \(HeunDiscreteScheduler\) cannot sample on a zero-terminal-SNR schedule"),
        ({"prediction_type": "v_prediction", "refiner_only": True, "init_image": np.zeros((64, 64, 3), np.uint8)},
         "override the base model's; refiner_only runs the refiner alone"),
    ],
    ids=["unknown-type", "not-a-bool", "ztsnr-on-epsilon", "scheduler-without-ztsnr", "refiner-only"],
)  # fmt: skip
def test_bad_requests_are_refused_before_models_load(options, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerationRequest(PROMPT, **options)


@pytest.mark.parametrize("scheduler", ["heun", "KDPM2DiscreteScheduler", "LMSDiscreteScheduler"])
def test_a_scheduler_without_zero_snr_is_refused_for_a_ztsnr_file(loaded, scheduler, monkeypatch):
    """diffusers' from_config drops rescale_betas_zero_snr silently where a class lacks it: refused instead, with the
    schedulers that have it listed, before any step runs."""
    monkeypatch.setattr(type(loaded["noob"]), "_stage_inputs", lambda *a: pytest.fail("a step was prepared"))
    with pytest.raises(InvalidRequestError, match=f"{scheduler}.*cannot sample on a zero-terminal-SNR schedule.*euler"):
        loaded["noob"].generate(PROMPT, scheduler=scheduler, **RUN)
    assert "heun" not in zero_snr_schedulers() and {"euler", "euler_a", "dpmpp_2m", "ddim", "unipc"} <= set(
        zero_snr_schedulers()
    )
    # The same scheduler runs the file read without zero terminal SNR, as it asks.
    monkeypatch.undo()
    loaded["noob"].generate(PROMPT, scheduler=scheduler, zero_terminal_snr=False, **{**RUN, "steps": 2})


def test_zero_snr_on_an_epsilon_model_is_refused(loaded):
    with pytest.raises(
        InvalidRequestError, match="plain.safetensors: zero_terminal_snr with an epsilon-prediction model"
    ):
        loaded["plain"].generate(PROMPT, zero_terminal_snr=True, **RUN)


def test_cfg_rescale_is_diffusers_rescale_noise_cfg():
    """Our guidance with rescale φ (the CFGRescale term) is diffusers' CFG followed by rescale_noise_cfg, bit for bit."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    from sdxl_control.protocol.guidance import CFGRescale, ClassifierFreeGuidance, guided_step

    prediction = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for scale, phi in ((5.0, 0.7), (7.5, 1.0), (3.0, 0.2)):
        uncond, cond = prediction.chunk(2)
        theirs = rescale_noise_cfg(uncond + scale * (cond - uncond), cond, guidance_rescale=phi)
        assert torch.equal(guided_step(ClassifierFreeGuidance(scale), prediction, [CFGRescale(phi)]), theirs)
