"""`lucid dyvte fit`: calibrate DyVTE's exit rules and train its routers for a checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from lucid.cli.common import load_model, quiet, stdout_to_stderr
from lucid.errors import InputError


def dyvte_fit(
    model: Annotated[str, typer.Option(help="'testbed' or a local llava-hf checkpoint directory.")] = "testbed",
    data: Annotated[
        Path | None,
        typer.Option(
            help='Folder with questions.jsonl ({"image": ..., "question": ...} per line) and its images; '
            "default: testbed scenes (suits the embedded model)."
        ),
    ] = None,
    n: Annotated[int, typer.Option(min=8, help="Testbed calibration scenes (without --data).")] = 512,
    safe_share: Annotated[
        float,
        typer.Option(min=0.5, max=1.0, help="Share of samples that must be safe at the exit (static, attention)."),
    ] = 0.95,
    hidden: Annotated[int, typer.Option(min=2, help="Router hidden size (the official code: 2048).")] = 2048,
    epochs: Annotated[int, typer.Option(min=1, help="Router training epochs (full batch).")] = 50,
    batch_size: Annotated[int, typer.Option(min=1, help="Calibration batch size.")] = 16,
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default: Lucid's cache for these weights, where dyvte finds it)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the calibration as JSON.")] = False,
) -> None:
    """Label every exit layer of every sample with DyVTE's rule (argmax agreement > 0.99, answer loss ratio
    < 1.03, teacher-forcing the model's greedy answer), calibrate the static and attention rules and train
    one router per layer; written where `--method dyvte` finds them."""
    from vlm.checkpoint import inspect_checkpoint

    inspect_checkpoint(model)
    if data is not None and not (data / "questions.jsonl").is_file():
        raise InputError(f"--data {data}: no questions.jsonl there")
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    quiet()
    from rich.progress import Progress

    from mitigation.methods import exit_rules

    samples = exit_rules.folder_samples(data) if data is not None else exit_rules.testbed_samples(n)
    name = str(data) if data is not None else f"testbed:{len(samples)}"
    with stdout_to_stderr():
        vlm = load_model(model)
        with Progress(transient=True) as bar:
            task = bar.add_task("labelling exits", total=len(samples))
            cals, where = exit_rules.fit(
                vlm,
                samples,
                name,
                safe_share=safe_share,
                hidden=hidden,
                epochs=epochs,
                batch_size=batch_size,
                out=out,
                progress=lambda k: bar.advance(task, k),
            )
    if json_out:
        typer.echo(json.dumps({"calibrations": [asdict(c) for c in cals], "saved": str(where)}, indent=1))
        return
    for cal in cals:
        typer.echo(f"label={cal.label}: safe share by exit layer {list(cal.safe_by_layer)}")
        typer.echo(f"  static exit layer {cal.static_layer}; attention tau={cal.tau:.4f} m={cal.m} l_min={cal.l_min}")
        if cal.router_accuracy:
            typer.echo(f"  router held-out accuracy by layer {list(cal.router_accuracy)}")
    typer.echo(f"wrote {where}")


def register(app: typer.Typer, testbed_app: typer.Typer) -> None:
    group = typer.Typer(no_args_is_help=True, help="DyVTE's exit rules: calibration and routers.")
    group.command("fit")(dyvte_fit)
    app.add_typer(group, name="dyvte")
