"""The training loss of the short pre-training runs, step by step, one line per run, in one PNG.

    python experiments/pretrain_short/plot.py                      # the three configs' out_dirs
    python experiments/pretrain_short/plot.py RUN_DIR ... --out loss.png

Each run directory is a ``dla train`` out_dir, named in the legend: its ``metrics.jsonl`` holds every
logged step once, also across ``--stop-after`` / ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HERE = Path(__file__).resolve().parent
CONFIGS = ("dla_mamba2", "fenwick_mamba2", "single_mamba2")


def default_runs() -> list[Path]:
    """The three configs' out_dirs, where ``dla train`` run from the repository root writes them."""
    from dla.train import load_config

    return [ROOT / load_config(HERE / f"{name}.yaml").out_dir for name in CONFIGS]


def loss_curves(runs: list[Path]) -> dict[str, tuple[list[int], list[float]]]:
    """``run name -> (steps, losses)`` from each run's ``metrics.jsonl``."""
    from dla.errors import UserError
    from dla.train.metrics import read_metrics

    curves = {}
    for run in runs:
        metrics, config = run / "metrics.jsonl", run / "train_config.json"
        if not metrics.is_file() or not config.is_file():
            raise UserError(f"{run} holds no metrics.jsonl and train_config.json: train it with dla train first")
        rows = read_metrics(metrics)
        curves[run.name] = ([r["step"] for r in rows], [r["loss"] for r in rows])
    return curves


def tokens_per_step(run: Path) -> int:
    """Tokens in one optimizer step of a one-process run (fixed packing fills every row)."""
    config = json.loads((run / "train_config.json").read_text())
    return config["batch_size"] * config["grad_accum"] * config["data"]["seq_len"]


def main(argv: list[str] | None = None) -> int:
    from dla.errors import UserError
    from dla.plots import line_plot

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, help="dla train out_dirs (default: the three configs' out_dirs)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "pretrain_short" / "loss.png", help="the PNG")
    args = p.parse_args(argv)
    runs = args.runs or default_runs()
    try:
        curves = loss_curves(runs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sizes = {tokens_per_step(run) for run in runs}
    xlabel = f"step ({sizes.pop():,} tokens each)" if len(sizes) == 1 else "step"
    if line_plot(curves, args.out, "training loss", xlabel, "loss (nats per token)") is None:
        return 1
    for label, (steps, losses) in curves.items():
        print(f"{label}: {len(steps)} steps logged, last step {steps[-1]}, loss {losses[-1]:.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
