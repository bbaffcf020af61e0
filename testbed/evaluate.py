"""Quality of a VLM on fresh held-out testbed scenes, through the real generation path.

Metrics: POPE random / popular / adversarial (accuracy, precision, recall, F1, yes-ratio of the
predictions), colour accuracy, count accuracy, caption object recall and CHAIR (CHAIR_i: share of
mentioned objects that are absent; CHAIR_s: share of captions with at least one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from rich.progress import Progress

from mitigation import Plan
from testbed.foreign import ForeignScene, draw_foreign_scene
from testbed.language import (
    CAPTION_QUESTION,
    POPE_SPLITS,
    QA,
    category_frequency,
    color_question,
    cooccurrence,
    count_question,
    mentioned_categories,
    pope_questions,
)
from testbed.world import SHAPES, TRAIN_CONFIG, Scene, WorldConfig, scenes
from vlm import VLM, SamplingParams, build_inputs, generate


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


@dataclass(frozen=True)
class EvalConfig:
    n_scenes: int = 300
    seed: int = 12345  # held-out: training draws scenes from a different seed stream
    batch_size: int = 16
    world: WorldConfig = WorldConfig()
    reference_scenes: int = 2000  # for POPE popular/adversarial statistics (training distribution)
    n_foreign: int = 150  # scenes drawn by other code (testbed.foreign): other sizes, colours +-20


def _answer_all(
    vlm: VLM,
    items: list[tuple[Scene, QA]],
    batch_size: int,
    max_new_tokens: int,
    plan: Plan | None,
    progress: Callable[[int], None],
) -> list[str]:
    answers = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        inputs = build_inputs(vlm, [s.image for s, _ in chunk], [qa.question for _, qa in chunk])
        gens = generate(vlm, inputs, SamplingParams(max_new_tokens=max_new_tokens), plan=plan)
        answers += [g.text for g in gens]
        progress(len(chunk))
    return answers


def evaluate(vlm: VLM, cfg: EvalConfig = EvalConfig(), plan: Plan | None = None, show_progress: bool = True) -> dict:
    """Run every testbed metric; returns a JSON-able dict."""
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
    for i in range(cfg.n_foreign):
        f = draw_foreign_scene(cfg.seed + 7919 * (i + 1))
        fs = _ForeignAsScene(f)
        families.setdefault("foreign_pope", []).extend((fs, qa) for qa in pope_questions(fs, "random", rng, freq, co))
        for shape, colors in f.colors_by_shape.items():
            if len(colors) == 1:
                qa = QA(color_question(shape), colors[0].capitalize(), "color")
                families.setdefault("foreign_color", []).append((fs, qa))
    total = sum(len(v) for v in families.values())
    results: dict = {"n_scenes": cfg.n_scenes, "seed": cfg.seed}
    with Progress(disable=not show_progress) as bar:
        task = bar.add_task("testbed eval", total=total)
        for name, items in families.items():
            max_new = 48 if name == "caption" else 4
            answers = _answer_all(vlm, items, cfg.batch_size, max_new, plan, lambda k: bar.advance(task, k))
            if name.startswith("pope_") or name == "foreign_pope":
                preds = [parse_yes_no(a) for a in answers]
                results[name] = binary_metrics(preds, [qa.answer.lower() for _, qa in items])
            elif name in ("color", "count", "foreign_color"):
                ok = [a.strip().rstrip(".").lower() == qa.answer.lower() for a, (_, qa) in zip(answers, items)]
                results[f"{name}_accuracy"] = float(np.mean(ok))
            else:
                mentioned = [mentioned_categories(a) for a in answers]
                truth = [s.categories() for s, _ in items]
                hits = sum(len(m & t) for m, t in zip(mentioned, truth))
                results["caption"] = {
                    "recall": hits / max(1, sum(len(t) for t in truth)),
                    "chair_i": sum(len(m - t) for m, t in zip(mentioned, truth))
                    / max(1, sum(len(m) for m in mentioned)),
                    "chair_s": float(np.mean([bool(m - t) for m, t in zip(mentioned, truth)])),
                    "mean_length_words": float(np.mean([len(a.split()) for a in answers])),
                    "examples": [
                        {"truth": sorted(" ".join(c) for c in t), "answer": a} for t, a in list(zip(truth, answers))[:5]
                    ],
                }
    return results
