"""`lucid testbed render | train | calibrate-risk`: the shapes world and the embedded model's studies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lucid.cli.common import (
    checked_output,
    load_model,
    quiet,
    stdout_to_stderr,
)
from lucid.errors import InputError


def testbed_render(
    n: Annotated[int, typer.Option(min=1, help="Number of scenes.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the scene stream.")] = 0,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("scenes"),
    size: Annotated[int, typer.Option(min=16, max=4096, help="Image side in pixels.")] = 96,
    train_distribution: Annotated[
        bool, typer.Option(help="Draw from the training distribution (jitter, clutter).")
    ] = False,
) -> None:
    """Write N scene PNGs and scenes.jsonl (objects, boxes, COCO RLE masks)."""
    from vlm.contract import check_output_dir, check_seed

    check_seed(seed, "--seed")
    check_output_dir(out, "scenes")
    from testbed.world.render import render_dataset
    from testbed.world.scenes import TRAIN_CONFIG, WorldConfig, with_size

    cfg = with_size(TRAIN_CONFIG if train_distribution else WorldConfig(), (size, size))
    path = render_dataset(out, n, seed, cfg)
    typer.echo(f"wrote {n} scenes to {path}")


def testbed_train(
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")] = Path("tiny-llava"),
    recipe: Annotated[
        str, typer.Option(help="v3 (the current recipe: 16x16 image tokens, ~2 h on 2 quiet cores), v2 or v1.")
    ] = "v3",
    threads: Annotated[int, typer.Option(min=1, max=64, help="torch threads (1 is faster on a busy machine).")] = 2,
) -> None:
    """Train the embedded tiny LLaVA from scratch (resumable within a stage: rerun the same command)."""
    from dataclasses import replace

    from vlm.contract import check_output_dir, check_seed

    check_seed(seed, "--seed")
    if recipe not in ("v1", "v2", "v3"):
        raise InputError(f"--recipe must be v1, v2 or v3, got {recipe!r}")
    check_output_dir(out, "checkpoint")

    from testbed.studies.train import Recipe, train

    train(out, replace(Recipe.named(recipe, seed), threads=threads))
    typer.echo(f"wrote {out}")


def testbed_calibrate_risk(
    model: Annotated[str, typer.Option(help="'testbed' or a local llava-hf checkpoint directory.")] = "testbed",
    n: Annotated[int, typer.Option(min=10, help="Calibration scenes.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the calibration scenes (not the held-out 12345).")] = 2024,
    n_eval: Annotated[int, typer.Option(min=10, help="Held-out scenes for the AUROC report.")] = 300,
    out: Annotated[
        Path | None, typer.Option(help="Risk model JSON (default: lucid_risk.json in the checkpoint).")
    ] = None,
) -> None:
    """Fit the hallucination-risk score (lucid.risk) on testbed scenes and report its held-out AUROC."""
    from vlm.checkpoint import inspect_checkpoint
    from vlm.contract import check_seed

    check_seed(seed, "--seed")
    ckpt = inspect_checkpoint(model)
    path = checked_output(out, (".json",), "risk model") if out is not None else None
    quiet()
    from dataclasses import replace

    from lucid.risk import RISK_FILE
    from testbed.studies.risk import VARIANTS, calibrate, collect, cross_validated, measure
    from testbed.world.scenes import WorldConfig, scenes

    with stdout_to_stderr():
        vlm = load_model(model)
        cal = collect(vlm, list(scenes(seed, n, WorldConfig())), seed)
        held = collect(vlm, list(scenes(12345, n_eval, WorldConfig())), 12345)
        cv = cross_validated(vlm, cal)
        best = max(VARIANTS, key=lambda v: cv[v])  # chosen on the calibration seed only
        report = {}
        for variant in VARIANTS:
            m = calibrate(vlm, cal, *variant, {"n_scenes": n, "seed": seed})
            key = f"prompt={variant[0]},confidence={variant[1]}"
            report[key] = {"cv_auroc_calibration": round(cv[variant], 4), "heldout": measure(m, held)}
            if variant == best:
                chosen = replace(m, calibration={**m.calibration, "variant": key, "heldout": report[key]["heldout"]})
    path = path or Path(ckpt.path) / RISK_FILE
    chosen.save(path)
    typer.echo(json.dumps(report | {"saved": str(path), "chosen": chosen.calibration["variant"]}, indent=1))


def register(app: typer.Typer, testbed_app: typer.Typer) -> None:
    testbed_app.command("render")(testbed_render)
    testbed_app.command("train")(testbed_train)
    testbed_app.command("calibrate-risk")(testbed_calibrate_risk)
