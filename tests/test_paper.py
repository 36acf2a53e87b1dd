"""The paper recipe: configs (sizes, tiny instantiation), the throughput benchmark's --tiny mode."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mixer_helpers import one_thread  # noqa: F401 (autouse fixture)

import dla
from dla.train.distributed import enable_activation_checkpointing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the recipe is part of experiments/, which uses the package

from experiments.paper.recipe import (  # noqa: E402
    TARGETS,
    load,
    model_config,
    paper_configs,
    parameter_table,
    parameters_of,
)


def test_every_target_has_a_config_and_its_size():
    rows = {r["config"]: r for r in parameter_table()}
    assert set(rows) == set(TARGETS)
    for name, row in rows.items():
        assert abs(row["parameters"] / row["target"] - 1) < 0.10, (name, row["parameters"])
    assert rows["dla_mamba2_780m"]["capacity"] == rows["dla_gdn_1.3b"]["capacity"] == 30
    assert rows["loglinear_mamba2_780m"]["capacity"] == 15  # fenwick: ceil(log2 16384) + 1, fixed by the length


@pytest.mark.parametrize("name", list(TARGETS))
def test_paper_config_at_a_tiny_width_has_the_same_structure_and_trains(name):
    cfg = load(name)
    assert cfg.data.seq_len == 16384 and cfg.parallel == "fsdp" and cfg.activation_checkpointing
    assert cfg.data.text.streaming and cfg.data.text.packing == "varlen" and cfg.data.text.hf_dataset
    full, tiny = model_config(cfg), model_config(cfg, tiny=True)
    for key in ("mixer", "policy", "capacity", "threshold", "expand", "expand_v", "n_groups"):
        assert getattr(full, key) == getattr(tiny, key), key
    if full.mixer == "gated_deltanet":
        assert full.num_heads == tiny.num_heads
    assert parameters_of(tiny) < 1e6
    torch.manual_seed(0)
    model = dla.DLAForCausalLM(tiny).train()
    enable_activation_checkpointing(model)
    ids = torch.randint(0, tiny.vocab_size, (1, 48))
    out = model(ids, cu_seqlens=torch.tensor([0, 20, 48]), labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in model.parameters())


def test_paper_configs_resolve_for_dla_train():
    from dla.cli import main

    assert main(["train", str(ROOT / "experiments/paper/dla_gdn_1.3b.yaml"), "--print-config"]) == 0
    assert paper_configs() == list(TARGETS)


def test_train_throughput_timeout_kills_the_torchrun_workers(tmp_path):
    """A config stopped at its share (10 s; 1,000 warm-up steps never finish) takes its torchrun
    workers with it: none may go on running beside the next config."""
    out = tmp_path / "tp.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/train_throughput.py"), "--tiny", "--gpus", "2", "--configs",
           "dla_gdn_1.3b", "--warmup", "1000", "--deadline", "1", "--seq-len", "72", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "timed out" in json.loads(out.read_text())["rows"][0]["error"]
    time.sleep(1)
    left = []  # processes whose command line is this config's worker (read from /proc: no pgrep needed)
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        if b"--worker" in args and b"dla_gdn_1.3b" in args and b"72" in args:
            left.append(cmdline.parent.name)
    assert not left, f"worker processes left running: {left}"


def test_train_throughput_names_a_failed_configs_error(tmp_path):
    """A config that fails (here its batch of 10^12 tokens cannot be allocated) is recorded with the
    exception's own line, not the last line of the child's stdout (which an out-of-memory leaves empty)."""
    out = tmp_path / "tp.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/train_throughput.py"), "--tiny", "--configs", "dla_gdn_1.3b",
           "--steps", "1", "--warmup", "0", "--seq-len", str(10**12), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    error = json.loads(out.read_text())["rows"][0]["error"]
    assert error.startswith("exit 1: RuntimeError:") and "allocate" in error, error
    assert "Traceback" in result.stderr  # the child's stderr still reaches the terminal


def test_train_throughput_tiny_on_cpu(tmp_path):
    """Far more steps than the 45 s deadline allows: the child stops timing in time and reports the
    steps it measured (before, the parent killed it at its share and kept only an error)."""
    out = tmp_path / "tp.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/train_throughput.py"), "--tiny", "--configs", "dla_gdn_1.3b",
           "--steps", "100000", "--budget", "1000", "--warmup", "1", "--deadline", "45", "--rows", "2",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(out.read_text())["rows"][0]
    assert "error" not in row, row
    assert row["config"] == "dla_gdn_1.3b" and 1 <= row["steps_timed"] < 100000 and row["tokens_per_s"] > 0
    assert len(row["step_times_s"]) == row["steps_timed"]
    assert row["step_s"] == pytest.approx(sum(row["step_times_s"]) / row["steps_timed"])
    assert row["rows"] == 2 and row["tokens_per_step"] == 2 * row["seq_len"]  # two packed rows per step
    assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_s"])
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks/train_throughput.py"), "--estimate", str(out)],
                           capture_output=True, text=True, timeout=120).stdout
    assert "| dla_gdn_1.3b | 1 (cpu) |" in table
