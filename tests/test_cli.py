"""The `lucid` command line, run as a user runs it (subprocess, real checkpoint)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "testbed" / "examples" / "scene.png"


def lucid(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lucid.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"lucid {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def test_ask_prints_the_answer():
    proc = lucid("ask", str(EXAMPLE), "Is there a red circle in the image?")
    assert proc.stdout.strip() in ("Yes", "No")


def test_ask_json_and_heatmap(tmp_path):
    heat = tmp_path / "heat.png"
    proc = lucid("ask", str(EXAMPLE), "Describe the image.", "--json", "--heatmap", str(heat), "--max-new-tokens", "40")
    payload = json.loads(proc.stdout)
    assert payload["model"] == "testbed"
    assert payload["answer"].startswith("The image shows")
    assert payload["timings"]["prefill_s"] > 0 and payload["timings"]["decode_steps"] >= 1
    img = Image.open(heat)
    assert img.format == "PNG" and img.width > 300


@pytest.mark.parametrize(
    "make_bad,needle",
    [
        (lambda d: d / "missing.png", "not found"),
        (lambda d: (d / "bad.png").write_bytes(b"GIF89a garbage") and d / "bad.png", "cannot decode"),
    ],
)
def test_ask_bad_image_is_one_line_exit_2(tmp_path, make_bad, needle):
    proc = lucid("ask", str(make_bad(tmp_path)), "Describe the image.", check=False)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("lucid: error:")


def test_ask_bad_model_path_is_exit_2(tmp_path):
    proc = lucid("ask", str(EXAMPLE), "Describe the image.", "--model", str(tmp_path), check=False)
    assert proc.returncode == 2 and "missing: config.json" in proc.stderr


def test_testbed_render(tmp_path):
    out = tmp_path / "scenes"
    lucid("testbed", "render", "--n", "3", "--seed", "4", "--out", str(out))
    assert sorted(p.name for p in out.glob("*.png")) == ["scene_00000.png", "scene_00001.png", "scene_00002.png"]
    rows = [json.loads(x) for x in (out / "scenes.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["objects"] for r in rows)
