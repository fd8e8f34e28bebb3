"""Preprocessors: canny on a real photograph, depth and pose through their real loading code, input handling."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from sdxl_control import ConditionError, InputError, MissingWeightsError
from sdxl_control.preprocessors import load_image, preprocess
from sdxl_control.preprocessors.edges import canny
from sdxl_control.testing import write_random_openpose, write_tiny_depth_estimator


@pytest.fixture(scope="module")
def astronaut():
    from skimage.data import astronaut

    return Image.fromarray(astronaut())


def test_canny_on_a_real_photo_finds_edges_where_the_contrast_is(astronaut):
    edges = np.asarray(canny(astronaut))[..., 0] > 0
    density = edges.mean()
    assert 0.02 < density < 0.25, density
    gray = np.asarray(astronaut.convert("L"), dtype=float)
    gradient = np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1))
    assert gradient[edges].mean() > 3 * gradient[~edges].mean()
    # The flat studio backdrop between face and shuttle has no edges; the face has many.
    assert edges[70:140, 310:360].mean() < 0.01
    assert edges[150:250, 150:300].mean() > 0.05


def test_canny_thresholds(astronaut):
    loose = (np.asarray(canny(astronaut, 10, 30)) > 0).mean()
    strict = (np.asarray(canny(astronaut, 200, 400)) > 0).mean()
    assert loose > strict
    with pytest.raises(ConditionError, match="both canny thresholds"):
        canny(astronaut, low=10)


def test_depth_through_transformers_loading(astronaut, tmp_path):
    folder = write_tiny_depth_estimator(tmp_path / "dpt")
    depth = preprocess("depth", astronaut, model=str(folder))
    values = np.asarray(depth)
    assert depth.size == astronaut.size and depth.mode == "RGB"
    assert values.min() == 0 and values.max() == 255


def test_pose_through_controlnet_aux_loading(astronaut, tmp_path):
    folder = write_random_openpose(tmp_path / "annotators")
    pose = preprocess("pose", astronaut.resize((128, 128)), model=str(folder))
    assert pose.size == (128, 128) and pose.mode == "RGB"


@pytest.mark.parametrize("name, model", [("depth", "Intel/dpt-hybrid-midas"), ("pose", "lllyasviel/Annotators")])
def test_missing_annotator_weights_say_what_to_fetch(astronaut, name, model):
    with pytest.raises(MissingWeightsError, match=f"hf download {model}"):
        preprocess(name, astronaut, model=model)


def test_image_modes_arrays_paths_and_exif(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10] = 255
    assert load_image(Image.fromarray(rgb).convert("RGBA")).mode == "RGB"
    assert load_image(Image.fromarray(rgb).convert("L")).size == (30, 20)
    assert load_image(Image.fromarray(rgb).convert("P")).mode == "RGB"
    sixteen = Image.fromarray((np.arange(20 * 30).reshape(20, 30) * 60).astype(np.uint16))
    assert sixteen.mode in ("I;16", "I")
    stretched = np.asarray(load_image(sixteen))
    assert stretched.min() == 0 and stretched.max() == 255
    assert load_image(rgb.astype(np.float32) / 255).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.moveaxis(rgb, -1, 0)).size == (30, 20)  # CHW
    transparent = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    assert load_image(transparent).getpixel((0, 0)) == (0, 0, 0)
    # EXIF orientation 6 (rotate 90° clockwise to display): a 30x20 file shows as 20x30.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(path, exif=exif)
    assert load_image(path).size == (20, 30)
    assert load_image(str(path)).size == (20, 30)


def test_bad_images(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable image"):
        load_image(broken)
    with pytest.raises(ConditionError, match="expected a path, PIL image or numpy array"):
        load_image(42)
    with pytest.raises(ConditionError, match="HxW, HxWx3 or HxWx4"):
        load_image(np.zeros((8, 8, 2), np.uint8))
