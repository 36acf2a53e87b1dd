"""Training configs: files, overrides, types, and errors that name the key."""

import pytest

from dla.errors import ConfigError
from dla.train.config import TrainConfig, load_config


def test_defaults_and_nested_overrides():
    cfg = load_config(None, ["steps=7", "optim.lr=3e-4", "data.mqar.num_kv_pairs=16", "data.text.paths=a.jsonl,b.txt",
                             "optim.betas=[0.8, 0.9]", "model.policy=fenwick", "model.capacity=8", "model.period=null",
                             "data.needle.depth=none", "data.mqar.random_non_queries=false"])
    assert isinstance(cfg, TrainConfig) and cfg.steps == 7 and cfg.optim.lr == 3e-4
    assert cfg.data.mqar.num_kv_pairs == 16 and cfg.data.mqar.random_non_queries is False
    assert cfg.data.text.paths == ["a.jsonl", "b.txt"] and cfg.optim.betas == [0.8, 0.9]
    assert cfg.model == {"policy": "fenwick", "capacity": 8, "period": None}
    assert cfg.data.needle.depth is None and cfg.data.seq_len == 256


def test_yaml_and_toml_files_then_overrides(tmp_path):
    pytest.importorskip("yaml", reason="PyYAML is not installed (optional: pip install pyyaml)")
    (tmp_path / "c.yaml").write_text("steps: 5\noptim:\n  lr: 1.0e-2\ndata:\n  task: needle\n"
                                     "  needle:\n    value_len: 3\nmodel:\n  hidden_size: 32\n")
    cfg = load_config(tmp_path / "c.yaml", ["optim.lr=0.5"])
    assert (cfg.steps, cfg.optim.lr, cfg.data.task, cfg.data.needle.value_len) == (5, 0.5, "needle", 3)
    assert cfg.model == {"hidden_size": 32}
    (tmp_path / "c.toml").write_text('steps = 9\n[data.text]\npaths = ["x.jsonl"]\n[model]\npolicy = "single"\n')
    cfg = load_config(tmp_path / "c.toml")
    assert (cfg.steps, cfg.data.text.paths, cfg.model) == (9, ["x.jsonl"], {"policy": "single"})


@pytest.mark.parametrize("override, message", [
    ("stepz=3", "unknown config key 'stepz'; did you mean 'steps'"),
    ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    ("data.mqar.pairs=3", "unknown config key 'data.mqar.pairs'"),
    ("optim.lr=fast", "optim.lr must be float, got 'fast'"),
    ("steps=1.5", "steps must be int"),
    ("steps=0", "steps must be >= 1"),
    ("precision=fp8", "precision must be one of"),
    ("optim.lr.x=1", "optim.lr must be float"),
    ("novalue", "must look like key=value"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.toml").write_text("steps = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml: cannot parse the config"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "c.ini").write_text("")
    with pytest.raises(ConfigError, match="must end in .yaml, .yml, .toml or .json"):
        load_config(tmp_path / "c.ini")
