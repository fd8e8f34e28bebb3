"""Face analysis models written as ONNX in code: a tiny ArcFace-shaped recognition model (112x112 RGB in, 512-d out)
and a stand-in SCRFD detector, so that insightface's real FaceAnalysis code path runs on them — beside a real
detector in the tests, or as a whole stand-in pack offline (``--tiny``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_tiny_recognition_onnx", "write_tiny_detector_onnx", "write_tiny_face_pack"]


def write_tiny_recognition_onnx(path: str | os.PathLike[str], seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv = numpy_helper.from_array((rng.standard_normal((8, 3, 8, 8)) * 0.05).astype(np.float32), "conv_w")
    fc = numpy_helper.from_array((rng.standard_normal((8 * 14 * 14, 512)) * 0.05).astype(np.float32), "fc_w")
    nodes = [
        helper.make_node("Conv", ["input.1", "conv_w"], ["c"], strides=[8, 8]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("MatMul", ["f", "fc_w"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])],
        initializer=[conv, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


# ArcFace's five-point template in its 112 px crop (eyes, nose, mouth corners), as fractions of the crop.
_TEMPLATE = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]]) / 112.0
_STRIDES = (8, 16, 32)
_ANCHORS = 2


class _Graph:
    """Just enough of an ONNX graph builder for the stand-in detector."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.constants: list[Any] = []

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output


def _one_face(g: _Graph, zero: str, stride: float, box: dict[str, str], side: str) -> dict[str, list[str]]:
    """Per-cell maps at one stride where every anchor scores 0.9 and predicts ``box`` and its template landmarks."""
    ones = g.op("Add", [zero, g.const("one", 1.0)], "ones")
    scale = g.const("stride", stride)
    # Anchor centres: cell index times the stride, as insightface lays them out.
    centre = {}
    for axis, dim in (("x", 3), ("y", 2)):
        count = g.op("CumSum", [ones, g.const(f"axis_{axis}", dim, np.int64)], f"count_{axis}")
        centre[axis] = g.op("Mul", [g.op("Sub", [count, "one"], f"cell_{axis}"), scale], f"anchor_{axis}")

    def distance(value: str, axis: str, name: str, forward: bool) -> str:
        # In strides: anchor - left/top edge, right/bottom edge - anchor, point - anchor.
        first, second = (value, centre[axis]) if forward else (centre[axis], value)
        return g.op("Div", [g.op("Sub", [first, second], f"{name}_px"), scale], name)

    bbox = [distance(box["x0"], "x", "left", False), distance(box["y0"], "y", "top", False),
            distance(box["x1"], "x", "right", True), distance(box["y1"], "y", "bottom", True)]  # fmt: skip
    kps = []
    for i, (fx, fy) in enumerate(_TEMPLATE):
        for axis, fraction, origin in (("x", fx, box["x0"]), ("y", fy, box["y0"])):
            offset = g.op("Mul", [side, g.const(f"template_{i}{axis}", fraction)], f"offset_{i}{axis}")
            kps.append(distance(g.op("Add", [origin, offset], f"point_{i}{axis}"), axis, f"kp_{i}{axis}", True))
    return {"score": [g.op("Mul", [ones, g.const("confidence", 0.9)], "scores")], "bbox": bbox, "kps": kps}


def write_tiny_detector_onnx(path: str | os.PathLike[str]) -> Path:
    """A stand-in face detector with SCRFD's interface — one NCHW input of any size; scores, box and five-landmark
    distances for strides 8, 16 and 32 with two anchors each — so that insightface routes and decodes it as SCRFD.

    It finds one face in any photo: a square half the photo's shorter side, in its middle, with landmarks on ArcFace's
    template. The photo's extent is read from the letterboxed input (insightface pads it with black, top left); every
    stride-32 anchor predicts that same box, so non-maximum suppression leaves one."""
    import onnx
    from onnx import TensorProto, helper

    g = _Graph()
    # insightface normalises pixels as (p - 127.5) / 128, so its black padding reads about -0.996.
    brightest = g.op("ReduceMax", ["input.1"], "brightest", axes=[1], keepdims=1)
    lit = g.op("Greater", [brightest, g.const("pad", -0.99)], "lit")
    mask = g.op("Cast", [lit], "mask", to=TensorProto.FLOAT)
    width = g.op("ReduceSum", [g.op("ReduceMax", [mask], "columns", axes=[2], keepdims=0)], "width", keepdims=0)
    height = g.op("ReduceSum", [g.op("ReduceMax", [mask], "rows", axes=[3], keepdims=0)], "height", keepdims=0)
    half = g.const("half", 0.5)
    side = g.op("Mul", [g.op("Min", [width, height], "shorter"), half], "side")
    radius = g.op("Mul", [side, half], "radius")
    box = {
        "x0": g.op("Sub", [g.op("Mul", [width, half], "centre_x"), radius], "x0"),
        "y0": g.op("Sub", [g.op("Mul", [height, half], "centre_y"), radius], "y0"),
    }
    box["x1"], box["y1"] = g.op("Add", [box["x0"], side], "x1"), g.op("Add", [box["y0"], side], "y1")

    def per_anchor(parts: list[str], name: str) -> str:
        """(1, 1, h, w) maps, one per channel -> (h * w * anchors, channels), a cell's anchors next to each other."""
        grid = parts[0] if len(parts) == 1 else g.op("Concat", parts, f"{name}_grid", axis=1)
        cells = g.op("Transpose", [grid], f"{name}_cells", perm=[0, 2, 3, 1])
        cells = g.op("Reshape", [cells, g.const(f"{name}_one", [-1, 1, len(parts)], np.int64)], f"{name}_cell")
        doubled = g.op("Concat", [cells] * _ANCHORS, f"{name}_anchors", axis=1)
        return g.op("Reshape", [doubled, g.const(f"{name}_rows", [-1, len(parts)], np.int64)], name)

    outputs: dict[str, list[str]] = {"score": [], "bbox": [], "kps": []}
    for stride in _STRIDES:
        kernel = dict(kernel_shape=[stride, stride], strides=[stride, stride])
        pooled = g.op("AveragePool", [mask], f"pooled{stride}", **kernel)
        zero = g.op("Mul", [pooled, g.const(f"nothing{stride}", 0.0)], f"zero{stride}")
        if stride != _STRIDES[-1]:
            maps = {"score": [zero], "bbox": [zero] * 4, "kps": [zero] * 10}
        else:
            maps = _one_face(g, zero, float(stride), box, side)
        for kind, parts in maps.items():
            outputs[kind].append(per_anchor(parts, f"{kind}_{stride}"))
    names = [*outputs["score"], *outputs["bbox"], *outputs["kps"]]
    widths = [1] * 3 + [4] * 3 + [10] * 3
    graph = helper.make_graph(
        g.nodes,
        "tiny-scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"anchors_{n}", w])
            for n, w in zip(names, widths, strict=True)
        ],
        initializer=g.constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


def write_tiny_face_pack(folder: str | os.PathLike[str], pack: str, seed: int = 0) -> Path:
    """A stand-in for insightface's pack ``pack`` (``antelopev2`` or ``buffalo_l``) in its layout and file names: the
    tiny detector and a tiny recognition model, so the real analysis code runs offline (``--tiny``)."""
    from ..preprocessors.face import PACK_FILES

    detector, recognition = PACK_FILES[pack]
    target = Path(folder)
    staging = target.with_name(f".{target.name}-building")
    write_tiny_detector_onnx(staging / detector)
    write_tiny_recognition_onnx(staging / recognition, seed)
    staging.rename(target)
    return target
