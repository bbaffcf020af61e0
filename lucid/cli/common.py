"""What every `lucid` command shares: the error contract (`LucidGroup`), output helpers, option parsing.

Error contract, for every command (commands added later get it for free): an `InputError` (lucid.errors)
raised by a command, or a usage error from the parser, prints one `lucid: error: ...` line on stderr and
exits 2; with `--json`, stdout also gets `{"error": {"type", "message"}}`. A command checks the user's input
(image, question, numbers, checkpoint files, output paths) before importing torch, writes outputs through
`vlm.contract.atomic_output`, and prints its result before reporting a failure to write it.
Machine-readable output (`--json`, `--out -`, `testbed eval`) owns stdout: the work runs under
`stdout_to_stderr()`, so progress and logs go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from lucid.errors import InputError, OutputError  # noqa: E402  (light: no torch)

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
def stdout_to_stderr() -> Iterator[None]:
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


def parse_method_options(specs: list[str] | None):
    """--method specs -> registered methods, composed in the order given (a bad name or value raises
    MethodError, an InputError listing what is valid)."""
    from mitigation.methods import parse_methods

    return parse_methods(specs or [])


METHOD_HELP = "A mitigation method NAME[:k=v,...] (repeatable, composes in order; see `lucid methods`)."


def load_model(model: str, device: str | None = None):
    """load_vlm (a bad checkpoint raises CheckpointError, reported by LucidGroup)."""
    from vlm import load_vlm

    return load_vlm(model, device=device)


def quiet() -> None:
    """Library logs to errors only (`vlm.loader.quiet_logs`), imported when a command starts its work."""
    from vlm.loader import quiet_logs

    quiet_logs()
