"""The model for serving: an ONNX file with a dynamic batch axis, checked against PyTorch.

The graph takes what a serving machine has after decoding and cropping, uint8 pixels N x 3 x S x S (S: the
model's input_size, the centre crop), and does the rest itself: the ImageNet normalisation
(tensors.normalize), the network, and the class probabilities by the rule of the loss it was trained with
(model.probabilities). Outputs: `logits` and `probabilities`, N x classes. So serving needs neither torch
nor the normalisation constants nor the loss's rule: onnxruntime, numpy and Pillow (requirements-serve.txt).
cnnlens' ResNets are written node by node (onnx_resnet.serving_graph, under a second); any other network is
traced by torch.onnx.export (seconds, and torch._dynamo's import).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from cnnlens.errors import StageError
from cnnlens.model import predict_logits, probabilities
from cnnlens.onnx_resnet import serving_graph
from cnnlens.tensors import center_crop, normalize

OPSET = 18  # ONNX opset of the export: onnxruntime 1.14 and later run it
TOLERANCE = 1e-4  # most |logit difference| between onnxruntime and PyTorch the export stage accepts
INPUT, OUTPUTS = "image", ("logits", "probabilities")


class Serving(nn.Module):
    """uint8 N x 3 x S x S -> (logits, probabilities): normalise, run `model`, apply the loss's rule."""

    def __init__(self, model: nn.Module, loss: str):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(normalize(image))
        return logits, probabilities(logits, self.loss)


def export_onnx(
    model: nn.Module, path: str | Path, crop: int, *, loss: str, metadata: dict, opset: int = OPSET
) -> str:
    """Write `model` (eval mode, CPU) as ONNX to `path`: one file, the batch axis dynamic, `metadata`
    in the model's metadata_props (strings as they are, other values as JSON), where any ONNX tool reads them.
    Returns the writer: "cnnlens.onnx_resnet" for a resnet.ResNet (its nodes written directly, under a
    second), else "torch.onnx" (traced by torch.onnx.export: seconds)."""
    proto, writer = serving_graph(model, crop, loss=loss, opset=opset), "cnnlens.onnx_resnet"
    if proto is None:
        proto, writer = traced_graph(model, crop, loss=loss, opset=opset), "torch.onnx"
    helper.set_model_props(
        proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    )
    # one self-contained file: the weights inside (ResNet-18: 45 MB)
    onnx.save_model(proto, str(path))
    return writer


def traced_graph(model: nn.Module, crop: int, *, loss: str, opset: int) -> onnx.ModelProto:
    """Serving(model, loss) traced by torch.onnx.export (dynamo), for any network."""
    serving = Serving(model.cpu().eval(), loss).eval()
    example = torch.zeros(2, 3, crop, crop, dtype=torch.uint8)
    try:
        program = torch.onnx.export(
            serving,
            (example,),
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many types, each with a long report
        why = (str(exc).strip().splitlines() or [""])[0][:200]
        raise StageError(f"torch.onnx.export failed ({type(exc).__name__}: {why})") from exc
    for node in program.model.graph.all_nodes():
        # the exporter's notes per node hold this file's absolute path and line numbers: without them
        # the same model gives the same bytes in every clone (DVC's hash, the run-cache)
        node.metadata_props.clear()
    return program.model_proto


def onnx_session(path: str | Path):
    """An onnxruntime session on the CPU, what the check runs."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@torch.no_grad()
def compare_with_torch(
    model: nn.Module, path: str | Path, images, *, crop: int, loss: str, batch_size: int = 32
) -> dict:
    """onnxruntime against PyTorch on every image of `images` (uint8 N x 3 x R x R, the prepared squares;
    a tensor or the memory-mapped shards), both from the evaluate stage's preprocessing, `batch_size` at a
    time: PyTorch is model.predict_logits (what evaluate runs), onnxruntime gets the same centre crops.
    Returns {max_abs_logit_difference, max_abs_probability_difference, images}."""
    session = onnx_session(path)
    model = model.cpu().eval()
    worst = {"logits": 0.0, "probabilities": 0.0}
    for start in range(0, len(images), batch_size):
        squares = images[start : start + batch_size]
        ref = predict_logits(model, squares, crop, device=torch.device("cpu"))
        logits, proba = session.run(
            list(OUTPUTS), {INPUT: np.ascontiguousarray(center_crop(squares, crop).numpy())}
        )
        ref_proba = probabilities(ref, loss).numpy()
        worst["logits"] = max(worst["logits"], float(np.abs(logits - ref.numpy()).max()))
        worst["probabilities"] = max(worst["probabilities"], float(np.abs(proba - ref_proba).max()))
    return {
        "max_abs_logit_difference": worst["logits"],
        "max_abs_probability_difference": worst["probabilities"],
        "images": len(images),
    }


def check_difference(diff: dict, path: str | Path, tolerance: float = TOLERANCE) -> None:
    """One line, and the stage fails, when onnxruntime strays from PyTorch by more than `tolerance`."""
    worst = diff["max_abs_logit_difference"]
    if not worst <= tolerance:  # NaN fails too
        raise StageError(
            f"{path}: onnxruntime's logits differ from PyTorch's by up to {worst:.3g} on {diff['images']} val "
            f"images (allowed: {tolerance:g}); nothing was written: check the onnx, onnxruntime and torch versions"
        )
