#!/usr/bin/env bash
# The benchmark on the GPU machine that the device tool lends (never in CI). That machine has torch, transformers,
# peft, accelerate, OpenCV; the pinned diffusers and two small packages travel as wheels in .whl/ (bench/README.md).
# Arguments go to bench.py, e.g.:  bash bench/device.sh --fast blocks --repeats 3
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# Installed (not put on the path): adapters/, preprocessors/ and presets/ become sdxl_control.* only through the
# package-dir mapping in pyproject.toml.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
    echo "no nvidia-smi: a CPU dry run (pass --tiny --device cpu --dtype fp32)"
fi
python3 bench/bench.py --device cuda --dtype fp16 --out "${OUT:-bench/results}" "$@"
