"""A tiny ArcFace-shaped recognition model (112x112 RGB in, 512-d out) written as ONNX, so that insightface's real
FaceAnalysis code path runs with a real detector beside it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["write_tiny_recognition_onnx"]


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
