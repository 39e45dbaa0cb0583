"""Explanation-quality metrics for saliency maps, each with a baseline to compare against.

- deletion / insertion curves and AUCs (Petsiuk et al. 2018, RISE): does removing the pixels a
  map ranks highest make the class probability fall fast, and inserting them make it rise fast?
- random and centre-prior maps: the scores a map that knows nothing gets.
- cascading model randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps"): a map
  that hardly changes when the weights are destroyed does not explain the trained model.
- pointing game and mass inside the object mask, when object masks exist (synthetic data).
- bootstrap confidence intervals for every mean (scipy.stats.bootstrap).
- score_methods: every saliency method and both baselines scored by one function, score_maps (a
  baseline is one more source of maps), on val images in bounded-memory chunks; the results as the
  saliency stage reports them (headline_metrics, quality_table, quality_table_text).

Maps here are "combined" maps, N x H x W (an N x C x H x W map is combined by the max over
channels first, as in cnnlens.tensors.combine_channels). Functions take plain values (no params
objects): the library runs without params.yaml. Pure library code: no disk I/O.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse, stats
from scipy.sparse import linalg as splinalg
from torch import Tensor, nn
from tqdm import tqdm

from cnnlens.attribution import METHODS, explain, ig_completeness
from cnnlens.model import predictions
from cnnlens.tensors import center_crop, combine_channels, eval_inputs, gaussian_blur


def pixel_order(maps: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """N x HW pixel indices, most salient first. Ties are broken at random with `generator`,
    else in raster order (stable sort), so a constant map deletes from the top-left corner."""
    flat = combine_channels(maps.detach()).flatten(1).float()
    if generator is None:
        return torch.sort(flat, dim=1, descending=True, stable=True).indices
    perm = torch.randperm(flat.shape[1], generator=generator, device=generator.device).to(flat.device)
    order = torch.sort(flat[:, perm], dim=1, descending=True, stable=True).indices
    return perm[order]


def default_blur(side: int) -> tuple[int, float]:
    """(kernel_size, sigma) of the insertion start's Gaussian blur: an odd kernel about 1/8 of
    the image side (29 px at 224), sigma a quarter of it, so objects become unrecognisable
    blobs while the image's colours stay."""
    k = 2 * max(1, side // 16) + 1
    return k, k / 4.0


DELETION_VALUE = 0.0  # deleted pixels: the ImageNet mean colour in the normalised input space


def deletion_insertion_passes(steps: int) -> int:
    """The points per image of deletion_insertion()'s curves, (steps + 1) each: a forward each, but the
    three that do not depend on the map (curve_ends) are shared by every map of the same images."""
    return 2 * (steps + 1)


def insertion_start_of(
    x: Tensor, *, kernel_size: int | None = None, blur_sigma: float | None = None
) -> Tensor:
    """The insertion curve's default start: x blurred (default_blur, or the kernel and sigma given)."""
    k, sigma = default_blur(min(x.shape[-2:]))
    k = kernel_size if kernel_size is not None else k
    sigma = blur_sigma if blur_sigma is not None else sigma
    return gaussian_blur(x, kernel_size=k, sigma=sigma)


def even_chunks(items: Tensor, batch_size: int) -> tuple:
    """`items` in the fewest chunks of at most batch_size, of even sizes (17 by 8: 6, 6, 5): a forward of one
    image may take other kernels than a batch's and differ in the last bits, so an image's score would
    depend on how many images were scored with it."""
    return items.tensor_split(math.ceil(len(items) / batch_size)) if len(items) else ()


@torch.no_grad()
def curve_ends(model: nn.Module, x: Tensor, *, start: Tensor, deletion_value: float, batch_size: int) -> dict:
    """The softmax probabilities (rows x classes) at the curves' ends, which no map changes: `image` (x,
    deletion's first step and insertion's last), `start` (insertion's first) and `deleted` (deletion's
    last: one constant image, the same for every image, 1 row). Two forwards per image and one more, in
    even_chunks of batch_size."""
    n = x.shape[0]
    images = torch.cat([x, start.to(x).expand_as(x), torch.full_like(x[:1], deletion_value)])
    probs = torch.cat(
        [torch.softmax(model(chunk).float(), dim=1) for chunk in even_chunks(images, batch_size)]
    )
    return {"image": probs[:n], "start": probs[n : 2 * n], "deleted": probs[2 * n :]}


def _curve(
    model,
    before: Tensor,
    after: Tensor,
    *,
    ends: tuple,
    rank: Tensor,
    counts: Tensor,
    idx: Tensor,
    batch_size: int,
):
    """N x (steps+1) probabilities of class idx: image i at step k is `after` where the pixel's rank is
    below counts[k], else `before`; the first and last steps are the ends' (curve_ends: first, last,
    rows x classes); the (image, step) pairs between run in even_chunks of batch_size."""
    n, steps, (h, w) = before.shape[0], len(counts) - 1, before.shape[-2:]
    probs = torch.empty(n, steps + 1, device=before.device)
    first, last = (end.to(before.device).expand(n, -1).gather(1, idx[:, None])[:, 0] for end in ends)
    probs[:, 0], probs[:, steps] = first, last
    inner = max(steps - 1, 0)
    for chunk in even_chunks(torch.arange(n * inner, device=before.device), batch_size):
        i, k = chunk // inner, chunk % inner + 1
        changed = (rank[i] < counts[k][:, None]).view(-1, 1, h, w)
        batch = torch.where(changed, after[i], before[i])
        probs[i, k] = torch.softmax(model(batch).float(), dim=1).gather(1, idx[i][:, None])[:, 0]
    return probs


@torch.no_grad()
def deletion_insertion(
    model: nn.Module,
    inputs: Tensor,
    target,
    *,
    maps: Tensor,
    steps: int = 16,
    blur_sigma: float | None = None,
    kernel_size: int | None = None,
    deletion_value: float = DELETION_VALUE,
    insertion_start: Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    ends: dict | None = None,
) -> dict:
    """Deletion and insertion curves and their AUCs (Petsiuk et al. 2018).

    Pixels (all three channels together) are ranked by the combined map. At step k of
    0..steps the top round(k/steps * H*W) pixels are changed:
    - deletion: set to `deletion_value` in the normalised input space; the default 0.0 is the
      ImageNet mean colour (a grey-brown image), not black. A good map: the probability falls fast,
      low AUC.
    - insertion: start from `insertion_start` (default: a Gaussian blur of the image, kernel about
      1/8 of the side, see default_blur) and put the original pixels back. A good map: the
      probability rises fast, high AUC.
    The score is the softmax probability of `target`; AUC by the trapezoid rule over the
    fraction of pixels in [0, 1]. The curves' ends do not depend on the map: `ends` (curve_ends() of
    the same model, images and settings) reuses them for another map of the same images; else they
    are computed here. The other N x (steps-1) images of a curve are built lazily and run in forwards
    of `batch_size`. Cost: 2 * (steps - 1) forwards per image, plus 2 per image and 1 for the ends.
    Returns dict(deletion_auc N, insertion_auc N, deletion_curve N x (steps+1),
    insertion_curve N x (steps+1), fractions steps+1).
    """
    model.eval()
    n, c, h, w = inputs.shape
    x = inputs.detach()
    idx = torch.as_tensor(target, device=x.device).long().reshape(-1).expand(n)
    order = pixel_order(maps.to(x.device), generator)
    if order.shape != (n, h * w):
        raise ValueError(f"maps of shape {tuple(maps.shape)} do not match inputs {tuple(inputs.shape)}")
    # rank[i, p] = position of pixel p in image i's order; pixel p is changed at step k iff rank < count[k]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=x.device).expand(n, -1))
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    counts = torch.round(fractions * (h * w)).long().to(x.device)

    if insertion_start is None:
        insertion_start = insertion_start_of(x, kernel_size=kernel_size, blur_sigma=blur_sigma)
    start = insertion_start.to(x).expand_as(x)
    deleted = torch.full_like(x, deletion_value)
    if ends is None:
        ends = curve_ends(model, x, start=start, deletion_value=deletion_value, batch_size=batch_size)

    steps_at = {"rank": rank, "counts": counts, "idx": idx, "batch_size": batch_size}
    del_curve = _curve(model, x, deleted, ends=(ends["image"], ends["deleted"]), **steps_at)
    ins_curve = _curve(model, start, x, ends=(ends["start"], ends["image"]), **steps_at)
    fx = fractions.to(x.device, torch.float32)
    return {
        "deletion_auc": torch.trapezoid(del_curve, fx, dim=1),
        "insertion_auc": torch.trapezoid(ins_curve, fx, dim=1),
        "deletion_curve": del_curve,
        "insertion_curve": ins_curve,
        "fractions": fx,
    }


# ---- ROAD: remove and debias (Rong et al. 2022)

# ROAD's imputation weights (the authors' code, as pytorch-grad-cam copies it): a removed pixel is the
# weighted mean of its in-image neighbours, 1/6 for the four direct ones and 1/12 for the diagonals.
ROAD_NEIGHBOURS = (
    ((1, 1), 1 / 12),
    ((0, 1), 1 / 6),
    ((-1, 1), 1 / 12),
    ((1, -1), 1 / 12),
    ((0, -1), 1 / 6),
    ((-1, -1), 1 / 12),
    ((1, 0), 1 / 6),
    ((-1, 0), 1 / 6),
)
ROAD_NOISE = 0.01  # std of the noise added to imputed pixels, in normalised input units (the authors')


@dataclass(frozen=True)
class ImputationSystem:
    """noisy_linear_impute's sparse SPD system M v = b for one removal mask, M factorised: all of it but the
    image, so images removed the same way (the centre prior's ranking is every image's) share one
    factorisation. lu: scipy's SuperLU of M; idx: the removed pixels (flat); known: per ROAD_NEIGHBOURS
    direction, (weight, the rows of b with a known neighbour there, that neighbour's flat index)."""

    lu: splinalg.SuperLU
    idx: np.ndarray
    known: tuple


def imputation_system(removed: np.ndarray) -> ImputationSystem | None:
    """The system of the removed pixels (`removed`, H x W bool): M = diag(weight of the in-image
    neighbours) - weights between removed neighbours, factorised (SuperLU, float64). None where no pixel
    is removed; at least one must be kept (with none, no pixel is known and M is singular)."""
    if not removed.any():
        return None
    if removed.all():
        raise ValueError("noisy_linear_impute: every pixel is removed; keep at least one")
    h, w = removed.shape
    rem = removed.reshape(-1)
    idx = np.flatnonzero(rem)
    m = len(idx)
    var = np.full(h * w, -1)
    var[idx] = np.arange(m)
    y, x = idx // w, idx % w
    rows, cols, vals, known = [np.arange(m)], [np.arange(m)], [], []
    diag = np.zeros(m)
    for (dy, dx), weight in ROAD_NEIGHBOURS:
        ny, nx = y + dy, x + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        nb = np.where(inside, ny * w + nx, 0)
        diag += weight * inside
        unknown = inside & rem[nb]
        rows.append(np.flatnonzero(unknown))
        cols.append(var[nb[unknown]])
        vals.append(np.full(int(unknown.sum()), -weight))
        found = inside & ~rem[nb]
        known.append((weight, np.flatnonzero(found), nb[found]))
    entries = np.concatenate([diag, *vals])
    matrix = sparse.csc_matrix((entries, (np.concatenate(rows), np.concatenate(cols))), shape=(m, m))
    lu = splinalg.splu(matrix, permc_spec="MMD_AT_PLUS_A", options={"SymmetricMode": True})
    return ImputationSystem(lu, idx, tuple(known))


def impute(
    image: Tensor, system: ImputationSystem | None, *, noise: float = ROAD_NOISE, generator=None
) -> Tensor:
    """noisy_linear_impute of one image (C x H x W) with its mask's system (imputation_system): b = the
    weighted known neighbours, one column per channel, solved, plus N(0, noise^2) from `generator`."""
    img = image.detach().cpu()
    out = img.clone()
    if system is None:
        return out
    flat = img.double().numpy().reshape(img.shape[0], -1)
    b = np.zeros((len(system.idx), flat.shape[0]))
    for weight, rows, neighbours in system.known:
        b[rows] += weight * flat[:, neighbours].T
    values = torch.from_numpy(system.lu.solve(b).T.copy()).to(img.dtype)  # C x m
    if noise:
        values += noise * torch.randn(values.shape, generator=generator, dtype=img.dtype)
    out.view(img.shape[0], -1)[:, torch.from_numpy(system.idx)] = values
    return out


def noisy_linear_impute(
    image: Tensor, removed: Tensor, *, noise: float = ROAD_NOISE, generator: torch.Generator | None = None
) -> Tensor:
    """ROAD's noisy linear imputation of one image (C x H x W): every pixel where `removed` (H x W, bool)
    becomes the weighted mean of its in-image neighbours (ROAD_NEIGHBOURS), known or themselves removed,
    all removed pixels solved as one sparse linear system (scipy's SuperLU, float64), plus N(0, noise^2)
    per channel from `generator`. Kept pixels are unchanged. The result is on the CPU; at least one pixel
    must be kept (with none, no pixel is known and the system is singular)."""
    system = imputation_system(removed.detach().cpu().bool().numpy())
    return impute(image, system, noise=noise, generator=generator)


def road_fractions(steps: int) -> Tensor:
    """The shares of pixels ROAD removes: k / (steps + 1) for k = 1..steps (9 steps: 10%, 20% .. 90%,
    the paper's and pytorch-grad-cam's percentiles), float64."""
    return torch.arange(1, steps + 1, dtype=torch.float64) / (steps + 1)


def road_passes(steps: int) -> int:
    """Forward passes per image of road(): one per removal fraction and order."""
    return 2 * steps


def _road_images(x: Tensor, rank: Tensor, counts: Tensor, *, noise: float, seed: int):
    """(image i, order, step k, imputed image) for every image, MoRF then LeRF, every count: MoRF removes
    the counts[k] top-ranked pixels, LeRF the counts[k] lowest-ranked. Each image's noise comes from a
    generator seeded with `seed`. Images ranked alike (the centre prior's) have the same masks: their
    factorisations (2 x steps; at 224 px and 9 steps about 0.2 GB more peak memory) are kept until the last
    such image."""
    hw = rank.shape[1]
    _, group, repeats = torch.unique(rank, dim=0, return_inverse=True, return_counts=True)
    last = {g: i for i, g in enumerate(group.tolist())}
    shared: dict = {}  # (group, order, step) -> ImputationSystem
    for i, g in enumerate(group.tolist()):
        generator = torch.Generator().manual_seed(seed)
        for j, most in enumerate((True, False)):
            for k, count in enumerate(counts.tolist()):
                if (g, j, k) in shared:
                    system = shared[(g, j, k)]
                else:
                    removed = rank[i] < count if most else rank[i] >= hw - count
                    system = imputation_system(removed.view(x.shape[-2:]).numpy())
                    if repeats[g] > 1:
                        shared[(g, j, k)] = system
                yield i, j, k, impute(x[i], system, noise=noise, generator=generator)
        if last[g] == i:
            shared = {key: s for key, s in shared.items() if key[0] != g}


@torch.no_grad()
def road(
    model: nn.Module,
    inputs: Tensor,
    target,
    *,
    maps: Tensor,
    steps: int = 9,
    noise: float = ROAD_NOISE,
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    """ROAD, remove and debias (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
    Attribution Methods"): the pixels are ranked by the combined map (pixel_order: ties at random, from a
    generator seeded with `seed`, as in deletion), a share road_fractions(steps) of them is removed and
    filled in by noisy linear imputation (noisy_linear_impute; each image's noise from a generator seeded
    with `seed`, so its scores do not depend on the images batched with it), which leaks far less of
    the removed shape to the model than deletion's constant colour does; then the softmax probability of
    `target`. MoRF removes the most relevant pixels first (a good map: the probability falls: low),
    LeRF the least relevant (a good map: it stays: high). Per image, the mean over the fractions is the
    score (pytorch-grad-cam's ROAD*Average, less the unperturbed score it subtracts). Imputed images run
    in forwards of batch_size. Cost: 2 * steps forwards and sparse solves per image.
    Returns dict(morf N, lerf N, morf_curve N x steps, lerf_curve N x steps, fractions steps)."""
    model.eval()
    n, _, h, w = inputs.shape
    idx = torch.as_tensor(target, device=inputs.device).long().reshape(-1).expand(n)
    order = pixel_order(maps.to(inputs.device), torch.Generator().manual_seed(seed)).cpu()
    if order.shape != (n, h * w):
        raise ValueError(f"maps of shape {tuple(maps.shape)} do not match inputs {tuple(inputs.shape)}")
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w).expand(n, -1))
    fractions = road_fractions(steps)
    counts = torch.round(fractions * (h * w)).long()
    curves = torch.empty(n, 2, steps)
    jobs = _road_images(inputs.detach().cpu(), rank, counts, noise=noise, seed=seed)
    while chunk := list(itertools.islice(jobs, batch_size)):
        i, j, k, images = zip(*chunk)
        batch = torch.stack(images).to(inputs.device, inputs.dtype)
        probs = torch.softmax(model(batch).float(), dim=1).gather(1, idx[list(i)][:, None])[:, 0]
        curves[list(i), list(j), list(k)] = probs.cpu()
    return {
        "morf": curves[:, 0].mean(1),
        "lerf": curves[:, 1].mean(1),
        "morf_curve": curves[:, 0],
        "lerf_curve": curves[:, 1],
        "fractions": fractions,
    }


def random_maps(n: int, h: int, w: int, *, generator: torch.Generator | None = None) -> Tensor:
    """N x H x W uniform noise: the baseline of a map that knows nothing."""
    return torch.rand(n, h, w, generator=generator)


def center_prior_maps(n: int, h: int, w: int, *, sigma_frac: float = 0.25) -> Tensor:
    """N x H x W isotropic Gaussian centred in the image, std = sigma_frac * min(h, w).

    Photos put the object in the middle; a map has to beat this to show it looks at the object
    rather than at the centre.
    """
    y = torch.arange(h, dtype=torch.float32) - (h - 1) / 2
    x = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
    s = sigma_frac * min(h, w)
    g = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * s * s))
    return g.expand(n, h, w).clone()


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each row pair (N x ... flattened per row), N values (float64).

    scipy.stats.spearmanr per row. Where a map is constant the correlation is undefined (scipy: nan
    and a warning); here it is 0, since such a map ranks nothing.
    """
    a, b = a.detach().flatten(1).cpu().numpy(), b.detach().flatten(1).cpu().numpy()
    out = torch.zeros(a.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        if a[i].min() < a[i].max() and b[i].min() < b[i].max():
            out[i] = float(stats.spearmanr(a[i], b[i]).statistic)
    return out


def default_layer_order(model: nn.Module) -> list[str]:
    """Cascading randomisation order, output to input.

    ResNet: fc, layer4, layer3, layer2, layer1, conv1+bn1 (the stem's conv and its batch norm
    together). Others: the top-level children that have parameters in reverse, with a
    `features` Sequential split into its blocks (MobileNet, EfficientNet).
    """
    if all(hasattr(model, name) for name in ("fc", "layer4", "layer1", "conv1")):
        return ["fc", "layer4", "layer3", "layer2", "layer1", "conv1+bn1"]
    names = []
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if name == "features" and isinstance(child, nn.Sequential):
            names += [
                f"features.{i}" for i, block in enumerate(child) if any(True for _ in block.parameters())
            ]
        else:
            names.append(name)
    return names[::-1]


def reinitialize(module: nn.Module) -> None:
    """Re-draw every parameter of `module` with its layer's own initialiser (reset_parameters;
    batch norms also reset their running statistics). Uses the global RNG: seed around it."""
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        elif hasattr(m, "reset_running_stats"):
            m.reset_running_stats()


def randomization_check(
    model: nn.Module,
    inputs: Tensor,
    target,
    *,
    method_fn,
    layer_order=None,
    seed: int = 0,
    absolute: bool = True,
) -> list[tuple[str, float]]:
    """Cascading model-parameter randomisation (Adebayo et al. 2018).

    A deep copy of the model has its layers re-initialised one group after another, from the
    output (fc) down to the input (conv1), cumulatively; after each step the maps for the same
    images and the same `target` (the trained model's predictions) are recomputed with
    `method_fn(model, inputs, target)` and compared with the trained model's maps by the
    Spearman rank correlation of the combined maps (per image, then the mean; of |map| when
    `absolute`, as Adebayo et al. do for their main figures). A map that does explain the
    model decorrelates quickly. The first entry, ("original", rho), compares the unmodified copy
    with the model: about 1 for a deterministic method. For SmoothGrad pass a `method_fn` that
    makes a fresh generator with a fixed seed on every call, so noise does not count as change.
    `layer_order`: module names (see default_layer_order); "a+b" randomises a and b in one step.
    Each step's re-initialisation is seeded with seed + step, without touching the global RNG.
    The original model's parameters and buffers are not changed. Cost: (1 + steps + 1) x method.
    """
    order = default_layer_order(model) if layer_order is None else list(layer_order)

    def combined(m):
        maps = combine_channels(method_fn(m, inputs, target).detach())
        return maps.abs() if absolute else maps

    reference = combined(model)
    work = copy.deepcopy(model)
    devices = sorted({p.device.index or 0 for p in work.parameters() if p.device.type == "cuda"})
    results = [("original", float(spearman(reference, combined(work)).mean()))]
    for step, group in enumerate(order, start=1):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + step)
            for name in group.split("+"):
                reinitialize(work.get_submodule(name))
        results.append((group, float(spearman(reference, combined(work)).mean())))
    return results


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """Bool N: does the combined map's maximum fall on the object (Zhang et al. 2016)?

    The maximum is the first in raster order on ties. `tolerance` grows the mask by that many
    pixels (a square neighbourhood); the original paper used 15 px at 224 px, 0 is the strict
    game.
    """
    m = combine_channels(maps.detach())
    masks = masks.detach().to(m.device)
    if masks.shape != m.shape:
        raise ValueError(f"masks {tuple(masks.shape)} and maps {tuple(m.shape)} differ in shape")
    inside = masks > 0
    if tolerance > 0:
        t = int(tolerance)
        inside = F.max_pool2d(inside.float()[:, None], 2 * t + 1, stride=1, padding=t)[:, 0] > 0
    peak = m.flatten(1).argmax(dim=1)
    return inside.flatten(1).gather(1, peak[:, None])[:, 0]


def mass_inside(maps: Tensor, masks: Tensor) -> Tensor:
    """Share of each combined map's total mass that lies on the object mask, N values in [0, 1].

    Maps must be non-negative (take abs() of signed maps first). An all-zero map scores 0.
    The same share for a uniform map is the mask's area: compare against that.
    """
    m = combine_channels(maps.detach()).float()
    if (m < 0).any():
        raise ValueError("mass_inside needs non-negative maps; take abs() of signed attributions")
    masks = masks.detach().to(m.device)
    if masks.shape != m.shape:
        raise ValueError(f"masks {tuple(masks.shape)} and maps {tuple(m.shape)} differ in shape")
    total = m.flatten(1).sum(1)
    inside = (m * (masks > 0)).flatten(1).sum(1)
    return torch.where(
        total > 0, inside / total.clamp_min(torch.finfo(m.dtype).tiny), torch.zeros_like(total)
    )


def bootstrap_ci(values, *, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Mean and percentile-bootstrap (1 - alpha) interval of the mean: dict(mean, low, high, n).

    scipy.stats.bootstrap, method "percentile": n_resamples resamples with replacement from a numpy
    Generator seeded with `seed`, drawn in batches of a few million indices. One value: the interval
    is that value. No values: all NaN, n = 0.
    """
    v = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64).ravel()
    if v.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    low = high = v[0]  # scipy needs two values; every resample of one value is that value
    if v.size > 1:
        ci = stats.bootstrap(
            (v,),
            np.mean,
            n_resamples=n_resamples,
            batch=max(1, 4_000_000 // v.size),  # bound the index matrix to a few million entries
            vectorized=True,
            confidence_level=1 - alpha,
            method="percentile",
            random_state=np.random.default_rng(seed),
        ).confidence_interval
        low, high = ci.low, ci.high
    return {"mean": float(v.mean()), "low": float(low), "high": float(high), "n": int(v.size)}


def quality_scores(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    *,
    maps: Tensor,
    masks: Tensor | None,
    steps: int,
    seed: int,
    batch_size: int,
    road_steps: int = 0,
    ends: dict | None = None,
) -> dict[str, Tensor]:
    """Per-image scores of N x [C x] H x W maps (abs taken: IG is signed): deletion and insertion
    AUC, with road_steps > 0 ROAD's MoRF and LeRF means, and where object masks exist (N x H x W) the
    pointing game (1 hit, 0 miss) and the share of the map's mass inside the mask. Ties in the pixel order
    (flat maps) are broken at random, the same way for deletion and ROAD (a generator seeded with `seed`
    each); ROAD's noise is seeded with `seed` too. ends: the deletion curves' ends (curve_ends), if known."""
    maps = maps.detach().abs().float().cpu()
    target = torch.as_tensor(target).to(x.device)
    curves = deletion_insertion(
        model,
        x,
        target,
        maps=maps,
        steps=steps,
        generator=torch.Generator().manual_seed(seed),
        batch_size=batch_size,
        ends=ends,
    )
    scores = {"deletion_auc": curves["deletion_auc"].cpu(), "insertion_auc": curves["insertion_auc"].cpu()}
    if road_steps:
        found = road(model, x, target, maps=maps, steps=road_steps, seed=seed, batch_size=batch_size)
        scores.update(road_morf=found["morf"], road_lerf=found["lerf"])
    if masks is not None:
        scores["pointing_game"] = pointing_game(maps, masks.cpu()).float()
        scores["mass_inside"] = mass_inside(maps, masks.cpu())
    return scores


def baseline_maps(kind: str, n: int, *, h: int, w: int, seed: int) -> Tensor:
    """N x H x W maps that know nothing about the model: uniform noise or a centred Gaussian."""
    if kind == "random":
        return random_maps(n, h, w, generator=torch.Generator().manual_seed(seed))
    if kind == "center":
        return center_prior_maps(n, h, w)
    raise ValueError(f"unknown baseline {kind!r}; allowed: random, center")


# ---- scoring saliency methods and baselines on val images (the saliency stage's work)

BASELINES = ("random", "center")
# Quality images on the device at once: quality_images 0 (all of val) scores a large val split chunk by
# chunk in bounded memory. A val split of at most this many is one chunk.
QUALITY_CHUNK = 256
RANDOMIZATION_IMAGES = 8
# The randomisation check reruns a method (layers + 2) = 8 times on 8 images; on a CPU it runs only for
# methods of at most this many passes per image (gradient, Grad-CAM): SmoothGrad and IG would take most
# of the demo's minute. On a GPU it runs for every method.
RANDOMIZATION_MAX_PASSES_CPU = 1


@dataclass
class Predicted:
    """Images on the device with the model's predictions: x (ImageNet-normalised centre crops),
    pred and prob (the max-logit class and its probability), masks (centre-cropped) or None."""

    x: Tensor
    pred: Tensor
    prob: Tensor
    masks: Tensor | None
    paths: list[str]
    labels: Tensor


def predict_images(
    model: nn.Module, split, device, *, input_size: int, loss: str, batch_size: int
) -> Predicted:
    """A prepared split's images (a tensors.Split) on `device`, with the model's predictions."""
    x = eval_inputs(split.images, input_size).to(device)
    pred, prob = predictions(model, x, loss, batch_size=batch_size)
    masks = None if split.masks is None else center_crop(split.masks, input_size)
    return Predicted(x, pred, prob, masks, split.paths, split.labels)


class ScoredImages:
    """The images scored for quality (split rows `index`), as Predicted chunks of at most QUALITY_CHUNK:
    the first is kept (all of a small split, and the randomisation check's images), the others are
    rebuilt on each pass."""

    def __init__(
        self, model: nn.Module, split, device, *, index: Tensor, input_size: int, loss: str, batch_size: int
    ):
        predict = {"input_size": input_size, "loss": loss, "batch_size": batch_size}
        self.chunk = lambda rows: predict_images(model, split.subset(rows), device, **predict)
        self.model, self.index, self.n = model, index, len(index)
        self.first = self.chunk(index[:QUALITY_CHUNK])
        self.masks = self.first.masks
        self._ends: dict = {}  # batch_size -> curve_ends of the first chunk

    def curve_ends(self, model: nn.Module, chunk: Predicted, *, batch_size: int) -> dict | None:
        """curve_ends() of the kept first chunk by the model that predicted it (the deletion curves'
        defaults), computed once for every map scored on it; None for another model or chunk."""
        if chunk is not self.first or model is not self.model:
            return None
        if batch_size not in self._ends:
            x = chunk.x
            start = insertion_start_of(x)
            self._ends[batch_size] = curve_ends(
                model, x, start=start, deletion_value=DELETION_VALUE, batch_size=batch_size
            )
        return self._ends[batch_size]

    def __iter__(self):
        yield self.first
        for start in range(QUALITY_CHUNK, self.n, QUALITY_CHUNK):
            yield self.chunk(self.index[start : start + QUALITY_CHUNK])


def score_maps(
    model: nn.Module,
    scored,
    source,
    *,
    steps: int,
    seed: int,
    batch_size: int,
    bootstrap: int,
    road_steps: int = 0,
    extra=None,
) -> dict:
    """The quality of the maps that `source(model, x, target)` gives for every chunk of `scored`, a
    method's or a baseline's alike: per score (quality_scores), the mean over the images and its 95%
    bootstrap interval. `extra`: more per-image scores, {name: fn(model, chunk, maps) -> N values}, where
    a chunk holds x and pred (the target). A ScoredImages keeps its first chunk's curve ends for every map."""
    raw: dict[str, list[Tensor]] = {}
    ends_of = getattr(scored, "curve_ends", lambda *a, **kw: None)
    for chunk in scored:
        maps = source(model, chunk.x, chunk.pred)
        scores = quality_scores(
            model,
            chunk.x,
            chunk.pred,
            maps=maps,
            masks=chunk.masks,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            road_steps=road_steps,
            ends=ends_of(model, chunk, batch_size=batch_size),
        )
        scores.update({name: fn(model, chunk, maps) for name, fn in (extra or {}).items()})
        for name, v in scores.items():
            raw.setdefault(name, []).append(v)
    return {name: bootstrap_ci(torch.cat(v), n_resamples=bootstrap, seed=seed) for name, v in raw.items()}


def metric_passes(steps: int, road_steps: int = 0) -> dict:
    """The forward and backward passes per image that scoring a map costs (deletion and insertion, ROAD;
    ROAD also solves one sparse system per forward)."""
    passes = {"deletion_insertion": {"forward": deletion_insertion_passes(steps), "backward": 0}}
    if road_steps:
        passes["road"] = {"forward": road_passes(road_steps), "backward": 0}
    return passes


@dataclass
class SaliencyScores:
    """What score_methods found. metrics: per method and baseline, each score's mean and 95% interval,
    the cost and the randomisation rho; maps: per method, its raw maps of the shown images (CPU);
    curves: per method checked, its randomisation curve; skipped: the methods whose check was too
    costly on this device; randomization_images: the images checked (0: no check ran)."""

    metrics: dict = field(default_factory=dict)
    maps: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    randomization_images: int = 0


def score_methods(
    model: nn.Module,
    shown: Predicted,
    scored: ScoredImages,
    *,
    methods: list[str],
    seed: int,
    batch_size: int,
    quality_steps: int,
    bootstrap: int,
    randomization: bool,
    road_steps: int = 0,
    settings: dict | None = None,
) -> SaliencyScores:
    """Every method of `methods` (attribution.METHODS names) and every baseline (BASELINES), each a
    source of maps scored by score_maps on `scored`: deletion/insertion AUC, ROAD (road_steps > 0), and
    the pointing game and mass inside the mask where masks exist, each with its 95% bootstrap interval
    (`bootstrap` resamples). A method also gets its maps of the `shown` images, its cost (passes; seconds
    per shown and scored image, its maps alone and with the scoring), for integrated gradients the
    completeness error and, with `randomization` where affordable, the model-randomisation check.
    `settings`: the methods' settings as attribution.explain() takes them (attribution.SETTINGS)."""
    settings = dict(settings or {})
    quality = functools.partial(
        score_maps,
        model,
        scored,
        steps=quality_steps,
        seed=seed,
        batch_size=batch_size,
        bootstrap=bootstrap,
        road_steps=road_steps,
    )
    found = SaliencyScores()
    for name in tqdm(methods, desc="saliency methods", unit="method", disable=None):
        source = method_source(name, seed=seed, batch_size=batch_size, settings=settings)
        metrics, found.maps[name] = _score_method(
            name, model, shown, scored=scored, source=source, quality=quality, batch_size=batch_size
        )
        metrics["passes"] = method_passes(name, size=shown.x.shape[-1], settings=settings)
        metrics["metric_passes"] = metric_passes(quality_steps, road_steps)
        if "ig_completeness_error" in metrics:
            metrics["ig_completeness_error"] = metrics.pop("ig_completeness_error")  # after the costs
            metrics["metric_passes"]["ig_completeness"] = {"forward": 2, "backward": 0}
        if randomization:
            _add_randomization(found, name, metrics, model=model, scored=scored, source=source, seed=seed)
        found.metrics[name] = metrics
    for kind in BASELINES:
        found.metrics[kind] = {
            **quality(baseline_source(kind, seed=seed)),
            "passes": {"forward": 0, "backward": 0},
            "metric_passes": metric_passes(quality_steps, road_steps),
        }
    found.randomization_images = min(scored.n, RANDOMIZATION_IMAGES) if found.curves else 0
    return found


QUICK_STEPS = 8  # saliency.quick: deletion/insertion steps, at most


def scoring(*, quick: bool, quality_steps: int, road_steps: int, randomization: bool) -> dict:
    """score_methods' quality settings (the saliency section's): as given, or with `quick` at most
    QUICK_STEPS deletion/insertion steps, no ROAD and no randomisation check (minutes at 224 px on a CPU)."""
    if quick:
        return {"quality_steps": min(quality_steps, QUICK_STEPS), "road_steps": 0, "randomization": False}
    return {"quality_steps": quality_steps, "road_steps": road_steps, "randomization": randomization}


def method_passes(name: str, *, size: int, settings: dict) -> dict:
    """Method `name`'s forward and backward passes per image at a size x size input, and in words."""
    m = METHODS[name]
    forward = m.passes(size=size, **settings)
    return {"forward": forward, "backward": forward if m.backward else 0, "what": m.cost}


def _add_randomization(found: SaliencyScores, name: str, metrics: dict, *, model, scored, source, seed: int):
    """Method `name`'s randomisation check into `found` (its curve) and `metrics` (rho, passes), or its
    name into found.skipped where too costly (see _randomization)."""
    passes = metrics["passes"]
    curve = _randomization(model, scored, source=source, passes=passes["forward"], seed=seed)
    if curve is None:
        found.skipped.append(name)
        return
    found.curves[name] = curve
    metrics["randomization_rho"] = curve[-1][1]  # all layers re-initialised
    runs = len(curve) + 1  # per image checked: the model, its copy and each layer group
    metrics["metric_passes"]["randomization"] = {k: passes[k] * runs for k in ("forward", "backward")}


def method_source(name: str, *, seed: int, batch_size: int, settings: dict):
    """Method `name` as a source of maps, (model, x, target) -> maps: attribution.explain()."""
    return lambda model, x, target: explain(
        name, model, x, target=target, seed=seed, batch_size=batch_size, **settings
    )


def baseline_source(kind: str, *, seed: int):
    """Baseline `kind` (random, center) as a source of maps, (model, x, target) -> maps."""
    return lambda model, x, target: baseline_maps(kind, len(x), h=x.shape[-2], w=x.shape[-1], seed=seed)


def _score_method(name: str, model: nn.Module, shown: Predicted, *, scored, source, quality, batch_size: int):
    """One method's maps of the shown images and its scores on the scored ones, timed together
    (seconds_per_image) and the maps alone (method_seconds_per_image, per image it made maps of): a chunk of
    the shown images with their targets (saliency.quick scores those) reuses their maps, which the same
    seeded call would repeat. Returns (metrics, maps)."""
    in_method, computed, known = [], [], {}

    def timed(net, x, target):
        if known and net is model and x.shape == shown.x.shape and torch.equal(x, shown.x):
            if torch.equal(target, shown.pred):
                return known["maps"]
        began = time.perf_counter()
        maps = source(net, x, target)
        in_method.append(time.perf_counter() - began)
        computed.append(len(x))
        return maps

    start = time.perf_counter()
    maps = known["maps"] = timed(model, shown.x, shown.pred)
    extra = None
    if name == "integrated_gradients":
        extra = {
            "ig_completeness_error": lambda net, chunk, m: ig_completeness(
                net, chunk.x, chunk.pred, maps=m, batch_size=batch_size
            )
        }
    scores = quality(timed, extra=extra)
    images = len(shown.x) + scored.n
    seconds = {
        "seconds_per_image": (time.perf_counter() - start) / images,
        "method_seconds_per_image": sum(in_method) / sum(computed),
    }
    return {**scores, "randomization_rho": None, **seconds}, maps


def _randomization(model: nn.Module, scored: ScoredImages, *, source, passes: int, seed: int) -> list | None:
    """One method's model-randomisation curve on the first RANDOMIZATION_IMAGES scored images; None on a
    CPU for a method of more than RANDOMIZATION_MAX_PASSES_CPU passes per image (too costly)."""
    first = scored.first
    if first.x.device.type == "cpu" and passes > RANDOMIZATION_MAX_PASSES_CPU:
        return None
    nr = min(scored.n, RANDOMIZATION_IMAGES)
    return randomization_check(
        model,
        first.x[:nr],
        first.pred[:nr].to(first.x.device),
        method_fn=source,
        layer_order=default_layer_order(model),
        seed=seed,
    )


def before_after_maps(
    untuned: nn.Module,
    model: nn.Module,
    shown: Predicted,
    *,
    maps_of: dict,
    methods: list[str],
    loss: str,
    seed: int,
    batch_size: int,
    settings: dict | None = None,
) -> list[tuple]:
    """The untuned network (where finetune starts) and the fine-tuned `model` on the same shown images,
    each explaining its own predicted class (`loss`'s rule), for gradient and the other one-pass
    methods of `methods`: a map that fine-tuning does not change does not explain the fine-tuned model
    (the randomisation check's question, asked of the training). maps_of: the fine-tuned model's maps
    of the shown images, reused where there. Returns the columns of figures.before_after_figure:
    (header, maps, predicted class, its probability), untuned then fine-tuned, per method."""
    settings = dict(settings or {})
    upred, uprob = predictions(untuned, shown.x, loss, batch_size=batch_size)
    names = ["gradient"] + [n for n in methods if n != "gradient" and METHODS[n].passes(**settings) == 1]
    columns = []
    for name in names:
        source = method_source(name, seed=seed, batch_size=batch_size, settings=settings)
        for who, net, pred, prob in (
            ("untuned", untuned, upred, uprob),
            ("fine-tuned", model, shown.pred, shown.prob),
        ):
            known = who == "fine-tuned" and name in maps_of
            maps = maps_of[name] if known else source(net, shown.x, pred)
            columns.append((f"{who}: {METHODS[name].label}", maps, pred, prob))
    return columns


# ---- the results, as the saliency stage reports them


def _mean(entry: dict, key: str) -> float | None:
    """The mean of score `key`, or None where it does not apply (no such score, or NaN: no images)."""
    value = entry.get(key)
    value = value.get("mean") if isinstance(value, dict) else value
    return None if value is None or not math.isfinite(value) else float(value)


HEADLINE = ("deletion_auc", "pointing_game")  # faithfulness and localisation; the rest: quality.json
# The scores the quality figure compares, how it names them and which way is better (IG's completeness
# error, a check of one method, is in quality.json and quality.csv only).
SCORES = {
    "deletion_auc": "deletion AUC \u2193",
    "insertion_auc": "insertion AUC \u2191",
    "road_morf": "ROAD MoRF \u2193",
    "road_lerf": "ROAD LeRF \u2191",
    "pointing_game": "pointing game \u2191",
    "mass_inside": "mass inside \u2191",
}
# How the tables name the baselines.
BASELINE_LABELS = {"random": "random map (baseline)", "center": "centre prior (baseline)"}
RANK_BY = "deletion_auc"  # the tables' order: best (lowest) first


def headline_metrics(full: dict, *, methods: list[str]) -> dict:
    """The declared metrics (metrics/saliency.json) out of the full results (the stage's quality.json):
    per method of `methods` and the random baseline, the mean deletion AUC and, where object masks exist,
    the mean pointing game; the CAM methods' grid side (gradcam_grid) where one ran; `quick: true` where
    saliency.quick scored less (so `dvc metrics diff` shows it). A score that does not apply is left out,
    never NaN; no timings (they differ per run)."""
    out = {}
    for name in [*methods, "random"]:
        means = {key: _mean(full[name], key) for key in HEADLINE}
        out[name] = {key: v for key, v in means.items() if v is not None}
    if "gradcam_layer" in full:
        out["gradcam_grid"] = full["gradcam_layer"]["grid"][0]
    if full.get("quick"):
        out["quick"] = True
    return out


def _scores(entry: dict) -> list[str]:
    """The scores with an interval in a method's or baseline's entry."""
    return [key for key, v in entry.items() if isinstance(v, dict) and "low" in v]


def ranked(metrics: dict) -> list[str]:
    """The methods and baselines of `metrics` (the entries with scores), best RANK_BY first (those without
    it last, in order)."""
    names = [name for name, entry in metrics.items() if isinstance(entry, dict) and _scores(entry)]
    worst = float("inf")
    return sorted(
        names, key=lambda n: worst if _mean(metrics[n], RANK_BY) is None else _mean(metrics[n], RANK_BY)
    )


def quality_table(metrics: dict) -> list[dict]:
    """One row per method (or baseline) and score with an interval: method, metric, mean, low, high; the
    methods in ranked() order (best deletion AUC first)."""
    return [
        {"method": name, "metric": metric, **{k: metrics[name][metric][k] for k in ("mean", "low", "high")}}
        for name in ranked(metrics)
        for metric in _scores(metrics[name])
    ]


def quality_table_text(metrics: dict) -> str:
    """The log's table of the methods' and baselines' headline scores, best deletion AUC first; n/a where
    a score does not apply (no pointing game without object masks, no ROAD with road_steps 0, no
    randomisation check for a baseline)."""
    columns = (
        ("deletion_auc", "deletion AUC", "(low = good)", ".3f"),
        ("insertion_auc", "insertion AUC", "(high = good)", ".3f"),
        ("road_morf", "ROAD MoRF", "(low = good)", ".3f"),
        ("road_lerf", "ROAD LeRF", "(high = good)", ".3f"),
        ("pointing_game", "pointing", "(hits)", ".2f"),
        ("randomization_rho", "rand. rho", "(low = good)", ".2f"),
    )
    head = [f"  {'method':22}", f"  {'':22}"]
    for _, title, better, _ in columns:
        width = max(len(title), len(better)) + 1
        head = [head[0] + f"{title:>{width}}", head[1] + f"{better:>{width}}"]
    lines = head
    for name in ranked(metrics):
        cells = [f"  {name:22}"]
        for key, title, better, fmt in columns:
            value = _mean(metrics[name], key)
            cells.append(
                f"{'n/a' if value is None else format(value, fmt):>{max(len(title), len(better)) + 1}}"
            )
        lines.append("".join(cells))
    return "\n".join(lines)


def full_results(
    scores: SaliencyScores,
    *,
    shown: Predicted,
    scored: ScoredImages,
    device: str,
    seconds: float,
    cam_layer=None,
    quick: bool = False,
) -> dict:
    """Everything the saliency stage measured (its quality.json): score_methods' metrics per method and
    baseline, then the CAM methods' layer (cam_layer, an attribution.CamLayer: name, grid and what was
    asked, where a CAM method ran), the images, masks, randomisation check, device and the stage's
    seconds; `quick: true` where saliency.quick scored less (absent otherwise)."""
    layer = {}
    if cam_layer is not None and any(name in METHODS and METHODS[name].cam for name in scores.metrics):
        layer = {
            "gradcam_layer": {"name": cam_layer.name, "grid": list(cam_layer.grid), "asked": cam_layer.asked}
        }
    return {
        **scores.metrics,
        **layer,
        "n_images": len(shown.x),
        "n_quality_images": scored.n,
        "masks": scored.masks is not None,
        "randomization_images": scores.randomization_images,
        "randomization_skipped": scores.skipped,
        "device": device,
        "seconds": round(seconds, 2),
        **({"quick": True} if quick else {}),
    }


def summary_text(full: dict) -> str:
    """The saliency stage's closing log, from its full results: what was explained and scored, where, in
    how long, the CAM layer, the randomisation checks skipped, whether quick, then quality_table_text()."""
    masks = " with masks" if full["masks"] else ""
    layer = full.get("gradcam_layer")
    cams = f"; CAM layer {layer['name']} ({layer['grid'][0]} x {layer['grid'][1]})" if layer else ""
    skipped = ", ".join(full["randomization_skipped"])
    note = f"; randomisation check skipped for {skipped} (over {RANDOMIZATION_MAX_PASSES_CPU} pass per image on a CPU)"
    quick = (
        "; quick: quality on the shown images, no ROAD, no randomisation check" if full.get("quick") else ""
    )
    metrics = {name: full[name] for name in ranked(full)}
    return (
        f"saliency: {full['n_images']} images explained, quality on {full['n_quality_images']} val images{masks}, "
        f"{full['device']}, {full['seconds']:.1f} s{cams}{note if skipped else ''}{quick}\n"
        f"{quality_table_text(metrics)}"
    )
