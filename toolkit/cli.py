"""The `fedkit` command line. Each command parses its options, calls one library function and
renders the result with Rich; a FedkitError becomes one line on stderr and exit code 1."""

from __future__ import annotations

import functools
from typing import Annotated, Callable

import typer
from rich.console import Console

from toolkit import __version__
from toolkit.errors import FedkitError

app = typer.Typer(
    name="fedkit",
    help="Federated transfer learning and split learning for pretrained vision models on phones.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def fails_cleanly(fn: Callable) -> Callable:
    """Turns a FedkitError into one red line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FedkitError as exc:
            err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from exc

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"fedkit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Federated transfer learning and split learning for pretrained vision models on phones."""
