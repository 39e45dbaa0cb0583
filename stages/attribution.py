"""Attribution methods: which input pixels move the predicted class's logit.

Captum-style, one function per method, all with the signature

    method(model, inputs, target, **kw) -> Tensor

so that `params.saliency.methods` (a list of names) selects them through METHODS / attribute().
`inputs` are ImageNet-normalised N x 3 x H x W on the model's device; `target` is N class indices
(the caller passes each image's max-logit class, see predict()). Every method attributes the
target *logit* (not the softmax), as captum does when given a model that returns logits.

The model is put in eval mode and left there. Gradients are taken with torch.autograd.grad with
respect to the input (or a layer's output) only, so no parameter's .grad is touched and the
model's weights and buffers stay as they were. Pure library code: no disk I/O.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.fileio import ParamsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def smoothgrad(model: nn.Module, inputs: Tensor, target, *, sigma: float = 0.15, samples: int = 25,
               generator: torch.Generator | None = None, seed: int | None = None,
               batch_size: int = 64, **kw) -> Tensor:
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
        noise = torch.stack([torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
                             for _ in range(k)]).to(x.device)  # k x N x 3 x H x W
        noisy = (x.unsqueeze(0) + noise * std.unsqueeze(0)).flatten(0, 1)
        grads = _input_grad(model, noisy, idx.repeat(k)).abs()
        total += grads.view(k, *x.shape).sum(0)
        done += k
    return total / samples


def black_baseline(inputs: Tensor) -> Tensor:
    """The all-black image (pixel value 0) in ImageNet-normalised space: (0 - mean) / std."""
    mean = torch.tensor(IMAGENET_MEAN, device=inputs.device, dtype=inputs.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=inputs.device, dtype=inputs.dtype).view(1, 3, 1, 1)
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


def integrated_gradients(model: nn.Module, inputs: Tensor, target, *, steps: int = 32,
                         baseline: Tensor | None = None, batch_size: int = 64, **kw) -> Tensor:
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
        a = alphas[start:start + per_chunk].to(x)
        w = weights[start:start + per_chunk].to(x)
        path = (base.unsqueeze(0) + a.view(-1, 1, 1, 1, 1) * diff.unsqueeze(0)).flatten(0, 1)
        grads = _input_grad(model, path, idx.repeat(len(a))).view(len(a), *x.shape)
        avg_grad += (grads * w.view(-1, 1, 1, 1, 1)).sum(0)
    return diff * avg_grad


@torch.no_grad()
def ig_completeness_error(model: nn.Module, inputs: Tensor, baseline: Tensor | None,
                          attributions: Tensor, target) -> dict:
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


def gradcam(model: nn.Module, inputs: Tensor, target, *, layer: nn.Module | str | None = None,
            **kw) -> Tensor:
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


METHODS = {
    "gradient": gradient,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "gradcam": gradcam,
}

# What each method costs, per image, for the saliency stage's report; passes() gives numbers.
PASSES = {
    "gradient": "1 forward + 1 backward",
    "smoothgrad": "smoothgrad_samples x (1 forward + 1 backward)",
    "integrated_gradients": "ig_steps x (1 forward + 1 backward)",
    "gradcam": "1 forward + 1 backward (to the hooked layer)",
}


def passes(method_name: str, params) -> tuple[int, int]:
    """(forwards, backwards) per image for `method_name` with these SaliencyParams."""
    n = {"gradient": 1, "smoothgrad": params.smoothgrad_samples,
         "integrated_gradients": params.ig_steps, "gradcam": 1}
    if method_name not in n:
        raise ParamsError(f"unknown saliency method {method_name!r}; allowed: {', '.join(METHODS)}")
    return n[method_name], n[method_name]


def method_kwargs(method_name: str, params) -> dict:
    """The keyword arguments that SaliencyParams gives a method."""
    if method_name == "smoothgrad":
        return {"sigma": params.smoothgrad_sigma, "samples": params.smoothgrad_samples,
                "batch_size": params.batch_size}
    if method_name == "integrated_gradients":
        return {"steps": params.ig_steps, "batch_size": params.batch_size}
    return {}


def attribute(method_name: str, model: nn.Module, inputs: Tensor, target, params,
              *, generator: torch.Generator | None = None) -> Tensor:
    """Run METHODS[method_name] with its settings from SaliencyParams.

    `generator` seeds SmoothGrad's noise (ignored by the deterministic methods).
    """
    if method_name not in METHODS:
        raise ParamsError(f"unknown saliency method {method_name!r}; allowed: {', '.join(METHODS)}")
    kw = method_kwargs(method_name, params)
    if method_name == "smoothgrad":
        kw["generator"] = generator
    return METHODS[method_name](model, inputs, target, **kw)


def normalize_maps(maps: Tensor, mode: str = "minmax", percentile: float = 99.0,
                   per_channel: bool = False) -> Tensor:
    """Scale each map to [0, 1], per image (and per channel when per_channel).

    maps: N x C x H x W or N x H x W. "minmax": (m - min) / (max - min). "percentile":
    (m - min) / (q - min) clipped to [0, 1], with q the `percentile`-th percentile, so a few
    extreme pixels do not make the rest look black (q falls back to max when q == min).
    A constant map becomes zeros, never NaN.
    """
    if mode not in ("minmax", "percentile"):
        raise ParamsError(f"normalize = {mode!r}; allowed: minmax, percentile")
    m = maps.detach().float()
    shape = m.shape
    if per_channel and m.dim() == 4:
        flat = m.flatten(2).flatten(0, 1)  # (N*C) x HW
    else:
        flat = m.flatten(1)
    lo = flat.amin(1, keepdim=True)
    hi = flat.amax(1, keepdim=True)
    if mode == "percentile":
        # numpy's default 'linear' percentile, by sorting (torch.quantile refuses > 16M values)
        srt = flat.sort(dim=1).values
        pos = percentile / 100.0 * (srt.shape[1] - 1)
        i0 = int(pos)
        i1 = min(i0 + 1, srt.shape[1] - 1)
        q = (srt[:, i0] + (pos - i0) * (srt[:, i1] - srt[:, i0]))[:, None]
        hi = torch.where(q > lo, q, hi)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.clamp(0.0, 1.0).reshape(shape)


def combine_channels(maps: Tensor) -> Tensor:
    """N x C x H x W -> N x H x W by the max over channels (the tutorial's combined map).
    An N x H x W input is returned as it is."""
    if maps.dim() == 3:
        return maps
    if maps.dim() != 4:
        raise ValueError(f"maps must be N x C x H x W or N x H x W, got shape {tuple(maps.shape)}")
    return maps.amax(dim=1)


@torch.no_grad()
def predict(model: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """(pred N long, prob N float): the max-logit class and its softmax probability."""
    model.eval()
    prob = torch.softmax(model(inputs).float(), dim=1)
    p, pred = prob.max(dim=1)
    return pred.long(), p
