"""How long planning a schedule takes on CPU (or GPU with --device cuda), per policy.

    python benchmarks/scheduler.py [--bh 64] [--length 16384] [--capacity 16]

Writes ``benchmarks/results/scheduler_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import dla


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bh", type=int, default=64, help="sequences x heads (B = bh / 8, H = 8)")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--capacity", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    H = 8
    B = max(1, args.bh // H)
    k = torch.randn(B, args.length, H, 64, device=args.device)
    scores = dla.novelty_scores(k)
    rows = {}
    for policy in ("single", "fixed", "fenwick", "dynamic"):
        kw = dict(batch=B, heads=H, length=args.length, scores=scores, period=64,
                  capacity=None if policy == "fenwick" else args.capacity)
        times = []
        for _ in range(args.repeats):
            if args.device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            s = dla.plan_schedule(policy, **kw)
            if args.device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows[policy] = {"seconds": statistics.median(times), "capacity": s.capacity,
                        "boundaries_per_head": float((s.death >= 0).sum()) / (B * H)}
        print(f"{policy:8s} C={s.capacity:<3d} {rows[policy]['seconds']:8.3f} s", flush=True)
    out = Path(__file__).parent / "results" / f"scheduler_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "device": args.device, "B": B, "H": H, "T": args.length,
            "threads": torch.get_num_threads(), "note": "plan_schedule wall time incl. validation"}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
