"""``dla demo``: tiny DLA-Mamba-2 models, one per policy, trained on MQAR and compared.

Every model has the same size, data, seed and number of steps; only the policy differs:
``dynamic`` (DLA), ``fenwick`` (Log-Linear Attention), ``fixed`` (a boundary every ``period``
tokens, oldest states merged) and ``single`` (the Mamba-2 base). ``dynamic`` and ``fixed`` get
the same capacity as ``fenwick`` needs for the sequence length, so every multi-state model keeps
the same number of states. On a CPU the models train side by side, one process per core.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from dla.eval.recall import format_grid, mqar_accuracy
from dla.plots import pyplot, save
from dla.train.config import TrainConfig, load_config
from dla.train.metrics import format_duration, read_metrics
from dla.train.workers import run_parallel

# sizes that train in about 11 minutes on 2 CPU cores; a GPU trains the same task longer, on
# bigger batches. Models are trained at seq_len and evaluated up to max_len (twice as long:
# recall over longer gaps)
PRESETS = {
    "cpu": {"steps": 1200, "batch_size": 32, "seq_len": 64, "max_len": 128, "num_kv_pairs": 8, "vocab_size": 64,
            "hidden_size": 64, "num_hidden_layers": 2, "head_dim": 16, "state_size": 16, "lr": 3e-3,
            "threshold": 0.6, "eval_pairs": [4, 8, 16, 24]},
}
PRESETS["cuda"] = {**PRESETS["cpu"], "steps": 3000, "batch_size": 64}
SHOWN = ("dynamic", "fenwick", "fixed", "single")  # the policies the demo trains, in the order it shows them


def demo_config(policy: str, preset: dict, seed: int, out: Path, device: str) -> TrainConfig:
    T, max_len = preset["seq_len"], preset["max_len"]
    capacity = (max_len - 1).bit_length() + 1  # what fenwick needs for max_len tokens
    policy_keys = {"dynamic": [f"model.capacity={capacity}", f"model.threshold={preset['threshold']}"],
                   "fixed": [f"model.capacity={capacity}", f"model.period={max(1, T // capacity)}"],
                   "fenwick": [], "single": []}[policy]
    return load_config(None, [
        f"out_dir={out / policy}", f"seed={seed}", f"steps={preset['steps']}", f"batch_size={preset['batch_size']}",
        "log_every=25", "checkpoint_every=0", "keep_checkpoints=1", f"device={device}",
        "data.task=mqar", f"data.seq_len={T}", f"data.mqar.vocab_size={preset['vocab_size']}",
        f"data.mqar.num_kv_pairs={preset['num_kv_pairs']}", "data.mqar.random_non_queries=false",
        f"optim.lr={preset['lr']}", "optim.warmup_steps=50", "optim.weight_decay=0.0",
        "model.mixer=mamba2", f"model.policy={policy}", f"model.hidden_size={preset['hidden_size']}",
        f"model.num_hidden_layers={preset['num_hidden_layers']}", f"model.head_dim={preset['head_dim']}",
        f"model.state_size={preset['state_size']}", f"model.max_position_embeddings={max_len}", "model.chunk_size=32",
    ] + policy_keys)


def train_and_evaluate(policy: str, preset: dict, seed: int, out: Path, device: str, threads: int) -> dict:
    """Train one policy's model and measure its MQAR accuracy (run in a worker process on CPU)."""
    from dla.train import train
    from dla.train.checkpoint import load_model

    torch.set_num_threads(threads)
    started = time.perf_counter()
    cfg = demo_config(policy, preset, seed, out, device)
    result = train(cfg, show_progress=False)
    model, _, _ = load_model(result["checkpoint"], device)
    lengths = [preset["seq_len"], preset["max_len"]]
    rows = mqar_accuracy(model, cfg.data.mqar, lengths, preset["eval_pairs"], examples=256, seed=seed, device=device)
    seconds = time.perf_counter() - started
    print(f"  {policy:8s} trained and evaluated in {format_duration(seconds)}: final loss {result['loss']:.3f}",
          flush=True)
    return {"policy": policy, "capacity": model.config.policy_config().capacity, "loss": result["loss"],
            "seconds": seconds, "accuracy": rows,
            "curve": [(m["step"], m["loss"]) for m in read_metrics(Path(cfg.out_dir) / "metrics.jsonl")]}


def run_demo(out: Path, device: torch.device, seed: int = 0, steps: int | None = None,
             policies: list[str] = SHOWN, workers: int | None = None) -> list[dict]:
    preset = dict(PRESETS["cuda" if device.type == "cuda" else "cpu"])
    if steps is not None:
        preset["steps"] = steps
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"dla demo: {len(policies)} DLA-Mamba-2 models ({', '.join(policies)}) on MQAR, {preset['num_kv_pairs']} "
          f"key-value pairs in {preset['seq_len']} tokens, {preset['steps']} steps each, on {device.type}", flush=True)
    jobs = [(p, preset, seed, out, device.type) for p in policies]
    cores = os.cpu_count() or 1
    workers = 1 if device.type == "cuda" else workers or max(1, min(cores, len(jobs), 4))
    threads = torch.get_num_threads() if workers == 1 else max(1, cores // workers)
    finished = {job[0]: result for job, result in run_parallel(train_and_evaluate, jobs, workers, threads)}
    results = [finished[p] for p in policies]
    elapsed = time.perf_counter() - started
    tables = []
    for length in (preset["seq_len"], preset["max_len"]):
        rows = [{"policy": r["policy"], "num_kv_pairs": a["num_kv_pairs"], "accuracy": a["accuracy"]}
                for r in results for a in r["accuracy"] if a["seq_len"] == length]
        tables.append(format_grid(rows, "policy", "num_kv_pairs", f"MQAR accuracy at length {length} (rows: policy, "
                                  f"columns: key-value pairs; trained at length {preset['seq_len']} with "
                                  f"{preset['num_kv_pairs']} pairs)"))
    table = "\n\n".join(tables)
    print(table)
    print(f"total time {format_duration(elapsed)} on {device.type} ({os.cpu_count()} cores)")
    (out / "results.json").write_text(json.dumps({"preset": preset, "seed": seed, "seconds": elapsed,
                                                  "table": table, "results": results}, indent=1))
    png = plot_demo(results, preset, out / "demo.png")
    print(f"wrote {out / 'results.json'}" + (f" and {png}" if png else ""))
    return results


def plot_demo(results: list[dict], preset: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        for ax, length in zip(axes, (preset["seq_len"], preset["max_len"])):
            points = [(a["num_kv_pairs"], a["accuracy"]) for a in r["accuracy"]
                      if a["seq_len"] == length and a["accuracy"] is not None]
            ax.plot(*zip(*points), marker="o", label=f"{r['policy']} (C={r['capacity']})")
            ax.set(title=f"MQAR accuracy at length {length}", xlabel="key-value pairs", ylabel="accuracy",
                   ylim=(0, 1.02))
        axes[2].plot(*zip(*r["curve"]), label=r["policy"])
    axes[2].set(title="training loss (answer positions)", xlabel="step", ylabel="loss")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path)
