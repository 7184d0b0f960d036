"""The docs: the MkDocs site builds with --strict (a broken link or anchor fails), its generated
reference pages cover every route and command, and the README stays short and machine-independent."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs / mkdocs-material not installed (they come with the test extra)")
def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    http = (tmp_path / "site" / "reference" / "http" / "index.html").read_text(encoding="utf-8")
    for route in ("/search/text", "/search/image", "/collections", "/readyz", "/collections/{name}/media"):
        assert route in http, route
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    for command in ("clipsearch serve", "clipsearch search", "clipsearch ingest", "clipsearch build"):
        assert command in cli, command
    assert (tmp_path / "site" / "screenshot.png").is_file()


def test_readme_is_short_and_names_no_machine_path():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    assert "bash scripts/serve.sh --data ../shared/flickr8k" in readme and "bash scripts/test.sh" in readme
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(?<![\w.])/(work|home|Users)/", text), path.name
    for link in re.findall(r"\]\(([^)#]+)", readme):  # the README's own links, as GitHub resolves them
        if not link.startswith(("http://", "https://")):
            assert (REPO / link).exists(), link
