"""cnnlens/quality.py against hand-computed cases, scipy, normal theory and pytorch-grad-cam's ROAD (grad-cam,
a test-only oracle)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from conftest import small_resnet
from scipy import stats
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from cnnlens import attribution as A
from cnnlens import quality as Q
from cnnlens.model import predictions
from cnnlens.tensors import gaussian_blur as blur

# the cascade of the model-randomisation check on a ResNet: the trained model, then each block re-initialised
RANDOMIZED = ["original", "fc", "layer4", "layer3", "layer2", "layer1", "conv1+bn1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


class MeanPixelModel(nn.Module):
    """P(class 0) = 0.1 + 0.8 * mean of channel 0 (inputs in [0, 1]); logits = log-probabilities,
    so the softmax gives that probability back exactly."""

    def forward(self, x):
        p = 0.1 + 0.8 * x[:, 0].flatten(1).mean(1)
        return torch.stack([p.log(), (1 - p).log()], dim=1)


def two_by_two():
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 0.5], [0.25, 0.0]])
    x[0, 1:] = 0.3  # ignored by the model
    return x


def test_deletion_and_insertion_by_hand():
    x = two_by_two()
    target = torch.tensor([0])
    good = x[:, 0].clone()  # ranks the pixels 1.0, 0.5, 0.25, 0.0
    out = Q.deletion_insertion(
        MeanPixelModel(), x, target, maps=good, steps=4, insertion_start=torch.zeros_like(x)
    )
    # deletion removes one pixel per step: channel-0 sums 1.75, 0.75, 0.25, 0, 0 over 4 pixels,
    # p = 0.1 + 0.8 * sum / 4
    assert torch.allclose(out["deletion_curve"], torch.tensor([[0.45, 0.25, 0.15, 0.10, 0.10]]))
    # trapezoid, dx = 1/4: (0.45/2 + 0.25 + 0.15 + 0.10 + 0.10/2) / 4
    assert torch.allclose(out["deletion_auc"], torch.tensor([0.19375]))
    # insertion from zeros puts back 1.0, then 0.5, 0.25, 0.0: sums 0, 1, 1.5, 1.75, 1.75
    assert torch.allclose(out["insertion_curve"], torch.tensor([[0.10, 0.30, 0.40, 0.45, 0.45]]))
    assert torch.allclose(out["insertion_auc"], torch.tensor([0.35625]))
    assert torch.allclose(out["fractions"], torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))

    # the reversed ranking deletes the zero pixel first: sums 1.75, 1.75, 1.5, 1.0, 0
    bad = Q.deletion_insertion(
        MeanPixelModel(), x, target, maps=-good, steps=4, insertion_start=torch.zeros_like(x)
    )
    assert torch.allclose(bad["deletion_curve"], torch.tensor([[0.45, 0.45, 0.40, 0.30, 0.10]]))
    assert torch.allclose(bad["deletion_auc"], torch.tensor([0.35625]))


def test_deletion_rounds_the_pixel_count_when_steps_do_not_divide_it():
    x = two_by_two()
    out = Q.deletion_insertion(MeanPixelModel(), x, torch.tensor([0]), maps=x[:, 0], steps=3)
    # round(4 * k / 3) = 0, 1, 3, 4 pixels deleted: sums 1.75, 0.75, 0.0, 0.0
    assert torch.allclose(out["deletion_curve"], torch.tensor([[0.45, 0.25, 0.10, 0.10]]))


def test_insertion_starts_from_the_default_blur_and_ends_at_the_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    target = torch.zeros(3, dtype=torch.long)
    maps = torch.rand(3, 32, 32, generator=g)
    model = MeanPixelModel()
    out = Q.deletion_insertion(model, x, target, maps=maps, steps=5)
    k, s = Q.default_blur(32)
    assert k % 2 == 1 and 3 <= k <= 7  # about 1/8 of the side
    blurred = gaussian_blur(x, [k, k], [s, s])
    prob = lambda im: torch.softmax(model(im), 1)[:, 0]
    assert torch.allclose(out["insertion_curve"][:, 0], prob(blurred), atol=1e-6)
    assert torch.allclose(out["insertion_curve"][:, -1], prob(x), atol=1e-6)
    assert torch.allclose(out["deletion_curve"][:, 0], prob(x), atol=1e-6)
    assert torch.allclose(out["deletion_curve"][:, -1], prob(torch.zeros_like(x)), atol=1e-6)
    # chunking does not change the result
    small = Q.deletion_insertion(model, x, target, maps=maps, steps=5, batch_size=1)
    for key in ("deletion_curve", "insertion_curve"):
        assert torch.allclose(small[key], out[key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_insertion_blur_is_torchvision_s_to_the_bit(dtype):
    """cnnlens.tensors.gaussian_blur (no torchvision import) gives torchvision's numbers exactly, for
    every default_blur kernel up to 256 px crops (3..33 px) and two explicit kernel_size/blur_sigma."""
    g = torch.Generator().manual_seed(0)
    cases = [Q.default_blur(side) + (side,) for side in (8, 16, 32, 48, 64, 96, 128, 160, 224, 256)]
    for k, sigma, side in [*cases, (5, 2.0, 20), (3, 1, 9)]:
        x = torch.randn(2, 3, side, side, generator=g, dtype=dtype)
        ours = blur(x, kernel_size=k, sigma=sigma)
        assert torch.equal(ours, gaussian_blur(x, [k, k], [sigma, sigma])), (k, sigma, side)
        assert ours.dtype == dtype and ours.shape == x.shape


class CountingModel(MeanPixelModel):
    """MeanPixelModel that counts the images it is given and keeps its batch sizes."""

    def __init__(self):
        super().__init__()
        self.images, self.batches = 0, []

    def forward(self, x):
        self.images += len(x)
        self.batches.append(len(x))
        return super().forward(x)


def test_the_curve_ends_run_once_and_are_shared_by_every_map():
    """The image, its blurred start and the deleted image are the curves' ends whatever the map: one
    forward each (the deleted image once for all images), and with `ends` given none at all."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    target = torch.zeros(3, dtype=torch.long)
    model = CountingModel()
    out = Q.deletion_insertion(model, x, target, maps=torch.rand(3, 16, 16, generator=g), steps=4)
    assert model.images == 2 * 3 * (4 - 1) + 2 * 3 + 1
    ends = Q.curve_ends(model, x, start=Q.insertion_start_of(x), deletion_value=0.0, batch_size=2)
    maps = torch.rand(3, 16, 16, generator=g)
    model.images = 0
    given = Q.deletion_insertion(model, x, target, maps=maps, steps=4, ends=ends)
    assert model.images == 2 * 3 * (4 - 1)
    found = Q.deletion_insertion(model, x, target, maps=maps, steps=4)
    for key in ("deletion_curve", "insertion_curve"):
        assert torch.equal(given[key], found[key]) and given[key].shape == out[key].shape
    model.batches = []  # 7 images in forwards of at most 3: evenly, not 3, 3 and 1 alone
    Q.curve_ends(model, x, start=x, deletion_value=0.0, batch_size=3)
    assert model.batches == [3, 2, 2]


def test_scored_images_compute_the_curve_ends_once_for_every_map():
    from cnnlens.tensors import Split

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 20, 20), generator=g, dtype=torch.uint8)
    split = Split(images, torch.zeros(4, dtype=torch.long), [f"val/a/{i}.jpg" for i in range(4)], None)
    model = CountingModel()
    predict = {"input_size": 16, "loss": "cross_entropy", "batch_size": 4}
    scored = Q.ScoredImages(model, split, torch.device("cpu"), index=torch.arange(4), **predict)
    kw = {"steps": 4, "seed": 0, "batch_size": 4, "bootstrap": 20}
    sources = [Q.baseline_source("random", seed=0), Q.baseline_source("center", seed=0)]
    model.images = 0
    shared = [Q.score_maps(model, scored, source, **kw) for source in sources]
    assert model.images == 2 * 4 + 1 + len(sources) * 2 * 4 * (4 - 1)
    alone = [Q.score_maps(model, [scored.first], source, **kw) for source in sources]
    assert shared == alone
    assert scored.curve_ends(MeanPixelModel(), scored.first, batch_size=4) is None  # another model's


def test_a_map_that_follows_the_model_beats_the_random_and_centre_baselines():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 16, 16, generator=g)
    target = torch.zeros(4, dtype=torch.long)
    model = MeanPixelModel()
    score = lambda maps: Q.deletion_insertion(
        model, x, target, maps=maps, steps=8, insertion_start=torch.zeros_like(x)
    )
    good = score(x[:, 0])
    for baseline in (
        Q.random_maps(4, 16, 16, generator=torch.Generator().manual_seed(2)),
        Q.center_prior_maps(4, 16, 16),
    ):
        base = score(baseline)
        assert (good["deletion_auc"] < base["deletion_auc"]).all()
        assert (good["insertion_auc"] > base["insertion_auc"]).all()
    assert Q.deletion_insertion_passes(16) == 34


def test_ties_are_broken_in_raster_order_or_at_random_with_a_generator():
    flat = torch.zeros(1, 2, 3)
    assert Q.pixel_order(flat).tolist() == [[0, 1, 2, 3, 4, 5]]
    order = Q.pixel_order(flat, torch.Generator().manual_seed(0))
    assert sorted(order[0].tolist()) == [0, 1, 2, 3, 4, 5]
    m = torch.tensor([[[1.0, 3.0, 3.0], [2.0, 0.0, 3.0]]])
    order = Q.pixel_order(m, torch.Generator().manual_seed(0))[0].tolist()
    assert sorted(order[:3]) == [1, 2, 5] and order[3:] == [3, 0, 4]


# ---------------------------------------------------------------- baselines


def test_random_and_centre_prior_maps():
    a = Q.random_maps(2, 5, 6, generator=torch.Generator().manual_seed(3))
    b = Q.random_maps(2, 5, 6, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 5, 6) and torch.equal(a, b) and not torch.equal(a[0], a[1])
    c = Q.center_prior_maps(2, 5, 7, sigma_frac=0.5)
    assert c.shape == (2, 5, 7) and torch.equal(c[0], c[1])
    assert c[0, 2, 3] == 1.0 and c[0].argmax() == 2 * 7 + 3
    s = 0.5 * 5
    assert torch.isclose(c[0, 0, 0], torch.tensor(math.exp(-(2**2 + 3**2) / (2 * s * s))))
    assert torch.equal(c[0], c[0].flip(0)) and torch.equal(c[0], c[0].flip(1))


# ---------------------------------------------------------------- Spearman and randomisation


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 8, 8, generator=g)
    b = a + 0.5 * torch.rand(3, 8, 8, generator=g)
    b[1] = torch.round(b[1] * 3)  # many ties
    a[2] = torch.round(a[2] * 4)
    ours = Q.spearman(a, b)
    for i in range(3):
        ref = stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert abs(float(ours[i]) - ref) < 1e-9
    assert Q.spearman(a[:1], -a[:1]).item() == pytest.approx(-1.0)
    assert Q.spearman(torch.ones(1, 4, 4), a[:1]).item() == 0.0  # undefined: reported as 0
    assert Q.spearman(a[:1], torch.zeros(1, 4, 4)).item() == 0.0
    # the hand-made rule it replaced: Pearson correlation of average ranks, to the last bits
    ra, rb = (stats.rankdata(t[0].flatten().numpy()) for t in (a, b))
    assert Q.spearman(a[:1], b[:1]).item() == pytest.approx(np.corrcoef(ra, rb)[0, 1], abs=1e-15)


def test_randomization_check_leaves_the_model_alone_and_starts_at_one():
    model = small_resnet(randomize_bn=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    pred, _ = predictions(model, x)
    result = Q.randomization_check(model, x, pred, method_fn=A.gradient, seed=0)
    assert [name for name, _ in result] == RANDOMIZED
    assert result[0][1] == pytest.approx(1.0, abs=1e-6)
    assert all(-1.0 <= rho <= 1.0 for _, rho in result)
    assert min(rho for _, rho in result[1:]) < 0.9  # randomising does change the maps
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert (
        Q.randomization_check(model, x, pred, method_fn=A.gradient, layer_order=["fc"], seed=0) == result[:2]
    )


def test_randomization_of_a_linear_head_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    pred, _ = predictions(model, x)
    assert Q.default_layer_order(model) == ["1"]
    result = Q.randomization_check(model, x, pred, method_fn=A.gradient, seed=5)
    # the gradient of a linear model is its weight row; re-drawn with the seed of step 1 (5 + 1)
    old = model[1].weight.detach().clone()
    fresh = nn.Linear(3 * 4 * 4, 3)
    torch.manual_seed(6)
    fresh.reset_parameters()
    combined = lambda w: w.abs().view(-1, 3, 4, 4).amax(1).flatten(1)
    expected = np.mean(
        [
            stats.spearmanr(
                combined(old[pred[i]][None])[0], combined(fresh.weight.detach()[pred[i]][None])[0]
            ).statistic
            for i in range(2)
        ]
    )
    assert result[0] == ("original", pytest.approx(1.0))
    assert result[1][0] == "1" and result[1][1] == pytest.approx(expected, abs=1e-9)


def test_default_layer_order_for_other_families():
    model = torchvision.models.mobilenet_v3_small(num_classes=2)
    order = Q.default_layer_order(model)
    assert order[0] == "classifier" and order[1] == f"features.{len(model.features) - 1}"
    assert order[-1] == "features.0"


# ---------------------------------------------------------------- pointing game and mass inside


def test_pointing_game_by_hand():
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1] = 1.0  # inside
    maps[1, 3, 3] = 1.0  # one pixel diagonal from the mask's corner (2, 2)
    maps[2, 0, 0] = maps[2, 1, 1] = 1.0  # a tie: the first in raster order, (0, 0), counts
    masks = torch.zeros(3, 4, 4, dtype=torch.uint8)
    masks[:, 1:3, 1:3] = 1
    assert Q.pointing_game(maps, masks).tolist() == [True, False, False]
    assert Q.pointing_game(maps, masks, tolerance=1).tolist() == [True, True, True]
    # channels are combined by their max first
    four = torch.zeros(1, 3, 4, 4)
    four[0, 2, 1, 2] = 5.0
    assert Q.pointing_game(four, masks[:1]).tolist() == [True]
    with pytest.raises(ValueError, match="differ in shape"):
        Q.pointing_game(maps, masks[:, :3])


def test_mass_inside_by_hand():
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    masks = torch.tensor([[[1, 0], [0, 1]], [[1, 1], [1, 1]], [[0, 1], [0, 0]]], dtype=torch.uint8)
    assert torch.allclose(Q.mass_inside(maps, masks), torch.tensor([0.5, 0.0, 0.25]))
    with pytest.raises(ValueError, match="non-negative"):
        Q.mass_inside(-maps, masks)


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_the_mean_and_shrinks_like_one_over_root_n():
    rng = np.random.default_rng(0)
    small = Q.bootstrap_ci(rng.normal(1.0, 2.0, 25), n_resamples=2000)
    large = Q.bootstrap_ci(rng.normal(1.0, 2.0, 2500), n_resamples=2000)
    for ci in (small, large):
        assert ci["low"] < ci["mean"] < ci["high"]
    assert small["n"] == 25 and large["n"] == 2500
    # the 95 % interval of a mean is about 2 * 1.96 * sd / sqrt(n)
    width = large["high"] - large["low"]
    assert width == pytest.approx(2 * 1.96 * 2.0 / math.sqrt(2500), rel=0.15)
    assert small["high"] - small["low"] > 5 * width
    assert Q.bootstrap_ci(torch.tensor([1.0, 2.0, 4.0]), seed=3) == Q.bootstrap_ci([1.0, 2.0, 4.0], seed=3)
    assert Q.bootstrap_ci([1.0, 2.0, 4.0])["mean"] == pytest.approx(7 / 3)
    empty = Q.bootstrap_ci([])
    assert empty["n"] == 0 and math.isnan(empty["mean"])


def test_bootstrap_ci_is_the_percentile_bootstrap_it_replaced():
    """scipy.stats.bootstrap draws the same resamples from the same seeded Generator as the hand-written
    loop did: the intervals agree to float rounding (scipy's 0.025 is 1 - 0.95 halved, 2e-17 off)."""
    v = np.random.default_rng(1).normal(size=40)
    rng = np.random.default_rng(7)
    means = v[rng.integers(0, v.size, size=(500, v.size))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    ci = Q.bootstrap_ci(v, n_resamples=500, seed=7)
    assert ci["mean"] == v.mean() and ci["n"] == 40
    assert ci["low"] == pytest.approx(low, rel=1e-14) and ci["high"] == pytest.approx(high, rel=1e-14)
    assert Q.bootstrap_ci([2.5]) == {"mean": 2.5, "low": 2.5, "high": 2.5, "n": 1}  # scipy needs two


# ---------------------------------------------------------------- scoring sources of maps


class Chunk:
    def __init__(self, x, pred, masks=None):
        self.x, self.pred, self.masks = x, pred, masks


def test_score_maps_scores_a_method_and_a_baseline_alike():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(5, 3, 12, 12, generator=g)
    pred = torch.zeros(5, dtype=torch.long)
    masks = torch.zeros(5, 12, 12, dtype=torch.uint8)
    masks[:, 3:9, 3:9] = 1
    model = MeanPixelModel()
    kw = {"steps": 4, "seed": 3, "batch_size": 4}
    for source in (Q.baseline_source("center", seed=3), lambda net, xx, t: xx[:, 0].clone()):
        maps = source(model, x, pred)
        raw = Q.quality_scores(model, x, pred, maps=maps, masks=masks, **kw)
        by_hand = {k: Q.bootstrap_ci(v, n_resamples=30, seed=3) for k, v in raw.items()}
        one = Q.score_maps(model, [Chunk(x, pred, masks)], source, bootstrap=30, **kw)
        assert one == by_hand and list(one) == [
            "deletion_auc",
            "insertion_auc",
            "pointing_game",
            "mass_inside",
        ]
        # chunks: the per-image scores of every chunk together, so the same numbers
        two = Q.score_maps(
            model,
            [Chunk(x[:2], pred[:2], masks[:2]), Chunk(x[2:], pred[2:], masks[2:])],
            source,
            bootstrap=30,
            **kw,
        )
        assert two == one
    extra = {"first_pixel": lambda net, chunk, maps: maps.flatten(1)[:, 0].double()}
    no_masks = Q.score_maps(
        model, [Chunk(x, pred)], Q.baseline_source("random", seed=0), bootstrap=30, extra=extra, **kw
    )
    assert list(no_masks) == ["deletion_auc", "insertion_auc", "first_pixel"]  # no masks: no pointing game


def test_headline_metrics_and_the_log_table_leave_out_what_does_not_apply():
    ci = lambda m: {"mean": m, "low": m - 0.1, "high": m + 0.1, "n": 4}
    full = {
        "gradient": {
            "deletion_auc": ci(0.2),
            "insertion_auc": ci(0.7),
            "randomization_rho": 0.1,
            "passes": {},
        },
        "gradcam": {"deletion_auc": ci(0.3), "insertion_auc": ci(0.6), "randomization_rho": None},
        "random": {"deletion_auc": ci(0.5), "insertion_auc": ci(0.5), "passes": {}},
        "center": {"deletion_auc": ci(0.4), "insertion_auc": ci(0.55)},
        "n_images": 2,
        "seconds": 3.5,
    }
    assert Q.headline_metrics(full, methods=["gradient", "gradcam"]) == {  # no timings: they differ per run
        "gradient": {"deletion_auc": 0.2},
        "gradcam": {"deletion_auc": 0.3},
        "random": {"deletion_auc": 0.5},
    }
    full["gradient"]["pointing_game"] = ci(0.75)
    full["gradcam"]["pointing_game"] = ci(float("nan"))  # no images scored: does not apply either
    headline = Q.headline_metrics(full, methods=["gradient", "gradcam"])
    assert headline["gradient"]["pointing_game"] == 0.75 and "pointing_game" not in headline["gradcam"]
    text = Q.quality_table_text({k: v for k, v in full.items() if k in ("gradient", "gradcam", "random")})
    rows = [[line.split()[0], line.split()[1:]] for line in text.splitlines()[2:]]
    assert rows == [  # best deletion AUC first; no ROAD here
        ["gradient", ["0.200", "0.700", "n/a", "n/a", "0.75", "0.10"]],
        ["gradcam", ["0.300", "0.600", "n/a", "n/a", "n/a", "n/a"]],
        ["random", ["0.500", "0.500", "n/a", "n/a", "n/a", "n/a"]],
    ]
    assert "nan" not in text and "ROAD MoRF" in text.splitlines()[0]
    table = Q.quality_table({"gradient": full["gradient"]})
    assert [list(row.values()) for row in table] == [
        ["gradient", "deletion_auc", 0.2, 0.1, 0.30000000000000004],
        ["gradient", "insertion_auc", 0.7, 0.6, 0.7999999999999999],
        ["gradient", "pointing_game", 0.75, 0.65, 0.85],
    ]
    assert all(list(row) == ["method", "metric", "mean", "low", "high"] for row in table)


def test_tables_are_sorted_best_deletion_first_and_the_headline_holds_road_and_the_cam_grid():
    ci = lambda m: {"mean": m, "low": m - 0.1, "high": m + 0.1, "n": 4}  # noqa: E731
    metrics = {
        "gradcam": {"deletion_auc": ci(0.6), "road_morf": ci(0.5), "road_lerf": ci(0.7), "passes": {}},
        "gradient": {"deletion_auc": ci(0.2), "road_morf": ci(0.3), "road_lerf": ci(0.8), "passes": {}},
        "random": {"deletion_auc": ci(0.5), "road_morf": ci(0.6), "road_lerf": ci(0.6), "passes": {}},
        "center": {"insertion_auc": ci(0.4), "passes": {}},  # no deletion AUC: last
    }
    assert Q.ranked(metrics) == ["gradient", "random", "gradcam", "center"]
    table = Q.quality_table(metrics)
    assert list(dict.fromkeys(r["method"] for r in table)) == ["gradient", "random", "gradcam", "center"]
    assert [r["metric"] for r in table if r["method"] == "gradcam"] == [
        "deletion_auc",
        "road_morf",
        "road_lerf",
    ]
    full = {**metrics, "gradcam_layer": {"name": "layer1", "grid": [12, 12], "asked": "auto"}, "seconds": 2.0}
    headline = Q.headline_metrics(full, methods=["gradcam", "gradient"])
    assert headline["gradcam"] == {"deletion_auc": 0.6}  # ROAD: in quality.json, not the headline
    assert headline["gradcam_grid"] == 12 and list(headline) == [
        "gradcam",
        "gradient",
        "random",
        "gradcam_grid",
    ]
    assert all(isinstance(v, (int, float)) for v in headline["gradcam"].values())  # DVC metrics: numbers only


# ---------------------------------------------------------------- ROAD


def grad_cam_road():
    """pytorch-grad-cam's ROAD pieces (test-only oracle)."""
    road = pytest.importorskip(
        "pytorch_grad_cam.metrics.road", reason="grad-cam (test-only oracle) is not installed"
    )
    from pytorch_grad_cam.metrics import perturbation_confidence as pc

    return road, pc


def test_imputation_matches_pytorch_grad_cam_noisy_linear_imputer():
    """The same linear system (ROAD's neighbour weights), solved in float64 by both (SuperLU, different
    orderings): equal to float32 rounding, 1e-6 (measured 1.2e-7)."""
    road, _ = grad_cam_road()
    g = torch.Generator().manual_seed(0)
    for shape, share in (((3, 40, 40), 0.3), ((3, 17, 23), 0.9), ((1, 8, 8), 0.05)):
        img = torch.randn(*shape, generator=g)
        removed = torch.rand(shape[1:], generator=g) < share
        ours = Q.noisy_linear_impute(img, removed, noise=0.0)
        theirs = road.NoisyLinearImputer(noise=0.0)(img, (~removed).float())  # its mask: 1 = kept
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        assert torch.equal(ours[:, ~removed], img[:, ~removed])


def test_imputation_by_hand_and_its_noise():
    img = torch.arange(25.0).view(1, 5, 5)
    removed = torch.zeros(5, 5, dtype=torch.bool)
    removed[2, 2] = removed[0, 0] = True
    out = Q.noisy_linear_impute(img, removed, noise=0.0)
    # inside: the weighted mean of the 8 neighbours (1/6 direct, 1/12 diagonal) of a linear ramp = the centre
    assert out[0, 2, 2].item() == pytest.approx(12.0)
    # a corner has 3 neighbours: (1/6 * 1 + 1/6 * 5 + 1/12 * 6) / (5/12)
    assert out[0, 0, 0].item() == pytest.approx((1 / 6 + 5 / 6 + 6 / 12) / (5 / 12))
    big = torch.zeros(3, 64, 64)
    removed = torch.rand(64, 64, generator=torch.Generator().manual_seed(1)) < 0.5
    noisy = Q.noisy_linear_impute(big, removed, noise=0.01, generator=torch.Generator().manual_seed(2))
    again = Q.noisy_linear_impute(big, removed, noise=0.01, generator=torch.Generator().manual_seed(2))
    assert torch.equal(noisy, again) and torch.equal(noisy[:, ~removed], big[:, ~removed])
    assert noisy[:, removed].std().item() == pytest.approx(0.01, rel=0.05)  # imputed 0 + N(0, 0.01^2)
    with pytest.raises(ValueError, match="every pixel"):
        Q.noisy_linear_impute(big, torch.ones(64, 64, dtype=torch.bool))


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_matches_pytorch_grad_cam_per_percentile(order):
    """ROAD on the same maps and model, no noise, against pytorch-grad-cam's ROADMostRelevantFirst /
    ROADLeastRelevantFirst at percentiles 90, 80, .. 10 (our fractions 10% .. 90% removed) with the
    softmax target: the same probabilities to 1e-5. At 40 x 40 its percentile threshold removes exactly
    our rounded count; at other sizes they can differ by a pixel, and on tied map values it removes every
    tie at the threshold where we break ties at random. Its mean over percentiles (ROAD*Average) is our
    score less the unperturbed probability it subtracts."""
    _, pc = grad_cam_road()
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = small_resnet()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 40, 40, generator=g)
    pred, prob = predictions(model, x)
    maps = torch.rand(2, 40, 40, generator=g)
    ours = Q.road(model, x, pred, maps=maps, steps=9, noise=0.0, batch_size=5)
    remove = pc.RemoveMostRelevantFirst if order == "morf" else pc.RemoveLeastRelevantFirst
    targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in pred]
    theirs = torch.stack(
        [
            torch.from_numpy(
                pc.PerturbationConfidenceMetric(remove(p, road.NoisyLinearImputer(noise=0.0)))(
                    x, maps.numpy(), targets, model, return_diff=False
                )
            )
            for p in (90, 80, 70, 60, 50, 40, 30, 20, 10)
        ],
        dim=1,
    )
    torch.testing.assert_close(ours[f"{order}_curve"], theirs, rtol=0, atol=1e-5)
    diff = (theirs - prob[:, None]).mean(1)  # what ROAD*Average returns (return_diff=True)
    torch.testing.assert_close(ours[order] - prob, diff, rtol=0, atol=1e-5)
    assert Q.road_fractions(9).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


def test_road_ranks_a_map_that_follows_the_model_above_the_baselines():
    """MeanPixelModel reads channel 0's mean: removing the brightest pixels first (a map = channel 0)
    and imputing them from their darker neighbours lowers the probability faster than removing random or
    central ones (MoRF lower), and removing the darkest first keeps it higher (LeRF higher)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 16, 16, generator=g)
    target = torch.zeros(4, dtype=torch.long)
    score = lambda maps: Q.road(  # noqa: E731
        MeanPixelModel(), x, target, maps=maps, steps=4, seed=0
    )
    good = score(x[:, 0])
    one = lambda i: Q.road(MeanPixelModel(), x[i : i + 1], target[:1], maps=x[i : i + 1, 0], steps=4)  # noqa: E731
    for baseline in (
        Q.random_maps(4, 16, 16, generator=torch.Generator().manual_seed(2)),
        Q.center_prior_maps(4, 16, 16),
    ):
        base = score(baseline)
        assert (good["morf"] < base["morf"]).all() and (good["lerf"] > base["lerf"]).all()
    assert good["morf_curve"].shape == (4, 4) and Q.road_passes(4) == 8
    assert torch.equal(score(x[:, 0])["morf"], good["morf"])  # seeded: the same noise and tie order
    one_by_one = torch.cat([one(i)["morf"] for i in range(4)])
    assert torch.equal(one_by_one, good["morf"])  # an image's score does not depend on its batch


def test_road_factorises_each_mask_once_for_images_ranked_alike(monkeypatch):
    """The centre prior ranks every image alike: its 2 x steps masks are factorised once for all images,
    and each image's scores are the ones it gets alone (the same system, its own right-hand side)."""
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    target = torch.zeros(3, dtype=torch.long)
    maps = Q.center_prior_maps(3, 16, 16)
    alone = [Q.road(MeanPixelModel(), x[i : i + 1], target[:1], maps=maps[:1], steps=4) for i in range(3)]
    built = []
    system = Q.imputation_system
    monkeypatch.setattr(Q, "imputation_system", lambda removed: built.append(1) or system(removed))
    together = Q.road(MeanPixelModel(), x, target, maps=maps, steps=4, batch_size=5)
    assert len(built) == 2 * 4
    for key in ("morf_curve", "lerf_curve"):
        assert torch.equal(together[key], torch.cat([one[key] for one in alone]))
    built.clear()
    Q.road(MeanPixelModel(), x, target, maps=x[:, 0], steps=4)  # ranked apart: one system per mask
    assert len(built) == 3 * 2 * 4


def test_score_maps_adds_road_for_methods_and_baselines_alike():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 3, 12, 12, generator=g)
    pred = torch.zeros(3, dtype=torch.long)
    model = MeanPixelModel()
    kw = {"steps": 4, "seed": 3, "batch_size": 4, "road_steps": 3}
    for source in (Q.baseline_source("random", seed=3), lambda net, xx, t: xx[:, 0].clone()):
        scores = Q.score_maps(model, [Chunk(x, pred)], source, bootstrap=30, **kw)
        assert list(scores) == ["deletion_auc", "insertion_auc", "road_morf", "road_lerf"]
        found = Q.road(model, x, pred, maps=source(model, x, pred), steps=3, seed=3)
        assert scores["road_morf"] == Q.bootstrap_ci(found["morf"], n_resamples=30, seed=3)
    assert Q.metric_passes(4, 3) == {
        "deletion_insertion": {"forward": 10, "backward": 0},
        "road": {"forward": 6, "backward": 0},
    }
    assert "road" not in Q.metric_passes(4)


# ---------------------------------------------------------------- the randomisation check, every method


@pytest.mark.parametrize(
    "name", ["gradcam", "gradcam_plusplus", "hirescam", "layercam", "occlusion", "gradient_shap"]
)
def test_every_new_method_moves_when_the_weights_are_reinitialised(name):
    """quality.randomization_check with the method as the stage runs it (attribution.explain, seeded):
    the unmodified copy gives the same maps (rho 1), and the maps move once layers are re-initialised."""
    model = small_resnet()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pred, _ = predictions(model, x)
    settings = {
        "gradshap_samples": 3,
        "occlusion_window": 8,
        "occlusion_stride": 8,
        "gradcam_layer": "layer2",
    }
    source = Q.method_source(name, seed=0, batch_size=8, settings=settings)
    curve = Q.randomization_check(model, x, pred, method_fn=source, seed=0)
    assert [layer for layer, _ in curve] == RANDOMIZED
    assert curve[0][1] == pytest.approx(1.0)
    assert min(rho for _, rho in curve[1:]) < 0.9  # the map moves
