"""The Ray Serve application: a FastAPI ingress, a VLM deployment and a SAM deployment.

    build_app(args) -> Application        # `serve run serve.app:build_app model=...`, `serve deploy FILE`

* `VLMServer` holds the checkpoint (loaded once per replica; `vlm_cpus` CPUs reserved and used as torch
  threads, `vlm_gpus` GPUs). Single chat choices go through `@serve.batch`: concurrent requests are
  answered together, grouped by plan so each gets its solo answer (`serve.engine`).
* `SamServer` holds SAM (embeddings cached per image hash, `grounding.sam`).
* `Api` is the FastAPI ingress (`serve.api.make_app`), light (no torch): it validates, decodes images and
  calls the two deployments through handles.
Resources are declared per replica from `AppConfig`, so replicas never oversubscribe the CPUs (Serve
would otherwise wait for resources forever; `lucid serve` checks the sum against the cluster first).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from serve.config import AppConfig, app_config, deployment_limits, with_keys
from serve.engine import ChatJob, Overloaded, ReplicaLost

_FAST_SHUTDOWN = {"graceful_shutdown_timeout_s": 2.0, "graceful_shutdown_wait_loop_s": 0.5}


@serve.deployment(**_FAST_SHUTDOWN)
class VLMServer:
    def __init__(self, cfg: dict) -> None:
        from serve.runners import VlmRunner

        self.cfg = AppConfig(**cfg)
        self.runner = VlmRunner(self.cfg)
        self._batched.set_max_batch_size(self.cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    def info(self) -> dict:
        import os

        return {**self.runner.info(), "replica_pid": os.getpid()}

    async def chat(self, jobs: list[ChatJob]) -> list[dict]:
        if not self.cfg.batching or len(jobs) != 1:
            return await self.runner.chat(jobs)
        try:
            return [await self._batched(jobs[0])]
        except asyncio.CancelledError:  # Serve cancelled this request; the batch it joined goes on without it
            self.runner.engine.cancel([jobs[0].id])
            raise

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[ChatJob]) -> list[dict]:
        import os

        results = await self.runner.chat(jobs)
        for r in results:  # how the replica served it: its pid, and the requests Serve batched together
            r.setdefault("timings", {}).update(replica_pid=os.getpid(), serve_batch=len(jobs))
        return results

    async def chat_stream(self, job: ChatJob) -> AsyncIterator[dict]:
        async for item in self.runner.chat_stream(job):
            yield item

    async def locate(self, image, queries: list[str]) -> list[dict]:
        return await self.runner.locate(image, queries)

    async def read(self, image, queries: list[str], method: str) -> list[dict]:
        return await self.runner.read(image, queries, method)

    async def vlsam(self, image, query: str | None, method: str) -> tuple[list, float]:
        return await self.runner.vlsam(image, query, method)


@serve.deployment(**_FAST_SHUTDOWN)
class SamServer:
    def __init__(self, cfg: dict) -> None:
        from serve.runners import SamRunner

        self.runner = SamRunner(AppConfig(**cfg))

    def info(self) -> dict:
        return self.runner.info()

    async def segment(self, image, points: list, boxes: list) -> dict:
        return await self.runner.segment(image, points, boxes)

    async def segment_located(self, image, located: list[dict], how: str = "point") -> dict:
        return await self.runner.segment_located(image, located, how)

    async def segment_vlsam(self, image, maps: list, method: str, referring: bool) -> dict:
        return await self.runner.segment_vlsam(image, maps, method, referring)


class ServeBackend:
    """The API's backend over deployment handles: a full queue raises `Overloaded`, a replica that died
    under the request `ReplicaLost` (both 503s)."""

    def __init__(self, vlm, sam) -> None:
        self.vlm, self.sam = vlm, sam

    async def _vlm(self, method: str, *args):
        return await _call(getattr(self.vlm, method).remote(*args), "VLMServer")

    async def _sam(self, method: str, *args):
        return await _call(getattr(self.sam, method).remote(*args), "SamServer")

    async def info(self) -> dict:
        return await self._vlm("info")

    async def chat(self, jobs: list[ChatJob]) -> list[dict]:
        return await self._vlm("chat", jobs)

    async def chat_stream(self, job: ChatJob) -> AsyncIterator[dict]:
        gen = self.vlm.options(stream=True).chat_stream.remote(job)
        finished = False
        try:
            async for item in gen:
                yield item
            finished = True
        except BackPressureError as e:
            finished = True  # refused: nothing runs
            raise Overloaded("VLMServer", str(e)) from None
        except (RayActorError, ActorUnavailableError) as e:
            finished = True
            raise ReplicaLost("VLMServer", f"the VLMServer replica died while streaming: {type(e).__name__}") from None
        finally:  # closed or cancelled early (deadline, client gone): the replica's generator too
            if not finished:
                _cancel(gen)

    async def locate(self, image, queries: list[str]) -> list[dict]:
        return await self._vlm("locate", image, queries)

    async def read(self, image, queries: list[str], method: str) -> list[dict]:
        return await self._vlm("read", image, queries, method)

    async def vlsam(self, image, query: str | None, method: str) -> tuple[list, float]:
        return await self._vlm("vlsam", image, query, method)

    async def segment(self, image, points: list, boxes: list) -> dict:
        return await self._sam("segment", image, points, boxes)

    async def segment_located(self, image, located: list[dict], how: str = "point") -> dict:
        return await self._sam("segment_located", image, located, how)

    async def segment_vlsam(self, image, maps: list, method: str, referring: bool) -> dict:
        return await self._sam("segment_vlsam", image, maps, method, referring)


def _cancel(response) -> None:
    """Cancel a handle call on its replica; one that already failed (refused, its replica gone) or
    finished has nothing left to stop, and `cancel` then re-raises its outcome: ignored."""
    try:
        response.cancel()
    except Exception:
        pass


async def _call(response, deployment: str):
    try:
        return await response
    except asyncio.CancelledError:  # the caller gave up (deadline, client gone): so does the replica
        _cancel(response)  # (cancelling the await alone leaves the replica working)
        raise
    except BackPressureError as e:
        raise Overloaded(deployment, str(e)) from None
    except (RayActorError, ActorUnavailableError) as e:
        raise ReplicaLost(deployment, f"the {deployment} replica died while answering: {type(e).__name__}") from None


@serve.deployment(**_FAST_SHUTDOWN)
@serve.ingress()
class Api:
    def __init__(self, vlm, sam, cfg: dict) -> None:
        # keys in the replica's environment count too (`serve deploy FILE` with runtime_env env_vars)
        self.cfg = with_keys(AppConfig(**cfg))
        self.backend = ServeBackend(vlm, sam)

    def __serve_build_asgi_app__(self):
        import logging

        from serve.api import make_app

        logging.getLogger("lucid.serve").setLevel(logging.INFO)
        evals = None
        if self.cfg.evals and self.cfg.dashboard_address:
            from serve.evals import EvalJobs

            evals = EvalJobs(self.cfg.dashboard_address, self.cfg.eval_root)
        return make_app(self.cfg, self.backend, evals)


def cpus_needed(cfg: AppConfig) -> float:
    return cfg.vlm_replicas * cfg.vlm_cpus + cfg.sam_replicas * cfg.sam_cpus + cfg.ingress_cpus


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application for `args` (AppConfig fields). Also the import path of a Serve config file."""
    cfg = app_config(args) if not isinstance(args, AppConfig) else args
    plain = cfg.model_dump()
    lim = deployment_limits(cfg)
    drain = {"graceful_shutdown_timeout_s": cfg.drain_timeout_s}  # in-flight requests finish on shutdown
    vlm = VLMServer.options(
        num_replicas=cfg.vlm_replicas,
        ray_actor_options={"num_cpus": cfg.vlm_cpus, "num_gpus": cfg.vlm_gpus},
        **lim["VLMServer"],
        **drain,
    ).bind(plain)
    sam = SamServer.options(
        num_replicas=cfg.sam_replicas,
        ray_actor_options={"num_cpus": cfg.sam_cpus, "num_gpus": cfg.sam_gpus},
        **lim["SamServer"],
        **drain,
    ).bind(plain)
    return Api.options(ray_actor_options={"num_cpus": cfg.ingress_cpus}, **lim["Api"], **drain).bind(vlm, sam, plain)


#: the embedded default as an Application, for `serve build serve.app:app -o lucid.yaml` (which wants an
#: Application, not a builder); config files use the builder `serve.app:build_app` with `args`.
app = build_app()
