"""python -m cnnlens.predict: the evaluate stage's probabilities for the same source files, bad files, exit
codes, figures drawn as the saliency stage draws them, the onnx backend without torch, bounded memory.

The model is a tiny pipeline's (use_helpers.tiny_project: the stages run in-process on TINY params), so
the predictions are compared with what that pipeline's evaluate stage wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from PIL import Image
from use_helpers import needs_ort, predict, shared_tiny_project

import cnnlens.predict as P
from cnnlens.config import PrepareParams


@pytest.fixture(scope="module")
def project(tmp_path_factory, one_thread):
    return shared_tiny_project(tmp_path_factory)


def evaluate_table(project: Path) -> pd.DataFrame:
    return pd.read_csv(project / "plots/eval/predictions.csv")


def test_torch_backend_gives_evaluates_predictions_for_the_source_files(project, tmp_path):
    """The val split's source files (EXIF-rotated, grayscale, alpha, palette and CMYK ones among them),
    predicted from files in batches of 4: evaluate's predicted classes and probabilities, to all 6 digits."""
    proc = predict(
        "data/raw/val", "--out", tmp_path / "out", "--batch-size", "4", "--device", "cpu", cwd=project
    )
    assert proc.returncode == 0, proc.stderr
    ours = pd.read_csv(tmp_path / "out/predictions.csv")
    ours["path"] = ours.path.str.removeprefix("data/raw/")
    theirs = evaluate_table(project)
    assert len(theirs) == 21 and sorted(ours.path) == sorted(theirs.path)
    merged = ours.merge(theirs, on="path", suffixes=("", "_eval"))
    assert (merged.predicted == merged.predicted_eval).all()
    for c in ("p_ants", "p_bees"):
        assert (merged[c] == merged[f"{c}_eval"]).all(), merged[[c, f"{c}_eval"]]
    assert {"val/ants/exif_rotated.jpg", "val/ants/cmyk.jpg", "val/ants/alpha.png"} <= set(ours.path)
    # the JSON holds the same rows, the table on stdout one line per image after its header
    doc = json.loads((tmp_path / "out/predictions.json").read_text())
    assert doc["classes"] == ["ants", "bees"] and doc["n_predicted"] == 21 and doc["skipped"] == []
    assert [r["probabilities"]["bees"] for r in doc["predictions"]] == ours.p_bees.tolist()
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["path", "predicted", "p_ants", "p_bees"] and len(lines) == 22
    assert "21 image(s) predicted" in proc.stderr


def test_runs_on_the_models_folder_alone(project, tmp_path):
    """No data/, no params.yaml, another folder: models/ and the pictures are all it needs."""
    shutil.copytree(project / "models", tmp_path / "models")
    shutil.copytree(project / "data/raw/val/bees", tmp_path / "pictures")
    proc = predict("pictures", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.strip().splitlines()[1:]]
    theirs = evaluate_table(project).set_index("path")
    assert len(rows) == 8
    for path, predicted, _, p_bees in rows:
        expected = theirs.loc["val/bees/" + Path(path).name]
        assert predicted == expected.predicted and float(p_bees) == pytest.approx(expected.p_bees, abs=5e-5)


def bad_folder(root: Path, good: Path) -> dict[str, str]:
    """A folder of bad files beside one good image; returns {file: what its stderr line says}."""
    root.mkdir()
    shutil.copy(good, root / "good.png")
    (root / "text.jpg").write_text("not an image\n")
    (root / "truncated.jpg").write_bytes((good.parent / "exif_rotated.jpg").read_bytes()[:300])
    Image.new("1", (10_000, 10_000)).save(root / "bomb.png")  # 100 M pixels in a few kB
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "notes.txt").write_text("passed over in a folder, an error when named\n")
    return {
        "text.jpg": "cannot decode",
        "truncated.jpg": "cannot decode",
        "bomb.png": "decompression bomb",
        "dangling.jpg": "cannot read",
        "notes.txt": "not an image type",
        "nothere": "no such file or folder",
        "nothing*.png": "no file matches this pattern",
    }


def test_bad_files_are_one_line_each_and_the_others_are_predicted(project, tmp_path):
    bad = bad_folder(tmp_path / "mixed", project / "data/raw/val/ants/0000.png")
    args = ["mixed", "mixed/dangling.jpg", "mixed/notes.txt", "nothere", "nothing*.png"]
    proc = predict(*args, "--out", "out", "--model", project / "models", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.strip().splitlines()[1:]] == ["mixed/good.png"]
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(bad), proc.stderr
    for name, why in bad.items():
        assert sum(name in line and why in line for line in skipped) == 1, (name, proc.stderr)
    assert "Traceback" not in proc.stderr
    doc = json.loads((tmp_path / "out/predictions.json").read_text())
    assert doc["n_predicted"] == 1 and len(doc["skipped"]) == len(bad)
    assert len(pd.read_csv(tmp_path / "out/predictions.csv")) == 1


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_reported(project, tmp_path):
    path = tmp_path / "locked.png"
    shutil.copy(project / "data/raw/val/ants/0000.png", path)
    path.chmod(0)
    proc = predict(path, "--model", project / "models", cwd=tmp_path)
    assert proc.returncode == 1 and "skipped" in proc.stderr and "ermission denied" in proc.stderr


def one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.integration  # slow: make test-all
def test_exit_codes(project, tmp_path):
    models, image = project / "models", project / "data/raw/val/ants/0000.png"
    (tmp_path / "junk.jpg").write_text("junk")
    # nothing predicted: 1
    proc = predict(tmp_path / "junk.jpg", "--model", models, cwd=tmp_path)
    assert proc.returncode == 1 and "no image was predicted" in proc.stderr and "skipped" in proc.stderr
    # bad arguments: 2 (argparse's own errors, and ours in one line)
    assert predict(cwd=tmp_path).returncode == 2
    assert predict(image, "--backend", "tensorflow", cwd=tmp_path).returncode == 2
    assert predict(image, "--batch-size", "0", "--model", models, cwd=tmp_path).returncode == 2
    proc = predict(image, "--model", models, "--explain", "gradient", cwd=tmp_path)
    assert proc.returncode == 2 and "--out" in one_line_error(proc)
    proc = predict(
        image, "--model", models, "--explain", "gradient,guesswork", "--out", tmp_path / "o", cwd=tmp_path
    )
    assert proc.returncode == 2 and "guesswork" in one_line_error(proc)
    # a missing or broken model: 2
    proc = predict(image, cwd=tmp_path)  # no models/ here
    assert proc.returncode == 2 and "models" in one_line_error(proc)
    broken = tmp_path / "broken"
    shutil.copytree(models, broken)
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    proc = predict(image, "--model", broken, cwd=tmp_path)
    assert proc.returncode == 2 and "model.pt" in one_line_error(proc)
    (broken / "model.json").write_text("{}")
    proc = predict(image, "--model", broken, cwd=tmp_path)
    assert proc.returncode == 2 and "model.json: no classes" in one_line_error(proc)


def test_explain_draws_the_saliency_stages_figure(project, tmp_path):
    """One figure per image and method, byte for byte the figure the saliency stage's code draws for the
    same image, map and title (cnnlens.figures.saliency_figure with figures.display_maps), at the saliency
    section's default scale."""
    import torch

    from cnnlens.attribution import METHODS, explain
    from cnnlens.config import SaliencyParams
    from cnnlens.figures import chw_to_hwc, write_saliency_figures
    from cnnlens.model import load_checkpoint
    from cnnlens.predict_explain import NORMALIZE, PERCENTILE
    from cnnlens.tensors import denormalize, eval_inputs

    images = sorted((project / "data/raw/val/bees").glob("*.png"))[:2]
    out = tmp_path / "out"
    proc = predict(*images, "--explain", "gradient,gradcam", "--out", out, "--device", "cpu", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert sorted(
        p.relative_to(out / "explain").as_posix() for p in (out / "explain").rglob("*.png")
    ) == sorted(f"{m}/{p.stem}.png" for m in ("gradient", "gradcam") for p in images)
    model, meta = load_checkpoint(project / "models")
    squares = np.stack([P.load_square(p, meta["resize"]) for p in images])
    x = eval_inputs(torch.from_numpy(squares), meta["input_size"])
    with torch.no_grad():
        logits = model(x)
    proba = torch.softmax(logits, 1)
    sp = SaliencyParams()
    assert (NORMALIZE, PERCENTILE) == (sp.normalize, sp.percentile)  # the stage's default look
    maps = explain("gradient", model, x, target=logits.argmax(1), seed=0, batch_size=16)
    titles = [
        f"{p}\npredicted {meta['classes'][int(c)]} (p={proba[i, c]:.2f})"
        for i, (p, c) in enumerate(zip(images, logits.argmax(1)))
    ]
    heading = f"{METHODS['gradient'].label} ({METHODS['gradient'].describe()})"
    write_saliency_figures(
        tmp_path / "mine",
        maps,
        [chw_to_hwc(im) for im in denormalize(x)],
        titles=[f"{heading}\n{t}" for t in titles],
        stems=[p.stem for p in images],
        label=METHODS["gradient"].label,
        note="max over R, G, B",
        normalize=NORMALIZE,
        percentile=PERCENTILE,
    )
    for p in images:
        assert (out / "explain/gradient" / f"{p.stem}.png").read_bytes() == (
            tmp_path / "mine" / f"{p.stem}.png"
        ).read_bytes()


# The onnx backend in a process where every module outside the standard library and these is unimportable.
BLOCKER = """
import atexit, importlib.abc, runpy, sys
ALLOWED = set(sys.stdlib_module_names) | {"PIL", "numpy", "onnxruntime", "cnnlens", "_distutils_hack"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in ALLOWED:
            raise ImportError(f"{name} is blocked: the onnx backend may import only onnxruntime, numpy and Pillow")
sys.meta_path.insert(0, Block())
atexit.register(lambda: print("LOADED", *sorted({m.split(".")[0] for m in sys.modules}), file=sys.stderr))
sys.argv = ["cnnlens.predict", *sys.argv[1:]]
runpy.run_module("cnnlens.predict", run_name="__main__", alter_sys=True)
"""


@needs_ort
def test_onnx_backend_imports_only_onnxruntime_numpy_and_pillow(project, tmp_path):
    blocker = tmp_path / "blocker.py"
    blocker.write_text(BLOCKER)
    proc = subprocess.run(
        [sys.executable, blocker, "data/raw/val", "--backend", "onnx", "--out", tmp_path / "out"],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stderr.split("LOADED", 1)[1].split())
    assert "torch" not in loaded, loaded
    # besides the standard library: what site's .pth files load before any code runs (setuptools' hooks,
    # an editable install's finder), then exactly the four allowed
    site_hooks = {m for m in loaded if m.startswith("__editable__")} | {"__main__", "_distutils_hack"}
    assert loaded - set(sys.stdlib_module_names) - site_hooks == {"PIL", "numpy", "onnxruntime", "cnnlens"}
    ours = pd.read_csv(tmp_path / "out/predictions.csv")
    ours["path"] = ours.path.str.removeprefix("data/raw/")
    merged = ours.merge(evaluate_table(project), on="path", suffixes=("", "_eval"))
    assert len(merged) == 21
    assert np.abs(merged.p_bees - merged.p_bees_eval).max() <= 1e-5
    assert (merged.predicted == merged.predicted_eval).all()


@needs_ort
def test_onnx_backend_errors(project, tmp_path):
    image = project / "data/raw/val/ants/0000.png"
    proc = predict(image, "--backend", "onnx", "--explain", "gradient", "--out", tmp_path / "o", cwd=project)
    assert proc.returncode == 2 and "--explain needs --backend torch" in one_line_error(proc)
    proc = predict(image, "--backend", "onnx", cwd=tmp_path)  # no export/ here
    assert proc.returncode == 2 and "export" in one_line_error(proc)
    broken = tmp_path / "export"
    shutil.copytree(project / "export", broken)
    (broken / "model.onnx").write_bytes(b"\x00" * 100)
    proc = predict(image, "--backend", "onnx", cwd=tmp_path)
    assert proc.returncode == 2 and "cannot load the ONNX model" in one_line_error(proc)


def test_collect_folders_globs_and_files(tmp_path):
    for rel in (
        "a/1.jpg",
        "a/b/2.PNG",
        "a/b/c/3.webp",
        "a/notes.txt",
        "a/.hidden/4.jpg",
        "a/.5.jpg",
        "z.bmp",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    files, problems, ignored = P.collect(
        [
            str(tmp_path / "a"),
            str(tmp_path / "a/1.jpg"),
            f"{tmp_path}/**/*.bmp",
            str(tmp_path / "none"),
            f"{tmp_path}/*.gif",
        ]
    )
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "a/1.jpg",
        "a/b/2.PNG",
        "a/b/c/3.webp",
        "z.bmp",
    ]
    assert [why for _, why in problems] == ["no such file or folder", "no file matches this pattern"]
    assert ignored == 1  # notes.txt; hidden files and folders are not counted


def test_streams_in_bounded_memory(tmp_path, monkeypatch):
    """However many files, at most a few batches of decoded images exist at once."""
    paths = [tmp_path / f"{i:04d}.png" for i in range(300)]
    alive, lock = {"now": 0, "most": 0}, threading.Lock()

    def fake_load(path, resize, max_pixels=P.MAX_PIXELS):
        with lock:
            alive["now"] += 1
            alive["most"] = max(alive["most"], alive["now"])
        return np.zeros((3, 8, 8), np.uint8)

    class Backend:
        meta = {"resize": 8, "input_size": 8}

        def __call__(self, squares):
            with lock:
                alive["now"] -= len(squares)  # the batch is done with once predicted
            return np.zeros((len(squares), 2)), np.full((len(squares), 2), 0.5)

    monkeypatch.setattr(P, "load_square", fake_load)
    sink = P.Sink(["ants", "bees"], paths, None, header={})
    assert P.predict_files(Backend(), paths, sink, batch_size=10, max_pixels=P.MAX_PIXELS) == 300
    assert alive["most"] <= 3 * 10, alive


def test_defaults_agree_with_prepare_and_the_console_script_exists():
    assert P.MAX_PIXELS == PrepareParams().max_pixels and P.MAX_ASPECT == PrepareParams().max_aspect
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["cnnlens-predict"].split(":")
    assert module == "cnnlens.predict" and callable(getattr(P, func))


@needs_ort
@pytest.mark.integration  # slow: make test-all
def test_the_benchmark_runs_dry(project, tmp_path):
    """bench/bench_predict.py with tiny settings: every number is there and positive."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            ROOT / "bench/bench_predict.py",
            "--images",
            project / "data/raw/val/ants",
            "--size",
            "32",
        ]
        + ["--limit", "4", "--repeats", "1", "--latency-images", "3", "--startup-runs", "1", "--threads", "1"]
        + ["--cache", tmp_path / "cache", "--out", out],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["images"] == 4 and result["size"] == 32 and result["max_abs_logit_difference"] <= 1e-4
    for backend in ("torch", "onnx"):
        r = result[backend]
        assert min(r["model_images_per_s"], r["files_images_per_s"], r["first_prediction_s"]) > 0
        assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p95"]
    assert "torch eager" in proc.stdout and "onnxruntime" in proc.stdout
