"""The GPU benchmark's code runs end to end on tiny models (a smoke run; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"


def _bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("sdxl_control_bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_smoke_run_writes_its_table(tmp_path, tiny, monkeypatch):
    bench = _bench(monkeypatch)
    args = ["--tiny", "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--repeats", "1", "--size", "64",
            "--out", str(tmp_path), "--name", "smoke", "--workdir", str(tmp_path),
            "--fast", "layout", "--profile", "2 ControlNets"]  # fmt: skip
    assert bench.main(args) == 0
    result = json.loads((tmp_path / "smoke.json").read_text())
    names = [row["scenario"] for row in result["rows"]]
    assert len(names) == 17 and names[0] == "base" and names[9].startswith("portrait stack")
    assert names[10:] == ["img2img 0.6", "img2img 0.4", "inpaint (mask, regular UNet)", "hires 1.5x",
                          "hires 1.5x, VAE tiling", "face detailer, 1 face", "face detailer, 2 faces"]  # fmt: skip
    for row in result["rows"]:
        assert row["ours_s"] > 0 and row["diffusers_s"] > 0 and row["ratio"] > 0
        # the fast path ran every scenario and drew the same images (fp32: rounding only)
        assert row["fast_s"] > 0 and row["fast_max_pixel_diff"] <= 1, row
    assert result["unet_tflop_per_step_cfg"] >= 0 and result["tiny"] is True
    assert set(result["unet_forward"]) == {"plain", "fast"} and result["unet_forward"]["fast"]["ms"] > 0
    table = (tmp_path / "smoke.md").read_text()
    assert "| + 2 ControlNets | 2 |" in table and "TINY smoke models" in table
    assert "| base 30 steps | <= 0.8 | None | n/a |" in table  # targets are judged on full-size runs only
    memory = [(m["what"], m["size"]) for m in result["memory"]]
    assert memory == [("base 2 steps, models resident", 64), ("base 2 steps, model offload", 64),
                      ("VAE decode whole", 64), ("VAE decode tiled", 64), ("VAE decode whole", 128),
                      ("VAE decode tiled", 128)]  # fmt: skip
    profile = (tmp_path / "profile_2_controlnets.txt").read_text()
    assert "## sdxl-control" in profile and "## diffusers" in profile


def test_the_quick_device_run_holds_its_four_scenarios_plain_and_fast(tmp_path, tiny, monkeypatch):
    """``bash bench/device.sh --quick``: the command a lent GPU runs first, dry-run here on the tiny models."""
    bench = _bench(monkeypatch)
    args = ["--tiny", "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--size", "64", "--quick",
            "--out", str(tmp_path), "--name", "quick", "--workdir", str(tmp_path)]  # fmt: skip
    assert bench.main(args) == 0
    result = json.loads((tmp_path / "quick.json").read_text())
    assert [row["scenario"] for row in result["rows"]] == list(bench.QUICK)
    assert result["repeats"] == 2 and result["fast_path"]["compile"] == "off" and result["memory"] == []
    assert all(row["diffusers_s"] > 0 and row["fast_s"] > 0 for row in result["rows"])
    # last, the UNet alone with its weights in fp8: halved by fp8 storage (fp32 -> 8 bits here, norms kept); fp8
    # matmuls refused on the CPU, a row that says why rather than a lost run
    plain, stored, matmul, compiled = result["weight_storage"]
    assert (plain["storage"], stored["storage"], matmul["storage"], compiled["compiled"]) == (
        "compute dtype", "fp8_e4m3fn", "fp8_matmul", True)  # fmt: skip
    assert stored["ms"] > 0 and stored["weights_mib"] < 0.3 * plain["weights_mib"]
    assert "fp8 matmuls need" in matmul["error"] and "fp8 matmuls need" in compiled["error"]
    assert "| fp8_e4m3fn | False |" in (tmp_path / "quick.md").read_text()
