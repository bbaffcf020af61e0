"""The `lucid` command line.

    lucid ask IMAGE QUESTION [--model testbed|PATH] [--max-new-tokens N] [--seed S] [--heatmap OUT.png]
              [--fit-context] [--method NAME[:k=v,...]]... [--json]
    lucid methods [--json]
    lucid calibrate MODEL [--dims D,D] [--force] [--json]
    lucid bench [--out out/BENCHMARKS.md|-] [--quick] [--device cpu|cuda]
    lucid testbed render --n N --seed S --out DIR
    lucid testbed train --seed S --out DIR
    lucid testbed eval [--model testbed|PATH] [--n N] [--out metrics.json|-] [--method NAME[:k=v,...]]...
    lucid eval --suite S [--suite ...] [--model M ...] [--method SET ...] [--limit N] [--out DIR] [--workers N]
               [--batch-size B] [--address ADDR] [--submit http://HEAD:8265]   (lucid/eval_cmd.py)
    lucid segment IMAGE [QUERY] [--point X,Y[:0|1]]... [--box X0,Y0,X1,Y1]... [--sam SPEC] [--out PNG] [--json]
    lucid testbed train-sam --seed S --out DIR / lucid testbed eval-sam [--sam SPEC] / lucid sam-to-hf SRC OUT

Error contract, for every command (`LucidGroup`; commands added later get it for free): an `InputError`
(vlm.errors) raised by a command, or a usage error from the parser, prints one `lucid: error: ...` line
on stderr and exits 2; with `--json`, stdout also gets `{"error": {"type", "message"}}`. A command
checks the user's input (image, question, numbers, checkpoint files, output paths) before importing
torch, writes outputs through `vlm.contract.atomic_output`, and prints its result before reporting a
failure to write it. Machine-readable output (`--json`, `--out -`, `testbed eval`) owns stdout: the work
runs under `_stdout_to_stderr()`, so progress and logs go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from vlm.errors import InputError, OutputError  # noqa: E402  (light: no torch)

HEATMAP_SUFFIXES = (".png",)


class LucidGroup(TyperGroup):
    """The error contract of every `lucid` command: an `InputError` raised anywhere in a command, or a
    usage error (a bad option value, a missing argument), becomes one `lucid: error: ...` line on stderr
    and exit code 2; with `--json` on the command line, stdout also gets {"error": {"type", "message"}}."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        as_json = _wants_json(argv)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # typer's (vendored click's) usage errors
            if type(e).__name__ == "NoArgsIsHelpError":  # the help was printed (rich) or is the message
                if e.format_message().strip():
                    typer.echo(e.format_message(), err=True)
                sys.exit(2)
            ctx = getattr(e, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            report_error("UsageError", e.format_message() + hint, as_json)
            sys.exit(2)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except InputError as e:
            report_error(type(e).__name__, str(e), as_json)
            sys.exit(2)
        sys.exit(rv if isinstance(rv, int) else 0)


def _wants_json(argv: list[str]) -> bool:
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in options


def report_error(kind: str, message: str, as_json: bool = False) -> None:
    """One `lucid: error: ...` line on stderr; with `as_json`, {"error": {"type", "message"}} on stdout too."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    if as_json:
        typer.echo(json.dumps({"error": {"type": kind, "message": line}}))
    typer.echo(f"lucid: error: {line}", err=True)


def fail_after_result(error: InputError) -> NoReturn:
    """The command's result is already on stdout (it is never lost); report `error` on stderr, exit 2."""
    report_error(type(error).__name__, str(error))
    raise typer.Exit(code=2)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """While the work runs, whatever is printed (progress bars, library output) goes to stderr, so stdout
    carries only the command's result."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def checked_output(path: Path | None, suffixes: tuple[str, ...], what: str, stdout_ok: bool = False) -> Path | None:
    """An output path validated before any work (`vlm.contract.check_output_path`): a writable file with
    one of `suffixes`. None, and "-" where `stdout_ok`, mean "no file" and give None."""
    from vlm.contract import check_output_path

    if path is None or (stdout_ok and str(path) == "-"):
        return None
    return check_output_path(path, suffixes, what)


def deliver(text: str, path: Path | None, echo: bool = True) -> None:
    """Print `text` (when `echo`, or when there is no file), then write it to `path`: if writing fails the
    text has been printed and the error is reported (exit 2)."""
    from vlm.contract import write_output

    if echo or path is None:
        typer.echo(text.rstrip("\n"))
    if path is not None:
        try:
            write_output(path, text)
        except OutputError as e:
            if not echo:
                typer.echo(text.rstrip("\n"))
            fail_after_result(e)


def _methods(specs: list[str] | None):
    """--method specs -> registered methods, composed in the order given (a bad name or value raises
    MethodError, an InputError listing what is valid)."""
    from mitigation.methods import parse_methods

    return parse_methods(specs or [])


METHOD_HELP = "A mitigation method NAME[:k=v,...] (repeatable, composes in order; see `lucid methods`)."


def _risk_model(vlm):
    """The checkpoint's fitted risk model (`lucid_risk.json` beside its weights), or None."""
    from mitigation.risk import RiskModel

    return RiskModel.for_checkpoint(vlm.path)


def _load_model(model: str, device: str | None = None):
    """load_vlm (a bad checkpoint raises CheckpointError, reported by LucidGroup)."""
    from vlm import load_vlm

    return load_vlm(model, device=device)


app = typer.Typer(
    cls=LucidGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Lucid: VLMs that answer from the image.",
)
testbed_app = typer.Typer(no_args_is_help=True, help="The shapes-world testbed and its embedded tiny LLaVA.")
app.add_typer(testbed_app, name="testbed")


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

    _quiet()
    from lucid.ask import ask as run_ask
    from vlm import SamplingParams

    methods = _methods(method)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    with _stdout_to_stderr():
        vlm = _load_model(model)
        risk_model = _risk_model(vlm)
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
            with _stdout_to_stderr(), atomic_output(heatmap) as tmp:
                save_heatmap(tmp, pil, result.attention_grid, gen.layout, title=f"Q: {question}\nA: {gen.text}")
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
            # hallucination risk (mitigation.risk): None when no risk model is fitted for this checkpoint
            "risk": None if gen.risk is None else round(gen.risk, 4),
        }
        if heat_error is not None:
            payload["error"] = {"type": type(heat_error).__name__, "message": str(heat_error)}
        typer.echo(json.dumps(payload, indent=1))
    else:
        typer.echo(gen.text)
    if heat_error is not None:
        fail_after_result(heat_error)


@app.command()
def bench(
    out: Annotated[
        Path, typer.Option(help="Markdown file to write, or - for stdout (`make bench` writes BENCHMARKS.md).")
    ] = Path("out/BENCHMARKS.md"),
    quick: Annotated[
        bool,
        typer.Option(help="Testbed model only, 4 decode steps x 2 rounds, no memory runs (CI smoke)."),
    ] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")] = None,
) -> None:
    """Prefill / decode latency and peak memory: sdpa vs Lucid's seam vs each method vs eager+output_attentions."""
    from vlm.contract import check_device

    check_device(device)
    path = checked_output(out, (".md",), "benchmark", stdout_ok=True)
    _quiet()
    from lucid.bench import bench_specs, keep_other_sections, render_markdown, run_bench
    from vlm.loader import default_device_dtype

    default_device_dtype(device, None)  # DeviceError now, not after the first worker
    with _stdout_to_stderr():
        rows = run_bench(None, quick=quick, device=device)
    text = render_markdown(rows, bench_specs(quick), quick)
    if path is not None and path.is_file():  # keep what others wrote there (the SAM table)
        text = keep_other_sections(text, path.read_text(encoding="utf-8"))
    deliver(text, path, echo=path is None)
    if path is not None:
        typer.echo(f"wrote {path}", err=True)


@testbed_app.command("render")
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

    from vlm.contract import check_output_dir, check_seed

    check_seed(seed, "--seed")
    check_output_dir(out, "checkpoint")

    from testbed.train import Recipe, train

    train(out, replace(Recipe(), seed=seed))
    typer.echo(f"wrote {out}")


@app.command("methods")
def methods_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print each method's JSON schema instead.")] = False,
) -> None:
    """The registered mitigation methods: parameters (type, default, range) and paper."""
    from mitigation.methods import describe, names, schema

    if as_json:
        typer.echo(json.dumps({name: schema(name) for name in names()}, indent=1))
        return
    for row in describe():
        typer.echo(f"{row['name']}: {row['summary']}")
        typer.echo(f"  paper: {row['paper']}")
        for p in row["params"]:
            default = ",".join(map(str, p["default"])) if isinstance(p["default"], tuple) else p["default"]
            typer.echo(f"  {p['name']:<20} {p['type']:<12} default {str(default):<10} {p['range']}: {p['help']}")
        typer.echo("")


@app.command()
def calibrate(
    model: Annotated[str, typer.Argument(help="'testbed' or a local llava-hf checkpoint directory.")],
    dims: Annotated[str | None, typer.Option(help="Store these sink dimensions instead, e.g. 1415,2533.")] = None,
    force: Annotated[bool, typer.Option(help="Recalibrate even if a cached calibration exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the calibration as JSON.")] = False,
) -> None:
    """VAR's sink dimensions of a checkpoint (massive-activation channels of the first token in the middle
    layers), cached per weights hash; `var` uses them unless given sink_dims."""
    from vlm.checkpoint import inspect_checkpoint

    explicit = None
    if dims is not None:
        try:
            explicit = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            explicit = ()
        if not explicit or min(explicit) < 0:
            raise InputError(f"--dims must be comma-separated channel indices, e.g. 1415,2533; got {dims!r}")
    ckpt = inspect_checkpoint(model)
    _quiet()
    from mitigation.methods.var import calibration_path, default_tau, load_or_calibrate

    with _stdout_to_stderr():
        vlm = _load_model(model)
        hidden = int(vlm.model.config.text_config.hidden_size)
        if explicit is not None and max(explicit) >= hidden:
            raise InputError(f"--dims: dimension {max(explicit)} is past the text backbone's hidden size {hidden}")
        cal = load_or_calibrate(vlm, force=force, dims=explicit)
    path = calibration_path(vlm)
    if as_json:
        payload = {**json.loads(cal.to_json()), "model": vlm.name, "tau": default_tau(hidden), "path": str(path)}
        typer.echo(json.dumps(payload, indent=1))
        return
    typer.echo(f"{vlm.name} ({ckpt.path}): sink dimensions {', '.join(map(str, cal.dims))} ({cal.source})")
    if cal.source == "calibrated":
        typer.echo(
            f"  first-token sink score {cal.first_token_score:.2f}, other tokens p99 {cal.other_tokens_p99:.2f}, "
            f"tau {default_tau(hidden):.2f}; image tokens over tau {cal.image_sink_share:.1%}; "
            f"massive activation: {'yes' if cal.massive else 'no (VAR will find few or no sinks)'}"
        )
    typer.echo(f"  cached at {path}")


@app.command()
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
    _quiet()
    from grounding import LocateParams, load_or_discover
    from grounding import locate as run_locate

    params = LocateParams(
        sigma=sigma,
        threshold=threshold,
        peak_fraction=peak_fraction,
        component="peak" if threshold == "peak_fraction" else "largest",
    )

    with _stdout_to_stderr():
        vlm = _load_model(model)
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
            with _stdout_to_stderr(), atomic_output(path) as tmp:
                save_heatmap(tmp, pil, loc.values, loc.layout, f"{query}", box=loc.box, point=loc.point)
        except OutputError as e:
            fail_after_result(e)


@app.command()
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
    _quiet()
    from lucid.analyze import run_analyze

    with _stdout_to_stderr():
        vlm = _load_model(model)
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


@testbed_app.command("calibrate-risk")
def testbed_calibrate_risk(
    model: Annotated[str, typer.Option(help="'testbed' or a local llava-hf checkpoint directory.")] = "testbed",
    n: Annotated[int, typer.Option(min=10, help="Calibration scenes.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the calibration scenes (not the held-out 12345).")] = 2024,
    n_eval: Annotated[int, typer.Option(min=10, help="Held-out scenes for the AUROC report.")] = 300,
    out: Annotated[
        Path | None, typer.Option(help="Risk model JSON (default: lucid_risk.json in the checkpoint).")
    ] = None,
) -> None:
    """Fit the hallucination-risk score (mitigation.risk) on testbed scenes and report its held-out AUROC."""
    from vlm.checkpoint import inspect_checkpoint
    from vlm.contract import check_seed

    check_seed(seed, "--seed")
    ckpt = inspect_checkpoint(model)
    path = checked_output(out, (".json",), "risk model") if out is not None else None
    _quiet()
    from dataclasses import replace

    from mitigation.risk import RISK_FILE
    from testbed.risk import VARIANTS, calibrate, collect, cross_validated, measure
    from testbed.world import WorldConfig, scenes

    with _stdout_to_stderr():
        vlm = _load_model(model)
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


def _register_modules() -> None:
    from lucid import eval_cmd, segment_cmd, serve_cmd

    segment_cmd.register(app, testbed_app)
    eval_cmd.register(app, testbed_app)  # lucid eval, lucid testbed eval (its alias)
    serve_cmd.register(app)  # lucid serve


_register_modules()


def main() -> None:
    try:
        app(prog_name="lucid")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
