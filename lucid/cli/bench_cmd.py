"""`lucid bench`: the methods' latency and memory table (`lucid.bench.methods`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lucid.cli.common import (
    checked_output,
    deliver,
    quiet,
    stdout_to_stderr,
)


def bench(
    out: Annotated[
        Path, typer.Option(help="Markdown file to write, or - for stdout (`make bench` writes BENCHMARKS.md).")
    ] = Path("out/BENCHMARKS.md"),
    quick: Annotated[
        bool,
        typer.Option(help="Testbed model only, 4 decode steps x 2 rounds, no memory runs (CI smoke)."),
    ] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
    path_: Annotated[
        list[str] | None,
        typer.Option(
            "--path",
            help="Time only these paths against sdpa (repeatable; e.g. method:dyvte:layer=half); their sections "
            "are written beside the full tables.",
        ),
    ] = None,
) -> None:
    """Prefill / decode latency and peak memory: sdpa vs Lucid's seam vs each method vs eager+output_attentions."""
    from vlm.contract import check_device

    check_device(device)
    from lucid.bench.methods import check_paths

    try:
        chosen = check_paths(path_)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--path") from None
    path = checked_output(out, (".md",), "benchmark", stdout_ok=True)
    quiet()
    from lucid.bench.methods import PATHS, bench_specs, keep_other_sections, render_markdown, run_bench
    from vlm.loader import default_device_dtype

    default_device_dtype(device, None)  # DeviceError now, not after the first worker
    with stdout_to_stderr():
        rows = run_bench(None, quick=quick, device=device, paths=path_)
    subset = chosen != PATHS
    text = render_markdown(rows, bench_specs(quick), quick, subset)
    if path is not None and path.is_file():  # keep what others wrote there (the SAM table, the full tables)
        text = keep_other_sections(text, path.read_text(encoding="utf-8"), subset)
    deliver(text, path, echo=path is None)
    if path is not None:
        typer.echo(f"wrote {path}", err=True)


def register(app: typer.Typer, testbed_app: typer.Typer) -> None:
    app.command("bench")(bench)
