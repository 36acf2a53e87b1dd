"""Run (or continue) an experiment sweep, then aggregate it into tables, figures and docs/results.md.

    python experiments/run.py experiments/mqar.yaml --device cuda --workers 16
    python experiments/run.py experiments/mqar.yaml --aggregate-only
    python experiments/run.py experiments/mqar.yaml --list

Finished runs (a JSON under experiments/results/NAME/runs/) are skipped, so repeating the command
continues the sweep; --time-budget starts no run that would end after it. Checkpoints go to
--work-dir (runs/sweeps by default) and are deleted after each run's evaluation.

Runs longer than a job's time limit: --pause-after stops the runs still training at that time,
each with a checkpoint in --work-dir; the same command with the same --work-dir resumes them (from
the same step and batch, as `dla train --resume` does) before it starts new ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from dla.errors import UserError
    from dla.train.metrics import parse_duration
    from experiments.sweep import aggregate, load_experiment, run_sweep, select_runs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="+", help="experiment files (experiments/*.yaml), run one after another")
    p.add_argument("--workers", type=int, default=1, help="runs trained at once, each in its own process")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every run's steps by F (e.g. 0.25)")
    p.add_argument("--only", nargs="+", metavar="PATTERN", help="runs whose name matches a glob or contains it")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="start no run that would end after this")
    p.add_argument(
        "--pause-after",
        type=parse_duration,
        metavar="TIME",
        help="after this (e.g. 3h50m, 500), runs "
        "still training save a checkpoint in --work-dir and stop; the same command resumes them",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra overrides for every run (finished runs are not redone: use a fresh --results dir)",
    )
    p.add_argument(
        "--eval-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="change the eval section (e.g. examples=4 windows=1 for a smoke test)",
    )
    p.add_argument("--results", default=str(ROOT / "experiments" / "results"), metavar="DIR")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "sweeps"), metavar="DIR", help="scratch checkpoints")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint (for dla inspect)")
    p.add_argument(
        "--docs",
        default=str(ROOT / "docs" / "results.md"),
        metavar="FILE",
        help="the results page whose generated block for the experiment is updated",
    )
    p.add_argument("--aggregate-only", action="store_true", help="train nothing; rebuild tables, plot, docs")
    p.add_argument("--list", action="store_true", help="print the runs of the grid and exit")
    args = p.parse_args(argv)
    try:
        started = time.time()
        device = args.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        for path in args.experiment:
            exp = load_experiment(path, args.eval_set)
            if args.list:
                runs = select_runs(exp, args.only)
                print(f"{exp.name}: {len(runs)} of {len(exp.runs)} runs")
                for r in runs:
                    print(f"  {r.name}")
                continue
            if args.aggregate_only:
                aggregate(exp, Path(args.results) / exp.name, Path(args.docs))
                continue
            run_sweep(
                path,
                Path(args.results),
                Path(args.work_dir),
                device,
                args.workers,
                args.steps_scale,
                args.only,
                None if args.time_budget is None else args.time_budget - (time.time() - started),
                args.set,
                args.keep_checkpoints,
                Path(args.docs),
                args.eval_set,
                None if args.pause_after is None else args.pause_after - (time.time() - started),
            )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
