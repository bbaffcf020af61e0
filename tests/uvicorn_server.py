"""The REST app in the test process (no Ray): on uvicorn in a thread, for tests that need a real HTTP server
(a browser, a client that disconnects), or behind FastAPI's TestClient; over the in-process backend."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


@contextmanager
def serving(backend, **cfg):
    """The app (AppConfig(**cfg)) on uvicorn in a thread, on a free loopback port: its base URL."""
    import uvicorn

    from serve.api import make_app
    from serve.config import AppConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(make_app(AppConfig(**cfg), backend), host="127.0.0.1", port=port, log_level="warning")
    )
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 120
    while not server.started and time.time() < deadline:
        time.sleep(0.1)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=30)


def one_thread_backend():
    """The embedded model in this process (`LocalBackend`), on one torch thread."""
    import torch

    from serve.config import AppConfig
    from serve.runners import LocalBackend

    torch.set_num_threads(1)
    return LocalBackend(AppConfig())


def app_client():
    """The REST app over the embedded model in this process, as (FastAPI TestClient, LocalBackend)."""
    from fastapi.testclient import TestClient

    from serve.api import make_app
    from serve.config import AppConfig
    from serve.runners import LocalBackend

    cfg = AppConfig()
    backend = LocalBackend(cfg)
    return TestClient(make_app(cfg, backend)), backend
