"""Helpers for the tests of using the model (predict, export, the registry, the docs page): a tiny project
run in-process, images of every awkward kind, running predict as a user would.

tiny_project() runs the stages of dvc.yaml up to evaluate and export (not saliency, activations) by their
own command lines, in this process, on TINY params (one epoch): a few seconds plus one ONNX export (left
out where onnxruntime cannot be imported: the tests that need it skip there, with needs_ort). Before
prepare, it adds source files that exercise every preprocessing step to the val split: an EXIF-rotated
JPEG large enough for the reduced-size JPEG decode, grayscale, alpha and CMYK files.
"""

from __future__ import annotations

import importlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, write_params
from dvc_helpers import TINY
from PIL import Image

STAGES = ("download_data", "download_weights", "prepare", "finetune", "evaluate", "export")
try:  # the export stage checks its model with onnxruntime; without it the torch tests still run
    import onnxruntime  # noqa: F401

    HAS_ORT = True
except ImportError:  # pragma: no cover - requirements.txt installs it
    HAS_ORT = False
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime cannot be imported here")


def run_stage_in_process(project: Path, name: str, params: Path) -> None:
    """dvc.yaml's command of stage `name`, run in this process from `project`."""
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]["cmd"]
    argv = shlex.split(cmd)
    module = importlib.import_module(argv[2])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        module.main([*argv[3:], "--params", str(params)])


def awkward_images(folder: Path, seed: int = 0) -> list[Path]:
    """Source files that take every decode path: EXIF orientation (a JPEG big enough for draft mode at
    resize 40), grayscale, RGBA with transparency, palette, CMYK. Returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = lambda h, w, c=3: rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    paths = []
    rotated = Image.fromarray(pixels(120, 200))
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    paths.append(folder / "exif_rotated.jpg")
    rotated.save(paths[-1], quality=90, exif=exif.tobytes())
    paths.append(folder / "gray.png")
    Image.fromarray(pixels(70, 50, 1)[..., 0], mode="L").save(paths[-1])
    paths.append(folder / "alpha.png")
    Image.fromarray(pixels(48, 64, 4), mode="RGBA").save(paths[-1])
    paths.append(folder / "palette.png")
    Image.fromarray(pixels(60, 44)).convert("P").save(paths[-1])
    paths.append(folder / "cmyk.jpg")
    Image.fromarray(pixels(80, 100)).convert("CMYK").save(paths[-1], quality=90)
    return paths


def tiny_project(root: Path, overrides: dict | None = None) -> Path:
    """A project folder (params.yaml, data/, models/, export/, metrics/, plots/eval/) built by the stages."""
    root.mkdir(parents=True, exist_ok=True)
    tiny = {**TINY, "train": {**TINY["train"], "epochs": 1}, **(overrides or {})}
    params = write_params(root / "params.yaml", tiny)
    for name in STAGES if HAS_ORT else STAGES[:-1]:
        if name == "prepare":
            awkward_images(root / "data/raw/val/ants")
        run_stage_in_process(root, name, params)
    return root


_BUILT: dict[str, Path] = {}


def shared_tiny_project(tmp_path_factory) -> Path:
    """tiny_project() built once per test session (per xdist worker): tests must not write into it."""
    if "path" not in _BUILT:
        _BUILT["path"] = tiny_project(tmp_path_factory.mktemp("use") / "project")
    return _BUILT["path"]


def predict(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m cnnlens.predict ARGS` in `cwd` with this tree's cnnlens first on the path."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cnnlens.predict", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
