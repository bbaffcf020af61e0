"""The segmentation tables from `lucid eval`: `testbed-segment:method=read|vl-sam[...]` and `testbed-detect`
(open-ended VL-SAM) in this process, on the embedded model and SAM. Their numbers are those of
`lucid testbed eval-sam --read / --vl-sam / --vl-sam-all` (`testbed.studies.sam_eval`) on the same scenes;
`method=heads` (the default) is the suite of before; bad method values are SuiteErrors before a model loads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evals.job import JobSpec, make_plan, run_job
from evals.suites import build
from lucid.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
N, SEED, N_FOREIGN = 3, 777, 1
BASE = f"testbed-segment:n={N},seed={SEED},n_foreign={N_FOREIGN}"
READ = f"{BASE},method=read"
READ_TARGET = f"{BASE},method=read:token=target;layer=3"  # a method's own options: ';'
VLSAM = f"{BASE},method=vl-sam:multiscale=false;questions=1"
NAIVE = "multiscale=false;questions=1;flow=none;head_weights=uniform;regularize=none"  # the best open-ended row
N_DETECT = 6
DETECT = f"testbed-detect:n={N_DETECT},method=vl-sam:{NAIVE}"
DETECT_SEED = f"testbed-detect:n=2,seed=99,method=vl-sam:{NAIVE.replace('questions=1', 'questions=2')}"
SUITES = (READ, READ_TARGET, VLSAM, DETECT, DETECT_SEED)


def comma(spec: str) -> str:
    """The method spec of a suite spec as `lucid segment --method` / `eval-sam` take it."""
    return spec.partition("method=")[2].replace(";", ",")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval-segment")
    spec = JobSpec(suites=SUITES, workers=0, batch_size=16, bootstrap=200, progress=False, out=out)
    plan = make_plan(spec)
    return out, plan, run_job(spec, plan, log=lambda m: None)


@pytest.fixture(scope="module")
def eval_sam():
    """What `lucid testbed eval-sam --read R --vl-sam V --vl-sam-all A` computes, on the suites' scenes."""
    from grounding.sam import load_segmenter
    from testbed.studies.sam_eval import read_to_sam, vlsam_open_ended, vlsam_to_sam
    from vlm import load_vlm

    vlm, seg = load_vlm("testbed"), load_segmenter("testbed")
    return {
        "read": read_to_sam(vlm, seg, [comma(READ), comma(READ_TARGET)], SEED, N, N_FOREIGN, progress=False),
        "vl_sam": vlsam_to_sam(vlm, seg, [comma(VLSAM)], SEED, N, N_FOREIGN, progress=False),
        "vl_sam_all": vlsam_open_ended(vlm, seg, [comma(DETECT)], n_scenes=N_DETECT, progress=False),
        "vl_sam_all_seed": vlsam_open_ended(vlm, seg, [comma(DETECT_SEED)], seed=99, n_scenes=2, progress=False),
    }


def entry(res: dict, suite: str, split: str = "heldout") -> dict:
    return res["results"][f"{suite}/{split}"]["testbed"]["baseline"]


@pytest.mark.parametrize("suite, table", [(READ, "read"), (READ_TARGET, "read"), (VLSAM, "vl_sam")])
def test_segment_methods_are_eval_sams_numbers(job, eval_sam, suite, table):
    _, _, res = job
    ref = eval_sam[table][comma(suite)]
    for split in ("heldout", "foreign"):
        mine = entry(res, suite, split)
        assert mine["kind"] == "mask" and mine["n"] == ref[split]["items"] > 0
        assert mine["miou"] == pytest.approx(ref[split]["miou"], abs=1e-4), (suite, split)
        assert mine["box_accuracy"] == pytest.approx(ref[split]["box_acc"], abs=1e-4), (suite, split)
        assert mine["pointing"] == pytest.approx(ref[split]["pointing"], abs=1e-4), (suite, split)
        assert set(mine["ci95"]) == {"miou", "iou_ge_0.5", "box_accuracy", "pointing"}
    # the two READ variants differ (the token's state is not the same), so `;` reached READ's parser
    assert eval_sam["read"][comma(READ)]["heldout"]["miou"] != eval_sam["read"][comma(READ_TARGET)]["heldout"]["miou"]


def test_detect_is_eval_sam_vl_sam_all(job, eval_sam):
    _, _, res = job
    for suite, table in ((DETECT, "vl_sam_all"), (DETECT_SEED, "vl_sam_all_seed")):
        ref = eval_sam[table][comma(suite)]
        mine = entry(res, suite)
        assert mine["kind"] == "detect" and mine["n"] == eval_sam[table]["n_scenes"]
        for k in ("box_ap50", "mask_ap50", "recall50", "named_recall", "named_absent"):
            assert mine[k] == pytest.approx(ref[k], abs=1e-4), (suite, k)
        assert mine["detections_per_image"] == pytest.approx(ref["detections_per_image"], abs=1e-3)
    mine = entry(res, DETECT)
    assert 0 < mine["box_ap50"] < 1 and 0 < mine["recall50"] <= 1  # a table that can tell configurations apart
    for k in ("box_ap50", "mask_ap50", "recall50", "named_absent"):
        lo, hi = mine["ci95"][k]
        assert lo <= mine[k] <= hi


def test_detect_records_and_report(job):
    out, plan, res = job
    cell = next(c for c in plan.cells if c.suite.spec == DETECT)
    recs = [cell.done[s.id] for s in cell.samples]
    assert len(recs) == N_DETECT and {r["finish_reason"] for r in recs} == {"detected"}
    for r in recs:
        st = r["stats"]
        assert len(st["det_label"]) == len(st["det_score"]) == len(st["det_mask_tp"]) == st["detections"]
        assert st["det_score"] == sorted(st["det_score"], reverse=True) and st["objects"] == len(r["target"]["objects"])
        assert all(set(o["mask"]) == {"size", "counts"} for o in r["answer"]["objects"])
    total = sum(r["stats"]["objects"] for r in recs)
    assert entry(res, DETECT)["recall50"] == pytest.approx(sum(r["stats"]["matched"] for r in recs) / total)
    f = next((out / "samples" / "testbed" / "baseline").glob("testbed-detect*.jsonl"))
    assert len(f.read_text().splitlines()) == N_DETECT
    report = (out / "report.md").read_text()
    assert "## testbed-detect" in report and "box_ap50" in report and "charts/testbed-detect" in report
    cfg = res["configs"][DETECT]
    assert cfg["method"]["params"]["flow"] == "none" and cfg["params"]["method"] == DETECT.partition("method=")[2]


def test_eval_sam_cli_vl_sam_all_is_the_suites(job, tmp_path):
    """`lucid testbed eval-sam --vl-sam-all SPEC --vl-sam-scenes N` itself, on the suite's scenes."""
    _, _, res = job
    spec = comma(DETECT)
    proc = subprocess.run(
        [sys.executable, "-m", "lucid.cli", "testbed", "eval-sam", "--n", "1", "--foreign", "0", "--threads", "1"]
        + ["--vl-sam-all", spec, "--vl-sam-scenes", str(N_DETECT), "--out", str(tmp_path / "m.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = json.loads((tmp_path / "m.json").read_text())["vl_sam_all"][spec]
    mine = entry(res, DETECT)
    for k in ("box_ap50", "mask_ap50", "recall50", "named_recall", "named_absent"):
        assert mine[k] == pytest.approx(ref[k], abs=1e-4), k


def test_heads_is_the_default_suite_of_before():
    default, explicit = build(BASE), build(f"{BASE},method=heads")
    assert default.spec == explicit.spec == BASE
    assert default.config() == explicit.config() and "method" not in default.config()["params"]
    samples = default.samples()
    assert "method" not in default.task_payload(samples[:2])  # the worker runs the heads' path
    read = build(READ)
    assert read.task_payload(read.samples()[:2])["method"] == "read"
    assert build(READ_TARGET).task_payload(samples[:1])["method"] == "read:token=target,layer=3"
    assert build(READ_TARGET).config()["method"]["params"]["layer"] == 3


@pytest.mark.parametrize(
    "spec, match",
    [
        ("testbed-segment:method=sam", "method must be heads | read[:k=v;...] | vl-sam[:k=v;...], got 'sam'"),
        ("testbed-segment:method=heads:sigma=2", "method=heads takes no options"),
        ("testbed-segment:method=read:bogus=1", "method='read:bogus=1': read: unknown option 'bogus=1'"),
        ("testbed-segment:method=read:token=x", "token must be one of auto, seg, target, last, got 'x'"),
        ("testbed-segment:method=read:token=target,layer=3", "unknown parameter 'layer'"),  # ',' ends the value
        ("testbed-segment:method=vl-sam:iterations=5", "iterations must be 0, 1 or 2"),
        ("testbed-segment:method=read,prompt=box", "prompt= belongs to method=heads, not method=read"),
        ("testbed-segment:method=vl-sam,sigma=2", "sigma= belongs to method=heads"),
        ("testbed-detect:method=read", "suite testbed-detect: method must be vl-sam[:k=v;...], got 'read'"),
        ("testbed-detect:method=vl-sam:flow=max", "flow must be one of paper, rollout, none"),
        ("testbed-detect:n=0", "n must be >= 1"),
        ("testbed-detect:sam=nowhere", "unknown SAM spec 'nowhere'"),
    ],
)
def test_bad_method_values(spec, match):
    with pytest.raises(InputError, match=re.escape(match)):
        build(spec)


def test_bad_method_is_one_line_before_a_model_loads(tmp_path):
    marker = tmp_path / "worker-imported"
    probe = (
        "import sys, atexit\nmarker = sys.argv.pop(1)\n"
        "atexit.register(lambda: open(marker, 'w').write(str('evals.worker' in sys.modules)))\n"
        "from lucid.cli import main\nmain()\n"
    )
    args = ["eval", "--suite", "testbed-segment:method=read:layer=x", "--out", str(tmp_path / "o")]
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(marker), *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lucid: error: suite testbed-segment: method='read:layer=x'")
    assert "layer must be int" in lines[0] and marker.read_text() == "False"
    assert not (tmp_path / "o" / "samples").exists()


def test_detect_metric_pools_scenes():
    """AP over the pooled detections of the samples, by hand; a bootstrap row pools the resampled scenes."""
    from evals import metrics as M

    recs = [
        {"stats": _scene(["a", "b"], [0.9, 0.4], [1, 0], [1, 0], ["a", "b"], named=["a", "b", "c"])},
        {"stats": _scene(["a"], [0.6], [0], [1], ["a"], named=["a"])},
        {"stats": _scene([], [], [], [], ["b"], named=[])},
    ]
    s = M.stack(recs)
    assert s["det_label"].dtype == object and s["objects"].dtype == float
    got = M.aggregate("detect", s)
    # box: a: TP 0.9, FP 0.6 of 2 objects -> 51 recall points at precision 1 of 101; b: FP of 2 objects -> 0
    assert got["box_ap50"] == pytest.approx((51 / 101 + 0) / 2)
    # mask: a: TP, TP -> 1; b: 0
    assert got["mask_ap50"] == pytest.approx(0.5)
    assert got["recall50"] == pytest.approx(2 / 4) and got["named_absent"] == pytest.approx(1 / 4)
    assert got["named_recall"] == pytest.approx(3 / 4) and got["detections_per_image"] == pytest.approx(1.0)
    # a resample drawing the first scene twice: AP of the pooled copies
    twice = M.KINDS["detect"]({k: np.asarray(v)[np.array([[0, 0, 2]])] for k, v in s.items()})
    assert twice["mask_ap50"][0] == pytest.approx((1.0 + 0.0) / 2)
    assert twice["recall50"][0] == pytest.approx(2 / 5)
    ci = M.bootstrap("detect", s, b=50)
    assert set(ci) == set(got)


def _scene(labels, scores, box_tp, mask_tp, gt, named):
    present = set(gt)
    return {
        "det_label": labels,
        "det_score": scores,
        "det_box_tp": box_tp,
        "det_mask_tp": mask_tp,
        "gt_label": gt,
        "objects": len(gt),
        "matched": sum(mask_tp),
        "present": len(present),
        "named": len(named),
        "named_present": len(set(named) & present),
        "named_absent": len(set(named) - present),
        "detections": len(labels),
    }


def test_match_detections_greedy_by_score_within_a_label():
    from grounding.scoring import match_detections

    iou = np.array([[0.9, 0.8, 0.0], [0.95, 0.6, 0.0], [0.0, 0.0, 0.7], [0.4, 0.0, 0.0]])
    labels, scores = ["a", "a", "b", "a"], [0.5, 0.9, 0.8, 0.7]
    # the 0.9 detection takes object 0 first; the 0.5 one then gets object 1; "b" at IoU 0.7 with object 2
    # of label "c" matches nothing; IoU 0.4 is below 0.5
    assert match_detections(labels, scores, ["a", "a", "c"], iou) == [1, 0, None, None]
    assert match_detections(labels, scores, ["a", "a", "c"], iou, threshold=0.85) == [None, 0, None, None]
    assert match_detections(["a"], [1.0], ["a", "a"], np.array([[0.6, 0.6]])) == [1]  # ties: the later object
