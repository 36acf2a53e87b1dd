"""`dla inspect` of a trained needle model on two rows: a passkey row as the evaluation lays it out
(one needle; what `dla inspect --synthetic` shows) and a row of its training mixture (up to 8
needles in 256 tokens, each queried at the end), with the needles and queries marked.

    python experiments/results/needle-cpu-pilot/inspect_rows.py RUN_DIR OUT_DIR [--seed 0]
"""

import argparse
from pathlib import Path

import torch

from dla.eval import synthetic_tasks
from dla.inspection import inspect_model, synthetic_example
from dla.train.checkpoint import load_model, resolve_checkpoint

parser = argparse.ArgumentParser()
parser.add_argument("run")
parser.add_argument("out")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

directory = resolve_checkpoint(args.run)
model, _, train_config = load_model(directory)
_, needle, train_len = synthetic_tasks(train_config, model.config.vocab_size)
for name, task in {"evaluation_row": needle.evaluation_task(), "training_row": needle}.items():
    ids, regions = synthetic_example(task, train_len, args.seed)
    with torch.no_grad():
        report = inspect_model(model, ids, lambda i: f"{i} ", Path(args.out) / name,
                               f"one needle {name.replace('_', ' ')} (seed {args.seed})", None, str(directory), regions)
    for layer in report["layers"]:
        print(f"{name}: layer {layer['layer']}: opened per head {[len(h['opened']) - 1 for h in layer['heads']]}, "
              f"merges {[len(h['merges']) for h in layer['heads']]}; needle tokens {len(report['regions']['needles'])}")
