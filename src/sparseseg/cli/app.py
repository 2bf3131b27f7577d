"""The Typer app every command registers on, and what the commands share: the consoles, the
`friendly` error wrapper, Rich progress bars and the parsing of comma-separated numbers.

Only the CLI creates Rich progress bars; the library takes a `(task, done, total)` callback. Any
`SparsesegError` becomes one red line on stderr and exit code 2. This module imports no command
module: each of those imports `app` from here (`sparseseg/cli/__init__.py` imports them all).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sparseseg.errors import SparsesegError

app = typer.Typer(help="Choose the few pixels worth labelling: diffusion-driven two-stage active learning.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)


def friendly(fn: Callable) -> Callable:
    """Turn SparsesegError into one line and exit code 2 (no stack trace from deep inside)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SparsesegError as exc:
            # escaped: a message may hold brackets ("[#ffffff]", a file named img[1].png) that are no markup
            err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@contextmanager
def progress_bars():
    """A Rich progress display and a `(task, done, total)` callback that drives it."""
    with Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=False) as bars:
        tasks: dict[str, int] = {}

        def update(task: str, done: int, total: int) -> None:
            if task not in tasks:
                tasks[task] = bars.add_task(task, total=total)
            bars.update(tasks[task], completed=done, total=total)
            if done >= total and task != "rounds":  # finished sub-tasks make room for the next round's
                bars.remove_task(tasks.pop(task))

        yield update


def int_list(text: str) -> tuple[int, ...]:
    """'50,150, 250' -> (50, 150, 250); empty items dropped."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SparsesegError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str, option: str) -> list[float]:
    """'0.3,0.6' -> [0.3, 0.6]; `option` names the flag in the error."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SparsesegError(f"{option} {text!r}: expected comma-separated numbers") from None
