"""Forward+backward time and peak memory of the naive, recurrent and chunked paths vs T on CPU.

    python benchmarks/cpu_scaling.py [--lengths 512 1024 ...] [--capacities 1 4 16] [--timeout S]
                                     [--paths chunk ...] [--malloc glibc|tuned]

Every measurement runs in its own subprocess so that the peak resident memory (high-water mark
of the process, minus its value before the op) belongs to that one measurement. Time is the
median wall-clock time of the repeats and the smallest process CPU time (user + system; one
thread, so other work on a shared machine hardly changes it). Writes
``benchmarks/results/cpu_scaling.json`` and ``.png`` (a later run with other ``--paths`` or
``--malloc`` adds its measurements to the file). Shapes: B*H = 8 (B=2, H=4), K = V = 64.

``--malloc tuned`` keeps freed memory in glibc's heap (:func:`dla.cpu_allocator.keep_freed_memory`,
which the ``dla`` command calls at start). With the defaults every tensor over 32 MiB is a fresh
``mmap`` whose pages the kernel zeroes on first touch: at T >= 4K the chunked path's per-chunk
tensors cross that size and its time grows faster than T although its work does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PATHS = ("naive", "recurrent", "chunk")
BASES = ("mamba2", "gated_deltanet")
MEMORY_LIMIT = 14 << 30


def measure(path: str, base: str, capacity: int, T: int, repeats: int, malloc: str) -> dict:
    """Run in a child process: median forward+backward seconds and peak RSS increase (MiB)."""
    import torch
    import torch.nn.functional as F

    import dla
    from dla.cpu_allocator import keep_freed_memory

    if malloc == "tuned":
        keep_freed_memory()

    # one thread: with two busy processes on a small machine, OpenMP's spinning threads turn any
    # contention into 100x slowdowns; one thread keeps the ratios meaningful
    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, H, K, V = 2, 4, 64, 64
    q = torch.randn(B, T, H, K, requires_grad=True)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1).requires_grad_()
    v = torch.randn(B, T, H, V, requires_grad=True)
    g = (-torch.rand(B, T, H) * 0.1).requires_grad_()
    beta = torch.rand(B, T, H, requires_grad=True) if base == "gated_deltanet" else None
    policy = "single" if capacity == 1 else "dynamic"
    schedule = dla.plan_schedule(policy, batch=B, heads=H, length=T, capacity=capacity,
                                 scores=dla.novelty_scores(k), threshold=0.5)
    lam = torch.ones(B, T, H, schedule.n_labels, requires_grad=True)
    op = {"naive": dla.naive_dla, "recurrent": dla.recurrent_dla, "chunk": dla.chunk_dla}[path]

    def step():
        out = op(q, k, v, g, lam, schedule, beta=beta)
        o = out[0] if isinstance(out, tuple) else out
        o.sum().backward()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": statistics.median(times), "cpu_seconds": min(cpu_times), "runs": len(times),
            "peak_mib": (rss1 - rss0) / 1024}


def run_child(path, base, capacity, T, repeats, timeout, malloc):
    cmd = [sys.executable, __file__, "--child", path, base, str(capacity), str(T), str(repeats), malloc]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"skipped": f"over {timeout:.0f} s"}
    except subprocess.CalledProcessError as e:
        last = e.stderr.strip().splitlines()[-1] if e.stderr.strip() else "failed"
        return {"skipped": "out of memory" if "alloc" in last.lower() or "memory" in last.lower() else last}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _label(r: dict) -> str:
    return r["path"] + (", tuned malloc" if r.get("malloc") == "tuned" else "")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = sorted({r["capacity"] for r in results})
    fig, axes = plt.subplots(2, len(BASES), figsize=(6 * len(BASES), 8), squeeze=False)
    styles = {"naive": ":", "recurrent": "--", "chunk": "-", "chunk, tuned malloc": "-."}
    for col, base in enumerate(BASES):
        # CPU time where measured (one thread: the wall time of an uncontended run), else wall time
        panels = [("cpu_seconds", "fwd+bwd CPU time (s)"), ("peak_mib", "peak memory (MiB)")]
        for row, (key, ylabel) in enumerate(panels):
            ax = axes[row][col]
            for i, cap in enumerate(caps):
                for p, style in styles.items():
                    pts = [(r["T"], r.get(key, r.get("seconds"))) for r in results if r["base"] == base
                           and r["capacity"] == cap and _label(r) == p and "seconds" in r]
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, [max(y, 1e-3) for y in ys], style, marker="o", color=f"C{i}",
                                label=f"{p}, C={cap}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{base}: {ylabel} (B*H=8, K=V=64, CPU)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        # a measurement that needs more than MEMORY_LIMIT fails cleanly instead of swapping
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        path, base, cap, T, repeats, malloc = sys.argv[2:8]
        print(json.dumps(measure(path, base, int(cap), int(T), int(repeats), malloc)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--capacities", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=240, help="seconds per measurement before giving up")
    ap.add_argument("--naive-max", type=int, default=4096, help="longest T for the O(T^2) path")
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    ap.add_argument("--malloc", choices=("glibc", "tuned"), default="glibc",
                    help="glibc's defaults, or freed memory kept in the heap (see above)")
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu_scaling")
    args = ap.parse_args()
    import torch

    def key(r):
        return r["path"], r["base"], r["capacity"], r["T"], r.get("malloc", "glibc")

    old = args.out.with_suffix(".json")
    results = json.loads(old.read_text())["results"] if old.exists() else []
    given_up = set()  # (path, base, C): once a length times out, longer ones are not tried
    for base in BASES:
        for cap in args.capacities:
            for T in args.lengths:
                for p in args.paths:
                    if (p, base, cap) in given_up or (p == "naive" and T > args.naive_max):
                        continue
                    r = run_child(p, base, cap, T, args.repeats if T <= 4096 or p == "chunk" else 1, args.timeout,
                                  args.malloc)
                    r.update(path=p, base=base, capacity=cap, T=T, malloc=args.malloc)
                    if "skipped" in r:
                        given_up.add((p, base, cap))
                    results = [o for o in results if key(o) != key(r)] + [r]
                    shown = f"{r['seconds']:9.3f} s {r['peak_mib']:9.1f} MiB" if "seconds" in r else r["skipped"]
                    print(f"{base:15s} C={cap:<3d} T={T:<6d} {p:10s} {args.malloc:6s} {shown}", flush=True)
    summary = {}
    for base in BASES:
        for cap in sorted({r["capacity"] for r in results}):
            def timed(path, malloc="glibc", base=base, cap=cap):
                return {r["T"]: r for r in results if key(r)[:3] == (path, base, cap) and "seconds" in r
                        and r.get("malloc", "glibc") == malloc}
            rec = timed("recurrent")
            name = f"{base}/C={cap}"
            for malloc in ("glibc", "tuned"):
                t = timed("chunk", malloc)
                if 2048 in t and 16384 in t:
                    summary[f"{name}/chunk time(16K)/time(2K), {malloc} malloc"] = (
                        t[16384]["seconds"] / t[2048]["seconds"])
                    if "cpu_seconds" in t[2048] and "cpu_seconds" in t[16384]:
                        summary[f"{name}/chunk cpu time(16K)/cpu time(2K), {malloc} malloc"] = (
                            t[16384]["cpu_seconds"] / t[2048]["cpu_seconds"])
                    summary[f"{name}/chunk mem(16K)/mem(2K), {malloc} malloc"] = (
                        t[16384]["peak_mib"] / max(t[2048]["peak_mib"], 1e-9))
            t = timed("chunk")
            summary[name + "/recurrent over chunk time"] = {
                T: rec[T]["seconds"] / t[T]["seconds"] for T in sorted(rec) if T in t}
    meta = {"date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), "cpus": os.cpu_count(), "threads": 1,
            "shapes": "B=2, H=4, K=V=64, float32, fwd+bwd, dynamic policy (single at C=1)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "results": results},
                                                        indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
