"""The export stage: an ONNX model with a dynamic batch axis that onnxruntime runs as PyTorch does, its
facts beside it, and a failed check that writes nothing. Skips where onnxruntime cannot be imported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, small_resnet
from use_helpers import shared_tiny_project

pytest.importorskip("onnxruntime", reason="onnxruntime cannot be imported here")

import onnx  # noqa: E402  (requirements.txt: the exporter needs it; no skip without it)

from cnnlens.cli import run_main  # noqa: E402
from cnnlens.errors import StageError  # noqa: E402
from cnnlens.model import predict_logits, probabilities  # noqa: E402
from cnnlens.onnx_export import TOLERANCE, check_difference, compare_with_torch, export_onnx, onnx_session  # noqa: E402
from cnnlens.tensors import center_crop, load_split  # noqa: E402


@pytest.fixture(scope="module")
def project(tmp_path_factory, one_thread):
    return shared_tiny_project(tmp_path_factory)


def test_stage_writes_the_model_its_facts_and_the_check(project):
    export = project / "export"
    assert sorted(p.name for p in export.iterdir()) == ["model.json", "model.onnx"]
    metrics = json.loads((project / "metrics/export.json").read_text())
    assert set(metrics) == {"max_abs_logit_difference", "max_abs_probability_difference"}  # the headline
    assert 0 <= metrics["max_abs_logit_difference"] <= TOLERANCE == 1e-4
    trained = json.loads((project / "models/model.json").read_text())
    facts = json.loads((export / "model.json").read_text())
    check, val = facts["onnx"]["check"], load_split(project / "data/prepared", "val")
    assert check["images"] == len(val) == 21 and check["tolerance"] == TOLERANCE
    assert check["max_abs_logit_difference"] == metrics["max_abs_logit_difference"]
    assert facts["onnx"]["bytes"] == (export / "model.onnx").stat().st_size
    trained.pop("model_sha256")  # the hash of models/model.pt, not of the ONNX file
    assert {k: facts[k] for k in trained} == trained  # models/model.json, plus:
    assert facts["onnx"]["input"] == {"name": "image", "dtype": "uint8", "shape": ["batch", 3, 32, 32]}
    props = {p.key: p.value for p in onnx.load(str(export / "model.onnx")).metadata_props}
    assert json.loads(props["classes"]) == trained["classes"] and props["resize"] == "40"


def test_the_batch_axis_is_dynamic_and_matches_evaluate(project):
    """Any batch size runs, and each image's logits do not depend on its batch; they match what the
    evaluate stage computes (model.predict_logits on the prepared squares)."""
    from cnnlens.model import load_checkpoint

    model, meta = load_checkpoint(project / "models")
    val = load_split(project / "data/prepared", "val")
    squares = val.images[: len(val)]
    crops = np.ascontiguousarray(center_crop(squares, 32).numpy())
    session = onnx_session(project / "export/model.onnx")
    whole, proba = session.run(None, {"image": crops})
    one_by_one = np.concatenate(
        [session.run(None, {"image": crops[i : i + 1]})[0] for i in range(len(crops))]
    )
    assert whole.shape == (21, 2) and np.abs(whole - one_by_one).max() <= 1e-5
    ref = predict_logits(model, squares, 32, device=torch.device("cpu"))
    assert np.abs(whole - ref.numpy()).max() <= TOLERANCE
    assert np.abs(proba - probabilities(ref, meta["loss"]).numpy()).max() <= 1e-5


def test_the_graph_applies_the_losses_probability_rule(tmp_path, one_thread):
    """bce_with_logits' probabilities are renormalised sigmoids, not a softmax: the exported graph has the
    rule of the loss it is given (model.probabilities)."""
    model = small_resnet(seed=1)
    model.fc = torch.nn.Linear(512, 3)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, 16, loss="bce_with_logits", metadata={})
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    diff = compare_with_torch(model, path, x, crop=16, loss="bce_with_logits", batch_size=2)
    assert diff["images"] == 3 and diff["max_abs_logit_difference"] <= TOLERANCE
    assert diff["max_abs_probability_difference"] <= 1e-5
    _, proba = onnx_session(path).run(None, {"image": x.numpy()})
    softmax = torch.softmax(predict_logits(model, x, 16, device=torch.device("cpu")), 1)
    assert np.abs(proba - softmax.numpy()).max() > 1e-3  # not the softmax


def test_check_difference_fails_in_one_line_on_a_large_or_nan_difference():
    check_difference({"max_abs_logit_difference": 1e-5, "images": 3}, "x.onnx")
    for bad in (1e-3, float("nan")):
        with pytest.raises(StageError) as info:
            check_difference({"max_abs_logit_difference": bad, "images": 3}, "x.onnx")
        assert "\n" not in str(info.value) and "nothing was written" in str(info.value)


def test_a_failed_check_writes_nothing(project, tmp_path, monkeypatch, capsys):
    """onnxruntime disagreeing with PyTorch: exit 1, one line on stderr, no out and no metrics, and the
    outs of an earlier run left as they were."""
    import stages.export as stage

    monkeypatch.setattr(stage, "export_onnx", lambda model, path, crop, **kw: path.write_bytes(b"onnx"))
    monkeypatch.setattr(
        stage,
        "compare_with_torch",
        lambda *a, **kw: {
            "max_abs_logit_difference": 0.5,
            "max_abs_probability_difference": 0.1,
            "images": 21,
        },
    )
    (tmp_path / "old").mkdir()
    (tmp_path / "old/model.onnx").write_text("earlier run")
    for out, metrics in (
        (tmp_path / "new", tmp_path / "new.json"),
        (tmp_path / "old", tmp_path / "old.json"),
    ):
        argv = ["--data", project / "data/prepared", "--model", project / "models", "--out", out]
        with pytest.raises(SystemExit) as info:
            run_main(
                stage.main,
                [*map(str, argv), "--metrics", str(metrics), "--params", str(project / "params.yaml")],
            )
        assert info.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "0.5" in err[0], err
        assert not metrics.exists()
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "old/model.onnx").read_text() == "earlier run"


def test_the_file_holds_no_path_of_this_checkout(tmp_path, one_thread):
    """The exporter notes each node's Python stack trace (absolute paths, line numbers): kept, the same model
    gave other bytes in another clone, and DVC another hash. The model's own metadata stays."""
    path = tmp_path / "m.onnx"
    export_onnx(small_resnet(seed=1), path, 16, loss="cross_entropy", metadata={"arch": "resnet18", "n": 2})
    data = path.read_bytes()
    assert b"onnx_export.py" not in data and str(ROOT).encode() not in data
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta == {"arch": "resnet18", "n": "2"}
