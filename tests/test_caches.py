"""The process caches under one policy: bounded, emptied by ``clear_caches()``, and emptied when the page or a batch
worker switches model sets, so the models (ControlNets included) that the old set used are freed."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from PIL import Image

from sdxl_control import clear_caches
from sdxl_control.adapters.controlnet import ControlNet, load_controlnet
from sdxl_control.base.caches import KeyedCache, process_cached
from sdxl_control.passes.generator import LastLoaded
from sdxl_control.testing import tiny_control_models, tiny_models


def test_keyed_caches_keep_their_last_entries_and_clear_with_the_rest():
    built = []
    cache: KeyedCache[int] = KeyedCache("numbers", size=2)
    for key in (1, 2, 1, 3, 1):
        cache.get(key, lambda key=key: built.append(key) or key)
    assert built == [1, 2, 3] and len(cache) == 2  # 2 went first: 1 was used after it

    @process_cached(2)
    def double(x: int) -> int:
        built.append(-x)
        return 2 * x

    assert double(4) == double(4) == 8 and built.count(-4) == 1
    clear_caches()
    assert len(cache) == 0
    double(4)
    assert built.count(-4) == 2


def _last_loaded():
    return LastLoaded(device="cpu").get


def _runner():
    """What the page and batch workers hold: a Runner, given jobs on one set of models, then the other."""
    from sdxl_control.jobs.runner import Runner
    from sdxl_control.jobs.spec import JobSpec, resolve

    runner = Runner(device="cpu")
    return lambda base: runner.generator(resolve(JobSpec("a cat", models={"base": base})))


@pytest.mark.parametrize("holder", [_last_loaded, _runner], ids=["LastLoaded", "Runner"])
def test_switching_model_sets_frees_the_old_models_and_their_controlnets(tmp_path, holder):
    sets = [tiny_models(seed=0), tiny_models(seed=1)]
    edges = tiny_control_models("controlnet-edges")
    photo = tmp_path / "edges.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    condition = ControlNet(str(edges), image=str(photo), scale=0.7)
    get = holder()
    held: list[weakref.ref] = []
    for switch in range(6):  # each set three times, alternating
        generator = get(str(sets[switch % 2].base))
        generator.generate("a cat", conditions=[condition], steps=2, size=(64, 64), seed=1, progress_bar=False)
        controlnet = load_controlnet(str(edges), union=False, unet=generator.base.unet)  # the cached one
        current = [weakref.ref(generator.base.unet), weakref.ref(generator.base.vae), weakref.ref(controlnet)]
        del generator, controlnet
        gc.collect()
        assert all(ref() is None for ref in held), f"switch {switch}: an earlier set's model is still alive"
        assert all(ref() is not None for ref in current)
        held = current
