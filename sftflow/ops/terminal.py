"""The terminal every command prints to."""

from __future__ import annotations

import sys

from rich.console import Console

# Logs and CI have no terminal: rich would fold tables to 80 columns and cut the CIs.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
