"""adapters/, preprocessors/ and presets/ import as parts of sdxl_control, editable and from a wheel."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
    "sys.path_hooks[:] = [h for h in sys.path_hooks if '__editable__' not in getattr(h, '__module__', '')]; "
    "import sdxl_control.adapters as a, sdxl_control.preprocessors as p, sdxl_control.presets as s; "
    "print(a.__file__); print(p.__file__); print(s.load_preset('quality').settings['steps'])"
)


def test_editable_install_maps_the_folders(tmp_path):
    # An editable install also leaves sdxl_control.egg-info in the checkout, which may shadow the installed metadata.
    installs = [json.loads(d.read_text("direct_url.json") or "{}") for d in metadata.distributions(name="sdxl-control")]
    if not any(i.get("dir_info", {}).get("editable") for i in installs):
        pytest.skip("sdxl-control is not installed in editable mode here")
    code = "import sdxl_control.adapters as a, sdxl_control.preprocessors as p; print(a.__file__); print(p.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(ROOT / "adapters" / "__init__.py"), str(ROOT / "preprocessors" / "__init__.py")]


def test_wheel_contains_and_imports_the_folders(tmp_path):
    # Build from a copy: an in-tree build leaves egg-info beside the sources that shadows the installed metadata.
    source = tmp_path / "src"
    # Hidden entries are left behind too: a virtual environment inside the checkout (CI's .ci-venv) is gigabytes.
    shutil.copytree(
        ROOT, source, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "screenshots")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    wheel = next(tmp_path.glob("sdxl_control-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    assert {"sdxl_control/adapters/__init__.py", "sdxl_control/preprocessors/__init__.py",
            "sdxl_control/presets/quality.json", "sdxl_control/testing/tiny.py", "sdxl_control/cli/generate.py",
            "sdxl_control/weights/configs/unet_base.json", "sdxl_control/weights/configs/model_index_refiner.json",
            *(f"sdxl_control/{layer}/__init__.py" for layer in ("base", "records", "weights", "protocol", "engine",
                                                                "passes", "jobs"))} <= names  # fmt: skip
    assert not any(n.startswith(("adapters/", "preprocessors/", "presets/", "tests/")) for n in names)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", IMPORT], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == str(tmp_path / "site" / "sdxl_control" / "adapters" / "__init__.py")
    assert lines[1] == str(tmp_path / "site" / "sdxl_control" / "preprocessors" / "__init__.py")
    assert lines[2] == "30"


def _requirements() -> list[Any]:
    """pyproject's runtime and test requirements, as ``packaging`` reads them."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_the_test_environment_is_pinned_within_pyprojects_ranges():
    """Every requirement of the package and its test extra has an exact release in constraints.txt, inside the range
    pyproject.toml gives it: a requirement added without `bash .ci/lock` would resolve afresh in every clone."""
    from packaging.utils import canonicalize_name

    pins = _pins()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in constraints.txt: run `bash .ci/lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pins[name]}, outside pyproject's {requirement}"
        )


def test_the_readme_and_ci_install_with_the_constraints():
    readme = re.findall(r"^pip install .*$", (ROOT / "README.md").read_text(), flags=re.M)
    ci = re.findall(r"^pip install .*$", (ROOT / ".ci" / "run").read_text(), flags=re.M)
    assert ci and readme[0] == ci[0] and ci[0].endswith("-c constraints.txt"), (readme[:1], ci)
    torch_pins = dict(re.findall(r'"(torch|torchvision)==([^"]+)"', ci[0]))
    assert torch_pins == {k: v for k, v in _pins().items() if k in ("torch", "torchvision")}
