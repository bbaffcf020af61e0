"""Eval jobs in this process (`workers=0`, no Ray): batch sizes, resume, output files, the testbed
suites against `testbed.studies.evaluate`, pope / chair end to end on files written here, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evals.job import JobError, JobSpec, make_plan, read_records, run_job
from evals.suites import Data

ROOT = Path(__file__).resolve().parent.parent
LUCID = [sys.executable, "-m", "lucid.cli"]
SUITES = ("testbed-pope:n=4,seed=777", "testbed-chair:n=4,seed=777")


def answers(plan) -> dict:
    return {(c.label, c.suite.spec, sid): r["answer"] for c in plan.cells for sid, r in c.done.items()}


def run(tmp_path: Path | None, **kw):
    spec = JobSpec(**{"suites": SUITES, "workers": 0, "bootstrap": 100, "progress": False, "out": tmp_path, **kw})
    plan = make_plan(spec)
    res = run_job(spec, plan, log=lambda m: None)
    return plan, res


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Batch size 4, with a method set: the records every other run is compared with."""
    out = tmp_path_factory.mktemp("eval-ref")
    plan, res = run(out, batch_size=4, methods=("vhr",))
    return out, plan, res


def test_answers_do_not_depend_on_batch_size(reference):
    _, plan, _ = reference
    for bs in (1, 7):
        other, _ = run(None, batch_size=bs, methods=("vhr",))
        assert answers(other) == answers(plan), f"batch size {bs}"


def test_output_files(reference):
    out, plan, res = reference
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name[0] != ".")
    assert "results.json" in files and "report.md" in files
    assert any(f.startswith("charts/") and f.endswith(".png") for f in files)
    assert "samples/testbed/vhr/testbed-pope_n=4_seed=777-" in " ".join(files)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(res["results"]))
    rec = json.loads(next((out / "samples" / "testbed" / "vhr").glob("testbed-pope*.jsonl")).open().readline())
    for key in ("id", "split", "question", "answer", "target", "pred", "stats", "timings", "methods", "cell"):
        assert key in rec
    cfg = on_disk["config"]
    assert cfg["models"][0]["weights_sha256"] and len(cfg["models"][0]["weights_sha256"]) == 64
    assert cfg["method_sets"][1]["methods"][0] == {
        "name": "vhr",
        "params": {
            "preset": "official",
            "alpha": 2.0,
            "outlier_rule": True,
            "free_stream": "strip",
            "scale_free_stream": True,
            "layers": None,
            "first_token": True,
        },
    }
    assert cfg["decoding"]["greedy"] and cfg["batch_size"] == 4
    env = on_disk["environment"]
    assert env["packages"]["torch"] and env["packages"]["transformers"] and "commit" in env["git"]
    assert env["hardware"][0]["torch_threads"] == 1 and env["attention"]["vision_tower"] == "sdpa"
    vhr = on_disk["results"]["testbed-pope:n=4,seed=777/random"]["testbed"]["vhr"]
    assert set(vhr["vs_baseline"]) >= {"accuracy", "f1", "mcnemar"} and "accuracy" in vhr["ci95"]
    report = (out / "report.md").read_text()
    assert "### adversarial" in report and "McNemar" in report and "![testbed-pope" in report


def test_testbed_suites_give_testbed_eval_numbers(reference):
    """testbed-pope / testbed-chair are `lucid testbed eval`'s questions and numbers: the job's metrics equal
    the families answered here directly (generate, one question at a time) and scored by `score_family`."""
    from testbed.studies.evaluate import EvalConfig, build_families, max_new_tokens, score_family
    from vlm import SamplingParams, build_inputs, generate, load_vlm

    _, _, res = reference
    vlm = load_vlm("testbed")
    fams = ("pope_random", "pope_popular", "pope_adversarial", "partner_absent", "caption")
    ref = {}
    for name, items in build_families(EvalConfig(n_scenes=4, seed=777, families=fams)).items():
        answers = [
            generate(vlm, build_inputs(vlm, [s.image], [qa.question]), SamplingParams(max_new_tokens(name)))[0].text
            for s, qa in items
        ]
        ref.update(score_family(name, items, answers))
    got = res["results"]
    for split in ("random", "popular", "adversarial"):
        mine = got[f"testbed-pope:n=4,seed=777/{split}"]["testbed"]["baseline"]
        for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "n"):
            assert mine[k] == pytest.approx(ref[f"pope_{split}"][k], abs=1e-6), (split, k)
    pa = got["testbed-pope:n=4,seed=777/partner_absent"]["testbed"]["baseline"]
    assert pa["false_yes_rate"] == pytest.approx(ref["partner_absent"]["false_yes_rate"])
    cap = got["testbed-chair:n=4,seed=777/captions"]["testbed"]["baseline"]
    for mine, theirs in (("chair_i", "chair_i"), ("chair_s", "chair_s"), ("recall", "recall")):
        assert cap[mine] == pytest.approx(ref["caption"][theirs], abs=1e-6)
    assert cap["mean_length"] == pytest.approx(ref["caption"]["mean_length_words"], abs=1e-6)
    assert cap["partner_absent_named"] == pytest.approx(ref["caption"]["partner_absent_named"], abs=1e-6)


def test_resume_after_a_torn_line_redoes_only_what_is_missing(reference, tmp_path):
    out, plan, res = reference
    import shutil

    shutil.copytree(out, tmp_path / "o")
    f = next((tmp_path / "o" / "samples" / "testbed" / "baseline").glob("testbed-pope*.jsonl"))
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:9]) + lines[9][:25])  # a kill mid-write
    plan2, res2 = run(tmp_path / "o", batch_size=4, methods=("vhr",))
    after = f.read_text().splitlines()
    assert len(after) == len(lines) and len({json.loads(x)["id"] for x in after}) == len(lines)
    assert answers(plan2) == answers(plan)
    assert res2["results"] == res["results"]
    # nothing left to do: a re-run answers nothing, and keeps the records of the runs that answered
    tp = run(tmp_path / "o", batch_size=4, methods=("vhr",))[1]["throughput"]
    assert [t for t in tp if not t.get("earlier_run")] == []
    assert len(tp) == len(res2["throughput"]) >= 1


def test_an_out_dir_of_another_configuration_is_refused(reference, tmp_path):
    out, _, _ = reference
    import shutil

    shutil.copytree(out, tmp_path / "o")
    with pytest.raises(JobError, match="another configuration"):
        run(tmp_path / "o", batch_size=4, methods=("vhr",), temperature=0.5)
    f = next((tmp_path / "o" / "samples" / "testbed" / "baseline").glob("testbed-pope*.jsonl"))
    f.write_text("not json\n" + f.read_text())
    with pytest.raises(JobError, match="damaged"):
        read_records(f)


def _coco_like(tmp_path, n=3):
    """Testbed scenes saved under COCO val2014 names, POPE questions about them, COCO annotations."""
    from testbed.world.language import existence_question
    from testbed.world.scenes import CATEGORIES, scenes

    img = tmp_path / "val2014"
    img.mkdir()
    rows, images = [], []
    for i, s in enumerate(scenes(99, n)):
        name = f"COCO_val2014_{i:012d}.jpg"
        s.image.save(img / name, quality=95)
        images.append({"id": i, "file_name": name, "width": s.image.size[0], "height": s.image.size[1]})
        present = sorted(s.categories())[0]
        absent = next(c for c in CATEGORIES if c not in s.categories())
        rows.append({"question_id": 2 * i, "image": name, "text": existence_question(*present), "label": "yes"})
        rows.append({"question_id": 2 * i + 1, "image": name, "text": existence_question(*absent), "label": "no"})
    q = tmp_path / "my_pope.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ann = tmp_path / "annotations"
    ann.mkdir()
    cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]
    inst = [
        {"id": i + 1, "image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0} for i in range(n)
    ]
    caps = [{"id": i + 1, "image_id": i, "caption": "A man."} for i in range(n)]
    (ann / "instances_val2014.json").write_text(json.dumps({"images": images, "annotations": inst, "categories": cats}))
    (ann / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": caps}))
    return img, q, ann


def test_pope_and_chair_suites_end_to_end(tmp_path):
    img, q, ann = _coco_like(tmp_path)
    data = Data(images=img, questions=q, annotations=ann)
    spec = JobSpec(
        suites=("pope:post_prompt=none", "chair:prompt=Describe the image.,max_new_tokens=48"),
        out=tmp_path / "out",
        workers=0,
        batch_size=4,
        data=data,
        bootstrap=50,
        progress=False,
    )
    res = run_job(spec, log=lambda m: None)
    pope = res["results"]["pope:post_prompt=/my_pope"]["testbed"]["baseline"]
    assert pope["n"] == 6 and pope["accuracy"] >= 0.8  # the testbed model reads its own scenes
    chair = res["results"]["chair:prompt=Describe the image.,max_new_tokens=48/captions"]["testbed"]["baseline"]
    assert chair["n"] == 3 and chair["mean_length"] > 3  # shapes are no COCO objects: nothing to mention
    assert res["configs"]["pope:post_prompt="]["files"][str(q)]  # sha256 of the question file


def test_a_methods_prefill_savings_reach_the_report(tmp_path):
    """DyVTE's per-sample extras (FLOPs saved, exit layer) are summed per cell into results.json and the report."""
    spec = JobSpec(
        suites=("testbed-pope:n=4,seed=777",),
        methods=("dyvte:layer=2",),
        out=tmp_path / "out",
        workers=0,
        bootstrap=50,
        progress=False,
    )
    res = run_job(spec, log=lambda m: None)
    label = "dyvte:rule=static,layer=2"  # the rule a static layer implies
    records = read_records(next(p for p in (tmp_path / "out" / "samples").rglob("*.jsonl") if "dyvte" in str(p)))
    saved = [r["extras"]["dyvte"]["flops_saved"] for r in records.values()]
    for task, by_model in res["results"].items():
        assert "prefill" not in by_model["testbed"]["baseline"]
        p = by_model["testbed"][label]["prefill"]
        assert p["exit_layers"] == {"2": p["n"]} and 0.3 < p["min"] <= p["flops_saved"] <= p["max"] < 0.6, task
        assert p["flops_saved_alone"] >= p["flops_saved"]  # a row alone has no padding to carry
    assert sum(p["n"] for by in res["results"].values() for p in [by["testbed"][label]["prefill"]]) == len(saved)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Prefill FLOPs saved" in report and f"`{label}` |" in report and "saved at batch size 1" in report


def lucid(*args, timeout=120):
    return subprocess.run([*LUCID, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_missing_image_fails_at_start_naming_it(tmp_path):
    img, q, _ = _coco_like(tmp_path, n=2)
    (img / "COCO_val2014_000000000001.jpg").unlink()
    t = time.perf_counter()
    proc = lucid("eval", "--suite", "pope", "--questions", str(q), "--images", str(img), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lucid: error:"), proc.stderr
    assert "COCO_val2014_000000000001.jpg" in lines[0] and "does not exist" in lines[0]
    assert time.perf_counter() - t < 60  # before any model or Ray (a Ray start alone is ~7 s)
    assert not (tmp_path / "o" / "samples").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--suite", "popee"], "unknown suite 'popee'"),
        (["--suite", "testbed-pope", "--method", "vhr:alpha=-1"], "vhr"),
        ([], "no suite given"),
        (["--suite", "pope"], "needs --images"),
        (["--suite", "testbed-pope:n=2", "--workers", "3", "--limit", "1"], "needs 3 CPUs"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, match):
    proc = lucid("eval", *args, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("lucid: error:")]
    assert len(lines) == 1 and match in lines[0], proc.stderr[-2000:]


def test_ray_refusing_to_start_is_one_line(tmp_path):
    import os

    env = {**os.environ, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing"), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [*LUCID, "eval", "--suite", "testbed-pope:n=2", "--limit", "1", "--workers", "1", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("lucid: error:")]
    assert len(lines) == 1 and "could not start Ray" in lines[0] and "Traceback" not in proc.stderr


def test_list_suites():
    proc = lucid("eval", "--list")
    assert proc.returncode == 0
    for name in ("pope", "chair", "testbed-pope", "testbed-chair", "testbed-qa"):
        assert f"\n{name}:" in "\n" + proc.stdout
