"""Experiment grids over ``dla train``: expand (:mod:`.grid`), train and evaluate every run with
a local worker pool (:mod:`.runner`), aggregate into tables, figures and the results page
(:mod:`.report`). ``experiments/run.py`` is the command line; the library never imports this."""

from experiments.sweep.grid import Experiment, Run, load_experiment, run_config, select_runs
from experiments.sweep.report import aggregate, boundary_table, finished_runs, heatmap_layout
from experiments.sweep.runner import run_sweep

__all__ = [
    "Experiment",
    "Run",
    "aggregate",
    "boundary_table",
    "finished_runs",
    "heatmap_layout",
    "load_experiment",
    "run_config",
    "run_sweep",
    "select_runs",
]
