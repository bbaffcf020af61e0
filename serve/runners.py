"""The async face of the model side: what a VLM replica and a SAM replica expose, and the in-process
`LocalBackend` made of the same two objects (used by `lucid serve --no-ray`-style tests and the bench).

Model work runs in a worker thread (`asyncio.to_thread`), so an event loop (Serve's replica, or a test's)
keeps accepting requests while a batch is computed; `Engine.lock` serialises the model itself. A caller
that is cancelled (its client went away, its deadline passed; Serve cancels the replica's task) cancels its
jobs in the engine: the worker thread ends them after the current step (`Engine.cancel`), so the replica
is free for the next request instead of finishing an answer nobody reads.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np

from serve.config import AppConfig
from serve.engine import ChatJob, Engine

_END = object()


class VlmRunner:
    """Loads the checkpoint once (with its risk model), answers chat jobs and locates phrases."""

    def __init__(self, cfg: AppConfig) -> None:
        import torch

        from lucid.risk import RiskModel
        from vlm import load_vlm
        from vlm.loader import quiet_logs

        quiet_logs()
        torch.set_num_threads(cfg.torch_threads)
        t = time.perf_counter()
        vlm = load_vlm(cfg.model, device=cfg.device)
        self.engine = Engine(vlm, RiskModel.for_checkpoint(vlm.path))
        self.load_s = time.perf_counter() - t
        self.model_id = cfg.model_name or vlm.name

    def info(self) -> dict[str, Any]:
        vlm = self.engine.vlm
        return {
            "id": self.model_id,
            "path": str(vlm.path),
            "kind": vlm.kind,
            "device": str(vlm.device),
            "dtype": str(vlm.dtype).replace("torch.", ""),
            "max_positions": vlm.max_positions,
            "layers": vlm.n_layers,
            "heads": vlm.n_heads,
            "risk_model": self.engine.risk is not None,
            "load_s": round(self.load_s, 3),
            "cancelled": dict(self.engine.stopped),
        }

    async def chat(self, jobs: list[ChatJob]) -> list[dict]:
        try:
            return await asyncio.to_thread(self.engine.run, jobs)
        except asyncio.CancelledError:
            self.engine.cancel([j.id for j in jobs])
            raise

    async def locate(self, image: np.ndarray, queries: list[str]) -> list[dict]:
        return await asyncio.to_thread(self.engine.locate, image, queries)

    async def read(self, image: np.ndarray, queries: list[str], method: str) -> list[dict]:
        return await asyncio.to_thread(self.engine.read, image, queries, method)

    async def vlsam(self, image: np.ndarray, query: str | None, method: str) -> tuple[list, float]:
        return await asyncio.to_thread(self.engine.vlsam, image, query, method)

    def stream_sync(self, job: ChatJob) -> Iterator[dict]:
        """{"delta": text} events as the answer is generated, then {"result": dict} (or {"error": ...})."""
        q: queue.Queue = queue.Queue()

        def work() -> None:
            from lucid.errors import InputError

            try:
                res = self.engine.stream(job, lambda text: q.put({"delta": text}))
                q.put({"result": res})
            except InputError as e:
                q.put({"error": {"type": type(e).__name__, "message": str(e)}})
            except Exception as e:  # reported to the client as a 500-type stream error; logged by the caller
                q.put({"error": {"type": "InternalError", "message": f"{type(e).__name__}: {e}"}, "internal": True})
            q.put(_END)

        threading.Thread(target=work, daemon=True, name="lucid-stream").start()
        while (item := q.get()) is not _END:
            yield item

    async def chat_stream(self, job: ChatJob) -> AsyncIterator[dict]:
        it = self.stream_sync(job)
        finished = False
        try:
            while (item := await asyncio.to_thread(next, it, _END)) is not _END:
                yield item
            finished = True
        finally:  # the consumer stopped early (closed, cancelled): end the generation
            if not finished:
                self.engine.cancel([job.id])


class SamRunner:
    """Loads SAM once; segments from explicit prompts or from located objects (embeddings cached per image)."""

    def __init__(self, cfg: AppConfig) -> None:
        from grounding.sam import load_segmenter

        t = time.perf_counter()
        self.segmenter = load_segmenter(cfg.sam, device=cfg.device or "cpu")
        self.load_s = time.perf_counter() - t
        self.lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {"source": self.segmenter.source, "load_s": round(self.load_s, 3)}

    def _explicit(self, image: np.ndarray, points: list, boxes: list) -> dict:
        from grounding.segment import segment_prompts

        with self.lock:
            t = time.perf_counter()
            objects = segment_prompts(self.segmenter, image, points, boxes)
            timings = {"sam_s": time.perf_counter() - t, **{f"sam_{k}_s": v for k, v in self.segmenter.timings.items()}}
        return {"objects": [o.to_json() for o in objects], "timings": _round(timings)}

    def _located(self, image: np.ndarray, located: list[dict], how: str) -> dict:
        from grounding.sam import SamPrompt
        from grounding.segment import located_prompt, segmented_object

        h, w = image.shape[:2]
        if how == "read":  # READ's points (engine.read)
            prompts = [
                SamPrompt(
                    tuple(tuple(xy) for xy in loc["sam_input"]["points"]),
                    tuple(loc["sam_input"]["labels"]),
                    multimask=loc["sam_input"]["multimask"],
                )
                for loc in located
            ]
        else:
            prompts = [
                located_prompt(loc["sam_input"]["point"], loc["sam_input"]["box"], (w, h), how) for loc in located
            ]
        with self.lock:
            t = time.perf_counter()
            results = self.segmenter.segment(image, prompts) if prompts else []
            timings = {"sam_s": time.perf_counter() - t, **{f"sam_{k}_s": v for k, v in self.segmenter.timings.items()}}
        objects = []
        for loc, p, r in zip(located, prompts, results):
            if how == "read":
                d = segmented_object(loc["query"], p, r, "read").to_json()
                d["read"] = {k: loc[k] for k in ("token", "layer", "positions", "points")}
            else:
                d = segmented_object(loc["query"], p, r, "attention").to_json()
                d["location"] = {k: loc[k] for k in ("box", "point", "score", "heads")}
            objects.append(d)
        return {"objects": objects, "timings": _round(timings)}

    def _vlsam(self, image: np.ndarray, maps: list, method: str, referring: bool) -> dict:
        """VL-SAM's points, refinement and NMS (`grounding.vlsam.refine` / `merge`) on the VLM replica's maps."""
        from grounding.vlsam import merge, parse_vlsam, refine

        params = parse_vlsam(method)
        with self.lock:
            t = time.perf_counter()
            objects = merge(refine(self.segmenter, image, maps, params), params, top=1 if referring else None)
            timings = {"sam_s": time.perf_counter() - t, **{f"sam_{k}_s": v for k, v in self.segmenter.timings.items()}}
        return {"objects": [o.to_json() for o in objects], "timings": _round(timings)}

    async def segment(self, image: np.ndarray, points: list, boxes: list) -> dict:
        return await asyncio.to_thread(self._explicit, image, points, boxes)

    async def segment_vlsam(self, image: np.ndarray, maps: list, method: str, referring: bool) -> dict:
        return await asyncio.to_thread(self._vlsam, image, maps, method, referring)

    async def segment_located(self, image: np.ndarray, located: list[dict], how: str = "point") -> dict:
        return await asyncio.to_thread(self._located, image, located, how)


def _round(t: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in t.items()}


class LocalBackend:
    """Both runners in this process: the API's backend without Ray (tests, benchmarks)."""

    def __init__(self, cfg: AppConfig, vlm: VlmRunner | None = None) -> None:
        self.vlm = vlm or VlmRunner(cfg)  # a runner may be shared by backends with other configs (tests)
        self._sam: SamRunner | None = None
        self.cfg = cfg

    @property
    def sam(self) -> SamRunner:
        if self._sam is None:
            self._sam = SamRunner(self.cfg)
        return self._sam

    async def info(self) -> dict:
        return self.vlm.info()

    async def chat(self, jobs: list[ChatJob]) -> list[dict]:
        return await self.vlm.chat(jobs)

    def chat_stream(self, job: ChatJob) -> AsyncIterator[dict]:
        return self.vlm.chat_stream(job)

    async def locate(self, image: np.ndarray, queries: list[str]) -> list[dict]:
        return await self.vlm.locate(image, queries)

    async def read(self, image: np.ndarray, queries: list[str], method: str) -> list[dict]:
        return await self.vlm.read(image, queries, method)

    async def vlsam(self, image: np.ndarray, query: str | None, method: str) -> tuple[list, float]:
        return await self.vlm.vlsam(image, query, method)

    async def segment(self, image: np.ndarray, points: list, boxes: list) -> dict:
        return await self.sam.segment(image, points, boxes)

    async def segment_vlsam(self, image: np.ndarray, maps: list, method: str, referring: bool) -> dict:
        return await self.sam.segment_vlsam(image, maps, method, referring)

    async def segment_located(self, image: np.ndarray, located: list[dict], how: str = "point") -> dict:
        return await self.sam.segment_located(image, located, how)
