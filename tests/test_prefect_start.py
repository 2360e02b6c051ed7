"""Two runs that start at once on one state dir: their ephemeral Prefect servers take turns at the database.

A server on a new database migrates it in one long write transaction; a second server connecting meanwhile fails
"database is locked". env.start_local_prefect starts one server at a time per Prefect home.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys

    import psutil
    from prefect import flow
    from prefect.server.api.server import SubprocessASGIServer

    from sftflow import env

    @flow
    def tiny():
        return 1

    open(sys.argv[1], "w").close()  # about to start its server
    env.start_local_prefect()
    started = psutil.Process(SubprocessASGIServer().server_process.pid).create_time()
    assert tiny() == 1  # on that server: Prefect's client reuses it
    print(f"SERVER {started}")
""")


@pytest.mark.slow
def test_runs_starting_at_once_start_their_servers_one_at_a_time(tmp_path):
    import fcntl
    import time

    environ = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    environ["PREFECT_HOME"] = str(tmp_path / "prefect")  # a new database: the case that locked
    (tmp_path / "prefect").mkdir()
    with (tmp_path / "prefect" / "server-start.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another run starting its server
        ready = [tmp_path / f"ready-{i}" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(r)], env=environ, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in ready]
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # both are asking for their server now
        released = time.time()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert "database is locked" not in out, out[-3000:]
    started = [float(line.split()[1]) for out in outs for line in out.splitlines() if line.startswith("SERVER ")]
    # Neither server started while the lock was held (psutil's start times can be up to a second early: it adds
    # the process's age to a boot time in whole seconds); without the lock both start about 3 s before release.
    assert len(started) == 2 and min(started) > released - 1.2, (started, released)
