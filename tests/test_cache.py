from pathlib import Path

import pytest

from sftflow import cache
from sftflow.configs.schema import SplitConfig


def test_key_depends_on_content_not_path(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("x\n")
    b.write_text("x\n")
    cfg = SplitConfig()
    assert cache.key(a, cfg) == cache.key(b, cfg)
    b.write_text("y\n")
    assert cache.key(a, cfg) != cache.key(b, cfg)
    assert cache.key(a, cfg) != cache.key(a, SplitConfig(seed=cfg.seed + 1))


def test_entry_is_published_only_when_complete(tmp_path):
    k = cache.key("test", str(tmp_path))
    with pytest.raises(RuntimeError):
        with cache.fill("unit", k) as d:
            (d / "out.txt").write_text("half")
            raise RuntimeError("killed")
    assert cache.lookup("unit", k) is None
    with cache.fill("unit", k) as d:
        (d / "out.txt").write_text("done")
    hit = cache.lookup("unit", k)
    assert hit is not None and (Path(hit) / "out.txt").read_text() == "done"
