"""`lucid methods` (the registry) and `lucid calibrate` (VAR's sink dimensions of a checkpoint)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from lucid.cli.common import (
    load_model,
    quiet,
    stdout_to_stderr,
)
from lucid.errors import InputError


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
        for preset, spec in row["presets"].items():
            differs = {k: v for k, v in spec["values"].items() if v != row["presets"]["official"]["values"][k]}
            values = ", ".join(f"{k}={v}" for k, v in (differs if preset != "official" else spec["values"]).items())
            typer.echo(f"  preset {preset}: {values or '(as official)'}")
            typer.echo(f"    source: {spec['source']}")
        typer.echo("")


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
    quiet()
    from mitigation.methods.var import calibration_path, default_tau, load_or_calibrate

    with stdout_to_stderr():
        vlm = load_model(model)
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


def register(app: typer.Typer, testbed_app: typer.Typer) -> None:
    app.command("methods")(methods_list)
    app.command("calibrate")(calibrate)
