"""Explanation-quality metrics for saliency maps, each with a baseline to compare against.

- deletion / insertion curves and AUCs (Petsiuk et al. 2018, RISE): does removing the pixels a
  map ranks highest make the class probability fall fast, and inserting them make it rise fast?
- random and centre-prior maps: the scores a map that knows nothing gets.
- cascading model randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps"): a map
  that hardly changes when the weights are destroyed does not explain the trained model.
- pointing game and mass inside the object mask, when object masks exist (synthetic data).
- bootstrap confidence intervals for every mean (scipy.stats.bootstrap).

Maps here are "combined" maps, N x H x W (an N x C x H x W map is combined by the max over
channels first, as in cnnlens.tensors.combine_channels). Pure library code: no disk I/O.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur

from cnnlens.tensors import combine_channels


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


def deletion_insertion_passes(steps: int) -> int:
    """Forward passes per image of deletion_insertion(): (steps + 1) for each curve."""
    return 2 * (steps + 1)


def _curve(model, before: Tensor, after: Tensor, rank: Tensor, counts: Tensor, idx: Tensor, batch_size: int):
    """N x (steps+1) probabilities of class idx: image i at step k is `after` where the pixel's rank is
    below counts[k], else `before`; (image, step) pairs run in forwards of batch_size."""
    n, steps, (h, w) = before.shape[0], len(counts) - 1, before.shape[-2:]
    probs = torch.empty(n * (steps + 1), device=before.device)
    pairs = torch.arange(n * (steps + 1), device=before.device)
    for chunk in pairs.split(batch_size):
        i, k = chunk // (steps + 1), chunk % (steps + 1)
        changed = (rank[i] < counts[k][:, None]).view(-1, 1, h, w)
        batch = torch.where(changed, after[i], before[i])
        probs[chunk] = torch.softmax(model(batch).float(), dim=1).gather(1, idx[i][:, None])[:, 0]
    return probs.view(n, steps + 1)


@torch.no_grad()
def deletion_insertion(
    model: nn.Module,
    inputs: Tensor,
    target,
    maps: Tensor,
    *,
    steps: int = 16,
    blur_sigma: float | None = None,
    kernel_size: int | None = None,
    deletion_value: float = 0.0,
    insertion_start: Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
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
    fraction of pixels in [0, 1]. All N x (steps+1) images of a curve are built lazily and run
    in forwards of `batch_size`. Cost: 2 * (steps + 1) forwards per image.
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
        k, sigma = default_blur(min(h, w))
        k = kernel_size if kernel_size is not None else k
        sigma = blur_sigma if blur_sigma is not None else sigma
        insertion_start = gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])
    start = insertion_start.to(x).expand_as(x)
    deleted = torch.full_like(x, deletion_value)

    del_curve = _curve(model, x, deleted, rank, counts, idx, batch_size)
    ins_curve = _curve(model, start, x, rank, counts, idx, batch_size)
    fx = fractions.to(x.device, torch.float32)
    return {
        "deletion_auc": torch.trapezoid(del_curve, fx, dim=1),
        "insertion_auc": torch.trapezoid(ins_curve, fx, dim=1),
        "deletion_curve": del_curve,
        "insertion_curve": ins_curve,
        "fractions": fx,
    }


def random_maps(n: int, h: int, w: int, generator: torch.Generator | None = None) -> Tensor:
    """N x H x W uniform noise: the baseline of a map that knows nothing."""
    return torch.rand(n, h, w, generator=generator)


def center_prior_maps(n: int, h: int, w: int, sigma_frac: float = 0.25) -> Tensor:
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
    method_fn,
    layer_order=None,
    *,
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


def bootstrap_ci(values, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
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
    maps: Tensor,
    masks: Tensor | None,
    steps: int,
    seed: int,
    batch_size: int,
) -> dict[str, Tensor]:
    """Per-image scores of N x [C x] H x W maps (abs taken: IG is signed): deletion and insertion
    AUC, and where object masks exist (N x H x W) the pointing game (1 hit, 0 miss) and the share
    of the map's mass inside the mask."""
    maps = maps.detach().abs().float().cpu()
    gen = torch.Generator().manual_seed(seed)  # breaks ties in the pixel order (flat maps)
    curves = deletion_insertion(
        model,
        x,
        torch.as_tensor(target).to(x.device),
        maps,
        steps=steps,
        generator=gen,
        batch_size=batch_size,
    )
    scores = {"deletion_auc": curves["deletion_auc"].cpu(), "insertion_auc": curves["insertion_auc"].cpu()}
    if masks is not None:
        scores["pointing_game"] = pointing_game(maps, masks.cpu()).float()
        scores["mass_inside"] = mass_inside(maps, masks.cpu())
    return scores


def baseline_maps(kind: str, n: int, h: int, w: int, seed: int) -> Tensor:
    """N x H x W maps that know nothing about the model: uniform noise or a centred Gaussian."""
    if kind == "random":
        return random_maps(n, h, w, torch.Generator().manual_seed(seed))
    if kind == "center":
        return center_prior_maps(n, h, w)
    raise ValueError(f"unknown baseline {kind!r}; allowed: random, center")
