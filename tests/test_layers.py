"""Imports point down: every import of sdxl-control's own modules (at module level, inside functions and under
``TYPE_CHECKING``) goes to a module of the same layer or one below it.

The layers, from the ground up, are those of the documentation's layer map (docs/concepts/layers.md). The modules
are read from the folders pyproject's ``package-dir`` maps to ``sdxl_control`` (``adapters/``, ``preprocessors/``,
``presets/`` import as ``sdxl_control.adapters`` and so on). There is no allow-list: a new edge that points up fails
here, naming the file, the line and both layers.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]

# (layer, the module prefixes that form it), from the ground up.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("sdxl_control.base",)),
    ("records", ("sdxl_control.records",)),
    ("weights", ("sdxl_control.weights",)),
    ("protocol", ("sdxl_control.protocol",)),
    ("engine", ("sdxl_control.engine",)),
    # The tiny stand-ins are families' test doubles: they may use the families, and only the tiny resolver uses them.
    ("families", ("sdxl_control.adapters", "sdxl_control.preprocessors", "sdxl_control.testing")),
    ("passes", ("sdxl_control.passes",)),
    ("jobs", ("sdxl_control.jobs", "sdxl_control.presets")),
    ("front-ends", ("sdxl_control.cli", "sdxl_control.ui", "sdxl_control.serve", "sdxl_control.__main__")),
    # The package's __init__ gathers the public names; the old module paths are its business. Nothing imports either.
    ("package", ("sdxl_control.old_paths",)),
)
ROOT_PACKAGE = "sdxl_control"
# The only module that may build the tiny stand-ins (--tiny): everything else gets models through a resolver.
TINY_RESOLVER = "sdxl_control.jobs.resolvers"
# Layer packages hold no code of their own (weights/ answers release 0.2's names of the old weights module): import
# from the module that defines a name.
EMPTY_PACKAGES = {
    f"sdxl_control.{name}" for name in ("base", "records", "weights", "protocol", "engine", "passes", "jobs")
}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


@dataclass(frozen=True)
class Edge:
    source: Module
    target: str
    line: int

    def where(self, root: Path) -> str:
        return f"{self.source.path.relative_to(root)}:{self.line}"


def modules(root: Path) -> dict[str, Module]:
    """Every module of the package, named as it imports, found through pyproject's package-dir mapping."""
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = setuptools["package-dir"]
    found: dict[str, Module] = {}
    for package, folder in folders.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            # a folder mapped to a package of its own is read under that name, not under its parent's
            if package == ROOT_PACKAGE and f"{ROOT_PACKAGE}.{parts[0]}" in folders:
                continue
            is_package = parts[-1] == "__init__"
            name = ".".join([package, *(parts[:-1] if is_package else parts)])
            found[name] = Module(name, path, is_package)
    return found


def _known(name: str, known: dict[str, Module]) -> str:
    """The module an import of ``name`` loads (``a.b.C``, a name in module ``a.b``, loads ``a.b``)."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def edges(known: dict[str, Module]) -> list[Edge]:
    """Every import of the package's own modules, wherever it is written in a module."""
    out = []
    for module in known.values():
        package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
        for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    stem = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # `from x import y` loads x.y when y is a module, else x
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
            else:
                continue
            for target in targets:
                if target == ROOT_PACKAGE or target.startswith(ROOT_PACKAGE + "."):
                    out.append(Edge(module, target, node.lineno))
    return out


def layer_of(name: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    return None


def faults(root: Path) -> list[str]:
    """What breaks the layer rule in the tree at ``root``, one line each."""
    known = modules(root)
    problems = [
        f"{m.path.relative_to(root)}: module {m.name} is in no layer (add its folder to a layer of tests/test_layers.py"
        " and the layer map)"
        for m in known.values()
        if m.name != ROOT_PACKAGE and layer_of(m.name) is None
    ]
    for edge in edges(known):
        target = _known(edge.target, known)
        source, where = edge.source.name, edge.where(root)
        if edge.target != target:  # what an import statement names as a module always is one
            problems.append(f"{where}: {source} imports {edge.target}, which is no module (an old path?)")
            continue
        if source == ROOT_PACKAGE:
            continue
        if target == ROOT_PACKAGE:
            problems.append(f"{where}: {source} imports the package's __init__ ({edge.target}); import the module")
        elif target in EMPTY_PACKAGES:
            problems.append(f"{where}: {source} imports from the layer package {target}; import the module")
        elif (
            target.startswith("sdxl_control.testing")
            and source != TINY_RESOLVER
            and layer_of(source) != layer_of("sdxl_control.testing")
        ):
            problems.append(f"{where}: {source} imports the tiny stand-ins ({target}); only {TINY_RESOLVER} may")
        elif (low := layer_of(source)) is not None and (high := layer_of(target)) is not None and high > low:
            problems.append(
                f"{where}: {source} ({LAYERS[low][0]}) imports {target} ({LAYERS[high][0]}), a layer above it"
            )
    return problems


def test_imports_point_down() -> None:
    assert faults(ROOT) == []


def test_the_reader_sees_every_kind_of_import() -> None:
    """Function-level, TYPE_CHECKING and relative imports are all read (a checker that missed them would pass)."""
    known = modules(ROOT)
    found = {(e.source.name, _known(e.target, known)) for e in edges(known)}
    # under TYPE_CHECKING in runner.py; inside a function in resolvers.py; relative from a mapped folder (adapters/)
    assert ("sdxl_control.jobs.runner", "sdxl_control.passes.generator") in found
    assert ("sdxl_control.jobs.resolvers", "sdxl_control.testing.stand_ins") in found
    assert ("sdxl_control.adapters.lora", "sdxl_control.protocol.conditions") in found
    assert "sdxl_control.adapters.lora" in known and "sdxl_control.presets" in known


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the package's sources, to plant faults in."""
    for name in ("pyproject.toml",):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("sdxl_control", "adapters", "preprocessors", "presets"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _plant(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n" + code + "\n")


@pytest.mark.parametrize(
    ("file", "code", "expected"),
    [
        # module level, inside a function, under TYPE_CHECKING
        ("sdxl_control/base/files.py", "from ..engine.loop import denoise", "(base) imports sdxl_control.engine.loop"),
        (
            "sdxl_control/protocol/attach.py",
            "def f():\n    from ..passes.generator import Generator",
            "(protocol) imports sdxl_control.passes.generator (passes)",
        ),
        (
            "sdxl_control/weights/hub.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..jobs.spec import JobSpec",
            "(weights) imports sdxl_control.jobs.spec (jobs)",
        ),
        # a family module (a folder mapped by package-dir) importing a pass
        ("adapters/lora.py", "import sdxl_control.passes.detailer", "(families) imports sdxl_control.passes.detailer"),
        ("sdxl_control/jobs/spec.py", "from sdxl_control.ui import build_app", "(jobs) imports sdxl_control.ui"),
        ("sdxl_control/passes/generator.py", "from ..testing import tiny_models", "only sdxl_control.jobs.resolvers"),
        ("sdxl_control/jobs/runner.py", "from .. import __version__", "imports the package's __init__"),
        ("sdxl_control/engine/loop.py", "from sdxl_control import Generator", "imports the package's __init__"),
        ("sdxl_control/engine/loop.py", "from ..weights import WeightPatch", "layer package sdxl_control.weights"),
        ("sdxl_control/jobs/spec.py", "from ..generator import Generator", "which is no module (an old path?)"),
    ],
)
def test_a_planted_fault_fails(tree: Path, file: str, code: str, expected: str) -> None:
    assert faults(tree) == []
    _plant(tree / file, code)
    problems = faults(tree)
    assert len(problems) == 1 and expected in problems[0], problems
    assert problems[0].startswith(file + ":")


def test_a_module_outside_the_layers_fails(tree: Path) -> None:
    (tree / "sdxl_control" / "helpers.py").write_text("X = 1\n")
    assert faults(tree) == [
        "sdxl_control/helpers.py: module sdxl_control.helpers is in no layer (add its folder to a layer of "
        "tests/test_layers.py and the layer map)"
    ]


def test_release_0_2_module_paths_still_import() -> None:
    """Old paths give the moved module itself (a patch through either path patches both), with a FutureWarning that
    names the new path; the old weights module's names are answered by the layer package that took its name."""
    import importlib
    import sys

    from sdxl_control.old_paths import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(f"sdxl_control.{old}", None)
        with pytest.warns(FutureWarning, match=f"sdxl_control.{old} moved to sdxl_control.{new}"):
            module = importlib.import_module(f"sdxl_control.{old}")
        assert module is importlib.import_module(f"sdxl_control.{new}")
        assert module.__spec__.name == f"sdxl_control.{new}"  # its own spec, not the old path's
    sys.modules.pop("sdxl_control.generator")
    with pytest.warns(FutureWarning, match="sdxl_control.passes.generator"):
        from sdxl_control.generator import Generator
    assert Generator is importlib.import_module("sdxl_control").Generator
    from sdxl_control.weights.patches import WeightPatch

    with pytest.warns(FutureWarning, match="moved to sdxl_control.weights.patches.WeightPatch"):
        assert importlib.import_module("sdxl_control.weights").WeightPatch is WeightPatch
