"""activations: what each ResNet stage computes, as feature-map grids and per-layer statistics.

python -m stages.activations --data data/prepared --model models --metrics metrics/activations.json
    --out plots/activations [--params params.yaml]

Writes plots/activations/grids/<image-stem>/<layer>.png (the input, then the top activations.max_maps
maps of that layer by mean activation), plots/activations/layers/<layer>.png (one compact figure per
layer: a row per image, its top figures.COMPACT_MAPS maps; the plots page shows these and links the
grids), plots/activations/sparsity.csv and sparsity.png (fraction of exact zeros and mean activation per
layer over the whole val split) and plots/activations/stats.json (the same numbers with std, channels,
height, width and dead channels, per layer). The metrics JSON holds the headline only: the mean
sparsity over the layers and the dead channels of all layers.
"""

from cnnlens.cli import log, run_main
from cnnlens.config import stage_args
from cnnlens.devices import select_device
from cnnlens.figures import COMPACT_MAPS, write_activation_grids, write_layer_figures, write_layer_statistics
from cnnlens.files import atomic_outputs, write_json
from cnnlens.hooks import headline_statistics, image_activations, resolve_layers, split_statistics
from cnnlens.model import load_checkpoint
from cnnlens.tensors import load_split, select_images


def main(argv=None):
    args, params = stage_args(
        __doc__, ("--data", "--model", "--metrics", "--out"), argv=argv, outs=("--out", "--metrics")
    )
    ap = params.activations
    device = select_device(ap.device)
    model, meta = load_checkpoint(args.model)
    model.to(device)
    crop = meta["input_size"]
    modules = resolve_layers(model, ap.layers, crop)
    val = load_split(args.data, "val")  # an empty one is an error
    chosen = select_images(val, list(dict.fromkeys(ap.images)), ap.num_images)
    with atomic_outputs(args.out, args.metrics) as (out, metrics):  # together, the metrics last
        out.mkdir()
        k = max(ap.max_maps, COMPACT_MAPS)  # the grids show max_maps, the compact figures COMPACT_MAPS
        records = image_activations(
            model, modules, chosen.images, input_size=crop, loss=meta["loss"], batch_size=ap.batch_size, k=k
        )
        compact = write_activation_grids(
            out, records, chosen=chosen, classes=meta["classes"], input_size=crop, max_maps=ap.max_maps
        )
        write_layer_figures(out, compact, arch=meta["arch"])
        stats = split_statistics(model, modules, val.images, input_size=crop, batch_size=ap.batch_size)
        write_layer_statistics(out, stats, arch=meta["arch"], n_images=len(val))
        write_json(out / "stats.json", stats)
        write_json(metrics, headline_statistics(stats))
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
