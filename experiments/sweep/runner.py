"""Training and evaluating the runs of an experiment grid, ``--workers`` at a time (one process
each, spread over the GPUs), one small JSON per run under ``RESULTS/<name>/runs/``.

A run whose JSON exists (trained to the end or diverged) is skipped, so a sweep can be repeated
until every run is done. Checkpoints live in a scratch work dir and are deleted after evaluation.
With ``pause_after`` the runs still training then stop with a checkpoint (a job's time limit);
the same sweep with the same work dir resumes them at that step before it starts new ones.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from dla.inspection import boundary_probe
from dla.train.workers import run_parallel, worker_threads
from experiments.sweep.grid import Experiment, Run, load_experiment, run_config, select_runs
from experiments.sweep.report import aggregate, finished_runs, write_json

PAUSED_FILE = "paused.json"  # in a run's work dir: it stopped at the pause time and resumes from its checkpoint
MIN_TRAIN_S = 30  # with a pause time, no run starts later than this before it (it would barely get past compiling)


def execute(
    exp_path: str,
    run_name: str,
    results_dir: str,
    work_dir: str,
    device: str,
    steps_scale: float,
    extra: list[str],
    eval_extra: list[str],
    keep_checkpoints: bool,
    stop_at: float | None,
    threads: int,
) -> dict:
    """Train and evaluate one run (in a worker process); write its JSON. Never raises: an
    error comes back as ``{"status": "error", ...}`` and writes nothing; a run paused at
    ``stop_at`` comes back as ``{"status": "paused", ...}`` and writes nothing either."""
    import torch

    torch.set_num_threads(threads)
    started = time.time()
    try:
        exp = load_experiment(exp_path, eval_extra)
        run = next(r for r in exp.runs if r.name == run_name)
        result = train_and_evaluate(exp, run, Path(work_dir), device, steps_scale, extra, keep_checkpoints, stop_at)
    except Exception as e:  # noqa: BLE001 (one broken run must not stop the sweep)
        return {
            "run": run_name,
            "status": "error",
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(limit=4),
            "seconds": time.time() - started,
        }
    result["seconds"] = time.time() - started
    if result["status"] != "paused":
        write_json(Path(results_dir) / "runs" / f"{run_name}.json", result)
    return result


def train_and_evaluate(
    exp: Experiment,
    run: Run,
    work_dir: Path,
    device: str,
    steps_scale: float,
    extra: list[str],
    keep_checkpoints: bool,
    stop_at: float | None = None,
) -> dict:
    """Train (or continue a paused) run, then evaluate it. Training stops with a checkpoint at
    ``stop_at`` (as ``dla train --stop-after`` does): the run is then ``"paused"``, and the next
    sweep with the same work dir resumes it from that step (as ``dla train --resume`` does)."""
    import torch

    from dla.errors import TrainingDiverged
    from dla.train import train
    from dla.train.checkpoint import latest_checkpoint, load_model
    from dla.train.config import to_dict
    from dla.train.metrics import read_metrics

    cfg = run_config(exp, run, work_dir, device, steps_scale, extra)
    out = Path(cfg.out_dir)
    paused = out / PAUSED_FILE
    resume = paused.is_file() and latest_checkpoint(out) is not None
    earlier = json.loads(paused.read_text()) if resume else {"train_seconds": 0.0}
    if not resume:
        shutil.rmtree(out, ignore_errors=True)  # a run cut off (not paused) earlier starts over
    t0 = time.time() - earlier["train_seconds"]
    result = {
        "run": run.name,
        "experiment": exp.name,
        "labels": run.labels,
        "overrides": run.overrides + list(extra),
        "steps": cfg.steps,
        "config": to_dict(cfg),
        "commit": git_commit(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and device != "cpu" else "cpu",
    }
    if earlier.get("device", result["device"]) != result["device"]:  # paused on one machine, continued on another
        result["device"] = f"{earlier['device']}, then {result['device']}"
    try:
        summary = train(cfg, resume=resume, show_progress=False, stop_at=stop_at)
    except TrainingDiverged as e:
        result.update(
            status="diverged",
            error=str(e),
            train_seconds=time.time() - t0,
            final_loss=None,
            metric=0.0 if exp.eval["task"] != "text" else None,
        )
        shutil.rmtree(out, ignore_errors=True)
        return result
    if summary["status"] == "interrupted":  # stop_at came: keep the checkpoint to resume from
        result.update(status="paused", step=summary["step"], train_seconds=time.time() - t0)
        write_json(
            paused, {"train_seconds": result["train_seconds"], "step": summary["step"], "device": result["device"]}
        )
        return result
    curve = [(m["step"], round(m["loss"], 5)) for m in read_metrics(out / "metrics.jsonl")]
    final_loss = summary["loss"]
    if not math.isfinite(final_loss) and curve:  # resumed at its last step: no step trained here
        final_loss = curve[-1][1]
    result.update(status="done", train_seconds=time.time() - t0, final_loss=final_loss, curve=curve[-200:])
    t1 = time.time()
    model, tokenizer, _ = load_model(summary["checkpoint"], device)
    result["params"] = sum(p.numel() for p in model.parameters())
    result.update(evaluate(exp.eval, cfg, model, tokenizer, device))
    result["boundaries"] = boundary_probe(exp.eval, cfg, model, device)
    result["eval_seconds"] = time.time() - t1
    if not keep_checkpoints:
        shutil.rmtree(out, ignore_errors=True)
    return result


def evaluate(spec: dict, cfg, model, tokenizer, device: str) -> dict:
    """``metric`` (the run's one number) and the detail of the evaluation named by ``spec['task']``."""
    from dataclasses import replace

    from dla.eval.recall import mqar_accuracy, needle_accuracy

    task = spec["task"]
    examples = int(spec.get("examples", 256))
    lengths = spec.get("lengths", [cfg.data.seq_len])
    if task == "mqar":
        n = cfg.data.mqar.num_kv_pairs
        pairs = spec.get("pairs", sorted({max(1, n // 2), n}))
        rows = mqar_accuracy(
            model,
            cfg.data.mqar,
            lengths,
            pairs,
            examples=examples,
            seed=cfg.seed,
            device=device,
            batch_size=int(spec.get("batch_size", 64)),
        )
        valid = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        return {"metric": sum(valid) / len(valid), "eval": rows}
    if task == "needle":
        rows = needle_accuracy(
            model,
            replace(cfg.data.needle, depth=None),
            lengths,
            spec.get("depths", [0.0, 0.5, 1.0]),
            examples=examples,
            seed=cfg.seed,
            device=device,
            batch_size=int(spec.get("batch_size", 32)),
        )
        return {"metric": sum(r["accuracy"] for r in rows) / len(rows), "eval": rows}
    from dla.data import text_tokenizer
    from dla.eval.text_loss import per_position_loss

    seq_len = int(spec.get("seq_len", cfg.data.seq_len))
    loss = per_position_loss(
        model,
        text_tokenizer(tokenizer, model),
        spec["paths"],
        seq_len,
        max_windows=int(spec.get("windows", 64)),
        device=device,
    )
    marks = sorted({min(seq_len, 2**i) for i in range(seq_len.bit_length() + 1)} | {seq_len})
    # the mean loss over positions up to each mark (a smoothed per-position curve, small enough for JSON)
    cumulative = loss.cumsum(0)
    curve = [(m, round(float(cumulative[m - 1] / m), 5)) for m in marks]
    mean = float(loss.mean())
    return {
        "metric": mean,
        "perplexity": math.exp(mean),
        "eval": {"seq_len": seq_len, "mean_loss_upto": curve, "last_quarter_loss": float(loss[-seq_len // 4 :].mean())},
    }


def git_commit() -> str:
    """The checkout's commit, ``+dirty`` with uncommitted changes to tracked files, or ``unknown``."""

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False,
                              cwd=Path(__file__).resolve().parent)

    try:
        out = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_sweep(
    exp_path: str | Path,
    results_root: Path,
    work_root: Path,
    device: str = "cuda",
    workers: int = 1,
    steps_scale: float = 1.0,
    only: list[str] | None = None,
    time_budget: float | None = None,
    extra: list[str] = (),
    keep_checkpoints: bool = False,
    docs: Path | None = None,
    eval_extra: list[str] = (),
    pause_after: float | None = None,
) -> dict:
    """Train and evaluate the runs not finished yet, then aggregate. Returns the aggregate.

    ``time_budget``: start no run that would end after it. ``pause_after``: runs still training
    then stop with a checkpoint in ``work_root`` and resume in the next sweep with the same work
    dir; no run starts within ``MIN_TRAIN_S`` of it. Both are seconds from now. ``docs``: the
    results page whose generated block of this experiment is rewritten (none: no page)."""
    from dla.train.metrics import format_duration

    started = time.time()
    deadline = None if time_budget is None else started + time_budget
    stop_at = None if pause_after is None else started + pause_after
    exp = load_experiment(exp_path, eval_extra)
    results_dir, work_dir = results_root / exp.name, work_root / exp.name
    done = finished_runs(results_dir)
    chosen = select_runs(exp, only)
    pending = [r for r in chosen if r.name not in done]
    pending.sort(key=lambda r: not (work_dir / r.name / PAUSED_FILE).is_file())  # paused runs first
    print(
        f"{exp.name}: {len(exp.runs)} runs in the grid, {len(chosen)} selected, "
        f"{len(chosen) - len(pending)} already finished, {len(pending)} to run on {device} with {workers} worker(s)"
        + (f", steps x{steps_scale}" if steps_scale != 1.0 else "")
        + (f", time budget {format_duration(time_budget)}" if time_budget else "")
        + (f", pausing at {format_duration(pause_after)}" if pause_after is not None else ""),
        flush=True,
    )
    threads = worker_threads(device, workers)
    jobs = [
        (
            str(exp.path),
            r.name,
            str(results_dir),
            str(work_dir),
            device,
            steps_scale,
            list(extra),
            list(eval_extra),
            keep_checkpoints,
            stop_at,
        )
        for r in pending
    ]
    completed, errors, paused = 0, [], []
    for _, result in run_parallel(
        execute, jobs, workers, threads, deadline, None if stop_at is None else stop_at - MIN_TRAIN_S
    ):
        completed += 1
        status = result["status"]
        line = f"[{completed}/{len(pending)} {format_duration(time.time() - started)}] {result['run']}: {status}"
        if status == "done":
            line += f", metric {result['metric']:.4f}, loss {result['final_loss']:.3f}, {result['seconds']:.0f}s"
        elif status == "paused":
            paused.append(result)
            line += f" at step {result['step']} of {result['steps']}"
        elif status == "error":
            errors.append(result)
            line += f" -- {result['error']}"
        print(line, flush=True)
    finished, left = completed - len(errors) - len(paused), len(pending) - completed
    print(
        f"{exp.name}: {finished} runs finished in {format_duration(time.time() - started)}, {len(errors)} errors"
        + (f", {len(paused)} paused (resumed by the next sweep with this work dir)" if paused else "")
        + (f", {left} not started (time budget)" if left else ""),
        flush=True,
    )
    for e in errors:
        print(f"error in {e['run']}:\n{e['traceback']}", file=sys.stderr)
    return aggregate(exp, results_dir, docs)
