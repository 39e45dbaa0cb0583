"""A seeded, offline stand-in for the ants/bees dataset, with exact object masks.

"ants" are dark, thin, segmented insects (head, thorax, petiole, gaster; six thin legs; elbowed
antennae); "bees" are round yellow-and-black striped bodies with pale wings. One insect per image,
at a random position, scale (about 25-60% of the image side) and rotation, on a textured
background (gradient, low-frequency noise, grass, leaves, soil, flowers) with distractors that are
neither class, including dark and yellow blobs, so that no colour statistic of the whole image
gives the class away: the network has to find the insect and look at its shape and pattern.

Pure library code: nothing here touches the disk (cnnlens/sources.py saves what `render_png` returns).
Each sample has its own RNG, seeded by (seed, split, class, index), so a sample does not change
when the counts of other splits or classes change.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("ants", "bees")
SPLITS = ("train", "val")

# Objects and distractors are drawn at this multiple of the output size and box-filtered down,
# which antialiases their edges; the object's mask is every pixel its layer touches.
SUPERSAMPLE = 2
MIN_SIZE = 16


@dataclass
class Sample:
    split: str  # "train" | "val"
    class_name: str  # "ants" | "bees"
    index: int  # running index within (split, class)
    image: Image.Image  # RGB, size x size
    mask: np.ndarray  # bool, size x size, True on the drawn object
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) bounding box of the mask


def counts_from_settings(settings: dict[str, int]) -> dict[str, dict[str, int]]:
    """{"train_ants": n, "train_bees": n, "val_ants": n, "val_bees": n, ...} (data.synthetic's keys;
    others are ignored) -> {"train": {"ants": n, "bees": n}, "val": {...}}."""
    return {split: {cls: settings[f"{split}_{cls}"] for cls in CLASSES} for split in SPLITS}


def sample_keys(counts: dict[str, dict[str, int]]) -> list[tuple[str, str, int]]:
    """(split, class, index) of every sample, split by split, class by class (in CLASSES order)."""
    keys = []
    for split, per_class in counts.items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        unknown = sorted(set(per_class) - set(CLASSES))
        if unknown:
            raise ValueError(f"unknown class {unknown[0]!r} in {split}; expected one of {CLASSES}")
        for class_name in CLASSES:
            n = per_class.get(class_name, 0)
            if n < 0:
                raise ValueError(f"count for {split}/{class_name} is {n}; expected >= 0")
            keys += [(split, class_name, index) for index in range(n)]
    return keys


def generate(counts: dict[str, dict[str, int]], size: int, seed: int) -> Iterator[Sample]:
    """Yield the samples in sample_keys order."""
    keys = sample_keys(counts)  # validated before the first sample is drawn
    for split, class_name, index in keys:
        image, mask, box = render(sample_rng(seed, (split, class_name, index)), class_name, size)
        yield Sample(split, class_name, index, image, mask, box)


def render_png(job: tuple[str, str, int, int, int]) -> tuple[bytes, bytes, tuple[int, int, int, int]]:
    """(split, class, index, size, seed) -> the sample's image and mask as PNG bytes, and its box:
    what a worker process sends back (PNG at compress_level 1: a third of the default's time)."""
    split, class_name, index, size, seed = job
    image, mask, box = render(sample_rng(seed, (split, class_name, index)), class_name, size)
    files = []
    for picture in (image, Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)):
        buf = io.BytesIO()
        picture.save(buf, format="PNG", compress_level=1)
        files.append(buf.getvalue())
    return files[0], files[1], tuple(int(v) for v in box)


def sample_rng(seed: int, key: tuple[str, str, int]) -> np.random.Generator:
    """The RNG of one sample, key (split, class, index): independent of every other sample and of the counts."""
    split, class_name, index = key
    return np.random.default_rng([seed, SPLITS.index(split), CLASSES.index(class_name), index])


def render(rng: np.random.Generator, class_name: str, size: int, *, draw_object: bool = True):
    """Draw one image of `class_name`: (RGB image, bool mask, (x0, y0, x1, y1) box).

    draw_object=False returns the same image without the insect (same RNG draws, same mask and
    box), which is how the tests check that the mask covers exactly the pixels the insect changed.
    """
    if class_name not in CLASSES:
        raise ValueError(f"unknown class {class_name!r}; expected one of {CLASSES}")
    if size < MIN_SIZE:
        raise ValueError(f"image size {size} is too small; expected >= {MIN_SIZE}")

    image = _background(rng, size)

    # Distractors: a few random shapes, and (independently of the class) dark and yellow blobs,
    # so that "there is something dark/yellow in the picture" does not tell ants from bees.
    layer = _Layer(size)
    for _ in range(rng.integers(0, 4)):
        _shape(layer, rng, size)
    if rng.random() < 0.35:
        _blob(layer, rng, size, colour=_jitter(rng, (35, 28, 22), 15))
    if rng.random() < 0.35:
        _blob(layer, rng, size, colour=_jitter(rng, (235, 190, 40), 20))
    layer.composite_onto(image)

    # The insect: body length L; its centre is kept so that the whole insect (antennae and legs
    # reach up to about 0.62 L from it) stays inside the image, biased towards the middle.
    length = rng.uniform(0.25, 0.6) * size
    reach = 0.62 * length
    cx, cy = size / 2 + (rng.random(2) - 0.5) * 0.85 * (size - 2 * reach)
    angle = rng.uniform(0, 2 * math.pi)
    obj = _Layer(size, centre=(cx, cy), length=length, angle=angle, mirror=rng.random() < 0.5)
    (_ant if class_name == "ants" else _bee)(obj, rng)
    mask = obj.composite_onto(image if draw_object else None)

    # Camera effects: exposure and colour cast (a lookup table per channel), then sensor noise.
    # Pointwise only (no blur after compositing), so pixels outside the mask stay exactly those
    # of the object-free image.
    gain = rng.uniform(0.75, 1.2) * rng.uniform(0.9, 1.1, size=3)
    lut = np.clip(np.arange(256)[None, :] * gain[:, None] + rng.uniform(-12, 12), 0, 255)
    rgb = np.asarray(image.convert("RGB").point(lut.round().astype(int).ravel().tolist()), np.int16)
    a = int(rng.integers(0, 9))  # uniform integer noise: as good as Gaussian here, 10x cheaper
    rgb = rgb + rng.integers(-a, a + 1, rgb.shape, dtype=np.int16)
    rgb = np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)

    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return Image.fromarray(rgb, "RGB"), mask, box


# --- drawing helpers -------------------------------------------------------------------------


class _Layer:
    """A transparent RGBA canvas at SUPERSAMPLE x the output size, drawn in object coordinates.

    Object coordinates are in units of the body length, x along the body (head towards +x),
    centred on `centre`, rotated by `angle`; the default maps them to plain pixels.
    """

    def __init__(self, size, *, centre=(0.0, 0.0), length=1.0, angle=0.0, mirror=False):
        self.size = size
        self.img = Image.new("RGBA", (size * SUPERSAMPLE, size * SUPERSAMPLE), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.img)
        self.length = length
        c, s = math.cos(angle), math.sin(angle)
        flip = -1.0 if mirror else 1.0
        self.m = np.array([[c, -s * flip], [s, c * flip]]) * length * SUPERSAMPLE
        self.t = np.array(centre, dtype=float) * SUPERSAMPLE

    def pts(self, xy) -> list[tuple[float, float]]:
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        return [tuple(p) for p in (xy @ self.m.T + self.t)]

    def ellipse(self, centre, radii, fill, *, rot=0.0, n=28):
        (x, y), (rx, ry) = centre, radii
        a = np.linspace(0, 2 * math.pi, n, endpoint=False)
        e = np.stack([rx * np.cos(a), ry * np.sin(a)], 1)
        c, s = math.cos(rot), math.sin(rot)
        self.draw.polygon(self.pts(e @ np.array([[c, s], [-s, c]]) + (x, y)), fill=fill)

    def polygon(self, xy, fill):
        self.draw.polygon(self.pts(xy), fill=fill)

    def line(self, xy, fill, width):
        """A polyline `width` body lengths wide (at least one supersampled pixel)."""
        w = max(1, round(width * self.length * SUPERSAMPLE))
        self.draw.line(self.pts(xy), fill=fill, width=w, joint="curve")

    def composite_onto(self, image: Image.Image | None) -> np.ndarray:
        """Box-filter the layer to the output size, draw it over `image` (in place; None: only
        measure) and return its coverage mask: True where any part of the layer landed."""
        mask = np.zeros((self.size, self.size), bool)
        bbox = self.img.getbbox(alpha_only=True)
        if bbox is None:
            return mask
        # Only the drawn region is resized (speed); its corners snap to whole output pixels.
        k = SUPERSAMPLE
        x0, y0 = bbox[0] // k, bbox[1] // k
        x1, y1 = -(-bbox[2] // k), -(-bbox[3] // k)
        # Pillow resizes RGBA with premultiplied alpha, so edges blend without dark fringes.
        small = self.img.crop((x0 * k, y0 * k, x1 * k, y1 * k)).resize((x1 - x0, y1 - y0), Image.BOX)
        if image is not None:
            image.alpha_composite(small, (x0, y0))
        mask[y0:y1, x0:x1] = np.asarray(small.getchannel("A")) > 0
        return mask


def _jitter(rng, rgb, amount, *, alpha=255):
    d = rng.uniform(-amount, amount, 3)
    return tuple(min(255, max(0, int(v + e))) for v, e in zip(rgb, d)) + (alpha,)


def _legs(layer, rng, roots, *, spread, reach, colour, width):
    """Three pairs of two-segment legs from `roots` (x positions on the thorax)."""
    for x0, sweep in zip(roots, (0.6, 0.0, -0.6)):  # front legs reach forward, hind legs back
        for side in (-1, 1):
            knee = (x0 + sweep * reach * 0.5 + rng.normal(0, 0.02), side * (spread + rng.normal(0, 0.02)))
            foot = (x0 + sweep * reach + rng.normal(0, 0.04), side * (reach + rng.normal(0, 0.03)))
            layer.line([(x0, side * 0.02), knee, foot], colour, width)


def _ant(o: _Layer, rng):
    base = [(22, 18, 16), (45, 28, 18), (75, 32, 16), (35, 34, 38)][rng.integers(0, 4)]

    def c():  # each part a slightly different shade
        return _jitter(rng, base, 10)

    width = rng.uniform(0.016, 0.024)
    # Elbowed antennae and legs first, body segments over their roots.
    for side in (-1, 1):
        o.line(
            [
                (0.38, side * 0.03),
                (0.47, side * (0.07 + rng.uniform(0, 0.04))),
                (0.56 + rng.uniform(-0.03, 0.03), side * (0.04 + rng.uniform(0, 0.12))),
            ],
            c(),
            width,
        )
    _legs(
        o,
        rng,
        (0.16, 0.1, 0.04),
        spread=rng.uniform(0.14, 0.2),
        reach=rng.uniform(0.3, 0.38),
        colour=c(),
        width=width,
    )
    s = rng.uniform(0.85, 1.15)  # gaster size varies between ants
    o.ellipse((-0.27, 0), (0.19 * s, 0.125 * s), c())  # gaster
    o.ellipse((-0.045, 0), (0.035, 0.03), c())  # petiole node
    o.line([(-0.1, 0), (0.02, 0)], c(), 0.02)  # waist
    o.ellipse((0.1, 0), (0.12, 0.058), c())  # thorax
    o.ellipse((0.32, 0), (0.085, 0.075), c())  # head
    # Glossy highlights keep the body from being a flat silhouette.
    hl = tuple(min(255, v + 55) for v in base) + (255,)
    o.ellipse((-0.23, 0.03 * s), (0.07 * s, 0.03 * s), hl)
    o.ellipse((0.33, 0.02), (0.03, 0.02), hl)


def _bee(o: _Layer, rng):
    yellow = _jitter(rng, [(235, 190, 40), (240, 160, 35), (220, 200, 70)][rng.integers(0, 3)], 15)
    black = _jitter(rng, (28, 22, 16), 10)
    width = rng.uniform(0.014, 0.02)
    # Wings first (under the body), pale and slightly see-through, with a darker vein outline.
    wing = _jitter(rng, (225, 235, 245), 12, alpha=int(rng.uniform(170, 215)))
    vein = _jitter(rng, (120, 120, 130), 15)
    for side in (-1, 1):
        rot = side * rng.uniform(0.35, 0.7)
        o.ellipse((0.02, side * 0.2), (0.22, 0.085), vein, rot=rot)
        o.ellipse((0.02, side * 0.2), (0.2, 0.07), wing, rot=rot)
    _legs(o, rng, (0.22, 0.17, 0.12), spread=0.16, reach=rng.uniform(0.22, 0.28), colour=black, width=width)
    for side in (-1, 1):
        o.line([(0.4, side * 0.03), (0.46, side * 0.08), (0.5, side * 0.06)], black, width)
    # Abdomen: a yellow oval cut by black bands, darker at the tail, with a small sting.
    ax, rx, ry = -0.12, 0.28, 0.2 * rng.uniform(0.9, 1.1)
    o.polygon([(ax - rx - 0.04, 0), (ax - rx + 0.02, 0.02), (ax - rx + 0.02, -0.02)], black)
    o.ellipse((ax, 0), (rx, ry), yellow)
    for x in np.linspace(ax - rx * 0.75, ax + rx * 0.45, 3):
        _band(o, (ax, rx, ry), (x - 0.04, x + 0.04), fill=black)
    _band(o, (ax, rx, ry), (ax - rx, ax - rx * 0.85), fill=black)
    o.ellipse((0.18, 0), (0.12, 0.125), _jitter(rng, (150, 110, 45), 20))  # fuzzy thorax
    o.ellipse((0.34, 0), (0.075, 0.1), black)  # head


def _band(o, oval, span, *, fill):
    """The part of the ellipse oval = (ax, rx, ry), centred (ax, 0) with radii rx, ry, between x = x0 and
    x = x1 of span = (x0, x1)."""
    (ax, rx, ry), (x0, x1) = oval, span
    x = np.linspace(max(x0, ax - rx), min(x1, ax + rx), 8)
    y = ry * np.sqrt(np.clip(1 - ((x - ax) / rx) ** 2, 0, 1))
    o.polygon(np.concatenate([np.stack([x, y], 1), np.stack([x, -y], 1)[::-1]]), fill)


def _shape(layer, rng, size):
    """A random distractor that is neither class: rectangle, triangle, disc or stick."""
    colour = tuple(int(v) for v in rng.integers(0, 256, 3)) + (255,)
    x, y = rng.uniform(0, size, 2)
    r = rng.uniform(0.03, 0.12) * size
    kind = rng.integers(0, 4)
    a = rng.uniform(0, 2 * math.pi)
    if kind == 0:
        w, h = r, r * rng.uniform(0.3, 1)
        corners = [(-w, -h), (w, -h), (w, h), (-w, h)]
        layer.polygon(
            [
                (x + px * math.cos(a) - py * math.sin(a), y + px * math.sin(a) + py * math.cos(a))
                for px, py in corners
            ],
            colour,
        )
    elif kind == 1:
        layer.polygon(
            [(x + r * math.cos(a + k * 2.1), y + r * math.sin(a + k * 2.1)) for k in range(3)], colour
        )
    elif kind == 2:
        layer.ellipse((x, y), (r, r), colour)
    else:
        layer.line(
            [(x, y), (x + 2 * r * math.cos(a), y + 2 * r * math.sin(a))],
            colour,
            rng.uniform(0.004, 0.012) * size,
        )


def _blob(layer, rng, size, *, colour):
    """An irregular lumpy blob (a stone, a seed, a flower centre): not an insect."""
    x, y = rng.uniform(0.1, 0.9, 2) * size
    r = rng.uniform(0.04, 0.1) * size
    a = np.linspace(0, 2 * math.pi, 16, endpoint=False)
    rad = r * (1 + 0.25 * np.convolve(np.tile(rng.normal(0, 1, 16), 3), np.ones(3) / 3, "same")[16:32])
    layer.polygon(np.stack([x + rad * np.cos(a), y + rad * np.sin(a)], 1), colour)


# Background palettes: (two gradient colours, stroke/leaf colours). Some are yellowish and some
# dark, so the mean colour of the image is mostly the background's, not the insect's.
_PALETTES = [
    ((70, 120, 40), (120, 160, 60), [(40, 90, 30), (90, 140, 50), (150, 170, 70)]),  # grass
    ((95, 70, 45), (140, 105, 70), [(70, 50, 30), (120, 90, 60), (160, 130, 90)]),  # soil
    ((190, 170, 120), (220, 200, 150), [(170, 150, 100), (200, 180, 120), (140, 120, 80)]),  # sand
    ((40, 60, 30), (70, 90, 45), [(30, 45, 20), (90, 110, 50), (60, 80, 30)]),  # dark foliage
    ((165, 160, 95), (195, 185, 120), [(150, 145, 80), (185, 175, 105), (120, 130, 60)]),  # dry grass
    ((120, 125, 130), (160, 160, 165), [(100, 100, 105), (140, 135, 130), (90, 95, 90)]),  # stone
    ((40, 30, 25), (80, 60, 45), [(30, 25, 20), (70, 55, 40), (100, 80, 55)]),  # dark soil
    ((150, 180, 210), (110, 160, 90), [(80, 140, 60), (60, 110, 50), (200, 210, 220)]),  # sky/meadow
]
_FLOWERS = [(240, 240, 240), (230, 120, 170), (170, 110, 200), (250, 220, 60), (240, 150, 40)]


def _ground(rng, size: int) -> tuple[Image.Image, list]:
    """The ground: a palette's gradient with soft mottling; returns it and the palette's stroke colours."""
    c1, c2, strokes = _PALETTES[rng.integers(0, len(_PALETTES))]
    c1 = np.array(_jitter(rng, c1, 25)[:3], np.float32)
    c2 = np.array(_jitter(rng, c2, 25)[:3], np.float32)
    # A linear gradient plus low-frequency mottling (mostly brightness, a little colour, like
    # light and shade on real ground), built on a coarse grid and blown up smoothly (speed).
    k = int(rng.integers(3, 9))
    mottle = rng.normal(0, rng.uniform(8, 30), (k, k, 1)) + rng.normal(0, 8, (k, k, 3))
    g = 16
    mottle = (
        np.asarray(
            Image.fromarray(np.clip(mottle + 128, 0, 255).astype(np.uint8)).resize((g, g), Image.BICUBIC),
            np.float32,
        )
        - 128
    )
    a = rng.uniform(0, 2 * math.pi)
    t = np.linspace(-0.5, 0.5, g, dtype=np.float32)
    t = np.clip(math.cos(a) * t[None, :] + math.sin(a) * t[:, None] + 0.5, 0, 1)[..., None]
    coarse = np.clip(c1 * (1 - t) + c2 * t + mottle, 0, 255).astype(np.uint8)
    bg = Image.fromarray(coarse, "RGB").resize((size, size), Image.BICUBIC)
    return bg, strokes


def _ground_details(draw, rng, size: int, *, strokes: list, px: float) -> None:
    """Grass strokes, then leaves and pebbles, in the palette's stroke colours."""
    for _ in range(rng.integers(0, 60)):  # grass strokes, mostly upright
        x, y = rng.uniform(0, size, 2)
        a = -math.pi / 2 + rng.normal(0, 0.5)
        ln = rng.uniform(0.05, 0.3) * size
        draw.line(
            [(x, y), (x + ln * math.cos(a), y + ln * math.sin(a))],
            fill=_jitter(rng, strokes[rng.integers(0, 3)], 20)[:3],
            width=max(1, round(rng.uniform(1, 4) * px)),
        )
    for _ in range(rng.integers(0, 8)):  # leaves and pebbles
        x, y = rng.uniform(0, size, 2)
        rx = rng.uniform(0.03, 0.12) * size
        ry = rx * rng.uniform(0.3, 0.9)
        rot = rng.uniform(0, math.pi)
        e = np.linspace(0, 2 * math.pi, 20, endpoint=False)
        pts = np.stack([rx * np.cos(e), ry * np.sin(e)], 1) @ np.array(
            [[math.cos(rot), math.sin(rot)], [-math.sin(rot), math.cos(rot)]]
        )
        draw.polygon([tuple(p) for p in pts + (x, y)], fill=_jitter(rng, strokes[rng.integers(0, 3)], 30)[:3])


def _flowers(draw, rng, size: int) -> None:
    """A few flowers, some with yellow petals or centres."""
    for _ in range(rng.integers(1, 6)):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.015, 0.05) * size
        petal = _jitter(rng, _FLOWERS[rng.integers(0, len(_FLOWERS))], 15)[:3]
        for k in range(5):
            a = k * 2 * math.pi / 5
            px_, py_ = x + r * math.cos(a), y + r * math.sin(a)
            draw.ellipse([px_ - r * 0.7, py_ - r * 0.7, px_ + r * 0.7, py_ + r * 0.7], fill=petal)
        draw.ellipse([x - r * 0.5, y - r * 0.5, x + r * 0.5, y + r * 0.5], fill=(235, 190, 40))


def _background(rng, size) -> Image.Image:
    bg, strokes = _ground(rng, size)
    draw = ImageDraw.Draw(bg)
    px = size / 256  # drawing sizes are given for a 256-pixel image
    _ground_details(draw, rng, size, strokes=strokes, px=px)
    if rng.random() < 0.3:
        _flowers(draw, rng, size)
    bg = bg.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 1.5) * px))  # depth of field
    return bg.convert("RGBA")
