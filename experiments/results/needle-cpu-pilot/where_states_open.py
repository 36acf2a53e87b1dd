"""Where a trained needle model's DLA layers open states, at its training length and beyond:
per layer, states opened per 100 tokens, the share of them merged again within the row, and the
shares inside the needles and inside the query. It is the sweep's boundary probe (passkey rows,
the eval's random depths and stream) at each length; that probe counted needles and query
together before commit a7d415d.

    python experiments/results/needle-cpu-pilot/where_states_open.py RUN_DIR --lengths 256 1024 4096 16384
"""

import argparse
import json

from dla.inspection import boundary_probe
from dla.train.checkpoint import load_model
from dla.train.config import config_from_dict

parser = argparse.ArgumentParser()
parser.add_argument("run")
parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
parser.add_argument("--examples", type=int, default=8)
args = parser.parse_args()

model, _, train_config = load_model(args.run)
cfg = config_from_dict(train_config)
rows = []
for length in args.lengths:
    for layer in boundary_probe({"task": "needle", "lengths": [length]}, cfg, model, "cpu", args.examples):
        rows.append({"length": length, **layer})
        shares = {name: region["births"] for name, region in layer["regions"].items()}
        print(f"length {length:6d} layer {layer['layer']}: {layer['births_per_100_tokens']:6.2f} per 100 tokens, "
              f"merged {layer['merged'] if layer['merged'] is None else round(layer['merged'], 2)}, "
              + ", ".join(f"in {k} {v if v is None else round(v, 2)}" for k, v in shares.items()))
print(json.dumps(rows))
