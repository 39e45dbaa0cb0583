"""Attribution methods: which input pixels move the predicted class's logit.

Captum-style, one function per method, all with the signature

    method(model, inputs, target, **kw) -> Tensor

so that `saliency.methods` in params.yaml (a list of names) selects them through METHODS, the one
registry of methods and their facts (label, description, cost, settings), and explain().
`inputs` are ImageNet-normalised N x 3 x H x W on the model's device; `target` is N class indices
(the caller passes each image's max-logit class, see model.predictions()). Every method attributes the
target *logit* (not the softmax), as captum does when given a model that returns logits.

The model is put in eval mode and left there. Gradients are taken with torch.autograd.grad with
respect to the input (or a layer's output) only, so no parameter's .grad is touched and the
model's weights and buffers stay as they were. Pure library code: no disk I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlens.errors import ParamsError
from cnnlens.tensors import mean_std

# The methods' default settings (the pipeline's own are saliency.* in params.yaml).
SMOOTHGRAD_SIGMA = 0.15
SMOOTHGRAD_SAMPLES = 25
IG_STEPS = 32


def _target(target, n: int, device) -> Tensor:
    idx = torch.as_tensor(target, device=device).long().reshape(-1)
    if idx.numel() == 1 and n > 1:
        idx = idx.expand(n)
    if idx.numel() != n:
        raise ValueError(f"target has {idx.numel()} entries for {n} images")
    return idx


def _input_grad(model: nn.Module, x: Tensor, idx: Tensor) -> Tensor:
    """d logit[i, idx[i]] / d x[i] for every image of the batch at once.

    In eval mode the images of a batch do not interact, so the gradient of the sum of the chosen
    logits with respect to the batch is, image by image, the gradient of that image's logit.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        return torch.autograd.grad(out.gather(1, idx[:, None]).sum(), x)[0]


def gradient(model: nn.Module, inputs: Tensor, target, **kw) -> Tensor:
    """Vanilla gradient saliency (Simonyan et al. 2014), as in the PyTorch tutorial session.

    |d logit_target / d input|, N x 3 x H x W, >= 0. One forward and one backward over `inputs`.
    Equals captum.attr.Saliency(model).attribute(x, target=target, abs=True).
    """
    model.eval()
    idx = _target(target, inputs.shape[0], inputs.device)
    return _input_grad(model, inputs, idx).abs()


def smoothgrad(
    model: nn.Module,
    inputs: Tensor,
    target,
    *,
    sigma: float = SMOOTHGRAD_SIGMA,
    samples: int = SMOOTHGRAD_SAMPLES,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    batch_size: int = 64,
    **kw,
) -> Tensor:
    """SmoothGrad (Smilkov et al. 2017): mean of |gradient| over `samples` noisy copies.

    The noise std is `sigma` times each image's own input range (max - min over its pixels), as in
    the paper. Noisy copies of several samples are stacked into one forward of at most
    `batch_size` images (at least the N inputs). Noise is drawn one sample at a time, N x 3 x H x W
    each, so the result depends on the generator (or `seed`) but not on `batch_size`.
    N x 3 x H x W, >= 0; cost: `samples` forwards and backwards per image.
    """
    model.eval()
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=inputs.device).manual_seed(seed)
    gen_device = generator.device if generator is not None else inputs.device
    n = inputs.shape[0]
    idx = _target(target, n, inputs.device)
    x = inputs.detach()
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(n, 1, 1, 1)
    std = sigma * span
    per_chunk = max(1, batch_size // max(n, 1))
    total = torch.zeros_like(x)
    done = 0
    while done < samples:
        k = min(per_chunk, samples - done)
        noise = torch.stack(
            [torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype) for _ in range(k)]
        ).to(x.device)  # k x N x 3 x H x W
        noisy = (x.unsqueeze(0) + noise * std.unsqueeze(0)).flatten(0, 1)
        grads = _input_grad(model, noisy, idx.repeat(k)).abs()
        total += grads.view(k, *x.shape).sum(0)
        done += k
    return total / samples


def black_baseline(inputs: Tensor) -> Tensor:
    """The all-black image (pixel value 0) in ImageNet-normalised space: (0 - mean) / std."""
    mean, std = mean_std(inputs.device, inputs.dtype)
    return ((0.0 - mean) / std).expand_as(inputs)


def trapezoid_rule(steps: int) -> tuple[Tensor, Tensor]:
    """Points alpha in [0, 1] and weights of the trapezoid rule with `steps` points.

    The same as captum's method="riemann_trapezoid": alphas = linspace(0, 1, steps), weights
    1/(steps-1) with half weight at both ends (they sum to 1).
    """
    if steps < 2:
        raise ValueError(f"the trapezoid rule needs at least 2 steps, got {steps}")
    alphas = torch.linspace(0, 1, steps, dtype=torch.float64)
    weights = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
    weights[0] = weights[-1] = 0.5 / (steps - 1)
    return alphas, weights


def integrated_gradients(
    model: nn.Module,
    inputs: Tensor,
    target,
    *,
    steps: int = IG_STEPS,
    baseline: Tensor | None = None,
    batch_size: int = 64,
    **kw,
) -> Tensor:
    """Integrated gradients (Sundararajan et al. 2017), signed, N x 3 x H x W.

    attr = (x - baseline) * integral_0^1 grad f(baseline + a (x - baseline)) da, with the integral
    taken by the trapezoid rule on `steps` points (captum's "riemann_trapezoid"). The default
    baseline is the black image in pixel space, i.e. (0 - mean) / std in the normalised inputs.
    The path points of several alphas are stacked into forwards of at most `batch_size` images.
    Cost: `steps` forwards and backwards per image. For display take abs() of the result.
    """
    model.eval()
    n = inputs.shape[0]
    idx = _target(target, n, inputs.device)
    x = inputs.detach()
    base = black_baseline(x) if baseline is None else baseline.to(x).expand_as(x)
    diff = x - base
    alphas, weights = trapezoid_rule(steps)
    per_chunk = max(1, batch_size // max(n, 1))
    avg_grad = torch.zeros_like(x)
    for start in range(0, steps, per_chunk):
        a = alphas[start : start + per_chunk].to(x)
        w = weights[start : start + per_chunk].to(x)
        path = (base.unsqueeze(0) + a.view(-1, 1, 1, 1, 1) * diff.unsqueeze(0)).flatten(0, 1)
        grads = _input_grad(model, path, idx.repeat(len(a))).view(len(a), *x.shape)
        avg_grad += (grads * w.view(-1, 1, 1, 1, 1)).sum(0)
    return diff * avg_grad


@torch.no_grad()
def ig_completeness_error(
    model: nn.Module, inputs: Tensor, target, *, attributions: Tensor, baseline: Tensor | None = None
) -> dict:
    """How far IG is from its completeness axiom: sum(attr) = f(x) - f(baseline), per image.

    Returns dict(abs=N, rel=N, delta=N): abs = |sum(attr) - delta|, delta = f(x) - f(baseline)
    of the target logit, rel = abs / |delta| (|delta| floored at 1e-12). Two forwards per image.
    It shrinks as ig_steps grows; a large value means too few steps for this model.
    """
    model.eval()
    idx = _target(target, inputs.shape[0], inputs.device)
    base = black_baseline(inputs) if baseline is None else baseline.to(inputs).expand_as(inputs)
    fx = model(inputs).gather(1, idx[:, None])[:, 0]
    fb = model(base).gather(1, idx[:, None])[:, 0]
    delta = fx - fb
    err = (attributions.flatten(1).sum(1) - delta).abs()
    return {"abs": err, "rel": err / delta.abs().clamp_min(1e-12), "delta": delta}


def default_gradcam_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block: model.layer4 for ResNets, model.features[-1] for the
    torchvision families with a `features` Sequential (MobileNet, EfficientNet, VGG, ...),
    else the last nn.Conv2d of the model."""
    if isinstance(getattr(model, "layer4", None), nn.Module):
        return model.layer4
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        for block in reversed(features):
            if any(isinstance(m, nn.Conv2d) for m in block.modules()):
                return block
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("gradcam: the model has no nn.Conv2d; pass layer= explicitly")
    return convs[-1]


def gradcam(
    model: nn.Module, inputs: Tensor, target, *, layer: nn.Module | str | None = None, **kw
) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017), N x 1 x H x W, >= 0.

    A forward hook captures the layer's output A; w = spatial mean of d logit / d A per channel;
    cam = ReLU(sum_c w_c A_c), upsampled bilinearly (align_corners=False) to the input size.
    Equals captum's LayerGradCam(..., relu_attributions=True) + LayerAttribution.interpolate.
    `layer` is a module or its dotted name (e.g. "layer4"); default: default_gradcam_layer().
    Cost: one forward and one backward (down to the layer) per image.
    """
    model.eval()
    if layer is None:
        layer = default_gradcam_layer(model)
    elif isinstance(layer, str):
        layer = model.get_submodule(layer)
    idx = _target(target, inputs.shape[0], inputs.device)
    captured = []
    handle = layer.register_forward_hook(lambda mod, args, out: captured.append(out))
    try:
        with torch.enable_grad():
            out = model(inputs.detach())
            if not captured:
                raise ValueError(f"gradcam: layer {type(layer).__name__} was not called in the forward pass")
            acts = captured[-1]
            grads = torch.autograd.grad(out.gather(1, idx[:, None]).sum(), acts)[0]
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts.detach()).sum(1, keepdim=True))
    return F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class Method:
    """A method and its facts, as captum bundles them: what config validates, the stage runs and
    the figures and metrics describe. `describe`, `passes` and `kwargs` take the method settings as
    keyword arguments (smoothgrad_sigma, smoothgrad_samples, ig_steps, and batch_size for kwargs);
    each ignores the ones it does not use and falls back to the defaults above for missing ones."""

    fn: Callable  # (model, inputs, target, **kwargs) -> N x C x H x W (Grad-CAM: N x 1 x H x W)
    label: str  # for figure titles
    describe: Callable[..., str]  # one line on what the map is
    passes: Callable[..., int]  # forward passes per image; each has one backward pass too
    cost: str  # the passes, in words
    kwargs: Callable[..., dict] = lambda **settings: {}  # the settings, as `fn` takes them
    seeded: bool = False  # takes a generator= for its noise


def _describe_smoothgrad(*, smoothgrad_samples=SMOOTHGRAD_SAMPLES, smoothgrad_sigma=SMOOTHGRAD_SIGMA, **_):
    return (
        f"mean |gradient| over {smoothgrad_samples} noisy copies of the image "
        f"(noise std {smoothgrad_sigma:g} x the image's range)"
    )


def _smoothgrad_kwargs(
    *, smoothgrad_sigma=SMOOTHGRAD_SIGMA, smoothgrad_samples=SMOOTHGRAD_SAMPLES, batch_size=64, **_
):
    return {"sigma": smoothgrad_sigma, "samples": smoothgrad_samples, "batch_size": batch_size}


METHODS = {
    "gradient": Method(
        gradient,
        "gradient",
        lambda **_: "|d logit / d pixel| of the predicted class, one backward pass",
        lambda **_: 1,
        "1 forward + 1 backward",
    ),
    "smoothgrad": Method(
        smoothgrad,
        "SmoothGrad",
        _describe_smoothgrad,
        lambda *, smoothgrad_samples=SMOOTHGRAD_SAMPLES, **_: smoothgrad_samples,
        "smoothgrad_samples x (1 forward + 1 backward)",
        _smoothgrad_kwargs,
        seeded=True,
    ),
    "integrated_gradients": Method(
        integrated_gradients,
        "integrated gradients",
        lambda *, ig_steps=IG_STEPS, **_: (
            f"gradients along {ig_steps} steps from a black image to the image, times "
            "(image - black); |value| shown"
        ),
        lambda *, ig_steps=IG_STEPS, **_: ig_steps,
        "ig_steps x (1 forward + 1 backward)",
        lambda *, ig_steps=IG_STEPS, batch_size=64, **_: {"steps": ig_steps, "batch_size": batch_size},
    ),
    "gradcam": Method(
        gradcam,
        "Grad-CAM",
        lambda **_: (
            "last conv block's feature maps weighted by the mean gradient of the predicted logit, ReLU"
        ),
        lambda **_: 1,
        "1 forward + 1 backward (to the hooked layer)",
    ),
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise ParamsError(f"unknown saliency method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def attribute(
    name: str,
    model: nn.Module,
    inputs: Tensor,
    *,
    target,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    smoothgrad_sigma: float = SMOOTHGRAD_SIGMA,
    smoothgrad_samples: int = SMOOTHGRAD_SAMPLES,
    ig_steps: int = IG_STEPS,
) -> Tensor:
    """Run method `name` on one batch with these settings; `generator` seeds SmoothGrad's noise."""
    m = method(name)
    kw = m.kwargs(
        batch_size=batch_size,
        smoothgrad_sigma=smoothgrad_sigma,
        smoothgrad_samples=smoothgrad_samples,
        ig_steps=ig_steps,
    )
    if m.seeded:
        kw["generator"] = generator
    return m.fn(model, inputs, target, **kw)


def explain(
    name: str,
    model: nn.Module,
    x: Tensor,
    *,
    target: Tensor,
    seed: int,
    batch_size: int,
    smoothgrad_sigma: float = SMOOTHGRAD_SIGMA,
    smoothgrad_samples: int = SMOOTHGRAD_SAMPLES,
    ig_steps: int = IG_STEPS,
) -> Tensor:
    """Raw maps of method `name`, N x C x H x W on the CPU, batch_size images at a time.

    SmoothGrad's noise comes from a CPU generator seeded with `seed` on every call, so the same
    call gives the same maps on any device, and the randomisation check sees no noise as change.
    """
    gen = torch.Generator().manual_seed(seed)
    target = torch.as_tensor(target).to(x.device)
    settings = {
        "batch_size": batch_size,
        "smoothgrad_sigma": smoothgrad_sigma,
        "smoothgrad_samples": smoothgrad_samples,
        "ig_steps": ig_steps,
    }
    maps = [
        attribute(name, model, xb, target=tb, generator=gen, **settings).detach().cpu()
        for xb, tb in zip(x.split(batch_size), target.split(batch_size))
    ]
    return torch.cat(maps)


def gradcam_grid(model: nn.Module, x: Tensor) -> tuple[int, int]:
    """(h, w) of the Grad-CAM layer's output for inputs like `x`: the map's real resolution
    before upsampling (2 x 2 for a ResNet at 64 px). One forward of one image."""
    sizes = []
    layer = default_gradcam_layer(model)
    handle = layer.register_forward_hook(lambda m, a, out: sizes.append(tuple(out.shape[-2:])))
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        handle.remove()
    return sizes[-1]


def pixel_note(name: str, model: nn.Module, x: Tensor) -> str:
    """What one pixel of method `name`'s combined map is, for the figures: Grad-CAM's map is the hooked
    layer's coarse grid, upsampled; the others take the max over R, G and B."""
    return (
        "a {} x {} grid, upsampled".format(*gradcam_grid(model, x))
        if name == "gradcam"
        else "max over R, G, B"
    )


def ig_completeness(model: nn.Module, x: Tensor, target: Tensor, *, maps: Tensor, batch_size: int) -> Tensor:
    """Per-image relative completeness error of integrated-gradients maps (black baseline):
    |sum(attr) - (f(x) - f(baseline))| / |f(x) - f(baseline)|, batch_size images at a time."""
    target = torch.as_tensor(target)
    return torch.cat(
        [
            ig_completeness_error(model, xb, tb.to(xb.device), attributions=mb.to(xb))["rel"].cpu()
            for xb, mb, tb in zip(x.split(batch_size), maps.split(batch_size), target.split(batch_size))
        ]
    )
