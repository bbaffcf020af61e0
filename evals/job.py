"""Evaluation jobs: the matrix models x method sets x suites, answered by model replicas on Ray.

    spec = JobSpec(suites=("testbed-pope",), methods=("vhr",), out=Path("out/eval"), workers=2)
    results = run_job(spec)          # writes out/eval/samples/..., results.json, report.md

How a job runs:

1. **Plan** (no torch, nothing started): every suite is built and its samples drawn (`--limit`: the
   first N of each split), images checked (the first missing one is an error naming it), checkpoints
   inspected, method sets parsed. A *cell* is (model, method set, suite); the baseline (no method) is
   always a method set unless `baseline=False`. A suite that methods do not apply to
   (`Suite.uses_methods = False`: testbed-locate, testbed-segment) has the baseline cell only.
2. **Resume**: each cell owns `DIR/samples/<model>/<method set>/<suite>.jsonl`, one line per answered
   sample. Lines already there are kept (a torn last line from a kill is cut off); a file written by
   another configuration of the cell (other weights, parameters, decoding, suite files) is an error.
3. **Batches**: per cell and split, the samples in order are cut into batches of `batch_size`; a batch
   whose samples are all on disk is skipped, any other batch is answered whole (so a batch has the
   same rows on every run, whatever was killed when). Batches of all cells of a model go into one
   queue that the model's workers drain (at most 2 batches in flight per worker).
4. **Workers**: `workers` Ray actors per model, each `num_cpus=cpus_per_worker` (and `num_gpus`) and
   as many torch threads, so replicas never oversubscribe the CPUs (a job needing more CPUs than the
   cluster has is refused at start). A killed actor is restarted and its batches retried (3 times).
   `workers=0` answers in this process, without Ray.
5. **Write**: the driver judges each answer (`Suite.judge`) and appends its record to the cell's file
   as soon as its batch returns (flushed and fsynced per batch).
6. **Report**: metrics with bootstrap intervals and paired tests against the baseline, from the
   records on disk (`evals.report`): `results.json` and `report.md` with charts.

Determinism: a sample's answer depends only on its batch's rows (greedy decoding, or per-row seeded
generators), batches do not depend on the number of workers, and every worker uses the same number
of torch threads; `generate` gives left-padded batch rows the answer they get alone (tested), so the
per-sample answers are also the same for any batch size.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from evals.paths import slug
from evals.suites import Data, Sample, Suite, build, limit_per_split
from lucid.errors import InputError
from lucid.ray_client import ray_auth, ray_refusal

MAX_IN_FLIGHT = 2  # batches queued per worker: the next batch is ready when one returns
TASK_RETRIES = 3


class JobError(InputError):
    """A job that cannot run as asked: resources, an --out written by another configuration, a failed worker."""


@dataclass(frozen=True)
class JobSpec:
    suites: tuple[str, ...]
    out: Path | None = None  # None: keep records in memory only (the `lucid testbed eval` alias)
    models: tuple[str, ...] = ("testbed",)
    methods: tuple = ()  # method sets besides the baseline, each "m1+m2:k=v" or a tuple of specs (composed in order)
    baseline: bool = True
    limit: int | None = None  # first N samples of each split
    workers: int = 1  # 0: this process, no Ray
    batch_size: int = 8
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads: int | None = -1  # torch threads per worker; -1: int(cpus_per_worker); None: leave as is
    address: str | None = None  # None: a local Ray instance (or the cluster of a submitted job)
    device: str | None = None
    data: Data = Data()
    temperature: float = 0.0
    seed: int = 0
    bootstrap: int = 1000
    progress: bool = True

    def torch_threads(self) -> int | None:
        if self.threads is None:
            return None
        return self.threads if self.threads > 0 else max(1, int(self.cpus_per_worker))

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "seed": self.seed, "top_p": 1.0, "top_k": 0}


@dataclass
class Model:
    source: str
    name: str
    path: Path
    weights_sha256: str


@dataclass
class Cell:
    model: Model
    label: str  # method set label: "baseline", "vhr", "paint:heads=uniform+vhr:alpha=1.5"
    methods: list[dict]  # to_json of each method, resolved parameters
    suite: Suite
    samples: list[Sample]
    key: str = ""  # hash of everything the answers depend on
    path: Path | None = None
    done: dict[str, dict] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model.name} · {self.label} · {self.suite.spec}"


@dataclass
class Plan:
    spec: JobSpec
    models: list[Model]
    method_sets: list[tuple[str, list[dict]]]
    suites: list[Suite]
    cells: list[Cell]


# ------------------------------------------------------------------------------------------------ plan


def make_plan(spec: JobSpec) -> Plan:
    """Everything checked, nothing started (see the module docstring)."""
    from vlm.checkpoint import TESTBED, inspect_checkpoint, weights_hash

    if not spec.suites:
        raise JobError("no suite given: --suite NAME (see `lucid eval --list`)")
    if spec.batch_size < 1:
        raise JobError(f"--batch-size must be >= 1, got {spec.batch_size}")
    if spec.workers < 0:
        raise JobError(f"--workers must be >= 0 (0: this process, no Ray), got {spec.workers}")
    if spec.limit is not None and spec.limit < 1:
        raise JobError(f"--limit must be >= 1, got {spec.limit}")
    if spec.cpus_per_worker <= 0 or spec.gpus_per_worker < 0:
        raise JobError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
    if spec.workers and not (spec.address or os.environ.get("RAY_ADDRESS")):
        _check_need(spec, os.cpu_count() or 1, None, "this machine (a local Ray instance)")
    from mitigation.methods import BASELINE, parse_method_set  # torch: after the cheap checks above

    sets = ([(BASELINE, [])] if spec.baseline else []) + [parse_method_set(t) for t in spec.methods]
    sets = list({label: (label, ms) for label, ms in sets}.values())
    if not sets:
        raise JobError("nothing to run: --no-baseline and no --method")
    infos = {m: inspect_checkpoint(m) for m in dict.fromkeys(spec.models)}  # CheckpointError before any work
    suites = []
    for s in dict.fromkeys(spec.suites):
        suite = build(s, spec.data)
        suites.append(suite)
    fixed = [s.name for s in suites if not s.uses_methods]
    if fixed and all(methods for _, methods in sets):
        raise JobError(
            f"suite {fixed[0]} measures the model without methods and runs in the baseline cell only; "
            f"drop --no-baseline"
        )
    sample_lists = []
    for suite in suites:
        samples = limit_per_split(suite.samples(), spec.limit)
        suite.check(samples)
        sample_lists.append(samples)
    if spec.out is not None:
        spec.out.mkdir(parents=True, exist_ok=True)
    models = []
    for m, info in infos.items():
        name = TESTBED if m == TESTBED else info.path.name
        models.append(Model(m, name, info.path, weights_hash(info.path)))
    if len({m.name for m in models}) != len(models):
        raise JobError("two --model directories have the same name; the results are keyed by name")
    cells = []
    for model in models:
        for label, methods in sets:
            for suite, samples in zip(suites, sample_lists):
                if methods and not suite.uses_methods:
                    continue  # a method-free suite (testbed-locate / -segment): the baseline cell only
                cell = Cell(model, label, methods, suite, samples)
                cell.key = _cell_key(cell, spec)
                if spec.out is not None:
                    cell.path = spec.out / "samples" / slug(model.name) / slug(label) / f"{slug(suite.spec)}.jsonl"
                cells.append(cell)
    return Plan(spec, models, sets, suites, cells)


def _cell_key(cell: Cell, spec: JobSpec) -> str:
    what = {
        "model": str(cell.model.path),
        "weights_sha256": cell.model.weights_sha256,
        "methods": cell.methods,
        "suite": cell.suite.config(),
        "sampling": spec.sampling(),
        "device": spec.device,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- store


def read_records(path: Path, key: str | None = None) -> dict[str, dict]:
    """The records of a cell file by sample id. A torn last line (a kill mid-write) is cut off the
    file; a record of another configuration (`key`) is a JobError."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    out: dict[str, dict] = {}
    good = 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if not line.strip():
            if not last:
                good += len(line) + 1
            continue
        try:
            rec = json.loads(line)
            if last:  # no newline after it: the write may have stopped inside the line
                raise ValueError
        except ValueError:
            if last or all(not x.strip() for x in lines[i + 1 :]):
                with path.open("r+b") as fh:
                    fh.truncate(good)
                break
            raise JobError(
                f"{path}:{i + 1} is not a JSON record; the file is damaged (delete it to redo the cell)"
            ) from None
        if key is not None and rec.get("cell") != key:
            raise JobError(
                f"{path} holds answers of another configuration of this cell (model weights, method "
                f"parameters, suite files or decoding differ); use another --out, or delete the file to redo it"
            )
        out[rec["id"]] = rec
        good += len(line) + 1
    return out


def _append(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, default=str) + "\n" for r in records)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    cell: int
    samples: list[Sample]

    def payload(self, cell: Cell, spec: JobSpec) -> dict:
        return {
            "task": cell.suite.task,
            "questions": [s.question for s in self.samples],
            "images": [s.image for s in self.samples],
            "max_new_tokens": self.samples[0].max_new_tokens,
            "methods": cell.methods,
            "temperature": spec.temperature,
            "seed": spec.seed,
            **cell.suite.task_payload(self.samples),
        }


def make_batches(cells: list[Cell], batch_size: int) -> list[Batch]:
    """Per cell and split, consecutive samples cut every `batch_size`; batches all on disk are skipped."""
    out = []
    for ci, cell in enumerate(cells):
        by_split: dict[str, list[Sample]] = {}
        for s in cell.samples:
            by_split.setdefault(s.split, []).append(s)
        for samples in by_split.values():
            for i in range(0, len(samples), batch_size):
                chunk = samples[i : i + batch_size]
                if any(s.id not in cell.done for s in chunk):
                    out.append(Batch(ci, chunk))
    return out


# ----------------------------------------------------------------------------------------------- run


def _record(cell: Cell, sample: Sample, reply: dict, batch_len: int) -> dict:
    judged = cell.suite.judge(sample, reply["answer"], reply["finish_reason"])
    return {
        "id": sample.id,
        "split": sample.split,
        "question": sample.question,
        "image": sample.image if isinstance(sample.image, str) else None,
        **({"meta": sample.meta} if sample.meta else {}),
        "target": sample.target,
        "answer": reply["answer"],
        "pred": judged["pred"],
        "stats": judged["stats"],
        "finish_reason": reply["finish_reason"],
        "n_tokens": reply["n_tokens"],
        "timings": reply["timings"],
        **({"extras": reply["extras"]} if reply.get("extras") else {}),
        **({"crop": crop} if (crop := crop_quality(sample.meta, reply.get("extras"))) else {}),
        "batch_size": batch_len,
        "worker_pid": reply.get("worker_pid"),
        "model": cell.model.name,
        "methods": cell.label,
        "suite": cell.suite.spec,
        "cell": cell.key,
    }


def crop_quality(meta: dict, extras: dict | None) -> dict | None:
    """Where a method kept a region (an extra with a COCO RLE `mask`) and the sample names the object its
    answer depends on (`meta["target_box"]`): the share of the target's box inside the kept mask, and a hit
    when at least half of it is."""
    if not extras or not meta or "target_box" not in meta:
        return None
    from grounding.segment import decode_rle

    for name, rec in extras.items():
        if isinstance(rec, dict) and isinstance(rec.get("mask"), dict):
            m = decode_rle(rec["mask"])
            x0, y0, x1, y1 = (int(round(v)) for v in meta["target_box"])
            region = m[max(0, y0) : max(y0 + 1, y1), max(0, x0) : max(x0 + 1, x1)]
            cover = float(region.mean()) if region.size else 0.0
            return {
                "method": name,
                "target_coverage": round(cover, 6),
                "hit": cover >= 0.5,
                "kept_fraction": round(float(m.mean()), 6),  # of the image: a crop that keeps everything hits
            }
    return None


class _Progress:
    """OUT/progress.json: {"done", "total", "state", "updated"} (read by the REST API's GET /v1/evals/{id}),
    replaced atomically; at most every 0.5 s while running."""

    def __init__(self, out: Path | None, done: int, total: int) -> None:
        self.path = None if out is None else Path(out) / "progress.json"
        self.done, self.total = done, total
        self.last = 0.0
        self.write()

    def advance(self, n: int) -> None:
        self.done += n
        self.write()

    def write(self, state: str = "running") -> None:
        done = self.done
        if self.path is None:
            return
        now = time.time()
        if state == "running" and 0 < done < self.total and now - self.last < 0.5:
            return
        self.last = now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"done": done, "total": self.total, "state": state, "updated": now}))
        os.replace(tmp, self.path)


def _log(msg: str) -> None:
    print(f"lucid eval: {msg}", file=sys.stderr, flush=True)


def run_job(spec: JobSpec, plan: Plan | None = None, log: Callable[[str], None] = _log) -> dict:
    """Run (or resume) the job; returns the results dict (also written to DIR/results.json)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    plan = plan or make_plan(spec)
    for cell in plan.cells:
        if cell.path is not None:
            cell.path.parent.mkdir(parents=True, exist_ok=True)
            cell.done = read_records(cell.path, cell.key)
    resumed = sum(len([s for s in c.samples if s.id in c.done]) for c in plan.cells)
    total = sum(len(c.samples) for c in plan.cells)
    if resumed:
        log(f"resuming: {resumed} of {total} samples already answered in {spec.out}")
    runs: list[dict] = []
    progress = _Progress(spec.out, resumed, total)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not spec.progress) as bar:
        tasks = [
            bar.add_task(c.name, total=len(c.samples), completed=len([s for s in c.samples if s.id in c.done]))
            for c in plan.cells
        ]

        def on_result(batch: Batch, replies: list[dict]) -> None:
            cell = plan.cells[batch.cell]
            new = [
                _record(cell, s, r, len(batch.samples)) for s, r in zip(batch.samples, replies) if s.id not in cell.done
            ]
            if cell.path is not None and new:
                _append(cell.path, new)
            for r in new:
                cell.done[r["id"]] = r
            bar.advance(tasks[batch.cell], len(new))
            progress.advance(len(new))

        ray_started = False
        try:
            for model in plan.models:
                idx = [i for i, c in enumerate(plan.cells) if c.model is model]
                batches = make_batches([plan.cells[i] for i in idx], spec.batch_size)
                for b in batches:  # indices into plan.cells
                    b.cell = idx[b.cell]
                if not batches:
                    continue
                if spec.workers == 0:
                    runs.append(_run_local(spec, plan, model, batches, on_result))
                else:
                    ray_started = _ray_init(spec, log) or ray_started
                    runs.append(_run_ray(spec, plan, model, batches, on_result, log))
        finally:
            if ray_started:
                import ray

                ray.shutdown()
    from evals.report import write_results

    results = write_results(plan, runs)
    progress.write("finished")
    return results


def _run_local(spec: JobSpec, plan: Plan, model: Model, batches: list[Batch], on_result) -> dict:
    import torch

    from evals.worker import Worker

    threads = torch.get_num_threads()  # this process's setting, restored after
    try:
        t = time.perf_counter()
        worker = Worker(model.source, spec.torch_threads(), spec.device)
        info = worker.info()
        start = time.perf_counter()
        n, acct = 0, {"busy_s": 0.0, "driver_s": 0.0}
        for b in batches:
            replies = worker.run(b.payload(plan.cells[b.cell], spec))
            _account(acct, replies, on_result, b)
            n += len(b.samples)
        return _throughput(model, spec, [info], n, start, t, acct)
    finally:
        torch.set_num_threads(threads)


def _account(acct: dict, replies: list[dict], on_result, batch: Batch) -> None:
    """Worker time (the batch's generate call) and driver time (judging, writing) of one batch."""
    acct["busy_s"] += replies[0]["timings"]["batch_s"] if replies else 0.0
    t = time.perf_counter()
    on_result(batch, replies)
    acct["driver_s"] += time.perf_counter() - t


def _throughput(model: Model, spec: JobSpec, infos: list[dict], n: int, start: float, t0: float, acct: dict) -> dict:
    wall = time.perf_counter() - start
    slots = max(1, spec.workers) * wall
    return {
        "model": model.name,
        "workers": spec.workers,
        "batch_size": spec.batch_size,
        "cpus_per_worker": spec.cpus_per_worker,
        "samples_answered": n,
        "answer_wall_s": round(wall, 3),
        "samples_per_s": round(n / wall, 3) if wall > 0 else None,
        "startup_s": round(start - t0, 3),
        "worker_busy_s": round(acct["busy_s"], 3),  # sum over batches of the generate call's wall time
        "worker_utilisation": round(acct["busy_s"] / slots, 3) if slots > 0 else None,
        "driver_s": round(acct["driver_s"], 3),  # judging answers and appending records
        "workers_info": infos,
    }


def _ray_init(spec: JobSpec, log) -> bool:
    """Connect to `spec.address` (or the cluster of a submitted job), or start a local instance.
    Returns whether this call connected (and so must shut down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = spec.address or os.environ.get("RAY_ADDRESS")
    t = time.perf_counter()
    try:
        if address:
            ray_auth()
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    except Exception as e:  # Ray's own refusal (an unreachable address, an auth token it cannot read, ...)
        raise JobError(ray_refusal(e, address)) from None
    log(f"ray: {'joined ' + address if address else 'local instance started'} ({time.perf_counter() - t:.1f} s)")
    return True


def _check_resources(spec: JobSpec) -> None:
    import ray

    have = ray.cluster_resources()
    _check_need(spec, have.get("CPU", 0), have.get("GPU", 0), "the Ray cluster")


def _check_need(spec: JobSpec, cpus: float, gpus: float | None, where: str) -> None:
    need_cpu = spec.workers * spec.cpus_per_worker
    need_gpu = spec.workers * spec.gpus_per_worker
    if need_cpu > cpus + 1e-9:
        raise JobError(
            f"--workers {spec.workers} x --cpus-per-worker {spec.cpus_per_worker:g} needs {need_cpu:g} CPUs; "
            f"{where} has {cpus:g} (replicas never share CPUs: lower --workers or --cpus-per-worker)"
        )
    if gpus is not None and need_gpu > gpus + 1e-9:
        raise JobError(
            f"--workers {spec.workers} x --gpus-per-worker {spec.gpus_per_worker:g} needs {need_gpu:g} GPUs; "
            f"{where} has {gpus:g}"
        )


def _unwrap(e: Exception) -> Exception:
    """The user-facing error inside a Ray task error (an InputError raised by a worker), else e."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, InputError) else e


def _run_ray(spec: JobSpec, plan: Plan, model: Model, batches: list[Batch], on_result, log) -> dict:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from evals.worker import Worker

    _check_resources(spec)
    t0 = time.perf_counter()
    actor_cls = ray.remote(Worker).options(
        num_cpus=spec.cpus_per_worker,
        num_gpus=spec.gpus_per_worker,
        max_restarts=TASK_RETRIES,
        max_task_retries=TASK_RETRIES,
    )
    actors = [actor_cls.remote(model.source, spec.torch_threads(), spec.device) for _ in range(spec.workers)]
    try:
        try:
            infos = ray.get([a.info.remote() for a in actors])
        except RayTaskError as e:
            raise _unwrap(e) from None
        for i, info in enumerate(infos):
            log(
                f"worker {i} ready: {model.name} on {info['host']} pid {info['pid']}, "
                f"{info['torch_threads']} thread(s), {info['device']}, loaded in {info['load_s']:.1f} s"
            )
        start = time.perf_counter()
        queue = deque(batches)
        in_flight: dict[Any, tuple[int, Batch]] = {}
        per_actor = [0] * len(actors)

        def feed(i: int) -> None:
            while queue and per_actor[i] < MAX_IN_FLIGHT:
                b = queue.popleft()
                ref = actors[i].run.remote(b.payload(plan.cells[b.cell], spec))
                in_flight[ref] = (i, b)
                per_actor[i] += 1

        for i in range(len(actors)):
            feed(i)
        n, acct = 0, {"busy_s": 0.0, "driver_s": 0.0}
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            i, b = in_flight.pop(ready[0])
            per_actor[i] -= 1
            try:
                replies = ray.get(ready[0])
            except RayTaskError as e:
                raise _unwrap(e) from None
            except RayActorError as e:
                raise JobError(
                    f"worker {i} ({model.name}) died {TASK_RETRIES + 1} times; answers so far are kept in "
                    f"{spec.out} (re-run to resume): {str(e).splitlines()[0]}"
                ) from None
            feed(i)  # the worker's next batch first, then the bookkeeping
            _account(acct, replies, on_result, b)
            n += len(b.samples)
        return _throughput(model, spec, infos, n, start, t0, acct)
    finally:
        for a in actors:
            ray.kill(a)


def with_out(spec: JobSpec, out: Path) -> JobSpec:
    return replace(spec, out=out)
