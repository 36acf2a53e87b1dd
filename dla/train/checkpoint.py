"""Checkpoints: one directory per saved step, written under a temporary name and renamed.

``OUT_DIR/checkpoints/step_0000500/`` holds the model as ``save_pretrained`` writes it (so
``DLAForCausalLM.from_pretrained``, ``AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)`` and lm-evaluation-harness load it directly), the tokenizer for text
runs, and ``trainer_state.pt``: optimizer, LR scheduler, step, RNG states, data position and the
config. ``OUT_DIR/checkpoints/latest`` names the newest complete one. A crash while writing
leaves only a ``.tmp-*`` directory behind, never a half-written checkpoint under a real name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from dla.errors import UserError

TRAINER_STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.json"  # the run's config, next to the model (read by dla eval / inspect)


def quiet_transformers() -> None:
    """No per-shard progress bars from transformers while saving and loading checkpoints."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir: str | Path, step: int, write_model, trainer_state: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically: ``write_model(directory)`` writes the model (and
    tokenizer) files, ``trainer_state`` goes to ``trainer_state.pt``. Keeps the newest ``keep``."""
    root = checkpoints_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final, tmp = root / name, root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_model(tmp)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    if final.exists():  # the same step saved again (e.g. by a resumed run): swap it out
        old = root / f".old-{name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / "latest")
    for stale in sorted(root.glob("step_*"))[:-keep]:
        if stale.name != name:
            shutil.rmtree(stale)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    pointer = checkpoints_dir(out_dir) / "latest"
    if not pointer.exists():
        return None
    return checkpoints_dir(out_dir) / pointer.read_text().strip()


def resolve_checkpoint(path: str | Path) -> Path:
    """A directory with a saved model: ``path`` itself, or the latest checkpoint of the run
    directory ``path``."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None and (latest / "config.json").is_file():
        return latest
    raise UserError(f"no checkpoint at {path}: expected a directory with config.json (a saved model) "
                    "or a training run's out_dir with checkpoints/latest")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model(path: str | Path, device="cpu"):
    """``(model, tokenizer, train_config)`` of a saved checkpoint (or a run directory's latest):
    the :class:`dla.DLAForCausalLM` in eval mode, the tokenizer saved with it (``None`` for a
    synthetic-task model), and the training config as a dict (``None`` if it was not trained by
    ``dla train``)."""
    from dla.data.tokenizer import HFTokenizer
    from dla.models import DLAForCausalLM

    directory = resolve_checkpoint(path)
    quiet_transformers()
    model = DLAForCausalLM.from_pretrained(directory).to(device).eval()
    tokenizer = HFTokenizer(str(directory)) if (directory / "tokenizer_config.json").is_file() else None
    config_path = directory / TRAIN_CONFIG
    train_config = json.loads(config_path.read_text()) if config_path.is_file() else None
    return model, tokenizer, train_config


def load_trainer_state(checkpoint: Path) -> dict:
    path = checkpoint / TRAINER_STATE
    if not path.is_file():
        raise UserError(f"{checkpoint} has no {TRAINER_STATE}: it is a saved model, not a resumable checkpoint")
    return torch.load(path, map_location="cpu", weights_only=False)
