"""docs/use-the-model.md's examples run as written: each ```sh or ```python block after a `<!-- run: KIND -->`
comment. "tiny" blocks run here, in a tiny project (models/ and export/ of use_helpers' tiny pipeline, and a
my_photos/ folder); the "author" and "teammate" blocks run in tests/test_registry.py (integration)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from PIL import Image
from use_helpers import needs_ort, shared_tiny_project

# slow (scratch repositories, DVC, several processes, kills): `make test-all`, not `make test`
pytestmark = pytest.mark.integration

DOC = ROOT / "docs" / "use-the-model.md"
KINDS = ("tiny", "author", "teammate")
BLOCK = re.compile(r"<!-- run: (\w+) -->\n```(\w+)\n(.*?)^```", re.S | re.M)


def doc_blocks(kind: str | None = None) -> list[tuple[str, str]]:
    """(language, code) of each block marked `<!-- run: kind -->` (every marked block when kind is None)."""
    return [(lang, code) for k, lang, code in BLOCK.findall(DOC.read_text()) if kind in (None, k)]


def run_block(lang: str, code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """A sh block under `bash -e` (every command must succeed), a python block with this interpreter;
    `python` and `dvc` are this venv's, cnnlens the project's."""
    full = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "sh" else [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=600)


def my_photos(project: Path, folder: Path) -> Path:
    """A photo folder as a user has one: a JPEG, PNGs in a sub-folder, a note that is no image."""
    folder.mkdir(parents=True)
    val = project / "data/raw/val"
    Image.open(val / "ants/0000.png").convert("RGB").save(folder / "ant.jpg", quality=92)
    (folder / "more").mkdir()
    for src in sorted((val / "bees").glob("*.png"))[:2]:
        shutil.copy(src, folder / "more" / f"bee-{src.name}")
    (folder / "notes.txt").write_text("not a picture\n")
    return folder


def test_the_page_marks_blocks_of_known_kinds_only():
    marked = BLOCK.findall(DOC.read_text())
    assert {k for k, _, _ in marked} == set(KINDS)
    assert {lang for _, lang, _ in marked} <= {"sh", "python"}
    assert len(marked) == DOC.read_text().count("<!-- run: "), "a run: comment not followed by a code block"


@needs_ort  # the page's blocks use the ONNX model too
def test_tiny_blocks_run(tmp_path_factory, tmp_path, one_thread):
    project = shared_tiny_project(tmp_path_factory)
    work = tmp_path / "work"
    work.mkdir()
    for folder in ("models", "export"):
        shutil.copytree(project / folder, work / folder)
    my_photos(project, work / "my_photos")
    blocks = doc_blocks("tiny")
    assert len(blocks) >= 4
    for lang, code in blocks:
        proc = run_block(lang, code, work)
        assert proc.returncode == 0, f"{code}\n--- stderr:\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr
    assert (work / "predictions/predictions.csv").read_text().count("\n") == 1 + 3
    assert sorted(p.name for p in (work / "predictions/explain/gradcam").iterdir()) == [
        "ant.png",
        "bee-0000.png",
        "bee-0001.png",
    ]
