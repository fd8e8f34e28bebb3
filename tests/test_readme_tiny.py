"""Every ``sdxl-control`` command the README and the documentation pages (``docs/**/*.md``) print runs offline with
``--tiny`` added, as printed — no ``--size`` added: ``--tiny`` itself brings every size to the tiny models' scale (a
preset's 896x1152 runs as 112x144). Identity methods and portrait presets included, with no face pack given by hand
(``--tiny`` brings stand-in packs); the job file the batches page prints runs as a batch. The photos they name are
made here (random pictures: the stand-in detector finds a face in any photo). Each command's seconds are printed
(``-rP`` or ``-s`` shows them; ``--durations=0`` lists each test) and bounded; no image it writes is black, and no PNG
holds a path of this machine's home, caches or working folder in its text. No ``../shared`` is needed."""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_control.cli import main
from sdxl_control.jobs.resolvers import TINY_SIZE
from sdxl_control.presets import load_preset
from sdxl_control.records.recipe import read_recipe
from sdxl_control.testing.lora import write_tiny_lora

ROOT = Path(__file__).resolve().parents[1]
# The README and every page of the documentation site: their code blocks are all run, here and in
# tests/test_readme_python.py.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def code_blocks(language: str) -> list[tuple[str, str]]:
    """Each ``language`` block of the pages, once (a block shown on two pages runs once), with the first page that
    shows it and its number there: ``("docs/guides/batches.md block 2", text)``."""
    blocks: dict[str, str] = {}
    for page in PAGES:
        found = re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)
        for number, block in enumerate(found, 1):
            blocks.setdefault(block, f"{page.relative_to(ROOT)} block {number}")
    return [(where, block) for block, where in blocks.items()]


def test_the_pages_hold_code_blocks():
    """The pages the blocks are read from are there: a moved docs folder must not leave these tests with nothing."""
    assert (ROOT / "README.md") in PAGES and len(PAGES) >= 20
    assert len(code_blocks("python")) >= 15 and len(code_blocks("bash")) >= 15


# Far above what each command takes on 2 shared cores (seconds to a minute), far below what the presets' own sizes
# cost on the tiny models (the portrait preset's 896x1152: ~50 s a step, 25 steps).
SECONDS = 240
# What the pages show that these tests do not run, and where it is shown instead.
ELSEWHERE = {
    ("ui",): "serves until stopped: tests/test_ui.py drives the page in a browser on the tiny models",
    ("serve",): "serves until stopped: tests/test_serve*.py drive the server with real clients on the tiny models",
    ("batch", "--ray"): "a Ray runtime: tests/test_batch.py runs the same kinds of jobs on a local one",
    ("batch", "s3://"): "an S3 bucket: tests/test_batch.py reads a file:// URI through pyarrow instead",
}


def readme_commands() -> list[list[str]]:
    """The pages' ``sdxl-control`` commands in their ``bash`` blocks, continuation lines joined, comments dropped,
    each once (``sh`` blocks need what the machine lacks: an A1111 PNG, a ComfyUI install; they say so)."""
    commands: list[list[str]] = []
    for _, block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            for redirect in (">", ">>"):  # the shell's, not the command's
                argv = argv[: argv.index(redirect)] if redirect in argv else argv
            if argv[:1] == ["sdxl-control"] and argv[1:] not in commands:
                commands.append(argv[1:])
    return commands


COMMANDS = readme_commands()
GENERATE = [argv for argv in COMMANDS if argv[0] == "generate"]
OTHERS = [argv for argv in COMMANDS if argv[0] not in ("generate", "batch")]


def _elsewhere(argv: list[str]) -> str | None:
    """Why a command is not run here (its subcommand, and a word of its arguments, match), or None."""
    return next(
        (why for (command, *words), why in ELSEWHERE.items()
         if argv[0] == command and all(any(w in a for a in argv[1:]) for w in words)),
        None,
    )  # fmt: skip


def _picture(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(path)


def _inputs(argv: list[str], folder: Path, base: Path) -> None:
    """Make the files a command reads: photos and maps as random pictures, LoRA files for the tiny base."""
    for i, (flag, value) in enumerate(zip(argv, argv[1:], strict=False)):
        if flag == "--input":  # NAME=FILE (or NAME=TEXT: no file to make)
            value = value.partition("=")[2]
        if flag in ("-o", "--recipe") or (folder / value).exists():
            continue
        if value.endswith((".jpg", ".png")):
            _picture(folder / value, i)
        elif flag == "--lora" and ".safetensors" in value:
            write_tiny_lora(folder / value.partition(":")[0], base, "kohya", seed=i)


TIMINGS: list[str] = []


@pytest.fixture(autouse=True)
def _print_timings():
    """Each command's seconds, printed as the test ends (after what the test read of the commands' output)."""
    yield
    print("\n".join(TIMINGS))  # noqa: T201  (the test log: -rP or -s shows it)
    TIMINGS.clear()


def _timed(argv: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    TIMINGS.append(f"{seconds:6.1f} s  sdxl-control {shlex.join(argv)}")
    assert seconds < SECONDS, f"sdxl-control {shlex.join(argv)} took {seconds:.0f} s"
    return code, seconds


def private_folders(folder: Path) -> list[str]:
    """This machine's folders that no image may name: the home folder, the caches, the folder the commands ran in."""
    from huggingface_hub import constants

    from sdxl_control.base.files import cache_dir

    found = [str(Path.home()), str(cache_dir()), os.environ.get("SDXL_CONTROL_CACHE", ""), constants.HF_HUB_CACHE,
             str(folder), str(folder.resolve())]  # fmt: skip
    return sorted({f.rstrip("/") + "/" for f in found if f and f.rstrip("/")})


def check_pngs(folder: Path) -> int:
    """Every PNG under ``folder``: none names a private folder in its text chunks, and none an image model made (it
    carries a recipe) is black. How many PNGs were read."""
    private = private_folders(folder)
    pngs = sorted(folder.rglob("*.png"))
    for png in pngs:
        with Image.open(png) as image:
            texts = dict(getattr(image, "text", {}))
            pixels = np.asarray(image.convert("L"), np.float32)
        for key, text in texts.items():
            leaked = [p for p in private if p in text]
            assert not leaked, f"{png.name}'s {key!r} text names {leaked}"
        if "sdxl-control" in texts or png.stem.endswith("preview"):
            assert pixels.mean() > 16 and pixels.max() > 64, f"{png.name} is black (mean {pixels.mean():.1f})"
    return len(pngs)


def test_the_readme_has_identity_and_preset_commands():
    flat = [" ".join(argv) for argv in GENERATE]
    for needed in ("--identity instantid", "--identity pulid", "--identity photomaker", "--preset portrait ",
                   "--preset portrait-draft", "--recipe"):  # fmt: skip
        assert any(needed in command for command in flat), needed


def test_the_pngs_are_scanned_for_private_folders(tmp_path):
    """The scan finds what it looks for: a home-folder path in a text chunk, and a black image with a recipe."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("sdxl-control", json.dumps({"decoder": str(Path.home() / ".cache" / "x" / "taesd")}))
    Image.new("RGB", (8, 8), (128, 128, 128)).save(tmp_path / "a.png", pnginfo=info)
    with pytest.raises(AssertionError, match="names"):
        check_pngs(tmp_path)
    info = PngImagePlugin.PngInfo()
    info.add_text("sdxl-control", "{}")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    with pytest.raises(AssertionError, match="black"):
        check_pngs(tmp_path)


def _matches_its_preset(argv: list[str], recipe: dict) -> None:
    """The recipe holds the preset's LoRAs, the templates whose inputs were given, and its settings."""
    preset = load_preset(argv[argv.index("--preset") + 1])
    given = {name for name in preset.inputs if f"--{name.replace('_', '-')}" in argv}
    given |= {text.partition("=")[0] for flag, text in zip(argv, argv[1:], strict=False) if flag == "--input"}
    expected = ["lora"] * len(preset.loras) + [t["kind"] for t in preset.templates.values()
                                               if any(v == f"${i}" for v in t.values() for i in given)]  # fmt: skip
    assert sorted(c["kind"] for c in recipe["conditions"]) == sorted(expected)
    for key in ("steps", "guidance", "negative_prompt", "refiner_switch"):
        assert recipe[key] == preset.settings.get(key, recipe[key])
    assert recipe["scheduler"]["requested"] == preset.settings.get("scheduler")


@pytest.mark.parametrize("argv", GENERATE, ids=[" ".join(a)[:60] for a in GENERATE])
def test_readme_generate_runs_offline_with_tiny(argv, tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    extra = [] if "--tiny" in argv else ["--tiny"]
    if "--recipe" in argv:  # re-makes the image an earlier command printed
        source = argv[argv.index("--recipe") + 1]
        earlier = next(a for a in GENERATE if "-o" in a and a[a.index("-o") + 1] == source)
        assert _timed([*earlier, *([] if "--tiny" in earlier else ["--tiny"]), "-q"])[0] == 0
    _inputs(argv, tmp_path, tiny.base)
    assert _timed([*argv, *extra, "-q"])[0] == 0
    if "--dry-run" in argv:
        line = capsys.readouterr().out
        assert not [p for p in private_folders(tmp_path) if p in line]
        assert json.loads(line)["size"] == list(TINY_SIZE)  # the line runs at the tiny scale it was made at
        return
    assert check_pngs(tmp_path) >= 1
    recipe = read_recipe(tmp_path / argv[argv.index("-o") + 1])
    width, height = recipe["size"]
    if "--outpaint" in argv:  # an outpainted canvas is the image (made here, 80x96) and its new borders
        assert [width, height] == [80 + sum(recipe["outpaint"][::2]), 96 + sum(recipe["outpaint"][1::2])]
    else:
        assert width * height <= TINY_SIZE[0] * TINY_SIZE[1], recipe["size"]
    kinds = {c["kind"] for c in recipe["conditions"]}
    if "--preset" in argv:
        _matches_its_preset(argv, recipe)
    if "--identity" in argv:
        assert argv[argv.index("--identity") + 1] in kinds
    elif "--face" in argv and "--preset" not in argv:
        assert "faceid" in kinds
    for flag, kind in (("--style", "ip-adapter"), ("--lora", "lora"), ("--edges", "controlnet")):
        if flag in argv:
            assert kind in kinds, (flag, kinds)


def _readme_job_file(folder: Path) -> tuple[Path, list[str]]:
    """The batches page's job file as printed, with the line its ``generate --dry-run >> jobs.jsonl`` command adds
    (made with ``--tiny``, as every command here), and the files its jobs name."""
    (block,) = [b for _, b in code_blocks("json") if '"id": "fox-1"' in b]
    (dry_run,) = [a for a in GENERATE if "--dry-run" in a]
    jobs = folder / "jobs.jsonl"
    jobs.write_text(block)
    return jobs, dry_run


def test_readme_job_file_and_batch_commands_run_offline_with_tiny(tiny, tmp_path, monkeypatch, capsys):
    """The pages' ``batch`` commands, in their order, on the job file (4 jobs and the dry-run line: a draft, a draft
    at 768x1024, the portrait preset, a base + refiner with a ControlNet): in seconds to a minute, where the
    presets' own sizes did none of them in 5 minutes."""
    monkeypatch.chdir(tmp_path)
    jobs, dry_run = _readme_job_file(tmp_path)
    capsys.readouterr()
    assert _timed([*dry_run, "--tiny"])[0] == 0
    with jobs.open("a") as out:
        out.write(capsys.readouterr().out)
    for name in {f for job in map(json.loads, jobs.read_text().splitlines()) for f in re.findall(r"[\w-]+\.(?:jpg|png)",
                 json.dumps({k: v for k, v in job.items() if k != "id"}))}:  # fmt: skip
        _picture(tmp_path / name, len(name))
    batch = [a for a in COMMANDS if a[0] == "batch" and _elsewhere(a) is None]
    assert len(batch) == 3
    for argv in batch:
        assert _timed([*argv, *([] if "--tiny" in argv else ["--tiny"]), "-q"])[0] == 0
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(jobs.read_text().splitlines()) == 5 and len({r["id"] for r in results if not r.get("error")}) == 5
    assert check_pngs(tmp_path / "out") == 5
    for png in (tmp_path / "out").glob("*.png"):
        width, height = read_recipe(png)["size"]
        assert width * height <= TINY_SIZE[0] * TINY_SIZE[1]


@pytest.mark.parametrize("argv", OTHERS, ids=[" ".join(a)[:60] for a in OTHERS])
def test_readme_other_commands_run_offline_with_tiny(argv, tiny, tmp_path, monkeypatch, capsys):
    """``presets``, ``models``, ``preprocess`` and ``score`` as printed (``--tiny`` added where the command takes
    it); ``models`` exits 4 while a model is missing, and names no home folder."""
    if (why := _elsewhere(argv)) is not None:
        pytest.skip(why)
    monkeypatch.chdir(tmp_path)
    _inputs(argv, tmp_path, tiny.base)
    tiny_flag = [] if argv[0] in ("presets", "models") else ["--tiny"]  # these two load no model
    code, _ = _timed([*argv, *tiny_flag])
    assert code in (0, 4) if argv[0] == "models" else code == 0
    out = capsys.readouterr()
    assert not [p for p in private_folders(tmp_path) if p in out.out + out.err]
    check_pngs(tmp_path)


def test_every_readme_command_is_run_or_said_where_it_is_shown():
    shown = {" ".join(a) for a in GENERATE + OTHERS} | {" ".join(a) for a in COMMANDS if a[0] == "batch"}
    assert shown == {" ".join(a) for a in COMMANDS}
    assert sum(_elsewhere(a) is not None for a in COMMANDS) == 4  # ui, serve, and the two Ray batches
