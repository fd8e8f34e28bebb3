"""A LoRA set that consecutive jobs use stays applied between them in a Runner: applied once, the same images as a
direct Generator.run, taken out exactly when the set changes, a job fails or the Runner closes; restore copies of
patched weights are kept in CPU memory."""

from __future__ import annotations

import json

import pytest
import torch

from sdxl_control.adapters.lora import LoRA
from sdxl_control.jobs.resolvers import TinyResolver
from sdxl_control.jobs.runner import Runner
from sdxl_control.jobs.spec import JobSpec, resolve
from sdxl_control.protocol.conditions import Stage
from sdxl_control.testing.lora import write_tiny_lora
from sdxl_control.weights.patches import WeightPatch

SETTINGS = {"steps": 4, "size": (64, 64)}


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("resident-loras")
    return {
        "a": str(write_tiny_lora(root / "a.safetensors", tiny.base, "kohya", seed=11)),  # UNet and text encoder
        "b": str(write_tiny_lora(root / "b.safetensors", tiny.base, "peft", seed=12)),
    }


def job(*conditions, seed=1, **settings):
    return resolve(
        JobSpec("a watercolour fox", conditions=conditions, settings={**SETTINGS, "seed": seed, **settings}),
        TinyResolver(),
    )


def weights(gen):
    """Every parameter of both stages' UNets and text encoders, copied, with the parameter objects' ids."""
    modules = [
        m for stage in (gen.base, gen.refiner) if stage for m in (stage.unet, *(e.model for e in stage.text_encoders))
    ]
    return [({n: p.detach().clone() for n, p in m.named_parameters()}, {n: id(p) for n, p in m.named_parameters()})
            for m in modules]  # fmt: skip


def same_weights(a, b):
    return all(
        ids_a == ids_b and va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)
        for (va, ids_a), (vb, ids_b) in zip(a, b, strict=True)
    )


@pytest.fixture
def counts(monkeypatch):
    """How many times LoRAs are prepared (read and converted) and weight patches are made."""
    seen = {"prepare": 0, "patch": 0}
    prepare, patch_init = LoRA.prepare, WeightPatch.__init__

    def counted_prepare(self, ctx):
        seen["prepare"] += 1
        return prepare(self, ctx)

    def counted_patch(self, model, deltas):
        seen["patch"] += 1
        patch_init(self, model, deltas)

    monkeypatch.setattr(LoRA, "prepare", counted_prepare)
    monkeypatch.setattr(WeightPatch, "__init__", counted_patch)
    return seen


def test_five_jobs_with_one_lora_apply_it_once_make_the_direct_images_and_close_leaves_the_weights(loras, counts):
    runner = Runner(device="cpu")
    lora = LoRA(loras["a"], scale=0.8)
    jobs = [job(lora, seed=seed) for seed in range(5)]
    gen = runner.generator(jobs[0])
    before = weights(gen)
    direct = [gen.run(j.request, progress_bar=False).latents for j in jobs]  # no Runner: attached and detached per call
    assert same_weights(weights(gen), before)
    per_call = dict(counts)
    assert per_call == {"prepare": 5, "patch": 5 * 2}  # the UNet and the first text encoder, each call

    resident = []
    for j in jobs:
        resident.append(runner.run(j).latents)
        assert runner._kept.held() == [(Stage.BASE, lora.resident_key())]
        assert not same_weights(weights(gen), before)  # it stays applied between jobs
    assert counts["prepare"] - per_call["prepare"] == 1  # read and converted once
    assert counts["patch"] - per_call["patch"] == 2  # added once
    assert all(torch.equal(r, d) for r, d in zip(resident, direct, strict=True))
    assert not torch.equal(runner.run(job(seed=0)).latents, direct[0])  # the LoRA acts; none is kept now
    assert runner._kept.held() == [] and same_weights(weights(gen), before)
    runner.run(jobs[0])
    runner.close()
    assert runner._kept.held() == [] and same_weights(weights(gen), before)


def test_a_changed_set_replaces_the_kept_one_exactly(loras, counts):
    """Each job's images equal a direct run's whatever the Runner kept before; what it keeps follows the rules."""
    a, b = loras["a"], loras["b"]
    sequence = [
        ((LoRA(a, scale=0.8),), [0]),
        ((LoRA(a, scale=0.5),), [0]),  # another scale
        ((LoRA(b, scale=0.8),), [0]),  # another file
        ((), []),  # none
        ((LoRA(a, scale=0.8), LoRA(b, scale=0.6)), [0, 1]),
        ((LoRA(a, scale=0.8),), [0]),  # one of them taken out
        ((LoRA(a, window=(0.0, 0.5)),), []),  # a window: fused per call
        ((LoRA(a, scale=0.8), LoRA(b, window=(0.5, 1.0))), [0]),  # kept before a windowed one
        ((LoRA(b, window=(0.5, 1.0)), LoRA(a, scale=0.8)), []),  # after it: the order of the sums would change
        ((LoRA(a, scale=0.0), LoRA(b, scale=0.7)), [1]),  # scale 0 is absent
    ]
    runner = Runner(device="cpu")
    gen = runner.generator(job())
    before = weights(gen)
    direct = [gen.run(job(*conditions).request, progress_bar=False).latents for conditions, _ in sequence]
    assert same_weights(weights(gen), before)
    for (conditions, kept), expected in zip(sequence, direct, strict=True):
        latents = runner.run(job(*conditions)).latents
        assert torch.equal(latents, expected), conditions
        assert runner._kept.held() == [(Stage.BASE, conditions[i].resident_key()) for i in kept], conditions
        if not kept:
            assert same_weights(weights(gen), before), conditions
    assert len({tuple(d.flatten()[:8].tolist()) for d in direct}) >= 8  # the cases differ from each other
    runner.close()
    assert same_weights(weights(gen), before)


def test_the_refiner_and_an_edited_file_and_a_base_only_face_of_the_run(loras, tiny, tmp_path):
    """A run with a refiner keeps the base's LoRA (the refiner runs without it, as directly); a LoRA file written
    again under the same name is read again."""
    import shutil

    runner = Runner(device="cpu")
    path = tmp_path / "style.safetensors"
    shutil.copy(loras["a"], path)
    lora = LoRA(str(path), scale=0.9)
    refined = dict(refiner_switch=0.5)
    first = job(lora, **refined)
    gen = runner.generator(first)
    before = weights(gen)
    direct = gen.run(first.request, progress_bar=False).latents
    assert torch.equal(runner.run(first).latents, direct)
    assert torch.equal(runner.run(first).latents, direct)
    key = lora.resident_key()
    shutil.copy(loras["b"], path)  # the same name, other weights
    again = job(lora, **refined)
    assert lora.resident_key() != key
    runner.close()
    direct_b = gen.run(again.request, progress_bar=False).latents
    assert torch.equal(runner.run(again).latents, direct_b) and not torch.equal(direct_b, direct)
    runner.close()
    assert same_weights(weights(gen), before)


def test_a_failed_job_leaves_nothing_applied(loras, monkeypatch):
    runner = Runner(device="cpu")
    lora = LoRA(loras["a"], scale=0.8)
    gen = runner.generator(job(lora))
    before = weights(gen)
    runner.run(job(lora))
    assert runner._kept.held()

    def stop(event):
        if event.step == 2:
            raise RuntimeError("stopped at step 2")

    with pytest.raises(RuntimeError, match="step 2"):
        runner.run(job(lora), progress=stop)  # the same set, failing mid-denoise
    assert runner._kept.held() == [] and same_weights(weights(gen), before)

    # Applying a new set fails part way (at its second LoRA's UNet patch): the first comes off again.
    made = []
    patch_init = WeightPatch.__init__

    def failing(self, model, deltas):
        made.append(model)
        if sum(m is gen.base.unet for m in made) == 2:
            raise ValueError("no room")
        patch_init(self, model, deltas)

    monkeypatch.setattr(WeightPatch, "__init__", failing)
    with pytest.raises(Exception, match="no room"):
        runner.run(job(lora, LoRA(loras["b"], scale=0.5)))
    assert runner._kept.held() == [] and same_weights(weights(gen), before)


def test_handing_out_the_models_or_changing_settings_takes_the_kept_set_off(loras):
    runner = Runner(device="cpu")
    lora = LoRA(loras["a"], scale=0.8)
    gen = runner.generator(job(lora))
    before = weights(gen)
    runner.run(job(lora))
    assert runner.generator(job(lora)) is gen and same_weights(weights(gen), before)  # the caller runs them as it likes
    runner.run(job(lora))
    sped_up = resolve(JobSpec("a watercolour fox", conditions=(lora,), settings={**SETTINGS, "seed": 1},
                                models={"fast": "layout"}), TinyResolver())  # fmt: skip
    latents = runner.run(sped_up).latents  # the fast path: kept LoRAs off before, applied again after
    assert runner._kept.held() and torch.isfinite(latents).all()
    runner.close()
    assert same_weights(weights(gen), before)


def test_a_batch_keeps_one_runner_and_applies_its_lora_once(loras, tmp_path, counts):
    from sdxl_control.jobs.batch import read_jobs, run_batch

    folder = tmp_path / "jobs"
    folder.mkdir()
    lines = [{"id": f"j{i}", "prompt": "a fox", "seed": i, "steps": 2, "size": [64, 64],
              "conditions": [{"kind": "lora", "source": loras["a"], "scale": 0.8}]} for i in range(5)]  # fmt: skip
    (folder / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    jobs, problems = read_jobs(folder / "jobs.jsonl", resolver=TinyResolver())
    assert not problems
    summary = run_batch(jobs, tmp_path / "out", progress_bar=False)
    assert summary.done == 5 and counts["prepare"] == 1
    assert counts["patch"] == 2  # the UNet and the first text encoder, once


def test_restore_copies_are_kept_in_cpu_memory_and_restore_exactly(generator):
    import copy

    from sdxl_control.weights.patches import _SLOTS
    from sdxl_control.weights.storage import store_weights

    for storage in (None, "fp8_e4m3fn"):
        unet = copy.deepcopy(generator.base.unet)
        if storage:
            store_weights(unet, storage)
        name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        owner, parameter = unet.get_submodule(name.rpartition(".")[0]), unet.get_parameter(name)
        kept = parameter.detach().clone()
        patch = WeightPatch(unet, {name: torch.full(parameter.shape, 0.01)})
        saved = _SLOTS[owner]["weight"].saved
        assert saved.device.type == "cpu" and saved.dtype == parameter.dtype
        assert saved.untyped_storage().data_ptr() != parameter.untyped_storage().data_ptr()
        assert not torch.equal(parameter.float(), kept.float())
        patch.restore()
        assert torch.equal(parameter.view(torch.uint8), kept.view(torch.uint8)), storage


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_restore_copies_are_pinned_cpu_memory(generator):
    import copy

    from sdxl_control.weights.patches import _SLOTS

    unet = copy.deepcopy(generator.base.unet).to("cuda")
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    owner, parameter = unet.get_submodule(name.rpartition(".")[0]), unet.get_parameter(name)
    kept = parameter.detach().clone()
    patch = WeightPatch(unet, {name: torch.full(parameter.shape, 0.01, device="cuda")})
    saved = _SLOTS[owner]["weight"].saved
    assert saved.device.type == "cpu" and saved.is_pinned()
    patch.restore()
    assert torch.equal(parameter, kept)


def test_a_hires_job_runs_its_passes_on_the_kept_lora_and_makes_the_direct_images(loras, counts):
    """The hires fix runs a first pass and a second on the enlarged image: both find the LoRA kept."""
    runner = Runner(device="cpu")
    lora = LoRA(loras["a"], scale=0.8)
    hires = job(lora, hires_scale=1.5, hires_steps=2)
    gen = runner.generator(hires)
    before = weights(gen)
    direct = gen.run(hires.request, progress_bar=False).latents
    prepared = counts["prepare"]
    assert torch.equal(runner.run(hires).latents, direct) and torch.equal(runner.run(hires).latents, direct)
    assert counts["prepare"] - prepared == 1
    runner.close()
    assert same_weights(weights(gen), before)
