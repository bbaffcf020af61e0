"""What a VLM replica does with chat jobs, in plain Python (no Ray, no HTTP): the service's model side.

A `ChatJob` is one choice of one request, already checked by the ingress (image decoded into an RGB
array, question and sampling validated, interventions parsed by the registry). `Engine.run` answers a
list of jobs with the fewest generate calls that give each job exactly its solo answer: jobs are grouped
by everything that changes the computation for the whole batch (methods and their parameters,
sampling settings, whether attention is recorded for a heatmap), each group is one left-padded batch,
and `generate` gives a left-padded row the tokens it gets alone (greedy and seeded sampling; tested
in tests/test_generate.py and here through the service). Locating objects and drawing heatmaps happen
per row after the batch.

One lock per engine serialises model calls, so a replica never runs two forward passes at once on its
CPU threads or GPU (requests wait in Serve's queue and are batched there instead).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Head = tuple[int, int]


class Overloaded(Exception):
    """A deployment's queue is full (Serve's `max_queued_requests`): the API answers 503 + Retry-After."""

    def __init__(self, deployment: str, message: str = "") -> None:
        super().__init__(message or f"{deployment} is at its queue limit")
        self.deployment = deployment


class ReplicaLost(Exception):
    """The replica answering a request died under it (killed, out of memory): the API answers 503 +
    Retry-After at once (no transparent retry: Serve restarts the replica, the client decides)."""

    def __init__(self, deployment: str, message: str = "") -> None:
        super().__init__(message or f"a {deployment} replica died while answering")
        self.deployment = deployment


@dataclass(frozen=True)
class ChatJob:
    """One choice of a chat request. `methods`: the registry's JSON specs ({"name", "params"})."""

    image: np.ndarray = field(repr=False, compare=False)  # [H, W, 3] uint8, as decoded by the ingress
    question: str
    system: str | None = None
    history: tuple[tuple[str, str], ...] = ()  # earlier (role, text) turns; the first (user) carries the image
    max_new_tokens: int = 256
    fit_context: bool = True  # max_tokens not given: lower it to what fits
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    methods: tuple[dict, ...] = ()
    heatmap: bool = False
    heads: str = "auto"
    locate: bool = False
    queries: tuple[str, ...] | None = None
    ignore_eos: bool = False
    id: str = ""  # the request id and choice ("rid/0"): what `Engine.cancel` names

    def group_key(self) -> str:
        """Jobs with the same key can share one batch (the plan, the sampling, the recorder)."""
        return json.dumps(
            [
                self.methods,
                self.system,
                self.history,
                self.temperature,
                self.ignore_eos,
                self.top_p if self.temperature > 0 else None,
                self.seed if self.temperature > 0 else None,  # greedy decoding ignores the seed
                self.heatmap and self.heads,
            ],
            sort_keys=True,
        )


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Engine:
    """A loaded VLM (and its risk model), answering `ChatJob`s and locating phrases."""

    def __init__(self, vlm, risk=None) -> None:
        self.vlm = vlm
        self.risk = risk
        self.lock = threading.Lock()
        self.draw_lock = threading.Lock()  # pyplot keeps global state: one figure at a time per process
        self._selection = None
        self._cancelled: dict[str, float] = {}  # job id -> when it was cancelled (monotonic)
        self._cancel_lock = threading.Lock()  # the event loop marks, the worker thread forgets
        self.stopped = {"jobs": 0, "tokens_left": 0}  # cancelled jobs, and the budget they left unused

    # ------------------------------------------------------------------ helpers

    @property
    def selection(self):
        """The checkpoint's localization heads (shipped / cached per weights hash; discovered once)."""
        if self._selection is None:
            from grounding.heads import load_or_discover

            self._selection = load_or_discover(self.vlm)
        return self._selection

    # ------------------------------------------------------------------ cancellation

    def cancel(self, ids: Sequence[str]) -> None:
        """Mark jobs whose client went away (or whose deadline passed): one not started is skipped, one
        generating ends after its current step (`vlm.generate`'s `stop`). Thread-safe (called from the
        event loop while a batch runs in a worker thread); marks older than 10 minutes are forgotten."""
        now = time.monotonic()
        with self._cancel_lock:
            for k in [k for k, t in self._cancelled.items() if now - t > 600]:
                del self._cancelled[k]
            for i in ids:
                if i:
                    self._cancelled[i] = now

    def _forget(self, job_id: str) -> None:
        with self._cancel_lock:
            self._cancelled.pop(job_id, None)

    def _stop(self, jobs: Sequence[ChatJob]) -> Callable[[], list[bool]] | None:
        if not any(j.id for j in jobs):
            return None
        return lambda: [bool(j.id) and j.id in self._cancelled for j in jobs]

    # ------------------------------------------------------------------ chat

    def check(self, job: ChatJob) -> tuple[int, object]:
        """The job's answer budget (max_new_tokens, lowered to what fits when `fit_context`) and its inputs
        (reused when the job is answered alone).

        Raises:
            QuestionError: a question the chat template cannot take; ContextLengthError: no room.
        """
        from vlm import build_inputs
        from vlm.contract import check_context

        inputs = build_inputs(self.vlm, [job.image], [job.question], job.system, job.history)
        n = int(inputs.attention_mask.sum())
        return check_context(n, job.max_new_tokens, self.vlm.max_positions, fit=job.fit_context), inputs

    def run(self, jobs: Sequence[ChatJob]) -> list[dict]:
        """Answer every job; one batched generate per group of jobs sharing a `group_key` and budget. A job
        the model cannot take gets {"error": {"type", "message"}} and costs its neighbours nothing."""
        from lucid.errors import InputError

        out: list[dict | None] = [None] * len(jobs)
        groups: dict[tuple[str, int], list[int]] = {}
        single: dict[int, object] = {}
        for i, job in enumerate(jobs):
            if job.id and job.id in self._cancelled:  # its client left while it waited: never started
                out[i] = {"error": {"type": "Cancelled", "message": "cancelled before it started"}}
                self.stopped["jobs"] += 1
                self._forget(job.id)
                continue
            try:
                budget, single[i] = self.check(job)
            except InputError as e:
                out[i] = _error(e)
                continue
            groups.setdefault((job.group_key(), budget), []).append(i)
        for (_, budget), idx in groups.items():
            try:
                results = self._run_group(
                    [jobs[i] for i in idx], budget, inputs=single[idx[0]] if len(idx) == 1 else None
                )
            except InputError as e:
                results = [_error(e)] * len(idx)
            for i, res in zip(idx, results):
                out[i] = res
        return out  # type: ignore[return-value]

    def stream(self, job: ChatJob, emit: Callable[[str], None]) -> dict:
        """Answer one job, calling `emit(text)` with each new piece of the answer as it is generated."""
        tok = self.vlm.processor.tokenizer
        ids: list[int] = []
        sent = [""]
        eos = self.vlm.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
        stopped = [False]

        def on_token(step: int, row: list[int]) -> None:
            if stopped[0] or row[0] in eos:
                stopped[0] = True
                return
            ids.append(row[0])
            text = tok.decode(ids, skip_special_tokens=True).lstrip()
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
                return
            if text.startswith(sent[0]) and len(text) > len(sent[0]):
                emit(text[len(sent[0]) :])
                sent[0] = text

        budget, inputs = self.check(job)
        res = self._run_group([job], budget, on_token, inputs)[0]
        final = res["text"]
        if final.startswith(sent[0]) and len(final) > len(sent[0]):
            emit(final[len(sent[0]) :])
        return res

    def _run_group(self, jobs: list[ChatJob], budget: int, on_token=None, inputs=None) -> list[dict]:
        from lucid.answer import answer_batch
        from mitigation.methods import parse_methods
        from vlm import SamplingParams

        first = jobs[0]
        methods = parse_methods(list(first.methods))
        # per row: the phrases to locate (None: the answer's default queries; (): none)
        locate = [(j.queries if j.locate else ()) for j in jobs] if any(j.locate for j in jobs) else None
        t0 = time.perf_counter()
        with self.lock:
            t_lock = time.perf_counter()
            sampling = SamplingParams(
                max_new_tokens=budget,
                temperature=first.temperature,
                top_p=first.top_p,
                seed=first.seed,
                ignore_eos=first.ignore_eos,
            )
            answers = answer_batch(
                self.vlm,
                [j.image for j in jobs],
                [j.question for j in jobs],
                sampling,
                system=first.system,
                history=first.history,
                inputs=inputs,
                methods=methods,
                attention=first.heatmap,
                attention_heads=first.heads,
                risk=self.risk,
                locate=locate,
                selection=self.selection if locate is not None else None,
                on_token=on_token,
                stop=self._stop(jobs),
            )
        results = []
        for job, ans in zip(jobs, answers):
            gen = ans.generation
            res: dict[str, Any] = {
                "text": gen.text,
                "finish_reason": {"eos": "stop"}.get(gen.finish_reason, gen.finish_reason),
                "prompt_tokens": ans.prompt_tokens,
                "completion_tokens": len(gen.token_ids),
                "steps": len(gen.timings.decode_s) + 1,  # tokens decoded (past the answer with ignore_eos)
                "max_new_tokens": budget,
                "risk": None if ans.risk is None else round(float(ans.risk), 6),
                "methods": [m.to_json() for m in methods],
                "timings": {**gen.timings.to_dict(), "queued_s": round(t_lock - t0, 6), "batch_size": len(jobs)},
            }
            if job.heatmap:
                res["_grid"] = ans.attention_grid
                res["_layout"] = gen.layout
                res["attention_heads"] = None if ans.attention_heads is None else [list(h) for h in ans.attention_heads]
            if job.locate:
                res["located"] = [_location_json(loc, ans.locate_s) for loc in ans.located]
            if any(hasattr(v, "to_record") for v in gen.extras.values()):
                res["_views"] = gen
            results.append(res)
        for job, res in zip(jobs, results):
            if res["finish_reason"] == "cancelled":
                self.stopped["jobs"] += 1
                self.stopped["tokens_left"] += budget - res["steps"]
            self._forget(job.id)
        for job, res in zip(jobs, results):  # drawing needs no model: outside the lock
            grid, lay = res.pop("_grid", None), res.pop("_layout", None)
            if job.heatmap and grid is not None:
                from PIL import Image

                from lucid.heatmap import heatmap_figure

                t = time.perf_counter()
                with self.draw_lock:
                    png = _png(heatmap_figure(Image.fromarray(job.image), grid, lay, max_side=512))
                res["heatmap"] = {
                    "png": png,
                    "grid": list(grid.shape),
                    "values": np.round(grid, 6).tolist(),
                    "heads": res.pop("attention_heads", None),
                }
                res["timings"]["heatmap_s"] = round(time.perf_counter() - t, 6)
            if gen := res.pop("_views", None):  # what the methods made (CARVE: map, mask, refined image)
                from PIL import Image

                from lucid.heatmap import views_figure

                with self.draw_lock:
                    png = _png(views_figure(Image.fromarray(job.image), gen.extras, max_side=384))
                res["views"] = {"png": png, **gen.extra_records()}
        return results

    # ------------------------------------------------------------------ locate

    def _locate(self, image: np.ndarray, queries: list[str]) -> list[dict]:
        from grounding.location import LocateParams, locate_batch

        t = time.perf_counter()
        locs = locate_batch(self.vlm, [image] * len(queries), queries, self.selection, LocateParams())
        dt = (time.perf_counter() - t) / max(1, len(queries))
        return [_location_json(loc, dt) for loc in locs]

    def locate(self, image: np.ndarray, queries: list[str]) -> list[dict]:
        with self.lock:
            return self._locate(image, queries)

    def read(self, image: np.ndarray, queries: list[str], method: str) -> list[dict]:
        """READ's similarity-as-points (`grounding.read`; `method` = 'read[:k=v,...]') per query: the points
        for SAM (`sam_input`, unrounded) beside the map, token and layer."""
        from grounding.read import parse_read, read_batch, read_prompt

        params = parse_read(method)
        with self.lock:
            t = time.perf_counter()
            results = read_batch(self.vlm, [image] * len(queries), queries, params)
            dt = (time.perf_counter() - t) / max(1, len(queries))
        out = []
        for r in results:
            p = read_prompt(r, params)
            sam_input = {"points": [list(xy) for xy in p.points], "labels": list(p.labels), "multimask": p.multimask}
            out.append({**r.to_json(), "sam_input": sam_input, "read_s": round(dt, 6)})
        return out

    def vlsam(self, image: np.ndarray, query: str | None, method: str) -> tuple[list, float]:
        """VL-SAM's object maps (`grounding.vlsam.object_maps`; `method` = 'vl-sam[:k=v,...]'; `query` None:
        every object the model names) for the SAM replica, and the seconds they took."""
        from dataclasses import replace

        from grounding.vlsam import object_maps, parse_vlsam

        params = parse_vlsam(method)
        with self.lock:
            t = time.perf_counter()
            maps = object_maps(self.vlm, image, query, params)
            dt = time.perf_counter() - t
        return [replace(m, layout=None) for m in maps], dt


def _location_json(loc, locate_s: float) -> dict:
    d = loc.to_json()
    # unrounded, for the SAM prompt (grounding.segment.located_prompt) the SAM replica makes
    d["sam_input"] = {"point": [float(v) for v in loc.point], "box": [float(v) for v in loc.box]}
    d["locate_s"] = round(locate_s, 6)
    return d


def _error(e: Exception) -> dict:
    return {"error": {"type": type(e).__name__, "message": str(e)}}
