"""CHAIR (Rohrbach et al., EMNLP 2018): how many objects a caption names that the image does not hold.

The model describes COCO images ("Please describe this image in detail."). Ground truth per image is
the union of its instance-annotation categories and the objects its reference captions mention
(COCO `instances_*.json` + `captions_*.json`, read with pycocotools from `--annotations DIR`). Objects
in captions are found by `evals.coco_objects.mentions` (our synonym and multi-word rules, lemmatised by
lemminflect).

Metrics: CHAIR_s (captions with at least one hallucinated object), CHAIR_i (hallucinated mentions /
all object mentions, duplicates counted), recall (ground-truth objects named / ground-truth objects)
and mean length in words. Protocols: `max_new_tokens` 512 (default, the long-caption setting) or 64
(`chair:max_new_tokens=64`); `drop_incomplete=true` cuts a caption that hit the token budget after its
last full stop (OPERA's way for the 64-token numbers). Images: `n` (500) drawn with `seed` (0) from the
annotated images, or all of them when fewer.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from evals.coco_objects import CATEGORIES, mentions
from evals.suites.base import Param, Sample, Suite, SuiteError, _bool, _text

PROMPT = "Please describe this image in detail."


def _find(folder: Path, kind: str) -> Path:
    """The `kind` (instances / captions) annotation file in `folder`: val2014 first, else the only one."""
    preferred = folder / f"{kind}_val2014.json"
    if preferred.is_file():
        return preferred
    found = sorted(folder.glob(f"{kind}_*.json"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise SuiteError(
            f"chair: {what} {kind}_*.json in --annotations {folder}; it needs exactly one (or {preferred.name})"
        )
    return found[0]


def _coco(path: Path):
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress on stdout
            return COCO(str(path))
    except Exception as e:  # json / key errors in a file that is not COCO
        raise SuiteError(f"chair: {path} is not a COCO annotation file ({type(e).__name__}: {e})") from None


class ChairSuite(Suite):
    name = "chair"
    summary = "CHAIR_s / CHAIR_i / recall / length of detailed captions of COCO images"
    PARAMS = {
        "prompt": Param(_text, PROMPT, "the captioning instruction"),
        "max_new_tokens": Param(int, 512, "caption length budget: 512 (long protocol) or 64 (short)"),
        "n": Param(int, 500, "images drawn from the annotations (all when fewer)"),
        "seed": Param(int, 0, "seed of the image draw"),
        "drop_incomplete": Param(_bool, False, "cut a caption that hit the budget after its last full stop"),
    }

    def setup(self) -> None:
        if int(self.params["max_new_tokens"]) < 1 or int(self.params["n"]) < 1:
            raise SuiteError("suite chair: max_new_tokens and n must be >= 1")
        if self.data.annotations is None:
            raise SuiteError("suite chair needs --annotations DIR holding COCO instances_*.json and captions_*.json")
        if self.data.images is None or not Path(self.data.images).is_dir():
            raise SuiteError("suite chair needs --images DIR: the folder holding the annotated images")
        folder = Path(self.data.annotations)
        if not folder.is_dir():
            raise SuiteError(f"chair: --annotations {folder} is not a directory")
        self._files = [_find(folder, "instances"), _find(folder, "captions")]
        inst, caps = _coco(self._files[0]), _coco(self._files[1])
        names = {c["id"]: c["name"] for c in inst.loadCats(inst.getCatIds())}
        unknown = sorted(set(names.values()) - set(CATEGORIES))
        if unknown:
            raise SuiteError(f"chair: category {unknown[0]!r} in {self._files[0]} is not one of the 80 COCO categories")
        ids = sorted(set(inst.getImgIds()) & set(caps.getImgIds()))
        if not ids:
            raise SuiteError(f"chair: no image has both instance and caption annotations in {folder}")
        order = np.random.default_rng(int(self.params["seed"])).permutation(len(ids))[: int(self.params["n"])]
        self._images = []
        for k in order:
            img_id = ids[int(k)]
            truth = {names[a["category_id"]] for a in inst.loadAnns(inst.getAnnIds(imgIds=[img_id]))}
            refs = [a["caption"] for a in caps.loadAnns(caps.getAnnIds(imgIds=[img_id]))]
            for r in refs:
                truth |= set(mentions(r))
            self._images.append((img_id, inst.loadImgs([img_id])[0]["file_name"], sorted(truth)))

    def splits(self) -> dict[str, str]:
        return {"captions": "chair"}

    def files(self) -> list[Path]:
        return list(self._files)

    def samples(self) -> list[Sample]:
        images = Path(self.data.images)
        return [
            Sample(
                id=f"captions/{img_id}",
                split="captions",
                question=self.params["prompt"],
                image=str(images / file_name),
                max_new_tokens=int(self.params["max_new_tokens"]),
                target=truth,
                meta={"image": file_name, "image_id": img_id},
            )
            for img_id, file_name, truth in self._images
        ]

    def judge(self, sample: Sample, answer: str, finish_reason: str = "eos") -> dict:
        text = answer
        if self.params["drop_incomplete"] and finish_reason == "length" and "." in text:
            text = text[: text.rindex(".") + 1]
        return judge_caption(text, set(sample.target), mentions)


def judge_caption(text: str, truth: set, find) -> dict:
    """CHAIR's per-caption numbers for `text` against the truth set (`find`: text -> mentions)."""
    found = list(find(text))
    wrong = [m for m in found if m not in truth]
    return {
        "pred": {"mentioned": sorted(set(found)), "hallucinated": sorted(set(wrong))},
        "stats": {
            "mentions": len(found),
            "hallucinated": len(wrong),
            "hallucinated_any": int(bool(wrong)),
            "truth": len(truth),
            "covered": len(set(found) & truth),
            "words": len(text.split()),
        },
    }
