"""Run (or continue) an experiment sweep, then aggregate it.

    python experiments/run.py experiments/mqar.yaml --device cuda --workers 16 --time-budget 480
    python experiments/run.py experiments/mqar.yaml --aggregate-only
    python experiments/run.py experiments/mqar.yaml --list
    python experiments/run.py experiments/*.yaml --device cuda --workers 9 --probe 40   # size a session

Finished runs (a JSON under experiments/results/NAME/runs/) are skipped, so repeating the command
continues the sweep; --time-budget stops starting runs so that the call ends in time. Checkpoints
go to --work-dir (runs/sweeps by default) and are deleted after each run's evaluation.

Runs longer than one job or GPU call: --pause-after stops the runs still training at that time,
each with a checkpoint in --work-dir; the same command with the same --work-dir continues them
(from the same step and batch) before it starts new ones. With --export, the paused runs' work
dirs come back as DIR/NAME-paused-NN.tar.gz, each under 15.75 MiB, as many as fit what a GPU call
returns (--export-files, --export-mib; the runs closest to their end first); unpack them into the
work dir: for f in NAME-paused-*.tar.gz; do tar xzf $f -C runs/sweeps; done. Every run training at
the pause is paused, so with --export no more runs train at once than can come back (--workers is
lowered to that, with a note).

    python experiments/run.py experiments/mqar_long.yaml --device cuda --workers 7 --pause-after 8m --export "$OUT"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from dla.errors import UserError
    from dla.sweep import ExportRoom, aggregate, load_experiment, probe_sweep, run_sweep, select_runs
    from dla.train.metrics import parse_duration

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="+", help="experiment files (experiments/*.yaml), run one after another")
    p.add_argument("--workers", type=int, default=1, help="runs trained at once, each in its own process")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every run's steps by F (e.g. 0.25)")
    p.add_argument("--only", nargs="+", metavar="PATTERN", help="runs whose name matches a glob or contains it")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="start no run that would end after this")
    p.add_argument("--pause-after", type=parse_duration, metavar="TIME", help="after this (e.g. 8m, 500), runs still "
                   "training save a checkpoint in --work-dir and stop; the next call continues them")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="extra overrides for every run "
                   "(finished runs are not redone: use a fresh --results dir)")
    p.add_argument("--eval-set", nargs="+", default=[], metavar="KEY=VALUE", help="change the eval section "
                   "(e.g. examples=4 windows=1 for a smoke test)")
    p.add_argument("--results", default=str(ROOT / "experiments" / "results"), metavar="DIR")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "sweeps"), metavar="DIR", help="scratch checkpoints")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint (for dla inspect)")
    p.add_argument("--export", metavar="DIR", help="also pack the results into DIR/NAME.tar.gz (e.g. $OUT); "
                   "unpack it with tar xzf NAME.tar.gz -C experiments/results")
    p.add_argument("--no-export-paused", dest="export_paused", action="store_false", help="export the results "
                   "only: paused runs stay in --work-dir, which a warm GPU machine keeps for the next call (chain "
                   "it within the idle time, or they start over), and --workers is not capped to what a call "
                   "returns")
    p.add_argument("--export-files", type=int, default=8, metavar="N", help="at most N archives from this command "
                   "(a GPU call returns 8 files; give each of two sweeps in one call 4): results first, then the "
                   "paused runs that fit, most advanced first")
    p.add_argument("--export-mib", type=float, default=60, metavar="MIB", help="at most this many MiB of archives "
                   "from this command (a GPU call returns 64 MiB)")
    p.add_argument("--docs", default=str(ROOT / "docs" / "results.md"), metavar="FILE", help="the results page whose "
                   "generated block for the experiment is updated")
    p.add_argument("--aggregate-only", action="store_true", help="train nothing; rebuild tables, plot, docs")
    p.add_argument("--list", action="store_true", help="print the runs of the grid and exit")
    p.add_argument("--probe", type=int, metavar="STEPS", help="train one run per table cell for STEPS steps, "
                   "--workers at a time, and print the step times, minutes per run and runs per 9-minute call "
                   "(sizing a GPU session; writes no results)")
    args = p.parse_args(argv)
    try:
        import time

        started = time.time()
        device = args.device
        export_room = ExportRoom(args.export_files, int(args.export_mib * 2**20))  # shared by the experiments
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
            if args.probe:
                probe_sweep(path, Path(args.work_dir), device, args.workers, args.probe, args.only)
                continue
            if args.aggregate_only:
                aggregate(exp, Path(args.results) / exp.name, Path(args.docs))
                continue
            run_sweep(path, Path(args.results), Path(args.work_dir), device, args.workers, args.steps_scale,
                      args.only, None if args.time_budget is None else args.time_budget - (time.time() - started),
                      args.set, args.keep_checkpoints,
                      Path(args.export) if args.export else None, Path(args.docs), args.eval_set,
                      None if args.pause_after is None else args.pause_after - (time.time() - started),
                      export_room, args.export_paused)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
