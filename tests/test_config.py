from pathlib import Path

import pytest

from sftflow.configs.loader import ConfigError, flatten, load_config
from sftflow.configs.schema import PipelineConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["smoke.yaml", "demo.yaml", "gsm8k_tools.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert Path(cfg.data.root).is_absolute()
    assert cfg.data.sources


def test_overrides_reach_nested_fields_and_parse_yaml_scalars():
    cfg = load_config(REPO / "configs/smoke.yaml",
                      ["train.lora.r=16", "train.method=full", "eval.mmlu.subtasks=[anatomy]", "offline=false"])
    assert cfg.train.lora.r == 16 and cfg.train.method == "full"
    assert cfg.eval.mmlu.subtasks == ["anatomy"]
    assert cfg.offline is False


def test_a_mapping_override_replaces_the_mapping_it_names():
    demo = REPO / "configs/demo.yaml"
    assert load_config(demo).gate.max_forgetting == {"mmlu": 0.05, "bbh": 0.05}
    assert load_config(demo, ["gate.max_forgetting={mmlu: 1.0}"]).gate.max_forgetting == {"mmlu": 1.0}
    assert load_config(demo, ["gate.max_forgetting={}"]).gate.max_forgetting == {}
    # a leaf inside the mapping still changes only that leaf, and later overrides win
    cfg = load_config(demo, ["gate.max_forgetting.bbh=0.2", "gate.min_gain=0.1", "gate.min_gain=0.2"])
    assert cfg.gate.max_forgetting == {"mmlu": 0.05, "bbh": 0.2} and cfg.gate.min_gain == 0.2


def test_a_base_tree_is_not_changed_by_overrides():
    base = {"data": {"sources": [{"path": "x.jsonl"}]}, "gate": {"max_forgetting": {"mmlu": 0.1}}}
    load_config(None, ["gate.max_forgetting.mmlu=0.3"], base=base)
    assert base["gate"]["max_forgetting"] == {"mmlu": 0.1}


def test_bad_value_names_file_field_value_and_allowed():
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/smoke.yaml", ["train.method=qlora2"])
    msg = str(err.value)
    assert "smoke.yaml" in msg and "train.method" in msg and "'qlora2'" in msg
    assert "'lora'" in msg and "'full'" in msg


def test_unknown_field_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/smoke.yaml", ["train.lora.rank=4"])
    assert "train.lora.rank" in str(err.value) and "r, alpha, dropout, target_modules" in str(err.value)


def test_ratio_bounds_are_enforced():
    with pytest.raises(ConfigError, match="split.test_ratio"):
        load_config(REPO / "configs/smoke.yaml", ["split.test_ratio=0.9"])


def test_source_needs_exactly_one_location(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  sources:\n    - {path: a.jsonl, hub: org/name}\n")
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        load_config(cfg)


def test_invalid_yaml_names_the_line(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("name: x\ndata:\n  sources: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        load_config(cfg)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(REPO / "configs/smoke.yaml", ["train.method"])


def test_flatten_and_digest_are_stable():
    cfg = load_config(REPO / "configs/smoke.yaml")
    flat = flatten(cfg)
    assert flat["train.lora.r"] == "4" and flat["model.base"] == "tiny-random-llama"
    assert flat["eval.mmlu.subtasks"] == '["anatomy", "virology"]'
    assert cfg.digest() == PipelineConfig.model_validate(cfg.model_dump()).digest()
    assert cfg.digest() != load_config(REPO / "configs/smoke.yaml", ["train.lora.r=8"]).digest()
