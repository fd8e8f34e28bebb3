"""PhotoMaker equals a transcription of the reference (tests/reference_photomaker.py) on tiny weights with the published
key names; the prompt channel is general (a second user here) and leaves nothing behind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_control import ConditionError, Generator, IncompatibleModelError, PromptEdit
from sdxl_control.adapters.controlnet import ControlNet
from sdxl_control.adapters.ip_adapter import IPAdapter
from sdxl_control.adapters.lora import LoRA
from sdxl_control.adapters.photomaker import PhotoMaker, _PhotoMakerEdit, clip_pixels
from sdxl_control.preprocessors.face import FaceAnalyzer, save_identity
from sdxl_control.protocol.conditions import Attachment, Condition, PrepareContext, Prepared, Stage, Window
from sdxl_control.protocol.text import _chunked, encode_prompts
from sdxl_control.testing import tiny_models, write_tiny_controlnet
from sdxl_control.testing.ip_adapter import write_tiny_ip_adapter_repo
from sdxl_control.testing.lora import write_tiny_lora
from sdxl_control.testing.photomaker import TINY_CLIP, write_photomaker_checkpoint

from . import reference_photomaker as ref
from .conftest import as_reference

SIZE = (64, 64)
RUN = dict(steps=10, size=SIZE, seed=6, progress_bar=False)
CLOSE = dict(rtol=1e-4, atol=1e-4)
PROMPT = "a photo of a man img, in a garden"


@pytest.fixture(scope="module")
def wide(_isolated_cache):
    """The tiny pair with 64-wide text encoders: PhotoMaker's Q-Former heads are 128 wide, and its width is both text
    encoders' together."""
    return tiny_models(seed=0, text_width=64)


@pytest.fixture(scope="module")
def gen(wide) -> Generator:
    return Generator.from_pretrained(wide.base, wide.refiner, device="cpu")


@pytest.fixture(scope="module")
def files(gen, tmp_path_factory):
    root = tmp_path_factory.mktemp("photomaker")
    return {v: write_photomaker_checkpoint(root / f"photomaker-{v}.bin", gen.base.unet, v, widths=(64, 64), **TINY_CLIP,
                                           seed=3 + i) for i, v in enumerate(("v1", "v2"))}  # fmt: skip


@pytest.fixture(scope="module")
def photos(photos_dir):
    return [str(photos_dir / n) for n in ("obama.jpg", "obama2.jpg", "biden.jpg")]


def reference_pipe(wide, path, version):
    pipe = ref.PhotoMakerReference.from_pretrained(wide.base)
    pipe.load_photomaker_adapter(str(path), version)
    pipe.fuse_lora()
    return as_reference(pipe)


def reference_faces(root, photos):
    """v2's face embeddings as the reference takes them: insightface's FaceAnalysis on buffalo_l, the first face."""
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name="buffalo_l", root=str(root), providers=["CPUExecutionProvider"],
                       allowed_modules=["detection", "recognition"])  # fmt: skip
    app.prepare(ctx_id=-1, det_size=(640, 640))
    rgb = [np.array(Image.open(p).convert("RGB")) for p in photos]
    return torch.from_numpy(np.stack([app.get(x[:, :, ::-1].copy())[0]["embedding"] for x in rgb]))


TOKEN_PROMPTS = [
    "a photo of a man img",
    "Asian woman img, smiling, in a red coat",
    "portrait of a chiropractor img at work",  # a class word of several BPE tokens: the last is the class token
    "a man imgs walking",  # the trigger also splits a word, as the reference's added special token does
    ", ".join(["a field of flowers"] * 14) + ", a man img",  # the trigger near the end of 77 tokens
]


@pytest.fixture(scope="module")
def v2_reference(wide, files):
    return reference_pipe(wide, files["v2"], "v2")


# Three photos' six class-word copies would end past 77 tokens in the last prompt: the error test covers that.
NAMES = ["man", "asian-woman", "multi-token", "imgs", "near-77"]
CASES = [(p, n, f"{name}-{n}") for p, name in zip(TOKEN_PROMPTS, NAMES, strict=True) for n in (1, 3)
         if not (name == "near-77" and n == 3)]  # fmt: skip


@pytest.mark.parametrize("prompt, count", [c[:2] for c in CASES], ids=[c[2] for c in CASES])
def test_trigger_tokenisation_equals_the_reference(gen, v2_reference, prompt, count):
    pipe = v2_reference
    _, _, _, their_ids, their_masks = pipe.encode_prompt_with_trigger_word(prompt, count)
    rows = torch.zeros(count * 2, 128)
    edit = _PhotoMakerEdit("img", Window(), rows, None, 1.0)  # type: ignore[arg-type]
    for i, encoder in enumerate(gen.base.text_encoders):
        ours = edit.tokens(prompt, encoder.tokenizer, i)
        assert list(ours.ids) == their_ids[i] and list(ours.marked) == their_masks[i]
        assert sum(ours.marked) == count * 2
    # The text before the merge: the prompt without the trigger encodes as the reference's decoded text-only prompt.
    text_ids = pipe.tokenizer.encode(prompt, add_special_tokens=False)
    text_ids.remove(pipe.tokenizer.convert_tokens_to_ids("img"))
    theirs = pipe.tokenizer(pipe.tokenizer.decode(text_ids)).input_ids
    ours = gen.base.text_encoders[0].tokenizer(edit.text(prompt, None)).input_ids
    assert ours == theirs


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_id_encoders_equal_the_reference(gen, files, photos, version):
    from sdxl_control.adapters.photomaker import PhotoMakerEncoder, read_photomaker

    found, state, _ = read_photomaker(files[version])
    assert found == version
    ours = PhotoMakerEncoder.fitting(state)
    ours.load_published(state)
    full = torch.load(files[version], weights_only=True)
    theirs = (ref.PhotoMakerIDEncoder if version == "v1" else ref.PhotoMakerIDEncoderV2)(full["id_encoder"])
    theirs.load_state_dict(full["id_encoder"], strict=True)
    pixels = clip_pixels(photos, 224)
    faces = torch.randn(3, 512, generator=torch.Generator().manual_seed(0)) * 20 if version == "v2" else None
    tokens = 1 if version == "v1" else 2
    prompt = torch.randn(1, 77, 128, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 77, dtype=torch.bool)
    mask[0, 5 : 5 + 3 * tokens] = True
    with torch.no_grad():
        args = (pixels[None], prompt.clone(), mask) + (() if faces is None else (faces[None],))
        expected = theirs(*args)
        rows = ours.id_rows(pixels, faces)
        fused = prompt.clone()
        fused[0, mask[0]] = ours.fuse_module(prompt[0, mask[0]], rows)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "version, count, start_merge", [("v1", 1, 0.2), ("v1", 2, 0.0), ("v2", 1, 0.2), ("v2", 3, 0.5)],
    ids=["v1", "v1-two-photos-merge-0", "v2", "v2-three-photos"],
)  # fmt: skip
def test_photomaker_matches_the_reference(gen, wide, files, photos, insightface_root, version, count, start_merge):
    chosen = photos[:count]
    condition = PhotoMaker(
        chosen, weights=str(files[version]), start_merge=start_merge, face_root=str(insightface_root)
    )
    ours = gen.generate(PROMPT, conditions=[condition], **RUN)
    pipe = reference_pipe(wide, files[version], version)
    faces = reference_faces(insightface_root, chosen) if version == "v2" else None
    theirs = pipe(PROMPT, clip_pixels(chosen, 224), height=64, width=64, num_inference_steps=10, guidance_scale=5.0,
                  start_merge_step=min(int(start_merge * 10), 30), generator=torch.Generator().manual_seed(6),
                  id_embeds=faces)  # fmt: skip
    torch.testing.assert_close(ours.latents, theirs, **CLOSE)


def test_the_identity_prompt_starts_after_start_merge(gen, files, photos):
    """Steps 0..start_merge_step (inclusive) read the prompt without the identity; later steps the fused one."""
    seen = []

    def keep(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"][1].clone())  # the conditional half

    hook = gen.base.unet.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        gen.generate(PROMPT, conditions=[PhotoMaker(photos[0], weights=str(files["v1"]), start_merge=0.3)], **RUN)
    finally:
        hook.remove()
    plain, _ = encode_prompts(gen.base.text_encoders, ["a photo of a man  , in a garden"], None, need_negative=False,
                              zero_negative=True)  # fmt: skip
    merge = int(0.3 * 10)
    assert all(torch.equal(seen[i], plain.hidden[0]) for i in range(merge + 1))
    assert all(not torch.allclose(seen[i], plain.hidden[0]) for i in range(merge + 1, 10))
    assert all(torch.equal(seen[i], seen[merge + 1]) for i in range(merge + 1, 10))


class Replaced(PromptEdit):
    """A second, trivial user of the prompt channel: one token's embedding replaced by a fixed vector, from a step."""

    def __init__(self, token: int, vector: torch.Tensor, window: Window) -> None:
        super().__init__(window)
        self.token, self.vector = token, vector

    def embed(self, hidden, tokens):
        out = hidden.clone()
        out[0, torch.tensor(tokens[0].ids) == self.token] = self.vector
        return out


class _Nothing(Attachment):
    def detach(self) -> None:
        return None


class _Ready(Prepared):
    def __init__(self, edit: PromptEdit) -> None:
        self.edit = edit

    def attach(self, unet, stage):
        return _Nothing()

    def prompt_edit(self, stage):
        return self.edit if stage == Stage.BASE else None


@dataclass(frozen=True)
class FixedToken(Condition):
    edit: Any = None

    kind = "fixed-token"

    def prepare(self, ctx: PrepareContext) -> Prepared:
        return _Ready(self.edit)


def test_the_prompt_channel_serves_another_condition(gen, wide):
    """A fixed vector at the position of "cat" from step 2 equals diffusers' SDXL pipeline given those embeddings from
    step 2 (and the plain ones before), through a step callback."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer = gen.base.text_encoders[0].tokenizer
    cat = tokenizer.convert_tokens_to_ids("cat</w>")
    vector = torch.linspace(-8, 8, 128)
    edit = Replaced(cat, vector, Window(2 / 8, 1.0))
    ours = gen.generate("a cat on a wall", conditions=[FixedToken(edit)], **{**RUN, "steps": 8})
    pipe = StableDiffusionXLPipeline.from_pretrained(wide.base)
    as_reference(pipe)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            "a cat on a wall", do_classifier_free_guidance=True
        )
        edited = embeds.clone()
        edited[0, torch.tensor(tokenizer("a cat on a wall", padding="max_length", max_length=77).input_ids) == cat] = (
            vector
        )

        def switch(pipeline, step, t, kwargs):
            if step == 1:  # the callback runs after step 1, so step 2 reads the edited prompt
                kwargs["prompt_embeds"] = torch.cat([negative, edited])
            return kwargs

        theirs = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                      negative_pooled_prompt_embeds=negative_pooled, height=64, width=64, num_inference_steps=8,
                      generator=torch.Generator().manual_seed(6), output_type="latent", callback_on_step_end=switch,
                      callback_on_step_end_tensor_inputs=["prompt_embeds"]).images  # fmt: skip
    torch.testing.assert_close(ours.latents, theirs, **CLOSE)
    plain = gen.generate("a cat on a wall", **{**RUN, "steps": 8})
    assert not torch.allclose(ours.latents, plain.latents, atol=1e-3)


def test_models_and_tokenizers_are_as_before_after_a_call_and_an_error(gen, fresh_wide, files, photos):
    tokenizers = [len(e.tokenizer) for e in gen.base.text_encoders]
    state = {k: v.clone() for k, v in gen.base.unet.state_dict().items()}
    gen.generate(PROMPT, conditions=[PhotoMaker(photos[0], weights=str(files["v1"]))], refiner_switch=0.7, **RUN)
    from .probe import Probe

    with pytest.raises(RuntimeError, match="boom"):
        gen.generate(PROMPT, conditions=[PhotoMaker(photos[0], weights=str(files["v1"])), Probe(raise_at=5)], **RUN)
    assert [len(e.tokenizer) for e in gen.base.text_encoders] == tokenizers
    assert all(torch.equal(state[k], v) for k, v in gen.base.unet.state_dict().items())
    from .test_conditions import assert_same_as_fresh

    assert_same_as_fresh(gen, fresh_wide)


@pytest.fixture(scope="module")
def fresh_wide(wide):
    return Generator.from_pretrained(wide.base, wide.refiner, device="cpu")


def test_a_long_prompt_is_read_whole_and_fuses_the_identity_at_its_class_word(gen, files, photos):
    """Beyond one window the prompt is read in chunks as every long prompt is, the class word repeated where it
    stands; the identity is fused into those positions of the joined windows, as fusing them by hand does."""
    long = ", ".join(["a field of flowers"] * 18) + ", a photo of a man img, in a garden"
    encoders = gen.base.text_encoders
    condition = PhotoMaker(photos[0], weights=str(files["v1"]), start_merge=0.0)
    ctx = PrepareContext(torch.device("cpu"), torch.float32, 1, True, SIZE, {Stage.BASE: gen.base.unet}, steps=10)
    edit = condition.prepare(ctx).prompt_edit(Stage.BASE)
    count = edit.rows.shape[0]
    expanded = long.replace("man img", " ".join(["man"] * count))
    reads = [edit.tokens(long, e.tokenizer, i, whole=True) for i, e in enumerate(encoders)]
    windows, chunks = _chunked(encoders, [expanded])  # any long prompt's chunks
    assert chunks == 2
    man = encoders[0].tokenizer.convert_tokens_to_ids("man</w>")
    for read, ids in zip(reads, windows, strict=True):
        assert list(read.ids) == ids.flatten().tolist()
        marked = [i for i, m in enumerate(read.marked) if m]
        assert len(marked) == count and marked[0] > 77 and all(read.ids[i] == man for i in marked)
    with pytest.raises(ConditionError, match="comes after CLIP's 77-token limit; put"):
        edit.tokens(long, encoders[0].tokenizer, 0)  # one window: the reference's refusal
    seen = []
    hook = gen.base.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"][1].clone()), with_kwargs=True
    )
    try:
        gen.generate(long, conditions=[condition], **RUN)
    finally:
        hook.remove()
    plain, _ = encode_prompts(encoders, [expanded], None, need_negative=False, zero_negative=True)
    positions = torch.tensor(marked)
    by_hand = plain.hidden[0].clone()
    with torch.no_grad():
        by_hand[positions] = edit.fuse(plain.hidden[0, positions], edit.rows)
    assert seen[-1].shape == by_hand.shape == (154, plain.hidden.shape[-1])
    torch.testing.assert_close(seen[-1], by_hand, **CLOSE)
    assert not torch.allclose(seen[-1][positions], plain.hidden[0, positions], atol=1e-3)


def test_the_refiner_reads_the_prompt_without_the_trigger(gen, files, photos):
    seen = []
    hook = gen.refiner.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"][1].clone()), with_kwargs=True
    )
    try:
        gen.generate(PROMPT, conditions=[PhotoMaker(photos[0], weights=str(files["v1"]))], refiner_switch=0.7, **RUN)
    finally:
        hook.remove()
    expected, _ = encode_prompts(gen.refiner.text_encoders, ["a photo of a man  , in a garden"], None,
                                 need_negative=False, zero_negative=False)  # fmt: skip
    assert seen and all(torch.equal(s, expected.hidden[0]) for s in seen)


def test_stacks_with_controlnet_style_and_lora(gen, wide, files, photos, tmp_path):
    pose = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    conditions = [
        PhotoMaker(photos[:2], weights=str(files["v1"])),
        ControlNet(str(write_tiny_controlnet(tmp_path / "cn", wide.base, seed=2)), image=pose, scale=0.5),
        IPAdapter.style(pose, scale=0.6, source=str(write_tiny_ip_adapter_repo(tmp_path / "ip", wide.base))),
        LoRA(str(write_tiny_lora(tmp_path / "style.safetensors", wide.base, "kohya", seed=5)), scale=0.5),
    ]
    state = {k: v.clone() for k, v in gen.base.unet.state_dict().items()}
    alone = gen.generate(PROMPT, conditions=conditions[:1], **RUN)
    stacked = gen.generate(PROMPT, conditions=conditions, **RUN)
    assert not torch.allclose(alone.latents, stacked.latents, atol=1e-3)
    assert [c["kind"] for c in stacked.recipes[0]["conditions"]] == ["photomaker", "controlnet", "ip-adapter", "lora"]
    assert all(torch.equal(state[k], v) for k, v in gen.base.unet.state_dict().items())


def test_identity_file(gen, files, photos, insightface_root, tmp_path):
    root = str(insightface_root)
    direct = gen.generate(PROMPT, conditions=[PhotoMaker(photos[:2], weights=str(files["v2"]), face_root=root)], **RUN)
    save_identity(tmp_path / "me.safetensors", photos[:2], face_pack="buffalo_l", face_root=root, photomaker=True)
    saved = gen.generate(PROMPT, conditions=[PhotoMaker(identity=str(tmp_path / "me.safetensors"),
                                                        weights=str(files["v2"]))], **RUN)  # fmt: skip
    assert torch.equal(saved.latents, direct.latents)
    save_identity(tmp_path / "ante.safetensors", photos[:1], face_root=root, photomaker=True)
    with pytest.raises(ConditionError, match="holds antelopev2 face embeddings; PhotoMaker v2 reads buffalo_l's"):
        gen.generate(PROMPT, conditions=[PhotoMaker(identity=str(tmp_path / "ante.safetensors"),
                                                    weights=str(files["v2"]))], **RUN)  # fmt: skip


def test_bad_input_says_what_and_how(gen, files, photos, insightface_root, real_detector, tmp_path):
    run = lambda prompt, **c: gen.generate(prompt, conditions=[PhotoMaker(photos[0], weights=str(files["v1"]), **c)],  # noqa: E731
                                           **RUN)  # fmt: skip
    with pytest.raises(
        ConditionError, match="trigger word exactly once.*'a photo of a man img'; the prompt does not contain"
    ):
        run("a photo of a man")
    with pytest.raises(ConditionError, match="the prompt contains 2 times 'img'"):
        run("a man img and a woman img")
    with pytest.raises(ConditionError, match="needs a class word right before 'img'"):
        run("img, a man in a garden")
    with pytest.raises(ConditionError, match="needs a class word right before 'img'.*has ',' there"):
        run("a man, img")
    # Cut to one window (the reference's reading), a trigger past it is refused; read in chunks, it is not.
    long = ", ".join(["a field of flowers"] * 14) + ", a man img"  # 3 photos' 6 class-word copies end past 77
    with pytest.raises(ConditionError, match="too long: 'img' comes after CLIP's 77-token limit once"):
        gen.generate(long, conditions=[PhotoMaker(photos, weights=str(files["v2"]), face_root=str(insightface_root))],
                     long_prompts="truncate", **RUN)  # fmt: skip
    with pytest.raises(ConditionError, match="too long: 'img' comes after CLIP's 77-token limit; put"):
        gen.generate(", ".join(["a field of flowers"] * 18) + ", a man img", long_prompts="truncate",
                     conditions=[PhotoMaker(photos[0], weights=str(files["v1"]))], **RUN)  # fmt: skip
    with pytest.raises(IncompatibleModelError, match="is a PhotoMaker v1 checkpoint, but version='v2' was asked"):
        gen.generate(PROMPT, conditions=[PhotoMaker(photos[0], weights=str(files["v1"]), version="v2")], **RUN)
    grey = tmp_path / "grey.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(grey)
    if real_detector:  # the stand-in detector finds a face in any picture
        with pytest.raises(ConditionError, match="no face found in .*grey.png"):
            gen.generate(PROMPT, conditions=[PhotoMaker(str(grey), weights=str(files["v2"]),
                                                        face_root=str(insightface_root))], **RUN)  # fmt: skip
        assert FaceAnalyzer("buffalo_l", root=insightface_root).faces(grey) == []
    with pytest.raises(IncompatibleModelError, match="holds PuLID weights, not PhotoMaker's"):
        pulid = tmp_path / "pulid_v1.bin"
        torch.save({"id_adapter.body.0.weight": torch.zeros(1)}, pulid)
        gen.generate(PROMPT, conditions=[PhotoMaker(photos[0], weights=str(pulid))], **RUN)
    with pytest.raises(ConditionError, match="one of the two"):
        PhotoMaker()
