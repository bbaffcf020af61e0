"""One model replica: loads a checkpoint once, answers batches of (image, question) with given methods.

The same class runs in this process (`lucid eval --workers 0`, `lucid testbed eval`) or as a Ray actor
(`ray.remote(Worker)`, one per worker, declaring `num_cpus` = the torch threads it uses). A batch
payload is plain data: questions, images (file paths or PIL images), max_new_tokens, the method set as
`to_json` dicts and the decoding settings; the reply is one dict per sample (answer, finish reason,
token count, timings).
"""

from __future__ import annotations

import os
import platform
import socket
import time


class Worker:
    def __init__(self, model: str, threads: int | None = None, device: str | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        t = time.perf_counter()
        from vlm import load_vlm

        self.vlm = load_vlm(model, device=device)
        self.load_s = time.perf_counter() - t
        self._methods: dict[str, tuple] = {}
        self._cache: dict = {}  # what a task loads once per replica (localization heads, a SAM)

    def info(self) -> dict:
        """Where this replica runs: host, pid, torch threads, device, CPU / GPU model, load time."""
        import torch

        from lucid_kernels.dispatch import requested_backend

        dev = self.vlm.device
        gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "device": str(dev),
            "dtype": str(self.vlm.dtype).replace("torch.", ""),
            "gpu": gpu,
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "edited_attention_backend": _backend(requested_backend(), dev.type),
            "load_s": round(self.load_s, 3),
        }

    def run(self, payload: dict) -> list[dict]:
        """One reply per sample of the batch, by the suite's task (`TASKS`; default "generate")."""
        return TASKS[payload.get("task", "generate")](self, payload)

    def methods(self, specs: list[dict]) -> tuple:
        key = repr(specs)
        if key not in self._methods:
            from mitigation.methods import parse_methods

            self._methods[key] = parse_methods(specs)
        return self._methods[key]

    def cached(self, key, load):
        """`load()` once per replica (per `key`), then the same object."""
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]


def generate_task(worker: Worker, payload: dict) -> list[dict]:
    """Answer each question: `vlm.generate` with the batch's method set and decoding settings."""
    from vlm import SamplingParams, build_inputs, generate

    sampling = SamplingParams(
        max_new_tokens=int(payload["max_new_tokens"]),
        temperature=float(payload.get("temperature", 0.0)),
        seed=int(payload.get("seed", 0)),
    )
    t = time.perf_counter()
    inputs = build_inputs(worker.vlm, list(payload["images"]), list(payload["questions"]))
    gens = generate(worker.vlm, inputs, sampling, methods=worker.methods(payload["methods"]))
    batch_s = time.perf_counter() - t
    return [
        {
            "answer": g.text,
            "finish_reason": g.finish_reason,
            "n_tokens": len(g.token_ids),
            "timings": {**g.timings.to_dict(), "batch_s": round(batch_s, 6)},
            "worker_pid": os.getpid(),
            **({"extras": extras} if (extras := g.extra_records()) else {}),
        }
        for g in gens
    ]


def _no_methods(payload: dict) -> None:
    if payload.get("methods"):
        raise ValueError(f"the {payload['task']} task measures the model without methods; got {payload['methods']}")


def _heads(worker: Worker):
    """The checkpoint's localization heads (`grounding.load_or_discover`), once per replica."""
    from grounding import load_or_discover

    return worker.cached("heads", lambda: load_or_discover(worker.vlm))


def locate_task(worker: Worker, payload: dict) -> list[dict]:
    """`grounding.locate` each question (a phrase) in its image with the checkpoint's localization heads
    and the batch's `LocateParams` (payload["locate"]); one prefill per batch. The answer is the
    location: box and point in original pixels (unrounded), score, heads."""
    from grounding import LocateParams, locate_batch

    _no_methods(payload)
    selection = _heads(worker)
    images, queries = list(payload["images"]), list(payload["questions"])
    t = time.perf_counter()
    locs = locate_batch(worker.vlm, images, queries, selection, LocateParams(**payload["locate"]), len(queries))
    batch_s = time.perf_counter() - t
    return [
        {
            "answer": {
                "box": [float(v) for v in loc.box],
                "point": [float(v) for v in loc.point],
                "score": float(loc.score),
                "heads": [[int(a), int(b)] for a, b in loc.heads],
            },
            "finish_reason": "located",
            "n_tokens": 0,
            "timings": {"batch_s": round(batch_s, 6)},
            "worker_pid": os.getpid(),
        }
        for loc in locs
    ]


def _segmenter(worker: Worker, spec: str):
    """The SAM of a `load_segmenter` spec, once per replica."""
    from grounding.sam import load_segmenter

    return worker.cached(("sam", spec), lambda: load_segmenter(spec, device=worker.vlm.device))


def segment_task(worker: Worker, payload: dict) -> list[dict]:
    """Text query -> locate -> SAM (`grounding.segment.segment_query`), per scene of the batch (the
    consecutive samples with the same payload["scenes"] entry share one prefill and one image
    embedding). The SAM (payload["sam"], a `load_segmenter` spec) is loaded once per replica. The
    answer: the mask (COCO RLE), its box, SAM's score, the prompted pixel and the located box.
    With payload["method"] (a `read:...` / `vl-sam:...` spec) READ's or VL-SAM's path instead
    (`read_segment_task`, `vlsam_segment_task`)."""
    from grounding import LocateParams
    from grounding.segment import attention_prompt, encode_rle, segment_query

    _no_methods(payload)
    method = payload.get("method")
    if method is not None:
        return (read_segment_task if method.partition(":")[0] == "read" else vlsam_segment_task)(worker, payload)
    selection = _heads(worker)
    segmenter = _segmenter(worker, payload["sam"])
    params = LocateParams(**payload["locate"])
    images, queries, scenes = payload["images"], payload["questions"], payload["scenes"]
    t = time.perf_counter()
    objects, acct = [], {"locate_s": 0.0, "sam_s": 0.0}
    i = 0
    while i < len(queries):
        j = i + 1
        while j < len(queries) and scenes[j] == scenes[i]:
            j += 1
        objs, timings = segment_query(
            worker.vlm, segmenter, images[i], queries[i:j], selection, params, payload["prompt"]
        )
        objects += objs
        for k in acct:
            acct[k] += timings[k]
        i = j
    batch_s = time.perf_counter() - t
    replies = []
    for o in objects:
        pixel = attention_prompt(o.location, "point").points[0]  # the pixel under the located point
        replies.append(
            {
                "answer": {
                    "mask": encode_rle(o.mask),
                    "box": [float(v) for v in o.box],
                    "score": float(o.score),
                    "pixel": [float(v) for v in pixel],
                    "located_box": [float(v) for v in o.location.box],
                },
                "finish_reason": "segmented",
                "n_tokens": 0,
                "timings": {**{k: round(v, 6) for k, v in acct.items()}, "batch_s": round(batch_s, 6)},
                "worker_pid": os.getpid(),
            }
        )
    return replies


def _first_positive(points) -> list[float] | None:
    return next(([float(x), float(y)] for x, y, lab in points if lab == 1), None)


def _segment_reply(o, timings: dict, batch_s: float) -> dict:
    """One object of READ's / VL-SAM's referring path (None: no candidate) as a segment reply."""
    from grounding.segment import encode_rle

    answer = (
        {"mask": None, "box": [0.0, 0.0, 0.0, 0.0], "score": 0.0, "pixel": None}
        if o is None
        else {
            "mask": encode_rle(o.mask),
            "box": [float(v) for v in o.box],
            "score": float(o.score),
            "pixel": _first_positive(o.points),  # the point scored as "pointing"
            "points": [[float(x), float(y), int(lab)] for x, y, lab in o.points],
        }
    )
    return {
        "answer": answer,
        "finish_reason": "segmented",
        "n_tokens": 0,
        "timings": {**{k: round(v, 6) for k, v in timings.items()}, "batch_s": round(batch_s, 6)},
        "worker_pid": os.getpid(),
    }


def read_segment_task(worker: Worker, payload: dict) -> list[dict]:
    """READ's similarity-as-points (`grounding.read`, payload["method"] a `read:...` spec): one forward for
    the batch's queries (`read_batch`), then SAM per query (the image embedding cached per scene), as
    `testbed.studies.sam_eval.read_to_sam` runs it."""
    from grounding.read import parse_read, read_batch, read_prompt
    from grounding.segment import segmented_object

    params = parse_read(payload["method"])
    segmenter = _segmenter(worker, payload["sam"])
    images, queries = payload["images"], payload["questions"]
    t = time.perf_counter()
    results = read_batch(worker.vlm, list(images), list(queries), params)
    t1 = time.perf_counter()
    objects = []
    for image, res in zip(images, results):
        prompt = read_prompt(res, params)
        objects.append(segmented_object(res.query, prompt, segmenter.segment(image, [prompt])[0], "read", res))
    t2 = time.perf_counter()
    return [_segment_reply(o, {"read_s": t1 - t, "sam_s": t2 - t1}, t2 - t) for o in objects]


def vlsam_segment_task(worker: Worker, payload: dict) -> list[dict]:
    """VL-SAM referring (`grounding.vlsam.segment_vlsam`, payload["method"] a `vl-sam:...` spec) per query:
    its best candidate, or none, as `testbed.studies.sam_eval.vlsam_to_sam` runs it."""
    from grounding.vlsam import parse_vlsam, segment_vlsam

    params = parse_vlsam(payload["method"])
    segmenter = _segmenter(worker, payload["sam"])
    t = time.perf_counter()
    found, acct = [], {"vlsam_maps_s": 0.0, "sam_s": 0.0}
    for image, query in zip(payload["images"], payload["questions"]):
        objects, timings = segment_vlsam(worker.vlm, segmenter, image, query, params)
        found.append(objects[0] if objects else None)
        for k in acct:
            acct[k] += timings[k]
    batch_s = time.perf_counter() - t
    return [_segment_reply(o, acct, batch_s) for o in found]


def detect_task(worker: Worker, payload: dict) -> list[dict]:
    """Open-ended VL-SAM (`lucid segment IMAGE --all`; payload["method"] a `vl-sam:...` spec) per image:
    the object maps, SAM refinement and NMS as `testbed.studies.sam_eval.vlsam_open_ended` runs them. The
    answer: every object (label, SAM's score, box, COCO RLE mask), best first, and the names the model
    gave before NMS."""
    from grounding.sam import image_array
    from grounding.segment import encode_rle
    from grounding.vlsam import merge, object_maps, parse_vlsam, refine

    _no_methods(payload)
    params = parse_vlsam(payload["method"])
    segmenter = _segmenter(worker, payload["sam"])
    replies = []
    for image in payload["images"]:
        t = time.perf_counter()
        maps = object_maps(worker.vlm, image, None, params)
        t1 = time.perf_counter()
        objects = merge(refine(segmenter, image_array(image), maps, params), params) if maps else []
        t2 = time.perf_counter()
        replies.append(
            {
                "answer": {
                    "objects": [
                        {
                            "label": o.label,
                            "score": float(o.score),
                            "box": [float(v) for v in o.box],
                            "mask": encode_rle(o.mask),
                        }
                        for o in objects
                    ],
                    "named": sorted({m.label for m in maps}),
                },
                "finish_reason": "detected",
                "n_tokens": 0,
                "timings": {"vlsam_maps_s": round(t1 - t, 6), "sam_s": round(t2 - t1, 6)},
                "worker_pid": os.getpid(),
            }
        )
    batch_s = sum(r["timings"]["vlsam_maps_s"] + r["timings"]["sam_s"] for r in replies)
    for r in replies:
        r["timings"]["batch_s"] = round(batch_s, 6)
    return replies


# task name -> function(worker, payload) -> replies ({"answer", "finish_reason", "n_tokens", "timings"} per
# sample). A suite whose samples are not generated answers (e.g. a testbed-locate suite: boxes and points
# from the localization heads) sets `Suite.task` and registers its function here.
TASKS = {"generate": generate_task, "locate": locate_task, "segment": segment_task, "detect": detect_task}


def _backend(requested: str, device: str) -> str:
    """What serves edited attention calls: LUCID_KERNELS, with `auto` resolved for the device."""
    if requested != "auto":
        return requested
    return "triton (auto on cuda)" if device == "cuda" else "reference (auto on cpu)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
