"""Hostile inputs and faults (issue 11): odd images, colliding names, symlinks, a full or read-only
disk, a misspelt params key, a text file as weights, a killed parent and a second copy of a stage.

Each failure must be one line on stderr (what, where, how to fix), a non-zero exit code, no
traceback, and a stage's outs replaced together or not at all, its metrics file last.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, make_prepared, run_main_in_process, run_stage, write_params
from PIL import Image

from cnnlens.tensors import load_split

# slow (scratch repositories, DVC, several processes, kills): `make test-all`, not `make test`
pytestmark = pytest.mark.integration

RNG = np.random.default_rng(0)


def noise(w, h):
    return Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8))


def small_imagefolder(raw: Path, n=2, size=(48, 40)):
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            (raw / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise(*size).save(raw / split / cls / f"{i}.jpg")
    return raw


def one_line_error(proc, *words):
    """Exit code != 0, no traceback, and every word in the last stderr line."""
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in last, proc.stderr
    return last


def prepare(tmp_path, raw, out=None, report=None, **overrides):
    params = write_params(tmp_path / "params.yaml", {"prepare": {"resize": 32, **overrides}})
    out, report = out or tmp_path / "out", report or tmp_path / "data.json"
    return run_stage("prepare", "--raw", raw, "--out", out, "--report", report, "--params", params)


# ---------------------------------------------------------------------------------------------
# 1. an extreme aspect ratio is a reported skip


def test_extreme_aspect_ratio_is_a_reported_skip(tmp_path):
    raw = small_imagefolder(tmp_path / "raw")
    # resized to a short side of 32 this is 640,000 px wide: more than a JPEG can hold (65,535)
    Image.new("RGB", (40_000, 2), (200, 10, 10)).save(raw / "train" / "ants" / "wide.png")
    noise(300, 10).save(raw / "train" / "bees" / "ratio30.png")
    proc = prepare(tmp_path, raw)
    assert proc.returncode == 0, proc.stderr
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv").set_index("path")["reason"]
    assert "max_aspect" in skipped["train/ants/wide.png"] and "20000" in skipped["train/ants/wide.png"]
    assert "max_aspect" in skipped["train/bees/ratio30.png"]
    assert json.loads((tmp_path / "data.json").read_text())["skipped"] == 2

    proc = prepare(tmp_path, raw, max_aspect=50)  # documented param: 30:1 is now allowed
    assert proc.returncode == 0, proc.stderr
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")["path"].tolist()
    assert skipped == ["train/ants/wide.png"]
    assert Image.open(tmp_path / "out" / "train/bees/ratio30.png.jpg").size == (960, 32)


def test_max_aspect_is_validated(tmp_path):
    proc = prepare(tmp_path, small_imagefolder(tmp_path / "raw"), max_aspect=0.5)
    assert proc.returncode == 2 and "prepare.max_aspect" in proc.stderr


# ---------------------------------------------------------------------------------------------
# 2. every source file maps to its own prepared file


def test_same_stem_and_nested_files_all_kept(tmp_path):
    raw = small_imagefolder(tmp_path / "raw")
    ants = raw / "train" / "ants"
    for ext in ("bmp", "tiff", "webp", "png"):
        noise(48, 40).save(ants / f"img.{ext}")
    noise(48, 40).save(ants / "img.jpg")
    (ants / "sub").mkdir()
    noise(48, 40).save(ants / "sub" / "img.jpg")
    noise(48, 40).save(ants / "sub" / "0.jpg")  # same name as train/ants/0.jpg
    proc = prepare(tmp_path, raw)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    manifest = pd.read_csv(out / "manifest.csv")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    assert sorted(manifest["prepared"]) == files  # one file per row, none overwritten
    assert len(manifest) == 8 + 7
    names = set(manifest["prepared"])
    for name in ("img.bmp.jpg", "img.tiff.jpg", "img.webp.jpg", "img.png.jpg", "img.jpg", "sub/img.jpg"):
        assert f"train/ants/{name}" in names
    assert {"train/ants/0.jpg", "train/ants/sub/0.jpg"} <= names
    assert len(load_split(out, "train").paths) == 4 + 7


def test_a_remaining_name_collision_is_refused(tmp_path):
    raw = small_imagefolder(tmp_path / "raw")
    noise(48, 40).save(raw / "train" / "ants" / "x.png")
    noise(48, 40).save(raw / "train" / "ants" / "x.png.jpg", format="JPEG")  # also becomes x.png.jpg
    proc = prepare(tmp_path, raw)
    one_line_error(proc, "train/ants/x.png", "train/ants/x.png.jpg")
    assert not (tmp_path / "out").exists() and not (tmp_path / "data.json").exists()


# ---------------------------------------------------------------------------------------------
# 3. symlinks in a local data.source


def download_data(tmp_path, source, **data):
    params = write_params(tmp_path / "params.yaml", {"data": {"source": str(source), **data}})
    proc = run_stage("download", "data", "--out", tmp_path / "raw", "--params", params)
    return proc, tmp_path / "raw"


def test_symlink_leaving_the_source_is_refused(tmp_path):
    src = small_imagefolder(tmp_path / "src")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    (src / "train" / "ants" / "passwd.jpg").symlink_to(secret)
    proc, raw = download_data(tmp_path, src)
    one_line_error(proc, "train/ants/passwd.jpg", "outside")
    assert not raw.exists()


def test_symlinked_folder_across_splits_is_refused(tmp_path):
    src = small_imagefolder(tmp_path / "src")
    (src / "train" / "bees" / "more").symlink_to(Path("..", "..", "val", "bees"))
    proc, raw = download_data(tmp_path, src)
    one_line_error(proc, "train/bees/more", "val/bees")
    assert not raw.exists()


def test_dangling_symlink_is_a_clear_error(tmp_path):
    src = small_imagefolder(tmp_path / "src")
    (src / "val" / "ants" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    proc, raw = download_data(tmp_path, src)
    one_line_error(proc, "val/ants/gone.jpg", "dangling")
    assert not raw.exists()


def test_symlink_inside_one_split_is_copied_and_reported(tmp_path):
    src = small_imagefolder(tmp_path / "src")
    (src / "train" / "ants" / "alias.jpg").symlink_to("0.jpg")
    proc, raw = download_data(tmp_path, src)
    assert proc.returncode == 0, proc.stderr
    copied = raw / "train" / "ants" / "alias.jpg"
    assert not copied.is_symlink() and copied.read_bytes() == (src / "train/ants/0.jpg").read_bytes()
    links = json.loads((raw / "SOURCE.json").read_text())["symlinks"]
    assert links == {"mode": "inside", "copied": ["train/ants/alias.jpg"]}

    proc, raw = download_data(tmp_path, src, symlinks="refuse")
    one_line_error(proc, "train/ants/alias.jpg", "data.symlinks")


# ---------------------------------------------------------------------------------------------
# 4 + 5. a full disk, a read-only disk, a failed write: one line, outs all or nothing, metrics last


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount(size, read_only=False) -> a fresh tmpfs folder; skipped where this process cannot mount."""
    mounted = []

    def mount(size="1m", read_only=False):
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        got = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True)
        if got.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {got.stderr.decode().strip()}"
            )
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_full_disk_during_prepare(tmp_path, mount_tmpfs):
    raw = small_imagefolder(tmp_path / "raw", n=6, size=(300, 256))  # ~2 MB of noise JPEGs and tensors
    disk = mount_tmpfs("1m")
    proc = prepare(tmp_path, raw, out=disk / "prepared", resize=256)
    one_line_error(proc, "No space left on device", str(disk))
    assert not (tmp_path / "data.json").exists(), "metrics must not be written when the outs failed"
    assert list(disk.iterdir()) == [], "temporaries must be removed"


def test_read_only_metrics_folder_keeps_the_old_plots(tmp_path, mount_tmpfs):
    from cnnlens.model import build_model, save_checkpoint

    prepared = make_prepared(tmp_path / "prepared", n_train=4, n_val=6, size=40)
    torch.manual_seed(0)
    meta = {"arch": "resnet18", "classes": ["ants", "bees"], "input_size": 32, "loss": "cross_entropy"}
    save_checkpoint(tmp_path / "models", build_model("resnet18", 2).eval(), meta)
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "old.csv").write_text("old\n")
    metrics = mount_tmpfs("1m", read_only=True)
    params = write_params(tmp_path / "params.yaml", {"train": {"device": "cpu"}})
    proc = run_stage(
        "evaluate",
        *("--data", prepared, "--model", tmp_path / "models", "--metrics", metrics / "eval.json"),
        *("--plots", plots, "--params", params),
    )
    one_line_error(proc, "Read-only file system", str(metrics))
    assert sorted(p.name for p in plots.iterdir()) == ["old.csv"], "plots replaced without their metrics"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_injected_enospc_on_the_metrics_leaves_old_outs(tmp_path, monkeypatch, capsys):
    """The last write fails (ENOSPC on the metrics): the stage's new plots must not stay."""
    from cnnlens.model import build_model, save_checkpoint
    from stages import evaluate

    prepared = make_prepared(tmp_path / "prepared", n_train=4, n_val=6, size=40)
    meta = {"arch": "resnet18", "classes": ["ants", "bees"], "input_size": 32, "loss": "cross_entropy"}
    save_checkpoint(tmp_path / "models", build_model("resnet18", 2).eval(), meta)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "old.csv").write_text("old\n")
    (tmp_path / "eval.json").write_text("{}\n")
    real_write = Path.write_text

    def full_disk(self, *args, **kwargs):
        if "eval.json" in self.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    params = write_params(tmp_path / "params.yaml", {"train": {"device": "cpu"}})
    code, err = run_main_in_process(
        evaluate.main,
        ["--data", prepared, "--model", tmp_path / "models", "--metrics", tmp_path / "eval.json"]
        + ["--plots", tmp_path / "plots", "--params", params],
        capsys,
    )
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "eval.json" in err and "free" in err, err
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["old.csv"]
    assert (tmp_path / "eval.json").read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_full_disk_while_writing_shards_names_the_folder(tmp_path, monkeypatch, capsys):
    from cnnlens.packing import ShardWriter
    from stages import prepare as stage

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # a failed write() names no file

    monkeypatch.setattr(ShardWriter, "add", full)
    raw = small_imagefolder(tmp_path / "raw")
    params = write_params(tmp_path / "params.yaml", {"prepare": {"resize": 32}})
    code, err = run_main_in_process(
        stage.main,
        ["--raw", raw, "--out", tmp_path / "out", "--report", tmp_path / "data.json", "--params", params],
        capsys,
    )
    assert code == 1 and "Traceback" not in err, err
    assert str(tmp_path) in err and "space" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "data.json").exists()


# ---------------------------------------------------------------------------------------------
# 6. a misspelt top-level key, an empty params file


def test_misspelt_top_level_key_stops_every_stage_and_the_check(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"trian": {"epochs": 3}})
    proc = run_stage("cnnlens.config", "check", params)
    one_line_error(proc, "unknown key trian")
    assert proc.returncode == 2
    proc = run_stage(
        "evaluate", *("--data", "d", "--model", "m", "--metrics", "e", "--plots", "p"), "--params", params
    )
    assert proc.returncode == 2 and "unknown key trian" in proc.stderr


def test_make_run_checks_params_before_dvc_repro():
    """`dvc repro` skips stages whose params did not change, so `make run` validates the whole file first."""
    text = (ROOT / "Makefile").read_text()
    recipe = text.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert recipe.index("cnnlens.config check") < recipe.index("dvc repro")


def test_empty_params_file_fails_the_check(tmp_path):
    (tmp_path / "params.yaml").write_text("# nothing here\n")
    proc = run_stage("cnnlens.config", "check", tmp_path / "params.yaml")
    one_line_error(proc, "empty")
    assert proc.returncode == 2


# ---------------------------------------------------------------------------------------------
# 7. a weights file that is not a checkpoint for model.arch


def download_weights(tmp_path, weights, arch="resnet18"):
    params = write_params(tmp_path / "params.yaml", {"model": {"arch": arch, "weights": str(weights)}})
    return run_stage("download", "weights", "--out", tmp_path / "weights", "--params", params)


def test_text_file_as_weights_fails_in_download_weights(tmp_path):
    text = tmp_path / "some.txt"
    text.write_text("not a checkpoint\n")
    proc = download_weights(tmp_path, text)
    one_line_error(proc, "model.weights", str(text))
    assert not (tmp_path / "weights").exists()


def test_weights_for_another_arch_fail_in_download_weights(tmp_path):
    import torchvision

    path = tmp_path / "small.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    proc = download_weights(tmp_path, path, arch="resnet18")
    one_line_error(proc, "model.weights", str(path), "missing")
    assert not (tmp_path / "weights").exists()
    proc = download_weights(tmp_path, path, arch="mobilenet_v3_small")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "weights" / "weights.json").read_text())["source"] == "local"


# ---------------------------------------------------------------------------------------------
# 8. a killed parent, a second copy


SLOW_SYNTHETIC = {"data": {"source": "synthetic", "synthetic": {"image_size": 512, "train_ants": 4000}}}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited; only its reaper is missing


def test_stage_stops_when_its_parent_dies(tmp_path):
    params = write_params(tmp_path / "params.yaml", SLOW_SYNTHETIC)
    parent = textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-m", "stages.download", "data", "--out", {str(tmp_path / "raw")!r},
                                  "--params", {str(params)!r}], cwd={str(ROOT)!r})
        print(child.pid, flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", parent],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    child = int(proc.stdout.readline())
    time.sleep(3)  # the stage is importing or generating
    assert alive(child)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    still = alive(child)
    if still:
        os.kill(child, signal.SIGKILL)
    assert not still, "the stage kept running after its parent was killed"
    assert not (tmp_path / "raw").exists()


def test_second_copy_of_a_stage_is_refused(tmp_path):
    params = write_params(tmp_path / "params.yaml", SLOW_SYNTHETIC)
    cmd = [
        sys.executable,
        "-m",
        "stages.download",
        "data",
        "--out",
        str(tmp_path / "raw"),
        "--params",
        str(params),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        one_line_error(second, str(tmp_path / "raw"), "another", str(first.pid))
    finally:
        first.kill()
        first.wait()


def test_a_failed_rename_puts_every_old_out_back(tmp_path, monkeypatch):
    """atomic_outputs: when the last rename fails, the outs already renamed are rolled back."""
    from cnnlens import files

    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "old.csv").write_text("old\n")
    (tmp_path / "m.json").write_text("{}\n")
    real_replace = os.replace

    def replace(src, dst):
        name = Path(src).name  # the new metrics file, not the old one being put back
        if name.startswith(".m.json.") and not name.endswith(".old.tmp") and Path(dst).name == "m.json":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError), files.atomic_outputs(tmp_path / "plots", tmp_path / "m.json") as (plots, m):
        plots.mkdir()
        (plots / "new.csv").write_text("new\n")
        m.write_text('{"new": 1}\n')
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["old.csv"]
    assert (tmp_path / "m.json").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "plots"]


# ---------------------------------------------------------------------------------------------
# 9. (issue 20) an error line stays one readable line, whatever the message holds


def test_a_huge_or_multi_line_error_is_one_short_line(capsys):
    from cnnlens.errors import StageError

    def main(argv):
        raise StageError("data.source: bad\n" + "x" * 1_000_000 + "\nfix: set data.source to a folder")

    code, err = run_main_in_process(main, [], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and len(err) <= 1100, err[:2000]
    assert err.startswith("error: data.source: bad x") and err.rstrip().endswith(
        "fix: set data.source to a folder"
    )
