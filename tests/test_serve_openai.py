"""OpenAI's images API on ``sdxl-control serve`` (issue 37, part 3), driven by the real ``openai`` package (its own
request building and response parsing, 3.63.0) and by Open WebUI's exact requests, on the tiny models.

Open WebUI's requests are read from open-webui/open-webui, backend/open_webui/routers/images.py @
02530d501461ce58ab06231d7c2ef2024a141ddf: ``image_generations`` and ``image_edits`` (engine "openai") build them,
``get_image_file_item`` names and types the file parts, ``get_image_data`` reads the answer.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from sdxl_control.base.defaults import DEFAULT_BASE
from sdxl_control.jobs.resolvers import TinyResolver
from sdxl_control.jobs.spec import JobSpec, resolve
from sdxl_control.serve.openai_images import openai_mask
from tests.serving import running_server

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

STEPS = {"steps": 2}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_server() as (url, _app):
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    # max_retries=0: the package retries 5xx answers; these tests assert the first answer.
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def reference() -> Any:
    """Runs a JobSpec as a Python caller would, on its own Runner: what the served images must equal."""
    from sdxl_control.jobs.runner import Runner

    runner = Runner(device="cpu")

    def run(prompt: str, **settings: Any) -> list[Image.Image]:
        spec = JobSpec(prompt, settings=settings, models={"base": DEFAULT_BASE})
        return list(runner.run(resolve(spec, TinyResolver())).images)

    return run


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def photo(seed: int = 0, size: tuple[int, int] = (64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def left_half_transparent(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """OpenAI's mask: the left half fully transparent (edited), the right half opaque (kept)."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    return mask


def test_generate_through_the_openai_package_is_the_job_a_python_caller_runs(
    client: openai.OpenAI, reference: Any
) -> None:
    """images.generate answers OpenAI's ImagesResponse (parsed by the package's own model); its images are the
    pixels of the same job run from Python; an OpenAI model name runs the current checkpoint, and says so."""
    answer = client.images.generate(
        prompt="a fox", model="dall-e-3", n=2, size="64x64", response_format="b64_json", style="vivid",
        extra_body={**STEPS, "seed": 7},
    )  # fmt: skip
    assert isinstance(answer, openai.types.ImagesResponse)
    assert answer.size == "64x64" and answer.output_format == "png" and len(answer.data or []) == 2
    ours = answer.model_extra["sdxl_control"]
    assert ours["model"] == "sd_xl_base_1.0" and ours["seeds"] == [7, 8]
    assert any("dall-e-3" in note for note in ours["not_done"]) and any("style" in n for n in ours["not_done"])
    served = [decoded(image.b64_json or "") for image in answer.data or []]
    expected = reference("a fox", num_images=2, size=(64, 64), steps=2, seed=7)
    for got, want in zip(served, expected, strict=True):
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
        assert json.loads(got.info["sdxl-control"])["seed"] == want.recipe["seed"]


def test_a_listed_checkpoint_is_chosen_by_its_title_and_models_lists_them(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids == ["sd_xl_base_1.0", "sd_xl_refiner_1.0"]
    answer = client.images.generate(prompt="a fox", model=ids[0], size="64x64", extra_body={**STEPS, "seed": 1})
    assert answer.model_extra["sdxl_control"] == {"model": ids[0], "seeds": [1], "not_done": []}


def test_jpeg_and_webp_outputs_are_those_formats(client: openai.OpenAI) -> None:
    for name, pil in (("jpeg", "JPEG"), ("webp", "WEBP")):
        answer = client.images.generate(prompt="a fox", size="64x64", output_format=name, extra_body=STEPS)
        assert answer.output_format == name
        assert decoded((answer.data or [])[0].b64_json or "").format == pil


def test_openai_mask_is_white_where_transparent() -> None:
    """OpenAI: "fully transparent areas (e.g. where alpha is zero) indicate where image should be edited"
    (openai/types/image_edit_params.py); ours: white repaints. Half-transparent pixels are kept."""
    mask = Image.new("RGBA", (4, 1), (9, 9, 9, 255))
    mask.putpixel((0, 0), (9, 9, 9, 0))
    mask.putpixel((1, 0), (255, 255, 255, 0))
    mask.putpixel((2, 0), (0, 0, 0, 128))
    assert list(openai_mask(mask, (4, 1)).getdata()) == [255, 255, 0, 0]


def test_edit_with_a_mask_repaints_the_transparent_area_as_an_inpainting_job(
    client: openai.OpenAI, reference: Any
) -> None:
    """images.edit with ``image`` and ``mask`` (the package's multipart) is the inpainting job whose mask is white
    where OpenAI's mask is transparent: the same pixels as that job from Python."""
    source = photo(1)
    answer = client.images.edit(
        image=("photo.png", png_bytes(source), "image/png"),
        mask=("mask.png", png_bytes(left_half_transparent()), "image/png"),
        prompt="a fox",
        extra_body={**STEPS, "seed": 3},
    )
    edited = decoded((answer.data or [])[0].b64_json or "")
    assert edited.size == (64, 64) and answer.size == "64x64"
    ours = Image.new("L", (64, 64), 0)
    ours.paste(255, (0, 0, 32, 64))
    expected = reference("a fox", init_image=source, mask=ours, steps=2, seed=3)[0]
    assert np.array_equal(np.asarray(edited.convert("RGB")), np.asarray(expected))
    recipe = json.loads(edited.info["sdxl-control"])
    assert recipe["strength"] == 1.0 and recipe["mask"]["mode"] == "L"


def test_edit_of_an_image_list_edits_the_first_with_the_others_as_references(server: str) -> None:
    """A list of images goes as ``image[]`` parts (the package's array format, seen on the wire); the first is
    redrawn (img2img, at denoising_strength, at the size asked), the others are IP-Adapter references."""
    import httpx2

    sent: list[bytes] = []

    def keep(request: httpx2.Request) -> None:
        sent.append(request.read())

    http = httpx2.Client(event_hooks={"request": [keep]}, timeout=300)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, http_client=http)
    answer = client.images.edit(
        image=[("a.png", png_bytes(photo(2)), "image/png"), ("b.png", png_bytes(photo(3, (48, 40))), "image/png")],
        prompt="a fox",
        size="32x32",
        extra_body={**STEPS, "seed": 4, "denoising_strength": 0.5},
    )
    edited = decoded((answer.data or [])[0].b64_json or "")
    recipe = json.loads(edited.info["sdxl-control"])
    assert edited.size == (32, 32) and answer.size == "32x32" and recipe["size"] == [32, 32]
    assert recipe["strength"] == 0.5 and recipe["init_image"]["image"] == [64, 64] and recipe.get("mask") is None
    assert sent[0].count(b'name="image[]"') == 2 and b'name="image"' not in sent[0]
    assert [condition["kind"] for condition in recipe["conditions"]] == ["ip-adapter"]


def open_webui_images(res: dict[str, Any]) -> list[tuple[bytes, str]]:
    """Open WebUI's reading of an answer (``for image in res['data']``: a ``url`` is fetched, else
    ``get_image_data(image['b64_json'])``: a data URL, or raw base64 taken as image/png)."""
    out = []
    for image in res["data"]:
        assert not image.get("url", None), "Open WebUI would fetch this URL"
        data = image["b64_json"]
        if "," in data:
            header, encoded = data.split(",", 1)
            out.append((base64.b64decode(encoded), header.split(";")[0].lstrip("data:")))  # noqa: B005 (Open WebUI's own reading)
        else:
            out.append((base64.b64decode(data), "image/png"))
    return out


def raw_post_json(server: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
    """A POST sent byte for byte (httpx refuses the header ``Authorization: Bearer `` that aiohttp sends)."""
    import socket
    from urllib.parse import urlparse

    where = urlparse(server)
    content = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {where.netloc}", *(f"{k}: {v}" for k, v in headers.items()),
             f"Content-Length: {len(content)}", "Connection: close", "", ""]  # fmt: skip
    with socket.create_connection((where.hostname, where.port), timeout=300) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1") + content)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, payload = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def test_open_webui_generations_request_replayed(server: str) -> None:
    """Open WebUI's openai engine (``image_generations``): JSON ``{model, prompt, n, size, response_format}`` with
    its admin's "OpenAI API params" merged last, ``Authorization: Bearer <key>`` (no key set: ``Bearer ``); with a
    ``^gpt-image`` model it leaves out ``response_format``, and size may be ``auto``."""
    headers = {"Authorization": "Bearer ", "Content-Type": "application/json"}
    data = {"model": "dall-e-2", "prompt": "a fox", "n": 2, "size": "64x64", "response_format": "b64_json", **STEPS}
    status, res = raw_post_json(server, "/v1/images/generations", data, headers)
    assert status == 200, res
    images = open_webui_images(res)
    assert len(images) == 2
    for payload, mime in images:
        assert mime == "image/png" and Image.open(io.BytesIO(payload)).size == (64, 64)
    data = {"model": "gpt-image-1", "prompt": "a fox", "n": 1, "size": "auto", **STEPS}
    answer = httpx.post(f"{server}/v1/images/generations", json=data, headers={"Authorization": "Bearer sk-x"},
                        timeout=300)  # fmt: skip
    answer.raise_for_status()
    ((payload, mime),) = open_webui_images(answer.json())
    assert Image.open(io.BytesIO(payload)).size == (128, 128)  # auto: the server's size (--tiny's scale)


def test_open_webui_edits_request_replayed(server: str) -> None:
    """Open WebUI's openai engine (``image_edits``): multipart text fields ``model`` (possibly ``""``), ``prompt``,
    ``n`` (if set), ``size`` (if it holds an 'x'), ``response_format``, every value ``str()``'d; one image as a file
    part ``image``, several as ``image[]``, each named ``<uuid4>.png`` with its data URL's type; no mask."""
    for model, images in (("", [photo(5)]), ("dall-e-2", [photo(6), photo(7)])):
        data = {"model": model, "prompt": "a fox", "n": "1", "size": "64x64", "response_format": "b64_json"}
        name = "image" if len(images) == 1 else "image[]"
        files = [(name, (f"{uuid.uuid4()}.png", png_bytes(image), "image/png")) for image in images]
        answer = httpx.post(f"{server}/v1/images/edits", data=data, files=files,
                            headers={"Authorization": "Bearer sk-x"}, timeout=300)  # fmt: skip
        answer.raise_for_status()
        ((payload, mime),) = open_webui_images(answer.json())
        assert mime == "image/png" and Image.open(io.BytesIO(payload)).size == (64, 64)


@pytest.mark.parametrize(
    ("arguments", "param", "says"),
    [
        ({"size": "20000x20000"}, "size", "20000x20000"),
        ({"size": "big"}, "size", "'big'"),
        ({"size": "100x64"}, "size", "multiples of 8"),
        ({"model": "nope"}, "model", "'nope'"),
        ({"model": "/etc/passwd"}, "model", "'/etc/passwd'"),
        ({"model": "../models/x.safetensors"}, "model", "x.safetensors"),
        ({"response_format": "url"}, "response_format", "b64_json"),
        ({"n": 99}, "n", "99"),
        ({"background": "transparent"}, "background", "transparent"),
        ({"output_format": "gif"}, "output_format", "gif"),
        ({"extra_body": {"steps": 10**6}}, "steps", "1000000"),
        ({"extra_body": {"sampler_name": "Nope"}}, "sampler_name", "Nope"),
        ({"extra_body": {"hires": True}}, "hires", "Unknown parameter"),
    ],
)
def test_bad_generations_raise_the_packages_typed_errors_naming_the_field(
    client: openai.OpenAI, arguments: dict[str, Any], param: str, says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", **arguments)
    assert caught.value.param == param and says in caught.value.message
    assert caught.value.type == "invalid_request_error"


def test_bad_edits_raise_the_packages_typed_errors_naming_the_field(client: openai.OpenAI) -> None:
    image = ("photo.png", png_bytes(photo(8)), "image/png")
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"image": ("notes.txt", b"not an image", "text/plain")}, "image", "not a readable image"),
        ({"image": image, "mask": ("m.png", png_bytes(Image.new("RGB", (64, 64))), "image/png")}, "mask", "alpha"),
        ({"image": image, "mask": ("m.png", png_bytes(left_half_transparent((32, 32))), "image/png")}, "mask",
         "32x32"),
        ({"image": image, "model": "/etc/passwd"}, "model", "'/etc/passwd'"),
        ({"image": image, "extra_body": {"denoising_strength": 2}}, "denoising_strength", "strength must lie"),
    ]  # fmt: skip
    for arguments, param, says in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.edit(prompt="a fox", **arguments)
        assert caught.value.param == param and says in caught.value.message, caught.value.message


def test_with_api_auth_the_package_authenticates_by_its_key_or_basic_auth() -> None:
    """Under --api-auth a key that is no USER:PASS is refused (401: AuthenticationError); the key "me:secret" (sent
    as ``Bearer me:secret``, as Open WebUI's OpenAI engine sends its key) is taken, and so is HTTP Basic in the
    package's default_headers, as the docs say."""
    from tests.serving import tiny_config

    with running_server(tiny_config(auth={"me": "secret"})) as (url, _app):
        for key in ("x", "me:wrong", "you:secret"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="me:secret", max_retries=0)
        assert [model.id for model in keyed.models.list()] == ["sd_xl_base_1.0", "sd_xl_refiner_1.0"]
        basic = "Basic " + base64.b64encode(b"me:secret").decode()
        allowed = openai.OpenAI(
            base_url=f"{url}/v1", api_key="x", max_retries=0, default_headers={"Authorization": basic}
        )
        assert [model.id for model in allowed.models.list()] == ["sd_xl_base_1.0", "sd_xl_refiner_1.0"]


def test_a_full_queue_answers_503_with_retry_after_in_openais_shape() -> None:
    from sdxl_control.serve.openai_images import _as_openai_error
    from sdxl_control.serve.service import ServerBusyError

    answer = _as_openai_error(ServerBusyError("the queue is full (8 jobs)", retry_after=7)).response()
    assert answer.status_code == 503 and answer.headers["retry-after"] == "7"
    assert json.loads(answer.body)["error"] == {
        "message": "the queue is full (8 jobs)",
        "type": "server_error",
        "param": None,
        "code": "server_busy",
    }


def test_a_job_stopped_before_its_image_is_an_error_the_package_does_not_retry() -> None:
    """An interrupted job (A1111's /interrupt, from another client) has no image to answer: a 503 that says so, with
    ``x-should-retry: false`` (the package would retry a 5xx otherwise)."""
    import asyncio
    from types import SimpleNamespace

    from sdxl_control.serve.openai_images import OpenAIError, _answer, _as_openai_error
    from sdxl_control.serve.service import Outcome

    async def run(request: Any, spec: JobSpec, label: str, **fields: Any) -> tuple[Outcome, Any]:
        return Outcome(result=None, interrupted=True), None

    listed = SimpleNamespace(title="sd_xl_base_1.0", source=DEFAULT_BASE)
    state = SimpleNamespace(run=run, checkpoint=listed)
    with pytest.raises(OpenAIError) as caught:
        asyncio.run(_answer(state, None, {"prompt": "a"}, JobSpec("a"), [], "test"))  # type: ignore[arg-type]
    answer = _as_openai_error(caught.value).response()
    assert answer.status_code == 503 and answer.headers["x-should-retry"] == "false"
    assert "interrupted" in json.loads(answer.body)["error"]["message"]


def test_errors_keep_the_a1111_shape_on_the_a1111_routes(server: str) -> None:
    answer = httpx.post(f"{server}/sdapi/v1/txt2img", json={"prompt": "a", "sampler_name": "Nope"}, timeout=60)
    assert answer.status_code == 422 and "detail" in answer.json() and "error" in answer.json()
    answer = httpx.post(f"{server}/v1/images/generations", content=b"{not json", timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"
