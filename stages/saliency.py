"""saliency: which pixels the fine-tuned model's prediction depends on, and how far to trust the maps.

python -m stages.saliency --data data/prepared --model models --weights data/weights \
    --metrics metrics/saliency.json --out plots/saliency [--params params.yaml]

Per method in saliency.methods: <out>/figures/<method>/<image-stem>.png (input, |map| per channel,
combined, overlay), <out>/figures/<method>.png (all images in rows), <out>/arrays/<method>.npz (raw maps,
inputs, target, paths). Quality on saliency.quality_images val images, next to a random and a centre-prior
map: deletion/insertion AUC, pointing game and mass inside the object mask (when the data has masks), 95%
bootstrap intervals -> <out>/quality.json (all of it) and <out>/quality.csv; the metrics JSON holds the
headline only (per method and the random map: mean deletion and insertion AUC, pointing game; seconds).
The model-randomisation check -> <out>/randomization.csv and figures/randomization.png; the untuned vs
the fine-tuned network on the same images -> figures/before_after.png. Maps explain the predicted class.
"""

import time

import torch

from cnnlens.attribution import METHODS, pixel_note
from cnnlens.cli import log, run_main
from cnnlens.config import stage_args
from cnnlens.devices import device_name, select_device
from cnnlens.errors import ParamsError
from cnnlens.figures import (
    before_after_figure,
    labelled_images,
    save_figure,
    write_method,
    write_randomization,
)
from cnnlens.files import atomic_outputs, write_json
from cnnlens.model import initial_model, load_checkpoint, to_device
from cnnlens.quality import (
    RANDOMIZATION_MAX_PASSES_CPU,
    ScoredImages,
    before_after_maps,
    full_results,
    headline_metrics,
    predict_images,
    quality_table,
    quality_table_text,
    score_methods,
)
from cnnlens.tensors import load_split, select_images, spread_index


def method_settings(sp) -> dict:
    """The methods' own settings from the saliency section, as attribution.explain() takes them."""
    return {key: getattr(sp, key) for key in ("smoothgrad_sigma", "smoothgrad_samples", "ig_steps")}


def before_after(model, shown, scores, *, params, meta: dict, weights_dir, look: dict):
    """The before/after figure: the untuned network (downloaded weights, a new head seeded as finetune
    seeds it) vs the fine-tuned one."""
    torch.manual_seed(params.seed)  # the new head's init, as in finetune
    untuned, info = initial_model(meta["arch"], len(meta["classes"]), weights_dir)
    columns = before_after_maps(
        to_device(untuned, shown.x.device),
        model,
        shown,
        maps_of=scores.maps,
        methods=params.saliency.methods,
        loss=meta["loss"],
        seed=params.seed,
        batch_size=params.saliency.batch_size,
        settings=method_settings(params.saliency),
    )
    return before_after_figure(
        columns, arch=meta["arch"], source=info.get("source"), classes=meta["classes"], **look
    )


def write_outputs(out, model, shown, *, scores, params, meta: dict, weights_dir) -> None:
    """Each method's arrays and figures, the before/after figure, the randomisation check, quality.csv."""
    sp, settings = params.saliency, method_settings(params.saliency)
    images, titles = labelled_images(shown, meta["classes"])
    look = {"images": images, "titles": titles, "normalize": sp.normalize, "percentile": sp.percentile}
    for name, maps in scores.maps.items():
        m = METHODS[name]
        about = {
            "label": m.label,
            "description": m.describe(**settings),
            "note": pixel_note(name, model, shown.x),
        }
        write_method(out, name, maps=maps, shown=shown, **about, **look)
    if sp.before_after:
        figure = before_after(
            model, shown, scores, params=params, meta=meta, weights_dir=weights_dir, look=look
        )
        save_figure(figure, out / "figures" / "before_after.png")
    if scores.curves:
        labels = {name: m.label for name, m in METHODS.items()}
        write_randomization(
            out, scores.curves, labels=labels, images=scores.randomization_images, skipped=scores.skipped
        )
    quality_table(scores.metrics).to_csv(out / "quality.csv", index=False)


def main(argv=None):
    paths = ("--data", "--model", "--weights", "--metrics", "--out")
    args, params = stage_args(__doc__, paths, argv=argv, outs=("--out", "--metrics"))
    sp = params.saliency
    if not sp.methods:
        raise ParamsError(
            f"{args.params}: saliency.methods is empty; list at least one of: {', '.join(METHODS)}"
        )
    began = time.perf_counter()
    device = select_device(sp.device)
    model, meta = load_checkpoint(args.model)
    model = to_device(model, device)
    val = load_split(args.data, "val")
    predict = {"input_size": meta["input_size"], "loss": meta["loss"], "batch_size": sp.batch_size}
    chosen = select_images(val, list(dict.fromkeys(sp.images)), sp.num_images)
    shown = predict_images(model, chosen, device, **predict)
    # scored for quality: a fixed choice, like `shown`
    index = spread_index(len(val), sp.quality_images or len(val))
    scored = ScoredImages(model, val, device, index=index, **predict)
    with atomic_outputs(args.out, args.metrics) as (out, metrics_file):  # together, the metrics last
        out.mkdir()
        scores = score_methods(
            model,
            shown,
            scored,
            methods=sp.methods,
            seed=params.seed,
            batch_size=sp.batch_size,
            quality_steps=sp.quality_steps,
            bootstrap=sp.bootstrap,
            randomization=sp.randomization,
            settings=method_settings(sp),
        )
        write_outputs(out, model, shown, scores=scores, params=params, meta=meta, weights_dir=args.weights)
        seconds = time.perf_counter() - began
        full = full_results(scores, shown=shown, scored=scored, device=device_name(device), seconds=seconds)
        write_json(out / "quality.json", full)
        write_json(metrics_file, headline_metrics(full, methods=sp.methods))
    skipped = ", ".join(scores.skipped)
    note = f"; randomisation check skipped for {skipped} (over {RANDOMIZATION_MAX_PASSES_CPU} pass per image on a CPU)"
    masks = " with masks" if scored.masks is not None else ""
    log(
        f"saliency: {len(shown.x)} images explained, quality on {scored.n} val images{masks}, {full['device']}, "
        f"{time.perf_counter() - began:.1f} s{note if skipped else ''}\n{quality_table_text(scores.metrics)}"
    )


if __name__ == "__main__":
    run_main(main)
