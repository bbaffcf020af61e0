"""`lucid serve --config FILE` in a subprocess, for the tests that drive the service over Ray Serve: the
helpers of `lucid.bench.service` (which runs the same server for the soak and the fault benchmarks)."""

from __future__ import annotations

from lucid.bench.service import (  # noqa: F401 (re-exported for the tests)
    ROOT,
    SCENE,
    URL,
    Server,
    free_port,
    replica_pids,
    rss_mib,
    write_config,
)
from lucid.bench.service import chat_body as body  # noqa: F401
