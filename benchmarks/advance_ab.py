"""A/B of the planner's step between two chunks: this tree's against other versions of the same file.

    git show REV:dla/schedule/triton_terms.py > /tmp/terms_old.py
    python benchmarks/advance_ab.py /tmp/terms_old.py [--rows 24 256] [--out FILE.json]

The step (``advance`` of dla/schedule/triton_terms.py: age the open state through a chunk, add the
chunk's writes from the open segment's start on, take the next chunk's products with it) is launched
once per planning chunk, so its latency bounds the plan of a model with few rows (24 rows: a 125M
model's heads on one sequence) and its throughput that of a large batch (256 rows: the op
benchmark's 8 x 32 heads). Every version runs in this process on the same random inputs (half the
rows with the open segment starting before the chunk, half inside it): microseconds per launch
(``triton.testing.do_bench`` median), and how its open state and products differ from this tree's
(bit for bit, or the largest difference relative to the largest value). Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.walk_ab import load_module  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("others", type=Path, nargs="+", help="other versions of dla/schedule/triton_terms.py")
    p.add_argument("--rows", type=int, nargs="+", default=[24, 256], help="sequence-heads (default: 24 256)")
    p.add_argument("--key-dim", type=int, default=128)
    p.add_argument("--value-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64, help="tokens per planning chunk (the planner's: 64)")
    p.add_argument("--chunks", type=int, default=64, help="chunks in the window (default 64: 4K tokens)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import torch
    import triton

    from dla.schedule import triton_terms

    if not torch.cuda.is_available():
        p.error("needs a GPU")
    versions = {"this tree": triton_terms}
    for i, path in enumerate(args.others):
        module = load_module(path, f"terms_other_{i}")
        if not hasattr(module, "advance"):
            p.error(f"{path} has no advance() to time")
        versions[str(path)] = module
    K, V, L, NC = args.key_dim, args.value_dim, args.chunk, args.chunks
    i = NC // 2  # a chunk in the middle, with a next chunk to take products with
    rows = []
    for R in args.rows:
        gen = torch.Generator(device="cuda").manual_seed(R)

        def rand(*shape):
            return torch.rand(*shape, device="cuda", generator=gen)

        k = torch.randn(R, NC, L, K, device="cuda", generator=gen)
        v = torch.randn(R, NC, L, V, device="cuda", generator=gen)
        write_scale, chunk_decay, carry_scale = rand(R, NC, L), rand(R, NC), rand(R, NC, L)
        open_state = torch.randn(R, K, V, device="cuda", generator=gen)
        open_start = torch.full((R,), i * L - 3, device="cuda", dtype=torch.long)
        open_start[::2] = i * L + L // 3  # half the rows open a segment inside the chunk
        mine = None
        for name, module in versions.items():
            def step():
                return module.advance(k, v, write_scale, chunk_decay, carry_scale, i, open_state, open_start, True)

            state, carried = step()
            if mine is None:
                mine = state, carried
            same = torch.equal(state, mine[0]) and torch.equal(carried, mine[1])
            diff = max(float((state - mine[0]).abs().max() / mine[0].abs().max()),
                       float((carried - mine[1]).abs().max() / mine[1].abs().max()))
            us = 1e3 * triton.testing.do_bench(step, warmup=20, rep=200, return_mode="median")
            rows.append(dict(version=name, rows=R, K=K, V=V, L=L, us_per_launch=us, bitwise_equal=same,
                             max_rel_diff=diff))
            print(f"rows {R:5d}  {us:8.1f} us per launch  {'bit for bit' if same else f'differs {diff:.1e}':18s}"
                  f"  {name}", flush=True)
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                "torch": torch.__version__, "triton": triton.__version__}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
