"""`lucid ask`: answer a question about an image (methods, heatmap, risk, JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lucid.cli.common import (
    HEATMAP_SUFFIXES,
    METHOD_HELP,
    checked_output,
    fail_after_result,
    load_model,
    parse_method_options,
    quiet,
    stdout_to_stderr,
)
from lucid.errors import InputError, OutputError


def ask(
    image: Annotated[Path, typer.Argument(help="Image file (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM).")],
    question: Annotated[str, typer.Argument(help="The question, e.g. 'Is there a red circle in the image?'")],
    model: Annotated[str, typer.Option(help="'testbed' or a local llava-hf checkpoint directory.")] = "testbed",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Upper bound on answer tokens.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed for sampling, 0..2**63-1 (used when --temperature > 0).")] = 0,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    heatmap: Annotated[Path | None, typer.Option(help="Write the answer's attention over the image as PNG.")] = None,
    heads: Annotated[
        str,
        typer.Option(help="Heads the --heatmap combines: 'auto' (localization heads), 'all' (mean) or L:H,L:H."),
    ] = "auto",
    fit_context: Annotated[
        bool, typer.Option(help="Lower --max-new-tokens to what fits the model's context instead of failing.")
    ] = False,
    method: Annotated[list[str] | None, typer.Option("--method", help=METHOD_HELP)] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write what the methods made beside the answer as a PNG (CARVE: its map, kept mask and refined image)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of the bare answer.")] = False,
) -> None:
    """Answer a question about an image."""
    # the user's input, before torch is imported: milliseconds (plus decoding the image)
    from vlm.checkpoint import inspect_checkpoint
    from vlm.contract import atomic_output, check_max_new_tokens, check_question, check_sampling
    from vlm.images import load_image

    check_question(question)
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    heatmap = checked_output(heatmap, HEATMAP_SUFFIXES, "heatmap")
    out = checked_output(out, (".png",), "out")
    if heads not in ("auto", "all"):
        from grounding.heads import parse_heads

        try:
            parse_heads(heads)
        except ValueError as e:
            raise InputError(f"--heads: {e}") from e
    ckpt = inspect_checkpoint(model)
    if not fit_context:
        check_max_new_tokens(max_new_tokens, ckpt.max_positions)
    pil = load_image(image)

    quiet()
    from lucid.answer import ask as run_ask
    from lucid.risk import RiskModel
    from vlm import SamplingParams

    methods = parse_method_options(method)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    with stdout_to_stderr():
        vlm = load_model(model)
        risk_model = RiskModel.for_checkpoint(vlm.path)
        result = run_ask(
            vlm,
            pil,
            question,
            sampling,
            attention=heatmap is not None,
            attention_heads=heads,
            fit_context=fit_context,
            methods=methods,
            risk=risk_model,
        )
    gen = result.generation
    used = result.sampling or sampling
    heat_error: OutputError | None = None
    if heatmap is not None:
        from lucid.heatmap import save_heatmap

        try:
            with stdout_to_stderr(), atomic_output(heatmap) as tmp:
                save_heatmap(tmp, pil, result.attention_grid, gen.layout, title=f"Q: {question}\nA: {gen.text}")
        except OutputError as e:
            heat_error = e
    if out is not None and heat_error is None:
        from lucid.heatmap import save_views

        try:
            with stdout_to_stderr(), atomic_output(out) as tmp:
                save_views(tmp, pil, gen.extras, title=f"Q: {question}\nA: {gen.text}")
        except OutputError as e:
            heat_error = e
    if as_json:
        payload = {
            "answer": gen.text,
            "model": vlm.name,
            "model_path": str(vlm.path),
            "question": question,
            "image_size": list(pil.size),  # (width, height) as decoded: EXIF orientation applied
            "finish_reason": gen.finish_reason,
            "tokens": len(gen.token_ids),
            "timings": gen.timings.to_dict(),
            "sampling": {"max_new_tokens": used.max_new_tokens, "temperature": temperature, "seed": seed},
            "heatmap": str(heatmap) if heatmap is not None and heat_error is None else None,
            "methods": [m.to_json() for m in methods],
            # hallucination risk (lucid.risk): None when no risk model is fitted for this checkpoint
            "risk": None if result.risk is None else round(result.risk, 4),
            "out": str(out) if out is not None and heat_error is None else None,
            # what each method made for the answer (CARVE: box, mask as COCO RLE, regions, steps, cache)
            "extras": gen.extra_records(),
        }
        if heat_error is not None:
            payload["error"] = {"type": type(heat_error).__name__, "message": str(heat_error)}
        typer.echo(json.dumps(payload, indent=1))
    else:
        typer.echo(gen.text)
    if heat_error is not None:
        fail_after_result(heat_error)


def register(app: typer.Typer, testbed_app: typer.Typer) -> None:
    app.command("ask")(ask)
