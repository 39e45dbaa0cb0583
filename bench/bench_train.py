"""Training speed, side by side in one process: the tutorial's loop vs. our finetune code.

    python bench/bench_train.py [--raw ../shared/data/hymenoptera_data] [--epochs 3] [--device auto]
    python bench/bench_train.py --device cuda --epochs 25 --seeds 3 --ours 4,4:off,32   # the GPU check

(a) a faithful re-implementation of the PyTorch transfer-learning tutorial's loop: ImageFolder on
    the prepared JPEGs, PIL transforms every epoch, batch 4, num_workers=4, fp32, SGD + StepLR;
(b) cnnlens/training.py's train() with its defaults for the device (CPU: the tutorial's batch 4 in
    fp32; CUDA: batch 32 with the learning rate scaled linearly, bf16 autocast, channels_last).
Both use the same prepared data, device, seed and epochs, for both scenarios (finetune and
feature_extractor with cached features, 25 epochs by default; --fe-uncached adds our
augmented feature_extractor run). Prints per-epoch
seconds (median of the epochs after the first), the ratio (a)/(b), val accuracy of both, peak RSS
and, on CUDA, peak allocated memory. Needs torch, torchvision, pillow, pyyaml, tqdm; no DVC.
Results are from random init unless --weights points at ImageNet weights.

--ours picks our variants by batch size (default: the device's default above): `4` is the
tutorial's batch and lr, `32` scales the lr linearly (0.001 * 32 / 4 = 0.008), a `:off` suffix turns
train.cuda_graphs off. --seeds N repeats every run with seeds seed..seed+N-1: seconds per epoch are
the median over all seeds' epochs after the first, accuracies the median of the seeds' best val
accuracy. --out is rewritten after every run, so a run cut short keeps what it measured.
"""

import argparse
import copy
import dataclasses
import functools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnnlens.config import TrainParams  # noqa: E402
from cnnlens.devices import select_device
from cnnlens.model import build_model, load_backbone  # noqa: E402
from cnnlens.tensors import load_split  # noqa: E402
from cnnlens.training import configure_torch, train  # noqa: E402
from stages.finetune import loop_options  # noqa: E402


def tutorial_loop(
    data_dir: Path, mode: str, epochs: int, device, seed: int, weights, crop: int = 224
) -> dict:
    """The tutorial's train_model(), kept as it is apart from timing, the seed (and --crop, for dry runs)."""
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    tfs = {
        "train": transforms.Compose(
            [
                transforms.RandomResizedCrop(crop),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        ),
        "val": transforms.Compose(
            [
                transforms.Resize(crop * 256 // 224),
                transforms.CenterCrop(crop),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        ),
    }
    sets = {x: datasets.ImageFolder(data_dir / x, tfs[x]) for x in ("train", "val")}
    loaders = {
        x: torch.utils.data.DataLoader(sets[x], batch_size=4, shuffle=True, num_workers=4)
        for x in ("train", "val")
    }
    model = build_model("resnet18", 2)
    if weights is not None:
        load_backbone(model, weights, "weights")
    if mode == "feature_extractor":
        for p in model.parameters():
            p.requires_grad = False
        model.fc = nn.Linear(model.fc.in_features, 2)
    model = model.to(device)
    params = model.fc.parameters() if mode == "feature_extractor" else model.parameters()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best_acc, seconds = 0.0, []
    best = copy.deepcopy(model.state_dict())
    for _ in range(epochs):
        start = time.perf_counter()
        for phase in ("train", "val"):
            model.train() if phase == "train" else model.eval()
            correct = 0
            for inputs, labels in loaders[phase]:
                inputs, labels = inputs.to(device), labels.to(device)
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                correct += int((outputs.argmax(1) == labels).sum())
            if phase == "train":
                scheduler.step()
            acc = correct / len(sets[phase])
            if phase == "val" and acc > best_acc:
                best_acc, best = acc, copy.deepcopy(model.state_dict())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    model.load_state_dict(best)  # as the tutorial does: return the best-val-accuracy weights
    return {"epoch_seconds": seconds, "best_val_acc": best_acc}


def ours(prepared: Path, mode: str, epochs: int, device, seed: int, weights, batch=None, **overrides) -> dict:
    tp = TrainParams(mode=mode, epochs=epochs, device=device.type, **overrides)
    if batch is None:  # our defaults: CUDA a batch that fills the GPU, lr scaled linearly; CPU the tutorial's
        batch = 32 if device.type == "cuda" else tp.batch_size
    tp = dataclasses.replace(tp, batch_size=batch, lr=tp.lr * batch / 4)
    configure_torch(device, seed, threads=tp.threads, deterministic=tp.deterministic)
    model = build_model("resnet18", 2)
    if weights is not None:
        load_backbone(model, weights, "weights")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    splits = load_split(prepared, "train"), load_split(prepared, "val")
    history = train(model, *splits, options=loop_options(tp), device=device, seed=seed)
    total = time.perf_counter() - start
    return {
        "epoch_seconds": [e["seconds"] for e in history.epochs],
        "best_val_acc": history.best_val_acc,
        "total_seconds": total,
        "batch_size": tp.batch_size,
        "lr": tp.lr,
        "amp": tp.amp and device.type == "cuda",
        "cuda_graphs": history.cuda_graphs,
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def seeded(fn, seeds) -> dict:
    """fn(seed) for every seed; epoch seconds pooled (first epoch of each seed left out), accuracy medians."""
    runs = [fn(seed) for seed in seeds]
    later = [s for r in runs for s in (r["epoch_seconds"][1:] or r["epoch_seconds"])]
    return {
        **{k: v for k, v in runs[0].items() if k not in ("epoch_seconds", "best_val_acc", "total_seconds")},
        "seeds": list(seeds),
        "epoch_seconds": [r["epoch_seconds"] for r in runs],
        "best_val_acc": [r["best_val_acc"] for r in runs],
        "best_val_acc_median": statistics.median(r["best_val_acc"] for r in runs),
        "epoch_s": statistics.median(later),
        "total_seconds": [r.get("total_seconds", sum(r["epoch_seconds"])) for r in runs],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, default=ROOT.parent / "shared" / "data" / "hymenoptera_data")
    ap.add_argument("--prepared", type=Path, default=ROOT / "bench" / ".cache" / "prepared")
    ap.add_argument("--epochs", type=int, default=3, help="epochs for the finetune-mode comparison")
    ap.add_argument("--fe-epochs", type=int, default=25, help="epochs for the feature-extractor comparison")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=Path, help="ImageNet state_dict (default: random init)")
    ap.add_argument("--only", choices=("finetune", "feature_extractor"), help="run one scenario")
    ap.add_argument(
        "--fe-uncached", action="store_true", help="also time our feature_extractor with augmentation"
    )
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--seeds", type=int, default=1, help="repeat every run with this many seeds")
    ap.add_argument(
        "--ours", default="", help="our variants, e.g. 4,4:off,32 (batch[:cuda_graphs]); default: device's"
    )
    ap.add_argument("--crop", type=int, default=224, help="network input size (smaller for dry runs)")
    args = ap.parse_args()
    device = select_device(args.device)
    if not (args.prepared / "shards" / "index.json").exists():
        print(f"preparing {args.raw} -> {args.prepared}", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "stages.prepare",
                "--raw",
                str(args.raw),
                "--out",
                str(args.prepared),
                "--report",
                str(args.prepared.parent / "data.json"),
            ],
            cwd=ROOT,
            check=True,
        )
    weights = torch.load(args.weights, map_location="cpu", weights_only=True) if args.weights else None
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    results = {
        "device": name,
        "torch": torch.__version__,
        "weights": str(args.weights or "random init"),
        "runs": {},
    }
    plan = [
        ("finetune", args.epochs, {}),
        ("feature_extractor", args.fe_epochs, {"augment": False, "cache_features": True}),
    ]
    if args.fe_uncached:
        plan.append(("feature_extractor", args.fe_epochs, {}))
    seeds = range(args.seed, args.seed + args.seeds)
    n_val = len(load_split(args.prepared, "val"))
    variants = [v.strip() for v in args.ours.split(",") if v.strip()] if args.ours else [None]
    for mode, epochs, extra in plan:
        if args.only and mode != args.only:
            continue
        label = mode + ("+cache_features" if extra else "")
        print(f"== {label}: {epochs} epochs on {name}, seeds {list(seeds)}", file=sys.stderr, flush=True)
        tut = functools.partial(
            tutorial_loop, args.prepared, mode, epochs, device, weights=weights, crop=args.crop
        )
        a = seeded(lambda s: tut(seed=s), seeds)  # noqa: B023 (called at once)
        row = results["runs"][label] = {
            "epochs": epochs,
            "n_val": n_val,
            "tutorial": a,
            "tutorial_epoch_s": a["epoch_s"],
        }
        row["variants"] = {}
        for v in variants:
            batch, _, graphs = (v or "").partition(":")
            over = {**extra, "crop": args.crop, "cuda_graphs": graphs or "auto"}
            run = functools.partial(ours, args.prepared, mode, epochs, device, weights=weights, **over)
            b = seeded(lambda s: run(seed=s, batch=int(batch) if batch else None), seeds)  # noqa: B023
            key = f"b{b['batch_size']}" + (f"-graphs-{graphs}" if graphs else "")
            b["epoch_ratio"] = a["epoch_s"] / b["epoch_s"]
            b["acc_diff_images"] = round((b["best_val_acc_median"] - a["best_val_acc_median"]) * n_val)
            row["variants"][key] = b
            print(
                f"{label:>30} {key}: tutorial {a['epoch_s']:.3f} s/epoch (acc {a['best_val_acc_median']:.4f}), "
                f"ours {b['epoch_s']:.4f} s/epoch (acc {b['best_val_acc_median']:.4f}, graphs {b['cuda_graphs']}); "
                f"per-epoch ratio {b['epoch_ratio']:.1f}x",
                file=sys.stderr,
                flush=True,
            )
            if args.out:  # after every run: a run cut short keeps what it measured
                args.out.write_text(json.dumps(results, indent=2) + "\n")
        first = next(iter(row["variants"].values()))
        row.update(ours=first, ours_epoch_s=first["epoch_s"], epoch_ratio=first["epoch_ratio"])
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        results["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
