"""The testbed's question families on fresh held-out scenes and how each is scored.

`build_families` draws the held-out scenes and their questions (deterministic by seed); `score_family`
turns a family's answers into its metrics. The answers come from the eval suites `testbed-*`
(`evals.suites.testbed`; `evals.testbed_metrics` runs them as one job for `lucid testbed eval`).

Metrics: POPE random / popular / adversarial (accuracy, precision, recall, F1, yes-ratio of the
predictions); the partner-absent split (a scene showing one member of a co-occurring pair without its
partner, asked about the partner: the false-yes rate, and how often its caption names the absent
partner); colour accuracy, count accuracy, caption object recall and CHAIR (CHAIR_i: share of mentioned
objects that are absent; CHAIR_s: share of captions with at least one); and box-as-text accuracy of
"Where is the {colour} {shape}?" (IoU >= 0.5 with the object's box), LLaVA-1.5's REC analogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grounding.scoring import box_iou
from testbed.world.foreign import ForeignScene, draw_foreign_scene
from testbed.world.language import (
    CAPTION_QUESTION,
    POPE_SPLITS,
    QA,
    category_frequency,
    color_question,
    cooccurrence,
    count_question,
    existence_question,
    mentioned_categories,
    parse_box,
    pope_questions,
    where_question,
)
from testbed.world.scenes import SHAPES, TRAIN_CONFIG, Scene, WorldConfig, partner_of, referable_objects, scenes


@dataclass(frozen=True)
class _ForeignAsScene:
    """Adapter: a foreign scene where the evaluation loop expects a Scene (image + categories)."""

    foreign: ForeignScene

    @property
    def image(self):
        return self.foreign.image

    def categories(self):
        return set(self.foreign.categories)


def parse_yes_no(text: str) -> str:
    """POPE's rule: an answer is "no" if its first word is no/not or it contains " no"/"not"; else "yes"."""
    t = text.strip().lower()
    words = t.replace(".", " ").replace(",", " ").split()
    if not words:
        return "no"
    if words[0] in ("no", "not") or " no " in f" {t} " or "not" in words:
        return "no"
    return "yes"


def binary_metrics(preds: list[str], labels: list[str]) -> dict[str, float]:
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels))
    fn = sum(p == "no" and y == "yes" for p, y in zip(preds, labels))
    n = max(1, len(preds))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
        "n": len(preds),
    }


def absent_partners(scene: Scene) -> list[tuple[str, str]]:
    """Categories absent from `scene` whose co-occurrence partner is present (the sharpest probe of
    the language prior: POPE-adversarial averages it with other negatives)."""
    cats = scene.categories()
    out = {partner_of(c) for c in cats} - cats - {None}
    return sorted(out)  # type: ignore[arg-type]


FAMILIES = (
    "pope_random",
    "pope_popular",
    "pope_adversarial",
    "color",
    "count",
    "caption",
    "partner_absent",
    "where",
    "foreign_pope",
    "foreign_color",
)


@dataclass(frozen=True)
class EvalConfig:
    n_scenes: int = 300
    seed: int = 12345  # held-out: training draws scenes from a different seed stream
    batch_size: int = 16
    world: WorldConfig = WorldConfig()
    reference_scenes: int = 2000  # for POPE popular/adversarial statistics (training distribution)
    n_foreign: int = 150  # scenes drawn by other code (testbed.world.foreign): other sizes, colours +-20
    where: bool = True  # also measure "Where is the {c} {s}?" -> box as text
    families: tuple[str, ...] | None = None  # only these question families (FAMILIES; None: all)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.families or ()) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown question family {unknown[0]!r}; valid: {', '.join(FAMILIES)}")


def build_families(cfg: EvalConfig = EvalConfig()) -> dict[str, list[tuple[Scene, QA]]]:
    """Every question family of `cfg` (or `cfg.families`), in the order `evaluate` answers them: the
    held-out scenes, the reference statistics for POPE popular/adversarial and the foreign scenes are
    all drawn here, deterministically from `cfg.seed` (the eval suites `testbed-*` reuse it)."""
    held = list(scenes(cfg.seed, cfg.n_scenes, cfg.world))
    ref = list(scenes(cfg.seed + 1, cfg.reference_scenes, TRAIN_CONFIG))
    freq, co = category_frequency(ref), cooccurrence(ref)
    rng = np.random.default_rng(cfg.seed)
    families: dict[str, list[tuple[Scene, QA]]] = {}
    for s in held:
        for split in POPE_SPLITS:
            families.setdefault(f"pope_{split}", []).extend((s, qa) for qa in pope_questions(s, split, rng, freq, co))
        for shape in SHAPES:
            if s.count(shape) == 1:
                color = next(o.color for o in s.objects if o.shape == shape)
                families.setdefault("color", []).append((s, QA(color_question(shape), color.capitalize(), "color")))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        families.setdefault("count", []).append((s, QA(count_question(shape), str(s.count(shape)), "count")))
        families.setdefault("caption", []).append((s, QA(CAPTION_QUESTION, "", "caption")))
        for cat in absent_partners(s):
            families.setdefault("partner_absent", []).append((s, QA(existence_question(*cat), "No", "exist")))
        if cfg.where:
            for o in referable_objects(s):
                w, h = s.image.size
                box = ",".join(str(v) for v in (o.bbox[0] / w, o.bbox[1] / h, o.bbox[2] / w, o.bbox[3] / h))
                families.setdefault("where", []).append((s, QA(where_question(o.color, o.shape), box, "where")))
    wanted = set(cfg.families) if cfg.families is not None else None
    for i in range(cfg.n_foreign if wanted is None or wanted & {"foreign_pope", "foreign_color"} else 0):
        f = draw_foreign_scene(cfg.seed + 7919 * (i + 1))
        fs = _ForeignAsScene(f)
        families.setdefault("foreign_pope", []).extend((fs, qa) for qa in pope_questions(fs, "random", rng, freq, co))
        for shape, colors in f.colors_by_shape.items():
            if len(colors) == 1:
                qa = QA(color_question(shape), colors[0].capitalize(), "color")
                families.setdefault("foreign_color", []).append((fs, qa))
    if wanted is not None:
        families = {k: v for k, v in families.items() if k in wanted}
    return families


def max_new_tokens(family: str) -> int:
    """Answer length budget of a question family (captions 48, boxes as text 12, short answers 4)."""
    return 48 if family == "caption" else 12 if family == "where" else 4


def score_family(name: str, items: list[tuple[Scene, QA]], answers: list[str]) -> dict:
    """The metrics of one family from its answers, as the entries `evaluate` puts in its result."""
    if name == "partner_absent":
        preds = [parse_yes_no(a) for a in answers]
        return {name: {"false_yes_rate": float(np.mean([p == "yes" for p in preds])), "n": len(preds)}}
    if name == "where":
        ious = []
        for a, (_, qa) in zip(answers, items):
            pred = parse_box(a)
            truth = tuple(float(v) for v in qa.answer.split(","))
            ious.append(box_iou(pred, truth) if pred is not None else 0.0)
        return {
            "where": {
                "box_accuracy": float(np.mean([i >= 0.5 for i in ious])),
                "mean_iou": float(np.mean(ious)),
                "n": len(ious),
            }
        }
    if name.startswith("pope_") or name == "foreign_pope":
        preds = [parse_yes_no(a) for a in answers]
        return {name: binary_metrics(preds, [qa.answer.lower() for _, qa in items])}
    if name in ("color", "count", "foreign_color"):
        ok = [a.strip().rstrip(".").lower() == qa.answer.lower() for a, (_, qa) in zip(answers, items)]
        return {f"{name}_accuracy": float(np.mean(ok))}
    mentioned = [mentioned_categories(a) for a in answers]
    truth = [s.categories() for s, _ in items]
    hits = sum(len(m & t) for m, t in zip(mentioned, truth))
    partner_scenes = [(m, set(absent_partners(s))) for m, (s, _) in zip(mentioned, items)]
    partner_scenes = [(m, p) for m, p in partner_scenes if p]
    return {
        "caption": {
            "recall": hits / max(1, sum(len(t) for t in truth)),
            "chair_i": sum(len(m - t) for m, t in zip(mentioned, truth)) / max(1, sum(len(m) for m in mentioned)),
            "chair_s": float(np.mean([bool(m - t) for m, t in zip(mentioned, truth)])),
            "mean_length_words": float(np.mean([len(a.split()) for a in answers])),
            # of the captions of scenes with an absent partner, the share that names one
            "partner_absent_named": float(np.mean([bool(m & p) for m, p in partner_scenes])) if partner_scenes else 0.0,
            "examples": [
                {"truth": sorted(" ".join(c) for c in t), "answer": a} for t, a in list(zip(truth, answers))[:5]
            ],
        }
    }
