"""`sftflow history NAME`: the versions of a model name, their data deltas and gate verdicts."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from sftflow.cli.terminal import console


def history(name: Annotated[str, typer.Argument(help="registered model = pipeline config name, e.g. sftflow-demo")]
            ) -> None:
    """List every version: role, what it was judged against and the verdict, its splits, how much of its
    data was new or already seen by earlier versions, its held-out gain over the base and over the champion."""
    from sftflow.cli.operations import _connect
    from sftflow.release.lineage import versions

    _connect()
    table = Table(title=f"{name}: versions")
    for col in ("v", "role", "judged against", "gate", "train/val/test", "new/seen/near/bridges", "gain vs base",
                "vs champion", "failed checks"):
        table.add_column(col, justify="left" if col in ("role", "judged against", "failed checks") else "right")
    fmt = lambda x: "" if x is None else f"{x:+.3f}"  # noqa: E731
    for r in versions(name):
        s, d = r["splits"], r["data"]
        table.add_row(str(r["version"]), r["role"], r["judged_against"], "passed" if r["gate"] else "failed",
                      f"{s.get('train', 0)}/{s.get('val', 0)}/{s.get('test', 0)}",
                      "/".join(str(d[k]) for k in ("new", "seen", "near_seen", "bridges")) if d else "all new",
                      fmt(r["gain"]), fmt(r["vs_champion"]), "; ".join(r["failed"]) or "")
    console.print(table)
