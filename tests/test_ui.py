"""The web page, driven in a real browser (headless Chromium through Playwright) against the page serving the tiny
models: generate with a face and a style, previews before the image, the downloaded PNG re-makes its pixels, bad
uploads answered in the page, two sessions at once, Stop then generate again."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("SDXL_CONTROL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = Path(os.environ.get("SDXL_CONTROL_SCREENSHOTS", Path(__file__).resolve().parents[1] / "screenshots"))
TIMEOUT = 120_000  # ms: a tiny-model generation on a 2-core CPU, with model loading on the first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ui_outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("ui-outputs")


@pytest.fixture(scope="module")
def page_url(tiny, insightface_root, ui_outputs):
    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.ui import UiConfig, build_app

    if CHROMIUM is None:
        pytest.fail("no Chromium found: install Debian's chromium package (CI does), or set SDXL_CONTROL_CHROMIUM")
    config = UiConfig(resolver=TinyResolver(), face_pack=str(insightface_root / "models" / "buffalo_l"),
                      outputs=ui_outputs)  # fmt: skip
    app = build_app(config)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    app.close()


@pytest.fixture(scope="module")
def reference(tiny):
    """A Generator of its own, loaded like the page's: what the page's images must equal."""
    from sdxl_control import Generator

    return Generator.from_pretrained(tiny.base, tiny.refiner, device="cpu")


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.set_default_timeout(TIMEOUT)
    page.goto(url)
    page.wait_for_selector("#generate")
    page.wait_for_selector("#preview", state="attached")  # Gradio may render it after the button
    # Every image the preview shows, in order, recorded by the page itself.
    page.evaluate("""() => {
        window.previews = [];
        new MutationObserver(() => {
            const img = document.querySelector('#preview img');
            if (img && img.src && window.previews[window.previews.length - 1] !== img.src) window.previews.push(img.src);
        }).observe(document.querySelector('#preview'), {subtree: true, childList: true, attributes: true});
    }""")
    return page


def _set_number(page, elem_id, value):
    field = page.locator(f"#{elem_id} input").first
    field.fill(str(value))
    field.press("Tab")


def _fill(page, prompt, *, seed=None, steps=None):
    page.locator("#prompt textarea").fill(prompt)
    if seed is not None:
        page.locator("#random-seed input").uncheck()
        _set_number(page, "seed", seed)
    if steps is not None:
        _set_number(page, "steps", steps)


def _downloads(page, count_before=0):
    page.wait_for_function(f"document.querySelectorAll('#downloads a').length > {count_before}")
    return [a.get_attribute("href") for a in page.locator("#downloads a").all()]


def _status(page):
    return page.locator("#status").inner_text()


def test_generate_in_a_real_browser(page_url, browser, photos_dir, tmp_path, reference):
    from sdxl_control import GenerationRequest
    from sdxl_control.records.recipe import read_recipe

    page = _open(browser, page_url)
    # Generate is in the first screen of a laptop's window, under the prompt.
    box = page.locator("#generate").bounding_box()
    assert box is not None and box["y"] + box["height"] < 700, box
    _fill(page, "a portrait in watercolour", seed=123, steps=8)
    page.locator("#faces input[type=file]").set_input_files(str(photos_dir / "obama.jpg"))
    page.wait_for_selector("#faces-found img")  # the photo, with the face found outlined
    page.locator("#style input[type=file]").set_input_files(str(photos_dir / "biden.jpg"))
    page.wait_for_timeout(500)
    page.click("#generate")
    links = _downloads(page)
    assert len(links) == 1
    previews = page.evaluate("window.previews")
    assert len(previews) >= 2, previews  # the image formed in front of the user before it was done
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "ui-generated.png"), full_page=True)
    # The downloaded PNG carries its recipe, and the recipe re-makes the same pixels.
    response = page.request.get(links[0] if links[0].startswith("http") else page_url + links[0])
    png = tmp_path / "downloaded.png"
    png.write_bytes(response.body())
    recipe = read_recipe(png)
    assert recipe["seed"] == 123 and recipe["prompt"] == "a portrait in watercolour"
    assert sorted(c["kind"] for c in recipe["conditions"]) == ["ip-adapter", "pulid"]  # the page's method: PuLID
    again = reference.run(GenerationRequest.from_recipe(recipe), progress_bar=False).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(png).convert("RGB")))
    # "Show what the conditions see": the face's keypoint map.
    page.click("#see")
    page.wait_for_selector("#maps img")
    # Dropping the PNG on the page restores its settings.
    page.reload()
    page.wait_for_selector("#generate")
    page.locator("#restore input[type=file]").set_input_files(str(png))
    page.wait_for_function("document.querySelector('#status').innerText.includes('restored')")
    assert page.locator("#prompt textarea").input_value() == "a portrait in watercolour"
    assert page.locator("#seed input").first.input_value() == "123"


def test_bad_input_is_answered_in_the_page_and_the_results_stay(page_url, browser, tmp_path):
    """A file that is not a photo is refused as it is uploaded (by its name, not a temporary path); an error at
    Generate is a message and the status, and the last results stay; the next call works."""
    page = _open(browser, page_url)
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    _fill(page, "a lighthouse", steps=4)
    page.click("#generate")
    assert len(_downloads(page)) == 1
    page.locator("#faces input[type=file]").set_input_files(str(notes))
    page.locator(".toast-body", has_text="notes.jpg is not an image").wait_for()
    page.wait_for_function("!document.querySelector('#faces a')")  # removed from the field
    _set_number(page, "width", 100)  # not a multiple of 8
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').innerText.includes('error')")
    assert "multiple" in _status(page) and "/tmp" not in _status(page)
    assert page.locator("#gallery img").count() >= 1 and len(_downloads(page)) == 1  # the last results stay
    page.screenshot(path=str(SCREENSHOTS / "ui-bad-input.png"), full_page=True)
    _set_number(page, "width", 128)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').innerText.includes('done')")


def test_two_sessions_at_once_both_finish(page_url, browser, tmp_path):
    from sdxl_control.records.recipe import read_recipe

    pages = [_open(browser, page_url) for _ in range(2)]
    # The first uses a preset from the picker: its numbers fill the page, its LoRA and decoder come with it.
    picker = pages[0].locator("#preset input")
    picker.click()
    picker.fill("draft")
    pages[0].keyboard.press("Enter")
    pages[0].wait_for_function("document.querySelector('#status').innerText.startsWith('draft')")
    assert pages[0].locator("#steps input").first.input_value() == "4"
    for i, page in enumerate(pages):
        _fill(page, f"a boat {i}", seed=10 + i)
    for page in pages:
        page.click("#generate")
    links = [_downloads(page) for page in pages]
    png = tmp_path / "draft.png"
    png.write_bytes(
        pages[0].request.get(links[0][0] if links[0][0].startswith("http") else page_url + links[0][0]).body()
    )
    recipe = read_recipe(png)
    assert recipe["steps"] == 4 and recipe["decoder"] and [c["kind"] for c in recipe["conditions"]] == ["lora"]


def test_stop_then_generate_equals_a_fresh_run(page_url, browser, tmp_path, reference):
    from sdxl_control import GenerationRequest

    page = _open(browser, page_url)
    _fill(page, "a mountain lake", seed=77, steps=100)
    page.click("#generate")
    page.wait_for_function("window.previews.length >= 1")
    page.click("#stop")
    page.wait_for_function(
        "['stopped', 'stopping', 'ready'].some(s => document.querySelector('#status').innerText.includes(s))"
    )
    page.wait_for_timeout(1000)
    _set_number(page, "steps", 6)
    page.click("#generate")
    links = _downloads(page)
    png = tmp_path / "after-stop.png"
    png.write_bytes(page.request.get(links[0] if links[0].startswith("http") else page_url + links[0]).body())
    fresh = reference.run(GenerationRequest("a mountain lake", size=(128, 128), steps=6, guidance=5.0, seed=77),
                          progress_bar=False).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(fresh), np.asarray(Image.open(png).convert("RGB")))


def test_the_page_is_an_http_api(page_url, tmp_path):
    """Gradio's client calls the same generate endpoint the page uses (the README's example)."""
    from gradio_client import Client

    from sdxl_control.records.recipe import read_recipe

    client = Client(page_url, verbose=False)
    result = client.predict(prompt="a red fox", seed=9, random_seed=False, steps=4, scheduler="dpmpp_2m",
                            api_name="/generate")  # fmt: skip
    preview, status, gallery, downloads = result  # the page's session state is not part of the API
    assert "done" in status and "seed 9" in status
    (png,) = downloads
    assert read_recipe(png)["seed"] == 9 and read_recipe(png)["scheduler"]["name"] == "dpmpp_2m"
    assert isinstance(preview, str) and Image.open(preview).size == (128, 128)  # the image, not an update object
    # Only what a client is meant to call is an endpoint; the page's own handlers are not.
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == {"/generate", "/conditions"} and not api["unnamed_endpoints"]
    # An error reaches the client as one.
    with pytest.raises(Exception, match="multiple"):
        client.predict(prompt="a red fox", width=100, api_name="/generate")
    # The face detailer's switch is a parameter of the same endpoint.
    *_, downloads = client.predict(prompt="a red fox", seed=9, random_seed=False, steps=4, detail_faces=True,
                                   detail_strength=0.3, api_name="/generate")  # fmt: skip
    recipe = read_recipe(downloads[0])
    assert recipe["detailer"]["strength"] == 0.3 and "found" in recipe["measurements"]["detailer"]


def _brush_share(png: bytes) -> float:
    """The share of a screenshot in the editor's default brush colour (a saturated red)."""
    import io

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    return float(red.mean())


def test_a_mask_painted_in_the_page_repaints_that_area(page_url, ui_outputs, browser, tmp_path, reference):
    """Start from an image in the page, paint a stroke over its left part with the editor's brush: the page saves the
    stroke as the mask, the recipe names it, and the image equals the library's inpainting with that mask."""
    from sdxl_control import GenerationRequest
    from sdxl_control.records.recipe import read_recipe

    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(init)
    page = _open(browser, page_url)
    _fill(page, "a red door", seed=31, steps=6)
    page.get_by_text("Start from an image").click()
    editor = page.locator("#init-image")
    placeholder = editor.get_by_text("Upload an image")
    placeholder.wait_for()
    for attempt in range(3):  # an upload given while the editor still mounts can be dropped: give it again
        if attempt == 0:
            editor.locator("input[type=file]").first.set_input_files(str(init))
        else:  # as a user does: click the placeholder, choose the file
            with page.expect_file_chooser() as chooser:
                placeholder.click()
            chooser.value.set_files(str(init))
        try:
            placeholder.wait_for(state="hidden", timeout=40_000)  # the picture is in the editor (slow under load)
            break
        except PlaywrightTimeout:
            assert attempt < 2, "the editor never showed the uploaded picture"
    page.wait_for_timeout(500)
    # The brush is the editor's tool from the start; the picture sits in the middle of the editor (at its zoom).
    box = editor.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for _ in range(3):  # a stroke begun while the editor still settles is lost: draw until it shows
        page.mouse.move(cx - 60, cy - 50)
        page.mouse.down()
        for k in range(1, 11):  # a stroke down the left part of the picture
            page.mouse.move(cx - 60, cy - 50 + 9 * k, steps=2)
        page.mouse.up()
        page.wait_for_timeout(500)
        if _brush_share(editor.screenshot()) > 0.04:
            break
    page.wait_for_timeout(500)
    editor.screenshot(path=str(SCREENSHOTS / "ui-painted-mask.png"))
    page.click("#generate")
    links = _downloads(page)
    png = tmp_path / "painted.png"
    png.write_bytes(page.request.get(links[0] if links[0].startswith("http") else page_url + links[0]).body())
    recipe = read_recipe(png)
    assert recipe["mask"] and recipe["strength"] == 0.75
    (mask_file,) = ui_outputs.glob("mask-*.png")
    mask = np.asarray(Image.open(mask_file)) > 127
    ys, xs = np.nonzero(mask)
    assert mask.shape == (128, 128) and 0.05 < mask.mean() < 0.6  # a stroke, not the picture
    assert xs.mean() < 64 and xs.max() < 110  # on its left part, where it was drawn
    ours = reference.run(GenerationRequest("a red door", init_image=str(init), mask=str(mask_file), strength=0.75,
                                           steps=6, seed=31, guidance=5.0), progress_bar=False).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(ours), np.asarray(Image.open(png).convert("RGB")))


def test_the_page_says_missing_models_as_it_opens(tiny, tmp_path):
    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.ui import UiConfig, _Page

    assert _Page(UiConfig(resolver=TinyResolver(), outputs=tmp_path)).opening_status() == "ready"
    status = _Page(UiConfig(base="someone/missing-sdxl", outputs=tmp_path)).opening_status()
    assert status.startswith("**models missing**") and "someone/missing-sdxl" in status and "hf download" in status


def test_the_generations_warnings_reach_the_page_by_file_name():
    import logging
    import queue
    import threading

    from sdxl_control.ui import _warnings_of

    events: queue.Queue = queue.Queue()
    log = logging.getLogger("sdxl_control.preprocessors.face")
    worker = threading.Thread(target=lambda: log.warning("%d faces in %s: using the largest", 2, "/tmp/up/a/me.jpg"))
    with _warnings_of(worker, events):
        log.warning("from another thread: not this generation's")
        worker.start()
        worker.join()
    log.warning("after the generation")
    assert list(events.queue) == [("warning", "2 faces in me.jpg: using the largest")]


def test_the_page_form_has_a_sampler_and_pulid_for_faces(tmp_path):
    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.ui import PageForm, UiConfig, form_spec

    config = UiConfig(resolver=TinyResolver(), outputs=tmp_path)
    assert form_spec(PageForm("x", scheduler="dpmpp_2m_karras"), config, seed=1).settings["scheduler"] == (
        "dpmpp_2m_karras"
    )
    assert "scheduler" not in form_spec(PageForm("x"), config, seed=1).settings  # the preset's, else the default
    assert PageForm().identity == "pulid"  # as the portrait preset and the README's page example


def test_an_uploaded_face_is_shown_with_the_faces_its_method_finds(tiny, tmp_path, photos_dir):
    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.ui import UiConfig, _Page

    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    page = _Page(UiConfig(resolver=TinyResolver(), outputs=tmp_path))
    photo = str(photos_dir / "obama.jpg")
    for method in ("pulid", "faceid"):  # antelopev2's detector, then buffalo_l's
        kept, shown = page.faces_uploaded([photo, str(notes)], method)
        assert kept == [photo] and len(shown) == 1 and shown[0][1] == "obama.jpg: 1 face(s)"
        assert shown[0][0].size == Image.open(photo).size


def test_a_lora_an_imported_png_names_but_this_machine_lacks_is_said_alike_on_the_page_and_the_cli(
    tiny, tmp_path, capsys
):
    """One behaviour for both front-ends: a LoRA named by an A1111 PNG and not found is exit 4 on the command line,
    before anything loads, and the page restoring the same PNG shows the same message; once the LoRA is in a
    ``--models-dir`` install, neither says it and the command line runs with it."""
    from PIL import PngImagePlugin

    from sdxl_control.cli import main
    from sdxl_control.jobs.png_import import missing_loras, read_image_settings
    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.records.recipe import read_recipe
    from sdxl_control.testing.lora import write_tiny_lora
    from sdxl_control.ui import UiConfig, _Page
    from sdxl_control.weights.model_folders import ModelFolders

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a fox <lora:add-detail-xl:0.6>\nSteps: 2, Sampler: Euler a, CFG scale: 6, Seed: 3, "
                                "Size: 64x64")  # fmt: skip
    png = tmp_path / "a1111.png"
    Image.new("RGB", (64, 64)).save(png, pnginfo=info)
    (expected,) = missing_loras(read_image_settings(png), TinyResolver(), "a1111.png").values()
    assert "LoRA add-detail-xl (weight 0.6), named by a1111.png" in expected and "--models-dir" in expected
    out = tmp_path / "again.png"
    capsys.readouterr()
    assert main(["generate", "--recipe", str(png), "--tiny", "-q", "-o", str(out)]) == 4
    assert expected in capsys.readouterr().err and not out.exists()
    status = _Page(UiConfig(resolver=TinyResolver(), outputs=tmp_path)).restore(str(png))[-1]
    assert expected in status

    install = tmp_path / "ComfyUI"
    (install / "models" / "loras").mkdir(parents=True)
    write_tiny_lora(install / "models" / "loras" / "add-detail-xl.safetensors", tiny.base, "kohya", seed=1)
    resolver = TinyResolver(folders=ModelFolders.of([install], environment=False))
    status = _Page(UiConfig(resolver=resolver, outputs=tmp_path)).restore(str(png))[-1]
    assert "is not on this machine" not in status and "LoRA add-detail-xl: add its file under LoRAs" in status
    assert main(["generate", "--recipe", str(png), "--tiny", "--models-dir", str(install), "-q", "-o", str(out)]) == 0
    assert [(c["kind"], c["scale"]) for c in read_recipe(out)["conditions"]] == [("lora", 0.6)]


def test_a_recipe_of_an_earlier_release_says_the_page_reads_it_as_this_one(tmp_path):
    """The page restores a recipe's prompt, size, steps, guidance, seed, switch and sampler, and runs them as this
    release reads them; a recipe recorded by an earlier release (here 0.1.0, tests/golden/recipes) says so and names
    the command that re-makes its pixels, rather than passing silently for one the page re-makes."""
    from pathlib import Path

    from sdxl_control.base.version import VERSION
    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.ui import UiConfig, _Page

    old = Path(__file__).parent / "golden" / "recipes" / "lora-controlnet-0.1.png"
    status = _Page(UiConfig(resolver=TinyResolver(), outputs=tmp_path)).restore(str(old))[-1]
    assert "recorded by sdxl-control 0.1.0" in status and f"as {VERSION} reads them" in status
    assert "`generate --recipe lora-controlnet-0.1.png` re-makes its pixels" in status


def test_regions_painted_or_typed_and_the_guidance_controls_make_the_command_lines_conditions(tmp_path):
    """The page's Regions and Guidance fields fill the same input slots as ``--region``, ``--pag-scale``, ``--apg``
    and ``--freeu``: the conditions built from the page's job equal those of the command line's, a painted layer
    becoming a mask white exactly where its strokes are."""
    from sdxl_control.cli import build_parser
    from sdxl_control.cli.generate import job_spec
    from sdxl_control.jobs.resolvers import HubResolver, TinyResolver
    from sdxl_control.jobs.slots import slot_conditions
    from sdxl_control.ui import PageForm, UiConfig, form_spec

    strokes = np.zeros((64, 64, 4), np.uint8)
    strokes[10:30, 40:60] = (255, 0, 0, 255)  # a red stroke: the region is where it is, whatever its colour
    layer, blank = tmp_path / "layer.png", tmp_path / "blank.png"
    Image.fromarray(strokes).save(layer)
    Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(blank)  # a layer left blank is no region
    folder = tmp_path / "outputs"
    folder.mkdir()
    form = PageForm("two animals", regions="0,0,0.5,1:a cat\n", region_paint={"background": None, "layers": [
        str(layer), str(blank)]}, region_prompts="a dog: brown", region_mode="attention", region_scale=0.7,
                    pag_scale=2.0, apg=True, apg_eta=0.0, freeu=True)  # fmt: skip
    spec = form_spec(form, UiConfig(resolver=TinyResolver(), outputs=folder), seed=1)
    page = slot_conditions(spec.inputs, spec.set)
    (mask,) = folder.glob("region-*.png")
    assert (np.asarray(Image.open(mask)) > 0).tolist() == (strokes[..., 3] > 0).tolist()
    argv = ["generate", "two animals", "--region", "0,0,0.5,1:a cat", "--region", f"{mask}:a dog: brown",
            "--region-mode", "attention", "--region-scale", "0.7", "--pag-scale", "2", "--apg", "0", "--freeu"]  # fmt: skip
    cli, _ = job_spec(build_parser().parse_args(argv), HubResolver())
    assert page == slot_conditions(cli.inputs, cli.set)
    assert [(c.kind, getattr(c, "prompt", None)) for c in page] == [
        ("region", "a cat"), ("region", "a dog: brown"), ("pag", None), ("apg", None), ("freeu", None)]  # fmt: skip
    assert page[1].mask == str(mask) and page[0].mode == "attention" and page[0].scale == 0.7
    # Nothing switched on: no condition at all (PAG 0 is off, as the condition at scale 0 is absent).
    assert slot_conditions(*(lambda s: (s.inputs, s.set))(form_spec(PageForm("x"), UiConfig(
        resolver=TinyResolver(), outputs=folder), seed=1))) == []  # fmt: skip


def test_painted_regions_without_their_prompts_are_refused_by_name(tmp_path):
    from sdxl_control.base.errors import InvalidRequestError
    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.ui import PageForm, UiConfig, form_spec

    layer = tmp_path / "layer.png"
    strokes = np.zeros((32, 32, 4), np.uint8)
    strokes[:8, :8, 3] = 255
    Image.fromarray(strokes).save(layer)
    form = PageForm("x", region_paint={"background": None, "layers": [str(layer)]}, region_prompts="")
    with pytest.raises(InvalidRequestError, match=r"Regions: 1 painted layer\(s\) and 0 prompt line\(s\)"):
        form_spec(form, UiConfig(resolver=TinyResolver(), outputs=tmp_path), seed=1)


def test_a_region_painted_in_the_page_becomes_a_region_of_the_recipe(page_url, ui_outputs, browser, tmp_path):
    """Paint a stroke on the Regions canvas, type its prompt, switch FreeU on: the recipe holds a Region whose mask is
    the stroke (on the left, where it was drawn) and a FreeU, as ``--region MASK:PROMPT --freeu`` make them."""
    from sdxl_control.records.recipe import read_recipe

    page = _open(browser, page_url)
    _fill(page, "two animals", seed=3, steps=2)
    page.get_by_text("Regions (a prompt per region)").click()
    editor = page.locator("#region-paint")
    editor.wait_for()
    page.wait_for_timeout(1000)
    box = editor.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for _ in range(3):  # a stroke begun while the editor still settles is lost: draw until it shows
        page.mouse.move(cx - 40, cy - 40)
        page.mouse.down()
        for k in range(1, 11):  # a stroke down the left part of the canvas
            page.mouse.move(cx - 40, cy - 40 + 8 * k, steps=2)
        page.mouse.up()
        page.wait_for_timeout(500)
        if _brush_share(editor.screenshot()) > 0.02:
            break
    editor.screenshot(path=str(SCREENSHOTS / "ui-painted-region.png"))
    page.locator("#region-prompts textarea").fill("a brown dog")
    page.get_by_text("Guidance (PAG, APG, FreeU)").click()
    page.locator("#freeu input").check()
    page.click("#generate")
    links = _downloads(page)
    png = tmp_path / "regions.png"
    png.write_bytes(page.request.get(links[0] if links[0].startswith("http") else page_url + links[0]).body())
    region, freeu = read_recipe(png)["conditions"]
    assert (region["kind"], region["prompt"], freeu["kind"]) == ("region", "a brown dog", "freeu")
    (mask_file,) = ui_outputs.glob("region-*.png")
    mask = np.asarray(Image.open(mask_file)) > 127
    ys, xs = np.nonzero(mask)
    assert 0.01 < mask.mean() < 0.6 and xs.mean() < mask.shape[1] / 2  # a stroke on the left, where it was drawn
