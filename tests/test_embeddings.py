"""SDXL textual-inversion embeddings (issue 36, part 3): files of ``clip_l`` and ``clip_g`` vectors from the model
folders, used as A1111 uses them (the name as a word, matched on tokens) and as ComfyUI does (``embedding:name``,
weighted too), recorded by name and SHA-256 (A1111's ``TI hashes``) and read back from a PNG's text.

Unweighted, the prompt embeddings equal diffusers' own ``load_textual_inversion`` loaded on both encoders (the
two calls of its docstring: ``clip_l`` on ``text_encoder``/``tokenizer``, ``clip_g`` on ``text_encoder_2``/
``tokenizer_2``). ComfyUI's lookup and reading rules follow ``comfy/sd1_clip.py`` (``load_embed``,
``SDTokenizer._try_get_embedding``, ``tokenize_with_weights``) at Comfy-Org/ComfyUI
a125cd84b054a57729b5eecab930ca9408719832; A1111's name matching follows its ``EmbeddingDatabase``
(``find_embedding_at_position``: token ids of the name, longest first) and ``sd_hijack_clip.tokenize_line`` (an
embedding never split across chunks), as read in the research notes of issue 36.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdxl_control import GenerationRequest
from sdxl_control.base.errors import IncompatibleModelError, InputError, InvalidRequestError
from sdxl_control.jobs.png_import import read_a1111
from sdxl_control.jobs.resolvers import HubResolver
from sdxl_control.jobs.spec import JobSpec, resolve
from sdxl_control.protocol.embeddings import a1111_mentions, comfyui_references
from sdxl_control.protocol.emphasis import CHUNK_TOKENS
from sdxl_control.protocol.text import _read, encode_prompts
from sdxl_control.records.infotext import parameters_text
from sdxl_control.weights.embeddings import comfyui_embedding, read_embedding
from sdxl_control.weights.model_folders import ModelFolders
from tests.conftest import as_reference

NAME = "fooxyz"  # three tokens of CLIP's vocabulary, in no prompt by chance


def _write_ti(path: Path, encoders, count: int = 3, seed: int = 0) -> Path:
    """A tiny SDXL embedding built in code with the real key names, saved as safetensors."""
    g = torch.Generator().manual_seed(seed)
    widths = [e.model.config.hidden_size for e in encoders]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"clip_l": torch.randn(count, widths[0], generator=g), "clip_g": torch.randn(count, widths[1], generator=g)},
              str(path))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def ti_file(generator, tmp_path_factory) -> Path:
    return _write_ti(tmp_path_factory.mktemp("ti") / f"{NAME}.safetensors", generator.base.text_encoders)


@pytest.fixture(scope="module")
def diffusers_ti(tiny, ti_file):
    """diffusers' SDXL pipeline with the embedding loaded the way its docstring loads an SDXL one."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipe = as_reference(StableDiffusionXLPipeline.from_pretrained(tiny.base))
    state = load_file(str(ti_file))
    pipe.load_textual_inversion(state["clip_l"], token=NAME, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=NAME, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)  # fmt: skip
    return pipe


def _ours(generator, ti_file, prompt: str, negative: str | None = None, **options):
    embeddings = {NAME: read_embedding(ti_file)}
    return encode_prompts(generator.base.text_encoders, [prompt], None if negative is None else [negative],
                          need_negative=negative is not None, zero_negative=True, embeddings=embeddings,
                          **options)  # fmt: skip


@pytest.mark.parametrize(
    ("ours", "emphasis"),
    [
        (f"a photo of {NAME} in the snow", "a1111"),
        (f"a photo of {NAME.upper()} in the snow", "a1111"),  # A1111 matches on tokens: CLIP lowercases
        (f"a photo of {NAME} in the snow", "off"),
        (f"a photo of embedding:{NAME} in the snow", "comfyui"),
        (f"{NAME}, a photo, {NAME}", "a1111"),
    ],
)
def test_unweighted_embeddings_equal_diffusers_load_textual_inversion(generator, ti_file, diffusers_ti, ours, emphasis):
    text = ours.replace("embedding:", "").replace(NAME.upper(), NAME)
    with torch.no_grad():
        reference, _, pooled_reference, _ = diffusers_ti.encode_prompt(text, do_classifier_free_guidance=False)
    positive, _ = _ours(generator, ti_file, ours, emphasis=emphasis)
    assert torch.equal(positive.hidden, reference)  # both encoders: CLIP-L's 1st half, bigG's 2nd
    without, _ = encode_prompts(generator.base.text_encoders, [ours], None, need_negative=False, zero_negative=True,
                                emphasis=emphasis)  # fmt: skip
    assert not torch.allclose(without.hidden, reference)  # the vectors made the difference
    # The pooled embedding is bigG's at the end-of-text token, as A1111 and ComfyUI take it. diffusers takes the
    # highest token id (the SDXL configs' eos_token_id 2 makes transformers pool at the argmax), which is the added
    # embedding token's: its pooled embedding is another.
    encoder = diffusers_ti.text_encoder_2
    ids = diffusers_ti.tokenizer_2(diffusers_ti.maybe_convert_prompt(text, diffusers_ti.tokenizer_2),
                                   padding="max_length", max_length=77, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
        at_end = (ids == diffusers_ti.tokenizer_2.eos_token_id).int().argmax(-1)
        by_hand = encoder.text_projection(out.last_hidden_state[torch.arange(1), at_end])
    assert torch.allclose(positive.pooled, by_hand, atol=1e-6)
    assert not torch.allclose(pooled_reference, by_hand)


def test_the_models_are_as_before_after_a_call(generator, ti_file):
    encoders = generator.base.text_encoders
    before = [copy.deepcopy(e.model.state_dict()) for e in encoders]
    sizes = [len(e.tokenizer) for e in encoders]
    _ours(generator, ti_file, f"a {NAME}", emphasis="a1111")
    with pytest.raises(RuntimeError):  # an error inside the call leaves them as they were too
        from sdxl_control.protocol.embeddings import vectors_placed

        with vectors_placed(encoders[0].model, [(0, 1)], [torch.zeros(encoders[0].model.config.hidden_size)]):
            raise RuntimeError("inside")
    for encoder, state, size in zip(encoders, before, sizes, strict=True):
        assert len(encoder.tokenizer) == size
        assert not encoder.model.get_input_embeddings()._forward_hooks
        assert all(torch.equal(state[k], v) for k, v in encoder.model.state_dict().items())


def test_weights_reach_the_embedding_vectors(generator, ti_file):
    """``(name:1.5)`` (A1111) and ``(embedding:name:1.5)`` (ComfyUI) weigh every vector of the embedding, and only
    those positions: A1111 rescales the window to its old mean, ComfyUI moves each weighted position from the empty
    prompt's state."""
    plain, _ = _ours(generator, ti_file, f"a photo of {NAME} in the snow", emphasis="a1111")
    weighted, _ = _ours(generator, ti_file, f"a photo of ({NAME}:1.5) in the snow", emphasis="a1111")
    positions = slice(4, 7)  # start, a, photo, of, then the three vectors
    first = generator.base.text_encoders[0].model.config.hidden_size
    for channels in (slice(0, first), slice(first, None)):  # each encoder keeps its own mean
        ratio = weighted.hidden[0, positions, channels] / plain.hidden[0, positions, channels]
        rest = weighted.hidden[0, 7:, channels] / plain.hidden[0, 7:, channels]
        # The vectors are scaled by 1.5 times the window's mean correction, every other position by the correction.
        assert torch.allclose(ratio, ratio.mean(), atol=1e-4) and torch.allclose(rest, rest.mean(), atol=1e-4)
        assert ratio.mean() / rest.mean() == pytest.approx(1.5, rel=1e-4)
    comfy, _ = _ours(generator, ti_file, f"a photo of (embedding:{NAME}:1.5) in the snow", emphasis="comfyui")
    unweighted, _ = _ours(generator, ti_file, f"a photo of embedding:{NAME} in the snow", emphasis="comfyui")
    empty, _ = encode_prompts(generator.base.text_encoders, [""], None, need_negative=False, zero_negative=True)
    moved = empty.hidden[0, positions] + (unweighted.hidden[0, positions] - empty.hidden[0, positions]) * 1.5
    assert torch.allclose(comfy.hidden[0, positions], moved, atol=1e-5)
    assert torch.equal(comfy.hidden[0, 7:], unweighted.hidden[0, 7:])


def test_an_embedding_is_never_cut_across_chunks(generator, ti_file):
    """A1111 moves an embedding that would not fit whole to the next chunk; ComfyUI keeps a group of fewer than 8
    tokens whole too."""
    embeddings = {NAME: read_embedding(ti_file)}
    encoders = generator.base.text_encoders
    for emphasis, name in (("a1111", NAME), ("comfyui", f"embedding:{NAME}")):
        reading = _read(encoders, ["word " * 73 + name + " end"], emphasis, "chunks", embeddings)
        assert reading.windows == 2
        for ids, (where, _) in zip(reading.ids, reading.vectors, strict=True):
            assert where == [(1, 1), (1, 2), (1, 3)]  # the whole embedding opens the second window
            assert ids[0, 74].item() == encoders[0].tokenizer.eos_token_id  # the first ends after the 73 words
    fits = _read(encoders, ["word " * 72 + NAME], "a1111", "chunks", embeddings)
    assert fits.windows == 1 and fits.vectors[0][0] == [(0, 73), (0, 74), (0, 75)]
    assert CHUNK_TOKENS == 75


def test_a1111_matches_names_as_its_token_match_does(generator, tmp_path):
    encoders = generator.base.text_encoders
    short = _write_ti(tmp_path / "bad.safetensors", encoders, count=1, seed=1)
    long = _write_ti(tmp_path / "bad hands.safetensors", encoders, count=2, seed=2)
    embeddings = {"bad": read_embedding(short), "bad hands": read_embedding(long)}
    reading = _read(encoders, ["bad hands, bad feet, badly"], "a1111", "chunks", embeddings)
    where = reading.vectors[0][0]
    assert where == [(0, 1), (0, 2), (0, 4)]  # "bad hands" (the longer name first) then "bad"; not in "badly"
    assert a1111_mentions("A photo, EasyNegative", "easynegative")
    assert a1111_mentions("bad_prompt_v2", "bad_prompt") and a1111_mentions("x2easy", "easy")
    assert not a1111_mentions("easynegatives", "easynegative") and not a1111_mentions("ab,,", "ab,")


def test_comfyui_lookup_rules(tmp_path, generator):
    """``load_embed``: the path inside any embeddings folder or subfolder of one (``expand_directory_list``), as
    written or with .safetensors/.pt/.bin added (in that order); a path out of the folder is none. ComfyUI's folders
    are a set, so a name two of them hold is taken from either by chance: refused here. ``_try_get_embedding``:
    trailing commas are retried without. (Checked against the real ``load_embed`` on these files, under several hash
    seeds, in a scratch folder.)"""
    encoders = generator.base.text_encoders
    first, second = tmp_path / "a", tmp_path / "b"
    _write_ti(first / "sub" / "hands.safetensors", encoders)
    _write_ti(second / "hands.pt", encoders)
    _write_ti(second / "hands.safetensors", encoders)
    _write_ti(second / "deep" / "er" / "feet.bin", encoders)
    _write_ti(tmp_path / "outside.safetensors", encoders)
    folders = (first, second)
    assert comfyui_embedding(folders, "sub/hands") == first / "sub" / "hands.safetensors"
    assert comfyui_embedding(folders, "hands.pt") == second / "hands.pt"
    assert comfyui_embedding(folders, "feet") == comfyui_embedding(folders, "er/feet") == second / "deep/er/feet.bin"
    assert comfyui_embedding(folders, "../outside") is None and comfyui_embedding(folders, "Hands.pt") is None
    with pytest.raises(InvalidRequestError, match=r"embedding:hands is ambiguous: found in\n.*a/sub/hands.safetensors"
                       r"\n.*b/hands.safetensors"):  # fmt: skip
        comfyui_embedding(folders, "hands")
    assert comfyui_references("a embedding:x, (embedding:y:1.2)\nembedding:z") == ["x,", "y", "z"]
    assert comfyui_references("xembedding:no embedding:") == [""]  # only after a space, a line break or at the start


def test_bad_embedding_files_and_names_are_refused(tmp_path, generator):
    sd15 = tmp_path / "old.pt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "old"}, sd15)
    with pytest.raises(InputError, match=r"embedding old .*old\.pt.* SD 1\.5 embedding .*use the SDXL version"):
        read_embedding(sd15)
    single = tmp_path / "single.safetensors"
    save_file({"emb_params": torch.zeros(4, 768)}, str(single))
    with pytest.raises(InputError, match="SD 1.5 embedding"):
        read_embedding(single)
    odd = tmp_path / "odd.safetensors"
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, str(odd))
    with pytest.raises(InputError, match="2 clip_l vectors but 3 clip_g"):
        read_embedding(odd)
    real_width = tmp_path / "real.safetensors"
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(real_width))
    with pytest.raises(IncompatibleModelError, match="768 wide but the model's text_encoder reads 32"):
        _ours(generator, real_width, "a real")  # on the tiny models, whose encoders are narrower
    with pytest.raises(InvalidRequestError, match=r"embedding:nope, which is no embedding given.*--models-dir"):
        GenerationRequest("a photo, embedding:nope", emphasis="comfyui")
    with pytest.raises(InvalidRequestError, match=r"embedding:nope, found in no embeddings folder \(looked in: "):
        resolve(JobSpec("a photo, embedding:nope", settings={"emphasis": "comfyui"}),
                HubResolver(folders=ModelFolders({"embeddings": (tmp_path,)})))  # fmt: skip


@pytest.fixture
def a1111_install(tmp_path, generator) -> Path:
    root = tmp_path / "webui"
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    _write_ti(root / "embeddings" / "negatives" / f"{NAME}.safetensors", generator.base.text_encoders)
    return root


def test_a_job_finds_embeddings_in_the_model_folders_and_records_them(generator, a1111_install):
    resolver = HubResolver(folders=ModelFolders.of([a1111_install], environment=False))
    file = a1111_install / "embeddings" / "negatives" / f"{NAME}.safetensors"
    job = resolve(JobSpec("a fox", settings={"negative_prompt": f"blurry, {NAME}", "steps": 2, "size": (64, 64),
                                             "seed": 1}), resolver)  # fmt: skip
    assert job.request.embeddings == {NAME: str(file.resolve())}
    assert resolve(JobSpec("a fox", settings={"negative_prompt": f"{NAME}s"}), resolver).request.embeddings == {}
    result = generator.run(job.request, progress_bar=False)
    recipe = result.images[0].recipe
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    assert recipe["embeddings"] == {NAME: {"file": f"{NAME}.safetensors", "sha256": digest}}
    text = parameters_text(recipe)
    assert f'TI hashes: "{NAME}: {digest[:12]}"' in text
    imported = read_a1111(text)
    assert imported.settings["embeddings"] == {NAME: NAME}
    assert not [u for u in imported.unmapped if "TI hashes" in u]
    again = resolve(imported.under(JobSpec()), resolver)  # the name found again in the folders
    assert again.request.embeddings == {NAME: str(file.resolve())}
    remade = generator.run(GenerationRequest.from_recipe(recipe), progress_bar=False)
    assert remade.images[0].tobytes() == result.images[0].tobytes()
    plain = generator.run(GenerationRequest("a fox", negative_prompt=f"blurry, {NAME}", steps=2, size=(64, 64),
                                            seed=1), progress_bar=False)  # fmt: skip
    assert plain.images[0].tobytes() != result.images[0].tobytes()  # the vectors made the difference
    with pytest.raises(InputError, match=f"embedding {NAME} .* is not on this machine"):
        resolve(imported.under(JobSpec()), HubResolver(folders=ModelFolders()))


def test_a_dry_run_line_names_the_embeddings_by_content_and_runs_again(a1111_install, tiny, capsys):
    """``--dry-run`` prints the job with each embedding by name and SHA-256; a job file of that line finds it."""
    import json

    from sdxl_control.cli import main
    from sdxl_control.jobs.job_file import parse_job

    assert main(["generate", f"a {NAME} fox", "--tiny", "--steps", "2", "--models-dir", str(a1111_install),
                 "--dry-run"]) == 0  # fmt: skip
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    file = a1111_install / "embeddings" / "negatives" / f"{NAME}.safetensors"
    assert line["embeddings"] == {NAME: {"file": file.name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}}
    job = parse_job(line, 1)
    assert job.request.embeddings == {NAME: str(file.resolve())}


def test_a_comfyui_prompt_finds_its_embeddings_as_comfyui_does(generator, tmp_path):
    root = tmp_path / "ComfyUI"
    file = _write_ti(root / "models" / "embeddings" / "sub" / f"{NAME}.safetensors", generator.base.text_encoders)
    resolver = HubResolver(folders=ModelFolders.of([root], environment=False))
    prompt = f"a photo, embedding:sub/{NAME}, (embedding:{NAME}:1.2)\nembedding:{NAME}.safetensors"
    job = resolve(JobSpec(prompt, settings={"emphasis": "comfyui", "steps": 2, "size": (64, 64)}), resolver)
    found = str(file.resolve())
    assert job.request.embeddings == {f"sub/{NAME}": found, NAME: found, f"{NAME}.safetensors": found}
    reading = _read(generator.base.text_encoders, [prompt], "comfyui", "chunks",
                    {k: read_embedding(v, k) for k, v in job.request.embeddings.items()})  # fmt: skip
    assert len(reading.vectors[0][0]) == 9  # three references of three vectors each
    generator.run(job.request, progress_bar=False)
