"""The per-name history: written whole or not at all (a SIGKILL mid-write leaves nothing a later run reads),
idempotent, and damage is an error naming the folder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sftflow import history
from sftflow.records import write_jsonl


def split_dir(path, n: int = 3):
    path.mkdir(parents=True)
    write_jsonl(path / "index.jsonl", [{"key": f"k{i}", "split": "test" if i == 0 else "train", "id": f"r{i}",
                                        "source": "s"} for i in range(n)])
    np.save(path / "signatures.npy", np.zeros((n, 128), np.uint32))
    write_jsonl(path / "test.jsonl", [{"id": "r0", "messages": []}])
    (path / "minhash.json").write_text(json.dumps({"num_perm": 128}))
    return path


def test_a_process_killed_while_recording_leaves_no_version_and_a_rerun_records_it(tmp_path):
    src = split_dir(tmp_path / "split")
    script = (
        "import os, shutil, signal, sys\n"
        "from pathlib import Path\n"
        "from sftflow import history\n"
        "copy = shutil.copyfile\n"
        "def dying(a, b):\n"
        "    copy(a, b)\n"
        "    if Path(b).name == 'signatures.npy':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "history.shutil.copyfile = dying\n"
        f"history.record('killed', 1, Path({str(src)!r}), {{}})\n")
    proc = subprocess.run([sys.executable, "-c", script], env=os.environ.copy())
    assert proc.returncode == -9
    assert history.versions("killed") == [] and history.files("killed") == []
    path = history.record("killed", 1, src, {"run_id": "r"})
    assert [v.version for v in history.versions("killed")] == [1]
    assert json.loads((path / "version.json").read_text())["counts"] == {"train": 2, "val": 0, "test": 1}
    assert history.record("killed", 1, src, {"run_id": "other"}) == path  # recorded once


def test_a_split_folder_without_the_history_files_is_an_error_naming_them(tmp_path):
    (tmp_path / "old").mkdir()
    with pytest.raises(history.HistoryError, match="index.jsonl.*predates"):
        history.record("old-run", 1, tmp_path / "old", {})


def test_the_evaluation_set_a_version_was_judged_on_is_its_frozen_test_set(tmp_path):
    src = split_dir(tmp_path / "split")
    judged = tmp_path / "heldout_items.jsonl"
    write_jsonl(judged, [{"id": "r0", "messages": []}, {"id": "v1:r9", "messages": []}])
    path = history.record("judged", 1, src, {}, judged_on=judged)
    assert (path / "test.jsonl").read_text() == judged.read_text()
