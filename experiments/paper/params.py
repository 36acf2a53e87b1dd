"""Print the parameter count of every paper config (built on the meta device: instant, no memory).

    PYTHONPATH=. python experiments/paper/params.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.paper.recipe import parameter_table  # noqa: E402


def main() -> None:
    print(f"{'config':24} {'mixer':15} {'policy':8} {'C':>3} {'layers':>6} {'width':>6} {'heads':>5} "
          f"{'parameters':>14} {'target':>7}")
    for r in parameter_table():
        target = f"{r['target'] / 1e9:.2f}B" if r["target"] else "-"
        capacity = "-" if r["capacity"] is None else r["capacity"]
        print(f"{r['config']:24} {r['mixer']:15} {r['policy']:8} {capacity:>3} {r['layers']:>6} {r['hidden_size']:>6} "
              f"{r['heads']:>5} {r['parameters']:>14,} {target:>7}")


if __name__ == "__main__":
    main()
