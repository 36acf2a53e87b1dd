"""Sweeps: a grid of ``dla train`` overrides over a base config, each run trained and evaluated in
a worker process, results kept as one small JSON file per run, then aggregated.

An experiment file (YAML / TOML / JSON, see ``experiments/``) holds::

    name: mqar                       # results go to RESULTS/<name>/
    description: ...
    base: {...}                      # a dla train config, as in configs/*.yaml
    grid:                            # the runs: the product of the axes, in this order
      model:                         # a named axis: each choice sets several keys
        mamba2/single: {model.mixer: mamba2, model.policy: single}
      width: {key: model.hidden_size, values: [16, 32, 64]}
      lr: {key: optim.lr, values: [1.0e-3, 3.0e-3]}
      seed: {key: seed, values: [0, 1]}
    eval: {task: mqar, lengths: [256], pairs: [16, 32, 64], examples: 1000}
    report: {rows: model, cols: width, select: lr, average: seed, panels: [mamba2, gated_deltanet]}

Every run is named by its axis labels (``mamba2-single__width16__lr0.001__seed0``); a run whose
JSON exists (trained to the end or diverged) is skipped, so a sweep continues across several
short calls. Checkpoints live in a scratch directory and are deleted after evaluation.

The report picks, per group of the other axes, the ``select`` value (the learning rate) with the
best mean over the ``average`` axis (the seeds), and reports that mean, the spread and the seeds.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

from dla.errors import ConfigError

TASKS = ("mqar", "needle", "text")
PAUSED_FILE = "paused.json"  # in a run's work dir: it stopped at a call's pause time and continues from there
EXPORT_FILE_BYTES = 63 * 2**18  # 15.75 MiB: --export archives stay under this (a GPU call returns files of <= 16 MiB);
# sizes are counted uncompressed, so two paused width-64 MQAR runs (8.0-8.2 MB each) share one
MIN_TRAIN_S = 30  # with a pause time, no run starts later than this before it (it would barely get past compiling)
RESULTS_MD_TITLE = "# Results: does dynamic merging win?"


# ----------------------------------------------------------------------------- experiment files
@dataclass
class Run:
    name: str
    labels: dict  # axis -> label of its value
    overrides: list[str]


@dataclass
class Experiment:
    name: str
    path: Path
    base: dict
    axes: dict  # axis -> {label: [overrides]}
    eval: dict
    report: dict
    description: str = ""
    runs: list[Run] = field(default_factory=list)


def _label(value) -> str:
    return str(value).replace("/", "-").replace(" ", "")


def _axis_choices(axis: str, spec) -> dict[str, list[str]]:
    """``label -> overrides`` of one axis: ``{key, values}`` or ``{label: {key: value, ...}}``."""
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"grid.{axis} must be {{key: ..., values: [...]}} or a mapping of named choices")
    if "key" in spec and "values" in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise ConfigError(f"grid.{axis}.values must be a non-empty list")
        return {f"{axis}{_label(v)}": [f"{spec['key']}={_value(v)}"] for v in spec["values"]}
    choices = {}
    for label, keys in spec.items():
        if not isinstance(keys, dict):
            raise ConfigError(f"grid.{axis}.{label} must be a mapping of config keys to values")
        choices[_label(label)] = [f"{k}={_value(v)}" for k, v in keys.items()]
    return choices


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):  # nested lists (a data mixture) as JSON, which the config reads back
        return json.dumps(v) if any(isinstance(x, list) for x in v) else ",".join(str(x) for x in v)
    return str(v)


def load_experiment(path: str | Path, eval_overrides: list[str] = ()) -> Experiment:
    """Read and expand an experiment file; every run's config is built (and so checked) here.
    ``eval_overrides`` (``key=value``) change the ``eval`` section (e.g. ``examples=4`` for a smoke test)."""
    from dla.train.config import config_from_dict, parse_scalar, read_config_file

    path = Path(path)
    raw = read_config_file(path)
    unknown = set(raw) - {"name", "description", "base", "grid", "eval", "report"}
    if unknown:
        raise ConfigError(f"{path}: unknown experiment keys {sorted(unknown)}")
    for key in ("name", "base", "grid", "eval"):
        if key not in raw:
            raise ConfigError(f"{path}: an experiment needs '{key}'")
    axes = {axis: _axis_choices(axis, spec) for axis, spec in raw["grid"].items()}
    ev = dict(raw["eval"])
    for item in eval_overrides:
        key, _, value = item.partition("=")
        ev[key] = json.loads(value) if value.startswith("[") else parse_scalar(value)
    if ev.get("task") not in TASKS:
        raise ConfigError(f"{path}: eval.task must be one of {TASKS}, got {ev.get('task')!r}")
    report = {"rows": next(iter(axes)), "cols": None, "select": None, "average": None, "panels": [], **raw.get("report", {})}
    exp = Experiment(raw["name"], path, raw["base"], axes, ev, report, raw.get("description", ""))
    checked: set = set()
    for combo in itertools.product(*(choices.items() for choices in axes.values())):
        labels = {axis: label for axis, (label, _) in zip(axes, combo)}
        overrides = [o for _, keys in combo for o in keys]
        run = Run("__".join(labels.values()), labels, overrides)
        check_model(config_from_dict(exp.base, overrides), checked)  # errors show before anything trains
        exp.runs.append(run)
    names = [r.name for r in exp.runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: two runs have the same name; make the axis labels distinct")
    return exp


def check_model(cfg, checked: set) -> None:
    """Build the run's :class:`dla.DLAConfig` (once per distinct model section), so that a wrong
    model key or value is an error when the experiment is read."""
    key = json.dumps(cfg.model, sort_keys=True) + str(cfg.data.seq_len)
    if key in checked:
        return
    from dla.models import DLAConfig

    try:
        config = DLAConfig(**{"vocab_size": 512, **cfg.model})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e} (model section {cfg.model})") from e
    if cfg.data.seq_len > config.max_position_embeddings:
        raise ConfigError(f"data.seq_len = {cfg.data.seq_len} > model.max_position_embeddings = "
                          f"{config.max_position_embeddings}")
    checked.add(key)


def run_config(exp: Experiment, run: Run, work_dir: Path, device: str, steps_scale: float = 1.0,
               extra: list[str] = ()):
    """The :class:`TrainConfig` of one run: base + axis overrides + ``extra``, scaled steps, and
    an out_dir under ``work_dir``."""
    from dla.train.config import config_from_dict

    cfg = config_from_dict(exp.base, run.overrides + list(extra) + [
        f"out_dir={work_dir / run.name}", f"device={device}", "checkpoint_every=0", "keep_checkpoints=1"])
    if steps_scale != 1.0:
        cfg.steps = max(1, round(cfg.steps * steps_scale))
        cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(1, cfg.steps // 10))
        cfg.log_every = min(cfg.log_every, cfg.steps)
    cfg.check()
    return cfg


# ----------------------------------------------------------------------------- worker processes
def run_parallel(fn, jobs: list[tuple], workers: int, threads: int, deadline: float | None = None,
                 start_until: float | None = None):
    """Call ``fn(*job, threads)`` for every job, ``workers`` at a time, each worker a separate
    (spawned, long-lived) process; ``workers == 1`` runs them here. Yields ``(job, result)`` in
    the order they finish. With a ``deadline`` (``time.time()`` seconds) no job is started that
    the typical job time so far says would end after it; none starts after ``start_until``. On a
    machine with several GPUs, worker ``i`` sees only GPU ``i mod n`` (its ``"cuda"`` is that
    GPU), so the workers spread evenly."""
    durations: list[float] = []

    def may_start() -> bool:
        if start_until is not None and time.time() >= start_until:
            return False
        if deadline is None:
            return True
        expected = statistics.median(durations) if durations else 0.0
        return time.time() + expected <= deadline

    if workers <= 1:
        for job in jobs:
            if not may_start():
                return
            started = time.time()
            result = fn(*job, threads)
            durations.append(time.time() - started)
            yield job, result
        return
    context = multiprocessing.get_context("spawn")
    gpus = visible_gpus()
    with context.Pool(workers, initializer=_pin_gpu, initargs=(context.Value("i", 0), gpus)) as pool:
        queue, running = list(enumerate(jobs)), {}  # keyed by position: equal jobs stay distinct
        while queue or running:
            while queue and len(running) < workers and may_start():
                index, job = queue.pop(0)
                running[index] = (job, time.time(), pool.apply_async(fn, job + (threads,)))
            if not running:
                return
            done = [key for key, (_, _, res) in running.items() if res.ready()]
            if not done:
                time.sleep(0.2)
                continue
            for key in done:
                job, started, res = running.pop(key)
                durations.append(time.time() - started)
                yield job, res.get()


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _pin_gpu(counter, gpus: list[str]) -> None:
    """Pool initializer: the next worker takes the next GPU (round robin). It runs before the
    worker touches CUDA, which reads ``CUDA_VISIBLE_DEVICES`` when it starts."""
    if len(gpus) < 2:
        return
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]


def execute(exp_path: str, run_name: str, results_dir: str, work_dir: str, device: str, steps_scale: float,
            extra: list[str], eval_extra: list[str], keep_checkpoints: bool, stop_at: float | None,
            threads: int) -> dict:
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
        return {"run": run_name, "status": "error", "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=4), "seconds": time.time() - started}
    result["seconds"] = time.time() - started
    if result["status"] != "paused":
        write_json(Path(results_dir) / "runs" / f"{run_name}.json", result)
    return result


def train_and_evaluate(exp: Experiment, run: Run, work_dir: Path, device: str, steps_scale: float,
                       extra: list[str], keep_checkpoints: bool, stop_at: float | None = None) -> dict:
    """Train (or continue a paused) run, then evaluate it. Training stops with a checkpoint at
    ``stop_at``: the run is then ``"paused"`` and the next call continues it from its work dir."""
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
        shutil.rmtree(out, ignore_errors=True)  # a run cut off (not paused) by an earlier call starts over
    t0 = time.time() - earlier["train_seconds"]
    result = {"run": run.name, "experiment": exp.name, "labels": run.labels, "overrides": run.overrides + list(extra),
              "steps": cfg.steps, "config": to_dict(cfg), "commit": git_commit(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() and device != "cpu" else "cpu"}
    if earlier.get("device", result["device"]) != result["device"]:  # paused on one machine, continued on another
        result["device"] = f"{earlier['device']}, then {result['device']}"
    try:
        summary = train(cfg, resume=resume, show_progress=False, stop_at=stop_at)
    except TrainingDiverged as e:
        result.update(status="diverged", error=str(e), train_seconds=time.time() - t0, final_loss=None,
                      metric=0.0 if exp.eval["task"] != "text" else None)
        shutil.rmtree(out, ignore_errors=True)
        return result
    if summary["status"] == "interrupted":  # stop_at came: keep the checkpoint for the next call
        result.update(status="paused", step=summary["step"], train_seconds=time.time() - t0)
        write_json(paused, {"train_seconds": result["train_seconds"], "step": summary["step"],
                            "device": result["device"]})
        return result
    curve = [(m["step"], round(m["loss"], 5)) for m in read_metrics(out / "metrics.jsonl")]
    final_loss = summary["loss"]
    if not math.isfinite(final_loss) and curve:  # continued at its last step: this call trained no step
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


def boundary_probe(spec: dict, cfg, model, device: str, examples: int = 8) -> list[dict] | None:
    """Where the trained model's DLA layers open states (:func:`dla.inspection.boundary_stats`) on
    ``examples`` held-out examples of its synthetic task at the eval's longest length (MQAR: the
    most pairs), with the task's regions; ``None`` for text or a model without DLA layers."""
    from dla.data import SyntheticDataset
    from dla.eval.recall import EVAL_STREAM
    from dla.inspection import boundary_stats

    if spec["task"] == "text":
        return None
    length = max(spec.get("lengths", [cfg.data.seq_len]))
    if spec["task"] == "mqar":
        pairs = max(p for p in spec.get("pairs", [cfg.data.mqar.num_kv_pairs]) if 4 * p <= length)
        task = cfg.data.mqar.evaluation_task(num_kv_pairs=pairs)
    else:
        task = cfg.data.needle.evaluation_task(depth=None)
    batch = SyntheticDataset(task, length, cfg.seed, stream=EVAL_STREAM).batch(0, examples)
    return boundary_stats(model, batch.input_ids.to(device), task.regions(batch)) or None


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
        rows = mqar_accuracy(model, cfg.data.mqar, lengths, pairs, examples=examples, seed=cfg.seed, device=device,
                             batch_size=int(spec.get("batch_size", 64)))
        valid = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        return {"metric": sum(valid) / len(valid), "eval": rows}
    if task == "needle":
        rows = needle_accuracy(model, replace(cfg.data.needle, depth=None), lengths, spec.get("depths", [0.0, 0.5, 1.0]),
                               examples=examples, seed=cfg.seed, device=device, batch_size=int(spec.get("batch_size", 32)))
        return {"metric": sum(r["accuracy"] for r in rows) / len(rows), "eval": rows}
    from dla.cli import text_tokenizer
    from dla.eval.text_loss import per_position_loss

    seq_len = int(spec.get("seq_len", cfg.data.seq_len))
    loss = per_position_loss(model, text_tokenizer(tokenizer, model), spec["paths"], seq_len,
                             max_windows=int(spec.get("windows", 64)), device=device)
    marks = sorted({min(seq_len, 2 ** i) for i in range(seq_len.bit_length() + 1)} | {seq_len})
    # the mean loss over positions up to each mark (a smoothed per-position curve, small enough for JSON)
    cumulative = loss.cumsum(0)
    curve = [(m, round(float(cumulative[m - 1] / m), 5)) for m in marks]
    mean = float(loss.mean())
    return {"metric": mean, "perplexity": math.exp(mean), "eval": {"seq_len": seq_len, "mean_loss_upto": curve,
                                                                   "last_quarter_loss": float(loss[-seq_len // 4:].mean())}}


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=False,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, check=False, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- the sweep
def finished_runs(results_dir: Path) -> dict[str, dict]:
    found = {}
    for path in sorted((results_dir / "runs").glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("status") in ("done", "diverged"):
            found[data["run"]] = data
    return found


def select_runs(exp: Experiment, only: list[str] | None) -> list[Run]:
    if not only:
        return exp.runs
    return [r for r in exp.runs if any(fnmatch.fnmatch(r.name, p) or p in r.name for p in only)]


def worker_threads(device: str, workers: int) -> int:
    """CPU threads per worker process: one on a GPU (the GPU does the work), else a share of the cores."""
    return 1 if device == "cuda" else max(1, (os.cpu_count() or 1) // max(1, workers))


def probe_one(exp_path: str, run_name: str, work_dir: str, device: str, steps: int, threads: int) -> dict:
    """Train one run for ``steps`` steps (in a worker process) and time the second half of them,
    after compilation and autotuning; the checkpoint is deleted. Never raises."""
    import torch

    from dla.train import train
    from dla.train.metrics import read_metrics

    torch.set_num_threads(threads)
    try:
        exp = load_experiment(exp_path)
        run = next(r for r in exp.runs if r.name == run_name)
        full_steps = run_config(exp, run, Path(work_dir), device).steps
        cfg = run_config(exp, run, Path(work_dir), device, steps / full_steps)
        cfg.log_every = max(1, cfg.steps // 2)
        out = Path(cfg.out_dir)
        shutil.rmtree(out, ignore_errors=True)
        train(cfg, show_progress=False)
        logged = read_metrics(out / "metrics.jsonl")  # at half the steps and at the end
        shutil.rmtree(out, ignore_errors=True)
        half, end = logged[0], logged[-1]
        step_s = (end["elapsed_s"] - half["elapsed_s"]) / (end["step"] - half["step"])
        return {"run": run_name, "status": "done", "step_s": step_s, "full_steps": full_steps,
                "train_s": step_s * full_steps}
    except Exception as e:  # noqa: BLE001 (one broken probe must not stop the others)
        return {"run": run_name, "status": "error", "error": f"{type(e).__name__}: {e}"}


def probe_sweep(exp_path: str | Path, work_root: Path, device: str = "cuda", workers: int = 1, steps: int = 40,
                only: list[str] | None = None, call_s: float = 540.0) -> list[dict]:
    """Step time of one run per table cell (the first of its ``select`` / ``average`` values),
    ``workers`` at a time as the sweep would run them, and what that means for a full run and for
    a GPU call of ``call_s`` seconds; prints a table, trains nothing to the end, writes no result."""
    exp = load_experiment(exp_path)
    rep = exp.report
    cells: dict[tuple, Run] = {}
    for r in select_runs(exp, only):
        cells.setdefault(tuple(v for a, v in r.labels.items() if a not in (rep["select"], rep["average"])), r)
    jobs = [(str(exp.path), r.name, str(work_root / exp.name / "probe"), device, steps) for r in cells.values()]
    print(f"{exp.name}: probing {len(jobs)} runs ({steps} steps each, the second half timed) on {device} "
          f"with {workers} worker(s)", flush=True)
    rows = [result for _, result in run_parallel(probe_one, jobs, workers, worker_threads(device, workers))]
    shutil.rmtree(work_root / exp.name / "probe", ignore_errors=True)
    for r in rows:
        if r["status"] == "done":
            fit = int(call_s // r["train_s"])
            print(f"  {r['run']:55s} {r['step_s']:7.3f} s/step  x {r['full_steps']} steps = "
                  f"{r['train_s'] / 60:5.1f} min per run; {fit * workers} runs per {call_s / 60:.0f}-min call",
                  flush=True)
        else:
            print(f"  {r['run']:55s} {r['error']}", flush=True)
    return rows


def run_sweep(exp_path: str | Path, results_root: Path, work_root: Path, device: str = "cuda", workers: int = 1,
              steps_scale: float = 1.0, only: list[str] | None = None, time_budget: float | None = None,
              extra: list[str] = (), keep_checkpoints: bool = False, export: Path | None = None,
              docs: Path | None = None, eval_extra: list[str] = (), pause_after: float | None = None,
              export_room: ExportRoom | None = None, export_paused: bool = True) -> dict:
    """Train and evaluate the runs not finished yet, then aggregate. Returns the aggregate.

    ``time_budget``: start no run that would end after it. ``pause_after``: runs still training
    then stop with a checkpoint in ``work_root`` and continue on the next call (runs longer than
    one call); no run starts within ``MIN_TRAIN_S`` of it. Both are seconds from now. ``export``:
    also write the results, and the paused runs that fit ``export_room``, as archives there;
    with ``export_paused=False`` paused runs stay in ``work_root`` only (a warm GPU machine keeps
    them for the next call), and the workers are not capped to what a call can return."""
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
    print(f"{exp.name}: {len(exp.runs)} runs in the grid, {len(chosen)} selected, "
          f"{len(chosen) - len(pending)} already finished, {len(pending)} to run on {device} with {workers} worker(s)"
          + (f", steps x{steps_scale}" if steps_scale != 1.0 else "")
          + (f", time budget {format_duration(time_budget)}" if time_budget else "")
          + (f", pausing at {format_duration(pause_after)}" if pause_after is not None else ""), flush=True)
    if stop_at is not None and export is not None and export_paused and workers > 1 and pending:
        workers = cap_paused_workers(exp, pending, work_dir, results_dir, workers,
                                     export_room if export_room is not None else ExportRoom())
    threads = worker_threads(device, workers)
    jobs = [(str(exp.path), r.name, str(results_dir), str(work_dir), device, steps_scale, list(extra),
             list(eval_extra), keep_checkpoints, stop_at) for r in pending]
    completed, errors, paused = 0, [], []

    def tally() -> dict:
        return {"wall_s": round(time.time() - started, 1), "runs": completed - len(errors) - len(paused),
                "errors": len(errors), "paused": len(paused), "left": len(pending) - completed}

    call = CallRecord(results_dir / "calls.jsonl", {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)), **tally(), "device": device,
        "workers": workers, "steps_scale": steps_scale, "commit": git_commit(), "argv": sys.argv[1:],
        "ended": False}) if pending else None
    for job, result in run_parallel(execute, jobs, workers, threads, deadline,
                                    None if stop_at is None else stop_at - MIN_TRAIN_S):
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
        call.update(**tally())
    counts = tally()
    finished, left, wall = counts["runs"], counts["left"], counts["wall_s"]
    archives, left_out = [], []
    if export is not None:  # plan the archives first, so that this call's record says what stays behind
        room = export_room if export_room is not None else ExportRoom()
        if not room.take(results_archive_bytes(results_dir)):
            room.files = 0  # the results archive is written anyway, and no paused run may crowd it out
        if export_paused:
            archives, left_out = plan_paused_export(paused, lambda name: dir_bytes(work_dir / name), room)
        else:
            left_out = [r["run"] for r in paused]
    if call is not None:
        call.update(**counts, ended=True, **({"not_exported": left_out} if left_out else {}))
    print(f"{exp.name}: {finished} runs finished in {format_duration(wall)}, {len(errors)} errors"
          + (f", {len(paused)} paused (continued by the next call with this --work-dir)" if paused else "")
          + (f", {left} not started (time budget)" if left else ""), flush=True)
    if left_out:
        why = "were not exported" if not export_paused else "do not fit in what this call can return"
        print(f"warning: {len(left_out)} paused run(s) {why} and start again from step 0 next call unless "
              f"{work_dir} is kept: {', '.join(left_out)}", file=sys.stderr, flush=True)
    for e in errors:
        print(f"error in {e['run']}:\n{e['traceback']}", file=sys.stderr)
    summary = aggregate(exp, results_dir, docs)
    if export is not None:  # few files, none deeper than two folders: what a GPU call returns
        export.mkdir(parents=True, exist_ok=True)
        with tarfile.open(export / f"{exp.name}.tar.gz", "w:gz") as tar:
            tar.add(results_dir, arcname=exp.name)
        for i, names in enumerate(archives):  # checkpoints for the next call's --work-dir; 01, 02: in priority order
            with tarfile.open(export / f"{exp.name}-paused-{i + 1:02d}.tar.gz", "w:gz") as tar:
                for name in names:
                    tar.add(work_dir / name, arcname=f"{exp.name}/{name}")
    return summary


class CallRecord:
    """This call's line in ``calls.jsonl``: written when the call starts and rewritten as each run
    ends, so that a call killed from outside (a GPU call's guard, ``timeout -s KILL``) still
    records its command, commit, finished runs and wall time up to its last finished run, with
    ``"ended": false``."""

    def __init__(self, path: Path, record: dict):
        self.path, self.record = path, record
        self.index = len(path.read_text().splitlines()) if path.exists() else 0
        self.update()

    def update(self, **fields) -> None:
        self.record.update(fields)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        lines[self.index:self.index + 1] = [json.dumps(self.record)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")  # a kill mid-write leaves the old file whole
        partial.write_text("\n".join(lines) + "\n")
        os.replace(partial, self.path)


def cap_paused_workers(exp: Experiment, pending: list[Run], work_dir: Path, results_dir: Path, workers: int,
                       room: ExportRoom) -> int:
    """``workers``, or fewer: as many runs at once as the call can return paused. Every run still
    training at the pause time is paused, and one whose checkpoint does not fit what the call
    returns is lost (it starts over next call), so no more runs train at once than fit."""
    run_bytes = max(paused_run_bytes(exp, r, work_dir) for r in pending)
    fit = exportable_runs(room, results_archive_bytes(results_dir), run_bytes, workers)
    if fit >= workers:
        return workers
    if fit == 0:
        print(f"warning: a paused {exp.name} run takes {run_bytes / 2**20:.0f} MiB, more than this call returns: "
              f"runs still training at the pause start over next call (--time-budget starts only runs that end "
              f"in time)", file=sys.stderr, flush=True)
        return workers
    print(f"{exp.name}: {fit} run(s) at once instead of {workers}: a paused run takes {run_bytes / 2**20:.1f} MiB, "
          f"and this call returns {fit} of them beside the results (--export-files, --export-mib)", flush=True)
    return fit


@dataclass
class ExportRoom:
    """What the GPU call can still return to its caller (the device returns at most 8 files and
    64 MiB from $OUT): every --export of one command draws on it, each experiment's results
    archive first, then its paused runs' archives."""

    files: int = 8
    bytes: int = 60 * 2**20

    def take(self, nbytes: int) -> bool:
        if self.files < 1 or nbytes > self.bytes:
            return False
        self.files -= 1
        self.bytes -= nbytes
        return True


def plan_paused_export(paused: list[dict], size, room: ExportRoom) -> tuple[list[list[str]], list[str]]:
    """Archives (lists of run names) of the paused runs that fit ``room``, most advanced runs
    first: a run left out starts again from step 0 in the next call. Returns them and the names
    left out."""
    order = [r["run"] for r in sorted(paused, key=lambda r: r["step"] / r["steps"], reverse=True)]
    archives, left_out = [], []
    for group in pack(order, size, EXPORT_FILE_BYTES):
        if room.take(sum(size(name) for name in group)):
            archives.append(group)
        else:
            left_out += group
    return archives, left_out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def results_archive_bytes(results_dir: Path) -> int:
    """What the results archive takes of the export room: the results so far, and the aggregate's
    plots and tables to come."""
    return (dir_bytes(results_dir) if results_dir.exists() else 0) + 2**20


def paused_run_bytes(exp: Experiment, run: Run, work_dir: Path) -> int:
    """The size of ``run``'s work dir once paused: measured when it is paused already, else its
    checkpoint estimated as fp32 weights and AdamW's two moments (12 bytes a parameter, the tied
    output layer once), plus 256 KiB of logs. The model is built on the meta device: no memory."""
    if (work_dir / run.name / PAUSED_FILE).is_file():
        return dir_bytes(work_dir / run.name)
    import torch

    from dla.data import build_dataset, load_tokenizer
    from dla.train.loop import build_model

    cfg = run_config(exp, run, work_dir, "cpu")
    if cfg.data.task == "text":  # the tokenizer alone gives the vocabulary; reading the corpus would be slow
        tokenizer = load_tokenizer(cfg.data.text.tokenizer)
        data = SimpleNamespace(vocab_size=tokenizer.vocab_size, tokenizer=tokenizer)
    else:
        data = build_dataset(cfg.data, cfg.seed)
    with torch.device("meta"):
        model = build_model(cfg, data)
    return 12 * sum(p.numel() for p in model.parameters()) + 2**18


def exportable_runs(room: ExportRoom, results_bytes: int, run_bytes: int, most: int) -> int:
    """How many paused runs of ``run_bytes`` each (at most ``most``) a copy of ``room`` takes
    beside a results archive of ``results_bytes``, packed as the export packs them."""
    for n in range(most, 0, -1):
        trial = replace(room)
        if not trial.take(results_bytes):
            return 0
        paused = [{"run": str(i), "step": 0, "steps": 1} for i in range(n)]
        if not plan_paused_export(paused, lambda _: run_bytes, trial)[1]:
            return n
    return 0


def pack(items: list, size, limit: int) -> list[list]:
    """``items`` in order, in groups of at most ``limit`` total ``size`` (an item over it alone)."""
    groups, total = [], limit
    for item in items:
        if total + size(item) > limit:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += size(item)
    return groups


# ----------------------------------------------------------------------------- aggregation
def aggregate(exp: Experiment, results_dir: Path, docs: Path | None = None) -> dict:
    """Best ``select`` value per group, mean and spread over ``average``; writes results.json,
    table.md and a PNG into ``results_dir`` and updates the experiment's block in ``docs``
    (default: docs/results.md next to the package)."""
    rep = exp.report
    lower_is_better = exp.eval["task"] == "text"
    finished = finished_runs(results_dir)
    runs = [finished[r.name] for r in exp.runs if r.name in finished]
    group_axes = [a for a in exp.axes if a not in (rep["select"], rep["average"])]
    groups: dict[tuple, dict] = {}
    for r in runs:
        key = tuple(r["labels"][a] for a in group_axes)
        sel = r["labels"].get(rep["select"], "-")
        groups.setdefault(key, {}).setdefault(sel, []).append(r)
    entries = []
    for key, by_select in groups.items():
        means = {}
        for sel, rs in by_select.items():
            values = [r["metric"] for r in rs if r["metric"] is not None]
            if values and len(values) == len(rs):
                means[sel] = statistics.fmean(values)
        if not means:
            continue
        best = (min if lower_is_better else max)(means, key=means.get)
        chosen = by_select[best]
        values = [r["metric"] for r in chosen]
        entry = {**dict(zip(group_axes, key)), "best_" + (rep["select"] or "choice"): best, "mean": means[best],
                 "std": statistics.pstdev(values) if len(values) > 1 else 0.0, "n": len(values),
                 "by_" + (rep["select"] or "choice"): means, "runs": [r["run"] for r in chosen],
                 "params": chosen[0].get("params"), "train_seconds": statistics.fmean(r.get("train_seconds", 0)
                                                                                      for r in chosen)}
        if exp.eval["task"] == "text":
            entry["perplexity"] = math.exp(entry["mean"])
        entry["detail"] = mean_detail(exp.eval["task"], chosen)
        entry["boundaries"] = mean_boundaries(chosen)
        entries.append(entry)
    order = {a: list(exp.axes[a]) for a in group_axes}
    entries.sort(key=lambda e: [order[a].index(e[a]) for a in group_axes])
    calls = [json.loads(line) for line in (results_dir / "calls.jsonl").read_text().splitlines()] \
        if (results_dir / "calls.jsonl").exists() else []
    summary = {"experiment": exp.name, "description": exp.description, "task": exp.eval["task"],
               "metric": "mean validation loss (nats/token), lower is better" if lower_is_better
               else "accuracy (mean over the eval cells), higher is better",
               "grid_runs": len(exp.runs), "finished_runs": len(runs), "entries": entries,
               "commits": sorted({r.get("commit", "unknown") for r in runs}),
               "devices": sorted({r.get("device", "?") for r in runs}),
               "gpu_wall_s": sum(c["wall_s"] for c in calls if c.get("device") != "cpu"),
               "wall_s": sum(c["wall_s"] for c in calls), "run_seconds": sum(r.get("seconds", 0) for r in runs),
               "cut_off_calls": sum(not c.get("ended", True) for c in calls),
               "commands": [list(a) for a in dict.fromkeys(tuple(c.get("argv", [])) for c in calls)]}
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(results_dir / "results.json", summary)
    tables = (markdown_tables(exp, entries, group_axes), boundary_table(exp, entries, group_axes))
    table = "\n\n".join(t for t in tables if t)
    (results_dir / "table.md").write_text(table + "\n")
    pngs = [plot(exp, entries, group_axes, results_dir / f"{exp.name}.png"),
            plot_curves(exp, entries, finished, results_dir / f"{exp.name}_curves.png")] if entries else []
    update_results_md(docs or Path(__file__).resolve().parent.parent / "docs" / "results.md", exp, summary, table,
                      [p for p in pngs if p is not None], results_dir)
    print(table)
    return summary


def mean_detail(task: str, runs: list[dict]):
    """The evaluation detail averaged over ``runs`` (seeds): accuracy per cell, or the loss curve."""
    done = [r for r in runs if r["status"] == "done"]
    if not done:
        return None
    if task == "text":
        curves = [r["eval"]["mean_loss_upto"] for r in done]
        return [(pos, statistics.fmean(c[i][1] for c in curves)) for i, (pos, _) in enumerate(curves[0])]
    from dla.eval.recall import mean_per_token

    keys = [k for k in done[0]["eval"][0] if k not in ("accuracy", "token_accuracy", "examples")]
    cells, tokens = {}, {}
    for r in runs:  # a diverged seed counts as 0 in every cell
        for i, row in enumerate(done[0]["eval"]):
            acc = r["eval"][i]["accuracy"] if r["status"] == "done" else 0.0
            if acc is not None:
                cells.setdefault(i, []).append(acc)
            if "token_accuracy" in row:  # needle: per value token
                per_token = r["eval"][i]["token_accuracy"] if r["status"] == "done" else [0.0] * len(row["token_accuracy"])
                tokens.setdefault(i, []).append(per_token)
    return [{**{k: row[k] for k in keys}, "accuracy": statistics.fmean(cells[i]) if i in cells else None,
             **({"token_accuracy": mean_per_token(tokens[i])} if i in tokens else {})}
            for i, row in enumerate(done[0]["eval"])]


def mean_boundaries(runs: list[dict]) -> list[dict] | None:
    """Per layer, the runs' (seeds') mean ``births_per_100_tokens`` and share of births in the
    task's first region (``region``, with its share of the tokens); None without boundary data."""
    probes = [r["boundaries"] for r in runs if r.get("boundaries")]
    if not probes:
        return None
    layers = []
    for i, first in enumerate(probes[0]):
        region = next(iter(first["regions"]), None)
        shares = [p[i]["regions"][region]["births"] for p in probes] if region else []
        shares = [v for v in shares if v is not None]
        layers.append({"births_per_100_tokens": statistics.fmean(p[i]["births_per_100_tokens"] for p in probes),
                       "region": region, "region_tokens": first["regions"][region]["tokens"] if region else None,
                       "region_births": statistics.fmean(shares) if shares else None})
    return layers


def boundary_table(exp: Experiment, entries: list[dict], group_axes: list[str]) -> str:
    """Where the chosen runs' DLA layers opened states (``boundary_probe``): one row per model,
    a column per ``cols`` value, each cell the layers' births per 100 tokens and the share of
    them in the task's first region. Empty without boundary data."""
    probed = [e for e in entries if e.get("boundaries")]
    if not probed:
        return ""
    rows, cols = exp.report["rows"], exp.report["cols"]
    col_values = list(exp.axes[cols]) if cols else [None]
    blocks = []
    for label, part in table_parts(exp, probed, group_axes):
        if not part:
            continue
        first = part[0]["boundaries"][0]  # the region's share of the tokens is the task's (per table)
        lines = [f"**{exp.name}: where the DLA layers open states** {label} (held-out examples, best "
                 f"{exp.report['select'] or 'run'} per cell; per layer, first to last: states opened per 100 tokens"
                 + (f", and in parentheses the share of them inside the {first['region']} region, which holds "
                    f"{_percent(first['region_tokens'])} of the tokens)" if first["region"] else ")"), "",
                 f"| {rows} | " + " | ".join(str(c or "result") for c in col_values) + " |",
                 "|---" * (len(col_values) + 1) + "|"]
        for rv in exp.axes[rows]:
            cells = []
            for cv in col_values:
                entry = cell_entry(part, rows, rv, cols, cv)
                cells.append(" / ".join(f"{layer['births_per_100_tokens']:.1f}" + (
                    f" ({_percent(layer['region_births'])})" if layer["region_births"] is not None else "")
                    for layer in entry["boundaries"]) if entry else "–")
            if any(c != "–" for c in cells):
                lines.append(f"| {rv} | " + " | ".join(cells) + " |")
        if len(lines) > 4:
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _percent(share: float) -> str:
    """A share as a percentage, with two significant digits below 1% (the needles are 0.043-0.085%
    of a 16K-token row, which ``:.0f`` would print as 0%)."""
    return f"{100 * share:.2g}%" if 0 < share < 0.01 else f"{100 * share:.0f}%"


def _fmt(entry: dict, task: str) -> str:
    if task == "text":
        return f"{entry['mean']:.3f} (ppl {entry['perplexity']:.2f})" + (f" ±{entry['std']:.3f}" if entry["n"] > 1 else "")
    return f"{100 * entry['mean']:.1f}" + (f" ±{100 * entry['std']:.1f}" if entry["n"] > 1 else "") + f" (n={entry['n']})"


def cell_entry(entries: list[dict], rows: str, row_value, cols: str | None, col_value) -> dict | None:
    """The entry of one table cell (row value, column value; any column without ``cols``)."""
    return next((e for e in entries if e[rows] == row_value and (cols is None or e[cols] == col_value)), None)


def table_parts(exp: Experiment, entries: list[dict], group_axes: list[str]):
    """``(label, entries)`` per combination of the axes that are neither rows nor columns: one
    table each."""
    rest = [a for a in group_axes if a not in (exp.report["rows"], exp.report["cols"])]
    for combo in itertools.product(*(list(exp.axes[a]) for a in rest)):
        yield (" ".join(f"{a}={v}" for a, v in zip(rest, combo)),
               [e for e in entries if all(e[a] == v for a, v in zip(rest, combo))])


def markdown_tables(exp: Experiment, entries: list[dict], group_axes: list[str]) -> str:
    """One table (rows x cols) per combination of the remaining axes."""
    from dla.eval.recall import mean_per_token

    rep, task = exp.report, exp.eval["task"]
    rows, cols = rep["rows"], rep["cols"]
    what = "validation loss, nats/token (perplexity)" if task == "text" else "accuracy %, mean ±std over seeds"
    sel = f", best {rep['select']} per cell" if rep["select"] else ""
    blocks = []
    for label, part in table_parts(exp, entries, group_axes):
        title = f"**{exp.name}** " + label + f" ({what}{sel})"
        col_values = list(exp.axes[cols]) if cols else ["result"]
        lengths = [] if task != "needle" or cols else sorted({n for n in exp.eval.get("lengths", [])})
        per_token = bool(lengths) and any("token_accuracy" in c for e in part if e["detail"] for c in e["detail"])
        header = col_values + [f"len {n}" for n in lengths] + (["per value token"] if per_token else [])
        lines = [title + (" -- the len columns: mean over depths" if lengths else "")
                 + ("; per value token: % of each token right, first to last, mean over all cells" if per_token else ""),
                 "", f"| {rows} | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        for rv in exp.axes[rows]:
            match = [e for e in part if e[rows] == rv and e["detail"]]
            by_length = [[c["accuracy"] for c in match[0]["detail"] if c["seq_len"] == n] if match else [] for n in lengths]
            extra = [f"{100 * statistics.fmean(v):.1f}" if v else "–" for v in by_length]
            if per_token:
                token_rows = [c["token_accuracy"] for c in match[0]["detail"] if "token_accuracy" in c] if match else []
                extra.append(" / ".join(f"{100 * t:.0f}" for t in mean_per_token(token_rows)) or "–")
            cells = []
            for cv in col_values:
                entry = cell_entry(part, rows, rv, cols, cv)
                if entry:
                    best = entry.get("best_" + rep["select"]) if rep["select"] else None
                    cells.append(_fmt(entry, task) + (f" @{best}" if best else ""))
                else:
                    cells.append("–")
            lines.append(f"| {rv} | " + " | ".join(cells + extra) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _number(label: str, axis: str):
    text = label.removeprefix(axis)
    try:
        return float(text)
    except ValueError:
        return None


def plot(exp: Experiment, entries: list[dict], group_axes: list[str], path: Path) -> Path | None:
    """``lines``: the metric against the ``cols`` axis, one line per ``rows`` value, a panel per
    base (``panels``: row labels starting with ``PANEL-``; the others are drawn in every panel).
    Needle runs: a grid of depth x length heatmaps (:func:`heatmap_layout`). Text runs: loss against
    context."""
    from dla.plots import draw_heatmap, pyplot, save

    plt = pyplot()
    if plt is None:
        return None
    rep, task = exp.report, exp.eval["task"]
    rows, cols = rep["rows"], rep["cols"]
    if task == "needle":
        layout = heatmap_layout(exp, entries, group_axes)
        nrows, ncols = len(layout), len(layout[0]) if layout else 0
        if not ncols:
            return None
        fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols + 1, 2.5 * nrows + 0.4), squeeze=False)
        others = [a for a in group_axes if a != rows]
        for i, j in itertools.product(range(nrows), range(ncols)):
            ax, e = axes[i, j], layout[i][j]
            if e is None:
                ax.set_axis_off()
                continue
            lengths = sorted({c["seq_len"] for c in e["detail"]})
            depths = sorted({c["depth"] for c in e["detail"]})
            grid = [[next(c["accuracy"] for c in e["detail"] if c["depth"] == d and c["seq_len"] == n)
                     for n in lengths] for d in depths]
            figure_row = " ".join(str(e[a]) for a in others)
            ylabel = ((f"{figure_row}\n" if figure_row else "") + "depth") if j == 0 else ""
            image = draw_heatmap(ax, grid, depths, [f"{n // 1024}K" if n % 1024 == 0 else n for n in lengths],
                                 str(e[rows]), "length" if i == nrows - 1 else "", ylabel, fontsize=7)
            ax.tick_params(labelleft=j == 0)  # the depths are the same in every panel of a row
        fig.colorbar(image, ax=axes, label="accuracy", shrink=0.8)
        return save(fig, path, tight=False)
    numeric_cols = _numeric_axis(exp, cols)
    if task != "text" and not numeric_cols:
        return bar_plot(plt, exp, entries, group_axes, path)
    panels = rep.get("panels") or [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for rv in exp.axes[rows]:
            if not _in_panel(rv, panel):
                continue
            mine = [e for e in entries if e[rows] == rv]
            if task == "text":
                for e in mine:
                    if e["detail"]:
                        ax.plot(*zip(*e["detail"]), label=" ".join(str(e[a]) for a in group_axes if a != rows) + f" {rv}")
                continue
            by_rest: dict[tuple, list] = {}
            for e in mine:
                by_rest.setdefault(tuple(e[a] for a in group_axes if a not in (rows, cols)), []).append(e)
            for rest, es in by_rest.items():
                points = sorted((_number(e[cols], cols), e["mean"], e["std"]) for e in es)
                xs, ys, ss = zip(*points)
                ax.errorbar(xs, ys, yerr=ss, marker="o", capsize=3, label=" ".join([rv, *rest]))
        if task == "text":
            ax.set(xscale="log", xlabel="context (tokens)", ylabel="mean loss up to this position")
        else:
            ticks = [_number(c, cols) for c in exp.axes[cols]]
            ax.set(xlabel=cols, ylabel="accuracy", ylim=(0, 1.02))
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_title(f"{exp.name}" + (f": {panel}" if panel else ""))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save(fig, path)


def heatmap_layout(exp: Experiment, entries: list[dict], group_axes: list[str]) -> list[list[dict | None]]:
    """The needle heatmaps' panels: a figure row per value of the other grouping axes (the
    task), a column per ``rows`` value (the model) that has a heatmap in some figure row."""
    rows = exp.report["rows"]
    others = [a for a in group_axes if a != rows]
    by_figure_row: dict[tuple, dict] = {}
    for e in entries:
        if e["detail"]:
            by_figure_row.setdefault(tuple(e[a] for a in others), {})[e[rows]] = e
    columns = [rv for rv in exp.axes[rows] if any(rv in cells for cells in by_figure_row.values())]
    return [[cells.get(rv) for rv in columns] for cells in by_figure_row.values()]


def _numeric_axis(exp: Experiment, axis: str | None) -> bool:
    return axis is not None and all(_number(v, axis) is not None for v in exp.axes[axis])


def _in_panel(row_label: str, panel: str | None) -> bool:
    """Row labels ``BASE-...`` belong to the panel of that base; the others (attention) to every panel."""
    return panel is None or "-" not in row_label or row_label.startswith(panel + "-")


def plot_curves(exp: Experiment, entries: list[dict], finished: dict[str, dict], path: Path) -> Path | None:
    """Training loss against sequences seen for the first run of each table cell (its chosen
    ``select`` value), at the largest ``cols`` value when that axis is numeric, a panel per base."""
    from dla.plots import pyplot, save

    plt = pyplot()
    if plt is None:
        return None
    rep = exp.report
    rows, cols, select = rep["rows"], rep["cols"], rep["select"]
    if _numeric_axis(exp, cols):
        widest = max(exp.axes[cols], key=lambda c: _number(c, cols))
        entries = [e for e in entries if e[cols] == widest]
    panels = rep.get("panels") or [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for e in entries:
            run = finished[e["runs"][0]]
            if not run.get("curve") or not _in_panel(e[rows], panel):
                continue
            batch = run["config"]["batch_size"]
            steps, losses = zip(*run["curve"])
            ax.plot([s * batch for s in steps], losses, label=" ".join(
                [str(e[a]) for a in e if a in exp.axes and a not in (select, rep["average"])]
                + ([str(e["best_" + select])] if select else [])))
        ax.set(xlabel="sequences seen", ylabel="training loss", title=f"{exp.name}" + (f": {panel}" if panel else ""))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save(fig, path)


def bar_plot(plt, exp: Experiment, entries: list[dict], group_axes: list[str], path: Path) -> Path:
    """Mean ± spread per ``rows`` value, one bar per value of the other axes (``cols`` first)."""
    from dla.plots import save

    rows = exp.report["rows"]
    others = [a for a in group_axes if a != rows]
    series: dict[str, dict] = {}
    for e in entries:
        series.setdefault(" ".join(str(e[a]) for a in others) or "mean", {})[e[rows]] = e
    labels = [r for r in exp.axes[rows] if any(r in s for s in series.values())]
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(labels) * max(1, len(series))), 4.2))
    for i, (name, by_row) in enumerate(series.items()):
        xs = [j + i * width for j, r in enumerate(labels) if r in by_row]
        ax.bar(xs, [by_row[r]["mean"] for r in labels if r in by_row], width,
               yerr=[by_row[r]["std"] for r in labels if r in by_row], capsize=2, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="accuracy", ylim=(0, 1.02), title=exp.name)
    ax.grid(True, axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return save(fig, path)


def update_results_md(path: Path, exp: Experiment, summary: dict, table: str, pngs: list[Path],
                      results_dir: Path) -> None:
    """Replace (or add) this experiment's generated block in docs/results.md; text outside the
    blocks (conclusions) is left alone."""
    from dla.train.metrics import format_duration

    begin, end = f"<!-- begin generated: {exp.name} -->", f"<!-- end generated: {exp.name} -->"
    def rel(p: Path) -> str:
        return os.path.relpath(p, path.parent)

    try:
        exp_file = exp.path.resolve().relative_to(path.resolve().parent.parent)
    except ValueError:
        exp_file = exp.path
    lines = [begin, f"_{exp.description.strip()}_" if exp.description else "", "",
             (f"- command: `python experiments/run.py {exp_file} --device cuda --workers W --time-budget 480` "
              "(repeat until no run is left; `--steps-scale F` shrinks training)"),
             "- commands run: " + ("; ".join(f"`python experiments/run.py {' '.join(a)}`"
                                             for a in summary["commands"]) or "–"),
             f"- runs finished: {summary['finished_runs']} of {summary['grid_runs']}",
             f"- commit(s): {', '.join(summary['commits']) or '–'}; device(s): {', '.join(summary['devices']) or '–'}",
             (f"- time: {format_duration(summary['wall_s'])} wall over all calls "
              f"({format_duration(summary['run_seconds'])} summed over runs"
              + (f"; {summary['cut_off_calls']} call(s) cut off, counted to their last finished run"
                 if summary.get("cut_off_calls") else "") + ")"),
             f"- metric: {summary['metric']}; data: `{rel(results_dir)}/`",
             "", table or "(no finished runs yet)", ""]
    for png in pngs:
        lines += [f"![{png.stem}]({rel(png)})", ""]
    lines.append(end)
    block = "\n".join(lines)
    text = path.read_text() if path.exists() else RESULTS_MD_TITLE + "\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {exp.name}\n\n" + block + "\n\n**Conclusion:** (to be written from the data)\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
