"""Predict (and explain) with the trained model on image files: what a teammate runs on new pictures.

    python -m cnnlens.predict PATH... [--model DIR] [--backend torch|onnx] [--explain gradient,gradcam]
                              [--out DIR] [--device auto] [--batch-size 32]

PATH: image files, folders (searched recursively for the image types the prepare stage reads) or quoted
globs ('photos/**/*.jpg'). Each image is preprocessed exactly as the evaluate stage sees a val image: decoded
with its EXIF orientation, converted to RGB, its short side resized to the model's `resize` (model.json) as
the prepare stage does (cnnlens.decode), the centre square, then the centre `input_size` crop, normalised.
So the torch backend gives evaluate's probabilities for the same source file, to the last printed digit.

Out: a table on stdout (path, predicted class, each class's probability); with --out, predictions.csv and
predictions.json there; with --explain, one figure per image and method, <out>/explain/<method>/<image>.png,
drawn as the saliency stage draws them. Bad files (not an image, truncated, a decompression bomb,
unreadable) are one line each on stderr and the others are still predicted. Images stream through in
batches (a few decoded at a time), so a large folder runs in bounded memory.

Exit codes: 0 when at least one image was predicted, 1 when none was, 2 for bad arguments or a missing or
broken model.

Backends: `torch` reads models/ (model.pt + model.json, the finetune stage's out); `onnx` reads export/
(model.onnx + model.json, the export stage's out) and needs only onnxruntime, numpy and Pillow: this module
and what it imports at the top never import torch, which the torch backend and --explain import inside the
functions that use them (tests/test_predict.py runs the onnx backend with torch made unimportable).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from cnnlens.cli import run_main
from cnnlens.decode import (
    IMG_EXTENSIONS,
    BadImage,
    center_square,
    decode_rgb,
    resize_short_side,
    to_chw_uint8,
)
from cnnlens.devices import DEVICES
from cnnlens.errors import StageError
from cnnlens.files import atomic_outputs, unique_stems

BACKENDS = ("torch", "onnx")
DEFAULT_MODEL = {"torch": "models", "onnx": "export"}  # the finetune and export stages' outs
ONNX_FILE = "model.onnx"  # in the export stage's out, beside model.json
# Images larger than this are decompression bombs, and images longer than MAX_ASPECT times their short side
# are refused: prepare.max_pixels' and prepare.max_aspect's defaults (tests/test_predict.py checks them).
MAX_PIXELS = 89_478_485
MAX_ASPECT = 20.0
META_KEYS = ("classes", "input_size", "resize", "loss")


class UsageError(StageError):
    """Bad arguments, or a missing or broken model: exit code 2, one line."""

    exit_code = 2


# ---- which files


def has_magic(arg: str) -> bool:
    return any(c in arg for c in "*?[")


def folder_images(folder: Path) -> tuple[list[Path], int]:
    """(the image files under `folder`, recursively, sorted; how many other files were passed over).
    Hidden files and folders are passed over, as an image type is recognised by its extension."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    images = [p for p in files if p.suffix.lower() in IMG_EXTENSIONS]
    return images, len(files) - len(images)


def collect(args: list[str]) -> tuple[list[Path], list[tuple[str, str]], int]:
    """(the files to predict, in order and without repeats; (argument, why) for each argument that names
    nothing; files in folders passed over for their extension). A named file is always tried."""
    files: dict[Path, None] = {}
    problems, ignored = [], 0
    for arg in args:
        literal = Path(arg)
        matches = (
            [literal]
            if literal.exists() or not has_magic(arg)
            else sorted(map(Path, glob.glob(arg, recursive=True)))
        )
        if not matches or not (matches[0].exists() or matches[0].is_symlink()):
            problems.append(
                (arg, "no file matches this pattern" if has_magic(arg) else "no such file or folder")
            )
            continue
        for match in matches:
            if match.is_dir():
                images, passed = folder_images(match)
                files.update(dict.fromkeys(images))
                ignored += passed
            else:
                files[match] = None
    return list(files), problems, ignored


# ---- decoding: the evaluate stage's preprocessing up to the packed square


def load_square(path: Path, resize: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One file as the prepare stage packs it: uint8 3 x resize x resize, the centre square of the image
    decoded upright in RGB with its short side resized to `resize` (the crop and normalisation follow)."""
    img, (w, h) = decode_rgb(path, max_pixels, draft_size=resize)
    ratio = max(img.size) / min(img.size)
    if ratio > MAX_ASPECT:
        raise BadImage(f"aspect ratio {ratio:.0f}:1 ({w}x{h}) is over {MAX_ASPECT:g}:1")
    return to_chw_uint8(center_square(resize_short_side(img, resize)))


def decoded(paths: list[Path], resize: int, max_pixels: int, *, workers: int = 4, depth: int = 64):
    """(path, square or None, why) for each path in order, decoded on `workers` threads (Pillow releases
    the GIL), at most `depth` ahead of the reader: memory holds a few images, however many there are."""

    def work(path):
        try:
            return path, load_square(path, resize, max_pixels), ""
        except BadImage as exc:
            return path, None, str(exc)
        except OSError as exc:  # unreadable: permissions, a file that vanished, an I/O error
            return path, None, f"cannot read: {exc.strerror or exc}"

    pool = ThreadPoolExecutor(max(1, workers))
    pending: deque = deque()
    try:
        for path in paths:
            pending.append(pool.submit(work, path))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # Ctrl-C must not wait for every queued image
        pool.shutdown(cancel_futures=True)


def center_crop_np(squares: np.ndarray, size: int) -> np.ndarray:
    """The centre size x size crop of N x 3 x S x S, as cnnlens.tensors.center_crop takes it."""
    h, w = squares.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(squares[..., top : top + size, left : left + size])


def renormalised(proba) -> np.ndarray:
    """float64 rows that sum to 1, as the evaluate stage writes them."""
    proba = np.asarray(proba, dtype=np.float64)
    return proba / proba.sum(1, keepdims=True)


# ---- the model


def one_line(text: str, limit: int = 300) -> str:
    """A message on one line, its middle cut when long (torch's load errors run to paragraphs)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[: limit - 100]} ... {text[-95:]}"


def read_meta(folder: Path, needs: str) -> dict:
    """model.json of a model folder, with the keys predict needs; a problem is a UsageError naming it."""
    path = folder / "model.json"
    if not path.is_file():
        raise UsageError(f"{path}: not found; {needs}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read it ({exc}); {needs}") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UsageError(f"{path}: no {', '.join(missing)}; {needs}")
    return meta


class OnnxBackend:
    """export/model.onnx through onnxruntime: uint8 centre crops in, logits and probabilities out.
    `threads`: onnxruntime's intra-op threads (0: its default, one per core)."""

    name = "onnx"

    def __init__(self, folder: Path, device: str, *, threads: int = 0):
        needs = "run `dvc repro export` (or `dvc pull export`), or point --model at the export stage's folder"
        self.meta = read_meta(folder, needs)
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError(
                "--backend onnx needs onnxruntime: pip install -r requirements-serve.txt"
            ) from None
        available = ort.get_available_providers()
        if device in ("cuda", "mps") and (device == "mps" or "CUDAExecutionProvider" not in available):
            raise UsageError(
                f"--device {device}: onnxruntime here has no such provider ({', '.join(available)})"
            )
        wanted = ["CUDAExecutionProvider"] if device != "cpu" and "CUDAExecutionProvider" in available else []
        path = folder / ONNX_FILE
        if not path.is_file():
            raise UsageError(f"{path}: not found; {needs}")
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per core
            self.session = ort.InferenceSession(
                str(path), options, providers=[*wanted, "CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own types for a corrupt or foreign file
            why = (str(exc).strip().splitlines() or [""])[0][:160]
            raise UsageError(
                f"{path}: cannot load the ONNX model ({type(exc).__name__}: {why}); {needs}"
            ) from None
        provider = self.session.get_providers()[0]
        self.device = f"{'cuda' if provider.startswith('CUDA') else 'cpu'} ({provider})"

    def __call__(self, squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        crops = center_crop_np(squares, self.meta["input_size"])
        logits, proba = self.session.run(["logits", "probabilities"], {"image": crops})
        return logits, renormalised(proba)


class TorchBackend:
    """models/ (model.pt + model.json) in PyTorch, run as the evaluate stage runs it (model.predict_logits)."""

    name = "torch"

    def __init__(self, folder: Path, device: str):
        needs = "run `dvc repro finetune` (or `dvc pull finetune`), or point --model at the finetune stage's folder"
        self.meta = read_meta(folder, needs)
        try:
            from cnnlens.devices import select_device
            from cnnlens.model import load_checkpoint
        except ImportError as exc:
            raise UsageError(
                f"the torch backend needs {exc.name}: install requirements.txt, or use --backend onnx"
            ) from None
        self.device = select_device(device)
        try:
            model, _ = load_checkpoint(folder)
        except StageError as exc:
            raise UsageError(one_line(str(exc))) from None
        self.model = model.to(self.device).eval()

    def __call__(self, squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from cnnlens.model import predict_logits, probabilities

        logits = predict_logits(
            self.model, torch.from_numpy(squares), self.meta["input_size"], device=self.device
        )
        return logits.numpy(), renormalised(probabilities(logits, self.meta["loss"]).double().numpy())


def load_backend(name: str, folder: str | Path, device: str):
    if not Path(folder).is_dir():
        raise UsageError(
            f"{folder}: no such model folder; pass --model (the {DEFAULT_MODEL[name]}/ folder of a run)"
        )
    return (OnnxBackend if name == "onnx" else TorchBackend)(Path(folder), device)


# ---- where the predictions go


class Sink:
    """The predictions as they come: a table on stdout, bad files on stderr, the progress bar on stderr,
    and with `out` the rows into open CSV and JSON files (JSON written as it streams)."""

    def __init__(self, classes: list[str], paths: list[Path], files: tuple | None, *, header: dict):
        self.classes, self.files, self.bad_files, self.count = classes, files, [], 0
        try:
            from tqdm import tqdm
        except ImportError:  # a serving machine may lack it: no bar, the rest the same
            tqdm = None
        self.bar = tqdm(total=len(paths), desc="predict", unit="img", disable=None) if tqdm else None
        self.width = min(max([len(str(p)) for p in paths] + [4]), 60)
        self.say(f"{'path':<{self.width}}  {'predicted':<12}" + "".join(f"  {'p_' + c:>10}" for c in classes))
        if files:
            self.csv = csv.writer(files[0], lineterminator="\n")
            self.csv.writerow(["path", "predicted", *(f"p_{c}" for c in classes)])
            files[1].write(json.dumps(header)[:-1] + ', "predictions": [')

    def say(self, line: str, file=None) -> None:
        file = file or sys.stdout
        self.bar.write(line, file=file) if self.bar is not None else print(line, file=file, flush=True)

    def row(self, path: Path, proba: np.ndarray) -> None:
        values = [round(float(p), 6) for p in proba]
        predicted = self.classes[int(np.argmax(proba))]
        shown = str(path) if len(str(path)) <= self.width else "..." + str(path)[-(self.width - 3) :]
        self.say(f"{shown:<{self.width}}  {predicted:<12}" + "".join(f"  {v:10.4f}" for v in values))
        if self.files:
            self.csv.writerow([str(path), predicted, *values])
            item = {
                "path": str(path),
                "predicted": predicted,
                "probabilities": dict(zip(self.classes, values)),
            }
            self.files[1].write(("\n  " if not self.count else ",\n  ") + json.dumps(item))
        self.count += 1
        self.step()

    def bad(self, path: str, why: str) -> None:
        why = " ".join(str(why).split())  # one line, whatever the decoder said
        self.bad_files.append({"path": str(path), "reason": why})
        self.say(f"skipped {path}: {why}", sys.stderr)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.files:
            self.files[1].write(
                f'\n], "skipped": {json.dumps(self.bad_files)}, "n_predicted": {self.count}}}\n'
            )


# ---- the run


def predict_files(
    backend, paths: list[Path], sink: Sink, *, batch_size: int, max_pixels: int, explain=None
) -> int:
    """Predict every file in batches of `batch_size`; returns how many were predicted. `explain`, if
    given, is called with (squares, logits, proba, paths) for each batch."""
    batch: list = []

    def flush():
        squares = np.stack([square for _, square in batch])
        logits, proba = backend(squares)
        for (path, _), p in zip(batch, proba):
            sink.row(path, p)
        if explain is not None:
            explain(squares, logits, proba=proba, paths=[path for path, _ in batch])
        batch.clear()

    for path, square, why in decoded(paths, backend.meta["resize"], max_pixels, depth=2 * batch_size):
        if square is None:
            sink.bad(path, why)
            sink.step()
            continue
        batch.append((path, square))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return sink.count


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m cnnlens.predict",
        description="Predict (and explain) with the trained model on image files, folders or globs.",
    )
    ap.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or quoted globs"
    )
    ap.add_argument("--model", help="model folder (default: models for torch, export for onnx)")
    ap.add_argument("--backend", choices=BACKENDS, default="torch")
    ap.add_argument(
        "--explain",
        default="",
        metavar="METHODS",
        help="comma-separated saliency methods, e.g. gradient,gradcam",
    )
    ap.add_argument("--out", type=Path, help="write predictions.csv, predictions.json (and explain/) here")
    ap.add_argument("--device", choices=DEVICES, default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS, help="larger images are decompression bombs"
    )
    ap.add_argument("--seed", type=int, default=0, help="SmoothGrad's noise (--explain smoothgrad)")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.max_pixels < 1:
        ap.error("--batch-size and --max-pixels must be at least 1")
    args.methods = [m for m in args.explain.split(",") if m.strip()]
    args.methods = list(dict.fromkeys(m.strip() for m in args.methods))
    if args.methods and args.backend == "onnx":
        raise UsageError(
            "--explain needs --backend torch: saliency maps are gradients, and the ONNX model has none"
        )
    if args.methods and args.out is None:
        raise UsageError("--explain writes figures: give --out DIR")
    return args


def check_methods(methods: list[str]) -> None:
    from cnnlens.attribution import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--explain: unknown method {unknown[0]!r}; allowed: {', '.join(METHODS)}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.methods:
        check_methods(args.methods)
    backend = load_backend(args.backend, args.model or DEFAULT_MODEL[args.backend], args.device)
    paths, problems, ignored = collect(args.paths)
    meta = backend.meta
    header = {
        "model": str(args.model or DEFAULT_MODEL[args.backend]),
        "backend": backend.name,
        "classes": meta["classes"],
    }
    with ExitStack() as stack:
        files = None
        if args.out is not None:
            csv_tmp, json_tmp = stack.enter_context(
                atomic_outputs(args.out / "predictions.csv", args.out / "predictions.json")
            )
            files = tuple(stack.enter_context(open(p, "w", newline="")) for p in (csv_tmp, json_tmp))
        sink = Sink(meta["classes"], paths, files, header=header)
        for arg, why in problems:
            sink.bad(arg, why)
        explain = None
        if args.methods:
            from cnnlens.predict_explain import figure_writer

            names = dict(zip(paths, unique_stems([str(p) for p in paths])))
            explain = figure_writer(backend, args.methods, args.out / "explain", names=names, seed=args.seed)
        done = predict_files(
            backend, paths, sink, batch_size=args.batch_size, max_pixels=args.max_pixels, explain=explain
        )
        sink.close()
    log_counts(done, sink.bad_files, ignored=ignored, backend=backend, out=args.out)
    if not done:
        why = "every file was skipped" if sink.bad_files else "no image file among the paths given"
        raise StageError(f"no image was predicted: {why}")


def log_counts(done: int, bad: list, *, ignored: int, backend, out) -> None:
    """The closing line on stderr: how many predicted, skipped and passed over, and where they went."""
    parts = [f"predict: {done} image(s) predicted with the {backend.name} backend on {backend.device}"]
    if bad:
        parts.append(f"{len(bad)} skipped (listed above)")
    if ignored:
        parts.append(f"{ignored} file(s) in folders passed over (not an image type)")
    print(", ".join(parts) + (f" -> {out}" if out is not None and done else ""), file=sys.stderr)


def cli() -> None:
    """The console script `cnnlens-predict` (pyproject.toml)."""
    run_main(main)


if __name__ == "__main__":
    cli()
