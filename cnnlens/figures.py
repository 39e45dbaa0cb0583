"""Matplotlib figures. Functions return figures (stages save them with save_figure); the write_*
functions write a stage's figures and the plot data that goes with them."""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run under DVC, CI and on GPU machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cnnlens.files import atomic_path, unique_stems, write_csv  # noqa: E402
from cnnlens.tensors import combine_channels, denormalize, normalize_maps  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    with atomic_path(path) as tmp:
        tight = None if getattr(fig, "fixed_layout", False) else "tight"
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches=tight)
    plt.close(fig)


def image_grid(
    images: list[np.ndarray],
    titles: list[str],
    *,
    cols: int = 4,
    size: float = 2.6,
    suptitle: str = "",
    title_colors: list[str] | None = None,
):
    """H x W x 3 float [0,1] (or H x W) images in a grid with one title each."""
    n = max(len(images), 1)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * size, rows * size + (0.4 if suptitle else 0)), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for i, (img, title) in enumerate(zip(images, titles)):
        ax = axes.ravel()[i]
        ax.imshow(img, cmap=None if img.ndim == 3 else "gray")
        ax.set_title(title, fontsize=8, color=(title_colors[i] if title_colors else "black"))
    if not images:
        axes[0, 0].text(0.5, 0.5, "none", ha="center", va="center", fontsize=14)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def chw_to_hwc(x) -> np.ndarray:
    """C x H x W tensor/array in [0,1] -> H x W x C numpy."""
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.clip(arr.transpose(1, 2, 0), 0, 1)


def feature_maps_figure(
    image: np.ndarray,
    maps: np.ndarray,
    labels: list[str],
    *,
    suptitle: str = "",
    image_label: str = "input image",
    cols: int | None = None,
    size: float = 1.5,
):
    """The input image (H x W x 3 in [0,1]) as the first panel, then K feature maps (K x h x w,
    each already scaled to [0,1]) with one label each and one colour bar explaining the scale.
    Default columns: a near-square grid, at most 10 wide (65 panels: 9 x 8)."""
    n = len(maps) + 1
    cols = min(cols or min(math.ceil(math.sqrt(n)), 10), n)
    lines = max([label.count("\n") + 1 for label in [image_label, *labels]])
    grid = _Panels(
        math.ceil(n / cols),
        cols,
        size,
        title_h=0.12 * lines + 0.08,
        top=0.2 + 0.15 * (suptitle.count("\n") + 1),
    )
    grid.show(0, 0, image)
    grid.title(0, 0, image_label, fontsize=7, fontweight="bold")
    for i, (m, label) in enumerate(zip(maps, labels), start=1):
        grid.show(i // cols, i % cols, m, cmap="viridis")
        grid.title(i // cols, i % cols, label, fontsize=7)
    grid.colorbar("viridis", ["lowest\nin map", "highest\nin map"])
    if suptitle:
        grid.suptitle(suptitle, fontsize=9)
    return grid.done()


def layer_stats_figure(layers: list[str], sparsity: list[float], mean: list[float], *, title: str = ""):
    """Two bar charts side by side: the fraction of exact-zero activations and the mean activation per layer."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    x = np.arange(len(layers))
    left.bar(x, sparsity, color="tab:gray")
    left.set_ylim(0, 1)
    left.set_ylabel("fraction of activations exactly 0")
    left.set_title("sparsity (units that did not fire)", fontsize=9)
    for xi, v in zip(x, sparsity):
        left.text(xi, v + 0.02, f"{v:.0%}", ha="center", fontsize=8)
    right.bar(x, mean, color="tab:blue")
    right.set_ylabel("mean activation")
    right.set_title("mean activation (zeros included)", fontsize=9)
    for ax in (left, right):
        ax.set_xticks(x, layers)
        ax.set_xlabel("layer (input side -> output side)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ---- saliency maps (stages/saliency.py)

HEAT_CMAP = "inferno"  # dark = not salient, bright yellow = most salient; readable in grey print too


def scale_label(mode: str, percentile: float) -> str:
    """What 0 and 1 mean on a saliency map scaled by tensors.normalize_maps."""
    if mode == "percentile":
        return f"0 = min, 1 = {percentile:g}th percentile and above, per image"
    return "0 = min, 1 = max, per image"


def heat_overlay(image: np.ndarray, heat: np.ndarray, strength: float = 0.8) -> np.ndarray:
    """The image with a heat map painted over it: colour where the map is high, the plain image
    where it is low (alpha grows with the map), so the object stays visible under weak saliency."""
    heat = np.clip(heat, 0, 1)
    alpha = strength * heat[..., None]
    return np.clip((1 - alpha) * image + alpha * plt.get_cmap(HEAT_CMAP)(heat)[..., :3], 0, 1)


class _Panels:
    """rows x cols square panels at fixed inches, composed into ONE image drawn at the figure's own pixels, with
    `title_h` inches above each panel for its title, `top` inches for the suptitle and an axis for a
    colour bar on the right. One axes per panel made a 17-panel figure take ~1 s to build and draw;
    one composed image takes a tenth of that. Panels are resampled to the figure's pixels with
    nearest neighbour, so a 7 x 7 map shows its 49 units as blocks."""

    DPI = 100

    def __init__(self, rows: int, cols: int, size: float, *, title_h: float, top: float, bar: bool = True):
        pad, self.gap, right = 0.1, 0.15, (0.95 if bar else 0.1)
        self.size, self.title_h, self.top, self.pad = size, title_h, top, pad
        self.width = pad + cols * size + (cols - 1) * self.gap + right
        self.height = top + rows * (size + title_h) + pad
        self.fig = plt.figure(figsize=(self.width, self.height), dpi=self.DPI)
        self.fig.fixed_layout = True  # save_figure: no tight bounding box (a second draw) needed
        h, w = round(self.height * self.DPI), round(self.width * self.DPI)
        self.canvas = np.ones((h, w, 3))
        bar_h = min(rows * (size + title_h) - title_h, 3.0)
        box = (
            (self.width - right + 0.15),
            pad + (rows * (size + title_h) - title_h - bar_h) / 2,
            0.14,
            bar_h,
        )
        self.bar_ax = self.fig.add_axes(self._fraction(box)) if bar else None

    def _fraction(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """(x, y, w, h) in inches -> in fractions of the figure."""
        x, y, w, h = box
        return (x / self.width, y / self.height, w / self.width, h / self.height)

    def _origin(self, r: int, c: int) -> tuple[float, float]:
        """The panel's bottom-left corner, inches from the figure's bottom-left."""
        return self.pad + c * (self.size + self.gap), self.height - self.top - (r + 1) * (
            self.size + self.title_h
        )

    def show(self, r: int, c: int, arr: np.ndarray, *, cmap: str | None = None) -> None:
        """Paint an H x W x 3 image in [0,1], or an H x W map in [0,1] through `cmap`, into panel (r, c)."""
        arr = np.asarray(arr, dtype=float)
        if arr.ndim == 2:
            arr = plt.get_cmap(cmap or "gray")(np.clip(arr, 0, 1))[..., :3]
        x, y = self._origin(r, c)
        n = round(self.size * self.DPI)
        top, left = round((self.height - y - self.size) * self.DPI), round(x * self.DPI)
        rows = np.arange(n) * arr.shape[0] // n
        cols = np.arange(n) * arr.shape[1] // n
        self.canvas[top : top + n, left : left + n] = np.clip(arr[rows][:, cols], 0, 1)

    def title(self, r: int, c: int, text: str, **kw) -> None:
        x, y = self._origin(r, c)
        self.fig.text(
            (x + self.size / 2) / self.width,
            (y + self.size + 0.03) / self.height,
            text,
            ha="center",
            va="bottom",
            **kw,
        )

    def colorbar(self, cmap: str, ticks: list[str], label: str = ""):
        bar = self.fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=self.bar_ax, ticks=[0, 1])
        bar.ax.set_yticklabels(ticks, fontsize=7)
        if label:
            bar.set_label(label, fontsize=7)
        return bar

    def suptitle(self, text: str, **kw) -> None:
        self.fig.suptitle(text, y=1 - 0.05 / self.height, va="top", **kw)

    def done(self):
        """The figure, with the composed panels drawn (call after the last show)."""
        # figimage: the canvas's pixels are the figure's (saved at DPI), no resampling on draw
        self.fig.figimage((self.canvas * 255).round().astype(np.uint8), origin="upper", zorder=-1)
        return self.fig


def saliency_figure(
    image: np.ndarray,
    channel_maps: np.ndarray,
    combined: np.ndarray,
    *,
    title: str,
    method: str,
    scale: str,
    size: float = 2.0,
    map_note: str = "one value per pixel",
):
    """One image explained by one method, panels left to right: the input; with 3 channel maps
    (3 x H x W in [0,1], one scale shared by R, G and B) a panel per channel and the combined map
    (H x W, max over channels); with 1 channel (Grad-CAM) the map, `map_note` under its title;
    then the map over the input."""
    panels = [("input (de-normalised)", image, False)]
    if channel_maps.shape[0] == 3:
        for name, m in zip(("R", "G", "B"), channel_maps):
            panels.append((f"|{method}|, {name} channel\n(R, G, B share one scale)", m, True))
        panels.append(("combined: max over R, G, B\n(own scale)", combined, True))
    else:
        panels.append((f"{method} map\n({map_note})", combined, True))
    panels.append(("overlay on the input\n(bright colour = salient)", heat_overlay(image, combined), False))
    grid = _Panels(1, len(panels), size, title_h=0.4, top=0.12 + 0.17 * (title.count("\n") + 1))
    for c, (label, arr, is_map) in enumerate(panels):
        grid.show(0, c, arr, cmap=HEAT_CMAP if is_map else None)
        grid.title(0, c, label, fontsize=7.5)
    _heat_colorbar(grid, scale)
    grid.suptitle(title, fontsize=9)
    return grid.done()


def _heat_colorbar(grid: _Panels, scale: str) -> None:
    grid.colorbar(HEAT_CMAP, ["0: low", "1: high"], f"saliency ({scale})")


def saliency_rows_figure(
    images: list[np.ndarray],
    columns: list[tuple],
    row_titles: list[str],
    *,
    suptitle: str,
    scale: str,
    size: float = 1.8,
):
    """One row per image: the input (titled with row_titles[i]), then one panel per column.

    columns: (header, maps N x H x W in [0,1], overlay: bool, cell_titles: list[str] | None);
    an overlay column paints the map over the input, else the map is shown on its own.
    """
    n = max(len(images), 1)
    title_lines = 1 + max(
        [r.count("\n") + 1 for r in row_titles]
        + [h.count("\n") + 1 + (c is not None) for h, _, _, c in columns]
    )
    grid = _Panels(
        n,
        1 + len(columns),
        size,
        title_h=0.13 * title_lines + 0.05,
        top=0.12 + 0.17 * (suptitle.count("\n") + 1),
    )
    for i in range(len(images)):
        grid.show(i, 0, images[i])
        grid.title(i, 0, row_titles[i], fontsize=7)
        for c, (header, maps, overlay, cell_titles) in enumerate(columns, start=1):
            grid.show(i, c, heat_overlay(images[i], maps[i]) if overlay else maps[i], cmap=HEAT_CMAP)
            grid.title(i, c, header if cell_titles is None else f"{header}\n{cell_titles[i]}", fontsize=7)
    if any(not overlay for _, _, overlay, _ in columns):
        _heat_colorbar(grid, scale)
    else:
        grid.bar_ax.axis("off")
    grid.suptitle(suptitle, fontsize=9)
    return grid.done()


def randomization_figure(curves: dict[str, list[tuple[str, float]]], title: str = ""):
    """Mean Spearman rho (trained-model map vs randomised-model map) after each cumulative
    re-initialisation step, one line per method: {method: [("original", rho), ("fc", rho), ...]}."""
    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    steps = []
    for method, points in curves.items():
        steps = [s for s, _ in points] if len(points) > len(steps) else steps
        ax.plot(range(len(points)), [r for _, r in points], marker="o", label=method)
    ax.axhline(0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(steps)), steps)
    ax.set_ylim(min(-0.2, ax.get_ylim()[0]), 1.05)
    ax.set_xlabel("re-initialised so far (cumulative, from the output layer down to the input)")
    ax.set_ylabel("Spearman rho with the trained\nmodel's map (mean over images)")
    ax.legend(fontsize=8)
    ax.set_title(
        title or "Model-randomisation check: a map that explains the model should fall towards 0", fontsize=9
    )
    return fig


def layer_summary_figure(
    images: list[np.ndarray],
    maps: list[np.ndarray],
    row_labels: list[str],
    *,
    map_labels: list[list[str]],
    suptitle: str = "",
    size: float = 1.1,
):
    """One layer at a glance: a row per image (the input, then its K top maps, K x h x w each
    already scaled to [0,1]), small panels, one colour bar. The compact companion of
    feature_maps_figure's full grid."""
    cols = 1 + max((len(m) for m in maps), default=0)
    grid = _Panels(len(images), cols, size, title_h=0.32, top=0.2 + 0.15 * (suptitle.count("\n") + 1))
    for r, (image, row, label, labels) in enumerate(zip(images, maps, row_labels, map_labels)):
        grid.show(r, 0, image)
        grid.title(r, 0, label, fontsize=6.5, fontweight="bold")
        for c, (m, map_label) in enumerate(zip(row, labels), start=1):
            grid.show(r, c, m, cmap="viridis")
            grid.title(r, c, map_label, fontsize=6.5)
    grid.colorbar("viridis", ["lowest\nin map", "highest\nin map"])
    if suptitle:
        grid.suptitle(suptitle, fontsize=8.5)
    return grid.done()


# ---- the saliency stage's outputs


def display_maps(maps, mode: str, percentile: float) -> tuple:
    """|maps| (N x C x H x W tensor) scaled to [0, 1] per image for the figures: (channels, combined).

    channels: N x C x H x W, one scale shared by an image's channels, so R, G and B panels can be
    compared; combined: N x H x W, the max over channels, scaled on its own.
    """
    m = maps.detach().abs().float().cpu()
    return (
        normalize_maps(m, mode, percentile, per_channel=False),
        normalize_maps(combine_channels(m), mode, percentile),
    )


def labelled_images(shown, classes: list[str]) -> tuple[list[np.ndarray], list[str]]:
    """The shown images (x, paths, labels, pred, prob, as quality.Predicted holds them) de-normalised
    for the figures, and one title each: path, true and predicted class."""
    images = [chw_to_hwc(im) for im in denormalize(shown.x.cpu())]
    titles = [
        f"{path}\ntrue {classes[int(t)]}, predicted {classes[int(g)]} (p={pr:.2f})"
        for path, t, g, pr in zip(shown.paths, shown.labels, shown.pred, shown.prob.tolist())
    ]
    return images, titles


def write_method(
    out: Path,
    name: str,
    *,
    maps,
    shown,
    label: str,
    description: str,
    note: str,
    images: list[np.ndarray],
    titles: list[str],
    normalize: str,
    percentile: float,
) -> None:
    """<out>/arrays/<name>.npz (raw maps, inputs, target, paths), figures/<name>/<stem>.png per image
    (input, |map| per channel, combined, overlay) and figures/<name>.png (all images in rows).
    maps: the raw maps of the `shown` images (quality.Predicted); images and titles: labelled_images();
    normalize and percentile: the display scale (display_maps).

    Figures and arrays live apart so figures/ holds only images: dvc.yaml declares it as one image plot."""
    (out / "figures" / name).mkdir(parents=True)
    (out / "arrays").mkdir(exist_ok=True)
    np.savez(
        out / "arrays" / f"{name}.npz",
        maps=maps.numpy().astype(np.float32),
        target=shown.pred.numpy(),
        inputs=shown.x.cpu().numpy().astype(np.float32),
        paths=np.array(shown.paths),
    )
    look = {"label": label, "note": note, "normalize": normalize, "percentile": percentile}
    stems = unique_stems(shown.paths)
    titles_each = [f"{label} ({description})\n{t}" for t in titles]
    combined = write_saliency_figures(
        out / "figures" / name, maps, images, titles=titles_each, stems=stems, **look
    )
    scale = scale_label(normalize, percentile)
    columns = [
        (f"{label} map\n({note})", combined.numpy(), False, None),
        ("overlay (colour = salient)", combined.numpy(), True, None),
    ]
    suptitle = f"{label} saliency for each image's predicted class\n({description})"
    save_figure(
        saliency_rows_figure(images, columns, titles, suptitle=suptitle, scale=scale),
        out / "figures" / f"{name}.png",
    )


def write_saliency_figures(
    folder: Path,
    maps,
    images: list[np.ndarray],
    *,
    titles: list[str],
    stems: list[str],
    label: str,
    note: str,
    normalize: str,
    percentile: float,
):
    """One saliency figure per image, `folder`/<stem>.png (input, |map| per channel, combined, overlay),
    the raw maps N x C x H x W scaled for display by display_maps(normalize, percentile). Returns the
    combined maps, N x H x W in [0, 1]."""
    channels, combined = display_maps(maps, normalize, percentile)
    scale = scale_label(normalize, percentile)
    for i, stem in enumerate(stems):
        figure = saliency_figure(
            images[i],
            channels[i].numpy(),
            combined[i].numpy(),
            title=titles[i],
            method=label,
            scale=scale,
            map_note=note,
        )
        save_figure(figure, folder / f"{stem}.png")
    return combined


def before_after_figure(
    columns: list[tuple],
    *,
    arch: str,
    source: str | None,
    classes: list[str],
    images: list[np.ndarray],
    titles: list[str],
    normalize: str,
    percentile: float,
):
    """The same images explained by the untuned network (where finetune starts) and by the fine-tuned
    one, each for its own predicted class. columns: (header, raw maps N x C x H x W, predicted class N,
    its probability N); images, titles, normalize, percentile: as write_method's; source: where
    the untuned weights came from (weights.json's source; "none" = random init)."""
    shown = [
        (
            header,
            display_maps(maps, normalize, percentile)[1].numpy(),
            False,
            [f"predicts {classes[int(c)]} (p={q:.2f})" for c, q in zip(pred, prob.tolist())],
        )
        for header, maps, pred, prob in columns
    ]
    origin = (
        "random init, model.weights: none" if source == "none" else f"{source} weights + a new random head"
    )
    return saliency_rows_figure(
        images,
        shown,
        titles,
        suptitle=f"Before vs after fine-tuning: the untuned {arch} "
        f"({origin}) vs the fine-tuned model,\neach explaining its own predicted class",
        scale=scale_label(normalize, percentile),
    )


def randomization_title(n: int, skipped: list[str]) -> str:
    """The randomisation figure's title: n images checked; `skipped` the labels of the methods not run."""
    title = (
        f"Model-randomisation check on {n} val images: layers re-initialised one after another;\n"
        "a map that explains the model should fall towards 0"
    )
    return title + (f" (not run on this CPU, too costly: {', '.join(skipped)})" if skipped else "")


def write_randomization(out: Path, curves: dict, *, labels: dict, images: int, skipped: list[str]) -> None:
    """<out>/randomization.csv, one column per method so DVC draws one line per method, and
    figures/randomization.png. curves: {method: [(layer, rho), ...]}; labels: {method: figure label}."""
    first = next(iter(curves.values()))
    rows = [
        {"step": step, "layer": layer, **{name: curve[step][1] for name, curve in curves.items()}}
        for step, (layer, _) in enumerate(first)
    ]
    write_csv(out / "randomization.csv", rows)
    title = randomization_title(images, [labels[k] for k in skipped])
    figure = randomization_figure({labels[k]: c for k, c in curves.items()}, title)
    save_figure(figure, out / "figures" / "randomization.png")


def quality_figure(table: list[dict], *, labels: dict, headers: dict, baselines, title: str):
    """A quality table as a figure: one row per method or baseline in the table's order (shaded: the
    `baselines`), one column per score of `headers` ({metric: column title}) that the table holds, each
    cell `mean [low, high]`. table: quality.quality_table()'s rows (method, metric, mean, low, high)."""
    metrics = [m for m in headers if m in {r["metric"] for r in table}]
    names = list(dict.fromkeys(r["method"] for r in table))
    cells = {(r["method"], r["metric"]): f"{r['mean']:.3f} [{r['low']:.2f}, {r['high']:.2f}]" for r in table}
    text = [[cells.get((n, m), "n/a") for m in metrics] for n in names]
    fig, ax = plt.subplots(figsize=(1.55 * len(metrics) + 1.6, 0.3 * len(names) + 0.9))
    ax.axis("off")
    grid = ax.table(
        cellText=text,
        rowLabels=[labels.get(n, n) for n in names],
        colLabels=[headers[m] for m in metrics],
        loc="center",
        cellLoc="center",
    )
    grid.auto_set_font_size(False)
    grid.set_fontsize(7.5)
    grid.scale(1, 1.25)
    for row, name in enumerate(names, start=1):
        for col in range(-1, len(metrics)):
            if name in baselines:
                grid[row, col].set_facecolor("#e6e6e6")
    ax.set_title(title, fontsize=9)
    return fig


def write_quality(
    out: Path, table: list[dict], *, labels: dict, headers: dict, baselines, images: int, sorted_by: str
):
    """<out>/quality.csv (the table's rows as they are) and figures/quality.png (quality_figure);
    `sorted_by` names the score the table's order follows."""
    write_csv(out / "quality.csv", table)
    title = (
        f"Explanation quality on {images} val images, sorted by {sorted_by} (best first): mean [95% "
        "bootstrap interval];\nshaded: baselines that know nothing of the model"
    )
    figure = quality_figure(table, labels=labels, headers=headers, baselines=baselines, title=title)
    save_figure(figure, out / "figures" / "quality.png")


# ---- the activations stage's outputs

COMPACT_MAPS = (
    8  # maps per image in the per-layer figure: enough to see the kind of feature, small on the page
)


def activation_grid_figure(
    image: np.ndarray, top, *, max_maps: int, layer: str, title: str, image_label: str
):
    """One image's maps of one layer: its top max_maps by mean activation (top: hooks.TopMaps, highest
    first, each min-max scaled), after the input image (H x W x 3 in [0, 1])."""
    c, h, w = top.shape
    maps = top.maps[:max_maps]
    labels = [
        f"#{r + 1}: channel {ch}\nmean {m:.3g}"
        for r, (ch, m) in enumerate(zip(top.channels, top.means[: len(maps)]))
    ]
    return feature_maps_figure(
        image,
        maps,
        labels,
        image_label=image_label,
        suptitle=f"{title}\nlayer {layer}: {c} feature maps of {h} x {w} pixels - top {len(maps)} of {c} maps by "
        "mean activation,\neach scaled to its own min-max (dark = lowest, bright = highest value in that "
        "map; not comparable across maps)",
    )


def write_activation_grids(
    out: Path, records, *, chosen, classes: list[str], input_size: int, max_maps: int
) -> dict:
    """<out>/grids/<image>/<layer>.png for the chosen images (a split: paths, labels), from `records`:
    per image, in order, (de-normalised input 3 x H x W, class probabilities, {layer: hooks.TopMaps}).
    Returns the rows of the compact per-layer figures (write_layer_figures)."""
    folders, compact = unique_stems(chosen.paths), {}
    bar = tqdm(
        records, total=len(chosen.paths), desc="activation grids", unit="image", leave=False, disable=None
    )
    for i, (shown, proba, layers) in enumerate(bar):
        (out / "grids" / folders[i]).mkdir(parents=True)  # only images: one DVC image plot
        truth, guess = classes[int(chosen.labels[i])], classes[int(proba.argmax())]
        image = chw_to_hwc(shown)
        for layer, top in layers.items():
            figure = activation_grid_figure(
                image,
                top,
                max_maps=max_maps,
                layer=layer,
                title=f"{chosen.paths[i].split('/')[-1]}  (true: {truth}, predicted: {guess})",
                image_label=f"input {input_size}x{input_size} (centre crop)\npredicted {guess}, p={proba.max():.2f}",
            )
            save_figure(figure, out / "grids" / folders[i] / f"{layer}.png")
            n = min(COMPACT_MAPS, len(top.maps))
            labels = [f"ch {ch}, mean {m:.2g}" for ch, m in zip(top.channels[:n], top.means[:n])]
            compact.setdefault(layer, []).append(
                (image, top.maps[:n], f"{folders[i]}: {truth}, predicted {guess}", labels)
            )
    return compact


def write_layer_figures(out: Path, compact: dict, *, arch: str) -> None:
    """<out>/layers/<layer>.png: every chosen image's top maps of that layer in one small figure."""
    (out / "layers").mkdir()
    for layer, kept in compact.items():
        images, maps, labels, map_labels = (list(col) for col in zip(*kept))
        c, h, w = kept[0][1].shape
        title = f"{arch} {layer}: top {c} maps by mean activation per image ({h} x {w} pixels each, own min-max scale)"
        save_figure(
            layer_summary_figure(images, maps, labels, map_labels=map_labels, suptitle=title),
            out / "layers" / f"{layer}.png",
        )


def write_layer_statistics(out: Path, stats: dict, *, arch: str, n_images: int) -> None:
    """<out>/sparsity.csv (layer, sparsity, mean: the plots page's bar chart) and sparsity.png."""
    rows = [{"layer": layer, "sparsity": s["sparsity"], "mean": s["mean"]} for layer, s in stats.items()]
    write_csv(out / "sparsity.csv", rows)
    figure = layer_stats_figure(
        [r["layer"] for r in rows],
        [r["sparsity"] for r in rows],
        [r["mean"] for r in rows],
        title=f"{arch} activations over {n_images} val images",
    )
    save_figure(figure, out / "sparsity.png")


# ---- comparing losses (cnnlens/compare.py)


def tradeoff_figure(table: list[dict], method: str, *, x: str = "accuracy", y: str = "pointing_game"):
    """One point per row of `table` (a loss: compare.comparison_table()'s rows as dicts) at (x, y) with
    its 95% interval bars both ways; falls back to insertion AUC when the data has no object masks (no
    pointing game)."""
    y = y if any(y in r for r in table) else "insertion_auc"
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    for i, r in enumerate(table):
        xerr = [[r[x] - r[f"{x}_low"]], [r[f"{x}_high"] - r[x]]]
        yerr = [[r[y] - r[f"{y}_low"]], [r[f"{y}_high"] - r[y]]]
        ax.errorbar(r[x], r[y], xerr=xerr, yerr=yerr, fmt="o", capsize=4, color=f"C{i}", label=r["loss"])
        ax.annotate(r["loss"], (r[x], r[y]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel(f"val {x.replace('_', ' ')} (95% bootstrap interval)")
    ax.set_ylabel(f"{method} {y.replace('_', ' ')} (95% bootstrap interval)")
    ax.set_title("Classification vs. explanation quality, one point per loss", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return fig


def saliency_by_loss_figure(
    images: np.ndarray, maps: dict, row_labels: list[str], *, method: str, scale: float, size: float = 1.6
):
    """Rows: the same val images (N x H x W x 3 in [0,1]); columns: the input, then its map under
    each loss (dict loss -> N x H x W in [0,1], all divided by one value `scale`), so brightness
    compares across losses."""
    shown = images
    cols = 1 + len(maps)
    grid = _Panels(len(shown), cols, size, title_h=0.3, top=0.55)
    for r, image in enumerate(shown):
        grid.show(r, 0, image)
        grid.title(r, 0, row_labels[r][:24], fontsize=7)
        for c, (loss, m) in enumerate(maps.items(), start=1):
            grid.show(r, c, m[r].numpy(), cmap=HEAT_CMAP)
            grid.title(r, c, loss if r == 0 else "", fontsize=8, fontweight="bold")
    grid.colorbar(
        HEAT_CMAP, ["0", f"{scale:.2g}\nand above"], f"|{method}|, max over R, G, B (one scale for all)"
    )
    grid.suptitle(
        f"The same val images, {method} saliency of the predicted class under each loss\n"
        "one shared scale: 1 = the 99th percentile of every map in this figure",
        fontsize=9,
    )
    return grid.done()
