"""saliency: which pixels the fine-tuned model's prediction depends on, and how far to trust the maps.

python -m stages.saliency --data data/prepared --model models --weights data/weights \
    --metrics metrics/saliency.json --out plots/saliency [--params params.yaml]

Per method in saliency.methods: <out>/figures/<method>/<image-stem>.png (input, |map| per channel,
combined, overlay), <out>/figures/<method>.png (all images in rows), <out>/arrays/<method>.npz (raw maps,
inputs, target, paths). The CAM methods hook saliency.gradcam_layer (auto: chosen for the model's input
size). Quality on saliency.quality_images val images, next to a random and a centre-prior map:
deletion/insertion AUC, ROAD (MoRF, LeRF), pointing game and mass inside the object mask (when the data
has masks), 95% bootstrap intervals -> <out>/quality.json (all of it, with the CAM layer), <out>/quality.csv
and figures/quality.png (sorted by deletion AUC); the metrics JSON holds the headline only (per method and
the random map: mean deletion and insertion AUC, ROAD, pointing game; the CAM grid side; seconds).
The model-randomisation check -> <out>/randomization.csv and figures/randomization.png; the untuned vs
the fine-tuned network on the same images -> figures/before_after.png. Maps explain the predicted class.
saliency.quick: the same maps and figures, but quality scored on the shown images only (their maps reused),
at most quality.QUICK_STEPS deletion/insertion steps, no ROAD, no randomisation check; quality.json and the
metrics JSON then hold quick: true.
"""

import time

import torch

from cnnlens import figures, quality
from cnnlens.attribution import METHODS, pixel_note, resolve_cam_layer
from cnnlens.cli import log, run_main
from cnnlens.config import stage_args
from cnnlens.devices import device_name, select_device
from cnnlens.errors import ParamsError
from cnnlens.files import atomic_outputs, write_json
from cnnlens.model import initial_model, load_checkpoint, to_device
from cnnlens.tensors import load_split, select_images, spread_index

SETTINGS = ("smoothgrad_sigma", "smoothgrad_samples", "ig_steps", "occlusion_window", "occlusion_stride")
SCORING = ("quick", "quality_steps", "road_steps", "randomization")


def method_settings(sp, cam_layer) -> dict:
    """The methods' own settings from the saliency section, as attribution.explain() takes them, with
    the CAM layer resolved (cam_layer: an attribution.CamLayer)."""
    keys = (*SETTINGS, "gradshap_samples")
    return {**{key: getattr(sp, key) for key in keys}, "gradcam_layer": cam_layer.name}


def before_after(model, shown, scores, *, params, settings: dict, meta: dict, weights_dir, look: dict):
    """The before/after figure: the untuned network (downloaded weights, a new head seeded as finetune
    seeds it) vs the fine-tuned one."""
    torch.manual_seed(params.seed)  # the new head's init, as in finetune
    untuned, info = initial_model(meta["arch"], len(meta["classes"]), weights_dir)
    columns = quality.before_after_maps(
        to_device(untuned, shown.x.device),
        model,
        shown,
        maps_of=scores.maps,
        methods=params.saliency.methods,
        loss=meta["loss"],
        seed=params.seed,
        batch_size=params.saliency.batch_size,
        settings=settings,
    )
    return figures.before_after_figure(
        columns, arch=meta["arch"], source=info.get("source"), classes=meta["classes"], **look
    )


def write_outputs(out, model, shown, *, scores, params, settings: dict, meta: dict, weights_dir) -> None:
    """Each method's arrays and figures, the before/after figure, the randomisation check, the quality
    table (quality.csv, figures/quality.png)."""
    sp, labels = params.saliency, {name: m.label for name, m in METHODS.items()}
    images, titles = figures.labelled_images(shown, meta["classes"])
    look = {"images": images, "titles": titles, "normalize": sp.normalize, "percentile": sp.percentile}
    for name, maps in scores.maps.items():
        about = {"label": labels[name], "description": METHODS[name].describe(**settings)}
        about["note"] = pixel_note(name, model, shown.x, **settings)
        figures.write_method(out, name, maps=maps, shown=shown, **about, **look)
    if sp.before_after:
        where = {"params": params, "settings": settings, "meta": meta, "weights_dir": weights_dir}
        figure = before_after(model, shown, scores, look=look, **where)
        figures.save_figure(figure, out / "figures" / "before_after.png")
    if scores.curves:
        figures.write_randomization(
            out, scores.curves, labels=labels, images=scores.randomization_images, skipped=scores.skipped
        )
    n = scores.metrics[quality.BASELINES[0]]["deletion_auc"]["n"]
    table = {
        "labels": {**labels, **quality.BASELINE_LABELS},
        "headers": quality.SCORES,
        "baselines": quality.BASELINES,
    }
    figures.write_quality(
        out, quality.quality_table(scores.metrics), images=n, sorted_by="deletion AUC", **table
    )


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
    cam_layer = resolve_cam_layer(model, sp.gradcam_layer, size=meta["input_size"])  # a bad name stops here
    settings = method_settings(sp, cam_layer)
    val = load_split(args.data, "val")
    predict = {"input_size": meta["input_size"], "loss": meta["loss"], "batch_size": sp.batch_size}
    chosen = select_images(val, list(dict.fromkeys(sp.images)), sp.num_images)
    shown = quality.predict_images(model, chosen, device, **predict)
    # scored for quality: a fixed choice, like `shown`; quick: the shown images themselves (maps reused)
    split = chosen if sp.quick else val
    count = len(split) if sp.quick else sp.quality_images or len(val)
    scored = quality.ScoredImages(model, split, device, index=spread_index(len(split), count), **predict)
    with atomic_outputs(args.out, args.metrics) as (out, metrics_file):  # together, the metrics last
        out.mkdir()
        scores = quality.score_methods(
            model,
            shown,
            scored,
            methods=sp.methods,
            seed=params.seed,
            batch_size=sp.batch_size,
            bootstrap=sp.bootstrap,
            settings=settings,
            **quality.scoring(**{key: getattr(sp, key) for key in SCORING}),
        )
        about = {"params": params, "settings": settings, "meta": meta, "weights_dir": args.weights}
        write_outputs(out, model, shown, scores=scores, **about)
        seconds = time.perf_counter() - began
        where = {"shown": shown, "scored": scored, "device": device_name(device), "cam_layer": cam_layer}
        full = quality.full_results(scores, seconds=seconds, quick=sp.quick, **where)
        write_json(out / "quality.json", full)
        write_json(metrics_file, quality.headline_metrics(full, methods=sp.methods))
    log(quality.summary_text(full))


if __name__ == "__main__":
    run_main(main)
