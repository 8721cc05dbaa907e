"""The rich console every command prints through."""
from __future__ import annotations

import os

PIPE_WIDTH = 160  # columns when output goes to a file or a pipe


def make_console():
    """A console on stdout. On a terminal it takes the terminal's width; in a log file or a pipe, where
    rich would assume 80 columns (wrapping lines and squeezing tables into "res…" cells), it uses
    ``PIPE_WIDTH`` unless ``COLUMNS`` says otherwise."""
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=PIPE_WIDTH)
    return console
