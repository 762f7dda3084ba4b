"""Where `ff` writes: rich consoles for stdout and stderr, and the one-message error format.

Consoles are made per call rather than at import, so they follow the current `sys.stdout`/`sys.stderr`
and terminal width (test runners swap both).
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape


def out() -> Console:
    """Console on stdout; no automatic highlighting, so names and numbers print as given."""
    return Console(highlight=False)


def err() -> Console:
    return Console(stderr=True, highlight=False)


def print_error(message: str) -> None:
    """One message on stderr, `Error: ...`, never a traceback. Long lines are left to the terminal to wrap,
    so a message is never split inside a name or path."""
    err().print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)


def print_warning(message: str) -> None:
    err().print(f"[yellow]Warning:[/] {escape(message)}", soft_wrap=True)
