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

from stages import attribution as A
from stages.data import center_crop, denormalize, eval_inputs, load_split, select_images
from stages.explain import (baseline_maps, display_maps, explain, gradcam_grid, ig_completeness, predictions,
                            quality_scores, to_device)
from stages.figures import (chw_to_hwc, randomization_figure, saliency_figure, saliency_rows_figure,
                            save_figure, scale_label)
from stages.fileio import ParamsError, atomic_path, log, run_main, write_json
from stages.model import initial_model, load_checkpoint
from stages.params import select_device, stage_args
from stages.quality import bootstrap_ci, deletion_insertion_passes, default_layer_order, randomization_check

LABELS = {"gradient": "gradient", "smoothgrad": "SmoothGrad", "integrated_gradients": "integrated gradients",
          "gradcam": "Grad-CAM"}
RANDOMIZATION_IMAGES = 8
# The randomisation check reruns a method (layers + 2) = 8 times on 8 images; on a CPU it runs only
# for methods of at most this many passes per image (gradient, Grad-CAM): SmoothGrad and IG would
# take most of the demo's minute. On a GPU it runs for every method.
RANDOMIZATION_MAX_PASSES_CPU = 1


def describe(name: str, sp) -> str:
    """One line on what the method computes, for the figures."""
    return {"gradient": "|d logit / d pixel| of the predicted class, one backward pass",
            "smoothgrad": f"mean |gradient| over {sp.smoothgrad_samples} noisy copies of the image "
                          f"(noise std {sp.smoothgrad_sigma:g} x the image's range)",
            "integrated_gradients": f"gradients along {sp.ig_steps} steps from a black image to the image, times "
                                    "(image - black); |value| shown",
            "gradcam": "last conv block's feature maps weighted by the mean gradient of the predicted logit, ReLU"}[name]


def stems(paths):
    """One file name per image: the stem, or the whole path when two stems collide."""
    s = [Path(p).stem for p in paths]
    return [a if s.count(a) == 1 else p.replace("/", "_").rsplit(".", 1)[0] for a, p in zip(s, paths)]


def before_after_figure(model, x, pred, prob, maps_of, images, titles, meta, weights_dir, p):
    """The same images explained by the untuned network (where finetune starts) and by the
    fine-tuned one, each for its own predicted class: gradient, plus the other one-pass methods."""
    sp, classes = p.saliency, meta["classes"]
    torch.manual_seed(p.seed)  # the new head's init, as in finetune
    untuned, info = initial_model(meta["arch"], len(classes), weights_dir)
    untuned = to_device(untuned, x.device)
    upred, uprob = predictions(untuned, x, meta["loss"], sp.batch_size)
    columns = []
    for name in ["gradient"] + [n for n in sp.methods if n != "gradient" and A.passes(n, sp)[0] == 1]:
        for who, net, g, pr in (("untuned", untuned, upred, uprob), ("fine-tuned", model, pred, prob)):
            maps = maps_of[name] if who == "fine-tuned" and name in maps_of else explain(name, net, x, g, sp, p.seed)
            columns.append((f"{who}: {LABELS[name]}", display_maps(maps, sp.normalize, sp.percentile)[1].numpy(),
                            False, [f"predicts {classes[int(c)]} (p={q:.2f})" for c, q in zip(g, pr.tolist())]))
    source = info.get("source")
    origin = "random init, model.weights: none" if source == "none" else f"{source} weights + a new random head"
    return saliency_rows_figure(images, columns, titles, f"Before vs after fine-tuning: the untuned {meta['arch']} "
                                f"({origin}) vs the fine-tuned model,\neach explaining its own predicted class",
                                scale_label(sp.normalize, sp.percentile))


def write_method(out: Path, name: str, maps, x, target, paths, images, titles, note: str, sp) -> None:
    """<out>/arrays/<name>.npz (raw maps), figures/<name>/<stem>.png per image and figures/<name>.png.

    Figures and arrays live apart so figures/ holds only images: dvc.yaml declares it as one image plot."""
    (out / "figures" / name).mkdir(parents=True)
    (out / "arrays").mkdir(exist_ok=True)
    np.savez(out / "arrays" / f"{name}.npz", maps=maps.numpy().astype(np.float32), target=target.numpy(),
             inputs=x.cpu().numpy().astype(np.float32), paths=np.array(paths))
    channels, combined = display_maps(maps, sp.normalize, sp.percentile)
    scale = scale_label(sp.normalize, sp.percentile)
    for i, stem in enumerate(stems(paths)):
        save_figure(saliency_figure(images[i], channels[i].numpy(), combined[i].numpy(),
                                    f"{LABELS[name]} ({describe(name, sp)})\n{titles[i]}",
                                    LABELS[name], scale, map_note=note), out / "figures" / name / f"{stem}.png")
    columns = [(f"{LABELS[name]} map\n({note})", combined.numpy(), False, None),
               ("overlay (colour = salient)", combined.numpy(), True, None)]
    save_figure(saliency_rows_figure(images, columns, titles,
                                     f"{LABELS[name]} saliency for each image's predicted class\n"
                                     f"({describe(name, sp)})", scale),
                out / "figures" / f"{name}.png")


def randomization_title(n: int, skipped: list[str]) -> str:
    title = (f"Model-randomisation check on {n} val images: layers re-initialised one after another;\n"
             "a map that explains the model should fall towards 0")
    return title + (f" (not run on this CPU, too costly: {', '.join(LABELS[k] for k in skipped)})" if skipped else "")


def summary(metrics: dict) -> str:
    nan = {"mean": float("nan")}
    lines = [f"  {'method':22} {'deletion AUC':>13} {'insertion AUC':>14} {'pointing':>9} {'rand. rho':>10}",
             f"  {'':22} {'(low = good)':>13} {'(high = good)':>14} {'(hits)':>9} {'(low = good)':>10}"]
    for name, m in metrics.items():
        rho = m.get("randomization_rho")
        lines.append(f"  {name:22} {m['deletion_auc']['mean']:13.3f} {m['insertion_auc']['mean']:14.3f} "
                     f"{m.get('pointing_game', nan)['mean']:9.2f} {'-' if rho is None else f'{rho:.2f}':>10}")
    return "\n".join(lines)


def main(argv=None):
    args, p = stage_args(__doc__, ("--data", "--model", "--weights", "--metrics", "--out"), argv)
    sp = p.saliency
    if not sp.methods:
        raise ParamsError(f"{args.params}: saliency.methods is empty; list at least one of: {', '.join(A.METHODS)}")
    began = time.perf_counter()
    device = select_device(sp.device)
    model, meta = load_checkpoint(args.model)
    model = to_device(model, device)
    classes, crop, loss = meta["classes"], meta["input_size"], meta["loss"]
    val = load_split(args.data, "val")
    shown = select_images(val, list(dict.fromkeys(sp.images)), sp.num_images)
    scored = select_images(val, [], sp.quality_images or len(val))  # scored for quality: fixed, like `shown`
    x, xq = eval_inputs(shown.images, crop).to(device), eval_inputs(scored.images, crop).to(device)
    pred, prob = predictions(model, x, loss, sp.batch_size)
    tq, _ = predictions(model, xq, loss, sp.batch_size)
    masks = None if scored.masks is None else center_crop(scored.masks, crop)
    images = [chw_to_hwc(im) for im in denormalize(x.cpu())]
    titles = [f"{path}\ntrue {classes[int(t)]}, predicted {classes[int(g)]} (p={pr:.2f})"
              for path, t, g, pr in zip(shown.paths, shown.labels, pred, prob.tolist())]
    layers, nr = default_layer_order(model), min(len(xq), RANDOMIZATION_IMAGES)
    summarize = lambda scores: {k: bootstrap_ci(v, sp.bootstrap, p.seed) for k, v in scores.items()}  # noqa: E731
    quality = lambda maps: summarize(  # noqa: E731
        quality_scores(model, xq, tq, maps, masks, sp.quality_steps, p.seed, sp.batch_size))
    di_passes = {"deletion_insertion": {"forward": deletion_insertion_passes(sp.quality_steps), "backward": 0}}
    metrics, curves, skipped, maps_of = {}, {}, [], {}

    with atomic_path(args.out) as out:
        out.mkdir()
        for name in tqdm(sp.methods, desc="saliency methods", unit="method", disable=None):
            start = time.perf_counter()
            maps_of[name] = maps = explain(name, model, x, pred, sp, p.seed)
            maps_q = explain(name, model, xq, tq, sp, p.seed)
            seconds = (time.perf_counter() - start) / (len(x) + len(xq))
            # what one map pixel is: Grad-CAM's map is the hooked layer's coarse grid, upsampled
            note = "max over R, G, B"
            if name == "gradcam":
                note = "a {} x {} grid, upsampled".format(*gradcam_grid(model, x))
            write_method(out, name, maps, x, pred, shown.paths, images, titles, note, sp)
            fwd, bwd = A.passes(name, sp)
            metrics[name] = m = {**quality(maps_q), "randomization_rho": None, "seconds_per_image": seconds,
                                 "passes": {"forward": fwd, "backward": bwd, "what": A.PASSES[name]},
                                 "metric_passes": dict(di_passes)}
            if name == "integrated_gradients":
                rel = ig_completeness(model, xq, tq, maps_q, sp.batch_size)
                m["ig_completeness_error"] = summarize({"rel": rel})["rel"]
                m["metric_passes"]["ig_completeness"] = {"forward": 2, "backward": 0}
            if sp.randomization and device.type == "cpu" and fwd > RANDOMIZATION_MAX_PASSES_CPU:
                skipped.append(name)
            elif sp.randomization:
                curves[name] = randomization_check(model, xq[:nr], tq[:nr].to(device), layer_order=layers, seed=p.seed,
                                                   method_fn=lambda net, xx, t: explain(name, net, xx, t, sp, p.seed))
                m["randomization_rho"] = curves[name][-1][1]  # all layers re-initialised
                # per image checked: the method on the model, on its copy and after each layer group
                runs = len(layers) + 2
                m["metric_passes"]["randomization"] = {"forward": fwd * runs, "backward": bwd * runs}
        for kind in ("random", "center"):
            metrics[kind] = {**quality(baseline_maps(kind, len(xq), crop, crop, p.seed)),
                             "passes": {"forward": 0, "backward": 0}, "metric_passes": di_passes}
        if sp.before_after:
            save_figure(before_after_figure(model, x, pred, prob, maps_of, images, titles, meta, args.weights, p),
                        out / "figures" / "before_after.png")
        if curves:
            # one column per method, so DVC draws one line per method over the same steps
            first = next(iter(curves.values()))
            table = pd.DataFrame({"step": range(len(first)), "layer": [layer for layer, _ in first]})
            for name, c in curves.items():
                table[name] = [rho for _, rho in c]
            table.to_csv(out / "randomization.csv", index=False)
            curves_shown = {LABELS[k]: c for k, c in curves.items()}
            save_figure(randomization_figure(curves_shown, randomization_title(nr, skipped)),
                        out / "figures" / "randomization.png")
        rows = [(k, metric, v["mean"], v["low"], v["high"]) for k, m in metrics.items()
                for metric, v in m.items() if isinstance(v, dict) and "low" in v]
        pd.DataFrame(rows, columns=["method", "metric", "mean", "low", "high"]).to_csv(out / "quality.csv", index=False)

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{device.type} ({torch.get_num_threads()} CPU threads)"
    write_json(args.metrics, {**metrics, "n_images": len(x), "n_quality_images": len(xq), "masks": masks is not None,
                              "randomization_images": nr if curves else 0, "randomization_skipped": skipped,
                              "device": dev, "seconds": round(time.perf_counter() - began, 2)})
    log(f"saliency: {len(x)} images explained, quality on {len(xq)} val images"
        f"{' with masks' if masks is not None else ''}, {dev}, {time.perf_counter() - began:.1f} s"
        + (f"; randomisation check skipped for {', '.join(skipped)} (over {RANDOMIZATION_MAX_PASSES_CPU} pass "
           "per image on a CPU)" if skipped else "") + "\n" + summary(metrics))


if __name__ == "__main__":
    run_main(main)
