"""The testbed suites: the questions of `lucid testbed eval` on fresh held-out scenes, exact ground truth.

The scenes and questions are `testbed.studies.evaluate.build_families` (seed 12345, 300 scenes by default, the
reference statistics for POPE popular/adversarial from the training distribution), so these suites give
the numbers `lucid testbed eval` gives, which is a thin alias of them.

* `testbed-pope`: POPE random / popular / adversarial, and the partner-absent split (a scene showing one
  member of a co-occurring pair without its partner, asked about the partner: the false-yes rate);
* `testbed-chair`: captions ("Describe the image."), CHAIR against the scene's exact objects, recall,
  length, and how often a caption names the absent partner;
* `testbed-qa`: colour and count accuracy, box-as-text ("Where is the red circle?", IoU >= 0.5), and
  POPE-style / colour questions on foreign scenes drawn by other code.

Answers are parsed with the testbed's own rules (`testbed.studies.evaluate.parse_yes_no`, `mentioned_categories`,
`parse_box`), as `lucid testbed eval` does.
"""

from __future__ import annotations

from evals.suites.base import Param, Sample, Suite, SuiteError

_CACHE: dict[tuple[int, int], tuple[int, dict]] = {}


def families(n: int, seed: int, n_foreign: int | None = None) -> dict:
    """`build_families` for these settings, built once per process; `n_foreign=None`: any number of
    foreign scenes will do (the held-out families do not depend on it)."""
    built = _CACHE.get((n, seed))
    if built is None or (n_foreign is not None and built[0] != n_foreign):
        from testbed.studies.evaluate import EvalConfig, build_families

        k = n_foreign or 0
        built = (k, build_families(EvalConfig(n_scenes=n, seed=seed, n_foreign=k)))
        _CACHE[(n, seed)] = built
    return built[1]


class _Testbed(Suite):
    FAMILIES: dict[str, tuple[str, str]] = {}  # family -> (split, kind)
    PARAMS = {
        "n": Param(int, 300, "held-out scenes"),
        "seed": Param(int, 12345, "seed of the held-out scenes (training uses other streams)"),
    }

    def setup(self) -> None:
        if int(self.params["n"]) < 1:
            raise SuiteError(f"suite {self.name}: n must be >= 1")
        if int(self.params["seed"]) < 0:
            raise SuiteError(f"suite {self.name}: seed must be >= 0")

    def _families(self) -> dict:
        nf = self.params.get("n_foreign")
        fams = families(int(self.params["n"]), int(self.params["seed"]), None if nf is None else int(nf))
        return {f: fams.get(f, []) for f in self.FAMILIES}

    def splits(self) -> dict[str, str]:
        return {split: kind for split, kind in self.FAMILIES.values()}

    def items(self, split: str) -> list:
        """The (scene, QA) pairs of a split, in sample order."""
        family = next(f for f, (s, _) in self.FAMILIES.items() if s == split)
        return self._families()[family]

    def samples(self) -> list[Sample]:
        from testbed.studies.evaluate import max_new_tokens

        out = []
        for family, items in self._families().items():
            split = self.FAMILIES[family][0]
            for i, (scene, qa) in enumerate(items):
                out.append(
                    Sample(
                        id=f"{split}/{i}",
                        split=split,
                        question=qa.question,
                        image=scene.image,
                        max_new_tokens=max_new_tokens(family),
                        target=self._target(family, scene, qa),
                        meta={"family": family},
                    )
                )
        return out

    def _target(self, family: str, scene, qa):
        return qa.answer


class TestbedPope(_Testbed):
    name = "testbed-pope"
    summary = "POPE random/popular/adversarial + partner-absent false-yes on testbed scenes"
    FAMILIES = {
        "pope_random": ("random", "binary"),
        "pope_popular": ("popular", "binary"),
        "pope_adversarial": ("adversarial", "binary"),
        "partner_absent": ("partner_absent", "false_yes"),
    }

    def _target(self, family, scene, qa):
        return qa.answer.lower()

    def judge(self, sample: Sample, answer: str, finish_reason: str = "eos") -> dict:
        from testbed.studies.evaluate import parse_yes_no

        pred = parse_yes_no(answer)
        stats = {"pred_yes": int(pred == "yes")}
        if sample.split != "partner_absent":
            stats["label_yes"] = int(sample.target == "yes")
        return {"pred": pred, "stats": stats}


class TestbedChair(_Testbed):
    name = "testbed-chair"
    summary = "CHAIR / recall / length of testbed captions against the scenes' exact objects"
    FAMILIES = {"caption": ("captions", "chair")}

    def _target(self, family, scene, qa):
        from testbed.studies.evaluate import absent_partners

        return {
            "objects": sorted(" ".join(c) for c in scene.categories()),
            "absent_partners": [" ".join(c) for c in absent_partners(scene)],
        }

    def judge(self, sample: Sample, answer: str, finish_reason: str = "eos") -> dict:
        from testbed.world.language import mentioned_categories

        m = {" ".join(c) for c in mentioned_categories(answer)}
        truth, partners = set(sample.target["objects"]), set(sample.target["absent_partners"])
        wrong = m - truth
        return {
            "pred": {"mentioned": sorted(m), "hallucinated": sorted(wrong)},
            "stats": {
                "mentions": len(m),
                "hallucinated": len(wrong),
                "hallucinated_any": int(bool(wrong)),
                "truth": len(truth),
                "covered": len(m & truth),
                "words": len(answer.split()),
                "absent_partner": int(bool(partners)),
                "names_absent_partner": int(bool(m & partners)),
            },
        }


class TestbedQA(_Testbed):
    name = "testbed-qa"
    summary = "colour / count accuracy, box-as-text, and foreign-scene questions on the testbed"
    FAMILIES = {
        "color": ("color", "accuracy"),
        "count": ("count", "accuracy"),
        "where": ("where", "box"),
        "foreign_pope": ("foreign_pope", "binary"),
        "foreign_color": ("foreign_color", "accuracy"),
    }
    PARAMS = {**_Testbed.PARAMS, "n_foreign": Param(int, 150, "scenes drawn by other code (testbed.world.foreign)")}

    def _target(self, family, scene, qa):
        return qa.answer.lower() if family == "foreign_pope" else qa.answer

    def judge(self, sample: Sample, answer: str, finish_reason: str = "eos") -> dict:
        from grounding.scoring import box_iou
        from testbed.studies.evaluate import parse_yes_no
        from testbed.world.language import parse_box

        if sample.split == "foreign_pope":
            pred = parse_yes_no(answer)
            return {"pred": pred, "stats": {"pred_yes": int(pred == "yes"), "label_yes": int(sample.target == "yes")}}
        if sample.split == "where":
            box = parse_box(answer)
            truth = tuple(float(v) for v in sample.target.split(","))
            return {"pred": list(box) if box else None, "stats": {"iou": box_iou(box, truth) if box else 0.0}}
        pred = answer.strip().rstrip(".").lower()
        return {"pred": pred, "stats": {"correct": int(pred == sample.target.lower())}}


def detail_items(n: int, seed: int) -> dict[str, list]:
    """The detail split's questions (`testbed.world.detail`): per scene one present and one absent category
    ("Is there a {colour} {shape} in the image?"), the colour of a shape drawn once, and the count of a shape;
    each item is (scene, QA, the object the answer depends on or None, the objects an oracle crop frames).
    The oracle frames the answer's objects (the target; every instance counted); where the answer rests on
    no object (an absent category, a count of 0) it frames a distractor drawn from the scene, so the view
    alone does not tell the answer. Deterministic by seed."""
    import numpy as np

    from testbed.world.detail import detail_scenes
    from testbed.world.language import QA, color_question, count_question, existence_question
    from testbed.world.scenes import CATEGORIES, SHAPES

    rng = np.random.default_rng([seed, 0xDE7])
    out: dict[str, list] = {"existence": [], "color": [], "count": []}
    for s in detail_scenes(seed, n):
        present = sorted({o.category for o in s.objects})
        absent = [c for c in CATEGORIES if c not in s.categories(include_occluded=True)]
        cat = present[int(rng.integers(len(present)))]
        target = next(o for o in s.objects if o.category == cat)
        distractor = s.objects[int(rng.integers(len(s.objects)))]
        out["existence"].append((s, QA(existence_question(*cat), "yes", "exist"), target, (target,)))
        if absent:
            cat = absent[int(rng.integers(len(absent)))]
            out["existence"].append((s, QA(existence_question(*cat), "no", "exist"), None, (distractor,)))
        unique = [sh for sh in SHAPES if s.count(sh) == 1]
        if unique:
            sh = unique[int(rng.integers(len(unique)))]
            obj = next(o for o in s.objects if o.shape == sh)
            out["color"].append((s, QA(color_question(sh), obj.color.capitalize(), "color"), obj, (obj,)))
        sh = SHAPES[int(rng.integers(len(SHAPES)))]
        counted = tuple(o for o in s.objects if o.shape == sh) or (distractor,)
        out["count"].append((s, QA(count_question(sh), str(s.count(sh)), "count"), None, counted))
    return out


def oracle_view(image, objects, margin: float = 1.0):
    """The oracle crop: the box around `objects` grown by `margin` times the largest object's side on every
    side (at least 16 px), clipped to the image, upscaled with Lanczos by max(W/w, H/h) as CARVE zooms.
    Returns (image, box)."""
    from vlm.images import zoom_to_cover

    x0 = min(o.bbox[0] for o in objects)
    y0 = min(o.bbox[1] for o in objects)
    x1 = max(o.bbox[2] for o in objects)
    y1 = max(o.bbox[3] for o in objects)
    side = max(max(o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]) for o in objects)
    pad = max(16.0, margin * side)
    W, H = image.size
    box = (max(0, int(x0 - pad)), max(0, int(y0 - pad)), min(W, int(x1 + pad) + 1), min(H, int(y1 + pad) + 1))
    return zoom_to_cover(image.crop(box), (W, H)), box


class TestbedDetail(Suite):
    """Small targets on large canvases (`testbed.world.detail`): existence, colour and count where seeing
    detail decides the answer. Nothing trains on it; calibrate methods on `seed=4243`, not on the eval seed."""

    name = "testbed-detail"
    summary = "existence / colour / count of small objects on large canvases (CARVE's and the magnifier's regime)"
    PARAMS = {
        "n": Param(int, 200, "scenes"),
        "seed": Param(int, 31337, "seed of the scenes (4243: the calibration seed, kept apart)"),
        "view": Param(str, "full", "full (the scene) or oracle (a crop around the answer's objects: the upper bound)"),
    }
    KINDS = {"existence": "binary", "color": "accuracy", "count": "accuracy"}

    def setup(self) -> None:
        if int(self.params["n"]) < 1:
            raise SuiteError(f"suite {self.name}: n must be >= 1")
        if int(self.params["seed"]) < 0:
            raise SuiteError(f"suite {self.name}: seed must be >= 0")
        if self.params["view"] not in ("full", "oracle"):
            raise SuiteError(f"suite {self.name}: view must be full or oracle, got {self.params['view']!r}")

    def splits(self) -> dict[str, str]:
        return dict(self.KINDS)

    def samples(self) -> list[Sample]:
        items = detail_items(int(self.params["n"]), int(self.params["seed"]))
        out = []
        oracle = self.params["view"] == "oracle"
        for split, rows in items.items():
            for i, (scene, qa, obj, focus) in enumerate(rows):
                meta = {"image_size": list(scene.image.size)}
                if obj is not None:
                    meta["target_box"] = list(obj.bbox)
                image = scene.image
                if oracle:
                    image, box = oracle_view(scene.image, focus)
                    meta["oracle_box"] = list(box)
                    if obj is not None:  # the target in the oracle view's pixels (crop quality is measured there)
                        s = image.size[0] / (box[2] - box[0])
                        x0, y0, x1, y1 = obj.bbox
                        ox, oy = box[0], box[1]
                        meta["target_box"] = [(x0 - ox) * s, (y0 - oy) * s, (x1 - ox) * s, (y1 - oy) * s]
                out.append(Sample(f"{split}/{i}", split, qa.question, image, 4, qa.answer, meta))
        return out

    def judge(self, sample: Sample, answer: str, finish_reason: str = "eos") -> dict:
        from testbed.studies.evaluate import parse_yes_no

        if sample.split == "existence":
            pred = parse_yes_no(answer)
            return {"pred": pred, "stats": {"pred_yes": int(pred == "yes"), "label_yes": int(sample.target == "yes")}}
        pred = answer.strip().rstrip(".").lower()
        return {"pred": pred, "stats": {"correct": int(pred == sample.target.lower())}}
