"""The grounding suites: where the checkpoint's localization heads put "the {colour} {shape}" on testbed
scenes, scored against the scenes' exact masks and boxes.

The queries are `testbed.studies.localization.eval_items`: on the held-out scenes `scenes(seed, n, WorldConfig())`
(the scenes the other testbed suites draw for the same `n` and `seed`), one "the {colour} {shape}" per
present object whose category is unique in its scene (an ambiguous query has no single right answer);
with `n_foreign` > 0 also a `foreign` split on scenes drawn by other code (`testbed.world.foreign`, the seeds
`testbed.studies.evaluate` uses).

* `testbed-locate`: `grounding.locate` with the heads of `grounding.load_or_discover` (the checkpoint's
  own selection) and the `LocateParams` of `lucid locate` (`threshold`, `peak_fraction`, `sigma`, same
  defaults). Scored as `testbed.studies.localization.LocalizationRun.score` scores it: pointing (the peak point
  lies on the object's visible mask), box accuracy (IoU >= 0.5 with the object's box), mean IoU.
* `testbed-segment`: the same queries through `grounding.segment.segment_query` (locate -> a SAM prompt
  -> SAM; the embedded SAM by default, loaded once per worker), scored as
  `testbed.studies.sam_eval.attention_to_sam` scores it: mask IoU with the object's exact mask (mIoU and the share
  at IoU >= 0.5), box accuracy of the mask's box, and pointing of the prompted pixel.

Both measure the checkpoint's attention as it is: `grounding` reads it with a plain prefill, so mitigation
methods do not apply. They run in the baseline cell only (`uses_methods = False`): `--method` sets add
no cells for them, and `--no-baseline` with one of them is an error.
"""

from __future__ import annotations

from pathlib import Path

from evals.suites.base import Param, Sample, Suite, SuiteError

THRESHOLDS = ("mean", "peak_fraction")  # grounding.locate.THRESHOLDS (not imported: that module imports torch)
ATTENTION_PROMPTS = ("point", "box", "point_box")  # grounding.segment.ATTENTION_PROMPTS

_ITEMS: dict[tuple[int, int, int], list] = {}


def items(seed: int, n: int, n_foreign: int) -> list:
    """`testbed.studies.localization.eval_items(seed, n, n_foreign)`, built once per process."""
    key = (seed, n, n_foreign)
    if key not in _ITEMS:
        from testbed.studies.localization import eval_items

        _ITEMS[key] = eval_items(seed, n, n_foreign)
    return _ITEMS[key]


class _Grounding(Suite):
    uses_methods = False
    PARAMS = {
        "n": Param(int, 300, "held-out scenes"),
        "seed": Param(int, 12345, "seed of the held-out scenes (training uses other streams)"),
        "n_foreign": Param(int, 0, "scenes drawn by other code (testbed.world.foreign): a 'foreign' split"),
        "threshold": Param(str, "mean", "box rule: mean (the paper's) | peak_fraction, as `lucid locate`"),
        "peak_fraction": Param(float, 0.8, "with threshold=peak_fraction: sub-cells >= F x peak, in (0, 1]"),
        "sigma": Param(float, 1.0, "Gaussian smoothing of the heads' map, in grid cells (>= 0)"),
    }

    def setup(self) -> None:
        p = self.params
        if int(p["n"]) < 1:
            raise SuiteError(f"suite {self.name}: n must be >= 1")
        if int(p["seed"]) < 0 or int(p["n_foreign"]) < 0:
            raise SuiteError(f"suite {self.name}: seed and n_foreign must be >= 0")
        if p["threshold"] not in THRESHOLDS:
            valid = ", ".join(THRESHOLDS)
            raise SuiteError(f"suite {self.name}: threshold must be one of {valid}, got {p['threshold']!r}")
        if not 0 < float(p["peak_fraction"]) <= 1:
            raise SuiteError(f"suite {self.name}: peak_fraction must be in (0, 1], got {p['peak_fraction']}")
        if not 0 <= float(p["sigma"]) <= 10:
            raise SuiteError(f"suite {self.name}: sigma must be in [0, 10] grid cells, got {p['sigma']}")
        self._by_id: dict[str, object] = {}

    def locate_params(self) -> dict:
        """The `grounding.LocateParams` fields, chosen as `lucid locate` chooses them."""
        t = self.params["threshold"]
        return {
            "sigma": float(self.params["sigma"]),
            "threshold": t,
            "peak_fraction": float(self.params["peak_fraction"]),
            "component": "peak" if t == "peak_fraction" else "largest",
        }

    def splits(self) -> dict[str, str]:
        out = {"heldout": self.KIND}
        if int(self.params["n_foreign"]):
            out["foreign"] = self.KIND
        return out

    def items(self) -> list:
        return items(int(self.params["seed"]), int(self.params["n"]), int(self.params["n_foreign"]))

    def samples(self) -> list[Sample]:
        out: list[Sample] = []
        scene: dict[int, int] = {}  # id(image) -> scene index in its split (items of a scene share its image)
        count: dict[str, int] = {}
        for it in self.items():
            k = scene.setdefault(id(it.image), len(scene))
            i = count.get(it.split, 0)
            count[it.split] = i + 1
            s = Sample(
                id=f"{it.split}/{i}",
                split=it.split,
                question=it.query,
                image=it.image,
                max_new_tokens=0,
                target={"box": [int(v) for v in it.bbox], "mask_pixels": int(it.mask.sum())},
                meta={"scene": k},
            )
            self._by_id[s.id] = it
            out.append(s)
        return out

    def item(self, sample: Sample):
        """The ground truth (`testbed.studies.localization.Item`: mask, box) of a sample."""
        if sample.id not in self._by_id:
            self.samples()
        return self._by_id[sample.id]

    def task_payload(self, samples: list[Sample]) -> dict:
        return {"locate": self.locate_params(), "scenes": [s.meta["scene"] for s in samples]}


class TestbedLocate(_Grounding):
    name = "testbed-locate"
    summary = "pointing / box accuracy / mean IoU of `lucid locate` on testbed scenes (baseline only)"
    task = "locate"
    KIND = "locate"

    def judge(self, sample: Sample, answer, finish_reason: str = "located") -> dict:
        from grounding.scoring import box_iou, on_mask

        it = self.item(sample)
        box, point = tuple(answer["box"]), tuple(answer["point"])
        return {
            "pred": {"box": [round(v, 2) for v in box], "point": [round(v, 2) for v in point]},
            "stats": {"on_object": int(on_mask(it.mask, point)), "iou": float(box_iou(box, it.bbox))},
        }


class TestbedSegment(_Grounding):
    name = "testbed-segment"
    summary = "text query -> locate -> SAM on testbed scenes: mask mIoU, share at IoU >= 0.5 (baseline only)"
    task = "segment"
    KIND = "mask"
    PARAMS = {
        **_Grounding.PARAMS,
        "prompt": Param(str, "point", "what SAM gets from the located map: point | box | point_box"),
        "sam": Param(str, "testbed", "SAM spec as `lucid segment --sam` (testbed: the embedded tiny SAM)"),
    }

    def setup(self) -> None:
        super().setup()
        how = self.params["prompt"]
        if how not in ATTENTION_PROMPTS:
            raise SuiteError(f"suite {self.name}: prompt must be one of {', '.join(ATTENTION_PROMPTS)}, got {how!r}")
        from grounding.sam import check_sam_spec

        check_sam_spec(self.params["sam"])

    def files(self) -> list[Path]:
        from grounding.sam import TESTBED_SAM

        spec = self.params["sam"].strip()
        d = TESTBED_SAM if spec == "testbed" else Path(spec)
        return [d / "model.safetensors"] if (d / "model.safetensors").is_file() else []

    def task_payload(self, samples: list[Sample]) -> dict:
        return {**super().task_payload(samples), "sam": self.params["sam"].strip(), "prompt": self.params["prompt"]}

    def judge(self, sample: Sample, answer, finish_reason: str = "segmented") -> dict:
        from grounding.scoring import box_iou, mask_iou, on_mask
        from grounding.segment import decode_rle

        it = self.item(sample)
        mask = decode_rle(answer["mask"])
        box = tuple(answer["box"])
        return {
            "pred": {"box": [round(v, 2) for v in box], "pixel": answer["pixel"], "sam_score": answer["score"]},
            "stats": {
                "mask_iou": mask_iou(mask, it.mask),
                "box_iou": float(box_iou(box, tuple(float(v) for v in it.bbox))),
                "on_object": int(on_mask(it.mask, tuple(answer["pixel"]))),
            },
        }
