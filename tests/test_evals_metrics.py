"""Eval suites without a model: the POPE answer parser, POPE metrics on hand-made predictions, CHAIR on
annotation files written here, intervals and paired tests, suite input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evals import metrics as M
from evals.coco_objects import mentions
from evals.parse import parse_pope
from evals.suites import Data, SuiteError, build, limit_per_split
from lucid.errors import ImageError


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("Yes, there is a dog in the image.", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("NO", "no"),  # POPE matches only No / no / not; case does not matter here
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image.", "no"),
        ("There isn't a dog.", "no"),  # n't is a negation (OPERA's rule)
        ("There isn\u2019t a dog.", "no"),
        ("None.", "no"),
        ("Yes. It is not a cat, it is a dog.", "yes"),  # only the first sentence counts
        ("No! There is a cat.", "no"),
        ("There is a snowboard.", "yes"),
        ("", "yes"),  # says neither: yes, as POPE
        ("I cannot tell.", "yes"),
        ("Nothing", "yes"),  # "nothing" is not one of the negation words
        ("The answer is nope", "no"),
    ],
)
def test_pope_answer_parser(answer, expected):
    assert parse_pope(answer) == expected


def _pope_stats(preds, labels):
    return {
        "pred_yes": np.array([p == "yes" for p in preds], float),
        "label_yes": np.array([y == "yes" for y in labels], float),
    }


def test_pope_metrics_by_hand():
    # tp=3 fp=1 tn=4 fn=2
    preds = ["yes"] * 3 + ["yes"] + ["no"] * 4 + ["no"] * 2
    labels = ["yes"] * 3 + ["no"] + ["no"] * 4 + ["yes"] * 2
    m = M.aggregate("binary", _pope_stats(preds, labels))
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["yes_ratio"] == pytest.approx(4 / 10)  # of the predictions, not of the labels
    # the testbed's own metric agrees
    from testbed.studies.evaluate import binary_metrics

    ref = binary_metrics(preds, labels)
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert m[k] == pytest.approx(ref[k])


def test_pope_metrics_degenerate():
    m = M.aggregate("binary", _pope_stats(["no"] * 4, ["no", "no", "yes", "yes"]))
    assert m["precision"] == 0 and m["recall"] == 0 and m["f1"] == 0 and m["yes_ratio"] == 0
    assert m["accuracy"] == 0.5


def test_bootstrap_interval_and_paired_test():
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.5
    base_right = rng.random(400) < 0.70
    better_right = base_right | (rng.random(400) < 0.5)  # right wherever the baseline is, and more

    def stats(right):
        pred = np.where(right, labels, ~labels)
        return {"pred_yes": pred.astype(float), "label_yes": labels.astype(float)}

    s_base, s_better = stats(base_right), stats(better_right)
    ci = M.bootstrap("binary", s_base, b=500)
    point = M.aggregate("binary", s_base)
    assert ci["accuracy"][0] < point["accuracy"] < ci["accuracy"][1]
    assert ci["accuracy"][1] - ci["accuracy"][0] < 0.15
    cmp = M.paired("binary", s_better, s_base, b=500)
    assert cmp["accuracy"]["diff"] == pytest.approx(better_right.mean() - base_right.mean())
    assert cmp["accuracy"]["ci"][0] > 0 and cmp["accuracy"]["p"] < 0.01
    same = M.paired("binary", s_base, s_base, b=200)
    assert same["accuracy"]["diff"] == 0 and same["accuracy"]["p"] == 1.0
    mc = M.mcnemar_exact(better_right, base_right)
    assert mc["baseline_only"] == 0 and mc["method_only"] == int((better_right & ~base_right).sum())
    assert mc["p"] < 1e-6


def test_mcnemar_exact_by_hand():
    # b=1, c=5: two-sided p = 2 * P(X <= 1 | n=6, 1/2) = 2 * 7/64
    m = np.array([1, 0, 0, 0, 0, 0, 1], bool)
    base = np.array([0, 1, 1, 1, 1, 1, 1], bool)
    r = M.mcnemar_exact(m, base)
    assert (r["method_only"], r["baseline_only"]) == (1, 5)
    assert r["p"] == pytest.approx(14 / 64)
    assert M.wilson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A man riding a bike next to two dogs.", ["person", "bicycle", "dog"]),
        ("Two women holding umbrellas.", ["person", "umbrella"]),  # lemmatised: women, umbrellas
        ("Knives, forks and wine glasses on the dining table.", ["knife", "fork", "wine glass", "dining table"]),
        ("A hot dog on a plate beside a dog.", ["hot dog", "dog"]),
        ("A teddy bear and a bear.", ["teddy bear", "bear"]),
        ("Traffic lights over a street with cars.", ["traffic light", "car"]),
        ("A baseball player swings a baseball bat at the ball.", ["person", "baseball bat", "sports ball"]),
        ("A baby elephant next to a baby.", ["elephant", "person"]),
        ("A double-decker bus at the bus stop.", ["bus"]),
        ("A passenger jet on the runway.", ["airplane"]),
        ("An orange and white cat on a couch with an orange.", ["cat", "couch", "orange"]),
        ("A skier in a ski jacket on the ski slope.", ["person"]),
        ("A toilet seat and a sink.", ["toilet", "sink"]),
        ("Three sheep and a dog, and another dog.", ["sheep", "dog", "dog"]),  # duplicates are mentions
        ("A cell phone, a laptop and a computer mouse.", ["cell phone", "laptop", "mouse"]),
    ],
)
def test_caption_object_rules(text, expected):
    assert mentions(text) == expected


def _write_coco(tmp_path, n_extra: int = 0):
    """Three annotated images (+ n_extra): instances with categories, five-ish captions each."""
    cats = [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(["person", "dog", "cat", "car"])]
    images = [
        {"id": 10 + i, "file_name": f"COCO_val2014_{10 + i:012d}.jpg", "width": 64, "height": 64}
        for i in range(3 + n_extra)
    ]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0, "segmentation": []},
        {"id": 2, "image_id": 10, "category_id": 2, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0, "segmentation": []},
        {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0, "segmentation": []},
        {"id": 4, "image_id": 12, "category_id": 4, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0, "segmentation": []},
    ] + [
        {
            "id": 5 + i,
            "image_id": 13 + i,
            "category_id": 1,
            "bbox": [0, 0, 5, 5],
            "area": 25,
            "iscrowd": 0,
            "segmentation": [],
        }
        for i in range(n_extra)
    ]
    caps = [
        {"id": 1, "image_id": 10, "caption": "A man walking his dog past a bench."},  # bench: from captions only
        {"id": 2, "image_id": 10, "caption": "A person with a puppy."},
        {"id": 3, "image_id": 11, "caption": "A kitten sleeping."},
        {"id": 4, "image_id": 12, "caption": "A red car parked on the street."},
    ] + [{"id": 5 + i, "image_id": 13 + i, "caption": "A woman."} for i in range(n_extra)]
    ann_dir = tmp_path / "annotations"
    ann_dir.mkdir()
    (ann_dir / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    (ann_dir / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": caps}))
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    from PIL import Image

    for im in images:
        Image.new("RGB", (64, 64), (120, 120, 120)).save(img_dir / im["file_name"])
    return ann_dir, img_dir


def test_chair_on_annotation_files(tmp_path):
    ann, img = _write_coco(tmp_path)
    suite = build("chair", Data(images=img, annotations=ann))
    samples = suite.samples()
    assert {s.meta["image_id"] for s in samples} == {10, 11, 12}
    truth = {s.meta["image_id"]: set(s.target) for s in samples}
    assert truth[10] == {"person", "dog", "bench"}  # instances + objects of the reference captions
    assert truth[11] == {"cat"} and truth[12] == {"car"}
    assert all(s.question == "Please describe this image in detail." and s.max_new_tokens == 512 for s in samples)
    by_id = {s.meta["image_id"]: s for s in samples}
    captions = {
        10: "A man and his dog sit on a bench next to a bicycle.",  # bicycle hallucinated
        11: "A cat on a couch.",  # couch hallucinated
        12: "A car on the street.",  # correct
    }
    recs = []
    for i, text in captions.items():
        j = suite.judge(by_id[i], text)
        recs.append({"stats": j["stats"]})
        if i == 10:
            assert j["pred"]["hallucinated"] == ["bicycle"]
    m = M.aggregate("chair", M.stack(recs))
    assert m["chair_s"] == pytest.approx(2 / 3)
    assert m["chair_i"] == pytest.approx(2 / 7)  # mentions: person dog bench bicycle | cat couch | car
    assert m["recall"] == pytest.approx(5 / 5)  # person dog bench | cat | car: all named
    assert m["mean_length"] == pytest.approx(np.mean([len(t.split()) for t in captions.values()]))


def test_chair_protocols_and_selection(tmp_path):
    ann, img = _write_coco(tmp_path, n_extra=5)
    short = build("chair:max_new_tokens=64,n=4,seed=1,drop_incomplete=true", Data(images=img, annotations=ann))
    samples = short.samples()
    assert len(samples) == 4 and all(s.max_new_tokens == 64 for s in samples)
    assert [s.id for s in samples] == [s.id for s in short.samples()]  # deterministic
    j = short.judge(samples[0], "A woman with a dog. She holds a ca", finish_reason="length")
    assert j["stats"]["words"] == 5  # cut after the last full stop
    assert short.config()["params"]["max_new_tokens"] == 64 and len(short.config()["files"]) == 2


def test_chair_input_errors(tmp_path):
    ann, img = _write_coco(tmp_path)
    with pytest.raises(SuiteError, match="--annotations"):
        build("chair", Data(images=img))
    with pytest.raises(SuiteError, match="unknown parameter 'tokens'"):
        build("chair:tokens=64", Data(images=img, annotations=ann))
    suite = build("chair", Data(images=img, annotations=ann))
    (img / "COCO_val2014_000000000011.jpg").unlink()
    with pytest.raises(ImageError, match="COCO_val2014_000000000011.jpg"):
        suite.check(suite.samples())


def _pope_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pope_suite_files_and_missing_image(tmp_path):
    from PIL import Image

    img = tmp_path / "images"
    img.mkdir()
    Image.new("RGB", (32, 32)).save(img / "a.jpg")
    q = _pope_file(
        tmp_path / "mine.jsonl",
        [
            {"question_id": 1, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "yes"},
            {"question_id": 2, "image": "b.jpg", "text": "Is there a dog in the image?", "label": "no"},
        ],
    )
    suite = build("pope:post_prompt=none", Data(images=img, questions=q))
    assert suite.splits() == {"mine": "binary"}
    samples = suite.samples()
    assert samples[0].question == "Is there a cat in the image?" and samples[0].id == "mine/1"
    suite.check(samples[:1])
    with pytest.raises(ImageError, match=r"b\.jpg.*does not exist"):
        suite.check(samples)
    j = suite.judge(samples[1], "No, there is not.")
    assert j == {"pred": "no", "stats": {"pred_yes": 0, "label_yes": 0}}
    # the bundled COCO files: 3 x 3000 questions, LLaVA's suffix by default
    coco = build("pope", Data(images=img))
    s = coco.samples()
    assert len(s) == 9000 and s[0].question.endswith("\nAnswer the question using a single word or phrase.")
    assert len(limit_per_split(s, 5)) == 15
    with pytest.raises(ImageError, match="COCO_val2014_000000310196.jpg"):
        coco.check(limit_per_split(s, 5))


@pytest.mark.parametrize(
    "row, match",
    [
        ({"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "maybe"}, "label must be yes or no"),
        ({"question_id": 1, "image": "a.jpg", "label": "yes"}, "has no 'text'"),
        ({"question_id": 1, "image": "a.jpg", "text": " ", "label": "yes"}, "empty question"),
    ],
)
def test_pope_bad_question_file(tmp_path, row, match):
    q = _pope_file(tmp_path / "q.jsonl", [row])
    with pytest.raises(SuiteError, match=match):
        build("pope", Data(images=tmp_path, questions=q))


def test_unknown_suite_and_param():
    with pytest.raises(SuiteError, match="unknown suite 'popee'; valid: pope, chair"):
        build("popee")
    with pytest.raises(SuiteError, match="splits="):
        build("pope:splits=random,weird", Data(images="."))
