"""Glue for the saliency stage between stages.attribution and stages.quality: batching, seeding,
display scaling and per-image quality scores. Tensors in, tensors out; no disk I/O."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from stages import attribution as A
from stages import quality as Q
from stages.training import probabilities


@torch.no_grad()
def predictions(model: nn.Module, x: Tensor, loss: str, batch_size: int) -> tuple[Tensor, Tensor]:
    """(pred N, prob N) on the CPU: the max-logit class (the saliency target) and its probability
    as the training loss models it."""
    model.eval()
    logits = torch.cat([model(chunk).float().cpu() for chunk in x.split(batch_size)])
    pred = logits.argmax(1)
    return pred, probabilities(logits, loss).gather(1, pred[:, None])[:, 0]


def explain(name: str, model: nn.Module, x: Tensor, target: Tensor, sp, seed: int) -> Tensor:
    """Raw maps of method `name`, N x C x H x W on the CPU, sp.batch_size images at a time.

    SmoothGrad's noise comes from a CPU generator seeded with `seed` on every call, so the same
    call gives the same maps on any device, and the randomisation check sees no noise as change.
    """
    gen = torch.Generator().manual_seed(seed)
    target = torch.as_tensor(target).to(x.device)
    return torch.cat([A.attribute(name, model, xb, tb, sp, generator=gen).detach().cpu()
                      for xb, tb in zip(x.split(sp.batch_size), target.split(sp.batch_size))])


def display_maps(maps: Tensor, mode: str, percentile: float) -> tuple[Tensor, Tensor]:
    """|maps| scaled to [0, 1] per image for the figures: (channels, combined).

    channels: N x C x H x W, one scale shared by an image's channels, so R, G and B panels can be
    compared; combined: N x H x W, the max over channels, scaled on its own.
    """
    m = maps.detach().abs().float().cpu()
    return (A.normalize_maps(m, mode, percentile, per_channel=False),
            A.normalize_maps(A.combine_channels(m), mode, percentile))


def quality_scores(model: nn.Module, x: Tensor, target: Tensor, maps: Tensor, masks: Tensor | None,
                   steps: int, seed: int, batch_size: int) -> dict[str, Tensor]:
    """Per-image scores of N x [C x] H x W maps (abs taken: IG is signed): deletion and insertion
    AUC, and where object masks exist (N x H x W) the pointing game (1 hit, 0 miss) and the share
    of the map's mass inside the mask."""
    maps = maps.detach().abs().float().cpu()
    gen = torch.Generator().manual_seed(seed)  # breaks ties in the pixel order (flat maps)
    curves = Q.deletion_insertion(model, x, torch.as_tensor(target).to(x.device), maps, steps=steps,
                                  generator=gen, batch_size=batch_size)
    scores = {"deletion_auc": curves["deletion_auc"].cpu(), "insertion_auc": curves["insertion_auc"].cpu()}
    if masks is not None:
        scores["pointing_game"] = Q.pointing_game(maps, masks.cpu()).float()
        scores["mass_inside"] = Q.mass_inside(maps, masks.cpu())
    return scores


def baseline_maps(kind: str, n: int, h: int, w: int, seed: int) -> Tensor:
    """N x H x W maps that know nothing about the model: uniform noise or a centred Gaussian."""
    if kind == "random":
        return Q.random_maps(n, h, w, torch.Generator().manual_seed(seed))
    if kind == "center":
        return Q.center_prior_maps(n, h, w)
    raise ValueError(f"unknown baseline {kind!r}; allowed: random, center")


def ig_completeness(model: nn.Module, x: Tensor, target: Tensor, maps: Tensor, batch_size: int) -> Tensor:
    """Per-image relative completeness error of integrated-gradients maps (black baseline):
    |sum(attr) - (f(x) - f(baseline))| / |f(x) - f(baseline)|, batch_size images at a time."""
    target = torch.as_tensor(target)
    return torch.cat([A.ig_completeness_error(model, xb, None, mb.to(xb), tb.to(xb.device))["rel"].cpu()
                      for xb, mb, tb in zip(x.split(batch_size), maps.split(batch_size), target.split(batch_size))])


def gradcam_grid(model: nn.Module, x: Tensor) -> tuple[int, int]:
    """(h, w) of the Grad-CAM layer's output for inputs like `x`: the map's real resolution
    before upsampling (2 x 2 for a ResNet at 64 px). One forward of one image."""
    sizes = []
    handle = A.default_gradcam_layer(model).register_forward_hook(lambda m, a, out: sizes.append(tuple(out.shape[-2:])))
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        handle.remove()
    return sizes[-1]


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device` in eval mode; on a CPU in channels_last memory format, where oneDNN's
    convolutions run about 1.3-1.4x faster, forward and backward (resnet18 at 64 px). The maps
    differ from the default layout's by float rounding only (~1e-7 of their max)."""
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if device.type == "cpu" else model
