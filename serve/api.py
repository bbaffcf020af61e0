"""The REST API (FastAPI): validation, images, OpenAI shapes, errors, metrics. No torch, no model.

`make_app(cfg, backend)` builds the app around a backend: the Ray Serve deployments' handles
(`serve.app`) or the in-process `serve.runners.LocalBackend`. Everything a request can get wrong is
answered here with a 4xx naming the field before any model work; a failure inside is a 500 carrying the
request id (also in the log and the `x-request-id` header); the app keeps serving either way.
With keys configured, `Envelope` answers 401 / 403 (`check_key`) before any route or body is read; a
deployment's full queue (`serve.engine.Overloaded`) or a replica that died under the request
(`ReplicaLost`) is a 503 with Retry-After. Chat and segment requests run under a deadline (`_guarded`):
past it a 504 (a stream: an error event), and a client that disconnects stops its work; either way the
backend call is cancelled, which ends the generation on the replica (`serve.runners`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
import secrets
import time
import traceback
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lucid.errors import ImageError, ImageTooLargeError, InputError
from serve.config import AppConfig
from serve.engine import ChatJob, Overloaded, ReplicaLost
from serve.metrics import Metrics
from serve.schemas import (
    ChatRequest,
    ErrorResponse,
    EvalRequest,
    SegmentRequest,
    ValidationErrorResponse,
    interventions_schema,
)

log = logging.getLogger("lucid.serve")
STATIC = Path(__file__).parent / "static"


class ApiError(Exception):
    """An error with its HTTP status and OpenAI-style type."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _body(
    status: int,
    message: str,
    type_: str,
    request_id: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    **more,
) -> JSONResponse:
    err = {"message": message, "type": type_, "param": param, "code": status, "request_id": request_id}
    return JSONResponse({"error": err, **more}, status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------- keys

ADMIN_PATHS = ("/v1/evals",)  # eval jobs: admin keys only


def _matches(given: bytes, keys: list[str]) -> bool:
    """Whether `given` is one of `keys`, in time that does not depend on which key (or how much of it)
    matched: every key is compared, with hmac.compare_digest."""
    import hmac

    found = False
    for k in keys:
        found |= hmac.compare_digest(given, k.encode())
    return found


def check_key(cfg: AppConfig, path: str, authorization: str | None) -> tuple[int, str] | None:
    """None when the request may go on, else (401 | 403, why). Keys are never echoed or logged."""
    if not cfg.auth or path in cfg.auth_exempt:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return 401, "missing API key: send the header 'Authorization: Bearer KEY'"
    given = token.encode("latin-1", "replace")
    admin = _matches(given, cfg.admin_api_keys)
    user = _matches(given, cfg.api_keys)
    if not (admin or user):
        return 401, "invalid API key"
    if not admin and (path in ADMIN_PATHS or path.startswith(tuple(p + "/" for p in ADMIN_PATHS))):
        return 403, "eval jobs need an admin API key (admin_api_keys)"
    return None


# --------------------------------------------------------------------------------------------- images


def _limits(cfg: AppConfig):
    from vlm.images import ImageLimits

    return ImageLimits(max_bytes=cfg.max_image_bytes, max_pixels=cfg.max_image_pixels)


def resolve_image(url: str, cfg: AppConfig, param: str) -> np.ndarray:
    """A data: URL, a path under `cfg.image_root` (or file:// URL), or an allowed http(s) URL -> RGB [H, W, 3].

    Raises ApiError: 400 (undecodable, not allowed, not found), 413 (over a size limit).
    """
    from vlm.images import load_image

    limits = _limits(cfg)
    try:
        if url.startswith("data:"):
            head, sep, data = url.partition(",")
            if not sep or ";base64" not in head:
                raise ApiError(400, "a data: URL must be base64 (data:image/png;base64,...)", param=param)
            if len(data) * 3 // 4 > limits.max_bytes + 3:
                raise ApiError(
                    413,
                    f"the image is about {len(data) * 3 // 4:,} bytes, over the limit of {limits.max_bytes:,}",
                    param=param,
                )
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "the data: URL is not valid base64", param=param) from None
            pil = load_image(raw, limits)
        elif url.startswith(("http://", "https://")):
            if not any(url.startswith(p) for p in cfg.allow_remote):
                raise ApiError(
                    400,
                    "remote image URLs are refused (send a data: URL, or add this URL's prefix to allow_remote)",
                    param=param,
                )
            pil = load_image(_fetch(url, cfg), limits)
        else:
            pil = load_image(_local_path(url, cfg, param), limits)
    except ImageTooLargeError as e:
        raise ApiError(413, str(e), param=param) from None
    except ImageError as e:
        raise ApiError(400, str(e), param=param) from None
    return np.asarray(pil, dtype=np.uint8)


def _local_path(url: str, cfg: AppConfig, param: str) -> Path:
    if url.startswith("file://"):
        url = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        raise ApiError(400, f"unsupported image URL scheme in {url[:40]!r} (data:, a path, or https://)", param=param)
    if cfg.image_root is None:
        raise ApiError(400, "local image paths are not enabled on this server (send a data: URL)", param=param)
    root = Path(cfg.image_root).resolve()
    path = (root / url).resolve() if not os.path.isabs(url) else Path(url).resolve()
    if root != path and root not in path.parents:
        raise ApiError(400, f"image path {url!r} is outside the server's image root", param=param)
    return path


def _fetch(url: str, cfg: AppConfig) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=cfg.remote_timeout_s) as r:  # noqa: S310 (allow-listed prefix)
            data = r.read(cfg.max_image_bytes + 1)
    except OSError as e:
        raise ApiError(400, f"cannot fetch {url}: {e}") from None
    if len(data) > cfg.max_image_bytes:
        raise ApiError(413, f"the image at {url} is over the limit of {cfg.max_image_bytes:,} bytes")
    return data


# --------------------------------------------------------------------------------------------- chat


def _methods(items: list, param: str = "interventions") -> list[dict]:
    """Registry-validated {"name", "params"} specs (resolved: every parameter with its value)."""
    from mitigation.methods import parse_methods

    try:
        return [m.to_json() for m in parse_methods([{"name": i.name, "params": i.params} for i in items])]
    except InputError as e:
        raise ApiError(400, str(e), param=param) from None


def chat_jobs(req: ChatRequest, cfg: AppConfig, model_id: str, rid: str = "") -> tuple[list[ChatJob], dict]:
    """Check a chat request and turn it into one job per choice (plus what the response echoes); job i's
    id is "rid/i" (what cancelling it names)."""
    if req.model not in (None, "", model_id, "lucid"):
        raise ApiError(
            404,
            f"model {req.model!r} is not served here; GET /v1/models lists {model_id!r}",
            "model",
            type_="not_found",
        )
    system_parts: list[str] = []
    turns: list[tuple[str, list[str]]] = []  # (role, text parts) of the user / assistant messages, in order
    images = []
    for i, m in enumerate(req.messages):
        parts = [m.content] if isinstance(m.content, str) else (m.content or [])
        if m.role == "tool":
            raise ApiError(400, "tool messages are not supported", param=f"messages.{i}")
        if m.role in ("system", "developer"):
            if turns:
                raise ApiError(400, "system messages come before the conversation", param=f"messages.{i}")
            for j, p in enumerate(parts):
                text = p if isinstance(p, str) else getattr(p, "text", None)
                if text is None:
                    raise ApiError(400, "system messages take text only", param=f"messages.{i}.content.{j}")
                system_parts.append(text)
            continue
        role = "user" if m.role == "user" else "assistant"
        if (role == "user") == (len(turns) % 2 == 1):
            raise ApiError(
                400, "user and assistant messages must alternate, starting with a user message", f"messages.{i}"
            )
        texts = []
        for j, p in enumerate(parts):
            text = p if isinstance(p, str) else getattr(p, "text", None)
            if text is not None:
                texts.append(text)
            elif role == "user" and not turns:
                images.append((p.url, f"messages.{i}.content.{j}.image_url"))
            else:
                raise ApiError(
                    400, "the image goes in the first user message (one image per conversation)", f"messages.{i}"
                )
        turns.append((role, texts))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the conversation must end with a user message (the turn to answer)", "messages")
    if len(images) != 1:
        raise ApiError(
            400, f"exactly one image_url part is needed (LLaVA answers about one image), got {len(images)}", "messages"
        )
    joined = ["\n".join(t for t in texts if t.strip()) for _, texts in turns]
    history = tuple((role, text) for (role, _), text in zip(turns[:-1], joined[:-1]))
    question_parts = [joined[-1]]
    from vlm.contract import check_question

    for k, (_, text) in enumerate(history):
        if not text.strip():
            raise ApiError(400, f"message {k} of the conversation has no text", param="messages")
        try:
            check_question(text)
        except InputError as e:
            raise ApiError(400, str(e), param="messages") from None
    question = "\n".join(t for t in question_parts if t.strip())
    if not question.strip():
        raise ApiError(400, "the user message has no text (the question)", param="messages")
    try:
        check_question(question)
    except InputError as e:
        raise ApiError(400, str(e), param="messages") from None
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > cfg.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {cfg.max_tokens}", "max_tokens")
    if req.n > cfg.max_n:
        raise ApiError(400, f"n {req.n} is over this server's limit of {cfg.max_n}", param="n")
    if req.stream and req.n > 1:
        raise ApiError(400, "stream with n > 1 is not supported", param="n")
    methods = _methods(req.interventions)
    g = req.grounding
    if g.heads not in ("auto", "all"):
        from grounding.heads import parse_heads

        try:
            parse_heads(g.heads)
        except ValueError as e:
            raise ApiError(400, f"grounding.heads: {e}", param="grounding.heads") from None
    for q in g.queries or []:
        try:
            check_question(q)
        except InputError as e:
            raise ApiError(400, f"grounding.queries: {e}", param="grounding.queries") from None
    image = resolve_image(images[0][0], cfg, images[0][1])
    seed = req.seed if req.seed is not None else secrets.randbits(62)
    greedy = req.temperature == 0
    base = ChatJob(
        image=image,
        question=question,
        system=" ".join(system_parts) or None,
        history=history,
        max_new_tokens=max_tokens or cfg.default_max_tokens,
        fit_context=max_tokens is None,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=seed,
        methods=tuple(methods),
        heatmap=g.heatmap,
        heads=g.heads,
        locate=g.locate or g.masks,
        queries=None if g.queries is None else tuple(g.queries),
        ignore_eos=req.ignore_eos,
        id=f"{rid}/0" if rid else "",
    )
    from dataclasses import replace

    jobs = (
        [base]
        if greedy
        else [replace(base, seed=(seed + i) % 2**63, id=f"{rid}/{i}" if rid else "") for i in range(req.n)]
    )
    echo = {"seed": seed, "n": req.n, "greedy": greedy, "methods": methods}
    return jobs, echo


# --------------------------------------------------------------------------------------------- eval names

SERVED_SAM = "served"  # what a suite's sam= may say for this server's SAM (its spec stays private)


def eval_names(req: EvalRequest, cfg: AppConfig, served_id: str) -> EvalRequest:
    """An eval request with what it names mapped to what the server was configured with: `models` are
    ids (the served model's, or `eval_models`), never paths; a suite's `sam=` is 'testbed' or 'served'.

    The file system is never looked at, so a refusal says the same for a path that exists and one that
    does not. Raises ApiError 400."""
    from evals.suites import SuiteError, parse_spec

    allowed = {served_id: cfg.model, **cfg.eval_models}
    valid = ", ".join(repr(k) for k in sorted(allowed))
    models = []
    for i, m in enumerate(req.models):
        if m not in allowed:
            raise ApiError(400, f"models.{i}: not a model id this server runs evals on; valid: {valid}", f"models.{i}")
        models.append(allowed[m])
    suites = []
    for i, spec in enumerate(req.suites):
        try:
            name, params = parse_spec(spec)
        except SuiteError as e:
            raise ApiError(400, f"suites.{i}: {e}", f"suites.{i}") from None
        if "sam" in params:
            if params["sam"].strip() not in ("testbed", SERVED_SAM):
                raise ApiError(
                    400,
                    f"suites.{i}: sam= may be 'testbed' or '{SERVED_SAM}' (this server's SAM), not a path or spec",
                    f"suites.{i}",
                )
            params["sam"] = cfg.sam if params["sam"].strip() == SERVED_SAM else "testbed"
            spec = name + ":" + ",".join(f"{k}={v}" for k, v in params.items())
        suites.append(spec)
    return req.model_copy(update={"models": models, "suites": suites})


def _choice_extras(res: dict) -> dict:
    out = {k: res[k] for k in ("risk", "timings") if k in res}
    for k in ("heatmap", "located", "views"):
        if k in res:
            out[k] = res[k]
    return out


# --------------------------------------------------------------------------------------------- app


_WHY = {
    400: "a request the schema cannot fully judge: an undecodable or refused image, an unknown method or a bad "
    "parameter, messages in an order LLaVA cannot take, a field combination, a value over a server limit",
    401: "no or a wrong API key (when the server has keys)",
    403: "a user key on eval jobs (they need an admin key)",
    404: "not found (an unknown model or job)",
    413: "an image over the byte or pixel limit, or a body over max_body_bytes",
    422: "malformed JSON, or a body against this schema",
    500: "an internal failure, naming the request id",
    503: "a deployment's queue is full or its replica died under the request (both with Retry-After), or a "
    "service not enabled here",
    504: "the request's deadline passed (timeout_s, default request_timeout_s); its work was stopped",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error responses of a route: the service's error shape (`ErrorResponse`)."""
    return {
        c: {"model": ValidationErrorResponse if c == 422 else ErrorResponse, "description": _WHY[c]}
        for c in (*codes, 500)
    }


_NOT_READY = {
    "type": "object",
    "properties": {"ready": {"const": False}, "reason": {"type": "string"}},
    "required": ["ready", "reason"],
}
_STREAM = {
    "description": "a chat.completion; with stream: server-sent chat.completion.chunk events",
    # OpenAPI 3.1: the schema of an event stream describes one event
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "properties": {
                    "data": {"type": "string", "description": "a chat.completion.chunk (JSON), then [DONE]"},
                    "event": {"type": "string"},
                },
                "required": ["data"],
            }
        }
    },
}


def make_app(cfg: AppConfig, backend: Any, evals: Any = None) -> FastAPI:
    """The FastAPI app over `backend` (async chat / chat_stream / locate / segment / segment_located /
    info) and, for /v1/evals, `evals` (a `serve.evals.EvalJobs`, or None: 503)."""
    app = FastAPI(
        title="Lucid",
        version=_version(),
        description="LLaVA-class VLMs that answer from the image: OpenAI-compatible chat with attention "
        "interventions, grounding and hallucination risk; segmentation; evaluation jobs.",
    )
    metrics = Metrics()
    from serve.config import deployment_limits

    metrics.set_limits(deployment_limits(cfg))
    state: dict[str, Any] = {"model_id": cfg.model_name or None}

    async def model_id() -> str:
        if state["model_id"] is None:
            state["model_id"] = (await backend.info())["id"]
        return state["model_id"]

    app.add_middleware(Envelope, cfg=cfg, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        path = ".".join(str(p) for p in first["loc"] if p != "body")
        msg = f"{path}: {first['msg']}" if path else first["msg"]
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errs]
        return _body(
            422, msg, "invalid_request_error", request.state.rid, path or None, detail=jsonable_encoder(detail)
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """Starlette's own refusals (an unknown path: 404, a method a route does not take: 405) in the
        service's error shape, not FastAPI's {"detail": ...}."""
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _body(exc.status_code, str(exc.detail), kind, request.state.rid, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _body(exc.status, exc.message, exc.type, request.state.rid, exc.param)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        metrics.rejected.labels(_route_of(request.url.path), exc.deployment).inc()
        return _overloaded_body(exc, cfg, request.state.rid)

    @app.exception_handler(ReplicaLost)
    async def replica_lost(request: Request, exc: ReplicaLost):
        log.warning("request %s: %s", request.state.rid, exc)
        return _lost_body(exc, cfg, request.state.rid)

    # ------------------------------------------------------------------ routes

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", responses=_errors())
    async def healthz():
        return {"status": "ok"}

    @app.get(
        "/readyz",
        responses={
            503: {
                "description": "not ready: the model replica does not answer (yet)",
                "content": {"application/json": {"schema": _NOT_READY}},
            },
            **_errors(),
        },
    )
    async def readyz():
        try:  # with no live replica Serve would hold the call until one is back: bounded here
            info = await asyncio.wait_for(backend.info(), cfg.ready_timeout_s)
        except TimeoutError:
            why = f"no model replica answered within {cfg.ready_timeout_s:g} s (ready_timeout_s)"
            return JSONResponse({"ready": False, "reason": why}, status_code=503)
        except Exception as e:  # not ready: the model replica is not up (yet)
            return JSONResponse({"ready": False, "reason": f"{type(e).__name__}: {e}"[:300]}, status_code=503)
        return {"ready": True, "model": info}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", responses=_errors(401, 503))
    async def models():
        info = await backend.info()
        return {
            "object": "list",
            "data": [{"id": info["id"], "object": "model", "created": 0, "owned_by": "lucid", "lucid": info}],
        }

    @app.get("/v1/interventions", responses=_errors(401))
    async def interventions():
        from mitigation.methods.registry import describe, schema

        return {
            "object": "list",
            "data": [{**d, "schema": schema(d["name"])} for d in describe()],
            "request_schema": interventions_schema(),
        }

    def deadline(req: ChatRequest | SegmentRequest) -> float:
        """The request's deadline on the event loop's clock (`timeout_s`, else request_timeout_s)."""
        if req.timeout_s is not None and req.timeout_s > cfg.max_request_timeout_s:
            raise ApiError(
                400,
                f"timeout_s {req.timeout_s:g} is over this server's limit of {cfg.max_request_timeout_s:g}",
                "timeout_s",
            )
        return asyncio.get_running_loop().time() + (req.timeout_s or cfg.request_timeout_s)

    async def guarded(request: Request, req, work):
        """`work` (a coroutine) within the request's deadline, while its client is still there."""
        try:
            end = request.state.deadline = deadline(req)  # a stream keeps this deadline for its events
        except ApiError:
            work.close()
            raise
        return await _guarded(request, work, end, metrics)

    @app.post("/v1/chat/completions", responses={200: _STREAM, **_errors(400, 401, 404, 413, 422, 503, 504)})
    async def chat(req: ChatRequest, request: Request):
        request.state.method = "+".join(i.name for i in req.interventions) or "none"
        return await guarded(request, req, _chat(req, request))

    async def _chat(req: ChatRequest, request: Request):
        mid = await model_id()
        rid = request.state.rid
        jobs, echo = chat_jobs(req, cfg, mid, rid)
        created = int(time.time())
        cid = f"chatcmpl-{rid}"
        if req.stream:
            items = await _prefetched(backend.chat_stream(jobs[0]))  # a full queue: 503 before the stream
            return StreamingResponse(
                _sse(backend, items, jobs[0], req, cid, created, mid, echo, rid, request.state.deadline, metrics),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        t = time.perf_counter()
        results = await backend.chat(jobs)
        for res in results:
            if "error" in res:
                raise ApiError(400, res["error"]["message"], param="messages")
        if len(results) == 1 and req.n > 1:  # greedy: every choice is the same answer
            results = results * req.n
        if req.grounding.masks:
            await _add_masks(backend, jobs[0].image, results)
        choices, extras = [], []
        for i, res in enumerate(results):
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": res["text"]},
                    "finish_reason": res["finish_reason"],
                    "logprobs": None,
                }
            )
            extras.append(_choice_extras(res))
        prompt = results[0]["prompt_tokens"]
        completion = sum(r["completion_tokens"] for r in results)
        lucid = {
            "request_id": rid,
            "plan": echo["methods"],
            "sampling": {
                "seed": echo["seed"],
                "temperature": req.temperature,
                "top_p": req.top_p,
                "max_tokens": results[0]["max_new_tokens"],
            },
            **extras[0],
            "choices": extras if req.n > 1 else None,
            "wall_s": round(time.perf_counter() - t, 6),
        }
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": mid,
            "system_fingerprint": f"lucid-{_version()}",
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "lucid": lucid,
        }

    @app.post("/v1/segment", responses=_errors(400, 401, 413, 422, 503, 504))
    async def segment(req: SegmentRequest, request: Request):
        request.state.method = "all" if req.all else "query" if req.query else "prompts"
        return await guarded(request, req, _segment(req))

    async def _segment(req: SegmentRequest):
        if req.all:
            if req.query is not None or req.points or req.boxes:
                raise ApiError(
                    400, "all segments every object the model names: give no query, points or boxes", param="all"
                )
            return await _segment_all(req)
        if req.query is None and not req.points and not req.boxes:
            raise ApiError(400, "nothing to segment: give a query, all, or points and/or boxes", param="query")
        if req.query is not None and (req.points or req.boxes):
            raise ApiError(400, "give either a query or points/boxes, not both", param="query")
        if len(req.boxes) > 1 and req.points:
            raise ApiError(400, "give points with at most one box (each box is its own object)", param="points")
        image = resolve_image(req.image, cfg, "image")
        h, w = image.shape[:2]
        if req.query is None:
            from grounding.sam import PromptError, SamPrompt

            try:
                for b in req.boxes or [None]:
                    pts = tuple((x, y) for x, y, _ in req.points)
                    SamPrompt(pts, tuple(lab for *_, lab in req.points), b).check(w, h)
            except PromptError as e:
                raise ApiError(400, str(e), param="points" if req.points else "boxes") from None
            t = time.perf_counter()
            out = await backend.segment(image, [list(p) for p in req.points], [list(b) for b in req.boxes])
        else:
            from vlm.contract import check_question

            try:
                check_question(req.query)
            except InputError as e:
                raise ApiError(400, str(e), param="query") from None
            if req.method.partition(":")[0].strip() == "vl-sam":
                return await _segment_vlsam(req, image, req.query)
            if req.method != "heads":
                from grounding.read import parse_read

                try:
                    if req.method.partition(":")[0].strip() != "read":
                        raise ValueError(
                            f"method must be 'heads', 'read[:k=v,...]' or 'vl-sam[:k=v,...]', got {req.method!r}"
                        )
                    parse_read(req.method)
                except ValueError as e:
                    raise ApiError(400, str(e), param="method") from None
                if req.prompt != "point":
                    raise ApiError(400, "prompt belongs to method 'heads', not read", param="prompt")
                t = time.perf_counter()
                try:
                    located = await backend.read(image, [req.query], req.method)
                except ValueError as e:  # a layer outside the model, no seg token
                    raise ApiError(400, str(e), param="method") from None
                out = await backend.segment_located(image, located, "read")
                out["timings"]["read_s"] = located[0]["read_s"]
                out["read"] = {k: located[0][k] for k in ("token", "layer", "positions", "map")}
            else:
                t = time.perf_counter()
                located = await backend.locate(image, [req.query])
                out = await backend.segment_located(image, located, req.prompt)
                out["timings"]["locate_s"] = located[0]["locate_s"] if located else 0.0
                out["heads"] = located[0]["heads"] if located else []
        out["image_size"] = [w, h]
        out["timings"]["wall_s"] = round(time.perf_counter() - t, 6)
        return out

    async def _segment_all(req: SegmentRequest):
        method = "vl-sam" if req.method == "heads" else req.method  # the default method: VL-SAM's
        if method.partition(":")[0].strip() != "vl-sam":
            raise ApiError(400, f"all needs method 'vl-sam[:k=v,...]', got {req.method!r}", param="method")
        return await _segment_vlsam(req.model_copy(update={"method": method}), None, None)

    async def _segment_vlsam(req: SegmentRequest, image, query: str | None):
        """VL-SAM (`grounding.vlsam`): the VLM replica's object maps, then the SAM replica's points,
        refinement and NMS; `query` None: every object the model names."""
        from grounding.vlsam import parse_vlsam

        try:
            parse_vlsam(req.method)
        except ValueError as e:
            raise ApiError(400, str(e), param="method") from None
        if req.prompt != "point":
            raise ApiError(400, "prompt belongs to method 'heads', not vl-sam", param="prompt")
        if image is None:
            image = resolve_image(req.image, cfg, "image")
        h, w = image.shape[:2]
        t = time.perf_counter()
        try:
            maps, maps_s = await backend.vlsam(image, query, req.method)
        except ValueError as e:  # the referring answer does not hold the query's words
            raise ApiError(400, str(e), param="query") from None
        out = await backend.segment_vlsam(image, maps, req.method, query is not None)
        answers = {(m.scale, m.question): m.answer for m in maps}
        out["vl_sam"] = {
            "mode": "query" if query is not None else "all",
            "answers": [{"scale": k[0], "question": k[1], "answer": v} for k, v in answers.items()],
            "maps": len(maps),
        }
        out["timings"]["vlsam_maps_s"] = round(maps_s, 6)
        out["image_size"] = [w, h]
        out["timings"]["wall_s"] = round(time.perf_counter() - t, 6)
        return out

    # ------------------------------------------------------------------ eval jobs

    def _evals():
        if evals is None:
            raise ApiError(
                503, "eval jobs are not enabled on this server (evals: false, or no Ray dashboard)", type_="unavailable"
            )
        return evals

    @app.post("/v1/evals", status_code=201, responses=_errors(400, 401, 403, 413, 422, 503))
    async def submit_eval(req: EvalRequest, request: Request):
        request.state.method = "+".join(req.suites)
        req = eval_names(req, cfg, await model_id())  # what it names is checked first (400 before 503)
        jobs = _evals()
        try:
            return await jobs.submit(req, cfg.model)
        except InputError as e:
            raise ApiError(400, str(e)) from None

    @app.get("/v1/evals", responses=_errors(401, 403, 503))
    async def list_evals():
        return {"object": "list", "data": await _evals().list()}

    def _found(job_id: str, found: dict | None) -> dict:
        if found is None:
            raise ApiError(404, f"no eval job {job_id!r}", "job_id", type_="not_found")
        return found

    @app.get("/v1/evals/{job_id}", responses=_errors(401, 403, 404, 422, 503))
    async def get_eval(job_id: str):
        return _found(job_id, await _evals().status(job_id))

    @app.delete("/v1/evals/{job_id}", responses=_errors(401, 403, 404, 422, 503))
    async def stop_eval(job_id: str):
        return _found(job_id, await _evals().stop(job_id))

    def openapi() -> dict:
        """FastAPI's document, with the registry's own schema for an intervention (one branch per method)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            reg = {k: v for k, v in interventions_schema().items() if k != "$schema"}
            doc["components"]["schemas"]["Intervention"] = {
                "title": "Intervention",
                "description": "A registered method and its parameters (GET /v1/interventions).",
                **reg,
            }
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    return app


_ROUTES = {
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/models",
    "/v1/interventions",
    "/v1/chat/completions",
    "/v1/segment",
    "/v1/evals",
    "/openapi.json",
    "/docs",
}


class _TooLarge(Exception):
    pass


class Envelope:
    """Pure ASGI middleware around every request: a request id (the client's `x-request-id`, e.g. from
    Serve's proxy, or a new one) in `scope["state"]`, the body-size limit (413, before the body is read
    into memory), any exception a route did not answer turned into a 500 naming the request id (logged with
    its traceback), and the metrics."""

    def __init__(self, app, cfg: AppConfig, metrics: Metrics) -> None:
        self.app, self.cfg, self.metrics = app, cfg, metrics
        self.inflight = 0  # model requests (chat, segment) this ingress is answering

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get("x-request-id", "")
        echoed = bool(rid)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", rid):
            rid, echoed = uuid.uuid4().hex, False
        state = scope.setdefault("state", {})
        state["rid"], state["method"] = rid, "-"
        path = scope.get("path", "")
        route = path if path in _ROUTES else _route_of(path)
        t = time.perf_counter()
        status = [500]
        started = [False]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0], started[0] = msg["status"], True
                if not echoed:  # behind Serve, its proxy puts the id it sent us on the response
                    msg = {**msg, "headers": [*msg.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(msg)

        limit = self.cfg.max_body_bytes
        seen = [0]

        async def receive_():
            msg = await receive()
            if msg["type"] == "http.request":
                seen[0] += len(msg.get("body", b""))
                if seen[0] > limit:
                    raise _TooLarge
            return msg

        length = headers.get("content-length", "")
        refused = check_key(self.cfg, path, headers.get("authorization"))
        if refused is not None:
            code, why = refused
            www = 'Bearer realm="lucid"' + (', error="invalid_token"' if why == "invalid API key" else "")
            kind = "authentication_error" if code == 401 else "permission_error"
            hdrs = {"www-authenticate": www} if code == 401 else None
            try:
                await _body(code, why, kind, rid, headers=hdrs)(scope, receive, send_)
            finally:
                self.metrics.observe(scope["method"], route, state["method"], status[0], time.perf_counter() - t)
            return
        heavy = route in _MODEL_ROUTES
        if heavy and 0 <= self.cfg.max_inflight_requests <= self.inflight:  # shed before reading the body
            self.metrics.rejected.labels(route, "Api").inc()
            try:
                await _overloaded_body(Overloaded("Api"), self.cfg, rid)(scope, receive, send_)
            finally:
                self.metrics.observe(scope["method"], route, state["method"], status[0], time.perf_counter() - t)
            return
        self.inflight += heavy
        self.metrics.inflight.set(self.inflight)
        try:
            if length.isdigit() and int(length) > limit:
                raise _TooLarge
            await self.app(scope, receive_, send_)
        except _TooLarge:
            if not started[0]:
                size = f"{int(length):,} bytes" if length.isdigit() else "over the limit"
                msg = f"the request body is {size}, over {limit:,} bytes"
                await _body(413, msg, "too_large", rid)(scope, receive, send_)
        except Exception:  # what the route did not answer itself
            log.error("request %s failed:\n%s", rid, traceback.format_exc())
            if not started[0]:
                await _body(500, f"internal error (request id {rid})", "internal_error", rid)(scope, receive, send_)
        finally:
            self.inflight -= heavy
            self.metrics.inflight.set(self.inflight)
            self.metrics.observe(scope["method"], route, state["method"], status[0], time.perf_counter() - t)


_MODEL_ROUTES = ("/v1/chat/completions", "/v1/segment")  # what max_inflight_requests bounds


async def _guarded(request: Request, work, end: float, metrics: Metrics):
    """Await `work` until it is done, the deadline `end` (loop clock) passes (ApiError 504) or the client
    disconnects (a 499 nobody reads). Either way `work` is cancelled: the backend call with it, which
    Serve passes on to the replica, whose engine stops the generation after its current step."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    try:
        while True:
            left = end - loop.time()
            if left <= 0:
                metrics.stopped.labels(_route_of(request.url.path), "deadline").inc()
                raise ApiError(
                    504,
                    "the request did not finish within its deadline (timeout_s); its work was stopped",
                    "timeout_s",
                    type_="timeout",
                )
            done, _ = await asyncio.wait({task}, timeout=min(left, _POLL_S))
            if done:
                return task.result()
            if await request.is_disconnected():
                metrics.stopped.labels(_route_of(request.url.path), "disconnect").inc()
                log.info("request %s: the client went away; its work was stopped", request.state.rid)
                return _body(499, "the client closed the request", "client_closed", request.state.rid)
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # its own cancellation, or what it raised while being cancelled
                pass


_POLL_S = 0.25  # how often a waiting request looks whether its client is still there


def _lost_body(exc: ReplicaLost, cfg: AppConfig, rid: str) -> JSONResponse:
    msg = f"{exc}; Serve is restarting it: retry after {cfg.retry_after_s} s"
    return _body(503, msg, "replica_lost", rid, headers={"retry-after": str(cfg.retry_after_s)})


def _overloaded_body(exc: Overloaded, cfg: AppConfig, rid: str) -> JSONResponse:
    limit = "max_inflight_requests" if exc.deployment == "Api" else "max_queued_requests"
    msg = f"the server is at its queue limit ({exc.deployment}: {limit}); retry after {cfg.retry_after_s} s"
    return _body(503, msg, "overloaded", rid, headers={"retry-after": str(cfg.retry_after_s)})


def _route_of(path: str) -> str:
    if path in _ROUTES:
        return path
    return "/v1/evals/{id}" if path.startswith("/v1/evals/") else "other"


async def _add_masks(backend, image: np.ndarray, results: list[dict]) -> None:
    """SAM masks for the located objects of every choice (one SAM call per choice)."""
    done: dict[int, dict] = {}
    for res in results:
        located = res.get("located") or []
        if not located:
            continue
        key = id(res)
        if key not in done:
            done[key] = await backend.segment_located(image, located, "point")
            for loc, obj in zip(located, done[key]["objects"]):
                loc["mask"] = obj["mask"]
                loc["mask_score"] = obj["score"]
                loc["mask_box"] = obj["box"]
            res["timings"]["sam_s"] = done[key]["timings"].get("sam_s")


async def _prefetched(items):
    """`items` with its first item already pulled, so that a deployment's full queue (Overloaded) is
    raised here, before the response starts (a 503, not an error event); any other failure is raised
    where it was, inside the stream."""
    head, failed = [], None
    try:
        head.append(await items.__anext__())
    except (Overloaded, ReplicaLost):
        raise
    except StopAsyncIteration:
        pass
    except Exception as e:  # answered inside the stream, as before
        failed = e

    async def replay():
        for x in head:
            yield x
        if failed is not None:
            raise failed
        async for x in items:
            yield x

    return replay()


async def _sse(
    backend,
    items,
    job: ChatJob,
    req: ChatRequest,
    cid: str,
    created: int,
    mid: str,
    echo: dict,
    rid: str,
    end: float,
    metrics: Metrics,
):
    """OpenAI's chat.completion.chunk events; the last chunk carries the finish reason and `lucid`. Past
    the deadline `end` (loop clock) an error event (504) ends the stream and the generation is cancelled;
    a client that disconnects cancels it too (Starlette cancels this generator)."""
    loop = asyncio.get_running_loop()
    route = "/v1/chat/completions"

    def chunk(delta: dict, finish: str | None = None, **more) -> str:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": mid,
            "system_fingerprint": f"lucid-{_version()}",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **more,
        }
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    result = None
    try:
        while True:
            try:
                item = await asyncio.wait_for(anext(items), max(0.0, end - loop.time()))
            except StopAsyncIteration:
                break
            except TimeoutError:  # wait_for cancelled the stream: the replica stops generating
                metrics.stopped.labels(route, "deadline").inc()
                msg = "the request did not finish within its deadline (timeout_s); its work was stopped"
                yield _sse_error(msg, "timeout", 504, rid)
                yield "data: [DONE]\n\n"
                return
            if "delta" in item:
                yield chunk({"content": item["delta"]})
            elif "result" in item:
                result = item["result"]
            else:
                if item.get("internal"):
                    log.error("request %s failed while streaming: %s", rid, item["error"]["message"])
                err = item["error"]
                status = 500 if item.get("internal") else 400
                msg = f"internal error (request id {rid})" if status == 500 else err["message"]
                yield _sse_error(msg, err["type"], status, rid)
                yield "data: [DONE]\n\n"
                return
        if req.grounding.masks and result is not None:
            await _add_masks(backend, job.image, [result])
    except Overloaded as e:
        yield _sse_error(f"the server is at its queue limit ({e.deployment}); retry later", "overloaded", 503, rid)
        yield "data: [DONE]\n\n"
        return
    except ReplicaLost as e:
        log.warning("request %s: %s", rid, e)
        yield _sse_error(f"{e}; retry", "replica_lost", 503, rid)
        yield "data: [DONE]\n\n"
        return
    except asyncio.CancelledError:  # the client went away: Starlette cancels the stream
        metrics.stopped.labels(route, "disconnect").inc()
        raise
    except Exception:
        log.error("request %s failed while streaming:\n%s", rid, traceback.format_exc())
        yield _sse_error(f"internal error (request id {rid})", "internal_error", 500, rid)
        yield "data: [DONE]\n\n"
        return
    lucid = {"request_id": rid, "plan": echo["methods"], "sampling": {"seed": echo["seed"]}, **_choice_extras(result)}
    yield chunk({}, result["finish_reason"], lucid=lucid)
    if (req.stream_options or {}).get("include_usage"):
        p, c = result["prompt_tokens"], result["completion_tokens"]
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": mid,
            "choices": [],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        }
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def _sse_error(message: str, type_: str, status: int, rid: str) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': type_, 'code': status, 'request_id': rid}})}\n\n"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lucid-vlm")
    except Exception:
        return "0"
