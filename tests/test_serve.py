"""``sdxl-control serve``'s core: a txt2img request through the A1111 route runs on the tiny models and answers as
A1111 answers (base64 PNGs carrying their infotext and recipe, ``info`` a JSON string)."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image

from tests.serving import running_server

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def server() -> str:
    with running_server() as (url, _app):
        yield url


def test_txt2img_answers_a1111s_shape(server: str) -> None:
    body = {"prompt": "a fox", "steps": 2, "seed": 5, "width": 64, "height": 64, "sampler_name": "Euler a"}
    answer = httpx.post(f"{server}/sdapi/v1/txt2img", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    info = json.loads(data["info"])
    assert info["seed"] == 5 and info["all_seeds"] == [5]
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    assert image.size == (64, 64)
    assert image.info["parameters"] == info["infotexts"][0]
    assert json.loads(image.info["sdxl-control"])["scheduler"]["name"] == "euler_a_linspace"


def test_an_unknown_sampler_is_refused_naming_it(server: str) -> None:
    answer = httpx.post(f"{server}/sdapi/v1/txt2img", json={"prompt": "a", "sampler_name": "Nope"}, timeout=60)
    assert answer.status_code == 422
    assert "sampler_name 'Nope'" in answer.json()["detail"]


def test_idle_progress_is_zero_with_no_jobs(server: str) -> None:
    state = httpx.get(f"{server}/sdapi/v1/progress", timeout=10).json()
    assert state["progress"] == 0 and state["state"]["job_count"] == 0
