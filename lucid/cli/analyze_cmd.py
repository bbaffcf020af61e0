"""`lucid analyze`: how a checkpoint looks at images (report.md, plots, analysis.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lucid.cli.common import (
    load_model,
    quiet,
    stdout_to_stderr,
)
from lucid.errors import InputError


def analyze(
    model: Annotated[str, typer.Option(help="'testbed' or a local llava-hf checkpoint directory.")] = "testbed",
    n: Annotated[int, typer.Option(min=1, help="Held-out testbed scenes (when no --images).")] = 60,
    images: Annotated[
        Path | None, typer.Option(help="A folder of images to analyse instead of testbed scenes.")
    ] = None,
    phrases: Annotated[
        Path | None,
        typer.Option(help='JSON lines of {"image": PATH, "phrase": TEXT} for localization-head discovery.'),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder (report.md, PNG plots, analysis.json).")] = Path(
        "out/analysis"
    ),
) -> None:
    """How a checkpoint looks at images: image-attention share per layer and head (prefill and decoding),
    attention entropy, visual sink tokens, localization heads, and (testbed) pointing per head."""
    from vlm.checkpoint import inspect_checkpoint
    from vlm.contract import check_output_dir

    check_output_dir(out, "analysis")
    files = None
    if images is not None:
        if not images.is_dir():
            raise InputError(f"--images must be a folder of images, got {images}")
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
        if not files:
            raise InputError(f"--images {images} holds no .png/.jpg/.jpeg/.webp/.bmp file")
    if phrases is not None and not phrases.is_file():
        raise InputError(f"--phrases file not found: {phrases}")
    inspect_checkpoint(model)
    quiet()
    from lucid.analyze import run_analyze

    with stdout_to_stderr():
        vlm = load_model(model)
        calib = None
        if phrases is not None:
            from grounding import calibration_from_folder

            try:
                calib = calibration_from_folder(phrases)
            except (OSError, ValueError) as e:
                raise InputError(f"--phrases {phrases}: {e}") from e
        pil = None
        if files is not None:
            from vlm.images import load_image

            pil = [load_image(f) for f in files]
        run_analyze(vlm, out, images=pil, phrases=calib, n=n)
    typer.echo(f"wrote {out / 'report.md'}")


def register(app: typer.Typer, testbed_app: typer.Typer) -> None:
    app.command("analyze")(analyze)
