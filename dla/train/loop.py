"""The training loop, top to bottom: set up, (resume,) step, log, checkpoint.

Data order: optimizer step ``s`` uses the micro-batches ``first + (s - s0) * accum * world +
a * world + rank`` for ``a < accum`` (``s0``/``first``: the step and micro-batch the run started
or resumed from). Every batch is a pure function of the seed and its index, so a resumed run
sees exactly the data the uninterrupted run would have seen, and one process with
``grad_accum = 2`` sees the same batches per step as two processes with ``grad_accum = 1``.

Stopping: Ctrl-C (SIGINT), SIGTERM (what torchrun sends its workers) or the wall-clock time
``stop_at`` finishes the current step, writes a checkpoint and returns ``status =
"interrupted"`` (continue with ``resume``); a second Ctrl-C aborts at once. A NaN or infinite
loss or gradient norm stops before the optimizer step with :class:`dla.errors.TrainingDiverged`.
A checkpoint is *good* once its weights were finite when saved and the loss computed with them (the
next step's) was finite; on divergence the checkpoints after the last good one are removed,
``checkpoints/latest`` names it again, and rotation never deletes it.

The run directory: one run at a time (:class:`dla.train.lock.RunLock`, ``OUT_DIR/.lock``); what a
killed run left (``checkpoints/.tmp-*``) is removed at the start. Resuming accepts changed
training settings (``optim.*``, ``steps``, the batch and logging settings, ...), which take
effect; a changed ``model.*``, ``data.*`` or ``seed`` is refused unless ``allow_config_change``
(then the model is built from the new config and the saved weights must fit it).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dla.data import IGNORE_INDEX, Batch, build_dataset
from dla.errors import ConfigError, TrainingDiverged, UserError
from dla.train import checkpoint as ckpt
from dla.train.config import TrainConfig, diff, to_dict
from dla.train.distributed import (
    Runtime,
    all_reduce_sum,
    enable_activation_checkpointing,
    gradient_sync,
    init_runtime,
    shutdown,
    unwrap,
    wrap_model,
)
from dla.train.lock import RunLock, prepare_out_dir
from dla.train.metrics import MetricsLog, Progress
from dla.train.optim import build_optimizer, build_scheduler, lr_factor, weight_decay_names

FIXED_ON_RESUME = ("model", "data", "seed")  # config sections a resumed run keeps (unless allow_config_change)


def train(cfg: TrainConfig, resume: bool = False, show_progress: bool = True, stop_at: float | None = None,
          allow_config_change: bool = False) -> dict:
    """Run (or, with ``resume``, continue) training as ``cfg`` says, stopping (with a checkpoint)
    after the first step that ends past ``stop_at`` (a ``time.time()`` value), e.g. before a job's
    time limit. Returns a summary: ``status`` (``"done"`` / ``"interrupted"``), ``step``,
    ``loss`` (the last step's), ``checkpoint`` (the last one written) and ``out_dir``.
    ``allow_config_change``: resume even though ``model.*``, ``data.*`` or ``seed`` changed."""
    cfg.check()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.deterministic:  # before CUDA starts: cuBLAS reads its workspace setting once
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    runtime = init_runtime(cfg.device)
    lock = None
    try:
        if runtime.is_main:  # one run per out_dir; what a killed run left is removed under the lock
            prepare_out_dir(Path(cfg.out_dir))
            lock = RunLock(cfg.out_dir).acquire()
            ckpt.clean_stale(cfg.out_dir)
        return _train(cfg, runtime, resume, show_progress, stop_at, allow_config_change)
    finally:
        if lock is not None:
            lock.release()
        shutdown(runtime)
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)


def resume_changes(saved: dict, cfg: TrainConfig, checkpoint: Path, allow_config_change: bool) -> list[str]:
    """The settings that differ from the checkpoint's run: a changed ``model``/``data``/``seed`` is a
    :class:`ConfigError` unless ``allow_config_change``; the others take effect."""
    changed = diff(saved, to_dict(cfg))
    fixed = [c for c in changed if c.split(".")[0].split(":")[0] in FIXED_ON_RESUME]
    if fixed and not allow_config_change:
        raise ConfigError(f"--resume: the config differs from the one {checkpoint} was trained with in settings a "
                          f"resumed run keeps ({'; '.join(fixed)}); undo these changes, or pass "
                          "--allow-config-change to build the model from the new config and load the saved weights "
                          "into it")
    return changed


def _train(cfg: TrainConfig, runtime: Runtime, resume: bool, show_progress: bool, stop_at: float | None,
           allow_config_change: bool = False) -> dict:
    out_dir = Path(cfg.out_dir)
    main = runtime.is_main

    # ---- data and model (a resumed run reloads the model it saved)
    state = checkpoint = None
    if resume:
        checkpoint = ckpt.latest_checkpoint(out_dir)
        if checkpoint is None:
            raise ConfigError(f"--resume: no checkpoint in {out_dir}/checkpoints (start without --resume)")
        if not checkpoint.is_dir():
            raise UserError(f"--resume: {out_dir}/checkpoints/latest names {checkpoint.name}, which does not exist")
        state = ckpt.load_trainer_state(checkpoint)
        changed = resume_changes(state["config"], cfg, checkpoint, allow_config_change)
        if changed and main:
            print(f"resuming {checkpoint} with changed settings (they take effect):\n  " + "\n  ".join(changed))
    dataset = build_dataset(cfg.data, cfg.seed)
    torch.manual_seed(cfg.seed)
    model_changed = state is not None and state["config"].get("model") != cfg.model
    model = build_model(cfg, dataset, checkpoint, rebuild=model_changed).to(runtime.device)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    decay_names = weight_decay_names(model)
    model = wrap_model(model, runtime, cfg.parallel)
    optimizer = build_optimizer(unwrap(model), decay_names, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.optim)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and runtime.device.type == "cuda")

    # ---- where to start
    step, first_batch, pending, last_good = 0, 0, None, None
    if state is not None:
        restore_state(model, optimizer, scheduler, state, cfg, checkpoint)
        # the checkpoint resumed from is good once the loss its weights give is finite
        step, first_batch, pending = state["step"], state["next_batch"], checkpoint
    start_step = step
    per_step = cfg.grad_accum * runtime.world_size
    if main:
        (out_dir / ckpt.TRAIN_CONFIG).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        print(f"{'resuming at step ' + str(step) if resume else 'training'}: {n_params:,} parameters, "
              f"{runtime.world_size} process(es) on {runtime.device.type}, "
              f"{per_step * cfg.batch_size} sequences per step, {cfg.steps} steps -> {out_dir}")
    metrics = MetricsLog(out_dir, step if resume else None) if main else None
    progress = Progress(cfg.steps, step, cfg.log_every, main=main, show=show_progress)

    written: list[Path] = []  # the checkpoints this process wrote (a divergence removes only these)

    def save() -> Path:
        if not weights_finite(model, runtime):
            raise diverged(step - 1, "NaN or Inf weights after the optimizer step", last_good, out_dir, main, written)
        path = save_training_checkpoint(cfg, runtime, model, optimizer, scheduler, dataset, step,
                                        first_batch + (step - start_step) * per_step, protect=last_good)
        written.append(path)
        return path

    # ---- the loop
    loss, tokens_seen = math.nan, 0
    started = time.perf_counter()
    try:
        with StopRequests(stop_at) as stop:
            while step < cfg.steps:
                model.train()
                loss_sum, tokens = 0.0, 0
                for a in range(cfg.grad_accum):
                    index = first_batch + (step - start_step) * per_step + a * runtime.world_size + runtime.rank
                    batch = dataset.batch(index, cfg.batch_size).to(runtime.device)
                    with gradient_sync(model, sync=a == cfg.grad_accum - 1):
                        try:
                            with torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                                micro_loss = lm_loss(model, batch)
                            (micro_loss / cfg.grad_accum).backward()
                        except ValueError as e:  # the ops refuse NaN / Inf inputs: the weights diverged
                            if "nan" not in str(e).lower():
                                raise
                            raise diverged(step, f"non-finite activations ({e})", last_good, out_dir, main,
                                           written) from e
                    loss_sum += micro_loss.item()
                    tokens += batch.num_tokens
                grad_norm = grad_clip(model, cfg.optim.grad_clip)
                loss_sum, tokens, stopping = all_reduce_sum([loss_sum, tokens, float(stop.requested)], runtime)
                loss = loss_sum / per_step
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    raise diverged(step, f"the loss is {loss} (gradient norm {grad_norm})", last_good, out_dir, main,
                                   written)
                if pending is not None:  # the weights it saved gave a finite loss: a good checkpoint
                    last_good, pending = pending, None
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                tokens_seen += int(tokens)
                elapsed = time.perf_counter() - started
                tokens_per_s = tokens_seen / max(elapsed, 1e-9)  # since this process started or resumed
                progress.update(step, loss, tokens_per_s)
                if main and (step % cfg.log_every == 0 or step == cfg.steps or stopping):
                    metrics.log({"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                                 "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "tokens": tokens_seen,
                                 "elapsed_s": elapsed})
                if stopping:
                    pending = save()
                    progress.write(f"interrupted: saved {pending} at step {step}; continue with --resume")
                    return summary("interrupted", step, loss, pending, out_dir)
                if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    pending = save()
                    progress.write(f"step {step}: loss {loss:.4f}, saved {pending}", progress=True)
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    return summary("done", step, loss, pending or last_good, out_dir)


def diverged(step: int, what: str, last_good: Path | None, out_dir: Path, main: bool = True,
             written: list[Path] = ()) -> TrainingDiverged:
    """The error for a divergence at (0-based) ``step``. The checkpoints this run wrote after
    ``last_good`` (whose weights had diverged) are removed, and ``checkpoints/latest`` names
    ``last_good`` (else the newest checkpoint left, one this run did not write)."""
    removed = []
    if main:
        for path in written:
            if (last_good is None or path.name > last_good.name) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        root = ckpt.checkpoints_dir(out_dir)
        if root.is_dir():
            left = sorted(p.name for p in root.glob("step_*"))
            ckpt.point_latest(out_dir, last_good.name if last_good is not None else (left[-1] if left else None))
    gone = f" Removed the checkpoint(s) written after it, whose weights had diverged: {', '.join(removed)}." \
        if removed else ""
    return TrainingDiverged(
        f"{what} at step {step + 1}; training stopped. "
        + (f"The last good checkpoint is {last_good}; resume from it with --resume, perhaps with a lower "
           "optim.lr." if last_good else "No good checkpoint was written (start again with a lower optim.lr, or "
           "resume an earlier checkpoint by pointing checkpoints/latest at it).")
        + gone)


def weights_finite(model, runtime: Runtime) -> bool:
    """Whether every parameter is finite, on every process."""
    flags = [~torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in model.parameters()]
    bad = float(torch.stack(flags).sum()) if flags else 0.0  # one host sync
    (bad,) = all_reduce_sum([bad], runtime)
    return bad == 0


def restore_state(model, optimizer, scheduler, state: dict, cfg: TrainConfig, checkpoint: Path) -> None:
    """Load the optimizer, scheduler and RNG states, then apply the current ``cfg.optim`` (an
    override on resume takes effect: the restored states would otherwise keep the old values)."""
    where = checkpoint / ckpt.TRAINER_STATE
    try:
        load_optimizer_state(model, optimizer, state["optimizer"])
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
        raise UserError(f"the optimizer state in {where} does not fit the model ({type(e).__name__}: {e})") from None
    try:
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
        raise UserError(f"{where} is damaged: its scheduler or RNG state cannot be restored "
                        f"({type(e).__name__}: {e})") from None
    o = cfg.optim
    scheduler.base_lrs = [o.lr for _ in optimizer.param_groups]
    lr = o.lr * lr_factor(scheduler.last_epoch, cfg.steps, o)
    for i, group in enumerate(optimizer.param_groups):
        group.update(initial_lr=o.lr, lr=lr, betas=tuple(o.betas), eps=o.eps)
        group["weight_decay"] = o.weight_decay if i == 0 else 0.0
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def summary(status: str, step: int, loss: float, checkpoint: Path | None, out_dir: Path) -> dict:
    return {"status": status, "step": step, "loss": loss, "checkpoint": checkpoint, "out_dir": out_dir}


# ----------------------------------------------------------------------------- pieces
def build_model(cfg: TrainConfig, dataset, checkpoint: Path | None = None, rebuild: bool = False):
    """A :class:`dla.DLAForCausalLM` from ``cfg.model`` (keyword arguments of
    :class:`dla.DLAConfig`; ``vocab_size`` and, for text, the special token ids default to the
    dataset's), or the one saved in ``checkpoint`` (with ``rebuild``: the model of ``cfg.model``
    with the checkpoint's weights, which must fit it)."""
    from dla.models import DLAConfig, DLAForCausalLM

    if checkpoint is not None and not rebuild:
        model = ckpt.load_pretrained(checkpoint)
        if model.config.vocab_size < dataset.vocab_size:
            raise ConfigError(f"the model in {checkpoint} has {model.config.vocab_size} tokens, fewer than the "
                              f"data's vocabulary ({dataset.vocab_size} tokens): it was trained on other data")
        return model
    known = [p for p in inspect.signature(DLAConfig.__init__).parameters if p not in ("self", "kwargs")]
    for key in cfg.model:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean 'model.{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key 'model.{key}'; {hint}the model keys are the arguments of "
                              f"dla.DLAConfig: {', '.join(known)}")
    vocab_size = dataset.vocab_size
    tokenizer = getattr(dataset, "tokenizer", None)
    kwargs = {"vocab_size": vocab_size, **({} if tokenizer is None else tokenizer.special_tokens), **cfg.model}
    if kwargs["vocab_size"] < vocab_size:
        raise ConfigError(f"model.vocab_size = {kwargs['vocab_size']} is smaller than the data's vocabulary "
                          f"({vocab_size} tokens)")
    try:
        config = DLAConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from e
    if cfg.data.seq_len > config.max_position_embeddings:
        raise ConfigError(f"data.seq_len = {cfg.data.seq_len} is longer than the model's maximum sequence length "
                          f"model.max_position_embeddings = {config.max_position_embeddings}")
    model = DLAForCausalLM(config)
    if checkpoint is not None:  # resuming with a changed model config: the saved weights must fit it
        from safetensors.torch import load_file

        ckpt.check_weights_file(checkpoint, config)
        model.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False)
        model.tie_weights()
    return model


def lm_loss(model, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not ignored (the only positions whose
    logits are computed)."""
    kwargs = {} if batch.cu_seqlens is None else {"cu_seqlens": batch.cu_seqlens}
    scored = batch.targets != IGNORE_INDEX
    logits = model(input_ids=batch.input_ids, use_cache=False, logits_mask=scored, **kwargs).logits
    return F.cross_entropy(logits.float(), batch.targets[scored])


def grad_clip(model, max_norm: float) -> float:
    """The global gradient norm (before clipping), clipping to ``max_norm`` unless it is 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: the norm is a DTensor
        norm = norm.full_tensor()
    return float(norm)


def load_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_training_checkpoint(cfg: TrainConfig, runtime: Runtime, model, optimizer, scheduler, dataset, step: int,
                             next_batch: int, protect: Path | None = None) -> Path:
    """Gather the full model and optimizer state (a collective under FSDP) and let rank 0 write
    the checkpoint. Returns its path (on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    path = ckpt.checkpoints_dir(cfg.out_dir) / f"step_{step:07d}"
    if runtime.is_main:
        def write_model(directory: Path) -> None:
            ckpt.quiet_transformers()
            plain = plain_model(model, model_state)
            # the gathered state holds a tied weight twice, as separate copies that save_pretrained
            # cannot see are one: keep only the tensor it is tied to (from_pretrained re-ties it)
            tied = plain._tied_weights_keys if getattr(plain.config, "tie_word_embeddings", False) else {}
            plain.save_pretrained(directory, state_dict={k: v for k, v in model_state.items() if k not in tied})
            (directory / ckpt.TRAIN_CONFIG).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
            tokenizer = getattr(dataset, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save(directory)

        trainer_state = {"step": step, "next_batch": next_batch, "optimizer": optimizer_state,
                         "scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(), "config": to_dict(cfg),
                         "world_size": runtime.world_size}
        path = ckpt.save_checkpoint(cfg.out_dir, step, write_model, trainer_state, cfg.keep_checkpoints, protect)
    if runtime.distributed:
        torch.distributed.barrier()
    return path


def plain_model(model, full_state: dict):
    """The model to ``save_pretrained``: FSDP2 swaps the model's class for a generated subclass,
    whose source files ``save_pretrained`` would copy in place of the model's own code, so a
    sharded model is saved through an unsharded copy on the CPU."""
    from torch.distributed.fsdp import FSDPModule

    model = unwrap(model)
    if not isinstance(model, FSDPModule):
        return model
    from dla.models import DLAForCausalLM

    plain = DLAForCausalLM(model.config)
    plain.load_state_dict(full_state)
    return plain


class StopRequests(contextlib.AbstractContextManager):
    """Turns the first SIGINT / SIGTERM, or reaching the wall-clock time ``stop_at``, into a
    request to stop after the current step (:attr:`requested`); a second SIGINT raises
    ``KeyboardInterrupt`` as usual. The previous handlers come back on exit."""

    def __init__(self, stop_at: float | None = None):
        self.signalled = False
        self.stop_at = stop_at
        self.previous = {}

    @property
    def requested(self) -> bool:
        return self.signalled or (self.stop_at is not None and time.time() >= self.stop_at)

    def _handle(self, signum, frame):
        if self.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signalled = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
