"""`lucid methods`, `--method` on `ask`, and the one-line error for a bad method, run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "testbed" / "examples" / "scene.png"


def lucid(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lucid.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_methods_lists_parameters_and_schemas():
    text = lucid("methods")
    assert text.returncode == 0
    for name in ("pai:", "paint:", "var:", "vhr:"):
        assert any(line.startswith(name) for line in text.stdout.splitlines())
    assert "a number in [0, 1]" in text.stdout and "arXiv:2503.03321" in text.stdout
    schemas = json.loads(lucid("methods", "--json").stdout)
    assert sorted(schemas) == ["carve", "dyvte", "magnifier", "pai", "paint", "var", "vcd", "vhr"]
    assert schemas["vhr"]["properties"]["alpha"]["maximum"] == 10.0


def test_ask_with_methods(tmp_path):
    proc = lucid("ask", str(EXAMPLE), "Describe the image.", "--method", "vhr", "--method", "pai:gamma=1", "--json")
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["answer"] and [m["name"] for m in payload["methods"]] == ["vhr", "pai"]
    assert payload["methods"][1]["params"]["gamma"] == 1.0


def test_bad_method_is_one_line_listing_what_is_valid():
    """(The messages for every kind of bad spec are tested in test_methods_registry.py.)"""
    proc = lucid("ask", str(EXAMPLE), "Describe the image.", "--method", "vhr:alpha=99")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == "lucid: error: vhr: alpha must be a number in [0, 10], got '99'"


def test_ask_with_carve_writes_its_views(tmp_path):
    out = tmp_path / "views.png"
    proc = lucid(
        "ask", str(EXAMPLE), "What color is the circle?", "--method", "carve:preset=paper", "--out", str(out), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    carve = payload["extras"]["carve"]
    assert payload["out"] == str(out) and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert carve["attention"] == "contrast" and carve["regions"][0] <= 3  # the paper's "at most K = 3"
    x0, y0, x1, y1 = carve["box"]
    w, h = payload["image_size"]
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and carve["mask"]["size"] == [h, w]


def test_ask_out_must_be_a_png_and_is_checked_before_any_work(tmp_path):
    proc = lucid(
        "ask", str(EXAMPLE), "What color is the circle?", "--method", "carve", "--out", str(tmp_path / "v.jpg")
    )
    assert proc.returncode == 2 and not (tmp_path / "v.jpg").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lucid: error: ") and ".png" in lines[0]
