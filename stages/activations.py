"""activations: what each ResNet stage computes, as feature-map grids and per-layer statistics.

python -m stages.activations --data data/prepared --model models --metrics metrics/activations.json
    --out plots/activations [--params params.yaml]

Writes plots/activations/grids/<image-stem>/<layer>.png (the input, then the top activations.max_maps
maps of that layer by mean activation), plots/activations/layers/<layer>.png (one compact figure per
layer: a row per image, its top COMPACT_MAPS maps; the plots page shows these and links the grids),
plots/activations/sparsity.csv and sparsity.png (fraction
of exact zeros and mean activation per layer over the whole val split) and the same numbers, with
std, channels, height, width and dead channels, to the metrics JSON.
"""

from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from cnnlens.cli import log, run_main
from cnnlens.config import stage_args
from cnnlens.devices import select_device
from cnnlens.errors import StageError
from cnnlens.figures import (
    chw_to_hwc,
    feature_maps_figure,
    layer_stats_figure,
    layer_summary_figure,
    save_figure,
)
from cnnlens.files import atomic_outputs, unique_stems, write_json
from cnnlens.hooks import capture, layer_statistics, resolve_layers, top_maps
from cnnlens.model import load_checkpoint, probabilities
from cnnlens.tensors import denormalize, eval_inputs, load_split, normalize_maps, select_images

COMPACT_MAPS = (
    8  # maps per image in the per-layer figure: enough to see the kind of feature, small on the page
)


def grid_figure(act, max_maps: int, image, layer: str, title: str, image_label: str):
    """One image's maps of one layer (C x H x W): the top max_maps by mean activation, each min-max scaled."""
    c, h, w = act.shape
    idx, means = top_maps(act, max_maps)
    labels = [f"#{r + 1}: channel {int(ch)}\nmean {m:.3g}" for r, (ch, m) in enumerate(zip(idx, means))]
    return feature_maps_figure(
        image,
        normalize_maps(act[idx]).numpy(),
        labels,
        image_label=image_label,
        suptitle=f"{title}\nlayer {layer}: {c} feature maps of {h} x {w} pixels - top {len(idx)} of {c} maps by "
        "mean activation,\neach scaled to its own min-max (dark = lowest, bright = highest value in that "
        "map; not comparable across maps)",
    )


def compact_row(act, image, label: str, rows: dict, layer: str) -> None:
    """Keep one image's top COMPACT_MAPS maps of one layer for that layer's compact figure."""
    idx, means = top_maps(act, COMPACT_MAPS)
    labels = [f"ch {int(ch)}, mean {m:.2g}" for ch, m in zip(idx, means)]
    rows.setdefault(layer, []).append((image, normalize_maps(act[idx]).numpy(), label, labels))


def write_compact(out: Path, rows: dict, meta: dict) -> None:
    """layers/<layer>.png: every chosen image's top maps of that layer in one small figure."""
    (out / "layers").mkdir()
    for layer, kept in rows.items():
        images, maps, labels, map_labels = (list(col) for col in zip(*kept))
        c, h, w = kept[0][1].shape[0], *kept[0][1].shape[1:]
        title = (
            f"{meta['arch']} {layer}: top {c} maps by mean activation per image ({h} x {w} pixels each, "
            "own min-max scale)"
        )
        save_figure(
            layer_summary_figure(images, maps, labels, map_labels, suptitle=title),
            out / "layers" / f"{layer}.png",
        )


def write_grids(out: Path, model, modules: dict, chosen, meta: dict, p, device) -> dict:
    """grids/<image>/<layer>.png for the chosen images, a batch at a time, every hook on. Returns
    the rows of the compact per-layer figures."""
    classes, crop = meta["classes"], meta["input_size"]
    folders = unique_stems(chosen.paths)
    compact = {}
    bar = tqdm(
        total=len(chosen) * len(modules), desc="activation grids", unit="grid", leave=False, disable=None
    )
    for start in range(0, len(chosen), p.batch_size):
        x = eval_inputs(chosen.images[start : start + p.batch_size].to(device), crop)
        with capture(modules) as acts, torch.no_grad():
            proba = probabilities(model(x).float().cpu(), meta["loss"])
        shown = denormalize(x).cpu()
        for j, i in enumerate(range(start, start + len(x))):
            (out / "grids" / folders[i]).mkdir(parents=True)  # only images: one DVC image plot
            truth, guess = classes[int(chosen.labels[i])], classes[int(proba[j].argmax())]
            for layer, act in acts.items():
                fig = grid_figure(
                    act[j].cpu(),
                    p.max_maps,
                    chw_to_hwc(shown[j]),
                    layer,
                    title=f"{chosen.paths[i].split('/')[-1]}  (true: {truth}, predicted: {guess})",
                    image_label=f"input {crop}x{crop} (centre crop)\n"
                    f"predicted {guess}, p={proba[j].max():.2f}",
                )
                save_figure(fig, out / "grids" / folders[i] / f"{layer}.png")
                compact_row(
                    act[j].cpu(),
                    chw_to_hwc(shown[j]),
                    f"{folders[i]}: {truth}, predicted {guess}",
                    compact,
                    layer,
                )
                bar.update()
    bar.close()
    return compact


def write_statistics(out: Path, model, modules: dict, val, meta: dict, p, device) -> dict:
    """Per-layer statistics over the whole val split, batch by batch (all activations would not fit)."""
    batches = (
        eval_inputs(val.images[s : s + p.batch_size].to(device), meta["input_size"])
        for s in tqdm(
            range(0, len(val), p.batch_size),
            desc="activation statistics",
            unit="batch",
            leave=False,
            disable=None,
        )
    )
    stats = layer_statistics(model, modules, batches)
    table = pd.DataFrame(
        {
            "layer": list(stats),
            "sparsity": [s["sparsity"] for s in stats.values()],
            "mean": [s["mean"] for s in stats.values()],
        }
    )
    table.to_csv(out / "sparsity.csv", index=False)
    save_figure(
        layer_stats_figure(
            table["layer"].tolist(),
            table["sparsity"].tolist(),
            table["mean"].tolist(),
            title=f"{meta['arch']} activations over {len(val)} val images",
        ),
        out / "sparsity.png",
    )
    return stats


def main(argv=None):
    args, p = stage_args(
        __doc__, ("--data", "--model", "--metrics", "--out"), argv, outs=("--out", "--metrics")
    )
    p = p.activations
    device = select_device(p.device)
    model, meta = load_checkpoint(args.model)
    model.to(device)
    modules = resolve_layers(model, p.layers, meta["input_size"])
    val = load_split(args.data, "val")
    if len(val) == 0:
        raise StageError(f"{args.data}/val.pt holds no images; nothing to show (check the prepare stage)")
    chosen = select_images(val, list(dict.fromkeys(p.images)), p.num_images)
    with atomic_outputs(args.out, args.metrics) as (out, metrics):  # together, the metrics last
        out.mkdir()
        write_compact(out, write_grids(out, model, modules, chosen, meta, p, device), meta)
        stats = write_statistics(out, model, modules, val, meta, p, device)
        write_json(metrics, stats)
    if not meta["arch"].startswith("resnet"):
        log(
            f"note: {meta['arch']} blocks do not end in a ReLU; exact-zero sparsity is not comparable to a ResNet's"
        )
    log(
        f"activations: {len(chosen)} image(s) x {len(modules)} layer(s) -> {args.out}; over {len(val)} val images: "
        + ", ".join(
            f"{n} {s['channels']}x{s['height']}x{s['width']} {s['sparsity']:.0%} zero, mean {s['mean']:.3g}"
            for n, s in stats.items()
        )
    )


if __name__ == "__main__":
    run_main(main)
