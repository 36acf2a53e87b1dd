"""What the chunked op keeps for its backward: bytes saved per ``dla`` call site, on any device.

    python benchmarks/saved_bytes.py [--backend torch] [--length 1024] [--capacity 16 30] [--out FILE.json]
    TRITON_INTERPRET=1 python benchmarks/saved_bytes.py --backend triton --length 512   # the Triton path on a CPU

One forward of :func:`dla.chunk_dla` (Mamba-2 shapes by default: K = 128, V = 64, bf16 inputs, the
paper's schedule planned on random inputs) under ``torch.autograd.graph.saved_tensors_hooks``: every
storage the autograd graph keeps is counted once, at the innermost ``dla`` line that saved it. The
total per token and head is what sets the peak memory of a training step at long context.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
import traceback
from pathlib import Path

import torch

import dla


def saved_bytes(backend: str, length: int, heads: int, key_dim: int, value_dim: int, capacity: int):
    """``(total bytes, Counter[(site, dtype, shape)] -> bytes)`` of one forward's saved tensors."""
    torch.manual_seed(0)
    N, T, H = 1, length, heads
    q, k = (torch.randn(N, T, H, key_dim, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    v = torch.randn(N, T, H, value_dim, dtype=torch.bfloat16).requires_grad_()
    g = (-torch.rand(N, T, H) * 0.1).requires_grad_()
    lam = (torch.rand(N, T, H, capacity + 1) + 0.5).requires_grad_()
    schedule = dla.plan_schedule("dynamic", batch=N, heads=H, length=T, capacity=capacity, k=k, v=v, g=g)
    storages, sites = {}, collections.Counter()

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in storages:
            storages[key] = t.untyped_storage().nbytes()
            frames = [f for f in traceback.extract_stack() if "/dla/" in f.filename]
            site = f"{frames[-1].filename.split('/dla/')[-1]}:{frames[-1].lineno}" if frames else "?"
            sites[(site, str(t.dtype).removeprefix("torch."), tuple(t.shape))] += storages[key]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dla.chunk_dla(q, k, v, g, lam, schedule, backend=backend)
    return sum(storages.values()), sites


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="torch", choices=("torch", "triton"))
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=128)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--capacity", type=int, nargs="+", default=[30])
    parser.add_argument("--top", type=int, default=20, help="call sites listed (default 20)")
    parser.add_argument("--out", type=Path, help="write the totals and call sites as JSON")
    args = parser.parse_args()
    rows = []
    for capacity in args.capacity:
        total, sites = saved_bytes(args.backend, args.length, args.heads, args.key_dim, args.value_dim, capacity)
        per = total / (args.length * args.heads)
        print(f"C = {capacity}: saved {total / 2**20:.1f} MiB, {per:.0f} bytes per token and head")
        for (site, dtype, shape), n in sites.most_common(args.top):
            print(f"{n / 2**20:9.2f} MiB  {site:32s} {dtype:9s} {shape}")
        rows.append({"backend": args.backend, "length": args.length, "heads": args.heads, "key_dim": args.key_dim,
                     "value_dim": args.value_dim, "capacity": capacity, "bytes_per_token_head": per,
                     "sites": [{"site": site, "dtype": dtype, "shape": list(shape), "bytes": n}
                               for (site, dtype, shape), n in sites.most_common()]})
    if args.out:
        import triton

        meta = {"device": "cpu" + (" (Triton interpreter)" if args.backend == "triton" else ""),
                "torch": torch.__version__, "triton": triton.__version__, "date": datetime.date.today().isoformat(),
                "dtype": "bfloat16", "command": "python benchmarks/saved_bytes.py " + " ".join(sys.argv[1:])}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
