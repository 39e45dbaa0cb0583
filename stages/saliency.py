"""saliency: which pixels the fine-tuned model's prediction depends on, and how far to trust the maps.

python -m stages.saliency --data data/prepared --model models --weights data/weights \
    --metrics metrics/saliency.json --out plots/saliency [--params params.yaml]

Per method in saliency.methods: <out>/figures/<method>/<image-stem>.png (input, |map| per channel,
combined, overlay), <out>/figures/<method>.png (all images in rows), <out>/arrays/<method>.npz (raw
maps, inputs, target, paths). Quality on saliency.quality_images val images, next to a random and
a centre-prior map: deletion/insertion AUC, pointing game and mass inside the object mask (when
the data has masks), 95% bootstrap intervals -> the metrics JSON and <out>/quality.csv. The
model-randomisation check -> <out>/randomization.csv and figures/randomization.png; the untuned vs
the fine-tuned network on the same images -> figures/before_after.png. The target is always the
model's prediction.
"""

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cnnlens.attribution import METHODS, display_maps, explain, gradcam_grid, ig_completeness
from cnnlens.cli import log, run_main
from cnnlens.config import stage_args
from cnnlens.devices import device_name, select_device
from cnnlens.errors import ParamsError
from cnnlens.figures import (
    chw_to_hwc,
    randomization_figure,
    saliency_figure,
    saliency_rows_figure,
    save_figure,
    scale_label,
)
from cnnlens.files import atomic_outputs, unique_stems, write_json
from cnnlens.model import initial_model, load_checkpoint, predictions, to_device
from cnnlens.quality import (
    baseline_maps,
    bootstrap_ci,
    default_layer_order,
    deletion_insertion_passes,
    quality_scores,
    randomization_check,
)
from cnnlens.tensors import center_crop, denormalize, eval_inputs, load_split, select_images, spread_index

RANDOMIZATION_IMAGES = 8
# Quality images on the device at once: saliency.quality_images: 0 (all of val) scores a large val split
# chunk by chunk in bounded memory. A val split of at most this many is one chunk, scored as before.
QUALITY_CHUNK = 256
# The randomisation check reruns a method (layers + 2) = 8 times on 8 images; on a CPU it runs only
# for methods of at most this many passes per image (gradient, Grad-CAM): SmoothGrad and IG would
# take most of the demo's minute. On a GPU it runs for every method.
RANDOMIZATION_MAX_PASSES_CPU = 1


def before_after_figure(model, x, pred, prob, maps_of, images, titles, meta, weights_dir, p):
    """The same images explained by the untuned network (where finetune starts) and by the
    fine-tuned one, each for its own predicted class: gradient, plus the other one-pass methods."""
    sp, classes = p.saliency, meta["classes"]
    torch.manual_seed(p.seed)  # the new head's init, as in finetune
    untuned, info = initial_model(meta["arch"], len(classes), weights_dir)
    untuned = to_device(untuned, x.device)
    upred, uprob = predictions(untuned, x, meta["loss"], batch_size=sp.batch_size)
    columns = []
    for name in ["gradient"] + [n for n in sp.methods if n != "gradient" and METHODS[n].passes(sp) == 1]:
        for who, net, g, pr in (("untuned", untuned, upred, uprob), ("fine-tuned", model, pred, prob)):
            maps = (
                maps_of[name]
                if who == "fine-tuned" and name in maps_of
                else explain(name, net, x, g, sp, p.seed)
            )
            columns.append(
                (
                    f"{who}: {METHODS[name].label}",
                    display_maps(maps, sp.normalize, sp.percentile)[1].numpy(),
                    False,
                    [f"predicts {classes[int(c)]} (p={q:.2f})" for c, q in zip(g, pr.tolist())],
                )
            )
    source = info.get("source")
    origin = (
        "random init, model.weights: none" if source == "none" else f"{source} weights + a new random head"
    )
    return saliency_rows_figure(
        images,
        columns,
        titles,
        f"Before vs after fine-tuning: the untuned {meta['arch']} "
        f"({origin}) vs the fine-tuned model,\neach explaining its own predicted class",
        scale_label(sp.normalize, sp.percentile),
    )


def write_method(out: Path, name: str, maps, shown, note: str, sp) -> None:
    """<out>/arrays/<name>.npz (raw maps), figures/<name>/<stem>.png per image and figures/<name>.png.

    Figures and arrays live apart so figures/ holds only images: dvc.yaml declares it as one image plot."""
    m, label = METHODS[name], METHODS[name].label
    (out / "figures" / name).mkdir(parents=True)
    (out / "arrays").mkdir(exist_ok=True)
    np.savez(
        out / "arrays" / f"{name}.npz",
        maps=maps.numpy().astype(np.float32),
        target=shown.pred.numpy(),
        inputs=shown.x.cpu().numpy().astype(np.float32),
        paths=np.array(shown.paths),
    )
    channels, combined = display_maps(maps, sp.normalize, sp.percentile)
    scale = scale_label(sp.normalize, sp.percentile)
    for i, stem in enumerate(unique_stems(shown.paths)):
        save_figure(
            saliency_figure(
                shown.images[i],
                channels[i].numpy(),
                combined[i].numpy(),
                f"{label} ({m.describe(sp)})\n{shown.titles[i]}",
                label,
                scale,
                map_note=note,
            ),
            out / "figures" / name / f"{stem}.png",
        )
    columns = [
        (f"{label} map\n({note})", combined.numpy(), False, None),
        ("overlay (colour = salient)", combined.numpy(), True, None),
    ]
    save_figure(
        saliency_rows_figure(
            shown.images,
            columns,
            shown.titles,
            f"{label} saliency for each image's predicted class\n({m.describe(sp)})",
            scale,
        ),
        out / "figures" / f"{name}.png",
    )


def randomization_title(n: int, skipped: list[str]) -> str:
    title = (
        f"Model-randomisation check on {n} val images: layers re-initialised one after another;\n"
        "a map that explains the model should fall towards 0"
    )
    names = ", ".join(METHODS[k].label for k in skipped)
    return title + (f" (not run on this CPU, too costly: {names})" if skipped else "")


def summary(metrics: dict) -> str:
    nan = {"mean": float("nan")}
    lines = [
        f"  {'method':22} {'deletion AUC':>13} {'insertion AUC':>14} {'pointing':>9} {'rand. rho':>10}",
        f"  {'':22} {'(low = good)':>13} {'(high = good)':>14} {'(hits)':>9} {'(low = good)':>10}",
    ]
    for name, m in metrics.items():
        rho = m.get("randomization_rho")
        lines.append(
            f"  {name:22} {m['deletion_auc']['mean']:13.3f} {m['insertion_auc']['mean']:14.3f} "
            f"{m.get('pointing_game', nan)['mean']:9.2f} {'-' if rho is None else f'{rho:.2f}':>10}"
        )
    return "\n".join(lines)


class Batch:
    """Val images on the device with the model's predictions: `shown` in figures, `scored` for quality."""

    def __init__(self, model, split, meta, device, sp):
        crop, batch_size = meta["input_size"], sp.batch_size
        self.paths, self.labels = split.paths, split.labels
        self.x = eval_inputs(split.images, crop).to(device)
        self.pred, self.prob = predictions(model, self.x, meta["loss"], batch_size=batch_size)
        self.masks = None if split.masks is None else center_crop(split.masks, crop)
        classes = meta["classes"]
        self.images = [chw_to_hwc(im) for im in denormalize(self.x.cpu())]
        self.titles = [
            f"{path}\ntrue {classes[int(t)]}, predicted {classes[int(g)]} (p={pr:.2f})"
            for path, t, g, pr in zip(self.paths, self.labels, self.pred, self.prob.tolist())
        ]


class Scored:
    """The quality images as Batches of at most QUALITY_CHUNK: the first is kept (it is all of a small
    split, and the randomisation check's images), the others are rebuilt on each pass."""

    def __init__(self, model, val, index, meta, device, sp):
        self.args, self.index, self.n = (model, val, meta, device, sp), index, len(index)
        self.first = self._batch(0)
        self.masks = self.first.masks

    def _batch(self, start):
        model, val, meta, device, sp = self.args
        return Batch(model, val.subset(self.index[start : start + QUALITY_CHUNK]), meta, device, sp)

    def __iter__(self):
        yield self.first
        for start in range(QUALITY_CHUNK, self.n, QUALITY_CHUNK):
            yield self._batch(start)


def score_method(name, model, shown, scored, p, device, layers) -> tuple[dict, torch.Tensor, list | None]:
    """One method: its maps of the shown images, its quality scores on the scored ones, its cost and,
    where affordable, its randomisation curve. Returns (metrics, shown maps, curve or None)."""
    sp, m = p.saliency, METHODS[name]
    start = time.perf_counter()
    maps = explain(name, model, shown.x, shown.pred, sp, p.seed)
    raw, rel = {}, []
    for chunk in scored:
        maps_q = explain(name, model, chunk.x, chunk.pred, sp, p.seed)
        for k, v in raw_quality(model, chunk, maps_q, p).items():
            raw.setdefault(k, []).append(v)
        if name == "integrated_gradients":
            rel.append(ig_completeness(model, chunk.x, chunk.pred, maps_q, sp.batch_size))
    seconds = (time.perf_counter() - start) / (len(shown.x) + scored.n)
    n = m.passes(sp)
    metrics = {
        **{k: bootstrap_ci(torch.cat(v), sp.bootstrap, p.seed) for k, v in raw.items()},
        "randomization_rho": None,
        "seconds_per_image": seconds,
        "passes": {"forward": n, "backward": n, "what": m.cost},
        "metric_passes": {
            "deletion_insertion": {"forward": deletion_insertion_passes(sp.quality_steps), "backward": 0}
        },
    }
    if name == "integrated_gradients":
        metrics["ig_completeness_error"] = bootstrap_ci(torch.cat(rel), sp.bootstrap, p.seed)
        metrics["metric_passes"]["ig_completeness"] = {"forward": 2, "backward": 0}
    if not sp.randomization or (device.type == "cpu" and n > RANDOMIZATION_MAX_PASSES_CPU):
        return metrics, maps, None
    nr = min(scored.n, RANDOMIZATION_IMAGES)
    curve = randomization_check(
        model,
        scored.first.x[:nr],
        scored.first.pred[:nr].to(device),
        layer_order=layers,
        seed=p.seed,
        method_fn=lambda net, xx, t: explain(name, net, xx, t, sp, p.seed),
    )
    metrics["randomization_rho"] = curve[-1][1]  # all layers re-initialised
    runs = len(layers) + 2  # per image checked: the model, its copy and each layer group
    metrics["metric_passes"]["randomization"] = {"forward": n * runs, "backward": n * runs}
    return metrics, maps, curve


def raw_quality(model, chunk, maps, p) -> dict:
    """Per-image quality scores of maps of one chunk of the scored images."""
    sp = p.saliency
    return quality_scores(
        model, chunk.x, chunk.pred, maps, chunk.masks, sp.quality_steps, p.seed, sp.batch_size
    )


def baseline_quality(model, scored, kind, crop, p) -> dict:
    """A baseline's quality scores over every chunk, each as a mean with its 95% bootstrap interval."""
    raw = {}
    for chunk in scored:
        maps = baseline_maps(kind, len(chunk.x), crop, crop, p.seed)
        for k, v in raw_quality(model, chunk, maps, p).items():
            raw.setdefault(k, []).append(v)
    return {k: bootstrap_ci(torch.cat(v), p.saliency.bootstrap, p.seed) for k, v in raw.items()}


def write_randomization(out: Path, curves: dict, n: int, skipped: list[str]) -> None:
    """randomization.csv, one column per method so DVC draws one line per method, and its figure."""
    first = next(iter(curves.values()))
    table = pd.DataFrame({"step": range(len(first)), "layer": [layer for layer, _ in first]})
    for name, c in curves.items():
        table[name] = [rho for _, rho in c]
    table.to_csv(out / "randomization.csv", index=False)
    shown = {METHODS[k].label: c for k, c in curves.items()}
    save_figure(
        randomization_figure(shown, randomization_title(n, skipped)), out / "figures" / "randomization.png"
    )


def write_quality_table(out: Path, metrics: dict) -> None:
    rows = [
        (k, metric, v["mean"], v["low"], v["high"])
        for k, m in metrics.items()
        for metric, v in m.items()
        if isinstance(v, dict) and "low" in v
    ]
    pd.DataFrame(rows, columns=["method", "metric", "mean", "low", "high"]).to_csv(
        out / "quality.csv", index=False
    )


def explain_all(out: Path, model, shown, scored, p, device, meta, weights_dir) -> tuple[dict, dict, list]:
    """Every method of saliency.methods, the baselines and the before/after figure, into `out`."""
    sp, crop = p.saliency, meta["input_size"]
    layers = default_layer_order(model)
    metrics, curves, skipped, maps_of = {}, {}, [], {}
    for name in tqdm(sp.methods, desc="saliency methods", unit="method", disable=None):
        metrics[name], maps_of[name], curve = score_method(name, model, shown, scored, p, device, layers)
        # what one map pixel is: Grad-CAM's map is the hooked layer's coarse grid, upsampled
        note = (
            "a {} x {} grid, upsampled".format(*gradcam_grid(model, shown.x))
            if name == "gradcam"
            else "max over R, G, B"
        )
        write_method(out, name, maps_of[name], shown, note, sp)
        if curve is not None:
            curves[name] = curve
        elif sp.randomization:
            skipped.append(name)
    di = {"deletion_insertion": {"forward": deletion_insertion_passes(sp.quality_steps), "backward": 0}}
    for kind in ("random", "center"):
        metrics[kind] = {
            **baseline_quality(model, scored, kind, crop, p),
            "passes": {"forward": 0, "backward": 0},
            "metric_passes": di,
        }
    if sp.before_after:
        save_figure(
            before_after_figure(
                model,
                shown.x,
                shown.pred,
                shown.prob,
                maps_of,
                shown.images,
                shown.titles,
                meta,
                weights_dir,
                p,
            ),
            out / "figures" / "before_after.png",
        )
    if curves:
        write_randomization(out, curves, min(scored.n, RANDOMIZATION_IMAGES), skipped)
    write_quality_table(out, metrics)
    return metrics, curves, skipped


def main(argv=None):
    args, p = stage_args(
        __doc__, ("--data", "--model", "--weights", "--metrics", "--out"), argv, outs=("--out", "--metrics")
    )
    sp = p.saliency
    if not sp.methods:
        raise ParamsError(
            f"{args.params}: saliency.methods is empty; list at least one of: {', '.join(METHODS)}"
        )
    began = time.perf_counter()
    device = select_device(sp.device)
    model, meta = load_checkpoint(args.model)
    model = to_device(model, device)
    val = load_split(args.data, "val")
    shown = Batch(model, select_images(val, list(dict.fromkeys(sp.images)), sp.num_images), meta, device, sp)
    # scored for quality: a fixed choice, like `shown`
    scored = Scored(model, val, spread_index(len(val), sp.quality_images or len(val)), meta, device, sp)
    with atomic_outputs(args.out, args.metrics) as (out, metrics_file):  # together, the metrics last
        out.mkdir()
        metrics, curves, skipped = explain_all(out, model, shown, scored, p, device, meta, args.weights)
        dev, nr = device_name(device), min(scored.n, RANDOMIZATION_IMAGES)
        extra = {
            "n_images": len(shown.x),
            "n_quality_images": scored.n,
            "masks": scored.masks is not None,
            "randomization_images": nr if curves else 0,
            "randomization_skipped": skipped,
            "device": dev,
            "seconds": round(time.perf_counter() - began, 2),
        }
        write_json(metrics_file, {**metrics, **extra})
    note = (
        (
            f"; randomisation check skipped for {', '.join(skipped)} (over {RANDOMIZATION_MAX_PASSES_CPU} pass "
            "per image on a CPU)"
        )
        if skipped
        else ""
    )
    masks = " with masks" if scored.masks is not None else ""
    log(
        f"saliency: {len(shown.x)} images explained, quality on {scored.n} val images{masks}, {dev}, "
        f"{time.perf_counter() - began:.1f} s{note}\n{summary(metrics)}"
    )


if __name__ == "__main__":
    run_main(main)
