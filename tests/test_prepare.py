"""prepare against a corpus of bad and odd files, both policies, and the real data."""

import json
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA, needs_real_data, run_stage, write_params
from PIL import Image

from cnnlens.tensors import load_split


def png_with_huge_declared_size(path):
    """A valid PNG header declaring 100000 x 100000 pixels (a decompression bomb by its size)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )


def make_corpus(raw):
    """Good images of many modes in ants, bad files in bees next to enough good ones."""
    rng = np.random.default_rng(0)
    rgb = lambda w=60, h=40: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    for split in ("train", "val"):
        ants, bees = raw / split / "ants", raw / split / "bees"
        ants.mkdir(parents=True), bees.mkdir(parents=True)
        rgb().save(ants / "rgb.jpg")
        rgb().convert("L").save(ants / "gray.png")
        rgb().convert("P", palette=Image.ADAPTIVE).save(ants / "palette.png")
        rgb().convert("CMYK").save(ants / "cmyk.jpg")
        Image.fromarray(rng.integers(0, 255, (40, 60, 4), dtype=np.uint8), "RGBA").save(ants / "alpha.png")
        Image.fromarray((rng.integers(0, 65535, (40, 60))).astype(np.uint16)).save(ants / "sixteen.png")
        rgb().save(bees / "good.jpg")
        rgb(30, 90).save(bees / "tall.png")
    bad = raw / "train" / "bees"
    good = (raw / "train" / "bees" / "good.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (bad / "notes.txt").write_text("not an image")
    (bad / "fake.jpg").write_text("text pretending to be a jpeg")
    png_with_huge_declared_size(bad / "bomb.png")
    return {"truncated.jpg", "zero.jpg", "corrupt.png", "notes.txt", "fake.jpg", "bomb.png"}


def prepare(tmp_path, raw, **overrides):
    params = write_params(tmp_path / "params.yaml", {"prepare": {"resize": 32, **overrides}})
    return run_stage(
        "prepare",
        "--raw",
        raw,
        "--out",
        tmp_path / "out",
        "--report",
        tmp_path / "data.json",
        "--params",
        params,
    )


def test_skip_policy_reports_every_bad_file_and_converts_modes(tmp_path):
    bad = make_corpus(tmp_path / "raw")
    proc = prepare(tmp_path, tmp_path / "raw")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "data.json").read_text())
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv").to_dict("records")
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in skipped}
    assert set(reasons) == bad
    assert "empty" in reasons["zero.jpg"] and "decompression bomb" in reasons["bomb.png"]
    assert "not an image type" in reasons["notes.txt"] and "cannot decode" in reasons["truncated.jpg"]
    assert report["train_images"] == 8 and report["val_images"] == 8
    train = load_split(tmp_path / "out", "train")
    assert train.images.shape == (8, 3, 32, 32) and train.images[:].dtype == torch.uint8
    assert train.masks is None
    # 16-bit scaled down, not clipped to white; alpha composited on white
    idx = train.paths.index("train/ants/sixteen.png")
    assert 60 < train.images[idx].float().mean() < 200
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert len(manifest) == 16 and set(manifest.columns) >= {
        "path",
        "split",
        "class",
        "label",
        "sha256",
        "orig_width",
        "orig_height",
        "box",
    }
    tall = manifest[manifest.path == "train/bees/tall.png"].iloc[0]
    assert (tall.orig_width, tall.orig_height) == (30, 90)
    assert Image.open(tmp_path / "out" / "train/bees/tall.png.jpg").size == (32, 96)  # short side resized
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["ants", "bees"]
    assert "6 skipped" in proc.stderr


def test_fail_policy_lists_files_and_writes_no_output(tmp_path):
    bad = make_corpus(tmp_path / "raw")
    proc = prepare(tmp_path, tmp_path / "raw", on_bad_image="fail")
    assert proc.returncode == 1
    for name in bad:
        assert name in proc.stderr
    assert "on_bad_image" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no temporary left behind


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"train/ants": 2, "val/ants": 1}, "at least 2"),
        ({"train/ants": 2, "train/bees": 2, "val/ants": 1}, "'bees' is missing from val/"),
        ({"train/ants": 2, "train/bees": 0, "val/ants": 1, "val/bees": 1}, "no images"),
    ],
)
def test_class_problems_fail_clearly(tmp_path, layout, message):
    for folder, n in layout.items():
        (tmp_path / "raw" / folder).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(tmp_path / "raw" / folder / f"{i}.png")
    proc = prepare(tmp_path, tmp_path / "raw")
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_no_val_folder_gives_a_stratified_seeded_split(tmp_path):
    for cls, n in (("ants", 10), ("bees", 20)):
        (tmp_path / "raw" / "train" / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 40), (i, 9, 9)).save(tmp_path / "raw" / "train" / cls / f"{i}.png")
    proc = prepare(tmp_path, tmp_path / "raw", val_fraction=0.2)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads((tmp_path / "out" / "counts.json").read_text())
    assert counts["val"] == {"ants": 2, "bees": 4}
    assert counts["train"] == {"ants": 8, "bees": 16}


@needs_real_data
def test_real_hymenoptera(tmp_path):
    proc = run_stage(
        "prepare",
        "--raw",
        SHARED_DATA,
        "--out",
        tmp_path / "out",
        "--report",
        tmp_path / "data.json",
        "--params",
        write_params(tmp_path / "params.yaml", {"prepare": {"resize": 64}}),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "data.json").read_text())
    assert (report["train_images"], report["val_images"]) == (244, 153)
    assert pd.read_csv(tmp_path / "out" / "skipped.csv").path.tolist() == ["train/ants/imageNotFound.gif"]
    val = load_split(tmp_path / "out", "val")
    assert val.images.shape == (153, 3, 64, 64) and int(val.labels.sum()) == 83  # 83 bees


def test_many_bad_files_are_summarised_and_listed_in_full_in_skipped_csv(tmp_path):
    """10,000 bad files once printed 10,000 log lines and a 1.4 MB metrics file."""
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            (tmp_path / "raw" / split / cls).mkdir(parents=True)
            Image.new("RGB", (40, 40)).save(tmp_path / "raw" / split / cls / "good.png")
    for i in range(300):
        (tmp_path / "raw" / "train" / "bees" / f"bad{i:03d}.jpg").write_bytes(b"")
    proc = prepare(tmp_path, tmp_path / "raw")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stderr.splitlines()) < 30, proc.stderr
    assert "and 280 more" in proc.stderr and "skipped.csv" in proc.stderr
    report = json.loads((tmp_path / "data.json").read_text())
    assert report == {"classes": 2, "train_images": 2, "val_images": 2, "skipped": 300}
    assert len(pd.read_csv(tmp_path / "out" / "skipped.csv")) == 300


def test_a_train_only_class_too_small_to_split_names_the_train_folder(tmp_path):
    for cls in ("ants", "bees"):
        (tmp_path / "raw" / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40)).save(tmp_path / "raw" / "train" / cls / "only.png")
    proc = prepare(tmp_path, tmp_path / "raw")
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert "raw/val/" not in line, line  # there is no val/ folder to point at
    assert f"{tmp_path / 'raw' / 'train' / 'ants'}: 1 image" in line and "val_fraction" in line, line
