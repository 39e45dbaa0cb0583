"""The export stage: an ONNX model with a dynamic batch axis that onnxruntime runs as PyTorch does, its
facts beside it, and a failed check that writes nothing. Skips where onnxruntime cannot be imported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, randomize_batchnorm, small_resnet
from use_helpers import shared_tiny_project

pytest.importorskip("onnxruntime", reason="onnxruntime cannot be imported here")

import onnx  # noqa: E402  (requirements.txt: the exporter needs it; no skip without it)

from cnnlens.cli import run_main  # noqa: E402
from cnnlens.errors import StageError  # noqa: E402
from cnnlens.model import predict_logits, probabilities  # noqa: E402
from cnnlens.onnx_export import TOLERANCE, check_difference, compare_with_torch, export_onnx, onnx_session  # noqa: E402
from cnnlens.onnx_resnet import writable  # noqa: E402
from cnnlens.resnet import resnet  # noqa: E402
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


@pytest.mark.parametrize(
    "arch, loss", [("resnet18", "cross_entropy"), ("resnet34", "bce_with_logits"), ("resnet50", "focal")]
)
def test_resnets_are_written_node_by_node_and_compute_what_pytorch_does(tmp_path, one_thread, arch, loss):
    """cnnlens' ResNets skip the tracer: one node per module, named after it, every BatchNorm folded into its
    convolution, the loss's probability rule at the end; onnxruntime computes what PyTorch does."""
    torch.manual_seed(0)
    model = randomize_batchnorm(resnet(arch, num_classes=3)).eval()
    path = tmp_path / "m.onnx"
    assert export_onnx(model, path, 32, loss=loss, metadata={"arch": arch}) == "cnnlens.onnx_resnet"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = {node.name: node.op_type for node in proto.graph.node}
    assert (
        ops["layer1.0.conv1"] == "Conv"
        and ops["logits"] == "Gemm"
        and "BatchNormalization" not in ops.values()
    )
    blocks = {"resnet18": 8, "resnet34": 16, "resnet50": 16}[arch]
    assert sum(op == "Add" for op in ops.values()) == blocks
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    scale = predict_logits(model, x, 32, device=torch.device("cpu")).abs().max().item()
    diff = compare_with_torch(model, path, x, crop=32, loss=loss, batch_size=3)
    assert diff["images"] == 5 and diff["max_abs_logit_difference"] <= 1e-5 * max(1.0, scale)
    assert diff["max_abs_probability_difference"] <= 1e-5


def test_other_networks_go_through_the_tracer():
    """Only resnet.ResNet's own modules, with a Linear head and a known probability rule, are written
    directly; anything else (torchvision's networks, a changed head) is torch.onnx.export's."""
    model = resnet("resnet18", num_classes=2)
    assert writable(model, "cross_entropy") and writable(model, "multi_margin")
    assert not writable(small_resnet(seed=1), "cross_entropy")  # torchvision's class
    assert not writable(model, "no_such_loss")
    model.fc = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(512, 2))
    assert not writable(model, "cross_entropy")
    for change in ({"affine": False}, {"track_running_stats": False}):  # no scale and shift; no statistics
        model = resnet("resnet18", num_classes=2)
        model.layer2[0].bn1 = torch.nn.BatchNorm2d(128, **change)
        assert not writable(model, "cross_entropy")
    model = resnet("resnet18", num_classes=2)
    model.layer2[0].conv2 = torch.nn.Conv2d(128, 128, 3, padding=1, padding_mode="reflect", bias=False)
    assert not writable(model, "cross_entropy")
    model = resnet("resnet18", num_classes=2)
    model.fc = torch.nn.Linear(512, 2, bias=False)
    assert not writable(model, "cross_entropy")


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
    meta = {"arch": "resnet18", "n": 2}
    assert export_onnx(small_resnet(seed=1), path, 16, loss="cross_entropy", metadata=meta) == "torch.onnx"
    data = path.read_bytes()
    assert b"onnx_export.py" not in data and str(ROOT).encode() not in data
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta == {"arch": "resnet18", "n": "2"}
