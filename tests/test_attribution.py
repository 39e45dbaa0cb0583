"""cnnlens/attribution.py against hand-computed cases and captum (a test-only oracle).

Tolerances: gradient vs captum Saliency 1e-6 (float32); integrated gradients vs captum
IntegratedGradients(method="riemann_trapezoid"), rescaled by n/(n-1) (see the test), 1e-10 of the
map's max in float64 and 1e-5 in float32 (only the summation order differs); Grad-CAM vs captum
LayerGradCam + interpolate 1e-6 relative to the map's max (float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from conftest import small_resnet
from torch import nn

from cnnlens import attribution as A
from cnnlens.errors import ParamsError
from cnnlens.model import predictions
from cnnlens.tensors import combine_channels, normalize_maps


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def images(n=3, side=64, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g).to(dtype)


@pytest.fixture(scope="module")
def resnet():
    return small_resnet()


def linear_model(h=4, w=4, classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * h * w, classes)).eval()


class Quadratic(nn.Module):
    """logits = [sum(x^2), 0]: d logit_0 / dx = 2x, and IG from b to x is exactly x^2 - b^2."""

    def forward(self, x):
        s = (x**2).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


# ---------------------------------------------------------------- gradient


def test_gradient_of_a_linear_model_is_the_weight_row_of_the_argmax_class():
    model = linear_model()
    x = images(n=4, side=4)
    pred, _ = predictions(model, x)
    maps = A.gradient(model, x, pred)
    expected = model[1].weight.detach()[pred].abs().view(4, 3, 4, 4)
    assert maps.shape == (4, 3, 4, 4)
    assert torch.equal(maps, expected)


def test_gradient_matches_captum_saliency(resnet):
    captum_attr = pytest.importorskip("captum.attr", reason="captum (test-only oracle) is not installed")
    x = images()
    pred, _ = predictions(resnet, x)
    ours = A.gradient(resnet, x, pred)
    theirs = captum_attr.Saliency(resnet).attribute(x.clone().requires_grad_(True), target=pred, abs=True)
    assert (ours >= 0).all()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_gradient_of_a_batch_equals_gradient_image_by_image(resnet):
    x = images()
    pred, _ = predictions(resnet, x)
    batch = A.gradient(resnet, x, pred)
    one_by_one = torch.cat([A.gradient(resnet, x[i : i + 1], pred[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batch, one_by_one, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- SmoothGrad


def test_smoothgrad_without_noise_is_the_gradient(resnet):
    x = images(n=2)
    pred, _ = predictions(resnet, x)
    sg = A.smoothgrad(resnet, x, pred, sigma=0.0, samples=3, seed=0)
    torch.testing.assert_close(sg, A.gradient(resnet, x, pred), rtol=1e-5, atol=1e-7)


def test_smoothgrad_of_a_linear_model_is_the_weight_row_whatever_the_noise():
    model = linear_model()
    x = images(n=3, side=4)
    pred, _ = predictions(model, x)
    sg = A.smoothgrad(model, x, pred, sigma=0.5, samples=7, seed=3)
    torch.testing.assert_close(sg, model[1].weight.detach()[pred].abs().view(3, 3, 4, 4), rtol=1e-6, atol=0)


def test_smoothgrad_matches_a_plain_loop_over_noisy_copies(resnet):
    x = images(n=2, side=32)
    pred, _ = predictions(resnet, x)
    sigma, samples = 0.2, 3
    ours = A.smoothgrad(
        resnet,
        x,
        pred,
        sigma=sigma,
        samples=samples,
        generator=torch.Generator().manual_seed(7),
        batch_size=4,
    )
    # reference: the same noise draws (one N x 3 x H x W tensor per sample), one copy at a time
    g = torch.Generator().manual_seed(7)
    std = sigma * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    total = torch.zeros_like(x)
    for _ in range(samples):
        noisy = x + torch.randn(x.shape, generator=g) * std.view(-1, 1, 1, 1)
        for i in range(len(x)):
            xi = noisy[i : i + 1].clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(resnet(xi)[0, pred[i]], xi)
            total[i] += grad[0].abs()
    torch.testing.assert_close(ours, total / samples, rtol=1e-4, atol=1e-7)


def test_smoothgrad_is_deterministic_given_the_seed_and_independent_of_batch_size(resnet):
    x = images(n=2, side=32)
    pred, _ = predictions(resnet, x)
    a = A.smoothgrad(resnet, x, pred, samples=4, seed=1, batch_size=2)
    b = A.smoothgrad(resnet, x, pred, samples=4, seed=1, batch_size=64)
    c = A.smoothgrad(resnet, x, pred, samples=4, seed=2, batch_size=64)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(b, c)


# ---------------------------------------------------------------- integrated gradients


def test_black_baseline_is_pixel_zero_after_imagenet_normalisation():
    b = A.black_baseline(torch.zeros(2, 3, 5, 5))
    for c, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        assert torch.allclose(b[:, c], torch.full((2, 5, 5), -m / s))


def test_trapezoid_rule_weights():
    alphas, weights = A.trapezoid_rule(5)
    assert alphas.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert weights.tolist() == [0.125, 0.25, 0.25, 0.25, 0.125]


def test_ig_of_a_quadratic_is_exact_with_the_trapezoid_rule():
    # the integrand 2(b + a(x - b)) is linear in a, so the trapezoid rule is exact for any steps
    x = images(n=2, side=3, dtype=torch.float64)
    b = images(n=2, side=3, seed=5, dtype=torch.float64)
    attr = A.integrated_gradients(Quadratic(), x, torch.zeros(2, dtype=torch.long), steps=3, baseline=b)
    torch.testing.assert_close(attr, x**2 - b**2, rtol=1e-12, atol=1e-12)


def test_ig_of_a_linear_model_is_input_minus_black_times_weight():
    model = linear_model()
    x = images(n=3, side=4)
    pred, _ = predictions(model, x)
    attr = A.integrated_gradients(model, x, pred, steps=4)
    expected = (x - A.black_baseline(x)) * model[1].weight.detach()[pred].view(3, 3, 4, 4)
    torch.testing.assert_close(attr, expected, rtol=1e-5, atol=1e-6)
    err = A.ig_completeness_error(model, x, pred, attributions=attr)
    assert (err["rel"] < 1e-4).all()


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_ig_matches_captum_riemann_trapezoid(dtype, rtol):
    captum_attr = pytest.importorskip("captum.attr", reason="captum (test-only oracle) is not installed")
    model = small_resnet(dtype=dtype)
    x = images(n=2, side=24, dtype=dtype)
    pred, _ = predictions(model, x)
    steps = 8
    ours = A.integrated_gradients(model, x, pred, steps=steps, batch_size=5)
    ig = captum_attr.IntegratedGradients(model)
    theirs = ig.attribute(
        x, baselines=A.black_baseline(x), target=pred, n_steps=steps, method="riemann_trapezoid"
    )
    # captum's trapezoid uses the same points, linspace(0, 1, n), but weights 1/n with 1/(2n) at
    # both ends, which add up to (n-1)/n instead of 1; ours are the textbook 1/(n-1), halved at
    # the ends. So the two differ by exactly the factor n/(n-1).
    theirs = theirs * steps / (steps - 1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=rtol * float(theirs.abs().max()))
    # completeness: our helper against captum's own convergence delta for our attributions
    err = A.ig_completeness_error(model, x, pred, attributions=ours)
    delta = ig.compute_convergence_delta(ours, A.black_baseline(x), x, target=pred)
    torch.testing.assert_close(err["abs"], delta.abs().to(dtype), rtol=rtol * 10, atol=rtol * 10)


def test_ig_with_many_steps_agrees_with_captum_default_gauss_legendre():
    captum_attr = pytest.importorskip("captum.attr", reason="captum (test-only oracle) is not installed")
    model = small_resnet(dtype=torch.float64)
    x = images(n=1, side=16, dtype=torch.float64)
    pred, _ = predictions(model, x)
    ours = A.integrated_gradients(model, x, pred, steps=64, batch_size=64)
    theirs = captum_attr.IntegratedGradients(model).attribute(
        x, baselines=A.black_baseline(x), target=pred, n_steps=64, internal_batch_size=64
    )
    # two different quadratures of the same integral: close, not equal (ReLU kinks)
    cos = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0)
    assert cos > 0.99
    err = A.ig_completeness_error(model, x, pred, attributions=ours)
    assert (err["rel"] < 0.1).all()


# ---------------------------------------------------------------- Grad-CAM and its layer


def test_gradcam_matches_captum_layergradcam_on_resnet_layer4(resnet):
    captum_attr = pytest.importorskip("captum.attr", reason="captum (test-only oracle) is not installed")
    x = images(side=96)  # layer4 is 3 x 3 here
    pred, _ = predictions(resnet, x)
    ours = A.gradcam(resnet, x, pred, layer="layer4")
    cam = captum_attr.LayerGradCam(resnet, resnet.layer4).attribute(x, target=pred, relu_attributions=True)
    theirs = captum_attr.LayerAttribution.interpolate(cam, (96, 96), interpolate_mode="bilinear")
    assert ours.shape == (3, 1, 96, 96) and (ours >= 0).all()
    assert ours.max() > 0
    torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-6 * float(theirs.detach().abs().max()))


def test_gradcam_on_other_families_matches_captum():
    captum_attr = pytest.importorskip("captum.attr", reason="captum (test-only oracle) is not installed")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=2).eval()
    assert A.default_gradcam_layer(model) is model.features[-1]
    x = images(n=2, side=64)
    pred, _ = predictions(model, x)
    ours = A.gradcam(model, x, pred, layer=model.features[-1])
    cam = captum_attr.LayerGradCam(model, model.features[-1]).attribute(
        x, target=pred, relu_attributions=True
    )
    theirs = captum_attr.LayerAttribution.interpolate(cam, (64, 64), interpolate_mode="bilinear")
    theirs = theirs.detach()
    assert theirs.max() > 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 * float(theirs.abs().max()))


def test_default_gradcam_layer(resnet):
    assert A.default_gradcam_layer(resnet) is resnet.layer4
    plain = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    assert A.default_gradcam_layer(plain) is plain[2]
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        A.default_gradcam_layer(linear_model())


# (input side, auto's layer, its grid): auto takes the deepest block whose grid is at least 7 x 7; at 16 px
# none is, so the largest grid, the deeper of equals (maxpool and layer1 are both 4 x 4)
AUTO = [
    (224, "layer4", (7, 7)),
    (190, "layer3", (12, 12)),
    (96, "layer2", (12, 12)),
    (48, "layer1", (12, 12)),
]


@pytest.mark.parametrize("size,layer,grid", [*AUTO, (16, "layer1", (4, 4))])
def test_auto_layer_is_the_deepest_block_at_least_7_wide(resnet, size, layer, grid):
    found = A.resolve_cam_layer(resnet, "auto", size=size)
    sizes = A.layer_grids(resnet, ["layer1", "layer2", "layer3", "layer4"], size=size)
    assert (found.name, found.grid, found.asked) == (layer, sizes[layer], "auto") and found.grid == grid
    assert A.resolve_cam_layer(resnet, None, size=size) == found
    blocks = ["layer1", "layer2", "layer3", "layer4"]
    deeper = blocks[blocks.index(layer) + 1 :]
    assert all(min(sizes[d]) < A.AUTO_MIN_GRID for d in deeper)
    # the library's default is auto at the inputs' size
    x = images(n=1, side=size)
    torch.testing.assert_close(A.gradcam(resnet, x, [0]), A.gradcam(resnet, x, [0], layer=layer))


def test_auto_layer_of_a_features_model():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=2).eval()
    found = A.resolve_cam_layer(model, "auto", size=224)
    assert found.name.startswith("features.") and min(found.grid) >= A.AUTO_MIN_GRID
    assert found.grid == (7, 7)


def test_a_named_layer_is_checked_against_the_model(resnet):
    assert A.resolve_cam_layer(resnet, "layer3", size=64) == A.CamLayer("layer3", (4, 4), "layer3")
    assert A.resolve_cam_layer(resnet, "layer4.1.conv2", size=64).grid == (2, 2)
    for bad, why in (("layer5", "has no module of that name"), ("fc", "has no feature map")):
        with pytest.raises(ParamsError) as err:
            A.resolve_cam_layer(resnet, bad, size=64)
        line = str(err.value)
        assert "\n" not in line and f"saliency.gradcam_layer = '{bad}'" in line and why in line
        assert "maxpool, layer1, layer2, layer3, layer4" in line


def test_gradcam_by_layer_name_and_hooks_removed_even_on_error(resnet):
    x = images(n=1, side=64)
    pred, _ = predictions(resnet, x)
    torch.testing.assert_close(
        A.gradcam(resnet, x, pred, layer="layer3"), A.gradcam(resnet, x, pred, layer=resnet.layer3)
    )
    assert not resnet.layer3._forward_hooks
    stray = nn.Conv2d(3, 3, 1)  # never called by the model's forward
    with pytest.raises(ValueError, match="not called"):
        A.gradcam(resnet, x, pred, layer=stray)
    assert not stray._forward_hooks


# ---------------------------------------------------------------- the CAM family against pytorch-grad-cam

CAMS = ["gradcam", "gradcam_plusplus", "hirescam", "layercam"]


def grad_cam_oracle(name, model, layer, x, target):
    """pytorch-grad-cam's map for `name` (its own hooks): (the ReLU'd map on the layer's grid, from its
    stored activations and gradients; the full output, min-max scaled and resized by cv2)."""
    pgc = pytest.importorskip("pytorch_grad_cam", reason="grad-cam (test-only oracle) is not installed")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {"gradcam": "GradCAM", "gradcam_plusplus": "GradCAMPlusPlus", "hirescam": "HiResCAM"}
    module = model.get_submodule(layer)
    with getattr(pgc, cls.get(name, "LayerCAM"))(model=model, target_layers=[module]) as explainer:
        full = explainer(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in target])
        stored = explainer.activations_and_grads
        acts, grads = stored.activations[0].numpy(), stored.gradients[0].numpy()
        grid = np.maximum(explainer.get_cam_image(x, module, None, acts, grads, False), 0)
    return torch.from_numpy(grid), torch.from_numpy(full)


def boosted(model, factor=1e3):
    """A copy with the head's weights and bias times `factor`: every gradient into the body is `factor`
    times larger (the prediction and the Grad-CAM, HiResCAM and LayerCAM maps only scale)."""
    copy = small_resnet()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        copy.fc.weight.mul_(factor)
        copy.fc.bias.mul_(factor)
    return copy


@pytest.mark.parametrize("name", CAMS)
@pytest.mark.parametrize("layer", ["layer2", "layer3"])
def test_cam_family_matches_pytorch_grad_cam(resnet, name, layer):
    """On the layer's grid, before any upsampling: within 1e-6 of each image's map max (float32 rounding;
    measured 4e-7). Grad-CAM++ on a model whose head is 1000 times larger: 1e-4 (measured 2e-5), because
    pytorch-grad-cam adds 1e-6 to alpha's denominator 2 g^2 + sum(A) g^3 and we do not (the authors'
    code only replaces a zero denominator): with this model's gradients, g ~ 2e-3, the 1e-6 changes alpha
    by up to ~10%, with the boosted head's g ~ 2 by ~1e-7 (the hand-written check below shows that the
    1e-6 is the whole difference). The full maps: pytorch-grad-cam min-max scales the grid, resizes it
    with cv2 (bilinear, half-pixel centres, as torch's align_corners=False) and min-max scales again,
    which equals min-max scaling our upsampled map: within 1e-5 (its 1e-7 in the scaling's divisor)."""
    model = boosted(resnet) if name == "gradcam_plusplus" else resnet
    x = images(n=3, side=64)
    pred, _ = predictions(model, x)
    grid, full = grad_cam_oracle(name, model, layer, x, pred)
    ours = A.cam(model, x, pred, rule=name, layer=layer, upsample=False)[:, 0]
    assert ours.shape == grid.shape == (3, *A.layer_grids(model, [layer], size=64)[layer])
    scale = grid.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    assert ((ours - grid).abs() / scale).max() <= (1e-4 if name == "gradcam_plusplus" else 1e-6)
    up = A.cam(model, x, pred, rule=name, layer=layer)[:, 0]
    low = up.flatten(1).amin(1).view(-1, 1, 1)
    scaled = (up - low) / (1e-7 + (up - low).flatten(1).amax(1).view(-1, 1, 1))
    assert (scaled - full).abs().max() <= (1e-3 if name == "gradcam_plusplus" else 1e-5)


def test_gradcam_plusplus_differs_from_pytorch_grad_cam_only_by_its_epsilon(resnet):
    """pytorch-grad-cam's Grad-CAM++ on the unboosted model is ours with 1e-6 added to alpha's
    denominator (within 1e-6 of the map max): the one deliberate difference."""
    x = images(n=3, side=64)
    pred, _ = predictions(resnet, x)
    grid, _ = grad_cam_oracle("gradcam_plusplus", resnet, "layer2", x, pred)
    acts, grads = A.layer_gradients(resnet, x, pred, layer=resnet.layer2)
    g2 = grads * grads
    alpha = torch.where(grads != 0, g2 / (2 * g2 + acts.sum((2, 3), keepdim=True) * g2 * grads + 1e-6), 0.0)
    weights = (alpha * torch.relu(grads)).sum((2, 3), keepdim=True)
    with_eps = torch.relu((weights * acts).sum(1))
    scale = grid.flatten(1).amax(1).view(-1, 1, 1)
    assert ((with_eps - grid).abs() / scale).max() <= 1e-6
    ours = A.cam(resnet, x, pred, rule="gradcam_plusplus", layer="layer2", upsample=False)[:, 0]
    assert ((ours - grid).abs() / scale).max() > 1e-3  # the epsilon matters at these gradients


def test_cam_rules_by_hand():
    """A 1-channel, 2 x 2 layer: Grad-CAM weights by the mean gradient, HiResCAM and LayerCAM per location,
    Grad-CAM++ by alpha = g^2 / (2 g^2 + sum(A) g^3) times ReLU(g)."""
    acts = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    grads = torch.tensor([[[[0.5, -1.0], [0.0, 2.0]]]])
    assert A.CAM_RULES["gradcam"](acts, grads).flatten().tolist() == [0.375, 0.75, 1.125, 1.5]
    assert A.CAM_RULES["hirescam"](acts, grads).flatten().tolist() == [0.5, -2.0, 0.0, 8.0]
    assert A.CAM_RULES["layercam"](acts, grads).flatten().tolist() == [0.5, 0.0, 0.0, 8.0]
    # sum(A) = 10: alpha = 0.25 / (0.5 + 1.25) at 0.5, 4 / (8 + 80) at 2, 0 where g = 0
    weight = 0.25 / 1.75 * 0.5 + 4 / 88 * 2
    expected = [weight * a for a in (1.0, 2.0, 3.0, 4.0)]
    torch.testing.assert_close(A.CAM_RULES["gradcam_plusplus"](acts, grads).flatten(), torch.tensor(expected))


# ---------------------------------------------------------------- captum's occlusion and GradientSHAP


class ChannelSum(nn.Module):
    """logits = [sum of all pixels of all channels weighted by w (3 x H x W), 0]."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_occlusion_of_a_linear_model_by_hand():
    """Non-overlapping 2 x 2 windows on a 4 x 4 image: each pixel's value is the logit drop when its
    window (all channels) is set to 0, sum(w * x) over the window."""
    g = torch.Generator().manual_seed(0)
    model = ChannelSum(torch.randn(3, 4, 4, generator=g))
    x = torch.randn(2, 3, 4, 4, generator=g)
    maps = A.occlusion(model, x, [0, 0], window=2, stride=2)
    contrib = (x * model.w.detach()).sum(1)  # N x 4 x 4
    drop = contrib.view(2, 2, 2, 2, 2).sum((2, 4))  # per window
    expected = drop.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]
    assert maps.shape == (2, 1, 4, 4)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)


def test_occlusion_runs_the_passes_its_cost_says():
    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.images = inner, 0

        def forward(self, x):
            self.images += x.shape[0]
            return self.inner(x)

    model = Counting(small_resnet())
    x = images(n=2, side=48)
    A.occlusion(model, x, [0, 1], window=8, stride=4, batch_size=16)
    settings = {"occlusion_window": 8, "occlusion_stride": 4}
    assert A.occlusion_windows(48, window=8, stride=4) == 11**2
    assert model.images == 2 * A.METHODS["occlusion"].passes(size=48, **settings) == 2 * (1 + 121)
    assert A.METHODS["occlusion"].passes(**settings) == 1 + 55**2  # 224 px unless told
    assert A.occlusion_windows(20, window=32, stride=16) == 1  # the window is clipped to the image


def test_gradient_shap_is_captum_with_our_draws(resnet):
    """The adapter is captum's GradientShap, given the baselines and the numpy seed drawn from the
    generator, image by image: recomputed here by hand, equal."""
    from captum.attr import GradientShap

    x = images(n=2, side=32)
    pred, _ = predictions(resnet, x)
    ours = A.gradient_shap(resnet, x, pred, samples=4, seed=5)
    gen, by_hand = torch.Generator().manual_seed(5), []
    for i in range(2):
        base = A.shap_baselines(x[i : i + 1], generator=gen)
        draw = int(torch.randint(2**31 - 1, (1,), generator=gen))
        np.random.seed(draw)
        torch.manual_seed(draw)
        attr = GradientShap(resnet).attribute(
            x[i : i + 1], baselines=base, n_samples=4, stdevs=0.0, target=pred[i : i + 1]
        )
        by_hand.append(attr.detach())
    torch.testing.assert_close(ours, torch.cat(by_hand))
    # draws go image by image: with samples <= batch_size the batching of the images does not matter
    one, two = (
        A.explain("gradient_shap", resnet, x, target=pred, seed=5, batch_size=bs, gradshap_samples=1)
        for bs in (1, 2)
    )
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-7)


def test_gradient_shap_leaves_the_global_generators_alone_and_sums_to_the_output_difference():
    """Completeness in expectation: for a linear model, sum(attr) = f(x) - mean over the drawn baselines of
    f(b); with many draws that tends to f(x) - the mean of f over the 8 baselines."""
    g = torch.Generator().manual_seed(0)
    model = ChannelSum(torch.randn(3, 8, 8, generator=g))
    x = torch.randn(1, 3, 8, 8, generator=g)
    torch.manual_seed(123)
    np.random.seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy())
    attr = A.gradient_shap(model, x, [0], samples=2000, seed=1, batch_size=500)
    assert torch.equal(torch.get_rng_state(), before[0]) and (np.random.get_state()[1] == before[1]).all()
    base = A.shap_baselines(x, generator=torch.Generator().manual_seed(1))
    f = lambda t: model(t)[:, 0].detach()  # noqa: E731
    spread = float(f(base).std())
    assert abs(float(attr.sum()) - float(f(x) - f(base).mean())) < 0.1 * spread


def test_library_adapters_import_captum_only_when_run():
    import subprocess
    import sys

    code = "import sys, cnnlens.attribution, cnnlens.quality; print('captum' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- every method: shape, target, seed

SHAPES = {"gradient": 3, "smoothgrad": 3, "integrated_gradients": 3, "gradient_shap": 3, "occlusion": 1}
FAST = {
    "smoothgrad_samples": 3,
    "ig_steps": 4,
    "gradshap_samples": 3,
    "occlusion_window": 8,
    "occlusion_stride": 8,
}


@pytest.mark.parametrize("name", list(A.METHODS))
def test_every_method_shape_target_and_seed(resnet, name):
    x = images(n=2, side=48)
    explain = lambda target, seed=0, bs=2: A.explain(  # noqa: E731
        name, resnet, x, target=torch.tensor(target), seed=seed, batch_size=bs, **FAST
    )
    maps = explain([0, 0])
    assert maps.shape == (2, SHAPES.get(name, 1), 48, 48) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.abs().amax((1, 2, 3)).min() > 0
    assert not torch.allclose(maps, explain([1, 1]))  # the map explains the class asked for
    if not A.METHODS[name].seeded:  # batching changes nothing (occlusion: logit differences, rounded)
        torch.testing.assert_close(
            explain([0, 0], bs=1), maps, rtol=1e-4, atol=2e-5 if name == "occlusion" else 1e-6
        )
    assert torch.equal(explain([0, 0]), maps)  # deterministic under the seed
    if A.METHODS[name].seeded:
        assert not torch.allclose(explain([0, 0], seed=1), maps)


def test_settings_validate_and_methods_register_with_config():
    from cnnlens.config import parse_params

    with pytest.raises(TypeError, match="unknown method setting"):
        A.attribute("gradient", small_resnet(), images(n=1, side=32), target=[0], gradcam_layr="layer3")
    parsed = parse_params({"saliency": {"methods": list(A.METHODS), "gradcam_layer": "layer3"}})
    assert parsed.saliency.methods == list(A.METHODS) and parsed.saliency.gradcam_layer == "layer3"
    assert {"gradcam_plusplus", "hirescam", "layercam", "occlusion", "gradient_shap"} <= set(A.METHODS)
    assert set(A.SETTINGS) - {"gradcam_layer"} <= {
        f.name for f in __import__("dataclasses").fields(parsed.saliency)
    }


# ---------------------------------------------------------------- the model is left alone


@pytest.mark.parametrize("name", list(A.METHODS))
def test_methods_leave_the_model_unchanged_and_in_eval_mode(name):
    model = small_resnet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(n=2, side=32)
    A.METHODS[name].fn(model, x, torch.tensor([0, 1]), samples=2, steps=2, seed=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


# ---------------------------------------------------------------- dispatch and cost


def test_attribute_and_explain_take_plain_settings():
    """No params object: the settings are keyword arguments, the library runs without params.yaml."""
    model = small_resnet()
    x = images(n=3, side=32)
    pred, _ = predictions(model, x)
    settings = {"ig_steps": 3, "smoothgrad_samples": 2, "smoothgrad_sigma": 0.1}
    torch.testing.assert_close(
        A.attribute("integrated_gradients", model, x, target=pred, **settings),
        A.integrated_gradients(model, x, pred, steps=3),
    )
    torch.testing.assert_close(
        A.attribute(
            "smoothgrad", model, x, target=pred, generator=torch.Generator().manual_seed(4), **settings
        ),
        A.smoothgrad(model, x, pred, sigma=0.1, samples=2, seed=4),
    )
    torch.testing.assert_close(A.attribute("gradient", model, x, target=pred), A.gradient(model, x, pred))
    assert A.attribute("gradcam", model, x, target=pred).shape == (3, 1, 32, 32)
    with pytest.raises(ParamsError, match="unknown saliency method"):
        A.attribute("lime", model, x, target=pred)
    # explain: batch_size images at a time on the CPU, SmoothGrad's noise from a generator seeded with
    # `seed` on every call (one batch's noise continues into the next)
    maps = A.explain("smoothgrad", model, x, target=pred, seed=4, batch_size=2, **settings)
    assert maps.device.type == "cpu" and maps.shape == x.shape
    gen = torch.Generator().manual_seed(4)
    by_hand = [
        A.smoothgrad(model, xb, tb, sigma=0.1, samples=2, generator=gen)
        for xb, tb in zip(x.split(2), pred.split(2))
    ]
    torch.testing.assert_close(maps, torch.cat(by_hand))
    torch.testing.assert_close(
        A.explain("integrated_gradients", model, x, target=pred, seed=0, batch_size=2, ig_steps=3),
        A.integrated_gradients(model, x, pred, steps=3),
    )


def test_passes_and_descriptions_take_plain_settings():
    settings = {"ig_steps": 20, "smoothgrad_samples": 9, "gradshap_samples": 7, "size": 48}
    passes = {
        name: m.passes(**settings, occlusion_window=8, occlusion_stride=4) for name, m in A.METHODS.items()
    }
    assert passes == {
        "gradient": 1,
        "smoothgrad": 9,
        "integrated_gradients": 20,
        "gradcam": 1,
        "gradcam_plusplus": 1,
        "hirescam": 1,
        "layercam": 1,
        "occlusion": 122,
        "gradient_shap": 7,
    }
    assert [n for n, m in A.METHODS.items() if not m.backward] == ["occlusion"]
    assert [n for n, m in A.METHODS.items() if m.seeded] == ["smoothgrad", "gradient_shap"]
    defaults = {name: m.passes() for name, m in A.METHODS.items()}  # the library's own defaults
    assert defaults["smoothgrad"] == A.SMOOTHGRAD_SAMPLES and defaults["integrated_gradients"] == A.IG_STEPS
    assert "9 noisy copies" in A.METHODS["smoothgrad"].describe(smoothgrad_samples=9, smoothgrad_sigma=0.2)
    assert "20 steps" in A.METHODS["integrated_gradients"].describe(ig_steps=20)
    assert A.pixel_note("gradient", None, None) == "max over R, G, B"
    model, x = small_resnet(), images(n=1, side=48)
    assert A.pixel_note("layercam", model, x) == "a 12 x 12 grid (layer1), upsampled"
    assert A.pixel_note("gradcam", model, x, gradcam_layer="layer3") == "a 3 x 3 grid (layer3), upsampled"
    assert "layer3's feature maps" in A.METHODS["hirescam"].describe(gradcam_layer="layer3")


# ---------------------------------------------------------------- normalise, combine, predict


def test_normalize_constant_maps_become_zeros_never_nan():
    maps = torch.stack([torch.full((3, 4, 4), 2.5), torch.zeros(3, 4, 4)])
    for mode in ("minmax", "percentile"):
        for per_channel in (False, True):
            out = normalize_maps(maps, mode=mode, per_channel=per_channel)
            assert torch.equal(out, torch.zeros_like(maps))


def test_normalize_minmax_per_image_and_per_channel():
    maps = torch.tensor([[[[0.0, 2.0]], [[4.0, 8.0]]]])  # 1 x 2 x 1 x 2
    assert normalize_maps(maps).tolist() == [[[[0.0, 0.25]], [[0.5, 1.0]]]]
    assert normalize_maps(maps, per_channel=True).tolist() == [[[[0.0, 1.0]], [[0.0, 1.0]]]]
    two = torch.stack([torch.arange(4.0).view(2, 2), 10 * torch.arange(4.0).view(2, 2) + 3])
    out = normalize_maps(two)  # N x H x W: each image on its own
    assert torch.allclose(out[0], out[1]) and out[0].max() == 1 and out[0].min() == 0


def test_normalize_percentile_clips_outliers_like_numpy():
    np = pytest.importorskip("numpy")
    v = torch.arange(100.0)
    v[-1] = 1e6  # one outlier
    out = normalize_maps(v.view(1, 10, 10), mode="percentile", percentile=90.0).flatten()
    ref = np.clip((v.numpy() - 0) / (np.percentile(v.numpy(), 90) - 0), 0, 1)
    assert torch.allclose(out, torch.from_numpy(ref).float(), atol=1e-6)
    # per image, at a percentile between two values (numpy's linear interpolation)
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 2, 5, 7, generator=g) ** 3
    out = normalize_maps(maps, mode="percentile", percentile=97.3)
    for i in range(3):
        m = maps[i].numpy()
        ref = np.clip((m - m.min()) / (np.percentile(m, 97.3) - m.min()), 0, 1)
        assert torch.allclose(out[i], torch.from_numpy(ref).float(), atol=1e-6)
    # a sparse map whose percentile equals its minimum falls back to the max
    sparse = torch.zeros(1, 10, 10)
    sparse[0, 0, 0] = 4.0
    assert normalize_maps(sparse, mode="percentile", percentile=99.0)[0, 0, 0] == 1.0


def test_combine_channels_is_the_max_over_channels():
    maps = torch.tensor([[[[1.0, 5.0]], [[3.0, 2.0]], [[0.0, 4.0]]]])  # 1 x 3 x 1 x 2
    assert combine_channels(maps).tolist() == [[[3.0, 5.0]]]
    assert combine_channels(torch.ones(2, 1, 3, 3)).shape == (2, 3, 3)


def test_predictions_are_the_max_logit_and_its_softmax_probability():
    class Fixed(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])

    pred, prob = predictions(Fixed(), torch.zeros(2, 3, 2, 2))
    assert pred.tolist() == [1, 0] and pred.dtype == torch.long
    e = torch.exp(torch.tensor(1.0))
    assert torch.allclose(prob, torch.stack([e / (1 + e + 1 / e), e * e / (e * e + 2)]))
