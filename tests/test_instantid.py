"""InstantID equals a transcription of the reference (tests/reference_instantid.py) on tiny weights in the published
layouts, composes with every other condition, places two people, and fails clearly on bad input."""

from __future__ import annotations

import logging
import shutil
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, MultiControlNetModel
from PIL import Image, ImageOps

from sdxl_control import ConditionError, GenerationRequest, IncompatibleModelError, InputError, MissingWeightsError
from sdxl_control.adapters.controlnet import ControlNet
from sdxl_control.adapters.instantid import InstantID
from sdxl_control.adapters.ip_adapter import IPAdapter, load_adapter
from sdxl_control.adapters.lora import LoRA
from sdxl_control.preprocessors.face import FaceAnalyzer, FaceInfo, Identity, save_identity
from sdxl_control.preprocessors.keypoints import keypoint_image, place_keypoints
from sdxl_control.presets import load_preset
from sdxl_control.protocol.conditions import PrepareContext, Stage
from sdxl_control.testing import write_tiny_controlnet
from sdxl_control.testing.instantid import write_tiny_instantid_repo
from sdxl_control.testing.ip_adapter import write_tiny_faceid_repo, write_tiny_ip_adapter_repo
from sdxl_control.testing.lora import write_tiny_lora

from .conftest import as_reference
from .reference_instantid import InstantIDReference, Resampler, draw_kps
from .test_conditions import assert_same_as_fresh

PROMPT = "a portrait of a scientist"
SIZE = (64, 64)
RUN = dict(steps=6, size=SIZE, seed=7, progress_bar=False)
CLOSE = dict(rtol=1e-4, atol=1e-4)


def raw_face(seed: int, shift: float = 0.0) -> FaceInfo:
    """A face as the analyser gives it for a 64x64 photo: landmarks in that photo, a raw (un-normalised) embedding."""
    rng = np.random.default_rng(seed)
    points = np.array([[22, 24], [42, 23], [32, 34], [24, 45], [40, 44]], np.float32) + shift
    points += rng.uniform(-2, 2, points.shape).astype(np.float32)
    embedding = (rng.standard_normal(512) * 1.2).astype(np.float32)  # ArcFace raw embeddings are ~20-30 long
    aligned = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    return FaceInfo((10, 10, 54, 54), points, 0.9, embedding, aligned, SIZE)


@pytest.fixture(scope="module")
def repo(tiny, tmp_path_factory):
    return write_tiny_instantid_repo(tmp_path_factory.mktemp("instantid") / "InstantX-InstantID", tiny.base)


@pytest.fixture(scope="module")
def faces():
    return [raw_face(1), raw_face(2, shift=3.0)]


@pytest.fixture(scope="module")
def pose_net(tiny, tmp_path_factory):
    return write_tiny_controlnet(tmp_path_factory.mktemp("pose") / "pose", tiny.base, seed=5)


def reference_pipe(tiny, repo, *extra_nets):
    identitynet = ControlNetModel.from_pretrained(repo / "ControlNetModel")
    controlnet = MultiControlNetModel([identitynet, *(ControlNetModel.from_pretrained(n) for n in extra_nets)])
    pipe = InstantIDReference.from_pretrained(tiny.base, controlnet=controlnet if extra_nets else identitynet)
    pipe.load_ip_adapter_instantid(str(repo / "ip-adapter.bin"))
    return as_reference(pipe)


def reference(tiny, repo, embeds, kps_points, *, images=1, guidance=5.0, extra=(), extra_images=(), **kwargs):
    pipe = reference_pipe(tiny, repo, *extra)
    kps = draw_kps(Image.new("RGB", SIZE), kps_points)  # the reference draws at the face photo's size: 64x64 here
    generators = [torch.Generator().manual_seed(7 + i) for i in range(images)]
    return pipe(PROMPT, embeds, [kps, *extra_images] if extra else kps, height=64, width=64, num_inference_steps=6,
                guidance_scale=guidance, num_images_per_prompt=images, generator=generators, **kwargs)  # fmt: skip


def test_resampler_equals_the_reference(generator, repo):
    ctx = PrepareContext(torch.device("cpu"), torch.float32, 1, True, SIZE, {Stage.BASE: generator.base.unet})
    ours = load_adapter(repo / "ip-adapter.bin", generator.base.unet, ctx).projection
    state = torch.load(repo / "ip-adapter.bin", weights_only=True)["image_proj"]
    theirs = Resampler(dim=32, depth=4, dim_head=64, heads=1, num_queries=16, embedding_dim=512, output_dim=64)
    theirs.load_state_dict(state)  # strict: the published key names and layout
    embeds = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(0)) * 1.5
    with torch.no_grad():
        torch.testing.assert_close(ours(embeds), theirs(embeds), rtol=1e-5, atol=1e-5)
        assert ours(torch.zeros(1, 1, 512)).abs().max() > 0.1  # the CFG negative is Resampler(0), not zeros


@pytest.mark.parametrize(
    "options, ref_options",
    [
        ({}, {}),
        ({"scale": 0.6, "controlnet_scale": 0.5, "controlnet_window": (0.0, 0.6)},
         {"ip_adapter_scale": 0.6, "controlnet_conditioning_scale": 0.5, "control_guidance_end": 0.6}),
        ({"scale": 0.0}, {"ip_adapter_scale": 0.0}),
        ({"num_images": 2, "guidance": 7.0}, {"images": 2, "guidance": 7.0}),
        ({"guidance": 1.0}, {"guidance": 1.0}),
    ],
    ids=["defaults", "scales-and-window", "no-face-branch", "two-images", "no-guidance"],
)  # fmt: skip
def test_one_face_matches_the_reference(generator, tiny, repo, faces, options, ref_options):
    options, ref_options = dict(options), dict(ref_options)
    request = {k: options.pop(k) for k in ("num_images", "guidance") if k in options}
    ours = generator.generate(PROMPT, conditions=[InstantID(faces[0], source=str(repo), **options)], **RUN, **request)
    ref_options.setdefault("ip_adapter_scale", 0.8)
    ref_options.setdefault("controlnet_conditioning_scale", 0.8)
    ref = reference(tiny, repo, faces[0].embedding, faces[0].landmarks, **ref_options)
    torch.testing.assert_close(ours.latents, ref, **CLOSE)


@pytest.mark.parametrize("combine", ["average", "concat"])
def test_several_photos_match_the_reference(generator, tiny, repo, faces, combine):
    ours = generator.generate(PROMPT, conditions=[InstantID(faces, source=str(repo), combine=combine)], **RUN)
    stacked = np.stack([f.embedding for f in faces])
    # average: the authors' advice for several photos; concat: the reference's reshape of stacked embeddings.
    embeds = stacked.mean(0) if combine == "average" else stacked
    ref = reference(tiny, repo, embeds, faces[0].landmarks, ip_adapter_scale=0.8, controlnet_conditioning_scale=0.8)
    torch.testing.assert_close(ours.latents, ref, **CLOSE)


def test_with_a_pose_controlnet_matches_the_full_reference(generator, tiny, repo, faces, pose_net):
    """Only IdentityNet reads the face tokens; the pose ControlNet reads the prompt (the reference's full pipeline)."""
    pose = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    conditions = [InstantID(faces[0], source=str(repo), controlnet_scale=0.7),
                  ControlNet(str(pose_net), image=pose, scale=0.4, window=(0.0, 0.5))]  # fmt: skip
    ours = generator.generate(PROMPT, conditions=conditions, **RUN)
    ref = reference(tiny, repo, faces[0].embedding, faces[0].landmarks, extra=[pose_net], extra_images=[pose],
                    ip_adapter_scale=0.8, controlnet_conditioning_scale=[0.7, 0.4], control_guidance_end=[1.0, 0.5])  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, **CLOSE)


def half_mask(left: bool) -> Image.Image:
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    return Image.fromarray(mask if left else 255 - mask).convert("RGB")


def test_region_mask_matches_the_full_reference(generator, tiny, repo, faces):
    """The region mask weighs IdentityNet's residuals and the face branch as the full pipeline's control_mask does;
    the keypoints move into the region's box (the reference draws them where the photo has them)."""
    ours = generator.generate(PROMPT, conditions=[InstantID(faces[0], source=str(repo), mask=half_mask(True))], **RUN)
    placed = place_keypoints(faces[0].landmarks, SIZE, (0, 0, 32, 64))
    assert np.allclose(placed, faces[0].landmarks - [16, 0])  # the 64-px photo covers the 32x64 box, centred
    ref = reference(tiny, repo, faces[0].embedding, placed, ip_adapter_scale=0.8, controlnet_conditioning_scale=0.8,
                    control_mask=half_mask(True))  # fmt: skip
    torch.testing.assert_close(ours.latents, ref, **CLOSE)


def _capture_first_step(generator, conditions):
    """(output of the first cross-attention layer, residuals the UNet receives) at the first step."""
    unet = generator.base.unet
    layer = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2")
    seen: dict[str, Any] = {}

    def keep_attention(module, args, out):
        seen.setdefault("attn", out.clone())

    def keep_residuals(module, args, kwargs):
        seen.setdefault("residuals", kwargs.get("down_block_additional_residuals"))

    hooks = [
        layer.register_forward_hook(keep_attention),
        unet.register_forward_pre_hook(keep_residuals, with_kwargs=True),
    ]
    try:
        generator.generate(PROMPT, conditions=conditions, **{**RUN, "steps": 1})
    finally:
        for hook in hooks:
            hook.remove()
    return seen["attn"], seen["residuals"]


def test_two_people_each_in_their_region(generator, repo, faces):
    a = InstantID(faces[0], source=str(repo), mask=half_mask(True))
    b = InstantID(faces[1], source=str(repo), mask=half_mask(False))
    plain, _ = _capture_first_step(generator, [])
    only_a, residuals_a = _capture_first_step(generator, [a])
    only_b, _ = _capture_first_step(generator, [b])
    both, _ = _capture_first_step(generator, [a, b])
    # 64x64 output: this layer's 4x4 queries, row-major; the left half is columns 0-1.
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    left = left.flatten()
    delta_a, delta_b = (only_a - plain).abs().amax(dim=(0, 2)), (only_b - plain).abs().amax(dim=(0, 2))
    assert delta_a[left].min() > 1e-3 and delta_a[~left].max() == 0
    assert delta_b[~left].min() > 1e-3 and delta_b[left].max() == 0
    torch.testing.assert_close(both - plain, (only_a - plain) + (only_b - plain), rtol=1e-5, atol=1e-6)
    for residual in residuals_a:  # IdentityNet acts inside its region only
        right = residual[..., residual.shape[-1] // 2 :]
        assert right.abs().max() == 0 and residual.abs().max() > 0
    # B's keypoints are placed in B's region (its box is the right half), and its keypoint map is drawn from them.
    placed = place_keypoints(faces[1].landmarks, SIZE, (32, 0, 64, 64))
    assert (placed[:, 0] >= 32).all() and (placed[:, 0] < 64).all()
    ctx = PrepareContext(torch.device("cpu"), torch.float32, 1, False, SIZE, {Stage.BASE: generator.base.unet})
    drawn = torch.from_numpy(np.asarray(keypoint_image(placed, SIZE), np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(b.prepare(ctx).control.inputs["controlnet_cond"][0], drawn)


def test_stacked_with_everything_and_detached_totally(generator, fresh, tiny, repo, faces, pose_net, tmp_path):
    ip = write_tiny_ip_adapter_repo(tmp_path / "ip", tiny.base)
    lora = write_tiny_lora(tmp_path / "lora.safetensors", tiny.base, "kohya", seed=4)
    pose = Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    conditions = [
        InstantID(faces[0], source=str(repo), window=(0.0, 0.8), controlnet_window=(0.0, 0.6)),
        ControlNet(str(pose_net), image=pose, scale=0.5),
        IPAdapter.style(pose, scale=0.6, source=str(ip)),
        LoRA(str(lora), scale=0.7),
    ]
    plain = generator.generate(PROMPT, refiner_switch=0.7, **RUN)
    result = generator.generate(PROMPT, conditions=conditions, refiner_switch=0.7, **RUN)
    assert not torch.allclose(result.latents, plain.latents, atol=1e-3)
    assert [c["kind"] for c in result.recipes[0]["conditions"]] == ["instantid", "controlnet", "ip-adapter", "lora"]
    assert_same_as_fresh(generator, fresh)  # weights, processors and hooks of both UNets as a fresh load
    assert torch.equal(generator.generate(PROMPT, refiner_switch=0.7, **RUN).latents, plain.latents)


def test_lightning_draft_with_instantid(generator, tiny, repo, faces, tmp_path):
    preset = load_preset("lightning-4step")
    standin = write_tiny_lora(tmp_path / "lightning-standin.safetensors", tiny.base, "kohya", seed=7)
    conditions = (LoRA(str(standin)), InstantID(faces[0], source=str(repo)))
    batches: list[tuple[int, int]] = []
    unet, identitynet = generator.base.unet, None
    hooks = [unet.register_forward_pre_hook(lambda m, args: batches.append(("unet", args[0].shape[0])))]
    from sdxl_control.adapters.controlnet import load_controlnet

    identitynet = load_controlnet(repo / "ControlNetModel", union=False, unet=unet, device=torch.device("cpu"))
    hooks.append(
        identitynet.register_forward_pre_hook(lambda m, args: batches.append(("identitynet", args[0].shape[0])))
    )
    try:
        result = generator.run(
            GenerationRequest(PROMPT, size=SIZE, seed=2, conditions=conditions, **preset.settings), progress_bar=False
        )
    finally:
        for hook in hooks:
            hook.remove()
    # Four steps, each one unguided IdentityNet pass then one unguided UNet pass.
    assert batches == [("identitynet", 1), ("unet", 1)] * 4
    plain = generator.run(GenerationRequest(PROMPT, size=SIZE, seed=2, conditions=conditions[:1], **preset.settings),
                          progress_bar=False)  # fmt: skip
    assert not torch.allclose(result.latents, plain.latents, atol=1e-3)


# ---- real photos through the real detector (../shared) ----


def _reference_face(root, photo):
    """What the reference does: FaceAnalysis('antelopev2') at 640x640 on the BGR photo, the largest box area."""
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name="antelopev2", root=str(root), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    rgb = np.array(Image.open(photo).convert("RGB"))
    found = app.get(rgb[:, :, ::-1].copy())
    return sorted(found, key=lambda x: (x["bbox"][2] - x["bbox"][0]) * (x["bbox"][3] - x["bbox"][1]))[-1]


@pytest.mark.parametrize("name", ["obama.jpg", "biden.jpg", "two_people.jpg"])
def test_face_analysis_and_keypoints_equal_the_reference(insightface_root, photos_dir, name):
    photo = photos_dir / name
    ours = FaceAnalyzer("antelopev2", root=insightface_root).analyze(photo)
    theirs = _reference_face(insightface_root, photo)
    np.testing.assert_array_equal(ours.embedding, theirs["embedding"])  # raw, not normalised
    np.testing.assert_array_equal(ours.landmarks, theirs["kps"])
    assert abs(float(np.linalg.norm(ours.embedding)) - 1.0) > 1e-3
    # The keypoint map, pixel for pixel, at the photo's size and placed at an output size of the same aspect.
    reference_map = np.asarray(draw_kps(Image.open(photo), theirs["kps"]))
    assert np.array_equal(np.asarray(keypoint_image(ours.landmarks, ours.image_size)), reference_map)
    assert (reference_map > 0).any()
    width, height = ours.image_size
    out = (width * 2, height * 2)
    placed = place_keypoints(ours.landmarks, ours.image_size, (0, 0, *out))
    np.testing.assert_allclose(placed, ours.landmarks * 2, atol=1e-4)
    assert np.array_equal(np.asarray(keypoint_image(placed, out)), np.asarray(draw_kps(Image.new("RGB", out), placed)))


def test_photo_identity_file_and_keypoints_from(generator, repo, insightface_root, photos_dir, tmp_path):
    obama, biden = photos_dir / "obama.jpg", photos_dir / "biden.jpg"
    common = dict(source=str(repo), face_root=str(insightface_root))
    direct = generator.generate(PROMPT, conditions=[InstantID(str(obama), **common)], **RUN)
    saved = save_identity(tmp_path / "me.safetensors", [str(obama)], face_root=insightface_root)
    assert (
        saved.embeddings.shape == (1, 512) and saved.image_size == Image.open(obama).size and saved.pack == "antelopev2"
    )
    from_file = generator.generate(
        PROMPT, conditions=[InstantID(identity=str(tmp_path / "me.safetensors"), **common)], **RUN
    )
    assert torch.equal(from_file.latents, direct.latents)
    # Posed like Biden's photo: the same keypoint map as Biden's own, the identity still Obama's.
    ctx = PrepareContext(torch.device("cpu"), torch.float32, 1, False, SIZE, {Stage.BASE: generator.base.unet})
    posed = InstantID(str(obama), keypoints_from=str(biden), **common).prepare(ctx)
    as_biden = InstantID(str(biden), **common).prepare(ctx)
    as_obama = InstantID(str(obama), **common).prepare(ctx)
    assert torch.equal(posed.control.inputs["controlnet_cond"], as_biden.control.inputs["controlnet_cond"])
    assert torch.equal(posed.branch.tokens, as_obama.branch.tokens)
    posed_file = InstantID(identity=str(tmp_path / "me.safetensors"), keypoints_from=str(biden), **common).prepare(ctx)
    assert torch.equal(posed_file.control.inputs["controlnet_cond"], posed.control.inputs["controlnet_cond"])
    assert Identity.load(tmp_path / "me.safetensors").keypoints.shape == (5, 2)


def test_faces_are_analysed_once_per_photo(insightface_root, photos_dir, monkeypatch, tmp_path):
    import sdxl_control.preprocessors.face as face_module

    calls = []
    original = face_module._detect_at
    monkeypatch.setattr(face_module, "_detect_at", lambda *a: calls.append(a[2]) or original(*a))
    photo = ImageOps.mirror(Image.open(photos_dir / "obama2.jpg"))  # pixels no other test analyses
    photo.save(tmp_path / "mirrored.png")
    first = FaceAnalyzer("antelopev2", root=insightface_root).analyze(photo)
    second = FaceAnalyzer("antelopev2", root=insightface_root).analyze(photo.copy())  # another object, same pixels
    third = FaceAnalyzer("antelopev2", root=insightface_root).analyze(tmp_path / "mirrored.png")  # same, from a file
    assert calls == [640]
    assert np.array_equal(first.embedding, second.embedding) and np.array_equal(first.embedding, third.embedding)


# ---- bad input ----


def test_bad_photos_say_which_and_what_to_do(generator, repo, insightface_root, shared_dir, tmp_path, caplog):
    common = dict(source=str(repo), face_root=str(insightface_root))
    run = lambda faces: generator.generate(PROMPT, conditions=[InstantID(faces, **common)], **RUN)  # noqa: E731
    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 300), (120, 120, 120)).save(blank)
    with pytest.raises(
        ConditionError,
        match=r"no face found in .*blank.png \(300x300; the detector looked at it scaled to 640x640, 320x320\)",
    ):
        run(str(blank))
    # A face smaller than the detector finds at 640: found when looking closer, then refused for its size.
    photo = Image.open(shared_dir / "images" / "obama.jpg")
    crowd = Image.new("RGB", (2400, 1800), (128, 128, 128))
    crowd.paste(photo.resize((photo.width * 24 // 200, photo.height * 24 // 200)), (1000, 800))
    crowd.save(tmp_path / "crowd.png")
    with pytest.raises(ConditionError, match=r"the face in .*crowd.png is 2\dx[34]\d px; at least 32 px is needed"):
        run(str(tmp_path / "crowd.png"))
    # A close-up the reference's 640x640 detector misses (its IndexError in the reference) is found at 320.
    close = photo.crop((388, 104, 600, 421)).resize((800, 1197))
    assert FaceAnalyzer("antelopev2", root=insightface_root).analyze(close).score > 0.5
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match="notes.png is not a readable image"):
        run(str(text))
    with caplog.at_level(logging.WARNING):
        run(str(shared_dir / "images" / "two_people.jpg"))
    assert "2 faces in" in caplog.text and "using the largest" in caplog.text


def test_missing_pack_names_the_folder_and_the_hand_download(generator, repo, tmp_path):
    with pytest.raises(MissingWeightsError, match=r"pack 'antelopev2' not found \(looked in .*models/antelopev2\); "
                       r"insightface cannot download antelopev2 itself .*issues/1896.*scrfd_10g_bnkps.onnx"):  # fmt: skip
        photo = tmp_path / "x.jpg"
        Image.new("RGB", (64, 64)).save(photo)
        generator.generate(PROMPT, conditions=[InstantID(str(photo), source=str(repo), face_root=str(tmp_path))], **RUN)


def test_pack_unzipped_into_a_folder_of_its_own_is_found(insightface_root, tmp_path):
    nested = tmp_path / "models" / "antelopev2" / "antelopev2"
    shutil.copytree(insightface_root / "models" / "antelopev2", nested)
    assert FaceAnalyzer("antelopev2", root=tmp_path).folder == nested


def test_wrong_checkpoints_are_refused(generator, tiny, repo, faces, tmp_path):
    sd15 = ControlNetModel.from_pretrained(repo / "ControlNetModel")
    sd15.register_to_config(cross_attention_dim=768)
    sd15.save_pretrained(tmp_path / "sd15")
    with pytest.raises(IncompatibleModelError, match=r"cross-attention size is 768 \(an SD 1.5 ControlNet\)"):
        generator.generate(
            PROMPT, conditions=[InstantID(faces[0], source=str(repo), identitynet=str(tmp_path / "sd15"))], **RUN
        )
    faceid = write_tiny_faceid_repo(tmp_path / "faceid", tiny.base) / "ip-adapter-faceid_sdxl.bin"
    with pytest.raises(
        IncompatibleModelError, match=r"holds IP-Adapter FaceID weights, not InstantID's ip-adapter.bin"
    ):
        generator.generate(PROMPT, conditions=[InstantID(faces[0], source=str(repo), adapter=str(faceid))], **RUN)
    pulid = tmp_path / "pulid_v1.bin"
    torch.save(
        {"id_adapter.body.0.weight": torch.zeros(2, 2), "id_adapter_attn_layers.1.id_to_k.weight": torch.zeros(2, 2)},
        pulid,
    )
    with pytest.raises(IncompatibleModelError, match=r"pulid_v1.bin holds PuLID weights"):
        generator.generate(PROMPT, conditions=[InstantID(faces[0], source=str(repo), adapter=str(pulid))], **RUN)
    with pytest.raises(MissingWeightsError, match=r"hf download InstantX/InstantID ip-adapter.bin"):
        generator.generate(PROMPT, conditions=[InstantID(faces[0])], **RUN)
    with pytest.raises(ConditionError, match="one of the two"):
        InstantID()
    with pytest.raises(ConditionError, match="InstantID's region mask is empty: paint"):
        generator.generate(PROMPT, conditions=[InstantID(faces[0], source=str(repo), mask=Image.new("L", SIZE))], **RUN)
    with pytest.raises(ConditionError, match="cannot apply to the refiner stage"):
        generator.generate(
            PROMPT, conditions=[InstantID(faces[0], source=str(repo), stage="both")], refiner_switch=0.5, **RUN
        )


def test_identity_similarity_is_the_cosine_of_the_arcface_embeddings(insightface_root, photos_dir):
    from sdxl_control.preprocessors.face import identity_similarity

    obama, obama2, biden = (photos_dir / n for n in ("obama.jpg", "obama2.jpg", "biden.jpg"))
    assert identity_similarity(obama, obama, root=insightface_root) == pytest.approx(1.0, abs=1e-6)
    a, b = (_reference_face(insightface_root, p)["embedding"] for p in (obama2, biden))
    expected = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert identity_similarity(obama2, biden, root=insightface_root) == pytest.approx(expected, abs=1e-6)
    assert identity_similarity(biden, obama2, root=insightface_root) == pytest.approx(expected, abs=1e-6)


def test_fast_path_gives_the_same_image(tiny, repo, faces):
    """Fused projections and channels_last reach IdentityNet (a ControlNet of the call) and the face branches."""
    from sdxl_control import FastPath, Generator

    gen = Generator.from_pretrained(tiny.base, device="cpu")
    conditions = [InstantID(faces[0], source=str(repo), mask=half_mask(True)), InstantID(faces[1], source=str(repo))]
    plain = gen.generate(PROMPT, conditions=conditions, **RUN)
    gen.set_fast_path(FastPath())
    try:
        fast = gen.generate(PROMPT, conditions=conditions, **RUN)
    finally:
        gen.set_fast_path(None)
    torch.testing.assert_close(fast.latents, plain.latents, rtol=1e-4, atol=1e-4)
