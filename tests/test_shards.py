"""Large datasets: packed shards + index, memory-mapped reads, streamed training equal to resident."""

import json
import re
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_TRAIN, loop_options, make_weights_dir, run_stage, write_params
from conftest import write_shards as write_shards_only
from PIL import Image

from cnnlens import shards
from cnnlens.decode import bounded_map
from cnnlens.errors import StageError
from cnnlens.model import build_model
from cnnlens.packing import ShardWriter, write_index
from cnnlens.shards import ShardedTensor, resident_budget
from cnnlens.tensors import Split, load_split
from cnnlens.training import configure_torch, place, train


def write_shards(folder: Path, splits: dict, *args, **kwargs) -> None:
    """conftest.write_shards, and the classes.json of random_split's two classes beside the shards
    folder, as prepare writes it (load_split checks the labels against it)."""
    write_shards_only(folder, splits, *args, **kwargs)
    (folder.parent / "classes.json").write_text('["a", "b"]\n')


def random_split(n, side, seed, split="train", separable=True) -> Split:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    noise = torch.randint(0, 60, (n, 3, side, side), generator=g)
    base = (labels * 150).view(n, 1, 1, 1) if separable else 0
    images = (noise + base).clamp(0, 255).to(torch.uint8)
    masks = torch.randint(0, 2, (n, side, side), generator=g, dtype=torch.uint8)
    return Split(images, labels, [f"{split}/{'ab'[int(c)]}/{i:03d}.png" for i, c in enumerate(labels)], masks)


def test_shards_read_back_exactly_across_boundaries(tmp_path):
    """23 images in shards of 5: every way of reading them (index tensor, slice, single row, the whole
    resident copy) gives the written bytes, and every shard file is within the size limit."""
    orig = random_split(23, 8, seed=0)
    write_shards(tmp_path / "prepared" / "shards", {"train": orig, "val": random_split(4, 8, 1, "val")}, 8, 5)
    files = sorted((tmp_path / "prepared" / "shards").glob("train-*.u8"))
    assert len([f for f in files if ".mask" not in f.name]) == 5
    assert all(f.stat().st_size <= 5 * 3 * 8 * 8 for f in files)
    s = load_split(tmp_path / "prepared", "train")
    assert len(s) == 23 and s.images.shape == (23, 3, 8, 8) and s.paths == orig.paths
    assert torch.equal(s.labels, orig.labels)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s.images[perm], orig.images[perm])
    assert torch.equal(s.images[3:17], orig.images[3:17]) and torch.equal(s.images[22], orig.images[22])
    assert torch.equal(s.images.to("cpu"), orig.images) and torch.equal(s.masks[perm], orig.masks[perm])
    sub = s.subset([20, 0, 7])
    assert torch.equal(sub.images, orig.images[[20, 0, 7]]) and sub.paths == [
        orig.paths[i] for i in (20, 0, 7)
    ]
    with pytest.raises(IndexError):
        s.images[torch.tensor([23])]


def test_masks_are_kept_only_when_every_image_has_one(tmp_path):
    side = 4
    w = ShardWriter(tmp_path, "val", side=side, max_bytes=2 * 3 * side * side)
    for i in range(3):
        mask = np.ones((side, side), np.uint8) if i != 1 else None
        w.add(np.full((3, side, side), i, np.uint8), mask=mask, label=i % 2, path=f"val/a/{i}.png")
    entry = w.close()
    write_index(tmp_path, side, {"val": entry})
    assert not list(tmp_path.glob("*.mask.u8"))
    assert all(sh["masks"] is None for sh in entry["shards"])


def corrupt(shards, how):
    index = json.loads((shards / "index.json").read_text())
    if how == "missing index":
        (shards / "index.json").unlink()
    elif how == "not json":
        (shards / "index.json").write_text("{not json")
    elif how == "other version":
        (shards / "index.json").write_text(json.dumps({**index, "version": 99}))
    elif how == "truncated shard":
        path = shards / "train-00001.u8"
        path.write_bytes(path.read_bytes()[:-10])
    elif how == "missing shard":
        (shards / "train-00002.u8").unlink()
    elif how == "labels missing":
        index["splits"]["train"]["labels"] = index["splits"]["train"]["labels"][:-1]
        (shards / "index.json").write_text(json.dumps(index))
    elif how == "no such split":
        del index["splits"]["train"]
        (shards / "index.json").write_text(json.dumps(index))


BAD = ["missing index", "not json", "other version", "truncated shard", "missing shard", "labels missing"]
BAD += ["no such split"]


@pytest.mark.parametrize("how", BAD)
def test_a_bad_index_or_shard_is_one_clear_error(tmp_path, how):
    write_shards(tmp_path / "shards", {"train": random_split(12, 4, 0), "val": random_split(4, 4, 1)}, 4, 5)
    corrupt(tmp_path / "shards", how)
    with pytest.raises(StageError) as err:
        load_split(tmp_path, "train")
    msg = str(err.value)
    assert "\n" not in msg and "shards" in msg and "rerun `dvc repro prepare`" in msg, msg


def test_a_truncated_shard_stops_finetune_with_one_line(tmp_path):
    prepared = tmp_path / "prepared"
    write_shards(
        prepared / "shards", {"train": random_split(12, 20, 0), "val": random_split(4, 20, 1)}, 20, 5
    )
    (prepared / "classes.json").write_text('["a", "b"]')
    corrupt(prepared / "shards", "truncated shard")
    params = write_params(tmp_path / "params.yaml", {"model": {"weights": "none"}, "train": TINY_TRAIN})
    proc = run_stage(
        "finetune",
        *("--data", prepared, "--weights", make_weights_dir(tmp_path / "w"), "--model", tmp_path / "m"),
        *("--metrics", tmp_path / "train.json", "--live", tmp_path / "live", "--params", params),
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "train-00001.u8" in last and "truncated" in last and "dvc repro prepare" in last, proc.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "train.json").exists()


def run_training(prepared, resident_mb, seed=0):
    options = loop_options(
        **{**TINY_TRAIN, "crop": 16, "epochs": 2, "batch_size": 5, "resident_mb": resident_mb}
    )
    cpu = torch.device("cpu")
    configure_torch(cpu, seed, threads=TINY_TRAIN["threads"], deterministic=False)
    model = build_model("resnet18", 2)
    splits = load_split(prepared, "train"), load_split(prepared, "val")
    history = train(model, *splits, options=options, device=cpu, seed=seed)
    return model.state_dict(), history


@pytest.mark.trajectory
def test_streamed_training_equals_resident_training_bit_for_bit(tmp_path, one_thread):
    """Same seed, same data: streaming batches from 5 shards (resident_mb: 0), holding the set in memory
    (resident_mb: 1024) and the same images in one shard give the same weights and metrics, exactly."""
    train_split, val_split = random_split(23, 20, 0), random_split(7, 20, 1, "val")
    write_shards(tmp_path / "sharded" / "shards", {"train": train_split, "val": val_split}, 20, 5)
    write_shards(tmp_path / "one" / "shards", {"train": train_split, "val": val_split}, 20)
    streamed, h_streamed = run_training(tmp_path / "sharded", 0)
    resident, h_resident = run_training(tmp_path / "sharded", 1024)
    one, h_one = run_training(tmp_path / "one", "auto")
    assert h_streamed.streamed and not h_resident.streamed and h_one.streamed
    strip = [
        [{k: v for k, v in e.items() if k != "seconds"} for e in h.epochs]
        for h in (h_streamed, h_resident, h_one)
    ]
    assert strip[0] == strip[1] == strip[2]
    for name, value in resident.items():
        assert torch.equal(streamed[name], value), name
        assert torch.equal(one[name], value), name


def test_auto_streams_on_a_cpu_and_a_budget_keeps_what_fits(tmp_path):
    """resident_mb auto on a CPU streams (the mapped shards are RAM already; a copy per process would
    hold the set twice); a budget in MiB keeps the set in memory exactly when train + val fit."""
    train_split, val_split = random_split(23, 20, 0), random_split(7, 20, 1, "val")
    write_shards(tmp_path / "shards", {"train": train_split, "val": val_split}, 20, 5)
    train_images, val_images = load_split(tmp_path, "train").images, load_split(tmp_path, "val").images
    cpu = torch.device("cpu")
    assert resident_budget("auto", cpu) == 0 and resident_budget(3, cpu) == 3 * 2**20
    need = train_images.nbytes + val_images.nbytes  # 30 images x 3 x 20 x 20 = 36,000 bytes
    assert need == 30 * 3 * 20 * 20
    for setting, streams in (("auto", True), (0, True), (1, False)):
        placed = place(train_images, val_images, resident_mb=setting, device=cpu)
        assert all(isinstance(t, ShardedTensor) == streams for t in placed), setting
        if not streams:
            assert torch.equal(placed[0], train_split.images) and torch.equal(placed[1], val_split.images)


def shard_rss(folder: Path) -> int:
    """Bytes of the files under `folder` mapped into this process now (/proc/self/smaps)."""
    total, counting = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            counting = str(folder) in line
        elif counting and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
@pytest.mark.integration  # slow: make test-all
def test_random_reads_keep_the_mapped_shard_pages_under_the_release_size(tmp_path, monkeypatch):
    """Random 12 KiB rows (64 px), far smaller than the 64 KiB the kernel maps around a read fault: the
    shard pages mapped into the process stay under RELEASE_BYTES however many rows are read. Counting
    the bytes copied instead of the windows mapped let 21 of the 24 MB be mapped (8 MB allowed)."""
    monkeypatch.setattr(shards, "RELEASE_BYTES", 8 * 2**20)
    n, side = 2000, 64  # 24 MB of images in shards of 500
    write_shards(tmp_path / "shards", {"train": random_split(n, side, 0)}, side, 500, masks=False)
    images = load_split(tmp_path, "train").images
    g = torch.Generator().manual_seed(0)
    peak, read = 0, 0
    for _ in range(120):
        images[torch.randint(0, n, (32,), generator=g)]
        read += 32 * 3 * side * side
        peak = max(peak, shard_rss(tmp_path))
    assert read > 5 * shards.RELEASE_BYTES and peak > shards.RELEASE_BYTES // 2
    assert peak <= shards.RELEASE_BYTES, f"{peak / 2**20:.1f} MiB mapped"


def test_bounded_map_keeps_at_most_depth_items_in_flight():
    started, lock = [0], threading.Lock()

    def work(i):
        with lock:
            started[0] += 1
        return i * i

    taken = 0
    for i, result in enumerate(bounded_map(work, list(range(200)), workers=4, depth=8)):
        assert result == i * i
        taken += 1
        assert started[0] <= taken + 8  # submitted = taken + at most `depth` queued
    assert taken == 200


def noise_folder(raw, n=3, size=(50, 40)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            (raw / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(raw / split / cls / f"{i}.png")
    return raw


def prepare(tmp_path, raw, name, **overrides):
    params = write_params(tmp_path / f"{name}.yaml", {"prepare": {"resize": 600, **overrides}})
    out = tmp_path / name
    proc = run_stage(
        "prepare", "--raw", raw, "--out", out, "--report", tmp_path / f"{name}.json", "--params", params
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_prepare_shard_size_and_copy_images(tmp_path):
    """shard_mb: 3 at 600 px (1,080,000 bytes an image) holds 2 images a shard; with copy_images: false
    no JPEG is written; the tensors equal those of the default settings (one shard, with the copy)."""
    raw = noise_folder(tmp_path / "raw")
    small = prepare(tmp_path, raw, "small", shard_mb=3, copy_images=False)
    default = prepare(tmp_path, raw, "default")
    assert not list(small.rglob("*.jpg")) and len(list(default.rglob("*.jpg"))) == 12
    assert (pd.read_csv(small / "manifest.csv")["prepared"].isna()).all()
    shards = sorted((small / "shards").glob("train-*[0-9].u8"))
    assert len(shards) == 3 and all(f.stat().st_size <= 3 * 2**20 for f in shards)  # 6 images, 2 a shard
    assert len(list((default / "shards").glob("train-*[0-9].u8"))) == 1
    for split in ("train", "val"):
        a, b = load_split(small, split), load_split(default, split)
        assert torch.equal(a.images.to("cpu"), b.images.to("cpu")) and a.paths == b.paths
        assert torch.equal(a.labels, b.labels)
