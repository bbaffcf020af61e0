"""`lucid locate`: find a phrase with the checkpoint's localization heads (box, point, map)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lucid.cli.common import (
    HEATMAP_SUFFIXES,
    checked_output,
    fail_after_result,
    load_model,
    quiet,
    stdout_to_stderr,
)
from lucid.errors import InputError, OutputError


def locate(
    image: Annotated[Path, typer.Argument(help="Image file (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM).")],
    query: Annotated[str, typer.Argument(help="What to find, e.g. 'the red circle'.")],
    model: Annotated[str, typer.Option(help="'testbed' or a local llava-hf checkpoint directory.")] = "testbed",
    heads: Annotated[
        str, typer.Option(help="'auto' (the checkpoint's localization heads, cached per weights hash) or L:H,L:H.")
    ] = "auto",
    out: Annotated[Path | None, typer.Option(help="Write the map, box and point over the image as PNG.")] = None,
    threshold: Annotated[
        str, typer.Option(help="Box rule: 'mean' (the paper: sub-cells above the map's mean) or 'peak_fraction'.")
    ] = "mean",
    peak_fraction: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="With --threshold peak_fraction: keep sub-cells >= F x peak.")
    ] = 0.8,
    sigma: Annotated[float, typer.Option(min=0.0, max=10.0, help="Gaussian smoothing of the map, in cells.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of one line.")] = False,
) -> None:
    """Find QUERY in IMAGE with the model's localization heads: a box and a peak point in ORIGINAL pixels."""
    from vlm.checkpoint import inspect_checkpoint
    from vlm.contract import atomic_output, check_question
    from vlm.images import load_image

    check_question(query)
    if heads != "auto":
        from grounding.heads import parse_heads

        try:
            explicit = parse_heads(heads)
        except ValueError as e:
            raise InputError(f"--heads: {e}") from e
    if threshold not in ("mean", "peak_fraction"):
        raise InputError(f"--threshold must be 'mean' or 'peak_fraction', got {threshold!r}")
    path = checked_output(out, HEATMAP_SUFFIXES, "overlay")
    inspect_checkpoint(model)
    pil = load_image(image)
    quiet()
    from grounding import LocateParams, load_or_discover
    from grounding import locate as run_locate

    params = LocateParams(
        sigma=sigma,
        threshold=threshold,
        peak_fraction=peak_fraction,
        component="peak" if threshold == "peak_fraction" else "largest",
    )

    with stdout_to_stderr():
        vlm = load_model(model)
        try:
            selection = load_or_discover(vlm) if heads == "auto" else load_or_discover(vlm, heads=explicit)
        except ValueError as e:
            raise InputError(f"--heads: {e}") from e
        loc = run_locate(vlm, pil, query, selection, params)
    payload = loc.to_json()
    if as_json:
        typer.echo(json.dumps(payload))
    else:
        b = ", ".join(f"{v:.0f}" for v in loc.box)
        typer.echo(f"{query}: box [{b}] point ({loc.point[0]:.0f}, {loc.point[1]:.0f}) score {loc.score:.2f}")
    if path is not None:
        from lucid.heatmap import save_heatmap

        try:
            with stdout_to_stderr(), atomic_output(path) as tmp:
                save_heatmap(tmp, pil, loc.values, loc.layout, f"{query}", box=loc.box, point=loc.point)
        except OutputError as e:
            fail_after_result(e)


def register(app: typer.Typer, testbed_app: typer.Typer) -> None:
    app.command("locate")(locate)
