"""`python -m sftflow.cli`: the same app as the `sftflow` command."""

from sftflow.cli.app import app

app()
