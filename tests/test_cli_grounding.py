"""Bad input to `lucid locate`, `lucid analyze`, `lucid testbed calibrate-risk` and `ask --heads`: one
`lucid: error:` line and exit 2, before any model work; and `locate` on the embedded model end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENE = str(ROOT / "testbed" / "examples" / "scene.png")


def lucid(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-c", "from lucid.cli import main; main()", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args,needle",
    [
        (["locate", SCENE, "   "], "question"),
        (["locate", "missing.png", "the red circle"], "not found"),
        (["locate", SCENE, "the red circle", "--heads", "two"], "--heads"),
        (["locate", SCENE, "the red circle", "--heads", "99:0"], "--heads"),
        (["locate", SCENE, "the red circle", "--out", "overlay.xyz"], "overlay"),
        (["locate", SCENE, "the red circle", "--threshold", "median"], "--threshold"),
        (["ask", SCENE, "Is there a red circle in the image?", "--heatmap", "h.png", "--heads", "x"], "--heads"),
        (["analyze", "--images", "no-such-folder"], "--images"),
        (["analyze", "--phrases", "no-such.jsonl"], "--phrases"),
        (["testbed", "calibrate-risk", "--seed", "-1"], "seed"),
    ],
    ids=["empty-query", "missing-image", "heads-malformed", "heads-outside", "overlay-ext", "threshold", "ask-heads",
         "analyze-images", "analyze-phrases", "risk-seed"],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    proc = lucid(*[a.replace("h.png", str(tmp_path / "h.png")) for a in args])
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lucid: error:"), proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_locate_end_to_end(tmp_path):
    out = tmp_path / "overlay.png"
    proc = lucid("locate", SCENE, "the red circle", "--heads", "0:1,2:2", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    loc = json.loads(proc.stdout)
    assert loc["query"] == "the red circle" and loc["heads"] == [[0, 1], [2, 2]]
    x0, y0, x1, y1 = loc["box"]
    assert 0 <= x0 < x1 <= 192 and 0 <= y0 < y1 <= 192  # the example scene is 192x192
    assert 0 <= loc["point"][0] <= 192 and 0 <= loc["point"][1] <= 192
    assert loc["map"]["grid"] == [12, 12] and abs(sum(map(sum, loc["map"]["values"])) - 1) < 1e-3
    assert out.stat().st_size > 1000
