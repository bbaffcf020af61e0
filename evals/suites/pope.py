"""POPE (Li et al., EMNLP 2023): "Is there a {object} in the image?" with yes/no labels.

Questions come from POPE-format files, one JSON object a line: `{"question_id": 1, "image":
"COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}`.
By default the three official COCO files bundled in `evals/data/pope_coco/` (random / popular /
adversarial, 3,000 questions each); `--questions FILE` runs a user's own file instead (one split, named
after the file). Images are read from `--images DIR` (the file names the questions give). Answers are
parsed by `evals.parse.parse_pope`; metrics: accuracy, precision, recall, F1 and the yes-ratio of the
predictions.

The question is sent as written plus `post_prompt` (default LLaVA-1.5's evaluation suffix
"\\nAnswer the question using a single word or phrase."; `pope:post_prompt=none` sends it bare).
"""

from __future__ import annotations

import json
from pathlib import Path

from evals.parse import parse_pope
from evals.suites.base import Param, Sample, Suite, SuiteError, _text

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "pope_coco"
SPLITS = ("random", "popular", "adversarial")
LLAVA_POST_PROMPT = "\nAnswer the question using a single word or phrase."


def _splits(text: str) -> tuple[str, ...]:
    out = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in out if s not in SPLITS]
    if bad or not out:
        raise ValueError(text)
    return out


def read_questions(path: Path) -> list[dict]:
    """The lines of a POPE-format file, checked (SuiteError naming file and line)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise SuiteError(f"pope: cannot read question file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise SuiteError(f"pope: question file {path} is not UTF-8 text") from None
    out, ids = [], set()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise SuiteError(f"pope: {path}:{i} is not JSON ({e.msg}); one JSON object a line") from None
        if not isinstance(q, dict):
            raise SuiteError(f"pope: {path}:{i} is not a JSON object")
        missing = [k for k in ("question_id", "image", "text", "label") if k not in q]
        if missing:
            raise SuiteError(f"pope: {path}:{i} has no {missing[0]!r}; needs question_id, image, text, label")
        label = str(q["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise SuiteError(f"pope: {path}:{i}: label must be yes or no, got {q['label']!r}")
        if not str(q["text"]).strip():
            raise SuiteError(f"pope: {path}:{i}: empty question text")
        if q["question_id"] in ids:
            raise SuiteError(f"pope: {path}:{i}: question_id {q['question_id']!r} appears twice")
        ids.add(q["question_id"])
        out.append({**q, "label": label})
    if not out:
        raise SuiteError(f"pope: question file {path} holds no questions")
    return out


class PopeSuite(Suite):
    name = "pope"
    summary = "POPE yes/no object existence (COCO random/popular/adversarial, or --questions FILE)"
    PARAMS = {
        "splits": Param(_splits, SPLITS, "comma-separated subset of random,popular,adversarial"),
        "post_prompt": Param(_text, LLAVA_POST_PROMPT, "text appended to each question (none = nothing)"),
        "max_new_tokens": Param(int, 16, "answer length budget (the parser reads the first sentence)"),
    }

    def setup(self) -> None:
        if int(self.params["max_new_tokens"]) < 1:
            raise SuiteError("suite pope: max_new_tokens must be >= 1")
        if self.data.questions is not None:
            q = Path(self.data.questions)
            if not q.is_file():
                raise SuiteError(f"pope: question file {q} does not exist (--questions)")
            self._files = {q.stem: q}
        else:
            self._files = {s: BUNDLED / f"coco_pope_{s}.json" for s in self.params["splits"]}
        if self.data.images is None:
            raise SuiteError("suite pope needs --images DIR: the folder holding the images the questions name")
        if not Path(self.data.images).is_dir():
            raise SuiteError(f"suite pope: --images {self.data.images} is not a directory")
        self._questions = {split: read_questions(f) for split, f in self._files.items()}

    def splits(self) -> dict[str, str]:
        return {s: "binary" for s in self._files}

    def files(self) -> list[Path]:
        return list(self._files.values())

    def samples(self) -> list[Sample]:
        images = Path(self.data.images)
        out = []
        for split, qs in self._questions.items():
            for q in qs:
                out.append(
                    Sample(
                        id=f"{split}/{q['question_id']}",
                        split=split,
                        question=str(q["text"]) + self.params["post_prompt"],
                        image=str(images / q["image"]),
                        max_new_tokens=int(self.params["max_new_tokens"]),
                        target=q["label"],
                        meta={"image": q["image"], "question_id": q["question_id"]},
                    )
                )
        return out

    def judge(self, sample: Sample, answer: str, finish_reason: str = "eos") -> dict:
        pred = parse_pope(answer)
        return {"pred": pred, "stats": {"pred_yes": int(pred == "yes"), "label_yes": int(sample.target == "yes")}}
