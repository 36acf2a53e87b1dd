"""A training run's directory stays consistent: one run at a time, safe and checked resume state,
no leftovers of a killed run, checkpoints that are good when called good, overrides on resume."""

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from mixer_helpers import one_thread  # noqa: F401 (autouse)
from test_cli import TINY, train

from dla.cli import main
from dla.train.metrics import MetricsLog, read_metrics


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny MQAR run of 4 steps, checkpoints at 2 and 4: copy it before changing it."""
    out = tmp_path_factory.mktemp("saved")
    train(*TINY, f"out_dir={out}", "steps=4", "checkpoint_every=2", "log_every=1")
    return out


@pytest.fixture
def run(saved_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    return out


def resume(run, *items, expect=0):
    train(*TINY, f"out_dir={run}", "checkpoint_every=2", "log_every=1", *items, "--resume", expect=expect)


# ----------------------------------------------------------------------------- the run-directory lock
def test_a_second_run_on_the_same_out_dir_is_refused(run, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": "now"}))
        before = sorted(p.name for p in (run / "checkpoints").iterdir())
        resume(run, "steps=6", expect=2)
        line = error_line(capsys)
        assert f"is in use by another dla train run (pid {sleeper.pid} on host {socket.gethostname()}" in line
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing touched
        assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    finally:
        sleeper.kill()
        sleeper.wait()
    # its owner is gone now: the lock is stale, taken over, and released at the end
    resume(run, "steps=6")
    assert not (run / ".lock").exists()


def test_a_lock_of_another_host_names_the_file_to_delete(run, capsys):
    (run / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    resume(run, "steps=6", expect=2)
    assert f"if that run is no longer running, delete {run / '.lock'}" in error_line(capsys)


def test_two_processes_on_one_out_dir(tmp_path):
    """A second real ``dla train`` process on a running run's out_dir stops at once; the first goes on."""
    import time

    args = [sys.executable, "-m", "dla", "train", *TINY, f"out_dir={tmp_path}", "steps=100000", "log_every=1",
            "checkpoint_every=0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cwd = os.path.dirname(os.path.dirname(__file__))
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "metrics.jsonl").is_file() or not read_metrics(tmp_path / "metrics.jsonl"):
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.2)
        second = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300, check=False)
        assert second.returncode == 2 and "is in use by another dla train run" in second.stderr, second.stderr
        assert first.poll() is None  # untouched
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows only
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{steps[-1]:07d}"
    assert not (tmp_path / ".lock").exists()


def test_out_dir_that_is_a_file_or_not_writable(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    train(*TINY, f"out_dir={tmp_path / 'file'}", "steps=2", expect=2)
    assert "is a file, not a directory" in error_line(capsys)
    train(*TINY, f"out_dir={tmp_path / 'file' / 'sub'}", "steps=2", expect=2)
    assert "a part of the path is a file" in error_line(capsys)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # (the suite may run as root)
    train(*TINY, f"out_dir={tmp_path / 'ro'}", "steps=2", expect=2)
    assert "is not writable" in error_line(capsys)


# ----------------------------------------------------------------------------- leftovers of a killed run
def test_stale_temporary_checkpoints_are_removed_at_the_next_start(run):
    root = run / "checkpoints"
    (root / ".tmp-step_0000006-12345").mkdir()
    (root / ".tmp-step_0000006-12345" / "model.safetensors").write_bytes(b"half")
    (root / ".latest-12345").write_text("step_0000006\n")
    (root / "step_0000002").rename(root / ".old-step_0000002-999")  # killed while re-saving step 2
    resume(run, "steps=4")  # nothing left to train: only the start-up
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "step_0000002", "step_0000004"]


# ----------------------------------------------------------------------------- the trainer state
def test_resume_loads_the_trainer_state_without_running_pickled_code(run, tmp_path, capsys):
    state = torch.load(run / "checkpoints" / "step_0000004" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and state["next_batch"] == 4

    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state["config"] = Planted()
    with open(run / "checkpoints" / "step_0000004" / "trainer_state.pt", "wb") as f:
        pickle.dump(state, f)
    resume(run, "steps=6", expect=2)
    line = error_line(capsys)
    assert "trainer_state.pt cannot be loaded safely" in line and not marker.exists()


def test_a_trainer_state_of_the_earlier_format_still_resumes(run):
    """Before, the RNG states were numpy's and Python's own objects (numpy arrays are allowed)."""
    import random

    import numpy as np

    path = run / "checkpoints" / "step_0000004" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    np.random.seed(3)
    random.seed(3)
    state["rng"]["numpy"], state["rng"]["python"] = np.random.get_state(), random.getstate()
    torch.save(state, path)
    resume(run, "steps=6")
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage, message", [
    ("truncate", "trainer_state.pt cannot be loaded safely"),
    ("foreign", r"is not a dla trainer state \(it holds a list\)"),
    ("no_next_batch", "is not a dla trainer state: it lacks next_batch"),
    ("bad_optimizer", "the optimizer state in .* does not fit the model"),
    ("bad_rng", "its scheduler or RNG state cannot be restored"),
])
def test_a_damaged_trainer_state_is_one_error_line(run, capsys, damage, message):
    import re

    path = run / "checkpoints" / "step_0000004" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "foreign":
        torch.save([1, 2, 3], path)
    else:
        if damage == "no_next_batch":
            del state["next_batch"]
        elif damage == "bad_optimizer":
            state["optimizer"]["state"] = {"no.such.param": {"step": torch.tensor(1.0)}}
        else:
            state["rng"]["torch"] = torch.zeros(3)
        torch.save(state, path)
    resume(run, "steps=6", expect=2)
    assert re.search(message, error_line(capsys))


# ----------------------------------------------------------------------------- NaN recovery
def test_divergence_keeps_only_checkpoints_whose_weights_gave_a_finite_loss(tmp_path, capsys):
    # lr = 1e6: step 1's loss is finite, but the weights it leaves are not usable
    train(*TINY, f"out_dir={tmp_path}", "steps=30", "checkpoint_every=1", "optim.warmup_steps=1", "optim.lr=1e6",
          "optim.grad_clip=0", expect=2)
    line = error_line(capsys)
    assert "training stopped" in line and "No good checkpoint was written" in line
    assert "step_0000001" in line  # removed, and said so
    assert not list((tmp_path / "checkpoints").glob("step_*")) and not (tmp_path / "checkpoints" / "latest").exists()


def test_the_last_good_checkpoint_is_named_kept_and_resumable(tmp_path, capsys, monkeypatch):
    from dla.train import loop

    calls, real = [], loop.lm_loss

    def nan_at_step_5(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(loop, "lm_loss", nan_at_step_5)
    train(*TINY, f"out_dir={tmp_path}", "steps=10", "checkpoint_every=1", "keep_checkpoints=1", expect=2)
    line = error_line(capsys)
    good = tmp_path / "checkpoints" / "step_0000003"
    # step 4's weights gave the NaN loss of step 5: step 3 is the last good checkpoint
    assert ("the loss is nan (gradient norm nan) at step 5; training stopped. "
            f"The last good checkpoint is {good}") in line
    assert "step_0000004" in line
    assert sorted(p.name for p in good.parent.glob("step_*")) == ["step_0000003"]
    assert (good.parent / "latest").read_text().strip() == "step_0000003"
    monkeypatch.undo()
    train(*TINY, f"out_dir={tmp_path}", "steps=6", "checkpoint_every=1", "--resume")
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")][-1] == 6


def test_a_divergence_after_resuming_keeps_the_checkpoints_of_the_earlier_run(run, capsys, monkeypatch):
    from dla.train import loop

    monkeypatch.setattr(loop, "lm_loss", lambda model, batch: torch.tensor(float("nan"), requires_grad=True))
    resume(run, "steps=8", expect=2)  # the checkpoint resumed from gives a NaN loss here: it is not called good
    assert "No good checkpoint was written" in error_line(capsys)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000004"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"


def test_nan_weights_are_never_saved(tmp_path, capsys, monkeypatch):
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        if self.state and next(iter(self.state.values()))["step"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    train(*TINY, f"out_dir={tmp_path}", "steps=10", "checkpoint_every=1", expect=2)
    line = error_line(capsys)
    assert "NaN or Inf weights after the optimizer step at step 3" in line
    # step 2's weights gave step 3 a finite loss; the weights step 3 made are not saved
    assert f"The last good checkpoint is {tmp_path / 'checkpoints' / 'step_0000002'}" in line
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000001", "step_0000002"]


# ----------------------------------------------------------------------------- overrides on resume
def test_an_optimizer_override_on_resume_takes_effect(run, capsys):
    from dla.train.config import OptimConfig
    from dla.train.optim import lr_factor

    resume(run, "steps=6", "optim.lr=3e-2")
    assert "optim.lr: 0.001 -> 0.03" in capsys.readouterr().out
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    optim = OptimConfig(lr=3e-2, warmup_steps=5)
    # the logged lr is the one after the step's scheduler update, for the next step
    assert rows[4]["lr"] == pytest.approx(3e-2 * lr_factor(5, 6, optim))
    assert rows[5]["lr"] == pytest.approx(3e-2 * lr_factor(6, 6, optim))
    state = torch.load(run / "checkpoints" / "step_0000006" / "trainer_state.pt", weights_only=True)
    assert state["scheduler"]["base_lrs"] == [3e-2, 3e-2]


def test_a_changed_model_config_on_resume_is_refused_unless_allowed(run, capsys):
    resume(run, "steps=6", "model.threshold=0.2", expect=2)
    line = error_line(capsys)
    assert "model.threshold: 0.05 -> 0.2" in line and "--allow-config-change" in line
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"  # nothing written
    resume(run, "steps=6", "data.task=needle", expect=2)
    assert "data.task: 'mqar' -> 'needle'" in error_line(capsys)
    # allowed: the new config's model with the saved weights; the files written agree
    resume(run, "steps=6", "model.threshold=0.2", "--allow-config-change")
    saved = run / "checkpoints" / "step_0000006"
    assert json.loads((saved / "config.json").read_text())["threshold"] == 0.2
    assert json.loads((saved / "train_config.json").read_text())["model"]["threshold"] == 0.2
    # a model of another shape cannot take the saved weights
    resume(run, "steps=8", "model.threshold=0.2", "model.hidden_size=64", "--allow-config-change", expect=2)
    assert "do not fit the model" in error_line(capsys)


def test_allow_config_change_needs_resume(tmp_path, capsys):
    train(*TINY, f"out_dir={tmp_path}", "steps=2", "--allow-config-change", expect=2)
    assert "--allow-config-change goes with --resume" in error_line(capsys)


# ----------------------------------------------------------------------------- damaged checkpoints
DAMAGES = {
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500]),
                          "model.safetensors cannot be read"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
    "malformed config": (lambda d: (d / "config.json").write_text('{"model_type": "dla", '),
                         "config.json cannot be read as JSON"),
    "other model_type": (lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"model_type": "dla"', '"model_type": "llama"')),
        "config of a 'llama' model, not a DLA model"),
    "other shape": (lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"state_size": 8', '"state_size": 16')),
        "do not fit the model"),
    "non-UTF-8 config": (lambda d: (d / "config.json").write_bytes(b'{"model_type": "dla\xff"}'),
                         "config.json cannot be read as JSON"),
    "malformed train_config": (lambda d: (d / "train_config.json").write_text("[1"),
                               "train_config.json cannot be read as JSON"),
    "other task in train_config": (lambda d: (d / "train_config.json").write_text(
        (d / "train_config.json").read_text().replace('"vocab_size": 32', '"vocab_size": 64')),
        "describes a mqar task of 64 tokens, more than the model's vocabulary"),
    "train_config without the task": (lambda d: (d / "train_config.json").write_text('{"data": {"task": "mqar"}}'),
                                      "train_config.json does not describe its data"),
}


@pytest.mark.parametrize("command", ["eval", "inspect", "resume"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_one_error_line(run, tmp_path, capsys, command, damage):
    change, message = DAMAGES[damage]
    checkpoint = run / "checkpoints" / "step_0000004"
    change(checkpoint)
    if command == "resume":
        if "train_config" in damage:
            pytest.skip("resuming reads the trainer state's config, not train_config.json")
        resume(run, "steps=6", expect=2)
    elif command == "eval":
        assert main(["eval", str(run), "--examples", "2", "--lengths", "32", "--out", str(tmp_path / "e")]) == 2
    else:
        assert main(["inspect", str(run), "--synthetic", "--out", str(tmp_path / "i")]) == 2
    assert message in error_line(capsys)


def test_nan_weights_are_refused_by_eval(run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    path = run / "checkpoints" / "step_0000004" / "model.safetensors"
    weights = load_file(path)
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    assert main(["eval", str(run), "--examples", "2", "--lengths", "32", "--out", str(tmp_path / "e")]) == 2
    assert "holds NaN or Inf weights (in model.norm.weight)" in error_line(capsys)


# ----------------------------------------------------------------------------- Ctrl-C twice
def test_a_second_ctrl_c_exits_cleanly(tmp_path, capsys, monkeypatch):
    log = MetricsLog.log

    def log_then_interrupt_twice(self, row):
        log(self, row)
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(MetricsLog, "log", log_then_interrupt_twice)
    train(*TINY, f"out_dir={tmp_path}", "steps=20", "log_every=1", expect=130)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().endswith("interrupted")
    assert not (tmp_path / ".lock").exists()
