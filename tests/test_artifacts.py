"""Artifacts a stage reads from an earlier stage (issue #20): shards/index.json checked against
classes.json, a broken classes.json, shard file names confined to shards/, and the SHA-256 of
models/model.pt that models/model.json records.

Each bad artifact stops the reading stage with one line naming the file and the stage to rerun, an
exit code != 0 and no outs, never a traceback from deep inside torch or scikit-learn.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_TRAIN,
    checkpoint_meta,
    make_prepared,
    make_weights_dir,
    run_main_in_process,
    write_params,
)

from cnnlens.errors import StageError
from cnnlens.model import build_model, load_checkpoint, save_checkpoint
from cnnlens.tensors import load_classes, load_split

CROP = 32


@pytest.fixture
def prepared(tmp_path) -> Path:
    return make_prepared(tmp_path / "prepared", n_train=6, n_val=6, size=40)


def edit_index(prepared: Path, change) -> None:
    path = prepared / "shards" / "index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


def one_line(code: int, err: str, *words) -> str:
    """Exit code 1, stderr a single `error:` line holding every word."""
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], err
    return lines[0]


def finetune(tmp_path, prepared, capsys) -> tuple[int, str]:
    from stages import finetune as stage

    params = write_params(tmp_path / "params.yaml", {"model": {"weights": "none"}, "train": TINY_TRAIN})
    out = tmp_path / "out"
    code, err = run_main_in_process(
        stage.main,
        ["--data", prepared, "--weights", make_weights_dir(tmp_path / "w"), "--model", out / "models"]
        + ["--metrics", out / "train.json", "--live", out / "live", "--params", params],
        capsys,
    )
    # the locks beside the outs go when the process does; .cnnlens/ is the git-ignored checkpoint cache
    left = (
        [f.name for f in out.iterdir() if not f.name.endswith(".lock") and f.name != ".cnnlens"]
        if out.exists()
        else []
    )
    assert left == [], "a failed finetune left outs"
    return code, err[err.find("error:") :]  # its log line before the error is not part of this


def save_model(models: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(models, build_model("resnet18", 2).eval(), checkpoint_meta(CROP))
    return models


def evaluate(tmp_path, prepared, capsys, models=None) -> tuple[int, str]:
    from stages import evaluate as stage

    models = models or save_model(tmp_path / "models")
    params = write_params(tmp_path / "params.yaml", {"evaluate": {"device": "cpu"}})
    out = tmp_path / "eval"
    code, err = run_main_in_process(
        stage.main,
        ["--data", prepared, "--model", models, "--metrics", out / "eval.json", "--plots", out / "plots"]
        + ["--params", params],
        capsys,
    )
    assert not out.exists() or not any(out.iterdir()), "a failed evaluate left outs"
    return code, err


# ---------------------------------------------------------------------------------------------
# item 2: the index against classes.json, its counts, no empty split where one is needed


@pytest.mark.parametrize(("split", "label"), [("val", 5), ("val", -1), ("train", 2)])
def test_a_label_outside_the_classes_is_one_line(prepared, split, label):
    edit_index(prepared, lambda index: index["splits"][split]["labels"].__setitem__(3, label))
    with pytest.raises(StageError) as err:
        load_split(prepared, split)
    msg = str(err.value)
    assert "\n" not in msg and str(prepared / "shards" / "index.json") in msg, msg
    assert f"label {label} of {split} image 3 " in msg and "outside the 2 classes in" in msg, msg
    assert str(prepared / "classes.json") in msg and "dvc repro prepare" in msg, msg


def test_finetune_stops_on_a_label_outside_the_classes(tmp_path, prepared, capsys):
    # before: IndexError: Target 5 is out of bounds (a traceback from the loss)
    edit_index(prepared, lambda index: index["splits"]["train"]["labels"].__setitem__(1, 5))
    code, err = finetune(tmp_path, prepared, capsys)
    one_line(code, err, "index.json", "label 5 of train image 1", "classes.json", "dvc repro prepare")


def test_evaluate_stops_on_a_negative_label(tmp_path, prepared, capsys):
    # before: scikit-learn's ValueError: multi_class must be in ('ovo', 'ovr')
    edit_index(prepared, lambda index: index["splits"]["val"]["labels"].__setitem__(0, -1))
    code, err = evaluate(tmp_path, prepared, capsys)
    one_line(code, err, "index.json", "label -1 of val image 0", "dvc repro prepare")


BAD_ENTRIES = {
    "a label that is not an integer": lambda e: e["labels"].__setitem__(0, 1.5),
    "a boolean label": lambda e: e["labels"].__setitem__(0, True),
    "a path that is not a string": lambda e: e["paths"].__setitem__(0, 7),
    "a shard count that is a string": lambda e: e["shards"][0].__setitem__("images", "6"),
    "a negative shard count": lambda e: e["shards"][0].__setitem__("images", -1),
    "an image total that disagrees": lambda e: e.__setitem__("images", 5),
    "shards that are no list": lambda e: e.__setitem__("shards", {"file": "val-00000.u8"}),
}


@pytest.mark.parametrize("how", BAD_ENTRIES)
def test_an_inconsistent_split_entry_is_one_line(prepared, how):
    edit_index(prepared, lambda index: BAD_ENTRIES[how](index["splits"]["val"]))
    with pytest.raises(StageError) as err:
        load_split(prepared, "val")
    msg = str(err.value)
    assert "\n" not in msg and "index.json" in msg and "'val'" in msg and "dvc repro prepare" in msg, msg


def empty(entry: dict) -> None:
    entry.update(images=0, shards=[], labels=[], paths=[])


def test_an_empty_split_is_refused_unless_allowed(prepared):
    edit_index(prepared, lambda index: empty(index["splits"]["val"]))
    with pytest.raises(StageError, match=r"index.json: the val split holds no images; .*dvc repro prepare"):
        load_split(prepared, "val")
    assert len(load_split(prepared, "val", allow_empty=True)) == 0


@pytest.mark.parametrize("split", ["train", "val"])
def test_finetune_stops_on_an_empty_split(tmp_path, prepared, capsys, split):
    # before, an empty val: IndexError: Dimension out of range
    edit_index(prepared, lambda index: empty(index["splits"][split]))
    code, err = finetune(tmp_path, prepared, capsys)
    one_line(code, err, "index.json", f"the {split} split holds no images", "dvc repro prepare")


def test_evaluate_stops_on_an_empty_val_split(tmp_path, prepared, capsys):
    edit_index(prepared, lambda index: empty(index["splits"]["val"]))
    code, err = evaluate(tmp_path, prepared, capsys)
    one_line(code, err, "index.json", "the val split holds no images", "dvc repro prepare")


# ---------------------------------------------------------------------------------------------
# item 3: a broken classes.json

BROKEN_CLASSES = {
    "truncated": '["ants", "be',
    "empty file": "",
    "a mapping": "{}",
    "null": "null",
    "no class": "[]",
    "one class": '["ants"]',
    "a repeated class": '["ants", "ants"]',
    "numbers": "[1, 2]",
    "an empty name": '["ants", ""]',
}


@pytest.mark.parametrize("how", BROKEN_CLASSES)
def test_a_broken_classes_json_is_one_line(prepared, how):
    (prepared / "classes.json").write_text(BROKEN_CLASSES[how])
    for read in (lambda: load_classes(prepared), lambda: load_split(prepared, "val")):
        with pytest.raises(StageError) as err:
            read()
        msg = str(err.value)
        assert "\n" not in msg and str(prepared / "classes.json") in msg and "dvc repro prepare" in msg, msg
        assert "at least 2 distinct" in msg or "not valid JSON" in msg, msg


def test_finetune_stops_on_a_truncated_classes_json(tmp_path, prepared, capsys):
    # before: json.decoder.JSONDecodeError, a traceback
    (prepared / "classes.json").write_text('["ants", "be')
    code, err = finetune(tmp_path, prepared, capsys)
    one_line(code, err, "classes.json", "not valid JSON", "dvc repro prepare")


def test_evaluate_stops_on_a_classes_json_that_is_no_list(tmp_path, prepared, capsys):
    # before: evaluate never read classes.json and exited 0
    (prepared / "classes.json").write_text("{}\n")
    code, err = evaluate(tmp_path, prepared, capsys)
    one_line(code, err, "classes.json", "at least 2 distinct", "dvc repro prepare")


# ---------------------------------------------------------------------------------------------
# item 4: shard file names stay inside shards/


def outside_copy(prepared: Path, name="val-00000.u8") -> Path:
    """A valid shard file two folders up (beside prepared/), the original removed."""
    outside = prepared.parent / "outside.u8"
    (prepared / "shards" / name).rename(outside)
    return outside


@pytest.mark.parametrize("key", ["file", "masks"])
@pytest.mark.parametrize("name", ["../../outside.u8", "ABSOLUTE", "sub/val-00000.u8", "..", "a\\b.u8", ""])
def test_a_shard_name_leaving_the_shards_folder_is_refused(tmp_path, key, name):
    prepared = make_prepared(tmp_path / "prepared", n_train=4, n_val=4, size=16, masks=True)
    outside = outside_copy(prepared, "val-00000.u8" if key == "file" else "val-00000.mask.u8")
    name = str(outside) if name == "ABSOLUTE" else name
    edit_index(prepared, lambda index: index["splits"]["val"]["shards"][0].__setitem__(key, name))
    with pytest.raises(StageError) as err:
        load_split(prepared, "val")
    msg = str(err.value)
    assert "\n" not in msg and "index.json" in msg and f"{name!r}" in msg, msg
    assert "shards folder" in msg and "dvc repro prepare" in msg, msg


def test_evaluate_refuses_a_shard_outside_the_folder(tmp_path, prepared, capsys):
    # before: the file two folders up was read and evaluate exited 0
    outside_copy(prepared)
    edit_index(
        prepared, lambda index: index["splits"]["val"]["shards"][0].__setitem__("file", "../../outside.u8")
    )
    code, err = evaluate(tmp_path, prepared, capsys)
    one_line(code, err, "index.json", "'../../outside.u8'", "dvc repro prepare")


def test_a_shard_link_is_followed_only_into_the_folder_or_a_dvc_cache(tmp_path, prepared):
    """A link that leaves shards/ is refused, except a link to a DVC cache object (`cache.type:
    symlink` checks every file out as one: <cache>/files/md5/<2 hex>/<30 hex>)."""
    shard = prepared / "shards" / "val-00000.u8"
    outside = outside_copy(prepared)
    shard.symlink_to(outside)
    with pytest.raises(StageError, match=r"val-00000.u8 .*outside the shards folder.*dvc repro prepare"):
        load_split(prepared, "val")
    digest = hashlib.md5(outside.read_bytes()).hexdigest()
    cached = tmp_path / "cache" / "files" / "md5" / digest[:2] / digest[2:]
    cached.parent.mkdir(parents=True)
    outside.rename(cached)
    shard.unlink()
    shard.symlink_to(cached)
    assert len(load_split(prepared, "val")) == 6


# ---------------------------------------------------------------------------------------------
# item 12: models/model.json carries the SHA-256 of models/model.pt


def flip_bytes(path: Path, count: int = 64) -> None:
    """Flip `count` bytes in the middle of the file (inside the tensor data: torch still loads it)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def test_the_checkpoint_records_the_sha256_of_model_pt(tmp_path):
    models = save_model(tmp_path / "models")
    meta = json.loads((models / "model.json").read_text())
    assert meta["model_sha256"] == hashlib.sha256((models / "model.pt").read_bytes()).hexdigest()
    _, loaded = load_checkpoint(models)
    assert loaded == checkpoint_meta(CROP)  # what save_checkpoint was given


def test_a_changed_model_pt_is_refused(tmp_path):
    models = save_model(tmp_path / "models")
    flip_bytes(models / "model.pt")
    torch.load(models / "model.pt", weights_only=True)  # the change alone does not stop torch
    with pytest.raises(StageError) as err:
        load_checkpoint(models)
    msg = str(err.value)
    assert "\n" not in msg and str(models / "model.pt") in msg and "model.json" in msg, msg
    assert "SHA-256" in msg and "dvc pull" in msg and "dvc repro finetune" in msg, msg


def test_evaluate_stops_on_a_changed_model_pt(tmp_path, prepared, capsys):
    # before: evaluate exited 0 with other numbers
    models = save_model(tmp_path / "models")
    flip_bytes(models / "model.pt")
    code, err = evaluate(tmp_path, prepared, capsys, models=models)
    one_line(code, err, "model.pt", "SHA-256", "dvc repro finetune")


def test_a_model_json_without_the_hash_is_refused(tmp_path):
    models = save_model(tmp_path / "models")
    meta = json.loads((models / "model.json").read_text())
    del meta["model_sha256"]
    (models / "model.json").write_text(json.dumps(meta))
    with pytest.raises(StageError, match=r"model.json: no model_sha256 .*rerun `dvc repro finetune`"):
        load_checkpoint(models)
