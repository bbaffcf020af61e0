"""`lucid segment`: bad input is one line and exit 2 before any model loads; explicit prompts and text
queries end to end (JSON with COCO RLE masks in ORIGINAL pixels, the overlay PNG)."""

import json
from pathlib import Path

import numpy as np
import pytest
from cli_run import lucid
from PIL import Image

from grounding.segment import decode_rle
from testbed.world.scenes import WorldConfig, render_scene

ROOT = Path(__file__).resolve().parent.parent
SCENE = str(ROOT / "testbed" / "examples" / "scene.png")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["segment", SCENE], "nothing to segment"),
        (["segment", SCENE, "  "], "question"),
        (["segment", "missing.png", "--point", "3,3"], "not found"),
        (["segment", SCENE, "--point", "1000,3"], "outside"),
        (["segment", SCENE, "--point", "3;3"], "--point"),
        (["segment", SCENE, "--point", "3,3:7"], "--point"),
        (["segment", SCENE, "--box", "1,2,3"], "--box"),
        (["segment", SCENE, "--box", "10,10,5,20"], "box"),
        (["segment", SCENE, "--point", "3,3", "--sam", "vit_b:/no/such.pth"], "not a file"),
        (["segment", SCENE, "--point", "3,3", "--sam", "bogus"], "unknown SAM spec"),
        (["segment", SCENE, "the red circle", "--point", "3,3"], "not both"),
        (["segment", SCENE, "the red circle", "--prompt", "blob"], "--prompt"),
        (["segment", SCENE, "--point", "3,3", "--box", "1,1,9,9", "--box", "2,2,8,8"], "at most one box"),
        (["segment", SCENE, "--point", "3,3", "--out", "o.jpg"], "overlay"),
        (["testbed", "eval-sam", "--sam", "nope"], "unknown SAM spec"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle):
    proc = lucid(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lucid: error:"), proc.stderr
    assert needle in lines[0]


def _scene_file(tmp_path, size=(160, 100)):
    scene = render_scene(33, WorldConfig(size=size))
    path = tmp_path / "scene.png"
    scene.image.save(path)
    return scene, path


def test_segment_point_and_box_json(tmp_path):
    scene, path = _scene_file(tmp_path)
    obj = scene.objects[0]
    ys, xs = np.nonzero(obj.mask)
    i = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    x0, y0, x1, y1 = obj.bbox
    out = tmp_path / "overlay.png"
    proc = lucid("segment", str(path), "--point", f"{xs[i]},{ys[i]}", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["image_size"] == [160, 100] and data["sam"] == "testbed"
    (o,) = data["objects"]
    mask = decode_rle(o["mask"])
    assert mask.shape == (100, 160) and o["source"] == "prompt" and o["points"] == [[float(xs[i]), float(ys[i]), 1]]
    inter, union = (mask & obj.mask).sum(), (mask | obj.mask).sum()
    assert inter / union > 0.7
    assert Image.open(out).size[0] > 200
    proc = lucid("segment", str(path), "--box", f"{x0},{y0},{x1},{y1}", "--box", "0,0,20,20", "--json")
    assert proc.returncode == 0, proc.stderr
    objs = json.loads(proc.stdout)["objects"]
    assert len(objs) == 2
    bx = objs[0]["box"]
    assert abs(bx[0] - x0) <= 3 and abs(bx[2] - x1) <= 3


def test_segment_text_query_uses_attention(tmp_path):
    scene, path = _scene_file(tmp_path, (120, 120))
    obj = scene.objects[0]
    out = tmp_path / "q.png"
    proc = lucid("segment", str(path), f"the {obj.color} {obj.shape}", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    (o,) = data["objects"]
    assert o["source"] == "attention" and o["label"] == f"the {obj.color} {obj.shape}"
    assert decode_rle(o["mask"]).shape == (120, 120)
    assert len(o["points"]) == 1 and data["heads"]
    assert {"locate_s", "sam_s"} <= set(data["timings"])
    assert out.stat().st_size > 0
