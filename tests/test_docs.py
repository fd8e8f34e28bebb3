"""The documentation site: ``mkdocs build --strict`` passes (a broken link, a missing heading, a snippet whose file
moved, or an API name mkdocstrings cannot find fails it), and the README stays a short entry whose links reach the
pages. The pages' code blocks run in tests/test_readme_python.py and tests/test_readme_tiny.py."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _mkdocs_build(site: Path, config: Path) -> subprocess.CompletedProcess[str]:
    # From the repository's root: pymdownx.snippets reads CHANGELOG.md and CONTRIBUTING.md relative to it.
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip


def _needs_mkdocs() -> None:
    missing = [m for m in ("mkdocs", "material", "mkdocstrings_handlers.python") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the documentation tools are not installed ({', '.join(missing)}): pip install -e '.[test]'")


def test_the_site_builds_strictly(tmp_path):
    _needs_mkdocs()
    site = tmp_path / "site"
    built = _mkdocs_build(site, ROOT / "mkdocs.yml")
    assert built.returncode == 0, built.stdout + built.stderr
    # Every page of docs/ is in the site, the API reference holds the docstrings, the changelog its file.
    pages = sorted(p.relative_to(ROOT / "docs").with_suffix("") for p in (ROOT / "docs").rglob("*.md"))
    for page in pages:
        html = site / ("index.html" if page.name == "index" else page / "index.html")
        assert html.is_file(), page
    api = (site / "reference" / "api" / "index.html").read_text()
    assert 'id="sdxl_control.Generator.generate"' in api and 'id="adapters.pulid.PuLID"' in api
    changelog = (site / "changelog" / "index.html").read_text()
    first_heading = re.search(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert first_heading and first_heading.group(1).split()[0].strip("[]") in changelog


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The strict build is a check: the same site with one page linking to a heading that is not there fails."""
    _needs_mkdocs()
    config = tmp_path / "mkdocs.yml"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the install](other.md#no-such-heading).\n")
    (docs / "other.md").write_text("# Other\n\n## Install\n")
    text = (ROOT / "mkdocs.yml").read_text()
    text = re.sub(r"^docs_dir: .*$", f"docs_dir: {docs}", text, flags=re.M)
    text = re.sub(r"^nav:\n(?:  .*\n)+", "", text, flags=re.M)
    config.write_text(text)
    built = _mkdocs_build(tmp_path / "site", config)
    assert built.returncode != 0 and "no-such-heading" in built.stdout + built.stderr
    (docs / "index.md").write_text("# Home\n\nSee [the install](other.md#install).\n")
    built = _mkdocs_build(tmp_path / "site", config)
    assert built.returncode == 0, built.stdout + built.stderr


def test_the_readme_is_short_and_its_links_reach_the_pages():
    text = README.read_text()
    assert len(text.encode()) <= 12_000, f"README.md is {len(text.encode())} bytes: move details into docs/"
    links = re.findall(r"\]\(((?:docs/|CONTRIBUTING|CHANGELOG|LICENSE)[^)#]*)(?:#([^)]*))?\)", text)
    assert len({path for path, _ in links}) >= 20
    for path, anchor in links:
        assert (ROOT / path).exists(), path
        if anchor and path.endswith(".md"):
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), flags=re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
            assert anchor in slugs, (path, anchor, sorted(slugs))
    for page in sorted((ROOT / "docs").rglob("*.md")):  # every page is reachable from the README or the site's home
        relative = page.relative_to(ROOT).as_posix()
        home = (ROOT / "docs" / "index.md").read_text()
        assert relative in text or page.relative_to(ROOT / "docs").as_posix() in home, relative
