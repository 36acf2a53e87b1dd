"""GPU op benchmark: DLA vs flash-linear-attention and SDPA, 32K tokens per batch.

    python benchmarks/ops.py [--lengths 2048 ... 32768] [--capacities 8 16 32] [--out FILE.json]
    python benchmarks/ops.py --plot FILE.json          # (re)draw the PNG from a JSON

Forward and forward+backward median times (``triton.testing.do_bench``), peak memory of one
forward+backward, and the time to plan the schedule (``plan_ms``: the information scores and the
``dynamic`` policy's walk; by default the paper's state score and density merging) on bf16 inputs.
Random inputs make the state score open a state at about every token, so every token also merges:
the planner's worst case and the op's densest schedule. ``--segment-len N`` gives keys and values
that stay near one direction for runs of about ``N`` tokens (a new run at each token with probability
``1/N``, independently per head), so the state score opens a state where a run starts: a schedule
like a trained layer's, with a state per ``N`` tokens. Shapes: Mamba-2 H=32, K=128, V=64; Gated
DeltaNet H=16, K=V=128; SDPA H=16, D=128. The walks' environment variables apply (e.g.
``DLA_WALK_KEY_SPLITS=1`` times the Mamba-2 walk in one key split instead of two: docs/kernels.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

TOKENS = 32768


def make_inputs(base, B, T, device, dtype, segment_len=None):
    """Random ``q, k, v, g`` (and ``beta``) of the op benchmark's shapes; with ``segment_len``, keys and
    values in runs of about that many tokens around one direction each (10% noise)."""
    import torch
    import torch.nn.functional as F

    H, K, V = (32, 128, 64) if base == "mamba2" else (16, 128, 128)
    q = torch.randn(B, T, H, K, device=device, dtype=dtype)
    k = torch.randn(B, T, H, K, device=device)
    v = torch.randn(B, T, H, V, device=device)
    if segment_len:
        starts = torch.rand(B, T, H, device=device) < 1 / segment_len
        first = torch.arange(T, device=device)[None, :, None].expand_as(starts).masked_fill(~starts, 0)
        first = first.cummax(1).values  # the token that starts each token's run
        k = k.gather(1, first[..., None].expand_as(k)) + 0.1 * k
        v = v.gather(1, first[..., None].expand_as(v)) + 0.1 * v
    k, v = k.to(dtype), v.to(dtype)
    if base == "gated_deltanet":
        q, k = F.normalize(q.float(), dim=-1).to(dtype), F.normalize(k.float(), dim=-1).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device=device)).mul(0.1).float()
    beta = torch.rand(B, T, H, device=device).to(dtype) if base == "gated_deltanet" else None
    return dict(q=q, k=k, v=v, g=g, beta=beta)


def timed(fn, inputs):
    """(forward ms, forward+backward ms, peak MiB of one forward+backward)."""
    import torch
    from triton.testing import do_bench

    leaves = [x for x in inputs if x is not None and x.requires_grad]
    out = fn()
    do = torch.randn_like(out)

    def fwd_bwd():
        torch.autograd.grad(fn(), leaves, do)

    fwd = do_bench(fn, warmup=25, rep=100, return_mode="median")
    both = do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    return fwd, both, peak


def run(args):
    import torch
    import triton

    import dla
    from dla.ops.triton.chunk_inter import key_splits

    dev = "cuda"
    dtype = torch.bfloat16
    results = []
    meta = {"date": time.strftime("%Y-%m-%d"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "tokens_per_batch": TOKENS, "dtype": "bfloat16",
            "score": args.score, "threshold": args.threshold, "segment_len": args.segment_len,
            # the Mamba-2 walk's key splits at its K = 128 (dla.ops.triton.chunk_inter.key_splits), read at
            # every launch
            "walk_key_splits": key_splits(128, matrix=False)}
    data = {"meta": meta, "results": results}

    def record(name, base, T, C, fn, tensors, extra=None):
        try:
            fwd, both, peak = timed(fn, tensors)
            row = dict(name=name, base=base, T=T, C=C, fwd_ms=fwd, fwd_bwd_ms=both, peak_mib=peak)
        except Exception as e:  # a baseline that refuses (e.g. fla's backward on Hopper) or OOM
            row = dict(name=name, base=base, T=T, C=C, error=f"{type(e).__name__}: {str(e)[:200]}")
            torch.cuda.empty_cache()
        row.update(extra or {})
        results.append(row)
        save(data, args.out)  # after every row: a run cut short keeps what it measured
        shown = (f"fwd {row['fwd_ms']:8.2f} ms  fwd+bwd {row['fwd_bwd_ms']:8.2f} ms  peak {row['peak_mib']:8.0f} MiB"
                 if "fwd_ms" in row else row["error"][:90])
        print(f"{name:28s} T={T:<6d} C={str(C):4s} {shown}", flush=True)

    try:
        import fla
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.log_linear_attn import chunk_log_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
        have_fla = True
    except ImportError:
        have_fla = False
        print("flash-linear-attention not importable: fla baselines skipped")
    if have_fla:
        meta["fla"] = fla.__version__

    for T in args.lengths:
        B = max(1, TOKENS // T)
        for base in args.bases:
            x = make_inputs(base, B, T, dev, dtype, args.segment_len)
            H, K = x["q"].shape[2], x["q"].shape[3]
            leaves = {n: (t.requires_grad_() if t is not None else None) for n, t in x.items()}
            scale = K ** -0.5
            for C in args.capacities:
                torch.cuda.synchronize()

                def plan():
                    # the earlier variant: key novelty with least-information merging
                    earlier = args.score == "novelty"
                    return dla.plan_schedule("dynamic", batch=B, heads=H, length=T, capacity=C, score=args.score,
                                             merge="least_info" if earlier else "density", threshold=args.threshold,
                                             k=x["k"], v=x["v"], g=x["g"], beta=x["beta"])

                sched = plan()
                plan_ms = triton.testing.do_bench(plan, warmup=5, rep=20, return_mode="median")
                lam = torch.full((B, T, H, sched.n_labels), 0.7, device=dev, dtype=dtype).requires_grad_()
                tensors = list(leaves.values()) + [lam]
                record(f"dla-{base}", base, T, C,
                       lambda: dla.chunk_dla(leaves["q"], leaves["k"], leaves["v"], leaves["g"], lam, sched,
                                             beta=leaves["beta"], scale=scale)[0],
                       tensors, dict(plan_ms=plan_ms, boundaries_per_head=float((sched.death >= 0).sum()) / (B * H),
                                     **({"segment_len": args.segment_len} if args.segment_len else {})))
            if have_fla:
                if base == "mamba2":
                    n_levels = (T - 1).bit_length() + 1
                    ls = torch.full((B, T, H, n_levels), 0.7, device=dev, dtype=dtype).requires_grad_()
                    record("fla-chunk_simple_gla", base, T, 1,
                           lambda: chunk_simple_gla(leaves["q"], leaves["k"], leaves["v"], g=leaves["g"],
                                                    scale=scale)[0], list(leaves.values()))
                    record("fla-chunk_log_linear_attn", base, T, n_levels,
                           lambda: chunk_log_linear_attn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], ls,
                                                         scale=scale)[0], list(leaves.values()) + [ls])
                else:
                    record("fla-chunk_gated_delta_rule", base, T, 1,
                           lambda: chunk_gated_delta_rule(leaves["q"], leaves["k"], leaves["v"], leaves["g"],
                                                          leaves["beta"], scale=scale)[0], list(leaves.values()))
            x = leaves = None
            torch.cuda.empty_cache()
        qa = torch.randn(B, 16, T, 128, device=dev, dtype=dtype, requires_grad=True)
        ka, va = torch.randn_like(qa).requires_grad_(), torch.randn_like(qa).requires_grad_()
        record("sdpa-flash-causal", "attention", T, "-",
               lambda: torch.nn.functional.scaled_dot_product_attention(qa, ka, va, is_causal=True), [qa, ka, va])
        qa = ka = va = None
        torch.cuda.empty_cache()
    return data


def save(data, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if "fwd_bwd_ms" in r]
    bases = [b for b in ("mamba2", "gated_deltanet") if any(r["base"] == b for r in rows)] or ["attention"]

    def label(r):  # one series per op, capacity and schedule; "dla-<base>" drops the base (the panel names it)
        if not r["name"].startswith("dla"):
            return r["name"]
        return f"dla C={r['C']}" + (f", a state per ~{r['segment_len']} tokens" if r.get("segment_len") else "")

    colors = {name: f"C{i}" for i, name in enumerate(sorted({label(r) for r in rows}))}  # same in both panels
    fig, axes = plt.subplots(1, len(bases), figsize=(6.5 * len(bases), 5), squeeze=False)
    for ax, base in zip(axes[0], bases):
        series = {}
        for r in rows:
            if r["base"] in (base, "attention"):
                series.setdefault(label(r), []).append((r["T"], r["fwd_bwd_ms"]))
        for name, pts in sorted(series.items()):
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", linestyle="-" if name.startswith("dla") else "--", color=colors[name],
                    label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (32K tokens per batch)")
        ax.set_ylabel("forward + backward (ms)")
        ax.set_title(f"{base}, {data['meta']['device']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--capacities", type=int, nargs="+", default=[16, 30])
    ap.add_argument("--bases", nargs="+", choices=("mamba2", "gated_deltanet"), default=["mamba2", "gated_deltanet"])
    ap.add_argument("--score", choices=("state", "novelty"), default="state",
                    help="the dynamic policy's information score: the paper's (state) or the earlier variant's")
    ap.add_argument("--threshold", type=float, help="τ (default: the score's, 1.0 for state, 0.5 for novelty)")
    ap.add_argument("--segment-len", type=int,
                    help="keys and values in runs of about this many tokens (default: independent tokens)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ops.json")
    ap.add_argument("--plot", type=Path, help="only draw the PNG of an existing JSON")
    args = ap.parse_args()
    if args.threshold is None:
        from dla.schedule import DEFAULT_THRESHOLD

        args.threshold = DEFAULT_THRESHOLD[args.score]
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    data = run(args)
    try:
        plot(data, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: run with --plot to draw")


if __name__ == "__main__":
    main()
