"""Prediction speed on the CPU, torch eager against onnxruntime, side by side in one run.

    python bench/bench_predict.py        # the 153 real val images (../shared/data/hymenoptera_data/val), 224 px
    python bench/bench_predict.py --size 64 --limit 8 --repeats 1 --latency-images 4 --startup-runs 1   # dry run

Run it on an idle machine: both backends use every core by default.

Measures, for each backend of `python -m cnnlens.predict` (cnnlens/predict.py's TorchBackend and OnnxBackend,
what a user gets):

- throughput, images/s: the model alone on the decoded images (batches of --batch-size), and end to end from
  the files (decode, resize, crop, model: predict.predict_files), the best of --repeats passes each;
- single-image latency, ms: one decoded image per call, p50 and p95 over --latency-images images;
- time to the first prediction, s: a fresh `python -m cnnlens.predict IMAGE` process, from its start until
  its first table row is on stdout (imports, model load, decode, one forward), median of --startup-runs.

The model is --model (a models/ folder, as finetune writes it) exported beside it with
cnnlens.onnx_export.export_onnx; by default a random-init ResNet-18 at --size px (resize = size x 256/224,
as the tutorial) saved with model.save_checkpoint in the --cache folder (git-ignored): speed does not
depend on the weights. Threads: torch's and onnxruntime's defaults (every core) unless --threads (the in-process
measurements only; the fresh processes keep the defaults, as a user's do). Prints a table and writes the
numbers, the machine and the versions to --out (JSON, in the --cache folder by default).
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnlens.files import write_json  # noqa: E402
from cnnlens.model import build_model, load_checkpoint, save_checkpoint  # noqa: E402
from cnnlens.onnx_export import compare_with_torch, export_onnx  # noqa: E402
from cnnlens.predict import (  # noqa: E402
    MAX_PIXELS,
    OnnxBackend,
    Sink,
    TorchBackend,
    collect,
    load_square,
    predict_files,
)

REAL_VAL = ROOT.parent / "shared" / "data" / "hymenoptera_data" / "val"


def random_model(folder: Path, size: int) -> Path:
    """A random-init ResNet-18 checkpoint as finetune writes one (model.pt + model.json), once per size."""
    models = folder / f"models-{size}"
    if not (models / "model.json").exists():
        torch.manual_seed(0)
        meta = {
            "arch": "resnet18",
            "classes": ["ants", "bees"],
            "input_size": size,
            "resize": round(size * 256 / 224),
            "loss": "cross_entropy",
            "weights_source": "none",
        }
        save_checkpoint(models, build_model("resnet18", 2).eval(), meta)
    return models


def onnx_beside(models: Path, folder: Path) -> Path:
    """models/ exported as the export stage exports it (model.onnx + model.json), once per checkpoint."""
    export = folder / f"export-{models.name}"
    if not (export / "model.onnx").exists():
        model, meta = load_checkpoint(models)
        export.mkdir(parents=True, exist_ok=True)
        export_onnx(model, export / "model.onnx", meta["input_size"], loss=meta["loss"], metadata={})
        write_json(export / "model.json", meta)
    return export


def model_throughput(backend, squares: np.ndarray, batch_size: int, repeats: int) -> float:
    backend(squares[:batch_size])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for start in range(0, len(squares), batch_size):
            backend(squares[start : start + batch_size])
        best = min(best, time.perf_counter() - began)
    return len(squares) / best


def files_throughput(backend, paths: list[Path], batch_size: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet  # the table of every pass
            try:
                sink = Sink(backend.meta["classes"], paths, None, header={})
                began = time.perf_counter()
                predict_files(backend, paths, sink, batch_size=batch_size, max_pixels=MAX_PIXELS)
                best = min(best, time.perf_counter() - began)
                sink.close()
            finally:
                sys.stdout = stdout
    return len(paths) / best


def latency_ms(backend, squares: np.ndarray, n: int) -> dict:
    backend(squares[:1])
    times = []
    for i in range(n):
        one = squares[i % len(squares)][None]
        began = time.perf_counter()
        backend(one)
        times.append((time.perf_counter() - began) * 1000)
    q = np.percentile(times, [50, 95])
    return {"p50": float(q[0]), "p95": float(q[1])}


def first_prediction_s(backend: str, model: Path, image: Path, runs: int) -> float:
    """Seconds from starting `python -m cnnlens.predict IMAGE` until its first table row reaches stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cnnlens.predict", str(image), "--backend", backend, "--model", str(model)]
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        proc = subprocess.Popen(
            [*cmd, "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        proc.stdout.readline()  # the table's header
        row = proc.stdout.readline()
        times.append(time.perf_counter() - began)
        proc.wait()
        if proc.returncode != 0 or not row.strip():
            raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
    return statistics.median(times)


def measure(args, models: Path, export: Path, paths: list[Path]) -> dict:
    backends = {
        "torch": TorchBackend(models, "cpu"),
        "onnx": OnnxBackend(export, "cpu", threads=args.threads),
    }
    resize = backends["torch"].meta["resize"]
    squares = np.stack([load_square(p, resize) for p in paths])
    results = {}
    for name, backend in backends.items():
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results[name] = {
            "model_images_per_s": model_throughput(backend, squares, args.batch_size, args.repeats),
            "files_images_per_s": files_throughput(backend, paths, args.batch_size, args.repeats),
            "latency_ms": latency_ms(backend, squares, args.latency_images),
            "first_prediction_s": first_prediction_s(
                name, models if name == "torch" else export, paths[0], args.startup_runs
            ),
        }
    diff = compare_with_torch(
        backends["torch"].model,
        export / "model.onnx",
        torch.from_numpy(squares),
        crop=args.size,
        loss="cross_entropy",
    )
    results["max_abs_logit_difference"] = diff["max_abs_logit_difference"]
    return results


def table(results: dict, n: int, size: int) -> str:
    rows = [
        ("images/s, model only (decoded images)", "model_images_per_s", "{:.1f}"),
        ("images/s, end to end from the files", "files_images_per_s", "{:.1f}"),
        ("latency p50, one image, ms", ("latency_ms", "p50"), "{:.2f}"),
        ("latency p95, one image, ms", ("latency_ms", "p95"), "{:.2f}"),
        ("process start to first prediction, s", "first_prediction_s", "{:.2f}"),
    ]
    get = lambda r, k: r[k[0]][k[1]] if isinstance(k, tuple) else r[k]
    lines = [
        f"{n} images at {size} px, CPU",
        f"| {'':40} | {'torch eager':>12} | {'onnxruntime':>12} |",
        f"|{'-' * 42}|{'-' * 14}|{'-' * 14}|",
    ]
    for label, key, fmt in rows:
        cells = [fmt.format(get(results[name], key)) for name in ("torch", "onnx")]
        lines.append(f"| {label:40} | {cells[0]:>12} | {cells[1]:>12} |")
    lines.append(f"max |logit difference| onnxruntime vs torch: {results['max_abs_logit_difference']:.2g}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--images", type=Path, default=REAL_VAL, help="image files or folders (default: the real val split)"
    )
    ap.add_argument(
        "--model", type=Path, help="a models/ folder (default: a random-init ResNet-18 at --size)"
    )
    ap.add_argument("--size", type=int, default=224, help="input size of the default model")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latency-images", type=int, default=100)
    ap.add_argument("--startup-runs", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch and onnxruntime threads (0: their defaults)"
    )
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache" / "predict")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / ".cache" / "predict" / "bench_predict.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths, problems, _ = collect([str(args.images)])
    paths = paths[: args.limit] if args.limit else paths
    if problems or not paths:
        raise SystemExit(f"no images at {args.images}: pass --images")
    models = args.model or random_model(args.cache, args.size)
    args.size = load_checkpoint(models)[1]["input_size"]
    results = measure(args, models, onnx_beside(models, args.cache), paths)
    print(table(results, len(paths), args.size))
    import onnxruntime

    facts = {
        "images": len(paths),
        "size": args.size,
        "batch_size": args.batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    write_json(args.out, {**facts, **results})
    print(f"-> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
