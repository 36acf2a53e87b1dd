"""Where the time of one chunk_dla forward+backward goes on GPU (torch.profiler, CUDA time).

    python benchmarks/profile_chunk.py [--base mamba2] [--T 8192] [--capacity 16]
"""

import argparse

import torch
from ops import TOKENS, make_inputs
from torch.profiler import ProfilerActivity, profile

import dla


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", default="mamba2")
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--capacity", type=int, default=16)
    args = ap.parse_args()
    B = max(1, TOKENS // args.T)
    x = {n: None if t is None else t.requires_grad_() for n, t in
         make_inputs(args.base, B, args.T, "cuda", torch.bfloat16).items()}
    H = x["q"].shape[2]
    sched = dla.plan_schedule("dynamic", batch=B, heads=H, length=args.T, capacity=args.capacity,
                              scores=dla.novelty_scores(x["k"]))
    lam = torch.full((B, args.T, H, sched.n_labels), 0.7, device="cuda", requires_grad=True)

    def step():
        o, _ = dla.chunk_dla(x["q"], x["k"], x["v"], x["g"], lam, sched, beta=x["beta"])
        o.float().sum().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
