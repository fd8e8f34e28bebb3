"""Face analysis through insightface's real FaceAnalysis code: the real SCRFD detector from ../shared on real
photographs, with a tiny ArcFace-shaped recognition model built in code."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_control import ConditionError, MissingWeightsError
from sdxl_control.adapters.faceid import FaceID
from sdxl_control.preprocessors.face import FaceAnalyzer
from sdxl_control.testing.faces import write_tiny_recognition_onnx
from sdxl_control.testing.ip_adapter import write_tiny_faceid_repo


@pytest.fixture(scope="module")
def pack(shared_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("insightface") / "models" / "tiny_pack"
    folder.mkdir(parents=True)
    shutil.copy(shared_dir / "models" / "scrfd_500m_bnkps.onnx", folder / "det_500m.onnx")
    write_tiny_recognition_onnx(folder / "w600k_tiny.onnx")
    return folder


@pytest.fixture(scope="module")
def astronaut():
    from skimage.data import astronaut

    return Image.fromarray(astronaut())


def test_finds_the_astronaut_and_aligns_her(pack, astronaut):
    face = FaceAnalyzer(str(pack)).analyze(astronaut)
    x0, y0, x1, y1 = face.bbox
    assert 150 < x0 < x1 < 300 and 30 < y0 < y1 < 220  # her face, not the helmet or the flag
    assert face.score > 0.5 and face.embedding.shape == (512,) and face.image_size == astronaut.size
    assert abs(float(np.linalg.norm(face.normed_embedding)) - 1.0) < 1e-5
    np.testing.assert_allclose(face.normed_embedding, face.embedding / np.linalg.norm(face.embedding), rtol=1e-6)
    left_eye, right_eye = face.landmarks[0], face.landmarks[1]
    assert left_eye[0] < right_eye[0] and abs(left_eye[1] - right_eye[1]) < 15
    assert face.aligned.size == (224, 224)


def test_pack_found_by_name_under_root(pack, astronaut):
    root = pack.parent.parent
    assert FaceAnalyzer("tiny_pack", root=root).analyze(astronaut).score > 0.5


def test_real_photos_and_several_faces(pack, shared_dir, caplog):
    analyzer = FaceAnalyzer(str(pack))
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg"):
        assert len(analyzer.faces(shared_dir / "images" / name)) == 1, name
    two = shared_dir / "images" / "two_people.jpg"
    faces = analyzer.faces(two)
    assert len(faces) == 2
    with caplog.at_level(logging.WARNING):
        chosen = analyzer.analyze(two)
    assert "2 faces" in caplog.text and "using the largest" in caplog.text
    areas = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in faces]
    assert (chosen.bbox[2] - chosen.bbox[0]) * (chosen.bbox[3] - chosen.bbox[1]) == pytest.approx(max(areas))


def test_no_face_and_tiny_face(pack, astronaut):
    analyzer = FaceAnalyzer(str(pack))
    with pytest.raises(ConditionError, match="no face found in blank.png"):
        analyzer.analyze(Image.new("RGB", (256, 256), (128, 128, 128)), "blank.png")
    # Her face is about 90x120 px: too small for a stricter analyser, with the size found in the message.
    with pytest.raises(ConditionError, match=r"the face in astronaut.png is 9\dx1\d\d px; at least 150 px"):
        FaceAnalyzer(str(pack), min_face=150).analyze(astronaut, "astronaut.png")


def test_missing_pack_says_where_and_how(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"insightface model pack 'buffalo_l' not found .*buffalo_l.zip"):
        FaceAnalyzer("buffalo_l", root=tmp_path)


def test_faceid_from_a_photo(generator, tiny, insightface_root, astronaut, tmp_path):
    pack = insightface_root / "models" / "buffalo_l"  # the real detector, or the stand-in in a clone without ../shared
    repo = write_tiny_faceid_repo(tmp_path / "faceid", tiny.base)
    run = dict(steps=4, size=(64, 64), seed=2, progress_bar=False)
    from_photo = generator.generate(
        "x", conditions=[FaceID("faceid", astronaut, source=str(repo), face_pack=str(pack))], **run
    )
    face = FaceAnalyzer(str(pack)).analyze(astronaut)
    from_info = generator.generate("x", conditions=[FaceID("faceid", face, source=str(repo))], **run)
    assert torch.equal(from_photo.latents, from_info.latents)
