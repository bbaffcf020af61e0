"""The REST API's FastAPI layer over the real model, in-process (`serve.runners.LocalBackend`, no Ray):
OpenAI shapes, answers equal to the library's, interventions validated by the registry, grounding,
streaming, segmentation, every error class (and the server answering again after each), metrics, the
OpenAPI document. The same app over Ray Serve is tested in tests/test_serve_ray.py."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve.api import make_app
from serve.config import AppConfig
from serve.runners import LocalBackend

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "testbed" / "examples" / "scene.png"
Q = "Is there a red circle in the image?"


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


URL = data_url(SCENE.read_bytes())


def body(question: str = Q, url: str = URL, **kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return {"model": "testbed", "messages": [{"role": "user", "content": content}], **kw}


@pytest.fixture(scope="module")
def backend():
    return LocalBackend(AppConfig())


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "scene.png").write_bytes(SCENE.read_bytes())
    outside = root.parent / "outside.png"
    outside.write_bytes(SCENE.read_bytes())
    return root


@pytest.fixture(scope="module")
def client(backend, image_root):
    cfg = AppConfig(image_root=str(image_root), max_body_bytes=4 * 2**20, max_image_bytes=2 * 2**20)
    return TestClient(make_app(cfg, backend))


def solo(backend, question: str = Q, methods=(), max_new_tokens: int = 256, **sampling):
    """The library's answer (lucid.answer), for comparison."""
    from lucid.answer import ask
    from mitigation.methods import parse_methods
    from vlm import SamplingParams

    pil = Image.open(SCENE).convert("RGB")
    ans = ask(
        backend.vlm.engine.vlm,
        pil,
        question,
        SamplingParams(max_new_tokens=max_new_tokens, **sampling),
        methods=parse_methods(list(methods)),
        fit_context=True,
    )
    return ans.generation.text


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def err(r, status: int) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert e["code"] == status and e["request_id"] == r.headers["x-request-id"]
    return e


# ------------------------------------------------------------------------------------------ chat


def test_chat_has_openai_shape_and_the_library_answer(client, backend):
    j = ok(client.post("/v1/chat/completions", json=body()))
    assert j["object"] == "chat.completion" and j["model"] == "testbed" and j["id"].startswith("chatcmpl-")
    (choice,) = j["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] == solo(backend)
    u = j["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["prompt_tokens"] > 144
    assert 0.0 <= j["lucid"]["risk"] <= 1.0  # the checkpoint ships a fitted risk model
    assert j["lucid"]["plan"] == [] and j["lucid"]["timings"]["prefill_s"] > 0


def test_interventions_are_resolved_and_change_the_computation_as_the_library_does(client, backend):
    q = "Describe the image."
    spec = [{"name": "vhr", "params": {"alpha": 1.5}}, {"name": "pai", "params": {"gamma": 1.0}}]
    j = ok(client.post("/v1/chat/completions", json=body(q, interventions=spec, max_tokens=24)))
    plan = j["lucid"]["plan"]
    assert [m["name"] for m in plan] == ["vhr", "pai"]
    assert plan[0]["params"]["alpha"] == 1.5 and "outlier_rule" in plan[0]["params"]  # defaults filled in
    assert j["choices"][0]["message"]["content"] == solo(backend, q, ["vhr:alpha=1.5", "pai:gamma=1.0"], 24)


def test_greedy_n_and_seeded_sampling(client, backend):
    j = ok(client.post("/v1/chat/completions", json=body("Describe the image.", n=2, max_tokens=12)))
    assert len(j["choices"]) == 2 and j["choices"][0]["message"] == j["choices"][1]["message"]
    kw = {"temperature": 1.0, "seed": 7, "max_tokens": 12}
    a = ok(client.post("/v1/chat/completions", json=body("Describe the image.", **kw)))
    b = ok(client.post("/v1/chat/completions", json=body("Describe the image.", **kw, n=2)))
    assert a["lucid"]["sampling"]["seed"] == 7
    text = a["choices"][0]["message"]["content"]
    assert text == solo(backend, "Describe the image.", max_new_tokens=12, temperature=1.0, seed=7)
    assert b["choices"][0]["message"]["content"] == text  # choice i samples with seed + i
    assert b["choices"][1]["message"]["content"] == solo(
        backend, "Describe the image.", max_new_tokens=12, temperature=1.0, seed=8
    )


def test_grounding_locates_segments_and_draws(client):
    g = {"locate": True, "masks": True, "heatmap": True}
    j = ok(client.post("/v1/chat/completions", json=body("Is there a red circle in the image?", grounding=g)))
    L = j["lucid"]
    (obj,) = L["located"]  # the testbed vocabulary: the object the question names
    assert obj["query"] == "the red circle" and len(obj["box"]) == 4 and len(obj["point"]) == 2
    from grounding.segment import decode_rle

    mask = decode_rle(obj["mask"])
    assert mask.shape == (192, 192) and mask.sum() > 50
    png = base64.b64decode(L["heatmap"]["png"])
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert np.isclose(np.sum(L["heatmap"]["values"]), 1.0, atol=1e-3)
    ex = ok(client.post("/v1/chat/completions", json=body(grounding={"locate": True, "queries": ["the blue square"]})))
    assert [o["query"] for o in ex["lucid"]["located"]] == ["the blue square"]


def test_streaming_gives_the_same_text_in_openai_chunks(client):
    plain = ok(client.post("/v1/chat/completions", json=body("Describe the image.", max_tokens=20)))
    chunks = []
    with client.stream(
        "POST", "/v1/chat/completions", json=body("Describe the image.", max_tokens=20, stream=True)
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == plain["choices"][0]["message"]["content"]
    assert len(events) > 5  # token by token, not one piece
    assert events[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert "risk" in events[-1]["lucid"]


# ------------------------------------------------------------------------------------------ segment


def test_segment_prompts_and_query(client, backend):
    j = ok(client.post("/v1/segment", json={"image": URL, "points": [[40, 170, 1]]}))
    (o,) = j["objects"]
    assert set(o) >= {"label", "score", "box", "mask", "points"} and j["image_size"] == [192, 192]
    from grounding.segment import decode_rle, segment_prompts

    ref = segment_prompts(backend.sam.segmenter, Image.open(SCENE).convert("RGB"), [(40, 170, 1)])[0]
    assert np.array_equal(decode_rle(o["mask"]), ref.mask)  # what `lucid segment --point` gives
    j = ok(client.post("/v1/segment", json={"image": URL, "query": "the red circle"}))
    assert j["objects"][0]["label"] == "the red circle" and j["heads"]
    boxes = ok(client.post("/v1/segment", json={"image": URL, "boxes": [[0, 0, 100, 100], [90, 90, 191, 191]]}))
    assert len(boxes["objects"]) == 2


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "patch, status, words",
    [
        ({"interventions": [{"name": "nope"}]}, 400, "valid: carve, dyvte, magnifier, pai, paint, var, vcd, vhr"),
        ({"interventions": [{"name": "var", "params": {"p": 7}}]}, 400, "p must be"),
        ({"interventions": [{"name": "vhr", "params": {"nope": 1}}]}, 400, "alpha"),
        ({"temperature": -1}, 422, "temperature"),
        ({"messages": []}, 422, "messages"),
        ({"max_tokens": 10**6}, 400, "max_tokens"),
        ({"n": 99}, 400, "n 99"),
        ({"model": "gpt-4o"}, 404, "not served"),
        ({"stream": True, "n": 2}, 400, "stream"),
    ],
)
def test_bad_requests_name_the_problem(client, patch, status, words):
    e = err(client.post("/v1/chat/completions", json={**body(), **patch}), status)
    assert words in e["message"], e


def test_422_carries_field_paths(client):
    b = body()
    b["messages"][0]["content"][0] = {"type": "image_url"}  # no image_url
    r = client.post("/v1/chat/completions", json=b)
    err(r, 422)
    assert any(d["loc"][:3] == ["body", "messages", 0] for d in r.json()["detail"])
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    err(r, 422)


def test_messages_that_llava_cannot_take(client):
    two = body()
    two["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": URL}})
    assert "exactly one image" in err(client.post("/v1/chat/completions", json=two), 400)["message"]
    none = {"messages": [{"role": "user", "content": "hi"}]}
    assert "exactly one image" in err(client.post("/v1/chat/completions", json=none), 400)["message"]
    assert "<image>" in err(client.post("/v1/chat/completions", json=body("what <image> is")), 400)["message"]
    user = body()["messages"][0]
    cases = [
        ([{"role": "assistant", "content": "Hi"}, user], "alternate"),
        ([user, {"role": "assistant", "content": "Yes"}], "end with a user message"),
        ([user, {"role": "user", "content": "Sure?"}], "alternate"),
        ([user, {"role": "assistant", "content": "Yes"}, user], "first user message"),
        ([user, {"role": "system", "content": "late"}], "before the conversation"),
    ]
    for messages, words in cases:
        e = err(client.post("/v1/chat/completions", json={"messages": messages}), 400)
        assert words in e["message"], (words, e)


def test_a_multi_turn_conversation_is_answered_as_the_library_does(client, backend):
    """System prompt, a first user turn with the image, the assistant's answer, a follow-up question."""
    from vlm import SamplingParams, build_inputs, generate

    history = (("user", "Is there a red circle in the image?"), ("assistant", "Yes"))
    messages = [
        {"role": "system", "content": "A chat about one image."},
        body(history[0][1])["messages"][0],
        {"role": "assistant", "content": history[1][1]},
        {"role": "user", "content": [{"type": "text", "text": "Describe the image."}]},
    ]
    j = ok(client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 20}))
    vlm = backend.vlm.engine.vlm
    inputs = build_inputs(
        vlm, [Image.open(SCENE).convert("RGB")], ["Describe the image."], "A chat about one image.", history
    )
    ref = generate(vlm, inputs, SamplingParams(max_new_tokens=20))[0]
    assert j["choices"][0]["message"]["content"] == ref.text
    assert j["usage"]["prompt_tokens"] == int(inputs.attention_mask.sum())
    solo_turn = ok(client.post("/v1/chat/completions", json=body("Describe the image.", max_tokens=20)))
    assert j["usage"]["prompt_tokens"] > solo_turn["usage"]["prompt_tokens"]  # the history is in the prompt


def test_images_refused_with_the_right_status(client, image_root):
    cases = [
        (data_url(b"not an image at all"), 400, "cannot decode"),
        ("data:image/png;base64,@@@", 400, "base64"),
        ("data:image/png,rawdata", 400, "base64"),
        ("https://example.com/x.png", 400, "remote image URLs are refused"),
        ("ftp://example.com/x.png", 400, "scheme"),
        ("../outside.png", 400, "outside the server's image root"),
        (str(image_root.parent / "outside.png"), 400, "outside the server's image root"),
        ("missing.png", 400, "not found"),
    ]
    for url, status, words in cases:
        assert words in err(client.post("/v1/chat/completions", json=body(url=url)), status)["message"], url
    ok(client.post("/v1/chat/completions", json=body(url="scene.png")))  # under the root: served
    ok(client.post("/v1/chat/completions", json=body(url=f"file://{image_root / 'scene.png'}")))


def test_oversized_images_and_bodies_get_413(client):
    noise = np.random.default_rng(0).integers(0, 255, (900, 900, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")  # ~2.4 MB of incompressible pixels > 2 MiB limit
    e = err(client.post("/v1/chat/completions", json=body(url=data_url(buf.getvalue()))), 413)
    assert "over the limit" in e["message"]
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")  # 144 M pixels in a few hundred kB
    assert len(bomb.getvalue()) < 2 * 2**20
    e = err(client.post("/v1/chat/completions", json=body(url=data_url(bomb.getvalue()))), 413)
    assert "pixels" in e["message"]
    big = body(question="x" * (5 * 2**20))
    assert "request body" in err(client.post("/v1/chat/completions", json=big), 413)["message"]
    ok(client.post("/v1/chat/completions", json=body()))  # and the server goes on


def test_segment_errors(client):
    assert "nothing to segment" in err(client.post("/v1/segment", json={"image": URL}), 400)["message"]
    e = err(client.post("/v1/segment", json={"image": URL, "points": [[500, 5, 1]]}), 400)
    assert "outside" in e["message"] or "500" in e["message"]
    err(client.post("/v1/segment", json={"image": URL, "points": [[5, 5, 3]]}), 422)
    both = {"image": URL, "query": "the red circle", "boxes": [[0, 0, 5, 5]]}
    assert "either" in err(client.post("/v1/segment", json=both), 400)["message"]


def test_an_internal_failure_is_a_500_with_a_request_id_and_the_server_goes_on(backend, tmp_path, caplog):
    broken = tmp_path / "sam_vit_b.pth"
    broken.write_bytes(b"this is not a checkpoint")  # a real misconfiguration: SAM fails when first used
    cfg = AppConfig(sam=f"vit_b:{broken}")
    c = TestClient(make_app(cfg, LocalBackend(cfg, vlm=backend.vlm)))
    with caplog.at_level("ERROR", logger="lucid.serve"):
        r = c.post("/v1/segment", json={"image": URL, "points": [[40, 170, 1]]})
    e = err(r, 500)
    assert e["request_id"] in e["message"] and e["request_id"] in caplog.text  # the id is in the log too
    assert "Traceback" in caplog.text
    ok(c.post("/v1/chat/completions", json=body()))  # other routes still answer


# ------------------------------------------------------------------------------------------ listings


def test_interventions_listing_is_the_registry(client):
    from mitigation.methods.registry import names, request_schema, schema

    j = ok(client.get("/v1/interventions"))
    assert [d["name"] for d in j["data"]] == names()
    for d in j["data"]:
        assert d["schema"] == schema(d["name"]) and d["paper"]
    assert j["request_schema"] == request_schema()
    doc = ok(client.get("/openapi.json"))
    reg = {k: v for k, v in request_schema().items() if k != "$schema"}
    assert doc["components"]["schemas"]["Intervention"]["oneOf"] == reg["oneOf"]
    assert {"/v1/chat/completions", "/v1/segment", "/v1/evals", "/v1/models"} <= set(doc["paths"])


def test_models_health_and_metrics(client):
    m = ok(client.get("/v1/models"))
    assert m["data"][0]["id"] == "testbed" and m["data"][0]["lucid"]["layers"] == 6
    assert ok(client.get("/healthz"))["status"] == "ok" and ok(client.get("/readyz"))["ready"]
    client.post("/v1/chat/completions", json={**body(), "interventions": [{"name": "nope"}]})
    text = client.get("/metrics").text
    assert 'lucid_requests_total{http_method="POST",method="none",route="/v1/chat/completions",status="200"}' in text
    assert 'lucid_request_errors_total{method="nope",route="/v1/chat/completions",status="400"}' in text
    assert "lucid_request_latency_seconds_bucket" in text
    assert client.get("/").headers["content-type"].startswith("text/html")


def test_evals_without_a_dashboard_are_503(client):
    e = err(client.post("/v1/evals", json={"suites": ["testbed-pope"]}), 503)
    assert "not enabled" in e["message"]


def test_one_engine_batch_with_mixed_plans_gives_each_job_its_solo_answer(backend):
    """What a replica does with one @serve.batch: jobs of different plans, questions, sampling and budgets
    in one call; each gets what it gets alone."""
    from serve.engine import ChatJob

    image = np.asarray(Image.open(SCENE).convert("RGB"))
    vhr = ({"name": "vhr", "params": {"alpha": 1.5}},)
    jobs = [
        ChatJob(image=image, question="Describe the image.", max_new_tokens=16, fit_context=False),
        ChatJob(image=image, question=Q, max_new_tokens=16, fit_context=False, methods=vhr),
        ChatJob(image=image, question="Describe the image.", max_new_tokens=16, fit_context=False, methods=vhr),
        ChatJob(image=image, question="How many circles are there?", max_new_tokens=16, fit_context=False),
        ChatJob(image=image, question="Describe the image.", max_new_tokens=9, temperature=0.9, seed=3),
        ChatJob(image=image, question="what <image> is", max_new_tokens=8),  # refused alone, harms nobody
    ]
    together = backend.vlm.engine.run(jobs)
    assert "error" in together[-1] and "<image>" in together[-1]["error"]["message"]
    sizes = [r["timings"]["batch_size"] for r in together[:-1]]
    assert sizes == [2, 2, 2, 2, 1]  # grouped by plan: baseline x2, vhr x2, the sampled one alone
    for job, res in zip(jobs[:-1], together[:-1]):
        (alone,) = backend.vlm.engine.run([job])
        assert res["text"] == alone["text"] and res["finish_reason"] == alone["finish_reason"], job.question


def test_remote_images_only_from_allowed_prefixes(backend, tmp_path):
    import functools
    import http.server
    import threading

    (tmp_path / "pub").mkdir()
    (tmp_path / "pub" / "scene.png").write_bytes(SCENE.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_port}"
        cfg = AppConfig(allow_remote=[f"{base}/pub/"])
        c = TestClient(make_app(cfg, backend))
        got = ok(c.post("/v1/chat/completions", json=body(url=f"{base}/pub/scene.png")))
        assert got["choices"][0]["message"]["content"] == solo(backend)
        assert "refused" in err(c.post("/v1/chat/completions", json=body(url=f"{base}/other.png")), 400)["message"]
        assert (
            "cannot fetch" in err(c.post("/v1/chat/completions", json=body(url=f"{base}/pub/no.png")), 400)["message"]
        )
    finally:
        srv.shutdown()


def test_serve_build_writes_a_deployable_config(tmp_path):
    """Ray's own `serve build` imports the app (serve.app:app) and writes a config `serve deploy` takes,
    with the resources Lucid declares per deployment; `lucid serve` points such a file at the builder."""
    import subprocess
    import sys

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.config import ConfigError, read_config

    out = tmp_path / "built.yaml"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "build", "serve.app:app", "-o", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = yaml.safe_load(out.read_text())
    ServeDeploySchema(**doc)
    deps = {d["name"]: d for d in doc["applications"][0]["deployments"]}
    assert deps["VLMServer"]["ray_actor_options"]["num_cpus"] == AppConfig().vlm_cpus
    assert deps["Api"]["ray_actor_options"]["num_cpus"] == AppConfig().ingress_cpus
    with pytest.raises(ConfigError, match="serve deploy"):
        read_config(out)
