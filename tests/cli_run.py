"""`lucid ...` in a subprocess of this interpreter, offline, for the tests of the command line; and the
check that a refusal is one `lucid: error:` line with exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lucid(*args: str, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from lucid.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})},
        timeout=timeout,
    )


def one_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The one `lucid: error:` line of a refusal (exit 2, no traceback), holding every one of `words`."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [x for x in proc.stderr.splitlines() if x.startswith("lucid: error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]
