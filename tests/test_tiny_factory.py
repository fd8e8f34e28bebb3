"""The tiny-model factory: real layout, real tokenizer, deterministic weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from sdxl_control.presets import available_presets, load_preset
from sdxl_control.testing import clip_bpe, write_tiny_base


def test_layout_is_the_diffusers_pipeline_layout(tiny):
    index = json.loads((tiny.base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert any((tiny.base / component).glob("*.safetensors")), component
    refiner = json.loads((tiny.refiner / "model_index.json").read_text())
    assert refiner["requires_aesthetics_score"] is True and refiner["text_encoder"] == [None, None]


def test_tokenizer_is_real_clip():
    vocab, merges = clip_bpe()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_tokenizer_ids_match_published_clip(tiny):
    tok = CLIPTokenizer.from_pretrained(tiny.base / "tokenizer")
    # Ids of the published openai/clip-vit-large-patch14 tokenizer for this prompt.
    assert tok("a portrait of an astronaut, studio light").input_ids == [
        49406, 320, 5352, 539, 550, 18376, 267, 3155, 1395, 49407,
    ]  # fmt: skip
    tok2 = CLIPTokenizer.from_pretrained(tiny.base / "tokenizer_2")
    assert tok2("hi", padding="max_length", max_length=5).input_ids == [49406, 1883, 49407, 0, 0]  # pads with "!"


def test_same_seed_same_weights(tmp_path, tiny):
    write_tiny_base(tmp_path / "again", seed=0)
    a = load_file(tiny.base / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_presets_are_data():
    assert {"quality", "base_only", "lightning-4step"} <= set(available_presets())
    assert load_preset("quality").settings == {
        "steps": 30,
        "guidance": 5.0,
        "refiner_switch": 0.8,
        "scheduler": "euler",
    }
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("nope")


@pytest.mark.parametrize("size", [(512, 512), (800, 600), (300, 500), (64, 64)])
def test_the_stand_in_face_pack_finds_one_face_in_the_middle(size, tmp_path):
    """insightface's own code routes the stand-in detector as SCRFD and decodes one face: a square half the shorter
    side, centred, with landmarks on ArcFace's template (eyes above the nose above the mouth)."""
    from sdxl_control.preprocessors.face import FaceAnalyzer
    from sdxl_control.testing.faces import write_tiny_face_pack

    folder = write_tiny_face_pack(tmp_path / "models" / "antelopev2", "antelopev2")
    assert sorted(p.name for p in folder.iterdir()) == ["glintr100.onnx", "scrfd_10g_bnkps.onnx"]
    width, height = size
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    analyzer = FaceAnalyzer(str(folder), min_face=16)
    assert len(analyzer.faces(photo)) == 1
    face = analyzer.analyze(photo)
    side = min(width, height) / 2
    expected = (width / 2 - side / 2, height / 2 - side / 2, width / 2 + side / 2, height / 2 + side / 2)
    np.testing.assert_allclose(face.bbox, expected, atol=1.0)
    eyes, nose, mouth = face.landmarks[:2, 1].mean(), face.landmarks[2, 1], face.landmarks[3:, 1].mean()
    assert expected[1] < eyes < nose < mouth < expected[3]
    assert face.embedding.shape == (512,) and np.isfinite(face.embedding).all()


def test_a_tiny_folder_has_the_same_fingerprint_under_another_library_release(tmp_path, monkeypatch):
    """A recipe records a tiny folder by its fingerprint; a folder written under the next transformers and diffusers
    releases (their version stamped into each config.json) must be accepted as the same folder."""
    import diffusers.configuration_utils
    import transformers.configuration_utils

    from sdxl_control.base.files import fingerprint
    from sdxl_control.testing import tiny_control_models

    def ip_adapter_folder(cache: str) -> Path:
        monkeypatch.setenv("SDXL_CONTROL_CACHE", str(tmp_path / cache))
        return tiny_control_models("ip-adapter")

    today = ip_adapter_folder("today")
    monkeypatch.setattr(transformers.configuration_utils, "__version__", "99.0.0")
    monkeypatch.setattr(diffusers.configuration_utils, "__version__", "9.9.9")
    later = ip_adapter_folder("later")
    config = (later / "models" / "image_encoder" / "config.json").read_text()
    assert '"transformers_version": "5.24.0"' in config and "99.0.0" not in config
    assert fingerprint(later) == fingerprint(today)
    # The image encoder of the 0.1 golden recipe with FaceID, as it recorded it (tests/golden/recipes/faceid-refiner-0.1.png).
    assert fingerprint(later / "models" / "image_encoder") == "07f9aab8c516d68a"
    base = Path(later).parent / "base"
    assert '"_diffusers_version": "0.42.1"' in (base / "unet" / "config.json").read_text()
