"""Batches from a job file: every bad line named before anything loads, a failing job recorded while the others
finish, PNG recipes and --dry-run output accepted as jobs, interrupted batches resumed with nothing done twice and
nothing half-written, and the same images from a local Ray cluster, even when a worker is killed mid-batch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_control.cli import main
from sdxl_control.jobs.batch import Outputs, read_jobs, run_batch
from sdxl_control.jobs.outputs import RESULTS
from sdxl_control.jobs.resolvers import TinyResolver

SIZE = [64, 64]


def _write_jobs(folder: Path, jobs: list[dict | str]) -> Path:
    path = folder / "jobs.jsonl"
    path.write_text("".join((j if isinstance(j, str) else json.dumps(j)) + "\n" for j in jobs))
    return path


def _results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / RESULTS).read_text().splitlines()]


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".png"}


@pytest.fixture
def inputs(tmp_path: Path, tiny) -> Path:
    """A job folder with a photo for the ControlNet and style jobs, and a ControlNet folder whose weights are not a
    ControlNet's (it passes the file check and fails to load)."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "photo.png")
    broken = folder / "not-a-controlnet"
    broken.mkdir()
    (broken / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    return folder


def _mixed_jobs(folder: Path) -> list[dict]:
    # The ControlNet's photo is a remote input, through pyarrow (a file:// URI stands for s3:// and the like).
    canny = {"kind": "controlnet", "model": "diffusers/controlnet-canny-sdxl-1.0", "image": (folder / "photo.png").as_uri(),
             "preprocess": "canny", "scale": 0.5}  # fmt: skip
    return [
        {"id": "fox", "prompt": "a red fox", "seed": 1, "steps": 3, "size": SIZE},
        {"id": "pair", "prompt": "a lighthouse", "seed": 2, "steps": 3, "size": SIZE, "num_images": 2},
        {"id": "refined", "prompt": "a boat", "seed": 3, "steps": 4, "size": SIZE, "refiner_switch": 0.5},
        {"id": "edges", "prompt": "a house", "seed": 4, "steps": 3, "size": SIZE, "conditions": [canny]},
        {"id": "styled", "prompt": "a cat", "preset": "style-transfer", "seed": 5, "steps": 3, "size": SIZE,
         "inputs": {"style": "photo.png", "structure": "photo.png"}, "set": {"style.scale": 0.7}},
        {"id": "draft", "prompt": "a red fox", "preset": "draft", "size": SIZE},  # its seed comes from its id
    ]  # fmt: skip


def test_every_bad_line_is_named_and_nothing_runs(inputs, tiny, capsys, monkeypatch):
    from sdxl_control import Generator

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded although the job file is not valid")

    monkeypatch.setattr(Generator, "from_pretrained", no_loading)
    lines = [
        {"id": "ok", "prompt": "fine", "seed": 1, "steps": 3, "size": SIZE},
        '{"id": "cut", "prompt": "half a line',
        {"id": "typo", "prompt": "x", "stesp": 4},
        {
            "id": "nofile",
            "prompt": "x",
            "conditions": [{"kind": "controlnet", "model": "not-a-controlnet", "image": "missing.png"}],
        },  # fmt: skip
        {"id": "nopreset", "prompt": "x", "preset": "portrayt"},
        {"id": "ok", "prompt": "same id again"},
        {"id": "../escape", "prompt": "x"},
        {"id": "sub", "prompt": "x", "output": "folder/sub.png"},
        {"prompt": "x", "inputs": {"fcae": "photo.png"}},
        {"id": "size", "prompt": "x", "size": [63, 64]},
        {
            "id": "remote",
            "prompt": "x",
            "conditions": [{"kind": "controlnet", "model": "not-a-controlnet", "image": "file:///no/such/photo.png"}],
        },  # fmt: skip
        ["not", "an", "object"],
    ]
    jobs_file = _write_jobs(inputs, lines)
    out = inputs.parent / "out"
    assert main(["batch", str(jobs_file), "-o", str(out), "--tiny"]) == 2
    err = capsys.readouterr().err
    expected = {
        2: "not valid JSON",
        3: "'stesp' (did you mean 'steps'?)",
        4: "missing.png",
        5: "unknown preset 'portrayt' (did you mean 'portrait'?)",
        6: "the id 'ok' is also line 1's",
        7: "'id' must be a name",
        8: "'output' is a file name",
        9: "the job names no 'preset'",
        10: "multiples of 8",
        11: "file:///no/such/photo.png: no such file or folder",
        12: "a job is a JSON object",
    }
    for number, text in expected.items():
        line = next((ln for ln in err.splitlines() if f"jobs.jsonl: line {number}" in ln), "")
        assert text in line, (number, err)
    assert "11 of 12 job(s) are not valid" in err and not out.exists()
    assert main(["batch", str(jobs_file), "-o", str(out), "--tiny", "--check"]) == 2
    assert "1 job(s) valid, 11 not" in capsys.readouterr().out


def test_a_failing_job_is_recorded_and_the_batch_goes_on(inputs, tiny, capsys):
    broken = {"kind": "controlnet", "model": "not-a-controlnet", "image": "photo.png", "scale": 0.5}
    jobs_file = _write_jobs(inputs, [
        {"id": "before", "prompt": "a", "seed": 1, "steps": 3, "size": SIZE},
        {"id": "broken", "prompt": "b", "seed": 2, "steps": 3, "size": SIZE, "conditions": [broken]},
        {"id": "typo", "prompt": "c", "stepz": 3},
        {"id": "after", "prompt": "d", "seed": 3, "steps": 3, "size": SIZE},
    ])  # fmt: skip
    out = inputs.parent / "out"
    code = main(["batch", str(jobs_file), "-o", str(out), "--tiny", "--skip-invalid", "-q"])
    assert code == 4  # the failed job's kind: a model that cannot be used
    captured = capsys.readouterr()
    assert "2 done, 1 failed, 0 already complete, 1 invalid" in captured.out
    assert "first broken" in captured.err
    results = {r["id"]: r for r in _results(out)}
    assert results["before"]["error"] is None and results["after"]["error"] is None
    assert (
        "cross-attention" in results["broken"]["error"] and results["broken"]["error_kind"] == "IncompatibleModelError"
    )
    assert results["typo"]["error_kind"] == "InvalidJob" and results["typo"]["line"] == 3
    assert sorted(_pngs(out)) == ["after.png", "before.png"]
    # Again: the finished jobs are skipped, the broken one is tried again, the invalid line is not recorded twice.
    assert main(["batch", str(jobs_file), "-o", str(out), "--tiny", "--skip-invalid", "-q"]) == 4
    assert "0 done, 1 failed, 2 already complete, 1 invalid" in capsys.readouterr().out
    assert [r["id"] for r in _results(out)].count("typo") == 1


def test_png_recipes_and_dry_run_output_are_jobs(tmp_path, tiny, capsys):
    """A PNG's recipe (here image 1 of a batch of 2, re-made alone) and what --dry-run prints run as jobs and make
    the same pixels as the command that made or described them."""
    made = tmp_path / "made.png"
    common = ["--tiny", "--size", "64x64", "--steps", "3", "--seed", "21"]
    assert main(["generate", "a pier at night", *common, "--num-images", "2", "-q", "-o", str(made)]) == 0
    assert main(["generate", "a draft fox", "--preset", "draft", *common, "--dry-run"]) == 0
    capsys.readouterr()
    assert (
        main(["generate", "a draft fox", "--preset", "draft", *common, "--dry-run", "-o", str(tmp_path / "d.png")]) == 0
    )
    dry_run = json.loads(capsys.readouterr().out)
    assert main(["generate", "a draft fox", "--preset", "draft", *common, "-q", "-o", str(tmp_path / "draft.png")]) == 0
    recipe = json.loads(Image.open(tmp_path / "made-1.png").info["sdxl-control"])
    # --dry-run --tiny names the models as given (no tiny weights, no cache path): --tiny swaps them where it runs.
    assert dry_run["models"]["base"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (
        dry_run["decoder"] == "madebyollin/taesdxl" and dry_run["conditions"][0]["source"] == "ByteDance/SDXL-Lightning"
    )
    jobs_file = _write_jobs(tmp_path, [{**recipe, "id": "from-png"}, {**dry_run, "id": "from-dry-run"}])
    out = tmp_path / "out"
    assert main(["batch", str(jobs_file), "-o", str(out), "-q", "--tiny"]) == 0
    for job, original in (("from-png", "made-1.png"), ("from-dry-run", "draft.png")):
        again, before = Image.open(out / f"{job}.png"), Image.open(tmp_path / original)
        assert np.array_equal(np.asarray(again), np.asarray(before)), job
        again_recipe, before_recipe = json.loads(again.info["sdxl-control"]), json.loads(before.info["sdxl-control"])
        # The batch adds the job's fingerprint, as its result line records it.
        assert again_recipe.pop("job") == next(r["job"] for r in _results(out) if r["id"] == job)
        assert again_recipe == before_recipe, job


def test_outputs_through_a_pyarrow_filesystem(inputs, tiny):
    """A filesystem URI goes through pyarrow (the path object stores take): same files, results rewritten whole."""
    pytest.importorskip("pyarrow")
    jobs, problems = read_jobs(_write_jobs(inputs, _mixed_jobs(inputs)[:2]), resolver=TinyResolver())
    assert not problems
    local, remote = inputs.parent / "local", inputs.parent / "remote"
    run_batch(jobs, local, progress_bar=False)
    summary = run_batch(jobs, Outputs(remote.as_uri()), progress_bar=False)
    assert summary.done == 2 and _pngs(remote) == _pngs(local)
    assert [r["id"] for r in _results(remote)] == [r["id"] for r in _results(local)]
    assert run_batch(jobs, Outputs(remote.as_uri()), progress_bar=False).skipped == 2


def _success_ids(folder: Path) -> list[str]:
    return sorted(r["id"] for r in _results(folder) if r["error"] is None)


def _a_whole_line_in(path: Path) -> bool:
    # The file exists a moment before its first line is in it: on a loaded machine a signal sent in that moment
    # interrupted a batch with no result recorded (seen in CI).
    try:
        return b"\n" in path.read_bytes()
    except FileNotFoundError:
        return False


def batch_after_its_first_result(jobs_file: Path, out: Path) -> subprocess.Popen:
    """``sdxl-control batch --tiny`` running in a process of its own, once it has written its first result."""
    command = [sys.executable, "-m", "sdxl_control", "batch", str(jobs_file), "-o", str(out), "--tiny", "-q"]
    # Ctrl-C reaches the batch as a shell starts it: with SIGINT at its default. A child inherits an ignored SIGINT,
    # and a test process's disposition is whatever ran in it before (a CI worker was seen with it ignored).
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    # Generous: on a loaded 2-core machine a fresh process takes minutes to import, load and finish a job, and a
    # signal sent before the first result proves nothing.
    deadline = time.monotonic() + 600
    while not _a_whole_line_in(out / RESULTS) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()[1].decode()[-2000:]
    if not _a_whole_line_in(out / RESULTS):
        process.kill()
        raise AssertionError("the batch recorded no result within 10 minutes")
    return process


def test_an_interrupted_batch_resumes_with_nothing_done_twice(inputs, tiny):
    """The batch process is killed (SIGKILL) as soon as its first image is written; a temporary file as a write cut
    short leaves is added. The re-run removes it, skips the finished jobs and completes the rest."""
    jobs = [{"id": f"j{i}", "prompt": f"picture {i}", "seed": i, "steps": 12, "size": [128, 128]} for i in range(8)]
    jobs_file = _write_jobs(inputs, jobs)
    out = inputs.parent / "out"
    process = batch_after_its_first_result(jobs_file, out)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = _success_ids(out)
    assert 1 <= len(first) < len(jobs), "the kill came after the batch had finished: the test proves nothing"
    missing = next(j["id"] for j in jobs if j["id"] not in first)
    (out / f".{missing}.png.0123456789ab.partial").write_bytes(b"\x89PNG half")
    assert main(["batch", str(jobs_file), "-o", str(out), "--tiny", "-q"]) == 0
    assert _success_ids(out) == sorted(j["id"] for j in jobs)  # each job exactly once
    assert sorted(_pngs(out)) == sorted(f"{j['id']}.png" for j in jobs)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    for path in out.glob("*.png"):
        Image.open(path).load()  # every file is whole
    assert main(["batch", str(jobs_file), "-o", str(out), "--tiny", "-q"]) == 0  # nothing left: nothing runs
    assert _success_ids(out) == sorted(j["id"] for j in jobs)


def test_ray_writes_the_embedded_images_even_when_a_worker_is_killed(inputs, tiny):
    """The same job file embedded and on a local Ray runtime (two CPU workers): byte-identical PNGs (so identical
    pixels and recipes). During the Ray run, a worker busy with a job is killed; Ray restarts it and runs the job
    again: every job is recorded exactly once and no file is lost, duplicated or left half-written."""
    pytest.importorskip("ray")
    import psutil

    from sdxl_control.jobs.ray_batch import run_batch_ray

    jobs, problems = read_jobs(_write_jobs(inputs, _mixed_jobs(inputs)), resolver=TinyResolver())
    assert not problems
    embedded, clustered = inputs.parent / "embedded", inputs.parent / "ray"
    # Ray runs a one-CPU worker on one thread; on the CPU, a thread count changes the last bit of a sum here and there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_batch(jobs, embedded, progress_bar=False).failed == 0
    finally:
        torch.set_num_threads(threads)

    killed: list[int] = []

    def kill_a_busy_worker(result: dict) -> None:
        if killed:
            return
        reporter = int(result["worker"].split(":")[1])
        for process in psutil.process_iter(["cmdline"]):
            if "ray::RayWorker.run" in " ".join(process.info["cmdline"] or []) and process.pid != reporter:
                process.send_signal(signal.SIGKILL)
                killed.append(process.pid)
                return

    summary = run_batch_ray(jobs, clustered, workers=2, progress_bar=False, on_result=kill_a_busy_worker)
    assert killed, "no worker was busy when the first result came: the test proves nothing"
    assert summary.done == len(jobs) and summary.failed == 0
    results = _results(clustered)
    assert sorted(r["id"] for r in results) == sorted(j.id for j in jobs)  # each exactly once
    assert _pngs(clustered) == _pngs(embedded)
    assert not [p for p in clustered.iterdir() if p.name.startswith(".")]
    # The killed worker's job was finished by its restarted process: a third process, beside the reporter.
    workers = {int(r["worker"].split(":")[1]) for r in results}
    assert killed[0] not in workers and len(workers) == 2


def test_the_readme_example_jobs_are_valid(tmp_path, tiny, photos_dir):
    section = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "batches.md").read_text()
    block = section[section.index("```json\n") + 8 :]
    lines = block[: block.index("```")].strip().splitlines()
    photo = photos_dir / "obama.jpg"
    (tmp_path / "me.jpg").write_bytes(photo.read_bytes())
    Image.open(photo).save(tmp_path / "edges.png")
    jobs, problems = read_jobs(_write_jobs(tmp_path, lines), resolver=TinyResolver())
    assert not problems, problems
    assert [j.id for j in jobs] == ["fox-1", "fox-2", "me-astronaut", "lighthouse"]
    # The job's fields win over the preset's; --tiny runs its 768x1024 at the tiny models' scale.
    assert jobs[1].request.steps == 8 and jobs[1].request.size == (112, 144)
    assert [c.kind for c in jobs[2].request.conditions] == ["pulid"] and jobs[2].request.conditions[0].scale == 0.6
    assert jobs[3].refiner is not None and [c.kind for c in jobs[3].request.conditions] == ["controlnet"]


def test_jobs_on_the_same_models_share_one_load(inputs, tiny, monkeypatch):
    """Jobs written alternating between two model sets run grouped: each set is loaded once."""
    from sdxl_control import Generator

    loads: list[tuple] = []
    original = Generator.from_pretrained.__func__

    def counting(cls, base, refiner=None, **kwargs):
        loads.append((str(base), refiner and str(refiner)))
        return original(cls, base, refiner, **kwargs)

    monkeypatch.setattr(Generator, "from_pretrained", classmethod(counting))
    lines = [{"id": f"j{i}", "prompt": "x", "seed": i, "steps": 2, "size": SIZE,
              **({"refiner_switch": 0.5} if i % 2 else {})} for i in range(4)]  # fmt: skip
    jobs, _ = read_jobs(_write_jobs(inputs, lines), resolver=TinyResolver())
    summary = run_batch(jobs, inputs.parent / "out", progress_bar=False)
    assert summary.done == 4 and len(loads) == 2 and len(set(loads)) == 2
    assert [r["id"] for r in summary.results] in (["j0", "j2", "j1", "j3"], ["j1", "j3", "j0", "j2"])
