"""Every Python block of the README and of the documentation pages (``docs/**/*.md``) runs offline, as printed, on the tiny stand-ins: what ``--tiny`` is to the README's
commands (``tests/test_readme_tiny.py``), ``TinyResolver`` is here. The models a block names (hub ids for the stages,
the UNet checkpoints, every condition's models and face packs, the batch's jobs) are swapped for the tiny ones where
the block hands them to the library, and images are made at the tiny models' scale (``--tiny``'s rule); the block's own
text is not changed, and each block runs alone in a namespace of its own: it imports and makes everything it uses.
The files it reads are made here (random pictures, a tiny LoRA, a job file). No ``../shared`` is needed."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_control import Generator
from sdxl_control.base.defaults import DEFAULT_BASE
from sdxl_control.jobs.resolvers import TinyResolver
from sdxl_control.testing.lora import write_tiny_lora

from .test_readme_tiny import check_pngs, code_blocks

# (where, text): the first page that shows each block, and its number there.
BLOCKS = code_blocks("python")
# What a block needs that no tiny stand-in gives, and where it is shown instead.
ELSEWHERE = {
    "gradio_client": "the page's HTTP API: tests/test_ui.py calls it with gradio_client on a running page",
    'set_offload("cuda")': "offload to a GPU: this machine has none (tests/test_bad_inputs.py refuses it as set)",
    'weight_storage="fp8_matmul"': "fp8 matmuls need a GPU of compute capability 8.9+: tests/test_weight_storage.py "
    "runs torchao's float8 layers on the CPU with its GPU check lifted",
    "openai.OpenAI(": "a running sdxl-control serve: tests/test_serve_openai.py drives one with the openai package",
}


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route what a block hands to the library through ``TinyResolver``, as ``--tiny`` does for a command."""
    import sdxl_control.adapters.instantid as instantid
    import sdxl_control.jobs.batch as batch
    import sdxl_control.preprocessors.face as face

    resolver = TinyResolver()
    loaded = Generator.from_pretrained.__func__  # type: ignore[attr-defined]
    run = Generator.run

    def from_pretrained(cls, base=None, refiner=None, *, unet=None, **kwargs):  # type: ignore[no-untyped-def]
        base, refiner, unet = resolver.stages(base or DEFAULT_BASE, refiner, unet)
        return loaded(cls, base, refiner, unet=unet, device="cpu")

    def tiny_run(self, request, **kwargs):  # type: ignore[no-untyped-def]
        conditions = tuple(resolver.condition(c) for c in request.conditions)
        # The size --tiny runs the block's size at (a preset's 896x1152 as 112x144).
        request = dataclasses.replace(request, conditions=conditions, decoder=resolver.decoder(request.decoder),
                                      size=resolver.fit_size(request.size))  # fmt: skip
        return run(self, request, progress_bar=False, **{k: v for k, v in kwargs.items() if k != "progress_bar"})

    monkeypatch.setattr(Generator, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(Generator, "run", tiny_run)
    monkeypatch.setattr(batch, "read_jobs", functools.partial(batch.read_jobs, resolver=resolver))
    saved = face.save_identity

    def save_identity(*args, face_pack="antelopev2", **kwargs):  # type: ignore[no-untyped-def]
        return saved(*args, face_pack=resolver.face_pack(face_pack), **kwargs)

    # Where the README imports it from, and where it is defined.
    monkeypatch.setattr(instantid, "save_identity", save_identity)
    monkeypatch.setattr(face, "save_identity", save_identity)


def _files(block: str, folder: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    """The pictures, LoRA and job file a block reads, made in ``folder``."""
    for i, name in enumerate(sorted(set(re.findall(r'"([\w.-]+\.(?:jpg|png))"', block)))):
        if "mask" in name or name.startswith(("left", "right")):
            mask = np.zeros((96, 96), np.uint8)
            mask[:, :48] = 255 if name.startswith("left") else 0
            mask[:, 48:] = 255 if name.startswith("right") else 0
            Image.fromarray(mask).save(folder / name)
        else:
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 80, 3), np.uint8)).save(folder / name)
    if '"style.safetensors"' in block:
        write_tiny_lora(folder / "style.safetensors", tiny.base, "kohya", seed=1)
    jobs = [{"id": "fox", "prompt": "a red fox", "seed": 1, "steps": 2, "size": [64, 64]},
            {"id": "draft", "prompt": "a lighthouse", "preset": "draft", "size": [64, 64]}]  # fmt: skip
    (folder / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[where for where, _ in BLOCKS])
def test_the_readme_python_block_runs_offline(index, tiny, tmp_path, monkeypatch):
    where, block = BLOCKS[index]
    reason = next((why for marker, why in ELSEWHERE.items() if marker in block), None)
    if reason is not None:
        pytest.skip(reason)
    _offline(monkeypatch)
    _files(block, tmp_path, tiny)
    monkeypatch.chdir(tmp_path)
    # Nothing from other blocks: a reader who copies this one block alone runs it as it is.
    namespace: dict = {}
    exec(compile(block, f"{where} (python)", "exec"), namespace)
    if "save(" in block:
        saved = re.findall(r'save\("([\w.-]+\.png)"\)', block)
        assert saved and all(Image.open(tmp_path / name).size[0] >= 64 for name in saved)
    check_pngs(tmp_path)  # no image black, no PNG naming this machine's home, caches or this folder
    if "run_batch(" in block:
        assert namespace["summary"].done == 2 and not namespace["problems"]


def test_every_python_block_is_run_or_said_where_it_is_shown():
    """A new block runs here by default; one that cannot names where it is tested."""
    assert len(BLOCKS) >= 15
    skipped = [b for _, b in BLOCKS if any(marker in b for marker in ELSEWHERE)]
    assert len(skipped) == len(ELSEWHERE)
