"""The testbed's language: question templates, answers, captions and POPE-style question sets.

The four question families are understood exactly as written here (case and punctuation included):

    Is there a {colour} {shape} in the image?   -> "Yes" / "No"
    What color is the {shape}?                  -> "Red" / "Green" / "Blue" / "Yellow"
    How many {shape}s are there?                -> "0" .. "6"
    Describe the image.                         -> "The image shows a red circle and two blue squares."

Captions list objects left to right (by box centre), grouping identical categories with a count word.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from testbed.world.scenes import CATEGORIES, COLORS, PAIRS, SHAPES, Scene, category_name

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


def existence_question(color: str, shape: str) -> str:
    return f"Is there a {color} {shape} in the image?"


def color_question(shape: str) -> str:
    return f"What color is the {shape}?"


def count_question(shape: str) -> str:
    return f"How many {shape}s are there?"


CAPTION_QUESTION = "Describe the image."


def where_question(color: str, shape: str) -> str:
    return f"Where is the {color} {shape}?"


def region_question(box: tuple[int, int, int, int]) -> str:
    return f"What is at {format_box(box)}?"


def normalized_box(bbox: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A pixel box (x0, y0, x1, y1 exclusive) of an image of `size` (w, h) -> integer percent of the
    image side, 0..100: the testbed's coordinate convention (LLaVA-1.5 writes normalized floats with two
    decimals, e.g. [0.12, 0.34, 0.56, 0.78]; percent keeps the same precision in one token per number)."""
    w, h = size
    x0, y0, x1, y1 = bbox
    return (round(100 * x0 / w), round(100 * y0 / h), round(100 * x1 / w), round(100 * y1 / h))


def format_box(box: tuple[int, int, int, int]) -> str:
    return "[" + ", ".join(str(int(v)) for v in box) + "]"


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """'[12, 34, 56, 78]' anywhere in `text` -> (0.12, 0.34, 0.56, 0.78) as fractions of the image side."""
    m = re.search(r"\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]", text)
    if m is None:
        return None
    return tuple(int(g) / 100.0 for g in m.groups())  # type: ignore[return-value]


def caption(scene: Scene, include_occluded: bool = False) -> str:
    """Ground-truth caption: every object, left to right, identical categories grouped."""
    order = sorted(scene.all_objects(include_occluded), key=lambda o: (o.bbox[0] + o.bbox[2], o.bbox[1] + o.bbox[3]))
    counts = Counter(o.category for o in order)
    seen: list[tuple[str, str]] = []
    for o in order:
        if o.category not in seen:
            seen.append(o.category)
    parts = []
    for cat in seen:
        n = counts[cat]
        parts.append(f"a {category_name(cat)}" if n == 1 else f"{NUMBER_WORDS[n]} {cat[0]} {cat[1]}s")
    if len(parts) == 1:
        listing = parts[0]
    else:
        listing = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"The image shows {listing}."


def mentioned_categories(text: str) -> set[tuple[str, str]]:
    """Categories named in free text ('red circle', 'two blue squares'), for caption recall / CHAIR."""
    words = [w.strip(".,;:!?").lower() for w in text.split()]
    found = set()
    for a, b in zip(words, words[1:]):
        shape = b[:-1] if b.endswith("s") and b[:-1] in SHAPES else b
        if a in COLORS and shape in SHAPES:
            found.add((a, shape))
    return found


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # "exist" | "color" | "count" | "caption" | "where" | "region"


def sample_qas(scene: Scene, rng: np.random.Generator, n: int, region: float = 0.0) -> list[QA]:
    """`n` training QAs for a scene: balanced existence, colour (unique shapes only), count, caption,
    and with probability `region` a region-level QA (LLaVA-1.5's RefCOCO / Visual Genome analogue):
    "Where is the {c} {s}?" -> its box, or "What is at [box]?" -> "A {c} {s}.".

    Answers are about the scene, occluded objects included (as annotations are). Negatives for
    existence are drawn uniformly from absent categories (as in ordinary instruction data), so the
    co-occurrence prior is learned, not trained away. Region QAs are asked about visible objects whose
    category is unique in the scene (a referring expression must refer to one object).
    """
    cats = scene.categories(include_occluded=True)
    present = sorted(cats)
    absent = [c for c in CATEGORIES if c not in cats]
    unique_shapes = [s for s in SHAPES if scene.count(s, include_occluded=True) == 1]
    out: list[QA] = []
    counts = Counter(o.category for o in scene.all_objects(True))
    referable = [o for o in scene.objects if counts[o.category] == 1]
    for _ in range(n):
        if referable and rng.random() < region:
            o = referable[int(rng.integers(len(referable)))]
            box = normalized_box(o.bbox, scene.image.size)
            if rng.random() < 0.65:
                out.append(QA(where_question(o.color, o.shape), format_box(box), "where"))
            else:
                out.append(QA(region_question(box), f"A {o.name}.", "region"))
            continue
        r = rng.random()
        if r < 0.5:
            if rng.random() < 0.5 or not absent:
                cat = present[int(rng.integers(len(present)))]
            else:
                cat = absent[int(rng.integers(len(absent)))]
            out.append(QA(existence_question(*cat), "Yes" if cat in cats else "No", "exist"))
        elif r < 0.68 and unique_shapes:
            shape = unique_shapes[int(rng.integers(len(unique_shapes)))]
            color = next(o.color for o in scene.all_objects(True) if o.shape == shape)
            out.append(QA(color_question(shape), color.capitalize(), "color"))
        elif r < 0.82:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            out.append(QA(count_question(shape), str(scene.count(shape, include_occluded=True)), "count"))
        else:
            out.append(QA(CAPTION_QUESTION, caption(scene, include_occluded=True), "caption"))
    return out


# --- POPE on the testbed ----------------------------------------------------------------------

POPE_SPLITS = ("random", "popular", "adversarial")


def category_frequency(scenes: list[Scene]) -> Counter:
    return Counter(c for s in scenes for c in s.categories())


def cooccurrence(scenes: list[Scene]) -> dict[tuple[str, str], Counter]:
    co: dict[tuple[str, str], Counter] = {c: Counter() for c in CATEGORIES}
    for s in scenes:
        cats = s.categories()
        for a in cats:
            for b in cats:
                if a != b:
                    co[a][b] += 1
    return co


def pope_questions(
    scene: Scene,
    split: str,
    rng: np.random.Generator,
    frequency: Counter,
    co: dict[tuple[str, str], Counter],
    per_side: int = 3,
) -> list[QA]:
    """POPE for one scene: up to `per_side` present categories (Yes) and as many absent ones (No).

    Negatives: `random` uniform over absent categories; `popular` the most frequent categories in
    the reference statistics; `adversarial` those that co-occur most with the present ones (the
    absent co-occurrence partner first). Ties are broken by `rng`.
    """
    if split not in POPE_SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; valid: {', '.join(POPE_SPLITS)}")
    present = sorted(scene.categories())
    absent = [c for c in CATEGORIES if c not in scene.categories()]
    k = min(per_side, len(present), len(absent))
    pos = [present[i] for i in rng.permutation(len(present))[:k]]
    noise = rng.random(len(absent)) * 1e-3
    if split == "random":
        neg = [absent[i] for i in rng.permutation(len(absent))[:k]]
    elif split == "popular":
        score = np.array([frequency[c] for c in absent], dtype=float) + noise
        neg = [absent[i] for i in np.argsort(-score)[:k]]
    else:
        score = np.array([sum(co[p][c] for p in scene.categories()) for c in absent], dtype=float) + noise
        neg = [absent[i] for i in np.argsort(-score)[:k]]
    return [QA(existence_question(*c), "Yes", "exist") for c in pos] + [
        QA(existence_question(*c), "No", "exist") for c in neg
    ]


def training_corpus() -> list[str]:
    """Every phrase the testbed language can produce, in conversation form, for fitting the tokenizer."""
    questions = [CAPTION_QUESTION]
    questions += [existence_question(c, s) for c, s in CATEGORIES]
    questions += [color_question(s) for s in SHAPES] + [count_question(s) for s in SHAPES]
    answers = ["Yes", "No"] + [c.capitalize() for c in COLORS] + [str(i) for i in range(7)]
    for a, b in PAIRS:
        answers.append(f"The image shows a {category_name(a)} and a {category_name(b)}.")
    for w in NUMBER_WORDS[2:]:
        answers += [f"The image shows {w} {c} {s}s, a {c} {s} and a {c} {s}." for c, s in CATEGORIES]
    questions += [where_question(c, s) for c, s in CATEGORIES]
    answers += [f"A {category_name(c)}." for c in CATEGORIES]
    # every coordinate 0..100, first in a box and after a comma, several times so that BPE makes each
    # one a single token (a box is then 9 tokens: "[", "12", ",", " 34", ",", " 56", ",", " 78", "]")
    boxes = [format_box((v, v, v, v)) for v in range(101)] * 4
    return (
        [f"USER: {q} ASSISTANT:" for q in questions]
        + [f"ASSISTANT: {a}" for a in answers]
        + [f"USER: What is at {b}? ASSISTANT: {b}" for b in boxes]
    )
