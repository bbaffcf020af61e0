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
               [--batch-size B] [--address ADDR] [--submit http://HEAD:8265]   (lucid/cli/eval_cmd.py)
    lucid segment IMAGE [QUERY] [--point X,Y[:0|1]]... [--box X0,Y0,X1,Y1]... [--sam SPEC] [--out PNG] [--json]
    lucid testbed train-sam --seed S --out DIR / lucid testbed eval-sam [--sam SPEC] / lucid sam-to-hf SRC OUT
    lucid dyvte fit [--model M] [--data FOLDER] [--out DIR] [--json]   (DyVTE's calibration and routers)
The dispatcher: it builds the typer app with the shared error contract (`lucid.cli.common.LucidGroup`) and
registers every command module (`*_cmd.py`, each one command family with a `register(app, testbed_app)`).
No command module imports this one.
"""

from __future__ import annotations

import sys

import typer

from lucid.cli import (
    analyze_cmd,
    ask_cmd,
    bench_cmd,
    dyvte_cmd,
    eval_cmd,
    locate_cmd,
    methods_cmd,
    segment_cmd,
    serve_cmd,
    testbed_cmd,
)
from lucid.cli.common import LucidGroup

app = typer.Typer(
    cls=LucidGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Lucid: VLMs that answer from the image.",
)
testbed_app = typer.Typer(no_args_is_help=True, help="The shapes-world testbed and its embedded tiny LLaVA.")
app.add_typer(testbed_app, name="testbed")

# the order is the order of `lucid --help`
COMMANDS = (
    ask_cmd,
    bench_cmd,
    testbed_cmd,
    methods_cmd,
    dyvte_cmd,
    locate_cmd,
    analyze_cmd,
    segment_cmd,
    eval_cmd,
    serve_cmd,
)
for _module in COMMANDS:
    _module.register(app, testbed_app)


def main() -> None:
    try:
        app(prog_name="lucid")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
