"""Calibrate and measure the hallucination-risk score (`lucid.risk`) on the testbed.

Labelled examples come from the testbed's exact ground truth, through the real generation path with an
attention recorder on every layer (head mean, the answer rows only):

* existence answers (POPE random / popular / adversarial and the partner-absent probe): the first
  answer token, hallucinated = the answer is wrong;
* caption objects: the token that emits the shape word of each "{colour} {shape}" mention,
  hallucinated = that category is not in the scene.

`calibrate` fits the logistic model on one seed's scenes; `measure` reports AUROC on another seed's:
for "Yes" answers to POPE-adversarial questions (hallucinated Yes vs correct Yes) and for caption objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.progress import Progress

from lucid.risk import RiskModel, auroc, fit_risk, token_features
from mitigation import AttentionRecorder
from testbed.studies.evaluate import absent_partners, parse_yes_no
from testbed.world.language import (
    CAPTION_QUESTION,
    POPE_SPLITS,
    category_frequency,
    cooccurrence,
    existence_question,
    pope_questions,
)
from testbed.world.scenes import COLORS, SHAPES, TRAIN_CONFIG, Scene, scenes
from vlm import VLM, SamplingParams, build_inputs, generate


@dataclass(frozen=True)
class Example:
    kind: str  # "pope_random" | "pope_popular" | "pope_adversarial" | "partner_absent" | "caption"
    features: np.ndarray  # [F] with confidence as the last entry
    hallucinated: bool
    said_yes: bool  # existence answers: the model answered yes


def _mentions(vlm: VLM, token_ids: tuple[int, ...]) -> list[tuple[int, tuple[str, str]]]:
    """(token index, category) of each "{colour} {shape}" mention, at the shape word's token."""
    tok = vlm.processor.tokenizer
    words = [tok.decode([t]).strip().lower().strip(".,") for t in token_ids]
    out = []
    for i in range(1, len(words)):
        shape = next((s for s in SHAPES if words[i].startswith(s)), None)
        if shape is not None and words[i - 1] in COLORS:
            out.append((i, (words[i - 1], shape)))
    return out


def collect(vlm: VLM, held: list[Scene], seed: int, batch_size: int = 16, show_progress: bool = True) -> list[Example]:
    """Labelled risk examples on `held` (see module docstring)."""
    ref = list(scenes(seed + 1, 1000, TRAIN_CONFIG))
    freq, co = category_frequency(ref), cooccurrence(ref)
    rng = np.random.default_rng(seed)
    items: list[tuple[str, Scene, str, str]] = []  # kind, scene, question, truth
    for s in held:
        for split in POPE_SPLITS:
            items += [
                (f"pope_{split}", s, qa.question, qa.answer.lower()) for qa in pope_questions(s, split, rng, freq, co)
            ]
        items += [("partner_absent", s, existence_question(*c), "no") for c in absent_partners(s)]
        items.append(("caption", s, CAPTION_QUESTION, ""))
    layers = list(range(vlm.n_layers))
    examples: list[Example] = []
    with Progress(disable=not show_progress, console=Console(stderr=True)) as bar:
        task = bar.add_task("risk examples", total=len(items))
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            for caption in (False, True):
                part = [it for it in chunk if (it[0] == "caption") == caption]
                if not part:
                    continue
                inputs = build_inputs(vlm, [s.image for _, s, _, _ in part], [q for _, _, q, _ in part])
                rec = AttentionRecorder(layers=layers, prefill_rows="all", reduce_heads="mean")
                gens = generate(vlm, inputs, SamplingParams(max_new_tokens=48 if caption else 3), recorder=rec)
                n = [max(1, len(g.token_ids)) for g in gens]
                lps = [list(g.token_logprobs) + [0.0] for g in gens]
                T = inputs.input_ids.shape[1]
                text_rows = [range(max(lay.all_token_positions) + 1, T) for lay in inputs.layouts]
                feats = token_features(rec, layers, n, T, lps, text_rows)
                for (kind, s, _, truth), g, f in zip(part, gens, feats):
                    if caption:
                        cats = s.categories()
                        for i, cat in _mentions(vlm, g.token_ids):
                            examples.append(Example(kind, f[i], cat not in cats, False))
                    else:
                        pred = parse_yes_no(g.text)
                        examples.append(Example(kind, f[0], pred != truth, pred == "yes"))
            bar.advance(task, len(chunk))
    return examples


def _matrix(examples: list[Example], n_layers: int, use_prompt: bool, use_confidence: bool) -> np.ndarray:
    """Select the feature columns of a model variant from the full [2L + 4L + 1] example features."""
    x = np.stack([e.features for e in examples])
    cols = list(range(2 * n_layers))
    if use_prompt:
        cols += list(range(2 * n_layers, 6 * n_layers))
    if use_confidence:
        cols.append(6 * n_layers)
    return x[:, cols]


def calibrate(
    vlm: VLM,
    examples: list[Example],
    use_prompt: bool = True,
    use_confidence: bool = False,
    calibration: dict | None = None,
) -> RiskModel:
    """Fit the risk model on labelled examples (from `collect` on a calibration seed)."""
    ex = examples
    y = np.array([e.hallucinated for e in ex])
    return fit_risk(
        _matrix(ex, vlm.n_layers, use_prompt, use_confidence),
        y,
        range(vlm.n_layers),
        use_confidence,
        use_prompt,
        weights_hash=vlm.weights_hash(),
        calibration={**(calibration or {}), "examples": len(ex), "hallucinated": int(y.sum())},
    )


def measure(model: RiskModel, examples: list[Example]) -> dict:
    """AUROC of `model` on held-out examples: hallucinated vs correct "Yes" to POPE-adversarial
    questions, all existence answers, and caption objects."""
    scores = model.score(_matrix(examples, len(model.layers), model.use_prompt, model.use_confidence))

    def au(sel) -> dict:
        idx = [i for i, e in enumerate(examples) if sel(e)]
        labels = [examples[i].hallucinated for i in idx]
        return {"auroc": auroc(scores[idx], labels), "n": len(idx), "hallucinated": int(sum(labels))}

    return {
        "pope_adversarial_yes": au(lambda e: e.kind == "pope_adversarial" and e.said_yes),
        "existence_all": au(lambda e: e.kind != "caption"),
        "partner_absent_and_adversarial_yes": au(
            lambda e: e.kind in ("pope_adversarial", "partner_absent") and e.said_yes
        ),
        "caption_objects": au(lambda e: e.kind == "caption"),
    }


VARIANTS = ((False, False), (False, True), (True, False), (True, True))  # (use_prompt, use_confidence)


def cross_validated(vlm: VLM, examples: list[Example], folds: int = 2, seed: int = 0) -> dict[tuple[bool, bool], float]:
    """Existence-answer AUROC of each feature variant by k-fold cross-validation on the calibration
    examples (scenes are not split across folds only approximately: folds are drawn per example)."""
    rng = np.random.default_rng(seed)
    fold = rng.integers(folds, size=len(examples))
    out = {}
    for variant in VARIANTS:
        aucs = []
        for k in range(folds):
            train = [e for e, f in zip(examples, fold) if f != k]
            test = [e for e, f in zip(examples, fold) if f == k]
            m = calibrate(vlm, train, *variant)
            aucs.append(measure(m, test)["existence_all"]["auroc"])
        out[variant] = float(np.mean(aucs))
    return out
