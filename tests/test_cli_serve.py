"""`lucid serve` refuses what it cannot serve with one `lucid: error:` line and exit 2, before (or right
after) starting Ray: a bad config file, a taken port, a bad checkpoint, more CPUs than the cluster has."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_run import one_error

ROOT = Path(__file__).resolve().parent.parent
LUCID = str(Path(sys.executable).parent / "lucid")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([LUCID, "serve", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def config(tmp_path: Path, args: dict, http: dict | None = None) -> Path:
    doc = {
        "http_options": http or {"host": "127.0.0.1", "port": 8000},
        "applications": [{"name": "lucid", "route_prefix": "/", "import_path": "serve.app:build_app", "args": args}],
    }
    p = tmp_path / "lucid.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.mark.parametrize(
    "args, words",
    [
        ({"vlm_replica": 2}, ("applications[].args.vlm_replica", "Extra inputs")),
        ({"vlm_cpus": 0}, ("vlm_cpus", "greater than 0")),
        ({"allow_remote": ["example.com"]}, ("allow_remote", "scheme://host/")),
        ({"model": "/nonexistent/llava"}, ("/nonexistent/llava",)),
        ({"sam": "nope"}, ("unknown SAM spec",)),
    ],
)
def test_bad_config_fields_are_named(tmp_path, args, words):
    one_error(run("--config", str(config(tmp_path, args))), *words)


def test_files_that_are_not_lucid_configs(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("applications: [")
    one_error(run("--config", str(bad)), "not valid YAML")
    bad.write_text("model: testbed\n")
    one_error(run("--config", str(bad)), "applications")
    one_error(run("--config", str(tmp_path / "missing.yaml")), "cannot read config")


def test_a_taken_port_is_refused_before_ray_starts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run("--port", str(port), timeout=60)
    one_error(proc, f"127.0.0.1:{port}")
    assert "Ray" not in proc.stderr  # refused before any Ray start


def test_more_cpus_than_the_cluster_has(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(tmp_path, {"vlm_replicas": 8, "vlm_cpus": 1, "evals": False}, {"host": "127.0.0.1", "port": port})
    one_error(run("--config", str(cfg)), "needs 8.75 CPUs", "lower the replicas")


def test_ray_refusing_to_start_is_one_line(tmp_path):
    """Ray's own refusal (here: RAY_AUTH_TOKEN_PATH names a file that does not exist) is reported, not
    raised as a traceback."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [LUCID, "serve", "--port", str(port)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    one_error(proc, "could not start Ray", "RAY_AUTH_TOKEN_PATH")
