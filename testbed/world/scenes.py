"""The shapes world: procedural scenes with exact ground truth.

A scene is 1-4 coloured shapes on a plain grey background, optionally with low-saturation clutter.
Everything is a pure function of a seed and a `WorldConfig`. Every object carries its shape, its
colour name, the RGB it was actually drawn with, its bounding box and its visible pixel mask, all in
(x, y) pixels of the rendered image.

The training distribution has a deliberate co-occurrence bias (`PAIRS`): when one member of a pair
is in a scene its partner usually is too, often drawn smaller. A model trained on it acquires a
language prior and tends to claim the partner when it is absent: the testbed analogue of
POPE-adversarial, on which the mitigation methods are measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Canonical palette (sRGB). Scenes drawn with any colour within +-20 per channel of these must be
#: recognised; training jitters by more than that (`WorldConfig.color_jitter`).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

#: Every (colour, shape) category; the order is fixed and used for label indices.
CATEGORIES: tuple[tuple[str, str], ...] = tuple((c, s) for s in SHAPES for c in COLORS)

#: Co-occurring pairs (symmetric). Six categories take part, six are free.
PAIRS: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    (("red", "circle"), ("blue", "square")),
    (("green", "triangle"), ("yellow", "circle")),
    (("yellow", "square"), ("red", "triangle")),
)


def partner_of(category: tuple[str, str]) -> tuple[str, str] | None:
    """The co-occurrence partner of `category`, or None for a free category."""
    for a, b in PAIRS:
        if category == a:
            return b
        if category == b:
            return a
    return None


def category_name(category: tuple[str, str]) -> str:
    """('red', 'circle') -> 'red circle'."""
    return f"{category[0]} {category[1]}"


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn. The defaults are the held-out evaluation distribution.

    Attributes:
        size: (width, height) of the rendered image in pixels.
        min_objects, max_objects: inclusive range of the number of objects.
        object_scale: range of an object's extent as a fraction of the shorter image side.
        pair_prob: probability that the partner of a paired category is added to its scene.
        partner_shrink: range of the size factor applied to an added partner (weaker evidence).
        occlude_prob: probability that an added partner is hidden entirely behind its anchor: it is in
            the scene (training answers and captions mention it, like annotations of occluded objects)
            but not visible. This is what teaches the language prior; evaluation scenes use 0.
        background: range of the background grey level.
        color_jitter: each channel of an object's colour is offset uniformly in +-color_jitter.
        rotation: maximum rotation in degrees of squares and triangles.
        clutter: probability of drawing low-saturation clutter (lines, dots, texture noise).
        supersample: anti-aliasing factor (1 = hard edges).
    """

    size: tuple[int, int] = (96, 96)
    min_objects: int = 1
    max_objects: int = 4
    object_scale: tuple[float, float] = (0.2, 0.34)
    pair_prob: float = 0.5
    partner_shrink: tuple[float, float] = (0.6, 0.9)
    occlude_prob: float = 0.0
    background: tuple[int, int] = (70, 190)
    color_jitter: int = 0
    rotation: float = 0.0
    clutter: float = 0.0
    supersample: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 6:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 6, got {self.min_objects}, {self.max_objects}")
        if min(self.size) < 16:
            raise ValueError(f"size must be at least 16x16 pixels, got {self.size}")
        if not 0.0 <= self.pair_prob <= 1.0:
            raise ValueError(f"pair_prob must be in [0, 1], got {self.pair_prob}")
        if not 0.0 <= self.occlude_prob <= 1.0:
            raise ValueError(f"occlude_prob must be in [0, 1], got {self.occlude_prob}")


#: The training distribution: strong co-occurrence with some occluded partners, colour jitter beyond the
#: +-20 promise, rotations, clutter. The defaults of WorldConfig (held-out evaluation) have weaker
#: co-occurrence (0.5), so that many scenes show an anchor without its partner (POPE-adversarial).
TRAIN_CONFIG = WorldConfig(pair_prob=0.9, occlude_prob=0.2, color_jitter=30, rotation=20.0, clutter=0.5)


@dataclass(frozen=True)
class SceneObject:
    """One object. `bbox` is (x0, y0, x1, y1) in pixels (x1, y1 exclusive); `mask` is [H, W] bool."""

    shape: str
    color: str
    rgb: tuple[int, int, int]
    bbox: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False, compare=False)

    @property
    def category(self) -> tuple[str, str]:
        return (self.color, self.shape)

    @property
    def name(self) -> str:
        return category_name(self.category)


@dataclass(frozen=True)
class Scene:
    """A rendered scene and its ground truth. `objects` are the visible objects in drawing order (later
    ones on top); `occluded` are in the scene but entirely hidden (their mask is where they would be)."""

    image: Image.Image = field(repr=False, compare=False)
    objects: tuple[SceneObject, ...]
    background: int
    seed: int
    occluded: tuple[SceneObject, ...] = ()

    def all_objects(self, include_occluded: bool = False) -> tuple[SceneObject, ...]:
        """The visible objects, followed by the occluded ones if asked."""
        return self.objects + self.occluded if include_occluded else self.objects

    def categories(self, include_occluded: bool = False) -> set[tuple[str, str]]:
        return {o.category for o in self.all_objects(include_occluded)}

    def count(self, shape: str, include_occluded: bool = False) -> int:
        return sum(o.shape == shape for o in self.all_objects(include_occluded))


def referable_objects(scene: Scene) -> list[SceneObject]:
    """The visible objects that the phrase "the {colour} {shape}" names uniquely in `scene`: those whose
    category occurs once among all its objects, occluded ones included (an occluded twin makes the
    phrase ambiguous). In drawing order."""
    cats = [o.category for o in scene.all_objects(include_occluded=True)]
    return [o for o in scene.objects if cats.count(o.category) == 1]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square or triangle of circumradius r, rotated by `angle` degrees."""
    if shape == "square":
        base = [45.0, 135.0, 225.0, 315.0]
    elif shape == "triangle":
        base = [-90.0, 30.0, 150.0]  # apex up
    else:
        raise ValueError(shape)
    pts = []
    for a in base:
        t = math.radians(a + angle)
        pts.append((cx + r * math.cos(t), cy + r * math.sin(t)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, extent: float, angle: float, fill) -> None:
    """Draw a shape whose axis-aligned extent (unrotated) is `extent` pixels, centred at (cx, cy)."""
    if shape == "circle":
        r = extent / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.polygon(_polygon("square", cx, cy, extent / math.sqrt(2), angle), fill=fill)
    else:
        # Equilateral, side `extent`: its box is extent x h; the centroid sits h/6 below the box centre.
        h = extent * math.sqrt(3) / 2
        draw.polygon(_polygon("triangle", cx, cy + h / 6, extent / math.sqrt(3), angle), fill=fill)


def _sample_categories(rng: np.random.Generator, cfg: WorldConfig) -> list[tuple[tuple[str, str], bool]]:
    """Categories of the objects of one scene, each with a flag 'added as a co-occurrence partner'."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    out: list[tuple[tuple[str, str], bool]] = []
    while len(out) < n:
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        out.append((cat, False))
        partner = partner_of(cat)
        present = {c for c, _ in out}
        if partner is not None and partner not in present and len(out) < cfg.max_objects:
            if rng.random() < cfg.pair_prob:
                out.append((partner, True))
    return out


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, w: int, h: int, bg: int, ss: int) -> None:
    """Low-saturation distractors: thin lines and small dots in greys near the background."""
    for _ in range(int(rng.integers(2, 7))):
        g = int(np.clip(bg + rng.integers(-45, 46), 0, 255))
        tint = rng.integers(-12, 13, size=3)
        col = tuple(int(np.clip(g + t, 0, 255)) for t in tint)
        if rng.random() < 0.5:
            x0, y0, x1, y1 = rng.uniform(0, 1, 4) * [w, h, w, h]
            draw.line([x0, y0, x1, y1], fill=col, width=max(1, int(ss * rng.uniform(0.5, 1.5))))
        else:
            cx, cy = rng.uniform(0, 1, 2) * [w, h]
            r = ss * rng.uniform(0.8, 2.5)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)


def render_scene(seed: int, cfg: WorldConfig = WorldConfig()) -> Scene:
    """Render one scene, deterministically from `seed`.

    Objects are placed by rejection sampling so that their boxes overlap little; the mask of an
    object is its visible part (later objects occlude earlier ones).
    """
    rng = np.random.default_rng(seed)
    W, H = cfg.size
    ss = max(1, cfg.supersample)
    side = min(W, H)
    bg = int(rng.integers(cfg.background[0], cfg.background[1] + 1))
    big = Image.new("RGB", (W * ss, H * ss), (bg, bg, bg))
    draw = ImageDraw.Draw(big)
    if rng.random() < cfg.clutter:
        _clutter(rng, draw, W * ss, H * ss, bg, ss)

    placed: list[tuple[float, float, float, float]] = []  # boxes in output pixels
    specs = []
    for cat, is_partner in _sample_categories(rng, cfg):
        anchor = specs[-1] if specs and is_partner and specs[-1][0] == partner_of(cat) else None
        if anchor is not None and rng.random() < cfg.occlude_prob:
            # Hidden behind its anchor: a third of the anchor's size at the anchor's centroid (inside
            # its inscribed circle), drawn just before it.
            _, acx, acy, aext, _, _ = anchor
            if anchor[0][1] == "triangle":
                acy += aext * math.sqrt(3) / 12
            angle = _angle(rng, cat[1], cfg.rotation)
            rgb = _jittered(rng, cat[0], cfg.color_jitter)
            specs.insert(len(specs) - 1, (cat, acx, acy, aext / 3, angle, rgb))
            continue
        extent = side * rng.uniform(*cfg.object_scale)
        if is_partner:
            extent *= rng.uniform(*cfg.partner_shrink)
        extent = max(extent, 6.0)
        for _ in range(60):
            cx = rng.uniform(extent / 2 + 1, W - extent / 2 - 1)
            cy = rng.uniform(extent / 2 + 1, H - extent / 2 - 1)
            box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
            if all(_overlap(box, b) < 0.1 for b in placed):
                break
        else:
            continue  # no room: drop the object (the ground truth only lists what is drawn)
        placed.append(box)
        angle = _angle(rng, cat[1], cfg.rotation)
        specs.append((cat, cx, cy, extent, angle, _jittered(rng, cat[0], cfg.color_jitter)))

    layers = []  # per object: coverage in [0, 1] at output resolution
    for cat, cx, cy, extent, angle, rgb in specs:
        draw_big = (cx * ss, cy * ss, extent * ss)
        _draw_shape(draw, cat[1], *draw_big, angle, rgb)
        m = Image.new("L", (W * ss, H * ss), 0)
        _draw_shape(ImageDraw.Draw(m), cat[1], *draw_big, angle, 255)
        layers.append(np.asarray(m.resize((W, H), Image.BOX), dtype=np.float32) / 255.0)

    image = big.resize((W, H), Image.BOX) if ss > 1 else big
    if rng.random() < cfg.clutter:
        noise = rng.normal(0, rng.uniform(2, 7), size=(H, W, 1))
        image = Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))

    objects, occluded = [], []
    for i, ((cat, *_rest), cov) in enumerate(zip(specs, layers)):
        full = cov >= 0.5
        visible = full.copy()
        for later in layers[i + 1 :]:
            visible &= later < 0.5
        if not full.any():
            continue
        shown = visible if visible.any() else full
        ys, xs = np.nonzero(shown)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        obj = SceneObject(cat[1], cat[0], specs[i][5], bbox, shown)
        (objects if visible.any() else occluded).append(obj)
    return Scene(image=image, objects=tuple(objects), background=bg, seed=seed, occluded=tuple(occluded))


def _angle(rng: np.random.Generator, shape: str, rotation: float) -> float:
    return float(rng.uniform(-rotation, rotation)) if shape != "circle" else 0.0


def _jittered(rng: np.random.Generator, color: str, jitter: int) -> tuple[int, int, int]:
    base = np.array(PALETTE[color])
    return tuple(int(v) for v in np.clip(base + rng.integers(-jitter, jitter + 1, 3), 0, 255))


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection area over the smaller box's area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller


def scenes(seed: int, n: int, cfg: WorldConfig = WorldConfig()) -> Iterator[Scene]:
    """`n` scenes with seeds derived from `seed` (independent streams, reproducible)."""
    for i in range(n):
        yield render_scene(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), cfg)


def with_size(cfg: WorldConfig, size: tuple[int, int]) -> WorldConfig:
    return replace(cfg, size=size)
