"""`lucid serve --config FILE` in a subprocess (its own session, so a test can signal the whole group), for
the tests that drive the service over Ray Serve; and the Ray replica processes it runs, found by name."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SCENE = ROOT / "testbed" / "examples" / "scene.png"
URL = "data:image/png;base64," + base64.b64encode(SCENE.read_bytes()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(question: str, url: str = URL, **kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return {"model": "testbed", "messages": [{"role": "user", "content": content}], **kw}


class Server:
    def __init__(self, config: Path, port: int):
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.proc = subprocess.Popen(
            [str(BIN / "lucid"), "serve", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.err: list[str] = []
        self.out: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True).start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any("ready at" in x for x in self.err):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError("lucid serve did not start: " + "".join(self.err)[-4000:])


def write_config(path: Path, port: int, args: dict) -> Path:
    """A Lucid config file (a Ray Serve config) serving `args` (AppConfig fields) on loopback:port."""
    doc = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "lucid", "route_prefix": "/", "import_path": "serve.app:build_app", "args": args}],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def replica_pids(deployment: str) -> list[int]:
    """The pids of the live Ray Serve replicas of `deployment` (their process title names it)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"ServeReplica:lucid:{deployment}" in cmd:
            pids.append(int(d.name))
    return sorted(pids)


def rss_mib(pid: int) -> float:
    """A process's resident memory (MiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")
