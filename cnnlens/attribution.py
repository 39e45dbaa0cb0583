"""Attribution methods: which input pixels move the predicted class's logit.

Gradient, SmoothGrad, integrated gradients and the CAM family (Grad-CAM, Grad-CAM++, HiResCAM, LayerCAM,
which share one layer hook) are written here and checked against captum and pytorch-grad-cam in the
tests; occlusion and GradientSHAP are captum's own, adapted (captum is a runtime dependency, imported
when one of them runs). Captum-style, one function per method, all with the signature

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

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnlens.errors import ParamsError, StageError
from cnnlens.hooks import available_layers, capture
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


# ---- class activation maps: one hook (hooks.capture) and one rule per method

# `auto` picks the deepest block whose feature map is at least this wide: ResNet's layer4 grid at 224 px,
# the setting the CAM papers use. At the demo's 48 px crops that is layer1 (12 x 12; layer2 is 6 x 6).
AUTO_MIN_GRID = 7


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


def cam_candidates(model: nn.Module, size: int) -> list[str]:
    """The blocks `auto` chooses from, shallow to deep, as dotted module names: the stem and
    layer1..layer4 of hooks.available_layers (ResNets, and models with a `features` Sequential), else
    the top-level children that hold a convolution."""
    try:
        return list(available_layers(model, size).values())
    except StageError:
        return [
            name
            for name, child in model.named_children()
            if any(isinstance(m, nn.Conv2d) for m in child.modules())
        ]


def layer_grids(model: nn.Module, names: list[str], *, size: int) -> dict[str, tuple[int, ...]]:
    """The output shape after the batch and channel axes, (h, w) for a feature map, of each named module
    for a size x size input: one dry forward of a blank image with hooks, in eval mode (left there)."""
    param = next(model.parameters(), None)
    blank = torch.zeros(1, 3, size, size) if param is None else param.new_zeros(1, 3, size, size)
    with capture({n: model.get_submodule(n) for n in names}) as outs, torch.no_grad():
        model.eval()(blank)
    return {n: tuple(outs[n].shape[2:]) for n in names if n in outs}


@dataclass(frozen=True)
class CamLayer:
    """The layer the CAM methods hook: its dotted name, its grid (h, w) at the input size it was
    resolved for, and what was asked for (`auto` or the name)."""

    name: str
    grid: tuple[int, int]
    asked: str


def resolve_cam_layer(model: nn.Module, layer: str | None = "auto", *, size: int) -> CamLayer:
    """`auto` (or None): the deepest of cam_candidates whose feature map is at least AUTO_MIN_GRID on
    each side at a size x size input, else the one with the largest grid. A name: that module, which must
    exist and output a feature map (N x C x h x w); otherwise a ParamsError naming the choices."""
    candidates = cam_candidates(model, size)
    if layer in (None, "auto"):
        grids = layer_grids(model, candidates, size=size)
        found = [n for n in candidates if len(grids.get(n, ())) == 2]
        wide = [n for n in found if min(grids[n]) >= AUTO_MIN_GRID]
        name = wide[-1] if wide else max(reversed(found), key=lambda n: min(grids[n]))
        return CamLayer(name, grids[name], "auto")
    names = {n for n, _ in model.named_modules() if n}
    grid = layer_grids(model, [layer], size=size).get(layer, ()) if layer in names else None
    if grid is None or len(grid) != 2:
        why = "has no module of that name" if grid is None else "has no feature map (N x C x h x w) there"
        raise ParamsError(
            f"saliency.gradcam_layer = {layer!r}: {type(model).__name__} {why}; expected auto or the name of "
            f"a module that outputs a feature map, e.g. {', '.join(candidates)} (any name in its named_modules())"
        )
    return CamLayer(layer, grid, layer)


def layer_gradients(model: nn.Module, inputs: Tensor, target, *, layer: nn.Module) -> tuple[Tensor, Tensor]:
    """The layer's output A and d logit[i, target[i]] / d A for every image of the batch (detached): one
    forward, one backward down to the layer. The hook every CAM method shares."""
    idx = _target(target, inputs.shape[0], inputs.device)
    with capture({"layer": layer}, detach=False) as acts, torch.enable_grad():
        out = model(inputs.detach().requires_grad_(True))  # a graph even when the weights are frozen
        if "layer" not in acts:
            raise ValueError(f"CAM: layer {type(layer).__name__} was not called in the forward pass")
        grads = torch.autograd.grad(out.gather(1, idx[:, None]).sum(), acts["layer"])[0]
    return acts["layer"].detach(), grads


def _gradcam_rule(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM: channel weights = the spatial mean of the gradient."""
    return (grads.mean(dim=(2, 3), keepdim=True) * acts).sum(1, keepdim=True)


def _gradcam_plusplus_rule(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19 with the exponential's derivatives written as powers
    of the gradient, as the authors' code does): alpha = g^2 / (2 g^2 + sum_ab A_ab g^3), channel
    weights = sum_ij alpha_ij ReLU(g_ij). Where the denominator is 0 alpha is 0 (the authors' code)."""
    g2 = grads * grads
    denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g2 * grads
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.0)
    weights = (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True)
    return (weights * acts).sum(1, keepdim=True)


def _hirescam_rule(acts: Tensor, grads: Tensor) -> Tensor:
    """HiResCAM (Draelos and Carin 2020): the element-wise product gradient x activation, summed over
    channels; no spatial averaging, so the map is faithful to the layer's own grid."""
    return (grads * acts).sum(1, keepdim=True)


def _layercam_rule(acts: Tensor, grads: Tensor) -> Tensor:
    """LayerCAM (Jiang et al. 2021): the activation weighted by its own positive gradient, per location."""
    return (F.relu(grads) * acts).sum(1, keepdim=True)


CAM_RULES = {
    "gradcam": _gradcam_rule,
    "gradcam_plusplus": _gradcam_plusplus_rule,
    "hirescam": _hirescam_rule,
    "layercam": _layercam_rule,
}


def cam(model: nn.Module, inputs: Tensor, target, *, rule: str, layer=None, upsample: bool = True) -> Tensor:
    """The CAM map of `rule` (a CAM_RULES name), N x 1 x H x W, >= 0: ReLU(rule(A, dlogit/dA)) of the
    hooked layer, upsampled bilinearly (align_corners=False) to the input size; upsample=False keeps
    the layer's own h x w grid. `layer`: a module, its dotted name, or auto / None (resolve_cam_layer
    at the inputs' size). Cost: one forward and one backward (down to the layer) per image."""
    model.eval()
    if layer is None or layer == "auto":
        layer = resolve_cam_layer(model, "auto", size=inputs.shape[-1]).name
    if isinstance(layer, str):
        layer = model.get_submodule(layer)
    acts, grads = layer_gradients(model, inputs, target, layer=layer)
    maps = F.relu(CAM_RULES[rule](acts, grads))
    if not upsample:
        return maps
    return F.interpolate(maps, size=inputs.shape[-2:], mode="bilinear", align_corners=False)


def gradcam(model: nn.Module, inputs: Tensor, target, *, layer=None, **kw) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017), N x 1 x H x W, >= 0: cam = ReLU(sum_c w_c A_c) with w = the
    spatial mean of d logit / d A per channel, upsampled (see cam()). Equals captum's
    LayerGradCam(..., relu_attributions=True) + LayerAttribution.interpolate at the same layer."""
    return cam(model, inputs, target, rule="gradcam", layer=layer)


def gradcam_plusplus(model: nn.Module, inputs: Tensor, target, *, layer=None, **kw) -> Tensor:
    """Grad-CAM++ (see _gradcam_plusplus_rule), N x 1 x H x W, >= 0, upsampled (see cam())."""
    return cam(model, inputs, target, rule="gradcam_plusplus", layer=layer)


def hirescam(model: nn.Module, inputs: Tensor, target, *, layer=None, **kw) -> Tensor:
    """HiResCAM (see _hirescam_rule), N x 1 x H x W, >= 0, upsampled (see cam())."""
    return cam(model, inputs, target, rule="hirescam", layer=layer)


def layercam(model: nn.Module, inputs: Tensor, target, *, layer=None, **kw) -> Tensor:
    """LayerCAM (see _layercam_rule), N x 1 x H x W, >= 0, upsampled (see cam())."""
    return cam(model, inputs, target, rule="layercam", layer=layer)


# ---- captum's perturbation and sampling methods, adapted to the registry's signature

OCCLUSION_WINDOW = 32  # px, square; with the stride: 13 x 13 windows at 224 px
OCCLUSION_STRIDE = 16
GRADSHAP_SAMPLES = 16
GRADSHAP_BASELINES = 8  # the black image and 7 uniform-noise images, drawn per image


def occlusion_windows(size: int, *, window: int = OCCLUSION_WINDOW, stride: int = OCCLUSION_STRIDE) -> int:
    """Window positions per image on a size x size input, as captum counts them: per axis
    ceil((size - window) / stride) + 1, the window and stride clipped to the image."""
    window, stride = min(window, size), min(stride, size)
    return (math.ceil((size - window) / stride) + 1) ** 2


def occlusion(
    model: nn.Module,
    inputs: Tensor,
    target,
    *,
    window: int = OCCLUSION_WINDOW,
    stride: int = OCCLUSION_STRIDE,
    batch_size: int = 64,
    **kw,
) -> Tensor:
    """Occlusion (Zeiler and Fergus 2014) through captum.attr.Occlusion: a window x window patch of all
    three channels, set to 0 (the ImageNet mean colour, as in deletion), slides by `stride`; each pixel
    gets the mean drop of the target logit over the windows that cover it. Signed, N x 1 x H x W (the
    channels are equal). Window and stride are clipped to the image. Cost: occlusion_windows() + 1
    forwards per image, no backward; batch_size perturbed images a forward."""
    from captum.attr import Occlusion

    model.eval()
    n, c, h, w = inputs.shape
    idx = _target(target, n, inputs.device)
    attr = Occlusion(model).attribute(
        inputs.detach(),
        sliding_window_shapes=(c, min(window, h), min(window, w)),
        strides=(c, min(stride, h), min(stride, w)),
        baselines=0.0,
        target=idx,
        perturbations_per_eval=max(1, batch_size // n),
    )
    return attr[:, :1].detach()


def shap_baselines(x: Tensor, *, generator: torch.Generator) -> Tensor:
    """GradientSHAP's reference distribution for images like x (1 x 3 x H x W): the black image and
    GRADSHAP_BASELINES - 1 images of uniform pixel noise, ImageNet-normalised, drawn from `generator`."""
    noise = torch.rand(GRADSHAP_BASELINES - 1, *x.shape[1:], generator=generator, device=generator.device)
    mean, std = mean_std(noise.device)
    return torch.cat([black_baseline(x[:1]), ((noise - mean) / std).to(x)])


@contextlib.contextmanager
def seeded_globals(seed: int, device: torch.device):
    """The global numpy and torch generators seeded with `seed` inside the `with` and restored after
    it: captum draws GradientShap's baseline choices and path points from numpy's global generator."""
    state = np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            np.random.seed(seed)
            torch.manual_seed(seed)
            yield
    finally:
        np.random.set_state(state)


def gradient_shap(
    model: nn.Module,
    inputs: Tensor,
    target,
    *,
    samples: int = GRADSHAP_SAMPLES,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    batch_size: int = 64,
    **kw,
) -> Tensor:
    """GradientSHAP (Lundberg and Lee 2017) through captum.attr.GradientShap: the mean over `samples`
    draws of (x - b) * grad f(b + a (x - b)), b from shap_baselines(), a ~ U(0, 1); no input noise
    (captum's default stdevs=0). Signed, N x 3 x H x W.

    All randomness comes from `generator` (or `seed`), image by image: the baselines, then a seed for
    captum's draws (numpy's global generator, seeded and restored by seeded_globals), per forward of at
    most batch_size samples. So the maps depend on the seed, not on the device nor, for samples <=
    batch_size, on how the images are batched. Cost: `samples` forwards and backwards per image.
    """
    from captum.attr import GradientShap

    model.eval()
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    idx = _target(target, inputs.shape[0], inputs.device)
    explainer, maps = GradientShap(model), []
    for i in range(inputs.shape[0]):
        x, total = inputs[i : i + 1].detach(), torch.zeros_like(inputs[i : i + 1])
        base = shap_baselines(x, generator=generator)
        for start in range(0, samples, batch_size):
            k = min(batch_size, samples - start)
            draw = int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device))
            with seeded_globals(draw, x.device):
                attr = explainer.attribute(x, baselines=base, n_samples=k, stdevs=0.0, target=idx[i : i + 1])
            total += attr.detach() * k
        maps.append(total / samples)
    return torch.cat(maps)


# ---- the registry


@dataclass(frozen=True)
class Method:
    """A method and its facts, as captum bundles them: what config validates, the stage runs and
    the figures and metrics describe. `describe`, `passes` and `kwargs` take the method settings (SETTINGS)
    as keyword arguments, `passes` also the input side `size`, `kwargs` also batch_size; each ignores the
    ones it does not use and falls back to the defaults above for missing ones."""

    fn: Callable  # (model, inputs, target, **kwargs) -> N x C x H x W (the CAM family, occlusion: C = 1)
    label: str  # for figure titles
    describe: Callable[..., str]  # one line on what the map is
    passes: Callable[..., int]  # forward passes per image (and as many backward ones if `backward`)
    cost: str  # the passes, in words
    kwargs: Callable[..., dict] = lambda **settings: {}  # the settings, as `fn` takes them
    seeded: bool = False  # takes a generator= for its randomness
    backward: bool = True  # each forward pass has a backward pass
    cam: bool = False  # hooks a layer (saliency.gradcam_layer): a map on that layer's grid, upsampled


# The methods' settings (params.yaml's saliency.<name>): what attribute() and explain() take besides
# batch_size, with the library's defaults. gradcam_layer None: auto at the inputs' size.
SETTINGS = {
    "smoothgrad_sigma": SMOOTHGRAD_SIGMA,
    "smoothgrad_samples": SMOOTHGRAD_SAMPLES,
    "ig_steps": IG_STEPS,
    "gradcam_layer": None,
    "occlusion_window": OCCLUSION_WINDOW,
    "occlusion_stride": OCCLUSION_STRIDE,
    "gradshap_samples": GRADSHAP_SAMPLES,
}


def _describe_smoothgrad(*, smoothgrad_samples=SMOOTHGRAD_SAMPLES, smoothgrad_sigma=SMOOTHGRAD_SIGMA, **_):
    return (
        f"mean |gradient| over {smoothgrad_samples} noisy copies of the image "
        f"(noise std {smoothgrad_sigma:g} x the image's range)"
    )


def _smoothgrad_kwargs(
    *, smoothgrad_sigma=SMOOTHGRAD_SIGMA, smoothgrad_samples=SMOOTHGRAD_SAMPLES, batch_size=64, **_
):
    return {"sigma": smoothgrad_sigma, "samples": smoothgrad_samples, "batch_size": batch_size}


def _cam_method(fn: Callable, label: str, weighting: str) -> Method:
    """A CAM-family entry: `weighting` says how the hooked layer's feature maps are weighted."""
    return Method(
        fn,
        label,
        lambda *, gradcam_layer=None, **_: f"{gradcam_layer or 'auto'}'s feature maps {weighting}, ReLU",
        lambda **_: 1,
        "1 forward + 1 backward (to the hooked layer)",
        lambda *, gradcam_layer=None, **_: {"layer": gradcam_layer},
        cam=True,
    )


def _occlusion_passes(*, size=224, occlusion_window=OCCLUSION_WINDOW, occlusion_stride=OCCLUSION_STRIDE, **_):
    return 1 + occlusion_windows(size, window=occlusion_window, stride=occlusion_stride)


def _occlusion_kwargs(
    *, occlusion_window=OCCLUSION_WINDOW, occlusion_stride=OCCLUSION_STRIDE, batch_size=64, **_
):
    return {"window": occlusion_window, "stride": occlusion_stride, "batch_size": batch_size}


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
    "gradcam": _cam_method(gradcam, "Grad-CAM", "weighted by the mean gradient of the predicted logit"),
    "gradcam_plusplus": _cam_method(
        gradcam_plusplus, "Grad-CAM++", "weighted by alpha-weighted positive gradients"
    ),
    "hirescam": _cam_method(hirescam, "HiResCAM", "times the gradient, element by element"),
    "layercam": _cam_method(layercam, "LayerCAM", "times the positive gradient, element by element"),
    "occlusion": Method(
        occlusion,
        "occlusion",
        lambda *, occlusion_window=OCCLUSION_WINDOW, occlusion_stride=OCCLUSION_STRIDE, **_: (
            f"drop of the predicted logit under a {occlusion_window} px mean-colour square, "
            f"stride {occlusion_stride} px; |value| shown"
        ),
        _occlusion_passes,
        "1 + windows forwards, no backward: windows = (ceil((side - occlusion_window) / occlusion_stride) "
        "+ 1)^2, 13^2 = 169 at 224 px with 32 / 16, 11^2 = 121 at the demo's 48 px with 8 / 4",
        _occlusion_kwargs,
        backward=False,
    ),
    "gradient_shap": Method(
        gradient_shap,
        "GradientSHAP",
        lambda *, gradshap_samples=GRADSHAP_SAMPLES, **_: (
            f"(image - baseline) x gradient between them, mean of {gradshap_samples} draws; "
            "black or noise baselines; |value| shown"
        ),
        lambda *, gradshap_samples=GRADSHAP_SAMPLES, **_: gradshap_samples,
        "gradshap_samples x (1 forward + 1 backward)",
        lambda *, gradshap_samples=GRADSHAP_SAMPLES, batch_size=64, **_: {
            "samples": gradshap_samples,
            "batch_size": batch_size,
        },
        seeded=True,
    ),
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise ParamsError(f"unknown saliency method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def _settings(given: dict) -> dict:
    """The method settings with the library's defaults for missing ones; an unknown one is a TypeError."""
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise TypeError(f"unknown method setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    return {**SETTINGS, **given}


def attribute(
    name: str,
    model: nn.Module,
    inputs: Tensor,
    *,
    target,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    **settings,
) -> Tensor:
    """Run method `name` on one batch with these settings (SETTINGS names: smoothgrad_sigma,
    smoothgrad_samples, ig_steps, gradcam_layer, occlusion_window, occlusion_stride, gradshap_samples);
    `generator` seeds SmoothGrad's noise and GradientSHAP's draws."""
    m = method(name)
    kw = m.kwargs(batch_size=batch_size, **_settings(settings))
    if m.seeded:
        kw["generator"] = generator
    return m.fn(model, inputs, target, **kw)


def explain(
    name: str, model: nn.Module, x: Tensor, *, target: Tensor, seed: int, batch_size: int, **settings
) -> Tensor:
    """Raw maps of method `name`, N x C x H x W on the CPU, batch_size images at a time (settings: as
    attribute() takes them).

    The seeded methods' randomness comes from a CPU generator seeded with `seed` on every call, so the
    same call gives the same maps on any device, and the randomisation check sees no noise as change.
    """
    gen = torch.Generator().manual_seed(seed)
    target = torch.as_tensor(target).to(x.device)
    maps = [
        attribute(name, model, xb, target=tb, generator=gen, batch_size=batch_size, **settings).detach().cpu()
        for xb, tb in zip(x.split(batch_size), target.split(batch_size))
    ]
    return torch.cat(maps)


def pixel_note(name: str, model: nn.Module, x: Tensor, **settings) -> str:
    """What one pixel of method `name`'s combined map is, for the figures: a CAM map is the hooked layer's
    coarse grid, upsampled; occlusion's is the mean over the windows covering it; the others take the max
    over R, G and B. settings: as attribute() takes them (gradcam_layer, the occlusion window)."""
    s = _settings(settings)
    if METHODS[name].cam:
        layer = resolve_cam_layer(model, s["gradcam_layer"], size=x.shape[-1])
        return "a {} x {} grid ({}), upsampled".format(*layer.grid, layer.name)
    if name == "occlusion":
        return f"mean over the {s['occlusion_window']} px windows covering it"
    return "max over R, G, B"


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
