"""`lucid eval`: hallucination evaluation jobs (evals/), locally, on a Ray cluster, or submitted to one.

Registered on the app by `lucid.cli` (`register`); the error contract applies (`LucidGroup`): a bad
suite, method, checkpoint, image or option is one `lucid: error: ...` line and exit 2, before any
model is loaded or Ray is started.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from lucid.cli.common import (
    checked_output,
    deliver,
    parse_method_options,
    quiet,
    stdout_to_stderr,
)
from lucid.errors import InputError

SUITE_HELP = "A suite NAME[:k=v,...] (repeatable; `lucid eval --list` shows them and their parameters)."
COMPOSED_METHOD_HELP = "A mitigation method NAME[:k=v,...] (repeatable, composes in order; see `lucid methods`)."
METHOD_SET_HELP = (
    "A method set (repeatable, one per column of the matrix): NAME[:k=v,...], several composed with '+' "
    "(e.g. 'paint:heads=uniform+vhr:alpha=1.5'). The baseline always runs too (unless --no-baseline)."
)


def _list_suites() -> str:
    from evals.suites import get, names

    lines = []
    for name in names():
        cls = get(name)
        lines.append(f"{name}: {cls.summary}")
        for k, p in cls.PARAMS.items():
            default = ",".join(p.default) if isinstance(p.default, tuple) else repr(p.default)
            lines.append(f"  {k:<16} default {default:<12} {p.help}")
    return "\n".join(lines)


def _summary(res: dict) -> str:
    from evals.metrics import PRIMARY
    from evals.report import interval_cell

    lines = []
    for task, by_model in res["results"].items():
        for model, by_label in by_model.items():
            for label, e in by_label.items():
                keys = PRIMARY[e["kind"]]
                vals = [f"{k} " + interval_cell(e, k, joiner=" vs baseline ") for k in keys]
                lines.append(f"{task}  {model}  {label}  n={e['n']}  " + "  ".join(vals))
    return "\n".join(lines)


def _submit(dashboard: str, argv: list[str], no_wait: bool) -> int:
    """Submit `lucid eval argv` as a Ray job; stream its logs; the job's outcome is the exit code."""
    import asyncio

    from lucid.ray_client import ray_auth, submit_job

    ray_auth()  # a token in ~/.ray/auth_token and RAY_AUTH_MODE unset: send it (Ray's rule)
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(dashboard)
    except Exception as e:  # connection refused, 401 without a token, a bad address
        raise InputError(f"--submit {dashboard}: cannot reach the Ray job server ({type(e).__name__}: {e})") from None
    entrypoint = "lucid eval " + shlex.join(argv)
    job_id = submit_job(client, entrypoint=entrypoint)
    typer.echo(f"lucid eval: submitted {job_id} to {dashboard}: {entrypoint}", err=True)
    if no_wait:
        typer.echo(job_id)
        return 0

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    typer.echo(f"lucid eval: job {job_id} {status.value}", err=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _forwarded(ctx_args: dict) -> list[str]:
    """The command line of the submitted job: every option given, paths made absolute."""
    argv: list[str] = []
    for flag, value in ctx_args.items():
        if value is None or value is False or value == []:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        elif isinstance(value, Path):
            argv += [flag, str(value.resolve())]
        else:
            argv += [flag, str(value)]
    return argv


def register(app: typer.Typer, testbed_app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        suite: Annotated[list[str] | None, typer.Option("--suite", help=SUITE_HELP)] = None,
        model: Annotated[
            list[str] | None, typer.Option("--model", help="'testbed' or a llava-hf directory (repeatable).")
        ] = None,
        method: Annotated[list[str] | None, typer.Option("--method", help=METHOD_SET_HELP)] = None,
        no_baseline: Annotated[bool, typer.Option("--no-baseline", help="Do not run the baseline.")] = False,
        limit: Annotated[int | None, typer.Option(min=1, help="At most N samples per split of each suite.")] = None,
        out: Annotated[Path, typer.Option(help="Output directory (re-running with it resumes).")] = Path("out/eval"),
        images: Annotated[Path | None, typer.Option(help="Folder of the images (COCO val2014 for pope/chair).")] = None,
        questions: Annotated[Path | None, typer.Option(help="A POPE-format question file (pope suite).")] = None,
        annotations: Annotated[
            Path | None, typer.Option(help="Folder with COCO instances_*.json + captions_*.json (chair).")
        ] = None,
        workers: Annotated[int, typer.Option(min=0, help="Model replicas (Ray actors); 0 = this process.")] = 1,
        batch_size: Annotated[int, typer.Option(min=1, help="Samples per generate call.")] = 8,
        cpus_per_worker: Annotated[float, typer.Option(help="CPUs (= torch threads) each replica holds.")] = 1.0,
        gpus_per_worker: Annotated[float, typer.Option(help="GPUs each replica holds (Ray num_gpus).")] = 0.0,
        address: Annotated[
            str | None, typer.Option(help="Join a Ray cluster: auto, HOST:PORT or ray://HOST:PORT.")
        ] = None,
        submit: Annotated[
            str | None,
            typer.Option(help="Submit this job to a Ray job server (e.g. http://HEAD:8265) and stream its logs."),
        ] = None,
        no_wait: Annotated[
            bool, typer.Option("--no-wait", help="With --submit: print the job id, do not wait.")
        ] = False,
        device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
        temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy (default).")] = 0.0,
        seed: Annotated[int, typer.Option(help="Sampling seed (with --temperature > 0).")] = 0,
        bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for intervals and tests.")] = 1000,
        list_suites: Annotated[bool, typer.Option("--list", help="List the suites and their parameters.")] = False,
    ) -> None:
        """Hallucination evaluation: models x method sets x suites on Ray workers; resumable; writes
        OUT/samples/**.jsonl, OUT/results.json and OUT/report.md."""
        if list_suites:
            typer.echo(_list_suites())
            return
        if not suite:
            raise InputError("no suite given: --suite NAME (see `lucid eval --list`)")
        from vlm.contract import check_device, check_output_dir, check_sampling, check_seed

        check_seed(seed, "--seed")
        check_sampling(1, temperature, 1.0, 0, seed)
        check_device(device)
        if cpus_per_worker <= 0 or gpus_per_worker < 0:
            raise InputError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
        if submit:
            forwarded = {
                "--suite": suite,
                "--model": model,
                "--method": method,
                "--no-baseline": no_baseline,
                "--limit": limit,
                "--out": out,
                "--images": images,
                "--questions": questions,
                "--annotations": annotations,
                "--workers": workers,
                "--batch-size": batch_size,
                "--cpus-per-worker": cpus_per_worker,
                "--gpus-per-worker": gpus_per_worker,
                "--device": device,
                "--temperature": temperature,
                "--seed": seed,
                "--bootstrap": bootstrap,
            }
            raise typer.Exit(code=_submit(submit, _forwarded(forwarded), no_wait))
        check_output_dir(out, "--out")
        quiet()
        from evals.job import JobSpec, make_plan, run_job
        from evals.suites import Data

        spec = JobSpec(
            suites=tuple(suite),
            out=out,
            models=tuple(model or ["testbed"]),
            methods=tuple(method or []),
            baseline=not no_baseline,
            limit=limit,
            workers=workers,
            batch_size=batch_size,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
            address=address,
            device=device,
            data=Data(images=images, questions=questions, annotations=annotations),
            temperature=temperature,
            seed=seed,
            bootstrap=bootstrap,
        )
        with stdout_to_stderr():
            plan = make_plan(spec)  # every input checked before Ray starts or a model loads
            res = run_job(spec, plan)
        typer.echo(_summary(res))
        typer.echo(f"lucid eval: wrote {out / 'results.json'} and {out / 'report.md'}", err=True)

    @testbed_app.command("eval")
    def testbed_eval(
        model: Annotated[str, typer.Option(help="'testbed' or a local llava-hf checkpoint directory.")] = "testbed",
        n: Annotated[int, typer.Option(min=1, help="Held-out scenes.")] = 300,
        seed: Annotated[int, typer.Option(help="Seed of the held-out scenes.")] = 12345,
        out: Annotated[
            Path | None, typer.Option(help="Also write the metrics JSON here (.json; - = stdout only).")
        ] = None,
        method: Annotated[list[str] | None, typer.Option("--method", help=COMPOSED_METHOD_HELP)] = None,
    ) -> None:
        """Testbed quality: POPE splits, colour/count accuracy, caption recall and CHAIR. The JSON goes to
        stdout (progress to stderr). An alias of `lucid eval --suite testbed-pope --suite testbed-chair
        --suite testbed-qa --workers 0 --batch-size 16` in this legacy JSON shape."""
        from vlm.checkpoint import inspect_checkpoint
        from vlm.contract import check_seed

        check_seed(seed, "--seed")
        path = checked_output(out, (".json",), "metrics", stdout_ok=True)
        inspect_checkpoint(model)
        quiet()
        methods = parse_method_options(method)  # MethodError (exit 2) before any work
        from evals.testbed_metrics import testbed_eval_metrics

        typer.echo(f"testbed eval: {n} scenes, seed {seed}, model {model}", err=True)
        with stdout_to_stderr():
            metrics = testbed_eval_metrics(model, n, seed, [json.dumps(m.to_json()) for m in methods])
        deliver(json.dumps(metrics, indent=1), path)
