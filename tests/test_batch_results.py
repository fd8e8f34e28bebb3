"""A result on disk is the result of the job as written now: an edited job runs again (and only it), empty, cut-short
and foreign PNGs are made again, a condition pasted from a recipe finds its file beside the job file, and two Ctrl-C's
end the batch as one does."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sdxl_control.cli import main
from sdxl_control.jobs.outputs import RESULTS
from sdxl_control.records.recipe import read_recipe
from tests.test_batch import batch_after_its_first_result

SIZE = [64, 64]


def _write(folder: Path, jobs: list[dict]) -> Path:
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def _results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / RESULTS).read_text().splitlines()]


def _run(jobs_file: Path, out: Path) -> int:
    return main(["batch", str(jobs_file), "-o", str(out), "--tiny", "-q"])


def test_an_edited_job_runs_again_and_nothing_else_does(tmp_path, tiny):
    jobs = [{"id": f"j{i}", "prompt": f"picture {i}", "seed": i, "steps": 3, "size": SIZE} for i in range(3)]
    out = tmp_path / "out"
    assert _run(_write(tmp_path, jobs), out) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    fingerprint = read_recipe(out / "j1.png")["job"]
    assert [r["job"] for r in _results(out) if r["id"] == "j1"] == [fingerprint]
    jobs[1]["seed"] = 99  # the user edits one job
    assert _run(_write(tmp_path, jobs), out) == 0
    after = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert after["j0.png"] == before["j0.png"] and after["j2.png"] == before["j2.png"]
    assert after["j1.png"] != before["j1.png"] and read_recipe(out / "j1.png")["seed"] == 99
    assert read_recipe(out / "j1.png")["job"] != fingerprint
    ran = [r["id"] for r in _results(out)[3:] if not r.get("resumed")]
    assert ran == ["j1"]
    assert _run(_write(tmp_path, jobs), out) == 0  # as written now, every job is complete
    assert len(_results(out)) == 4


def test_empty_cut_short_and_foreign_pngs_are_made_again(tmp_path, tiny):
    jobs = [{"id": f"j{i}", "prompt": f"picture {i}", "seed": i, "steps": 3, "size": SIZE} for i in range(4)]
    out = tmp_path / "out"
    assert _run(_write(tmp_path, jobs), out) == 0
    good = {p.name: p.read_bytes() for p in out.glob("*.png")}
    (out / "j0.png").write_bytes(b"")
    (out / "j1.png").write_bytes(good["j1.png"][: len(good["j1.png"]) // 2])
    (out / "j2.png").write_bytes(good["j3.png"])  # another job's image
    (out / RESULTS).unlink()
    assert _run(_write(tmp_path, jobs), out) == 0
    results = _results(out)
    assert sorted(r["id"] for r in results if r.get("resumed")) == ["j3"]
    assert sorted(r["id"] for r in results if not r.get("resumed")) == ["j0", "j1", "j2"]
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == good


def test_a_condition_pasted_from_a_recipe_finds_its_file_beside_the_job_file(tmp_path, tiny):
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    made = tmp_path / "made.png"
    assert main(["generate", "a house", "--edges", str(tmp_path / "p.png"), "--steps", "3", "--size", "64x64",
                 "--seed", "4", "--tiny", "-q", "-o", str(made)]) == 0  # fmt: skip
    (condition,) = read_recipe(made)["conditions"]
    assert condition["image"]["file"] == "p.png" and "sha256" in condition["image"]
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "p.png").write_bytes((tmp_path / "p.png").read_bytes())
    (tmp_path / "p.png").unlink()  # only the copy beside the job file is left
    job = {"id": "edges", "prompt": "a house", "seed": 4, "steps": 3, "size": SIZE, "conditions": [condition]}
    assert _run(_write(folder, [job]), folder / "out") == 0
    assert np.array_equal(np.asarray(Image.open(folder / "out" / "edges.png")), np.asarray(Image.open(made)))
    by_hand = {**condition, "image": {"file": "p.png"}}  # a reference written by hand, without its hash
    assert _run(_write(folder, [{**job, "conditions": [by_hand]}]), folder / "out2") == 0


def test_two_ctrl_c_end_the_batch_as_one_and_it_resumes(tmp_path, tiny):
    jobs = [{"id": f"j{i}", "prompt": f"picture {i}", "seed": i, "steps": 30, "size": [128, 128]} for i in range(6)]
    jobs_file = _write(tmp_path, jobs)
    out = tmp_path / "out"
    process = batch_after_its_first_result(jobs_file, out)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err.decode()[-2000:]
    assert "Traceback" not in err.decode() and "interrupted" in err.decode()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # nothing half-written left
    done = [r["id"] for r in _results(out) if r["error"] is None]
    assert 1 <= len(done) < len(jobs)
    assert _run(jobs_file, out) == 0
    assert sorted(r["id"] for r in _results(out) if r["error"] is None and not r.get("resumed")) == sorted(
        j["id"] for j in jobs
    )  # each job made exactly once over the two runs


def test_tiny_swaps_the_models_a_job_names_in_batch_and_generate_alike(tmp_path, tiny, caplog):
    import logging

    job = {"id": "own", "prompt": "a fox", "seed": 1, "steps": 2, "size": SIZE,
           "models": {"base": "someone/their-sdxl-finetune"}}  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert _run(_write(tmp_path, [job]), tmp_path / "out") == 0
    assert "the job's base someone/their-sdxl-finetune runs as" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["generate", "a fox", "--base", "someone/their-sdxl-finetune", "--tiny", "--steps", "2", "--size",
                     "64x64", "--seed", "1", "-q", "-o", str(tmp_path / "fox.png")]) == 0  # fmt: skip
    assert "the job's base someone/their-sdxl-finetune runs as" in caplog.text
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "fox.png")), np.asarray(Image.open(tmp_path / "out" / "own.png"))
    )


def test_check_reports_the_models_the_jobs_need(tmp_path, tiny, capsys):
    jobs_file = _write(tmp_path, [{"id": "a", "prompt": "a fox", "steps": 2, "size": SIZE,
                                   "models": {"base": "someone/not-downloaded-sdxl"}}])  # fmt: skip
    assert main(["batch", str(jobs_file), "-o", str(tmp_path / "out"), "--check"]) == 4
    out = capsys.readouterr().out
    assert "1 job(s) valid, 0 not" in out and "models: some missing" in out and "MISSING" in out
    assert "someone/not-downloaded-sdxl" in out and "hf download" in out
    assert not (tmp_path / "out").exists()  # nothing run, nothing written
    assert main(["batch", str(jobs_file), "-o", str(tmp_path / "out"), "--check", "--tiny"]) == 0
    assert "models: all present" in capsys.readouterr().out


def test_a_folder_given_as_a_uri_is_copied_whole(tmp_path, tiny):
    """A ControlNet folder named by a file:// URI (standing for s3:// and the like) arrives with its files."""
    from sdxl_control.jobs.batch import read_jobs
    from sdxl_control.jobs.resolvers import TinyResolver
    from sdxl_control.testing import tiny_control_models

    folder = Path(tiny_control_models("controlnet-edges"))
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "edges.png")
    condition = {"kind": "controlnet", "model": folder.as_uri(), "image": "edges.png"}
    job = {"id": "uri", "prompt": "a house", "seed": 1, "steps": 2, "size": SIZE, "conditions": [condition]}
    (parsed,), problems = read_jobs(_write(tmp_path, [job]), resolver=TinyResolver())
    assert not problems
    copied = Path(parsed.request.conditions[0].model)
    assert copied != folder and sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in folder.iterdir())


def test_check_reads_remote_inputs_without_copying_them(tmp_path, tiny, capsys, monkeypatch):
    """`batch --check` stats a remote input and reads its beginning; the cache of copied inputs stays as it was."""
    from sdxl_control.testing import tiny_control_models

    monkeypatch.setenv("SDXL_CONTROL_CACHE", str(tmp_path / "cache"))
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "edges.png")
    folder = Path(tiny_control_models("controlnet-edges"))
    condition = {"kind": "controlnet", "model": folder.as_uri(), "image": (tmp_path / "edges.png").as_uri()}
    missing = {**condition, "image": (tmp_path / "gone.png").as_uri()}
    jobs_file = _write(tmp_path, [
        {"id": "uri", "prompt": "a house", "seed": 1, "steps": 2, "size": SIZE, "conditions": [condition]},
        {"id": "gone", "prompt": "a house", "seed": 1, "steps": 2, "size": SIZE, "conditions": [missing]},
    ])  # fmt: skip
    assert main(["batch", str(jobs_file), "-o", str(tmp_path / "out"), "--check", "--tiny"]) == 2
    captured = capsys.readouterr()
    assert "1 job(s) valid, 1 not" in captured.out and "gone.png: no such file or folder" in captured.err
    assert not (tmp_path / "cache" / "inputs").exists()  # nothing copied
    # The run itself copies them, once.
    jobs_file.write_text(jobs_file.read_text().splitlines()[0] + "\n")
    assert main(["batch", str(jobs_file), "-o", str(tmp_path / "out"), "--tiny", "-q"]) == 0
    assert len(list((tmp_path / "cache" / "inputs").iterdir())) == 2


def test_a_peeked_remote_file_has_its_beginning_and_its_size(tmp_path):
    from sdxl_control.jobs.remote_inputs import fetched_input, remote_inputs_peeked

    data = np.random.default_rng(0).integers(0, 255, 3 << 20, dtype=np.uint8).tobytes()
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "small.json").write_text('{"a": 1}')
    with remote_inputs_peeked():
        big = Path(fetched_input((tmp_path / "big.bin").as_uri()))
        small = Path(fetched_input((tmp_path / "small.json").as_uri()))
        head = big.read_bytes()
        assert len(head) == len(data) and head[: 1 << 16] == data[: 1 << 16] and not any(head[1 << 16 :])
        assert small.read_text() == '{"a": 1}'
    assert not big.exists()  # the stand-ins go with the check


def test_the_input_cache_is_trimmed_oldest_first_sparing_what_this_run_uses(tmp_path, monkeypatch):
    import os

    from sdxl_control.jobs.remote_inputs import fetched_input, trim_input_cache

    monkeypatch.setenv("SDXL_CONTROL_CACHE", str(tmp_path / "cache"))
    paths = []
    for i in range(3):
        (tmp_path / f"{i}.bin").write_bytes(bytes(1000))
        paths.append(Path(fetched_input((tmp_path / f"{i}.bin").as_uri())))
        os.utime(paths[-1].parent, (i, i))  # 0 is the oldest
    stale = tmp_path / "cache" / "inputs" / "from-a-failed-run"
    stale.mkdir()
    (stale / "photo.png").write_bytes(bytes(1000))
    os.utime(stale, (5, 5))
    assert trim_input_cache(limit=2500) == [stale]  # this process's copies are spared, however old
    monkeypatch.setattr("sdxl_control.jobs.remote_inputs._USED_INPUTS", set())
    assert trim_input_cache(limit=1500) == [paths[0].parent, paths[1].parent]
    assert paths[2].exists()
    monkeypatch.setenv("SDXL_CONTROL_INPUT_CACHE_GB", "0")
    (tmp_path / "3.bin").write_bytes(bytes(1000))
    fresh = Path(fetched_input((tmp_path / "3.bin").as_uri()))  # a fetch trims; what it fetched stays
    assert fresh.exists() and not paths[2].exists()
