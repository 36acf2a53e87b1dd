"""How long planning a schedule takes, per policy, beside the op it feeds.

    python benchmarks/scheduler.py [--batch 8 --heads 8 --length 16384 --capacity 30] [--device cuda --op]

The ``dynamic`` rows plan the paper's method (state score, density merging, capacity ``--capacity``)
from random k, v, g, β, its ``state_drift`` reading, and the earlier variant (key novelty, least-info
merging, capacity 16). ``--op`` also times the chunked op's forward and backward on the same tokens
(the planning share of a training step). ``--kernels`` (CUDA) profiles one more plan per row and
reports the GPU time of the Triton walk beside that of all the planner's kernels (the rest is
the chunk-parallel terms in PyTorch, and launch gaps make up the wall time), and each kernel's GPU
time and launches (the row's ``kernels``; the largest printed). Writes ``--out``
(default ``benchmarks/results/scheduler_<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

import dla

VARIANTS = {  # name -> (policy, plan_schedule keywords)
    "single": ("single", {}),
    "fixed": ("fixed", {"period": 64}),
    "fenwick": ("fenwick", {"capacity": None}),
    "dynamic": ("dynamic", {}),
    "dynamic-drift": ("dynamic", {"score": "state_drift"}),
    "dynamic-novelty": ("dynamic", {"score": "novelty", "merge": "least_info", "capacity": 16, "threshold": 0.5}),
}


def timed(fn, device, repeats, warmup=0):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def kernel_seconds(fn):
    """GPU seconds of one call of ``fn``: ``(the walk kernel's, all kernels', {kernel name: [seconds,
    launches]})``, the kernels largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by_name = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = by_name.setdefault(e.name, [0.0, 0])
            entry[0] += e.device_time * 1e-6
            entry[1] += 1
    by_name = dict(sorted(by_name.items(), key=lambda kv: -kv[1][0]))
    walk = sum(seconds for name, (seconds, _) in by_name.items() if "walk" in name)
    return walk, sum(seconds for seconds, _ in by_name.values()), by_name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--key-dim", type=int, default=64)
    ap.add_argument("--value-dim", type=int, default=64)
    ap.add_argument("--capacity", type=int, default=30)
    ap.add_argument("--threshold", type=float, default=1.0, help="τ of the state scores")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--op", action="store_true", help="also time chunk_dla forward + backward")
    ap.add_argument("--backend", choices=("torch", "triton"), default=None,
                    help="the dynamic walk's (default: Triton on CUDA; triton on the CPU needs TRITON_INTERPRET=1)")
    ap.add_argument("--kernels", action="store_true", help="also profile the planner's GPU kernels (CUDA)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    B, H, T, dev = args.batch, args.heads, args.length, args.device
    gen = torch.Generator(device=dev).manual_seed(0)
    dtype = torch.bfloat16 if dev != "cpu" else torch.float32
    q = torch.randn(B, T, H, args.key_dim, device=dev, generator=gen).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, args.key_dim, device=dev, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T, H, args.value_dim, device=dev, generator=gen).to(dtype)
    g = -torch.rand(B, T, H, device=dev, generator=gen) * 0.1
    beta = torch.rand(B, T, H, device=dev, generator=gen).to(dtype)
    rows = {}
    for name in args.variants:
        policy, extra = VARIANTS[name]
        kw = {**dict(batch=B, heads=H, length=T, capacity=args.capacity, k=k, v=v, g=g, beta=beta), **extra}
        if policy == "dynamic":
            kw.setdefault("threshold", args.threshold)
            kw["backend"] = args.backend
        # on CUDA the first plan of a shape runs launched and the second captures a CUDA graph, which
        # every later plan replays (dla/schedule/graphed.py): the timed plans are replays
        seconds, s = timed(lambda: dla.plan_schedule(policy, **kw), dev, args.repeats, warmup=2 if dev != "cpu" else 0)
        row = {"policy": policy, "options": {k_: v_ for k_, v_ in extra.items()}, "plan_seconds": seconds,
               "capacity": s.capacity, "boundaries_per_100_tokens": 100 * float((s.death >= 0).sum()) / (B * H * T)}
        kernels = ""
        if args.kernels and dev != "cpu":
            walk, total, by_name = kernel_seconds(lambda: dla.plan_schedule(policy, **kw))
            row["walk_kernel_seconds"], row["plan_kernel_seconds"], row["kernels"] = walk, total, by_name
            kernels = f", GPU: walk {1e3 * walk:.1f} ms of {1e3 * total:.1f} ms"
        if args.op:
            lam = torch.ones(B, T, H, s.n_labels, device=dev, dtype=dtype)
            inputs = [x.detach().requires_grad_() for x in (q, k, v)]

            def step():
                o, _ = dla.chunk_dla(*inputs, g, lam, s, beta=beta)
                o.float().square().mean().backward()

            step()  # compile / warm up
            row["op_fwd_bwd_seconds"], _ = timed(step, dev, args.repeats)
            row["plan_share"] = seconds / (seconds + row["op_fwd_bwd_seconds"])
        rows[name] = row
        share = f"  op fwd+bwd {row['op_fwd_bwd_seconds']:.3f} s, planning {100 * row['plan_share']:.0f}%" \
            if args.op else ""
        print(f"{name:16s} C={s.capacity:<3d} plan {seconds:8.3f} s, {row['boundaries_per_100_tokens']:5.1f} "
              f"boundaries / 100 tokens{kernels}{share}", flush=True)
        for kernel, (gpu_seconds, launches) in list(row.get("kernels", {}).items())[:8]:
            print(f"    {1e3 * gpu_seconds:8.2f} ms {launches:6d} launches  {kernel[:90]}")
    out = args.out or Path(__file__).parent / "results" / f"scheduler_{dev}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if dev != "cpu" else "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {"device": name, "torch": torch.__version__, "triton": triton_version, "fla": "not used",
            "date": date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
            "B": B, "H": H, "T": T, "K": args.key_dim, "V": args.value_dim, "threshold": args.threshold,
            "threads": torch.get_num_threads(), "note": "plan_schedule wall time (median) incl. validation"}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
