"""Seconds per image of each saliency method's maps, on a finished project (the demo): one process, side by side.

    python bench/bench_methods.py --project demo [--images 20] [--repeats 3]

Loads <project>/models and the first --images val images of <project>/data/prepared, takes the saliency
settings of <project>/params.yaml, and times attribution.explain for every method of the registry
(the maps alone, not the scoring), --repeats times each, in turn; prints the median seconds per image.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cnnlens.attribution import METHODS, explain, resolve_cam_layer  # noqa: E402
from cnnlens.config import load_params  # noqa: E402
from cnnlens.model import load_checkpoint, predictions  # noqa: E402
from cnnlens.tensors import eval_inputs, load_split  # noqa: E402

KEYS = (
    "smoothgrad_sigma",
    "smoothgrad_samples",
    "ig_steps",
    "occlusion_window",
    "occlusion_stride",
    "gradshap_samples",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=ROOT / "demo")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sp = load_params(args.project / "params.yaml").saliency
    model, meta = load_checkpoint(args.project / "models")
    x = eval_inputs(
        load_split(args.project / "data/prepared", "val").images[: args.images], meta["input_size"]
    )
    target, _ = predictions(model, x, meta["loss"], batch_size=sp.batch_size)
    layer = resolve_cam_layer(model, sp.gradcam_layer, size=meta["input_size"])
    settings = {**{k: getattr(sp, k) for k in KEYS}, "gradcam_layer": layer.name}
    print(
        f"{len(x)} images at {meta['input_size']} px, {torch.get_num_threads()} threads, CAM layer {layer.name}"
    )
    for name in METHODS:
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            explain(name, model, x, target=target, seed=0, batch_size=sp.batch_size, **settings)
            runs.append((time.perf_counter() - start) / len(x))
        print(
            f"{name:>22}: {statistics.median(runs):.4f} s / image (runs: {', '.join(f'{r:.4f}' for r in runs)})"
        )


if __name__ == "__main__":
    main()
