"""PuLID equals a transcription of the reference (tests/reference_pulid.py) on tiny weights with the published key
names, on a tiny UNet with SDXL's 140 attention processors; real photos go through the real SCRFD detector."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_control import (
    ConditionError,
    GenerationRequest,
    Generator,
    IncompatibleModelError,
    InputError,
    MissingWeightsError,
)
from sdxl_control.adapters.controlnet import ControlNet
from sdxl_control.adapters.instantid import InstantID
from sdxl_control.adapters.ip_adapter import IPAdapter
from sdxl_control.adapters.lora import LoRA
from sdxl_control.adapters.pulid import IDEncoder, IDFormer, PuLID, read_pulid
from sdxl_control.base.model_refs import ModelRef
from sdxl_control.preprocessors.eva_clip import eva_face_features, load_eva_clip
from sdxl_control.preprocessors.face import Identity, save_identity
from sdxl_control.presets import load_preset
from sdxl_control.testing import tiny_models, write_tiny_controlnet
from sdxl_control.testing.instantid import write_tiny_instantid_repo
from sdxl_control.testing.ip_adapter import write_tiny_faceid_repo, write_tiny_ip_adapter_repo
from sdxl_control.testing.lora import write_tiny_lora
from sdxl_control.testing.pulid import write_pulid_checkpoint, write_tiny_pulid_models

from . import reference_pulid as ref

PROMPT = "a portrait, soft light"
SIZE = (64, 64)
# The reference encodes the negative prompt "" as diffusers does; read as A1111 reads prompts (the default) it would be
# zeros, as A1111 makes it for SDXL.
RUN = dict(steps=5, size=SIZE, seed=3, progress_bar=False, negative_prompt="", emphasis="off")
CLOSE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def sdxl_tiny(_isolated_cache):
    return tiny_models(seed=0, layout="sdxl")


@pytest.fixture(scope="module")
def gen(sdxl_tiny) -> Generator:
    return Generator.from_pretrained(sdxl_tiny.base, device="cpu")


@pytest.fixture(scope="module")
def models(gen, tmp_path_factory):
    return write_tiny_pulid_models(tmp_path_factory.mktemp("pulid"), gen.base.unet)


@pytest.fixture(scope="module")
def photos(photos_dir):
    return {name: photos_dir / f"{name}.jpg" for name in ("obama", "obama2", "biden", "two_people")}


@pytest.fixture(scope="module")
def reference_parts(models, insightface_root):
    """The reference's models on the same files: insightface's FaceAnalysis, facexlib's BiSeNet, the EVA copy."""
    from facexlib.parsing import init_parsing_model
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name="antelopev2", root=str(insightface_root), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    parser = init_parsing_model("bisenet", device="cpu", model_rootpath=str(models["parsing"]))
    eva = ref.EVAVisionTransformer.from_checkpoint(
        torch.load(models["eva"] / "EVA02_CLIP_L_336_psz14_s6B.pt", weights_only=True)
    )
    return app, parser, eva


def checkpoint(path):
    """The whole checkpoint, as the reference's ``load_pretrain`` reads it."""
    from safetensors.torch import load_file

    return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


def common(models, insightface_root):
    return dict(source=str(models["pulid"]), eva=str(models["eva"]), parsing=str(models["parsing"]),
                face_root=str(insightface_root))  # fmt: skip


def test_the_tiny_unet_numbers_its_layers_as_sdxl(gen, models):
    processors = list(gen.base.unet.attn_processors)
    assert len(processors) == 140 and all(n.endswith("attn2.processor") for n in processors[1::2])
    _, _, attention = read_pulid(models["pulid"] / "pulid_v1.bin")
    assert sorted({int(k.split(".")[0]) for k in attention}) == list(range(1, 140, 2))


def test_eva_features_equal_the_reference_eva(models):
    ours = load_eva_clip(models["eva"])
    theirs = ref.EVAVisionTransformer.from_checkpoint(
        torch.load(models["eva"] / "EVA02_CLIP_L_336_psz14_s6B.pt", weights_only=True)
    )
    image = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    cls, hidden = eva_face_features(ours, image)
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import normalize, resize

    x = normalize(resize(image, theirs.image_size, InterpolationMode.BICUBIC, antialias=False), ref.OPENAI_DATASET_MEAN,
                  ref.OPENAI_DATASET_STD)  # fmt: skip
    with torch.no_grad():
        their_cls, their_hidden = theirs(x)
    torch.testing.assert_close(cls, their_cls / their_cls.norm(2, 1, keepdim=True), **CLOSE)
    assert len(hidden) == 5
    for a, b in zip(hidden, their_hidden, strict=True):
        torch.testing.assert_close(a, b, **CLOSE)


@pytest.mark.parametrize("version", ["v1", "v1.1"])
def test_id_encoders_equal_the_reference(models, version):
    path = models["pulid"] / ("pulid_v1.bin" if version == "v1" else "pulid_v1.1.safetensors")
    found, state, _ = read_pulid(path)
    assert found == version
    ours = (IDEncoder if version == "v1" else IDFormer).fitting(state)
    ours.load_state_dict(state, strict=True)
    theirs = ref.encoder_from_checkpoint(checkpoint(path))
    g = torch.Generator().manual_seed(1)
    photos = 1 if version == "v1" else 2
    embeds = torch.randn(1, photos, 528, generator=g) if photos > 1 else torch.randn(1, 528, generator=g)
    hidden = [torch.randn(1, 17 * photos, 128, generator=g) for _ in range(5)]
    with torch.no_grad():
        torch.testing.assert_close(ours(embeds, hidden), theirs(embeds, hidden), rtol=1e-5, atol=1e-5)


MODES = [
    ("v1", {"mode": "fidelity"}, dict(num_zero=8, ortho_v2=True)),
    ("v1", {"mode": "style", "scale": 1.3}, dict(num_zero=16, ortho=True)),
    ("v1", {"zero_tokens": 0, "ortho": "off", "scale": 0.5}, dict(num_zero=0)),
    ("v1.1", {"mode": "fidelity"}, dict(num_zero=20, ortho_v2=True)),
]


@pytest.mark.parametrize(
    "version, options, processor", MODES, ids=["v1-fidelity", "v1-style", "v1-plain", "v1.1-fidelity"]
)
def test_one_photo_matches_the_reference(gen, sdxl_tiny, models, insightface_root, photos, reference_parts, version,
                                         options, processor):  # fmt: skip
    condition = PuLID(str(photos["obama"]), version=version, **options, **common(models, insightface_root))
    ours = gen.generate(PROMPT, conditions=[condition], **RUN)
    app, parser, eva = reference_parts
    features = ref.id_features(np.array(Image.open(photos["obama"]).convert("RGB")), app, parser, eva)
    path = models["pulid"] / ("pulid_v1.bin" if version == "v1" else "pulid_v1.1.safetensors")
    state = checkpoint(path)
    encoder = ref.encoder_from_checkpoint(state)
    if version == "v1":
        embedding = ref.v1_embedding(encoder, *features)
    else:
        embedding = torch.cat(ref.v11_embedding(encoder, [features]))
    pipe = ref.pulid_pipe(sdxl_tiny.base, state, **processor)
    with torch.no_grad():
        theirs = pipe(PROMPT, negative_prompt="", height=64, width=64, num_inference_steps=5, guidance_scale=5.0,
                      generator=torch.Generator().manual_seed(3), output_type="latent",
                      cross_attention_kwargs={"id_embedding": embedding, "id_scale": condition.scale}).images  # fmt: skip
    torch.testing.assert_close(ours.latents, theirs, **CLOSE)


@pytest.mark.parametrize("version, id_mix", [("v1", False), ("v1", True), ("v1.1", False)])
def test_several_photos_match_the_reference(gen, sdxl_tiny, models, insightface_root, photos, reference_parts, version,
                                            id_mix):  # fmt: skip
    names = ["obama", "obama2"]
    condition = PuLID(
        [str(photos[n]) for n in names], version=version, id_mix=id_mix, **common(models, insightface_root)
    )
    ours = gen.generate(PROMPT, conditions=[condition], **RUN)
    app, parser, eva = reference_parts
    features = [ref.id_features(np.array(Image.open(photos[n]).convert("RGB")), app, parser, eva) for n in names]
    path = models["pulid"] / ("pulid_v1.bin" if version == "v1" else "pulid_v1.1.safetensors")
    state = checkpoint(path)
    encoder = ref.encoder_from_checkpoint(state)
    if version == "v1":
        embedding = ref.v1_app([ref.v1_embedding(encoder, *f) for f in features], id_mix)
        processor = dict(num_zero=8, ortho_v2=True)
    else:
        embedding = torch.cat(ref.v11_embedding(encoder, features))
        processor = dict(num_zero=20, ortho_v2=True)
    pipe = ref.pulid_pipe(sdxl_tiny.base, state, **processor)
    with torch.no_grad():
        theirs = pipe(PROMPT, negative_prompt="", height=64, width=64, num_inference_steps=5, guidance_scale=5.0,
                      generator=torch.Generator().manual_seed(3), output_type="latent",
                      cross_attention_kwargs={"id_embedding": embedding, "id_scale": 0.8}).images  # fmt: skip
    torch.testing.assert_close(ours.latents, theirs, **CLOSE)


def test_without_guidance_only_the_conditional_tokens_act(gen, sdxl_tiny, models, insightface_root, photos,
                                                          reference_parts):  # fmt: skip
    """At guidance <= 1 the UNet batch is one image. The reference app still passes [uncond; cond] tokens, which the
    processor's view() fuses into one sequence of both (20 tokens, v1); we use the conditional tokens only, which is
    the reference's formula with the tokens it means to use. Both are computed here, and they differ."""
    condition = PuLID(str(photos["obama"]), version="v1", **common(models, insightface_root))
    ours = gen.generate(PROMPT, conditions=[condition], **{**RUN, "guidance": 1.0})
    app, parser, eva = reference_parts
    state = torch.load(models["pulid"] / "pulid_v1.bin", weights_only=True)
    pair = ref.v1_embedding(ref.encoder_from_checkpoint(state), *ref.id_features(
        np.array(Image.open(photos["obama"]).convert("RGB")), app, parser, eva))  # fmt: skip
    pipe = ref.pulid_pipe(sdxl_tiny.base, state, num_zero=8, ortho_v2=True)

    def run(embedding):
        with torch.no_grad():
            return pipe(PROMPT, negative_prompt="", height=64, width=64, num_inference_steps=5, guidance_scale=1.0,
                        generator=torch.Generator().manual_seed(3), output_type="latent",
                        cross_attention_kwargs={"id_embedding": embedding, "id_scale": 0.8}).images  # fmt: skip

    torch.testing.assert_close(ours.latents, run(pair[1:]), **CLOSE)
    assert not torch.allclose(run(pair), ours.latents, atol=1e-3)  # the app's fused tokens


def test_batches_of_images_equal_single_images(gen, models, insightface_root, photos):
    """The reference loops n_samples one image at a time (its processor's view() needs it); we batch."""
    condition = PuLID(str(photos["obama"]), version="v1.1", **common(models, insightface_root))
    both = gen.generate(PROMPT, conditions=[condition], **{**RUN, "num_images": 2})
    second = gen.generate(PROMPT, conditions=[condition], **{**RUN, "seed": RUN["seed"] + 1})
    torch.testing.assert_close(both.latents[1:], second.latents, **CLOSE)


def test_identity_file_keeps_the_person(gen, models, insightface_root, photos, tmp_path):
    c = common(models, insightface_root)
    direct = gen.generate(PROMPT, conditions=[PuLID(str(photos["obama"]), version="v1", **c)], **RUN)
    saved = save_identity(tmp_path / "me.safetensors", [str(photos["obama"])], face_root=insightface_root, pulid=True,
                          eva=models["eva"], parsing=models["parsing"])  # fmt: skip
    assert saved.eva_cls.shape == (1, 16) and saved.eva_hidden.shape == (1, 5, 17, 128)
    loaded = Identity.load(tmp_path / "me.safetensors")
    assert np.array_equal(loaded.eva_hidden, saved.eva_hidden) and loaded.keypoints.shape == (5, 2)
    keep = {k: v for k, v in c.items() if k == "source"}
    from_file = gen.generate(PROMPT, conditions=[PuLID(identity=str(tmp_path / "me.safetensors"), version="v1", **keep)],
                             **RUN)  # fmt: skip
    assert torch.equal(from_file.latents, direct.latents)
    # The same file serves InstantID (its embeddings and keypoints); one saved without PuLID's features is refused.
    save_identity(tmp_path / "plain.safetensors", [str(photos["obama"])], face_root=insightface_root)
    with pytest.raises(ConditionError, match="holds no EVA-CLIP face features.*pulid=True"):
        gen.generate(PROMPT, conditions=[PuLID(identity=str(tmp_path / "plain.safetensors"), **keep)], **RUN)


def test_stacked_in_a_lightning_draft_and_detached_totally(gen, sdxl_tiny, models, insightface_root, photos, tmp_path):
    base = sdxl_tiny.base
    state = {k: v.clone() for k, v in gen.base.unet.state_dict().items()}
    processors = {k: type(v) for k, v in gen.base.unet.attn_processors.items()}
    pose = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    preset = load_preset("lightning-4step")
    conditions = [
        LoRA(str(write_tiny_lora(tmp_path / "lightning-standin.safetensors", base, "kohya", seed=3))),
        PuLID(str(photos["obama"]), version="v1", **common(models, insightface_root)),
        InstantID(str(photos["obama"]), source=str(write_tiny_instantid_repo(tmp_path / "iid", base)),
                  face_root=str(insightface_root), scale=0.5),
        ControlNet(str(write_tiny_controlnet(tmp_path / "pose", base, seed=4)), image=pose, scale=0.5),
        IPAdapter.style(pose, scale=0.5, source=str(write_tiny_ip_adapter_repo(tmp_path / "ip", base))),
    ]  # fmt: skip
    batches = []
    hook = gen.base.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        result = gen.run(GenerationRequest(PROMPT, size=SIZE, seed=1, conditions=conditions, **preset.settings),
                         progress_bar=False)  # fmt: skip
    finally:
        hook.remove()
    assert batches == [1, 1, 1, 1]
    assert [c["kind"] for c in result.recipes[0]["conditions"]] == [
        "lora",
        "pulid",
        "instantid",
        "controlnet",
        "ip-adapter",
    ]
    unet = gen.base.unet
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())
    assert {k: type(v) for k, v in unet.attn_processors.items()} == processors
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


def test_mask_limits_the_identity_to_a_region(gen, models, insightface_root, photos):
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    unet = gen.base.unet
    layer = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2")
    outputs = []
    hook = layer.register_forward_hook(lambda m, a, out: outputs.append(out.clone()))
    try:
        gen.generate(PROMPT, **{**RUN, "steps": 1})
        gen.generate(PROMPT, conditions=[PuLID(str(photos["obama"]), mask=Image.fromarray(mask), version="v1",
                                               **common(models, insightface_root))], **{**RUN, "steps": 1})  # fmt: skip
    finally:
        hook.remove()
    delta = (outputs[1] - outputs[0]).abs().amax(dim=(0, 2)).reshape(4, 4)
    assert delta[:, :2].min() > 1e-4 and delta[:, 2:].max() == 0


def test_settings_follow_the_reference_apps():
    assert PuLID("x.jpg").settings_for("v1") == (8, "ortho_v2")
    assert PuLID("x.jpg", mode="style").settings_for("v1") == (16, "ortho")
    assert PuLID("x.jpg").settings_for("v1.1") == (20, "ortho_v2")
    assert PuLID("x.jpg", zero_tokens=40).settings_for("v1.1") == (40, "ortho_v2")
    with pytest.raises(ConditionError, match="v1.1 has no 'style' mode in the reference; use 'fidelity' and raise"):
        PuLID("x.jpg", mode="style").settings_for("v1.1")
    with pytest.raises(ConditionError, match="one of the two"):
        PuLID()
    preset = load_preset("portrait-draft")
    assert preset.unet == ModelRef("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors")
    assert preset.settings["steps"] == 4 and preset.settings["guidance"] == 1.2
    assert preset.settings["scheduler"] == "dpmpp_2m" and preset.settings["scheduler_options"] == {
        "timestep_spacing": "trailing"
    }
    face = preset.templates["face"]
    assert (face["kind"], face["version"], face["mode"], face["scale"]) == ("pulid", "v1", "fidelity", 0.8)


def test_bad_input_says_what_and_how(gen, tiny, models, insightface_root, real_detector, photos, tmp_path, caplog):
    c = common(models, insightface_root)
    run = lambda condition: gen.generate(PROMPT, conditions=[condition], **RUN)  # noqa: E731
    grey = tmp_path / "grey.png"
    Image.new("RGB", (200, 200), (120, 120, 120)).save(grey)
    if real_detector:  # the stand-in detector finds a face in any picture
        with pytest.raises(ConditionError, match="no face found in .*grey.png"):
            run(PuLID(str(grey), **c))
    with caplog.at_level(logging.WARNING):
        run(PuLID(str(photos["two_people"]), version="v1", **c))
    assert "2 faces in" in caplog.text or not real_detector
    # A v1 file where v1.1 is expected, and the reverse.
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(models["pulid"] / "pulid_v1.bin", swapped / "pulid_v1.bin")
    write_pulid_checkpoint(swapped / "pulid_v1.1.safetensors", gen.base.unet, "v1", vit_width=128, id_width=528,
                           hidden=128)  # fmt: skip
    with pytest.raises(IncompatibleModelError, match=r"is a PuLID v1 checkpoint, but version='v1.1' was asked"):
        run(PuLID(str(photos["obama"]), **{**c, "source": str(swapped)}, version="v1.1"))
    with pytest.raises(IncompatibleModelError, match=r"is a PuLID v1.1 checkpoint, but version='v1' was asked"):
        run(PuLID(str(photos["obama"]), **c, version="v1", weights=str(models["pulid"] / "pulid_v1.1.safetensors")))
    # Other methods' files.
    instantid = write_tiny_instantid_repo(tmp_path / "iid", tiny.base) / "ip-adapter.bin"
    with pytest.raises(IncompatibleModelError, match="holds InstantID weights, not PuLID's"):
        run(PuLID(str(photos["obama"]), **c, weights=str(instantid)))
    faceid = write_tiny_faceid_repo(tmp_path / "faceid", tiny.base) / "ip-adapter-faceid_sdxl.bin"
    with pytest.raises(IncompatibleModelError, match="holds IP-Adapter FaceID weights, not PuLID's"):
        run(PuLID(str(photos["obama"]), **c, weights=str(faceid)))
    # A checkpoint for another UNet layout (the 34-processor tiny one).
    other = write_pulid_checkpoint(tmp_path / "pulid_v1.bin", Generator.from_pretrained(tiny.base).base.unet, "v1",
                                   vit_width=128, id_width=528, hidden=128)  # fmt: skip
    with pytest.raises(IncompatibleModelError, match="has ID projections for 17 attention layers, this UNet has 70"):
        run(PuLID(str(photos["obama"]), **c, weights=str(other)))
    # Missing models, each named with where it goes.
    with pytest.raises(MissingWeightsError, match="hf download guozinan/PuLID pulid_v1.1.safetensors"):
        run(PuLID(str(photos["obama"]), **{**c, "source": "guozinan/PuLID"}))
    with pytest.raises(MissingWeightsError, match="hf download QuanSun/EVA-CLIP EVA02_CLIP_L_336_psz14_s6B.pt"):
        run(PuLID(str(photos["obama"]), **{**c, "eva": "QuanSun/EVA-CLIP"}))
    with pytest.raises(InputError, match=r"PuLID parsing: no such file or folder .*absent"):
        run(PuLID(str(photos["obama"]), **{**c, "parsing": str(tmp_path / "absent")}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match=r"parsing_bisenet.pth not found in .*empty: download https://github"):
        run(PuLID(str(photos["obama"]), **{**c, "parsing": str(tmp_path / "empty")}))
    with pytest.raises(MissingWeightsError, match="pack 'antelopev2' not found"):
        run(PuLID(str(photos["obama"]), **{**c, "face_root": str(tmp_path)}))


def test_a_photo_is_read_by_eva_once_per_process(gen, models, insightface_root, photos, monkeypatch):
    import sdxl_control.preprocessors.eva_clip as eva_module

    calls = []
    original = eva_module.eva_face_features
    monkeypatch.setattr(eva_module, "eva_face_features", lambda *a: calls.append(1) or original(*a))
    mirrored = Image.open(photos["biden"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # pixels no other test reads
    condition = PuLID(mirrored, version="v1", **common(models, insightface_root))
    first = gen.generate(PROMPT, conditions=[condition], **{**RUN, "steps": 1})
    again = gen.generate(PROMPT, conditions=[condition], **{**RUN, "steps": 1})
    assert len(calls) == 1 and torch.equal(first.latents, again.latents)
