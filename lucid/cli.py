"""The `lucid` command line.

    lucid ask IMAGE QUESTION [--model testbed|PATH] [--max-new-tokens N] [--seed S] [--heatmap OUT.png] [--json]
    lucid bench [--out BENCHMARKS.md] [--quick]
    lucid testbed render --n N --seed S --out DIR
    lucid testbed train --seed S --out DIR
    lucid testbed eval [--model testbed|PATH] [--n N] [--out metrics.json]

Caller mistakes (a bad image, a missing checkpoint) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Lucid: VLMs that answer from the image.")
testbed_app = typer.Typer(no_args_is_help=True, help="The shapes-world testbed and its embedded tiny LLaVA.")
app.add_typer(testbed_app, name="testbed")


def _fail(msg: str) -> None:
    typer.echo(f"lucid: error: {msg}", err=True)
    raise typer.Exit(code=2)


def _load_model(model: str):
    """load_vlm, turning a bad checkpoint into the one-line error + exit 2."""
    from vlm import CheckpointError, load_vlm

    try:
        return load_vlm(model)
    except CheckpointError as e:
        _fail(str(e))


def _quiet() -> None:
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


@app.command()
def ask(
    image: Annotated[Path, typer.Argument(help="Image file (PNG, JPEG, ...).")],
    question: Annotated[str, typer.Argument(help="The question, e.g. 'Is there a red circle in the image?'")],
    model: Annotated[str, typer.Option(help="'testbed' or a local llava-hf checkpoint directory.")] = "testbed",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Upper bound on answer tokens.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed for sampling (used when --temperature > 0).")] = 0,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    heatmap: Annotated[Path | None, typer.Option(help="Write the answer's attention over the image as PNG.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of the bare answer.")] = False,
) -> None:
    """Answer a question about an image."""
    _quiet()
    from lucid.ask import ask as run_ask
    from vlm import ImageError, SamplingParams, load_image

    try:
        pil = load_image(image)
    except ImageError as e:
        _fail(str(e))
    vlm = _load_model(model)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    result = run_ask(vlm, pil, question, sampling, attention=heatmap is not None)
    gen = result.generation
    if heatmap is not None:
        from lucid.heatmap import save_heatmap

        save_heatmap(heatmap, pil, result.attention_grid, gen.layout, title=f"Q: {question}\nA: {gen.text}")
    if as_json:
        payload = {
            "answer": gen.text,
            "model": vlm.name,
            "model_path": str(vlm.path),
            "question": question,
            "finish_reason": gen.finish_reason,
            "tokens": len(gen.token_ids),
            "timings": gen.timings.to_dict(),
            "sampling": {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed},
            "heatmap": str(heatmap) if heatmap is not None else None,
        }
        typer.echo(json.dumps(payload, indent=1))
    else:
        typer.echo(gen.text)


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Markdown file to write.")] = Path("BENCHMARKS.md"),
    quick: Annotated[bool, typer.Option(help="Fewer repetitions and a shallower 7B-shaped model (CI smoke).")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available).")] = None,
) -> None:
    """Prefill / decode latency and peak memory: sdpa vs Lucid's seam vs eager+output_attentions."""
    _quiet()
    from lucid.bench import run_bench

    run_bench(out, quick=quick, device=device)
    typer.echo(f"wrote {out}")


@testbed_app.command("render")
def testbed_render(
    n: Annotated[int, typer.Option(min=1, help="Number of scenes.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the scene stream.")] = 0,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("scenes"),
    size: Annotated[int, typer.Option(min=16, help="Image side in pixels.")] = 96,
    train_distribution: Annotated[
        bool, typer.Option(help="Draw from the training distribution (jitter, clutter).")
    ] = False,
) -> None:
    """Write N scene PNGs and scenes.jsonl (objects, boxes, COCO RLE masks)."""
    from testbed.render import render_dataset
    from testbed.world import TRAIN_CONFIG, WorldConfig, with_size

    cfg = with_size(TRAIN_CONFIG if train_distribution else WorldConfig(), (size, size))
    path = render_dataset(out, n, seed, cfg)
    typer.echo(f"wrote {n} scenes to {path}")


@testbed_app.command("train")
def testbed_train(
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")] = Path("tiny-llava"),
) -> None:
    """Train the embedded tiny LLaVA from scratch (resumable; ~1 h on 2 CPU cores)."""
    from dataclasses import replace

    from testbed.train import Recipe, train

    train(out, replace(Recipe(), seed=seed))
    typer.echo(f"wrote {out}")


@testbed_app.command("eval")
def testbed_eval(
    model: Annotated[str, typer.Option(help="'testbed' or a local llava-hf checkpoint directory.")] = "testbed",
    n: Annotated[int, typer.Option(min=1, help="Held-out scenes.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the held-out scenes.")] = 12345,
    out: Annotated[Path | None, typer.Option(help="Write metrics JSON here.")] = None,
) -> None:
    """Testbed quality: POPE splits, colour/count accuracy, caption recall and CHAIR."""
    _quiet()
    from testbed.evaluate import EvalConfig, evaluate

    vlm = _load_model(model)
    metrics = evaluate(vlm, EvalConfig(n_scenes=n, seed=seed))
    metrics["model"] = vlm.name
    text = json.dumps(metrics, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    typer.echo(text)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
