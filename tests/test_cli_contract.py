"""The `lucid` command line's input contract, row by row as a new user meets it (the table of issue 10),
plus property-based fuzzing of `lucid ask` arguments: exit 0 with an answer, or exit 2 with one
`lucid: error: ...` line (and JSON with --json); never a traceback, never exit 1. Errors about the
user's input come before torch is imported."""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from lucid.cli import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "testbed" / "examples" / "scene.png")
# runs lucid.cli's main() and records, at exit, whether torch was ever imported
NO_TORCH_PROBE = (
    "import sys, atexit\nmarker = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(marker, 'w').write(str('torch' in sys.modules)))\n"
    "from lucid.cli import main\nmain()\n"
)


def lucid(*args: str, preexec=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lucid.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, preexec_fn=preexec, timeout=timeout)


def assert_one_error_line(out: str, err: str, code: int, needle: str = "") -> str:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("lucid: error: "), err
    assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The files of the issue's table, made once."""
    d = tmp_path_factory.mktemp("inputs")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)  # a PNG whose header claims 50000x50000
    bomb = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bomb)
    Image.fromarray(np.arange(65536, dtype=np.uint16).reshape(256, 256)).save(d / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (300, 150), (220, 40, 40)).save(d / "exif6.jpg", exif=exif)
    (d / "garbage.png").write_bytes(b"GIF89a garbage")
    (d / "empty.png").write_bytes(b"")
    (d / "adir").mkdir()
    (d / "full.png").symlink_to("/dev/full")
    (d / "afile.txt").write_text("x")
    return {p.name: str(p) for p in d.iterdir()} | {"dir": str(d)}


# ---- rows answered before torch is imported: exit 2, one line, in well under a second ----

FAST_ROWS = [
    ("missing-image", lambda f: ["ask", f["dir"] + "/missing.png", "q"], "image file not found"),
    ("bomb-header", lambda f: ["ask", f["bomb.png"], "q"], "2,500,000,000 pixels, over the limit of 150,000,000"),
    ("garbage-image", lambda f: ["ask", f["garbage.png"], "q"], "cannot decode"),
    ("empty-image", lambda f: ["ask", f["empty.png"], "q"], "the file is empty"),
    ("image-is-a-directory", lambda f: ["ask", f["adir"], "q"], "is a directory"),
    ("empty-question", lambda f: ["ask", EXAMPLE, ""], "the question is empty"),
    ("whitespace-question", lambda f: ["ask", EXAMPLE, "  \t "], "the question is empty"),
    ("image-token-in-question", lambda f: ["ask", EXAMPLE, "What is <image>?"], "'<image>'"),
    ("seed-too-large", lambda f: ["ask", EXAMPLE, "q", "--seed", "99999999999999999999999"], "[0, 2**63 - 1]"),
    ("seed-negative", lambda f: ["ask", EXAMPLE, "q", "--seed", "-1"], "[0, 2**63 - 1]"),
    ("temperature-nan", lambda f: ["ask", EXAMPLE, "q", "--temperature", "nan"], "temperature"),
    ("max-new-tokens-3000", lambda f: ["ask", EXAMPLE, "q", "--max-new-tokens", "3000"], "1024 positions"),
    ("heatmap-unwritable", lambda f: ["ask", EXAMPLE, "q", "--heatmap", "/proc/lucid.png"], "cannot create files"),
    ("heatmap-directory", lambda f: ["ask", EXAMPLE, "q", "--heatmap", f["adir"]], "is a directory"),
    ("heatmap-device", lambda f: ["ask", EXAMPLE, "q", "--heatmap", f["full.png"]], "not a regular file"),
    ("heatmap-dev-full", lambda f: ["ask", EXAMPLE, "q", "--heatmap", "/dev/full"], "no extension"),
    (
        "heatmap-no-extension",
        lambda f: ["ask", EXAMPLE, "q", "--heatmap", f["dir"] + "/heat"],
        "no extension; use .png",
    ),
    ("heatmap-xyz", lambda f: ["ask", EXAMPLE, "q", "--heatmap", f["dir"] + "/h.xyz"], "unsupported extension '.xyz'"),
    ("heatmap-under-a-file", lambda f: ["ask", EXAMPLE, "q", "--heatmap", f["afile.txt"] + "/h.png"], "directory"),
    ("model-missing", lambda f: ["ask", EXAMPLE, "q", "--model", f["dir"] + "/nope"], "does not exist"),
    ("model-not-a-checkpoint", lambda f: ["ask", EXAMPLE, "q", "--model", f["adir"]], "missing: config.json"),
    ("bench-device-tpu", lambda f: ["bench", "--device", "tpu"], "unknown device 'tpu'"),
    ("bench-out-txt", lambda f: ["bench", "--out", f["dir"] + "/B.txt"], "unsupported extension '.txt'; use .md"),
    ("bench-out-under-a-file", lambda f: ["bench", "--out", f["afile.txt"] + "/B.md"], "directory"),
    ("eval-out-directory", lambda f: ["testbed", "eval", "--out", f["adir"]], "is a directory"),
    ("eval-seed-negative", lambda f: ["testbed", "eval", "--seed", "-5"], "--seed must be an integer"),
    ("render-out-is-a-file", lambda f: ["testbed", "render", "--out", f["afile.txt"]], "is not a directory"),
    ("train-seed-huge", lambda f: ["testbed", "train", "--seed", str(2**64)], "--seed must be an integer"),
    ("missing-argument", lambda f: ["ask", EXAMPLE], "Missing argument 'question'"),
    ("unknown-option", lambda f: ["ask", EXAMPLE, "q", "--heatmpa", "x.png"], "No such option: --heatmpa"),
    ("bad-integer", lambda f: ["ask", EXAMPLE, "q", "--max-new-tokens", "ten"], "--max-new-tokens"),
]


@pytest.mark.parametrize("make_args,needle", [r[1:] for r in FAST_ROWS], ids=[r[0] for r in FAST_ROWS])
def test_input_errors_come_before_torch(inputs, tmp_path, make_args, needle):
    marker = tmp_path / "torch-imported"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH_PROBE, str(marker), *make_args(inputs)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert_one_error_line(proc.stdout, proc.stderr, proc.returncode, needle)
    assert proc.stdout == ""
    assert marker.read_text() == "False"  # the error was reported without importing torch
    # no timed assert (speed belongs in benchmarks): "before the heavy imports" is the marker above;
    # typically 0.3 s here


def test_json_errors_are_json_on_stdout(inputs):
    proc = lucid("ask", inputs["dir"] + "/missing.png", "q", "--json")
    line = assert_one_error_line(proc.stdout, proc.stderr, proc.returncode, "image file not found")
    payload = json.loads(proc.stdout)
    assert payload == {"error": {"type": "ImageError", "message": line.removeprefix("lucid: error: ")}}
    proc = lucid("ask", EXAMPLE, "q", "--json", "--max-new-tokens", "zero")
    assert_one_error_line(proc.stdout, proc.stderr, proc.returncode)
    assert json.loads(proc.stdout)["error"]["type"] == "UsageError"


# ---- rows that need the model: in-process, as the user's shell would see them ----


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result


def test_exif_orientation_reaches_the_model(inputs):
    r = invoke("ask", inputs["exif6.jpg"], "Describe the image.", "--json", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["image_size"] == [150, 300]  # every viewer shows 150x300


def test_16_bit_png_is_answered(inputs):
    r = invoke("ask", inputs["gray16.png"], "Describe the image.", "--max-new-tokens", "4")
    assert r.exit_code == 0 and r.stdout.strip(), r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["What is " + "word " * 5000], "shorten the question by at least"),
        (["Describe the image.", "--max-new-tokens", "1000"], "use max_new_tokens <= 868"),
        (["Is there a </s> here?"], "'</s>'"),
    ],
    ids=["5000-word-question", "max-new-tokens-1000", "special-token-in-question"],
)
def test_context_and_special_tokens_after_tokenizing(args, needle):
    r = invoke("ask", EXAMPLE, *args)
    assert_one_error_line(r.stdout, r.stderr, r.exit_code, needle)


def test_fit_context_lowers_max_new_tokens_as_documented():
    r = invoke("ask", EXAMPLE, "Describe the image.", "--max-new-tokens", "1000", "--fit-context", "--json")
    assert r.exit_code == 0, r.stderr
    payload = json.loads(r.stdout)
    assert payload["sampling"]["max_new_tokens"] == 868  # 1024 positions - 156 prompt tokens
    assert payload["answer"].startswith("The image shows")


def test_heatmap_path_reported_is_the_path_written(tmp_path):
    heat = tmp_path / "new" / "dir" / "heat.png"
    r = invoke("ask", EXAMPLE, "Describe the image.", "--json", "--heatmap", str(heat))
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["heatmap"] == str(heat)
    assert Image.open(heat).format == "PNG"
    assert sorted(p.name for p in heat.parent.iterdir()) == ["heat.png"]  # no temporary left behind


def _small_files_only():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.parametrize("as_json", [False, True], ids=["plain", "json"])
def test_output_failing_after_the_work_never_loses_the_answer(tmp_path, as_json):
    """The heatmap passes every check, then the disk refuses the write (file size limit): the answer is on
    stdout, the error on stderr, exit 2, and no partial file."""
    heat = tmp_path / "heat.png"
    args = ["ask", EXAMPLE, "Describe the image.", "--heatmap", str(heat)] + (["--json"] if as_json else [])
    proc = lucid(*args, preexec=_small_files_only)
    assert_one_error_line(proc.stdout, proc.stderr, proc.returncode, f"could not write {heat}")
    if as_json:
        payload = json.loads(proc.stdout)
        assert payload["answer"].startswith("The image shows") and payload["heatmap"] is None
        assert payload["error"]["type"] == "OutputError"
    else:
        assert proc.stdout.startswith("The image shows")
    assert list(tmp_path.iterdir()) == []


def test_broken_checkpoint_through_the_cli(tmp_path):
    import shutil

    from vlm.checkpoint import TESTBED_DIR

    d = tmp_path / "ckpt"
    shutil.copytree(TESTBED_DIR, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 256
    (d / "config.json").write_text(json.dumps(cfg))
    r = invoke("ask", EXAMPLE, "q", "--model", str(d), "--json")
    line = assert_one_error_line(r.stdout, r.stderr, r.exit_code, "the weights do not match config.json")
    assert json.loads(r.stdout)["error"] == {"type": "CheckpointError", "message": line.removeprefix("lucid: error: ")}


@pytest.mark.slow
def test_testbed_eval_stdout_is_json_only():
    """Row of the issue: `lucid testbed eval > m.json` was not JSON (the progress bar went to stdout)."""
    proc = lucid("testbed", "eval", "--n", "1")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["n_scenes"] == 1 and "pope_random" in metrics
    assert "testbed eval" in proc.stderr  # the progress went to stderr


@pytest.mark.slow
def test_heatmap_cost_does_not_grow_with_the_image(tmp_path):
    """Row of the issue: a 12000x12000 PNG with --heatmap took 117 s and 20.4 GB (drawn at full resolution).
    Here a 3000x3000 PNG (the full-size overlay would add ~1.2 GB): the heatmap must add < 300 MB of peak
    memory over the same question without it, and its PNG stays display-sized."""
    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 3000), (90, 90, 90)).save(big, compress_level=1)

    def peak_mib(*extra: str) -> float:
        code = (
            "import resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True)\n"
            "assert p.returncode == 0, p.stderr.decode()[-2000:]\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
        )
        cmd = [sys.executable, "-m", "lucid.cli", "ask", str(big), "Is there a red circle in the image?", *extra]
        out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, cwd=ROOT, check=True)
        return float(out.stdout.strip())

    plain = peak_mib()
    heat = tmp_path / "heat.png"
    with_heatmap = peak_mib("--heatmap", str(heat))
    assert with_heatmap - plain < 300, (plain, with_heatmap)
    assert max(Image.open(heat).size) <= 2400


# ---- fuzzing `lucid ask` in-process: valid arguments with 0-2 faults drawn per argument ----

VALID_QUESTIONS = ["Is there a red circle in the image?", "Describe the image.", "What color is the square?"]
BASE = st.fixed_dictionaries(
    {
        "image": st.sampled_from(["good", "good", "gray16", "exif6"]),
        "question": st.one_of(st.sampled_from(VALID_QUESTIONS), st.text(max_size=40)),
        "seed": st.integers(0, 2**63 - 1),
        "max_new": st.integers(1, 12),
        "temperature": st.floats(0, 2),
        "heatmap": st.sampled_from([None, None, "ok.png", "sub/dir/ok.png"]),
        "json": st.booleans(),
    }
)
FAULTS = st.lists(
    st.one_of(
        st.tuples(st.just("image"), st.sampled_from(["missing", "dir", "garbage", "empty", "bomb"])),
        st.tuples(st.just("question"), st.sampled_from(["", " \t", "<image>", "a <image> b", "</s>", "<pad>"])),
        st.tuples(
            st.just("seed"), st.one_of(st.integers(-(2**70), -1), st.integers(2**63, 2**70), st.text(max_size=4))
        ),
        st.tuples(
            st.just("max_new"), st.one_of(st.integers(-3, 0), st.sampled_from([1000, 3000]), st.text(max_size=3))
        ),
        st.tuples(
            st.just("temperature"), st.one_of(st.floats(-10, -1e-3), st.sampled_from(["nan", "inf", "-inf", "x"]))
        ),
        st.tuples(st.just("heatmap"), st.sampled_from(["adir", "noext", "h.xyz", "/proc/h.png", "full.png"])),
    ),
    max_size=2,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(base=BASE, faults=FAULTS)
def test_fuzz_ask_arguments(inputs, base, faults):
    a = {**base, **dict(faults)}
    files = {"garbage": "garbage.png", "empty": "empty.png", "bomb": "bomb.png", "gray16": "gray16.png",
             "exif6": "exif6.jpg", "dir": "adir"}  # fmt: skip
    image = {"good": EXAMPLE, "missing": inputs["dir"] + "/nope.png"}.get(a["image"]) or inputs[files[a["image"]]]
    args = ["ask", image, a["question"], "--seed", str(a["seed"]), "--max-new-tokens", str(a["max_new"])]
    args += ["--temperature", str(a["temperature"])]
    if a["heatmap"] is not None:
        h = a["heatmap"]
        args += ["--heatmap", h if h.startswith("/") else inputs.get(h, inputs["dir"] + "/" + h)]
    if a["json"]:
        args.append("--json")
    r = CliRunner().invoke(app, args)
    event(f"exit {r.exit_code}")
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code in (0, 2), (r.exit_code, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    if r.exit_code == 0:
        assert "lucid: error" not in r.stderr
        if a["json"]:
            assert "answer" in json.loads(r.stdout)
        else:
            assert r.stdout.endswith("\n")  # the answer line (possibly empty text)
    else:
        assert_one_error_line(r.stdout, r.stderr, r.exit_code)
        if a["json"]:
            assert "error" in json.loads(r.stdout)
        else:
            assert r.stdout == ""
