"""Checkpoints: one directory per saved step, written under a temporary name and renamed.

``OUT_DIR/checkpoints/step_0000500/`` holds the model as ``save_pretrained`` writes it (so
``DLAForCausalLM.from_pretrained``, ``AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)`` and lm-evaluation-harness load it directly), the tokenizer for text
runs, and ``trainer_state.pt``: optimizer, LR scheduler, step, RNG states, data position and the
config, as tensors and plain Python values only, so that it loads with ``torch.load(...,
weights_only=True)`` (a planted pickle cannot run code). ``OUT_DIR/checkpoints/latest`` names
the newest complete one. A crash while writing leaves only a ``.tmp-*`` directory behind, never a
half-written checkpoint under a real name; the next run removes it (:func:`clean_stale`).
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


def clean_stale(out_dir: str | Path) -> list[str]:
    """Remove what a killed run left in ``OUT_DIR/checkpoints``: ``.tmp-*`` directories (a checkpoint
    being written) and ``.latest-*`` files; an ``.old-step_N-*`` directory whose ``step_N`` is missing
    (killed while swapping a re-saved step) is put back. Call only while holding the run's lock.
    Returns the names removed."""
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return []
    removed = []
    for old in sorted(root.glob(".old-step_*")):
        name = old.name[len(".old-"):].rsplit("-", 1)[0]
        if not (root / name).exists():
            old.rename(root / name)
        else:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old.name)
    for stale in sorted(root.glob(".tmp-*")) + sorted(root.glob(".latest-*")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale.name)
    return removed


def point_latest(out_dir: str | Path, name: str | None) -> None:
    """Make ``checkpoints/latest`` name ``name`` (atomically), or remove it for ``None``."""
    root = checkpoints_dir(out_dir)
    if name is None:
        (root / "latest").unlink(missing_ok=True)
        return
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / "latest")


def save_checkpoint(out_dir: str | Path, step: int, write_model, trainer_state: dict, keep: int,
                    protect: Path | None = None) -> Path:
    """Write checkpoint ``step`` atomically: ``write_model(directory)`` writes the model (and
    tokenizer) files, ``trainer_state`` goes to ``trainer_state.pt``. Keeps the newest ``keep``,
    and ``protect`` (the last checkpoint known to be good) in any case."""
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
    point_latest(out_dir, name)
    for stale in sorted(root.glob("step_*"))[:-keep]:
        if stale.name != name and (protect is None or stale.name != Path(protect).name):
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
    """The RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    if isinstance(n, tuple):  # written before the RNG states were stored as plain values
        np.random.set_state(n)
    else:
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_model_config(directory: Path) -> dict:
    """The checkpoint's ``config.json``, checked to be a DLA model's (or :class:`UserError`)."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e}): the checkpoint is damaged") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object, got {type(config).__name__}: the checkpoint is damaged")
    if config.get("model_type") != "dla":
        raise UserError(f"{path} is the config of a {config.get('model_type')!r} model, not a DLA model "
                        "(model_type 'dla'): dla loads only checkpoints saved by dla")
    return config


def check_weights_file(directory: Path, config) -> None:
    """Check that ``directory/model.safetensors`` is whole and holds every weight of a model of
    ``config`` with its shape (reading only the header), or raise :class:`UserError`."""
    from safetensors import SafetensorError, safe_open

    from dla.models import DLAForCausalLM

    path = directory / "model.safetensors"
    if not path.is_file():
        raise UserError(f"{directory} has no model.safetensors: the checkpoint is incomplete")
    try:
        with safe_open(path, "pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}): the file is damaged or truncated") from None
    with torch.device("meta"):
        model = DLAForCausalLM(config)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set(model._tied_weights_keys or {}) if config.tie_word_embeddings else set()
    missing = sorted(set(own) - set(saved) - tied)
    unexpected = sorted(set(saved) - set(own))
    shapes = [f"{k} {saved[k]} (the config needs {own[k]})" for k in own if k in saved and saved[k] != own[k]]
    if missing or unexpected or shapes:
        what = "; ".join(filter(None, [shapes and "other shapes: " + ", ".join(shapes[:3]),
                                       missing and "missing: " + ", ".join(missing[:3]),
                                       unexpected and "not in the model: " + ", ".join(unexpected[:3])]))
        raise UserError(f"the weights in {path} do not fit the model of {directory / 'config.json'} ({what})")


def load_pretrained(directory: Path):
    """``DLAForCausalLM.from_pretrained(directory)`` after checking its files, so that a damaged or
    foreign checkpoint is a :class:`UserError` naming the file, not a traceback."""
    from dla.models import DLAConfig, DLAForCausalLM

    quiet_transformers()
    raw = read_model_config(directory)
    try:
        config = DLAConfig.from_dict({k: v for k, v in raw.items() if k not in ("auto_map", "architectures")})
    except (TypeError, ValueError) as e:
        raise UserError(f"{directory / 'config.json'} is not a valid DLA config: {e}") from None
    check_weights_file(directory, config)
    try:
        return DLAForCausalLM.from_pretrained(directory)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"the model in {directory} cannot be loaded: {e}") from None


def check_finite(model, where) -> None:
    """:class:`UserError` naming the first parameter with NaN or Inf values."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"{where} holds NaN or Inf weights (in {name}): the training run it comes from diverged; "
                            "use an earlier checkpoint")


def load_model(path: str | Path, device="cpu"):
    """``(model, tokenizer, train_config)`` of a saved checkpoint (or a run directory's latest):
    the :class:`dla.DLAForCausalLM` in eval mode, the tokenizer saved with it (``None`` for a
    synthetic-task model), and the training config as a dict (``None`` if it was not trained by
    ``dla train``). A damaged or foreign checkpoint, or one with NaN weights, is a
    :class:`UserError` that says which file is wrong."""
    from dla.data.tokenizer import HFTokenizer

    directory = resolve_checkpoint(path)
    model = load_pretrained(directory)
    check_finite(model, directory)
    model = model.to(device).eval()
    try:
        tokenizer = HFTokenizer(str(directory)) if (directory / "tokenizer_config.json").is_file() else None
    except (OSError, ValueError) as e:
        raise UserError(f"the tokenizer saved in {directory} cannot be loaded: {e}") from None
    config_path = directory / TRAIN_CONFIG
    train_config = None
    if config_path.is_file():
        try:
            train_config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{config_path} cannot be read as JSON ({e}): the checkpoint is damaged") from None
        if not isinstance(train_config, dict) or not isinstance(train_config.get("data"), dict):
            raise UserError(f"{config_path} is not a dla training config: the checkpoint is damaged")
    return model, tokenizer, train_config


STATE_KEYS = ("step", "next_batch", "optimizer", "scheduler", "rng", "config")


def load_trainer_state(checkpoint: Path) -> dict:
    """``trainer_state.pt`` of a checkpoint, loaded with ``weights_only=True`` and checked to hold
    what resuming needs (or :class:`UserError`)."""
    path = checkpoint / TRAINER_STATE
    if not path.is_file():
        raise UserError(f"{checkpoint} has no {TRAINER_STATE}: it is a saved model, not a resumable checkpoint")
    # numpy arrays rebuilt by these (they only make arrays) are allowed: older trainer states hold
    # numpy's RNG state as an array
    core = getattr(np, "_core", None) or np.core  # (numpy 1.x: np.core)
    numpy_array = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(numpy_array):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- truncated, foreign or unsafe files raise many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} cannot be loaded safely ({type(e).__name__}: {first[:200]}): it is damaged, "
                        "or was not written by this version of dla train") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a dla trainer state (it holds a {type(state).__name__})")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise UserError(f"{path} is not a dla trainer state: it lacks {', '.join(missing)}")
    if not isinstance(state["step"], int) or not isinstance(state["next_batch"], int) or state["step"] < 0 \
            or state["next_batch"] < 0 or not isinstance(state["config"], dict):
        raise UserError(f"{path} is damaged: step {state['step']!r}, next_batch {state['next_batch']!r}")
    return state
