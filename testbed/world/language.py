"""The testbed's language: question templates, answers, captions, detailed descriptions and POPE-style
question sets.

The four historical question families are understood exactly as written here (case and punctuation
included), and every checkpoint answers them:

    Is there a {colour} {shape} in the image?   -> "Yes" / "No"
    What color is the {shape}?                  -> "Red" / "Green" / "Blue" / "Yellow"
    How many {shape}s are there?                -> "0" .. "6"
    Describe the image.                         -> "The image shows a red circle and two blue squares."

Captions list objects left to right (by box centre), grouping identical categories with a count word.

Language v3 (the v3 recipe; `LANGUAGES`) adds the prompt formats LLaVA-1.5 was trained and evaluated with:

* each family has a few paraphrases (`QUESTION_FAMILIES`); the historical question (for `detail`: the two
  CHAIR prompts) takes `PRIMARY_SHARE` of its family in training, and one paraphrase per family
  (`EVAL_ONLY`) is never trained on, so an evaluation can hold it out;
* short-answer questions (existence, colour, count) carry LLaVA-1.5's `ANSWER_SUFFIX` a `SUFFIX_SHARE` of
  the time, with the same one-word answer;
* existence is also asked about a bare shape (POPE's "Is there a circle in the image?": Yes iff any circle);
* `DETAIL_QUESTIONS` ("Please describe this image in detail.", ...) are answered with
  `detailed_description`: 30-80 tokens, every object with its size word, colour, shape and position phrase
  (3x3 grid of its box centre), plus simple relations ("The red circle is to the left of the blue square.").

`parse_question` / `answer_question` read any of these questions (suffix or not) and answer it from a
scene's ground truth. Language v1 (`sample_qas(..., language="v1")`, `training_corpus("v1")`) is what the
committed checkpoint and the v2 recipe were trained on; it is kept bit for bit.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from testbed.world.scenes import CATEGORIES, COLORS, PAIRS, SHAPES, Scene, category_name

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

#: The language versions. v1: the four historical families (plus region data when a recipe asks for it),
#: what the committed checkpoint (v1) and the v2 recipe were trained on; v2 differs from v1 only in its
#: tokenizer corpus (box coordinates); v3: paraphrases, the short-answer suffix, bare-shape existence
#: and detailed descriptions.
LANGUAGES = ("v1", "v2", "v3")

#: LLaVA-1.5's short-answer instruction, appended to the question (POPE and VQA evaluations use it).
ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."

#: Existence: {object} is a category ("red circle") or a bare shape ("circle": Yes iff any circle).
EXISTENCE_TEMPLATES: tuple[str, ...] = (
    "Is there a {object} in the image?",  # historical, and POPE's own
    "Is there a {object}?",
    "Does the image contain a {object}?",
    "Does this image contain a {object}?",  # EVAL-ONLY
)
COLOR_TEMPLATES: tuple[str, ...] = (
    "What color is the {shape}?",  # historical
    "What is the color of the {shape}?",
    "What colour is the {shape}?",
    "What is the colour of the {shape}?",  # EVAL-ONLY
)
COUNT_TEMPLATES: tuple[str, ...] = (
    "How many {shape}s are there?",  # historical
    "How many {shape}s are in the image?",
    "Count the {shape}s.",
    "Count the {shape}s in the image.",  # EVAL-ONLY
)
#: Short caption (`caption`: one sentence).
CAPTION_QUESTIONS: tuple[str, ...] = (
    "Describe the image.",  # historical
    "Briefly describe the image.",
    "What does the image show?",
    "Describe this image.",  # EVAL-ONLY
)
#: Detailed description (`detailed_description`: 30-80 tokens). The first two are the CHAIR prompts.
DETAIL_QUESTIONS: tuple[str, ...] = (
    "Please describe this image in detail.",  # CHAIR (LLaVA-1.5's detail prompt)
    "Please help me describe the image in detail.",  # CHAIR (OPERA's)
    "Describe the image in detail.",
    "Give a detailed description of the image.",
    "Describe this image in detail.",  # EVAL-ONLY
)

#: family -> its templates, the primary ones first.
QUESTION_FAMILIES: dict[str, tuple[str, ...]] = {
    "exist": EXISTENCE_TEMPLATES,
    "color": COLOR_TEMPLATES,
    "count": COUNT_TEMPLATES,
    "caption": CAPTION_QUESTIONS,
    "detail": DETAIL_QUESTIONS,
}
#: How many leading templates of each family are primary (the historical question; for `detail`, the two
#: CHAIR prompts). Together they take PRIMARY_SHARE of their family's training questions.
PRIMARY: dict[str, int] = {"exist": 1, "color": 1, "count": 1, "caption": 1, "detail": 2}
PRIMARY_SHARE = 0.6
#: One paraphrase per family that training never uses (every one of its words occurs in trained ones),
#: so that an evaluation can hold it out.
EVAL_ONLY: dict[str, str] = {
    "exist": EXISTENCE_TEMPLATES[3],
    "color": COLOR_TEMPLATES[3],
    "count": COUNT_TEMPLATES[3],
    "caption": CAPTION_QUESTIONS[3],
    "detail": DETAIL_QUESTIONS[4],
}
#: The families answered with one word; they take ANSWER_SUFFIX a SUFFIX_SHARE of the time in training.
SHORT_ANSWER_FAMILIES = ("exist", "color", "count")
SUFFIX_SHARE = 0.3
#: Share of existence questions asked about a bare shape ("Is there a circle in the image?").
BARE_SHARE = 0.3


def training_templates(family: str) -> tuple[str, ...]:
    """The templates of `family` that training uses (all but its EVAL_ONLY one), primary ones first."""
    return tuple(t for t in QUESTION_FAMILIES[family] if t != EVAL_ONLY[family])


def sample_template(family: str, rng: np.random.Generator) -> str:
    """A training template of `family`: a primary one with probability PRIMARY_SHARE, else a paraphrase."""
    train, k = training_templates(family), PRIMARY[family]
    if len(train) == k or rng.random() < PRIMARY_SHARE:
        return train[int(rng.integers(k))]
    return train[k + int(rng.integers(len(train) - k))]


def existence_question(color: str | None, shape: str, template: str = EXISTENCE_TEMPLATES[0]) -> str:
    """'Is there a red circle in the image?'; with `color=None` about the bare shape ('a circle')."""
    return template.format(object=shape if color is None else f"{color} {shape}")


def color_question(shape: str, template: str = COLOR_TEMPLATES[0]) -> str:
    return template.format(shape=shape)


def count_question(shape: str, template: str = COUNT_TEMPLATES[0]) -> str:
    return template.format(shape=shape)


def with_suffix(question: str) -> str:
    """The question as LLaVA-1.5's short-answer evaluations ask it."""
    return question + ANSWER_SUFFIX


CAPTION_QUESTION = CAPTION_QUESTIONS[0]


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


# --- detailed descriptions (language v3) ---------------------------------------------------------

SIZE_WORDS = ("small", "medium", "large")
#: Box area / image area below which an object is "small", resp. "medium" (about the terciles of the
#: training and evaluation distributions; occluded partners are all small).
SIZE_THRESHOLDS = (0.05, 0.085)
#: Position of a box centre on a 3x3 grid of the image, [row][column].
POSITION_PHRASES: tuple[tuple[str, str, str], ...] = (
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the centre", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)
BACKGROUND_WORDS = ("dark grey", "mid grey", "light grey")
BACKGROUND_THRESHOLDS = (110, 150)  # grey level below which the background is dark, resp. mid grey
#: Two objects are related ("to the left of", "above", ...) only if their box centres are at least this far
#: apart (fraction of the image side, along the dominant axis); an occluded partner sits on its anchor.
RELATION_MIN_DISTANCE = 0.15
MAX_RELATIONS = 2
DETAIL_MAX_WORDS = 80  # words and punctuation marks; each is one token of the v3 tokenizer


def size_word(bbox: tuple[int, int, int, int], size: tuple[int, int]) -> str:
    """'small' / 'medium' / 'large' from the box's area relative to the image's."""
    x0, y0, x1, y1 = bbox
    area = (x1 - x0) * (y1 - y0) / (size[0] * size[1])
    return SIZE_WORDS[sum(area >= t for t in SIZE_THRESHOLDS)]


def _centre(bbox: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[float, float]:
    x0, y0, x1, y1 = bbox
    return (x0 + x1) / 2 / size[0], (y0 + y1) / 2 / size[1]


def position_phrase(bbox: tuple[int, int, int, int], size: tuple[int, int]) -> str:
    """'in the top left' ... 'in the bottom right': the cell of a 3x3 grid holding the box centre."""
    cx, cy = _centre(bbox, size)
    return POSITION_PHRASES[min(2, int(3 * cy))][min(2, int(3 * cx))]


def relation(a: tuple[int, int, int, int], b: tuple[int, int, int, int], size: tuple[int, int]) -> str | None:
    """Where box `a` is relative to box `b`: 'to the left of', 'to the right of', 'above' or 'below' (the
    dominant axis of the centres' offset), or None when the centres are closer than RELATION_MIN_DISTANCE."""
    (ax, ay), (bx, by) = _centre(a, size), _centre(b, size)
    dx, dy = bx - ax, by - ay
    if max(abs(dx), abs(dy)) < RELATION_MIN_DISTANCE:
        return None
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _left_to_right(objects) -> list:
    return sorted(objects, key=lambda o: (o.bbox[0] + o.bbox[2], o.bbox[1] + o.bbox[3]))


def _n_words(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def detailed_description(scene: Scene, include_occluded: bool = False) -> str:
    """Ground-truth detailed description (30-80 tokens), the answer to DETAIL_QUESTIONS:

        The image contains three objects on a light grey background. A large red circle is in the top left.
        A small blue square is at the bottom. A medium green triangle is on the right. The red circle is
        above the blue square. The blue square is to the left of the green triangle.

    Objects left to right (as in `caption`), each with its size word (box area), colour, shape and position
    phrase (box centre on a 3x3 grid); a repeated category is "Another ...". Then up to MAX_RELATIONS
    relations between objects whose category is unique in the scene (neighbours in the order first), within
    DETAIL_MAX_WORDS; a lone object ends with "The {c} {s} is the only object in the image.", several
    objects without a relation with the shape counts ("In total there are two squares.").
    """
    size = scene.image.size
    objs = _left_to_right(scene.all_objects(include_occluded))
    n = len(objs)
    bg = BACKGROUND_WORDS[sum(scene.background >= t for t in BACKGROUND_THRESHOLDS)]
    noun = "object" if n == 1 else "objects"
    sentences = [f"The image contains {NUMBER_WORDS[min(n, 6)]} {noun} on a {bg} background."]
    seen: set[tuple[str, str]] = set()
    for o in objs:
        article = "Another" if o.category in seen else "A"
        seen.add(o.category)
        sentences.append(f"{article} {size_word(o.bbox, size)} {o.name} is {position_phrase(o.bbox, size)}.")
    counts = Counter(o.category for o in objs)
    unique = [o for o in objs if counts[o.category] == 1]
    pairs = [(unique[i], unique[i + 1]) for i in range(len(unique) - 1)]
    pairs += [(unique[i], unique[j]) for i in range(len(unique)) for j in range(i + 2, len(unique))]
    relations = []
    words = sum(_n_words(t) for t in sentences)
    for a, b in pairs:
        r = relation(a.bbox, b.bbox, size)
        if r is None or len(relations) == MAX_RELATIONS:
            continue
        sentence = f"The {a.name} is {r} the {b.name}."
        if words + _n_words(sentence) <= DETAIL_MAX_WORDS:
            relations.append(sentence)
            words += _n_words(sentence)
    sentences += relations
    if n == 1:
        sentences.append(f"The {objs[0].name} is the only object in the image.")
    elif n > 1 and not relations:
        shapes = Counter(o.shape for o in objs)
        parts = [f"{NUMBER_WORDS[k]} {s}{'s' if k > 1 else ''}" for s in SHAPES if (k := shapes[s])]
        sentences.append(f"In total there are {_listing(parts)}.")
    return " ".join(sentences)


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # "exist" | "color" | "count" | "caption" | "detail" | "where" | "region"


def sample_qas(
    scene: Scene,
    rng: np.random.Generator,
    n: int,
    region: float = 0.0,
    language: str = "v3",
    suffix: float = SUFFIX_SHARE,
) -> list[QA]:
    """`n` training QAs for a scene: balanced existence, colour (unique shapes only), count, caption,
    and with probability `region` a region-level QA (LLaVA-1.5's RefCOCO / Visual Genome analogue):
    "Where is the {c} {s}?" -> its box, or "What is at [box]?" -> "A {c} {s}.".

    Answers are about the scene, occluded objects included (as annotations are). Negatives for
    existence are drawn uniformly from absent categories (as in ordinary instruction data), so the
    co-occurrence prior is learned, not trained away. Region QAs are asked about visible objects whose
    category is unique in the scene (a referring expression must refer to one object).

    `language` "v1" / "v2": the four historical questions only (existence 50 %, colour 18 %, count 14 %,
    caption 18 % of the non-region QAs), bit for bit what the v1 and v2 recipes drew. "v3": existence 46 %
    (BARE_SHARE of them about a bare shape, with absent shapes as negatives), colour 16 %, count 14 %,
    caption 12 %, detailed description 12 %, each family's question drawn by `sample_template` (the EVAL_ONLY
    paraphrases never), short-answer questions with ANSWER_SUFFIX a `suffix` share of the time
    (SUFFIX_SHARE by default).
    """
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; valid: {', '.join(LANGUAGES)}")
    cats = scene.categories(include_occluded=True)
    present = sorted(cats)
    absent = [c for c in CATEGORIES if c not in cats]
    unique_shapes = [s for s in SHAPES if scene.count(s, include_occluded=True) == 1]
    out: list[QA] = []
    counts = Counter(o.category for o in scene.all_objects(True))
    referable = [o for o in scene.objects if counts[o.category] == 1]
    for _ in range(n):
        if region > 0 and referable and rng.random() < region:
            o = referable[int(rng.integers(len(referable)))]
            box = normalized_box(o.bbox, scene.image.size)
            if rng.random() < 0.65:
                out.append(QA(where_question(o.color, o.shape), format_box(box), "where"))
            else:
                out.append(QA(region_question(box), f"A {o.name}.", "region"))
            continue
        if language == "v3":
            out.append(_sample_v3(scene, rng, present, absent, unique_shapes, suffix))
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


def _sample_v3(
    scene: Scene,
    rng: np.random.Generator,
    present: list[tuple[str, str]],
    absent: list[tuple[str, str]],
    unique_shapes: list[str],
    suffix: float = SUFFIX_SHARE,
) -> QA:
    """One non-region QA of language v3 (see `sample_qas`)."""
    r = rng.random()
    if r < 0.46:
        template = sample_template("exist", rng)
        if rng.random() < BARE_SHARE:
            have = [s for s in SHAPES if scene.count(s, include_occluded=True)]
            lack = [s for s in SHAPES if not scene.count(s, include_occluded=True)]
            yes = rng.random() < 0.5 or not lack
            pool = have if yes else lack
            question = existence_question(None, pool[int(rng.integers(len(pool)))], template)
        else:
            yes = rng.random() < 0.5 or not absent
            pool = present if yes else absent
            question = existence_question(*pool[int(rng.integers(len(pool)))], template)
        qa = QA(question, "Yes" if yes else "No", "exist")
    elif r < 0.62 and unique_shapes:
        shape = unique_shapes[int(rng.integers(len(unique_shapes)))]
        color = next(o.color for o in scene.all_objects(True) if o.shape == shape)
        qa = QA(color_question(shape, sample_template("color", rng)), color.capitalize(), "color")
    elif r < 0.76:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        answer = str(scene.count(shape, include_occluded=True))
        qa = QA(count_question(shape, sample_template("count", rng)), answer, "count")
    elif r < 0.88:
        return QA(sample_template("caption", rng), caption(scene, include_occluded=True), "caption")
    else:
        return QA(sample_template("detail", rng), detailed_description(scene, include_occluded=True), "detail")
    if rng.random() < suffix:
        qa = QA(with_suffix(qa.question), qa.answer, qa.kind)
    return qa


# --- reading questions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedQuestion:
    """A question of the testbed language: its family (a QA kind), the template it follows, its slots."""

    family: str
    template: str
    color: str | None = None
    shape: str | None = None
    box: tuple[int, int, int, int] | None = None
    suffix: bool = False


def _template_regex(template: str) -> str:
    shape = "(?P<shape>" + "|".join(SHAPES) + ")"
    color = "(?P<color>" + "|".join(COLORS) + ")"
    out = []
    for part in re.split(r"(\{object\}|\{shape\}|\{color\}|\{box\})", template):
        if part == "{object}":
            out.append(f"(?:{color} )?{shape}")
        elif part == "{shape}":
            out.append(shape)
        elif part == "{color}":
            out.append(color)
        elif part == "{box}":
            out.append(r"\[(?P<box>\d+, \d+, \d+, \d+)\]")
        else:
            out.append(re.escape(part))
    return "".join(out)


_WHERE_TEMPLATE = "Where is the {color} {shape}?"
_REGION_TEMPLATE = "What is at {box}?"
_PATTERNS: list[tuple[str, str, re.Pattern]] = [
    (
        family,
        t,
        re.compile(
            _template_regex(t) + (f"(?P<suffix>{re.escape(ANSWER_SUFFIX)})?" if family in SHORT_ANSWER_FAMILIES else "")
        ),
    )
    for family, templates in QUESTION_FAMILIES.items()
    for t in templates
] + [
    ("where", _WHERE_TEMPLATE, re.compile(_template_regex(_WHERE_TEMPLATE))),
    ("region", _REGION_TEMPLATE, re.compile(_template_regex(_REGION_TEMPLATE))),
]


def parse_question(question: str) -> ParsedQuestion | None:
    """The family and slots of a question of the testbed language (exactly as written, the short-answer
    families with or without ANSWER_SUFFIX), or None if it is not one."""
    for family, template, pattern in _PATTERNS:
        m = pattern.fullmatch(question)
        if m is None:
            continue
        g = m.groupdict()
        box = tuple(int(v) for v in g["box"].split(", ")) if g.get("box") else None
        return ParsedQuestion(family, template, g.get("color"), g.get("shape"), box, bool(g.get("suffix")))  # type: ignore[arg-type]
    return None


def answer_question(scene: Scene, question: str, include_occluded: bool = False) -> str | None:
    """The ground-truth answer to a question of the testbed language, as training writes it, or None when
    the question is not understood or has no answer in `scene` (the colour of an absent or repeated shape,
    a region question about no single object)."""
    q = parse_question(question)
    if q is None:
        return None
    objs = scene.all_objects(include_occluded)
    if q.family == "exist":
        if q.color is None:
            return "Yes" if scene.count(q.shape, include_occluded) else "No"  # type: ignore[arg-type]
        return "Yes" if (q.color, q.shape) in scene.categories(include_occluded) else "No"
    if q.family == "color":
        colors = [o.color for o in objs if o.shape == q.shape]
        return colors[0].capitalize() if len(colors) == 1 else None
    if q.family == "count":
        return str(scene.count(q.shape, include_occluded))  # type: ignore[arg-type]
    if q.family == "caption":
        return caption(scene, include_occluded)
    if q.family == "detail":
        return detailed_description(scene, include_occluded)
    named = [o for o in objs if o.category == (q.color, q.shape)]
    if q.family == "where":
        if len(named) != 1 or named[0] not in scene.objects:
            return None
        return format_box(normalized_box(named[0].bbox, scene.image.size))
    hits = [o for o in objs if normalized_box(o.bbox, scene.image.size) == q.box]
    return f"A {hits[0].name}." if len(hits) == 1 else None


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


def training_corpus(language: str = "v3") -> list[str]:
    """Every phrase the testbed language can produce, in conversation form, for fitting the tokenizer.

    "v1": the four historical families (the committed checkpoint's tokenizer); "v2": plus box coordinates;
    "v3": plus every template of QUESTION_FAMILIES (EVAL_ONLY ones included: their words are trained
    words), bare shapes, ANSWER_SUFFIX and the sentences of detailed descriptions.
    """
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; valid: {', '.join(LANGUAGES)}")
    questions = [CAPTION_QUESTION]
    questions += [existence_question(c, s) for c, s in CATEGORIES]
    questions += [color_question(s) for s in SHAPES] + [count_question(s) for s in SHAPES]
    answers = ["Yes", "No"] + [c.capitalize() for c in COLORS] + [str(i) for i in range(7)]
    for a, b in PAIRS:
        answers.append(f"The image shows a {category_name(a)} and a {category_name(b)}.")
    for w in NUMBER_WORDS[2:]:
        answers += [f"The image shows {w} {c} {s}s, a {c} {s} and a {c} {s}." for c, s in CATEGORIES]
    if language == "v1":
        return [f"USER: {q} ASSISTANT:" for q in questions] + [f"ASSISTANT: {a}" for a in answers]
    questions += [where_question(c, s) for c, s in CATEGORIES]
    answers += [f"A {category_name(c)}." for c in CATEGORIES]
    # every coordinate 0..100, first in a box and after a comma, several times so that BPE makes each
    # one a single token (a box is then 9 tokens: "[", "12", ",", " 34", ",", " 56", ",", " 78", "]")
    boxes = [format_box((v, v, v, v)) for v in range(101)] * 4
    if language == "v3":
        objects = [category_name(c) for c in CATEGORIES] + list(SHAPES)
        short = [existence_question(None, o, t) for t in EXISTENCE_TEMPLATES for o in objects]
        short += [color_question(s, t) for t in COLOR_TEMPLATES for s in SHAPES]
        short += [count_question(s, t) for t in COUNT_TEMPLATES for s in SHAPES]
        questions += short + [with_suffix(q) for q in short] + list(CAPTION_QUESTIONS) + list(DETAIL_QUESTIONS)
        for k in range(1, 7):
            noun = "object" if k == 1 else "objects"
            answers += [f"The image contains {NUMBER_WORDS[k]} {noun} on a {bg} background." for bg in BACKGROUND_WORDS]
        for article in ("A", "Another"):
            for size in SIZE_WORDS:
                answers += [
                    f"{article} {size} {category_name(c)} is {pos}."
                    for c in CATEGORIES
                    for row in POSITION_PHRASES
                    for pos in row
                ]
        rels = ("to the left of", "to the right of", "above", "below")
        answers += [
            f"The {category_name(a)} is {r} the {category_name(b)}."
            for a in CATEGORIES
            for b in CATEGORIES
            if a != b
            for r in rels
        ]
        answers += [f"The {category_name(c)} is the only object in the image." for c in CATEGORIES]
        for k in range(1, 7):
            answers += [f"In total there are {NUMBER_WORDS[k]} {s}s and one {s}." for s in SHAPES]
    return (
        [f"USER: {q} ASSISTANT:" for q in questions]
        + [f"ASSISTANT: {a}" for a in answers]
        + [f"USER: What is at {b}? ASSISTANT: {b}" for b in boxes]
    )
