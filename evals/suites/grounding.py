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
  at IoU >= 0.5), box accuracy of the mask's box, and pointing of the prompted pixel. `method=` picks the
  attention -> SAM path as `lucid segment --method` does: `heads` (the default, above), `read[:k=v;...]`
  (`grounding.read`, scored as `read_to_sam`: pointing of the first positive point) or `vl-sam[:k=v;...]`
  (`grounding.vlsam` referring, as `vlsam_to_sam`: pointing of the last SAM call's positive point; no
  object is IoU 0). A method's own options are separated by `;` (the suite's spec already splits on `,`):
  `testbed-segment:n=50,method=read:token=target;layer=3`.
* `testbed-detect`: open-ended VL-SAM (`lucid segment IMAGE --all`) once per held-out scene
  (`scenes(seed, n, WorldConfig())`, the scenes of `vlsam_open_ended`), scored as `vlsam_open_ended` scores it
  (`testbed.studies.sam_eval.detection_hits`, `grounding.scoring.average_precision`): box / mask AP@0.5, recall@0.5,
  the share of the scenes' categories named and of the named categories absent from their scene.

All three measure the checkpoint's attention as it is: `grounding` reads it with a plain prefill, so mitigation
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


SEGMENT_METHODS = ("heads", "read", "vl-sam")


def method_spec(suite: str, value: str, allowed: tuple[str, ...] = SEGMENT_METHODS) -> tuple[str, str, object]:
    """A suite's `method=` value -> (name, the `k=v,...` spec its parser takes, its parsed parameters); the
    method's own options are separated by `;` (`read:token=target;layer=3`). SuiteError naming the value."""
    text = value.strip()
    name, colon, body = text.partition(":")
    name = name.strip()
    if name not in allowed:
        forms = " | ".join(m if m == "heads" else f"{m}[:k=v;...]" for m in allowed)
        raise SuiteError(f"suite {suite}: method must be {forms}, got {value!r}")
    spec = name + (":" + body.replace(";", ",") if colon else "")
    if name == "heads":
        if body.strip():
            raise SuiteError(
                f"suite {suite}: method=heads takes no options (the heads' are the suite's own), got {value!r}"
            )
        return name, spec, None
    try:
        if name == "read":
            from grounding.read import parse_read

            return name, spec, parse_read(spec)
        from grounding.vlsam import parse_vlsam

        return name, spec, parse_vlsam(spec)
    except ValueError as e:
        raise SuiteError(f"suite {suite}: method={value!r}: {e}") from None


def _sam_files(spec: str) -> list[Path]:
    from grounding.sam import TESTBED_SAM

    spec = spec.strip()
    d = TESTBED_SAM if spec == "testbed" else Path(spec)
    return [d / "model.safetensors"] if (d / "model.safetensors").is_file() else []


class TestbedSegment(_Grounding):
    name = "testbed-segment"
    summary = (
        "text query -> heads (locate) / READ / VL-SAM -> SAM on testbed scenes: mask mIoU, share at IoU >= 0.5, "
        "box accuracy (baseline only)"
    )
    task = "segment"
    KIND = "mask"
    PARAMS = {
        **_Grounding.PARAMS,
        "prompt": Param(str, "point", "what SAM gets from the located map: point | box | point_box"),
        "sam": Param(str, "testbed", "SAM spec as `lucid segment --sam` (testbed: the embedded tiny SAM)"),
        "method": Param(
            str,
            "heads",
            "the path to SAM, as `lucid segment --method`: heads | read[:k=v;...] | vl-sam[:k=v;...] (options: ';')",
        ),
    }
    HEADS_ONLY = ("prompt", "threshold", "peak_fraction", "sigma")  # the heads' options: not READ's or VL-SAM's

    def setup(self) -> None:
        super().setup()
        how = self.params["prompt"]
        if how not in ATTENTION_PROMPTS:
            raise SuiteError(f"suite {self.name}: prompt must be one of {', '.join(ATTENTION_PROMPTS)}, got {how!r}")
        self.method, self.method_spec, self.method_params = method_spec(self.name, self.params["method"])
        if self.method != "heads":
            given = [k for k in self.HEADS_ONLY if self.params[k] != self.PARAMS[k].default]
            if given:
                raise SuiteError(
                    f"suite {self.name}: {given[0]}= belongs to method=heads, not method={self.params['method']}"
                )
        from grounding.sam import check_sam_spec

        check_sam_spec(self.params["sam"])

    def config(self) -> dict:
        out = super().config()
        if self.method == "heads":  # the default: the configuration (and so the cell key) of before `method=`
            out["params"].pop("method")
        else:
            out["method"] = {"name": self.method, "spec": self.method_spec, "params": vars(self.method_params)}
        return out

    def files(self) -> list[Path]:
        return _sam_files(self.params["sam"])

    def task_payload(self, samples: list[Sample]) -> dict:
        out = {**super().task_payload(samples), "sam": self.params["sam"].strip(), "prompt": self.params["prompt"]}
        return out if self.method == "heads" else {**out, "method": self.method_spec}

    def judge(self, sample: Sample, answer, finish_reason: str = "segmented") -> dict:
        from grounding.scoring import box_iou, mask_iou, on_mask
        from grounding.segment import decode_rle

        it = self.item(sample)
        if answer["mask"] is None:  # VL-SAM found no candidate for the query: IoU 0, as vlsam_to_sam scores it
            return {"pred": None, "stats": {"mask_iou": 0.0, "box_iou": 0.0, "on_object": 0}}
        mask = decode_rle(answer["mask"])
        box = tuple(answer["box"])
        pixel = answer["pixel"]
        return {
            "pred": {"box": [round(v, 2) for v in box], "pixel": pixel, "sam_score": answer["score"]},
            "stats": {
                "mask_iou": mask_iou(mask, it.mask),
                "box_iou": float(box_iou(box, tuple(float(v) for v in it.bbox))),
                "on_object": int(pixel is not None and on_mask(it.mask, tuple(pixel))),
            },
        }


_SCENES: dict[tuple[int, int], list] = {}


def scene_list(seed: int, n: int) -> list:
    """`testbed.world.scenes.scenes(seed, n, WorldConfig())` (the held-out scenes), drawn once per process."""
    if (seed, n) not in _SCENES:
        from testbed.world.scenes import WorldConfig, scenes

        _SCENES[(seed, n)] = list(scenes(seed, n, WorldConfig()))
    return _SCENES[(seed, n)]


class TestbedDetect(Suite):
    name = "testbed-detect"
    summary = "open-ended VL-SAM (`lucid segment --all`) per testbed scene: box / mask AP@0.5, recall, absent names"
    task = "detect"
    uses_methods = False
    KIND = "detect"
    PARAMS = {
        "n": Param(int, 200, "held-out scenes (one sample each)"),
        "seed": Param(int, 12345, "seed of the held-out scenes"),
        "method": Param(str, "vl-sam", "the open-ended method, as `lucid segment --all --method`: vl-sam[:k=v;...]"),
        "sam": Param(str, "testbed", "SAM spec as `lucid segment --sam` (testbed: the embedded tiny SAM)"),
    }

    def setup(self) -> None:
        if int(self.params["n"]) < 1:
            raise SuiteError(f"suite {self.name}: n must be >= 1")
        if int(self.params["seed"]) < 0:
            raise SuiteError(f"suite {self.name}: seed must be >= 0")
        _, self.method_spec, self.method_params = method_spec(self.name, self.params["method"], ("vl-sam",))
        from grounding.sam import check_sam_spec

        check_sam_spec(self.params["sam"])

    def config(self) -> dict:
        return {**super().config(), "method": {"spec": self.method_spec, "params": vars(self.method_params)}}

    def splits(self) -> dict[str, str]:
        return {"heldout": self.KIND}

    def scenes(self) -> list:
        return scene_list(int(self.params["seed"]), int(self.params["n"]))

    def samples(self) -> list[Sample]:
        return [
            Sample(
                id=f"heldout/{i}",
                split="heldout",
                question=self.method_params.prompt,
                image=sc.image,
                max_new_tokens=0,
                target={"objects": [{"label": o.name, "box": [int(v) for v in o.bbox]} for o in sc.objects]},
                meta={"scene": i},
            )
            for i, sc in enumerate(self.scenes())
        ]

    def files(self) -> list[Path]:
        return _sam_files(self.params["sam"])

    def task_payload(self, samples: list[Sample]) -> dict:
        return {"sam": self.params["sam"].strip(), "method": self.method_spec}

    def judge(self, sample: Sample, answer, finish_reason: str = "detected") -> dict:
        from types import SimpleNamespace

        from grounding.segment import decode_rle
        from testbed.studies.sam_eval import detection_hits

        scene = self.scenes()[sample.meta["scene"]]
        gt = [(o.name, o.mask, tuple(float(v) for v in o.bbox)) for o in scene.objects]
        dets = sorted(
            (
                SimpleNamespace(label=o["label"], score=o["score"], box=tuple(o["box"]), mask=decode_rle(o["mask"]))
                for o in answer["objects"]
            ),
            key=lambda o: -o.score,
        )
        hits = detection_hits(dets, gt)
        present, named = {g[0] for g in gt}, set(answer["named"])
        return {
            "pred": [{"label": o.label, "score": round(o.score, 6), "box": [round(v, 2) for v in o.box]} for o in dets],
            "stats": {
                "det_label": [o.label for o in dets],
                "det_score": [float(o.score) for o in dets],
                "det_box_tp": [int(v) for v in hits["box"]],
                "det_mask_tp": [int(v) for v in hits["mask"]],
                "gt_label": [g[0] for g in gt],
                "objects": len(gt),
                "matched": int(sum(hits["mask"])),
                "present": len(present),
                "named": len(named),
                "named_present": len(named & present),
                "named_absent": len(named - present),
                "detections": len(dets),
            },
        }
