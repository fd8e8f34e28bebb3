"""Shared fixtures: tiny SDXL models written once per test session through the real diffusers layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from sdxl_control import Generator  # noqa: E402
from sdxl_control.testing import TinyModels, tiny_models  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
# ``SDXL_CONTROL_NO_SHARED=1`` runs the suite as a user's clone, which has no ../shared, does.
HAVE_SHARED = SHARED.is_dir() and not os.environ.get("SDXL_CONTROL_NO_SHARED")

# Under pytest-xdist each worker is one process of the machine's two: one thread each runs them side by side.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["SDXL_CONTROL_CACHE"] = str(tmp_path_factory.mktemp("sdxl-control-cache"))


@pytest.fixture(scope="session")
def tiny(_isolated_cache: None) -> TinyModels:
    # The default cache location (isolated above), so the CLI's --tiny finds the same folders.
    return tiny_models(seed=0)


@pytest.fixture(scope="session")
def generator(tiny: TinyModels) -> Generator:
    return Generator.from_pretrained(tiny.base, tiny.refiner, device="cpu")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared itself: for the tests whose point is its real files (SCRFD on real photos, TAESD-XL)."""
    if not HAVE_SHARED:
        pytest.skip(f"../shared/ is not beside this checkout ({SHARED}); it holds the real photos and models")
    return SHARED


@pytest.fixture(scope="session")
def real_detector() -> bool:
    """Whether ``insightface_root`` holds the real SCRFD detector (it finds no face where there is none); the
    stand-in of a clone without ../shared finds one in any picture."""
    return HAVE_SHARED


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photos of people under the names ../shared gives them (obama.jpg, obama2.jpg — the same man —, biden.jpg,
    two_people.jpg): ../shared's, or, in a clone without it, scikit-image's portraits (registry-shipped real photos):
    the astronaut, the astronaut framed otherwise, the cameraman, and the two side by side."""
    if HAVE_SHARED:
        return SHARED / "images"
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    astronaut = Image.fromarray(data.astronaut())
    camera = Image.fromarray(data.camera()).convert("RGB")
    astronaut.save(folder / "obama.jpg", quality=95)
    astronaut.crop((40, 0, 472, 432)).resize((400, 400)).save(folder / "obama2.jpg", quality=95)
    camera.save(folder / "biden.jpg", quality=95)
    pair = Image.new("RGB", (1024, 512))
    pair.paste(astronaut, (0, 0))
    pair.paste(camera, (512, 0))
    pair.save(folder / "two_people.jpg", quality=95)
    return folder


@pytest.fixture(scope="session")
def fresh(tiny: TinyModels) -> Generator:
    """A second load of the tiny models that no test attaches anything to: what the shared generator must equal."""
    return Generator.from_pretrained(tiny.base, tiny.refiner, device="cpu")


@pytest.fixture(scope="session")
def insightface_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """insightface's folder layout with ``antelopev2`` and ``buffalo_l`` packs: the real SCRFD detector from ../shared
    (in a clone without it, the stand-in detector, which finds one face in the middle of any photo) under each pack's
    detector name, and a tiny ArcFace-shaped recognition model under its recognition name."""
    import shutil

    from sdxl_control.testing.faces import write_tiny_detector_onnx, write_tiny_recognition_onnx

    root = tmp_path_factory.mktemp("insightface")
    for name, detector, recognition in (
        ("antelopev2", "scrfd_10g_bnkps", "glintr100"),
        ("buffalo_l", "det_10g", "w600k_r50"),
    ):
        pack = root / "models" / name
        pack.mkdir(parents=True)
        if HAVE_SHARED:
            shutil.copy(SHARED / "models" / "scrfd_500m_bnkps.onnx", pack / f"{detector}.onnx")
        else:
            write_tiny_detector_onnx(pack / f"{detector}.onnx")
        write_tiny_recognition_onnx(pack / f"{recognition}.onnx")
    return root


def as_reference(pipe: Any) -> Any:
    """``pipe`` (a diffusers pipeline, fully built) made ready to be compared with: no progress bar, and its weights
    frozen as ours are. Torch's CPU kernels take another path for a weight that requires grad, even under no_grad (a
    linear layer on a permuted input, as every transformer block's proj_in gets), which rounds last bits differently
    on some CPUs (1e-6 here on an Intel Xeon): a reference whose weights require grad would differ for that alone."""
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipes(tiny: TinyModels) -> tuple[Any, Any]:
    """diffusers' own SDXL base and refiner pipelines on the tiny models: the references our loop is compared with."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(tiny.base)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny.refiner)
    return as_reference(base), as_reference(refiner)


def pytest_configure(config: pytest.Config) -> None:
    # tests/test_serve_ray.py starts a local Ray runtime and Ray Serve (tens of seconds): `-m "not ray"` skips it.
    config.addinivalue_line("markers", "ray: starts a local Ray runtime and Ray Serve (slow); -m 'not ray' skips")
