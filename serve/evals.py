"""Eval jobs behind the REST API: `POST /v1/evals` runs `lucid eval ...` as a Ray job (Ray's
`JobSubmissionClient` on the cluster's dashboard), `GET /v1/evals/{id}` reads its status, progress
(`OUT/progress.json`, written by the job as samples are answered) and, once it succeeded, its results;
`DELETE` stops it. Each job writes under `eval_root/<id>/` (a path on the head node, where the driver runs).
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

from lucid.errors import InputError
from serve.schemas import EvalRequest

PREFIX = "lucid-eval-"
_ID = re.compile(rf"^{PREFIX}[0-9a-f]{{12}}$")


class EvalJobs:
    def __init__(self, dashboard: str, root: str | Path) -> None:
        self.dashboard = dashboard
        self.root = Path(root).resolve()
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from lucid.ray_client import ray_auth

            ray_auth()
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.dashboard)
        return self._client

    def argv(self, req: EvalRequest, model_path: str, out: Path) -> list[str]:
        """The `lucid eval` command line of a request (checked: suites and method sets parse)."""
        from evals.suites import SUITES
        from mitigation.methods import parse_method_set

        for s in req.suites:
            name = s.split(":", 1)[0]
            if name not in SUITES:
                raise InputError(f"suites: unknown suite {name!r}; valid: {', '.join(sorted(SUITES))}")
        for m in req.methods:
            parse_method_set(m)  # MethodError (an InputError) listing what is valid
        argv = [sys.executable, "-m", "lucid.cli", "eval", "--out", str(out)]
        for s in req.suites:
            argv += ["--suite", s]
        for m in req.models or [model_path]:
            argv += ["--model", m]
        for m in req.methods:
            argv += ["--method", m]
        if req.limit is not None:
            argv += ["--limit", str(req.limit)]
        argv += ["--workers", str(req.workers), "--batch-size", str(req.batch_size), "--bootstrap", str(req.bootstrap)]
        if req.no_baseline:
            argv.append("--no-baseline")
        return argv

    async def submit(self, req: EvalRequest, model_path: str) -> dict:
        job_id = PREFIX + uuid.uuid4().hex[:12]
        out = self.root / job_id
        argv = self.argv(req, model_path, out)
        entrypoint = shlex.join(argv)
        from lucid.ray_client import submit_job

        await asyncio.to_thread(
            submit_job,
            self.client,
            entrypoint=entrypoint,
            submission_id=job_id,
            metadata={"lucid": "eval", "suites": ",".join(req.suites)},
        )
        return {"id": job_id, "status": "PENDING", "out": str(out), "entrypoint": entrypoint}

    async def list(self) -> list[dict]:
        jobs = await asyncio.to_thread(self.client.list_jobs)
        return [
            {"id": j.submission_id, "status": j.status.value}
            for j in jobs
            if j.submission_id and j.submission_id.startswith(PREFIX)
        ]

    async def status(self, job_id: str) -> dict | None:
        if not _ID.match(job_id):
            return None
        try:
            info = await asyncio.to_thread(self.client.get_job_info, job_id)
        except RuntimeError:  # the job server: no such job
            return None
        out = self.root / job_id
        body: dict[str, Any] = {
            "id": job_id,
            "status": info.status.value,
            "message": info.message,
            "out": str(out),
            "progress": _read(out / "progress.json"),
        }
        if info.status.value == "SUCCEEDED":
            res = _read(out / "results.json")
            body["results"] = None if res is None else res.get("results")
            body["report"] = str(out / "report.md")
        if info.status.value == "FAILED":
            logs = await asyncio.to_thread(self.client.get_job_logs, job_id)
            body["logs_tail"] = logs[-3000:]
        return body

    async def stop(self, job_id: str) -> dict | None:
        if await self.status(job_id) is None:
            return None
        await asyncio.to_thread(self.client.stop_job, job_id)
        return await self.status(job_id)


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
