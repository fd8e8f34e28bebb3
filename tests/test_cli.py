"""The command line, in process and through the installed console script."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from sdxl_control import read_recipe
from sdxl_control.cli import main


def test_tiny_generate_writes_png_whose_recipe_round_trips(tiny, tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["generate", "a lighthouse", "--tiny", "-o", str(out), "--steps", "4", "--seed", "3",
                 "--refiner-switch", "0.5", "--num-images", "2", "-q"]) == 0  # fmt: skip
    assert f"{out}  seed=3" in capsys.readouterr().out
    recipe = read_recipe(out)
    assert recipe["prompt"] == "a lighthouse" and recipe["size"] == [128, 128] and recipe["refiner_switch"] == 0.5
    assert read_recipe(tmp_path / "demo-1.png")["seed"] == 4
    for original in (out, tmp_path / "demo-1.png"):
        again = tmp_path / f"again-{original.name}"
        assert main(["generate", "--recipe", str(original), "-o", str(again), "-q"]) == 0
        assert np.array_equal(np.asarray(Image.open(original)), np.asarray(Image.open(again)))
        assert read_recipe(again)["seed"] == read_recipe(original)["seed"]


def test_preset_and_explicit_options(tiny, tmp_path):
    out = tmp_path / "p.png"
    assert main(["generate", "x", "--tiny", "--preset", "quality", "--steps", "5", "-o", str(out), "-q"]) == 0
    recipe = read_recipe(out)
    assert recipe["steps"] == 5 and recipe["refiner_switch"] == 0.8 and recipe["scheduler"]["requested"] == "euler"


def test_errors_exit_2_with_a_message(tiny, tmp_path, capsys):
    assert main(["generate", "x", "--tiny", "--size", "100x64", "-o", str(tmp_path / "x.png")]) == 2
    assert "multiples of 8" in capsys.readouterr().err
    assert main(["generate", "x", "--base", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_console_script(tiny, tmp_path):
    out = tmp_path / "cli.png"
    script = os.path.join(os.path.dirname(sys.executable), "sdxl-control")
    run = subprocess.run([script, "generate", "a cat", "--tiny", "--steps", "3", "-o", str(out), "-q"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert read_recipe(out)["steps"] == 3
