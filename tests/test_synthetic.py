"""The synthetic ants/bees generator: seeded, exact masks, and no colour shortcut."""

import dataclasses
import time

import numpy as np
import pytest
from PIL import Image

from cnnlens import synthetic
from cnnlens.config import SyntheticParams

SIZE = 64  # small images keep the file fast; the drawing code is the same at every size


def _samples(counts, size=SIZE, seed=0):
    return list(synthetic.generate(counts, size, seed))


def _pixels(samples):
    return [np.asarray(s.image) for s in samples]


def test_same_seed_same_samples_and_other_seed_differs():
    counts = {"train": {"ants": 3, "bees": 2}, "val": {"ants": 1, "bees": 2}}
    a, b, c = _samples(counts, seed=7), _samples(counts, seed=7), _samples(counts, seed=8)
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert np.array_equal(x.mask, y.mask)
        assert x.box == y.box
    assert all(not np.array_equal(p, q) for p, q in zip(_pixels(a), _pixels(c)))
    # Different samples of one run differ too (the per-sample RNG really is per sample).
    pix = _pixels(a)
    assert all(not np.array_equal(pix[i], pix[j]) for i in range(len(pix)) for j in range(i))


def test_a_sample_does_not_depend_on_the_other_counts():
    small = _samples({"val": {"bees": 3}})
    large = _samples({"train": {"ants": 4, "bees": 5}, "val": {"ants": 2, "bees": 3}})
    large = [s for s in large if s.split == "val" and s.class_name == "bees"]
    assert [s.index for s in large] == [0, 1, 2]
    for x, y in zip(small, large):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert np.array_equal(x.mask, y.mask)


def test_counts_order_and_types_are_as_asked():
    settings = dataclasses.asdict(
        SyntheticParams(image_size=48, train_ants=3, train_bees=5, val_ants=2, val_bees=1)
    )
    counts = synthetic.counts_from_settings(settings)
    assert counts == {"train": {"ants": 3, "bees": 5}, "val": {"ants": 2, "bees": 1}}
    samples = _samples(counts, size=settings["image_size"])
    got = [(s.split, s.class_name, s.index) for s in samples]
    want = [
        (split, cls, i)
        for split in ("train", "val")
        for cls in ("ants", "bees")
        for i in range(counts[split][cls])
    ]
    assert got == want
    for s in samples:
        assert isinstance(s.image, Image.Image) and s.image.mode == "RGB" and s.image.size == (48, 48)
        assert s.mask.dtype == bool and s.mask.shape == (48, 48)


def test_bad_arguments_are_rejected():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="wasps"):
        synthetic.render(rng, "wasps", 64)
    with pytest.raises(ValueError, match="too small"):
        synthetic.render(rng, "ants", 8)
    with pytest.raises(ValueError, match="test"):
        next(synthetic.generate({"test": {"ants": 1}}, 64, 0))
    with pytest.raises(ValueError, match="wasps"):
        next(synthetic.generate({"train": {"wasps": 1}}, 64, 0))


@pytest.mark.parametrize("class_name", synthetic.CLASSES)
@pytest.mark.parametrize("size", [32, 96])
def test_mask_is_exactly_the_pixels_the_insect_changed(class_name, size):
    for i in range(8):
        image, mask, box = synthetic.render(np.random.default_rng([3, i]), class_name, size)
        bg, bg_mask, bg_box = synthetic.render(
            np.random.default_rng([3, i]), class_name, size, draw_object=False
        )
        assert np.array_equal(mask, bg_mask) and box == bg_box
        diff = np.abs(np.asarray(image, np.int16) - np.asarray(bg, np.int16)).max(axis=2)
        assert diff[~mask].max() == 0, "a pixel outside the mask was changed by the insect"
        # Inside, nearly every pixel changed (a few may match by chance: dark ant on dark soil).
        assert (diff[mask] > 0).mean() > 0.9


def test_box_is_the_bounding_box_of_the_mask():
    for s in _samples({"train": {"ants": 6, "bees": 6}}):
        rows, cols = np.any(s.mask, axis=1), np.any(s.mask, axis=0)
        y0, x0 = rows.argmax(), cols.argmax()
        y1, x1 = SIZE - rows[::-1].argmax(), SIZE - cols[::-1].argmax()
        assert s.box == (x0, y0, x1, y1)
        x0, y0, x1, y1 = s.box
        assert s.mask[y0:y1, x0:x1].sum() == s.mask.sum()


def test_object_size_is_sane():
    samples = _samples({"train": {"ants": 30, "bees": 30}}, size=128)
    area = np.array([s.mask.mean() for s in samples])
    side = np.array([max(s.box[2] - s.box[0], s.box[3] - s.box[1]) / 128 for s in samples])
    assert area.min() > 0.005 and area.max() < 0.35
    # The body is 25-60% of the side; legs, antennae and rotation make the box a bit larger.
    assert side.min() > 0.2 and side.max() <= 0.8
    assert np.ptp(side) > 0.2  # the scale really varies


def _fit_logistic(x, y, steps=25, ridge=1e-3):
    """Logistic regression by Newton's method on standardised features; returns a predictor."""
    mu, sd = x.mean(0), x.std(0) + 1e-9
    a = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.zeros(a.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-a @ w))
        hess = a.T @ (a * (p * (1 - p))[:, None]) + ridge * np.eye(len(w))
        w -= np.linalg.solve(hess, a.T @ (p - y) + ridge * w)
    return lambda z: (np.c_[(z - mu) / sd, np.ones(len(z))] @ w > 0).astype(int)


def _best_threshold(x, y):
    """The best single-feature threshold classifier on (x, y); returns a predictor."""
    best = (-1, 0, 0.0, 1)
    for c in range(x.shape[1]):
        for t in np.unique(x[:, c]):
            for sign in (1, -1):
                acc = ((sign * (x[:, c] - t) > 0) == y).mean()
                best = max(best, (acc, c, t, sign))
    _, c, t, sign = best
    return lambda z: (sign * (z[:, c] - t) > 0).astype(int)


def _erode(mask):
    """Pixels whose 4 neighbours are in the mask too: the body, without the thin legs, antennae
    and antialiased rim, whose colour is mostly the background's."""
    core = mask.copy()
    core[1:] &= mask[:-1]
    core[:-1] &= mask[1:]
    core[:, 1:] &= mask[:, :-1]
    core[:, :-1] &= mask[:, 1:]
    return core


@pytest.fixture(scope="module")
def colour_features():
    """Mean RGB of the whole image and of the insect's body, train and val, with labels."""
    counts = {"train": {"ants": 80, "bees": 80}, "val": {"ants": 80, "bees": 80}}
    out = {}
    for split in counts:
        samples = _samples({split: counts[split]}, seed=1)
        img = np.stack([np.asarray(s.image, float).reshape(-1, 3).mean(0) for s in samples])
        obj = np.stack([np.asarray(s.image, float)[_erode(s.mask)].mean(0) for s in samples])
        y = np.array([synthetic.CLASSES.index(s.class_name) for s in samples])
        out[split] = img, obj, y
    return out


def test_mean_colour_of_the_image_does_not_give_the_class_away(colour_features):
    img, _, y = colour_features["train"]
    img_val, _, y_val = colour_features["val"]
    for fit in (_fit_logistic, _best_threshold):
        acc = (fit(img, y)(img_val) == y_val).mean()
        assert acc < 0.8, f"{fit.__name__} on mean RGB reaches {acc:.2f}: a colour shortcut"


def test_the_insects_themselves_differ_in_colour(colour_features):
    # The same classifiers, given only the insect's pixels, separate the classes: the signal is
    # in the object (dark ants, yellow bees), not spread over the image.
    _, obj, y = colour_features["train"]
    _, obj_val, y_val = colour_features["val"]
    for fit in (_fit_logistic, _best_threshold):
        assert (fit(obj, y)(obj_val) == y_val).mean() >= 0.95
    ants, bees = obj_val[y_val == 0], obj_val[y_val == 1]
    assert ants.mean() < bees.mean()  # ants are darker
    assert (bees[:, 0] - bees[:, 2]).mean() > 50  # bees are yellow: much more red than blue


def test_generation_is_fast():
    start = time.process_time()
    _samples({"train": {"ants": 20, "bees": 20}}, size=256)
    # 400 images of 256 px take about 3 s of CPU; CPU time, so a busy machine does not fail this.
    assert time.process_time() - start < 3.0
