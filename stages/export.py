"""export: the fine-tuned model as ONNX for serving, checked against PyTorch on every val image.

python -m stages.export --data data/prepared --model models --out export --metrics metrics/export.json

Writes <out>/model.onnx (uint8 centre crops in, logits and probabilities out, a dynamic batch axis; see
cnnlens/onnx_export.py) and <out>/model.json (models/model.json plus the ONNX facts), which is what
`python -m cnnlens.predict --backend onnx` reads. Not models/model.onnx: models/ is the finetune stage's
out, and DVC refuses two stages whose outs overlap. Before anything is written, onnxruntime runs every val
image and must agree with PyTorch (the evaluate stage's preprocessing and forward pass) to within
onnx_export.TOLERANCE on every logit; the largest difference goes into the metrics file, written last.
"""

import time

from cnnlens.cli import log, run_main
from cnnlens.config import stage_args
from cnnlens.files import atomic_outputs, write_json
from cnnlens.model import load_checkpoint
from cnnlens.onnx_export import OPSET, TOLERANCE, check_difference, compare_with_torch, export_onnx
from cnnlens.tensors import load_split


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def main(argv=None):
    args, _ = stage_args(
        __doc__, ("--data", "--model", "--out", "--metrics"), argv=argv, outs=("--out", "--metrics")
    )
    began = time.perf_counter()
    model, meta = load_checkpoint(args.model)
    val = load_split(args.data, "val")
    crop, loss = meta["input_size"], meta["loss"]
    facts = {"classes": meta["classes"], "input_size": crop, "resize": meta["resize"], "loss": loss}
    with atomic_outputs(args.out, args.metrics) as (out, metrics):  # together, the metrics last
        out.mkdir()
        onnx_path = out / "model.onnx"
        writer = export_onnx(model, onnx_path, crop, loss=loss, metadata={**facts, "arch": meta["arch"]})
        diff = compare_with_torch(model, onnx_path, val.images, crop=crop, loss=loss)
        check_difference(diff, args.out / "model.onnx")
        onnx_facts = {
            "format": "onnx",
            "file": "model.onnx",
            "opset": OPSET,
            "writer": writer,
            "input": {"name": "image", "dtype": "uint8", "shape": ["batch", 3, crop, crop]},
            "outputs": {
                "logits": ["batch", len(meta["classes"])],
                "probabilities": ["batch", len(meta["classes"])],
            },
            **versions(),
        }
        check = {**diff, "tolerance": TOLERANCE, "seconds": round(time.perf_counter() - began, 2)}
        write_json(
            out / "model.json",
            {**meta, "onnx": {**onnx_facts, "bytes": onnx_path.stat().st_size, "check": check}},
        )
        headline = ("max_abs_logit_difference", "max_abs_probability_difference")
        write_json(metrics, {key: diff[key] for key in headline})  # the rest: export/model.json
    log(
        f"export: {args.out / 'model.onnx'} ({onnx_path_size(args.out)}), onnxruntime vs PyTorch on "
        f"{diff['images']} val images: max |logit difference| {diff['max_abs_logit_difference']:.2g} "
        f"(allowed {TOLERANCE:g})"
    )


def onnx_path_size(folder) -> str:
    return f"{(folder / 'model.onnx').stat().st_size / 2**20:.1f} MiB"


if __name__ == "__main__":
    run_main(main)
