"""A/B of the fused inter-chunk walk: this tree's against another version of the same file.

    git show REV:dla/ops/triton/chunk_inter.py > /tmp/walk_old.py
    python benchmarks/walk_ab.py /tmp/walk_old.py [--lengths 4096] [--capacity 16] [--out FILE.json]
    python benchmarks/walk_ab.py /tmp/walk_old.py --bases mamba2 --tokens 4096   # one 4K row: few programs

Both versions run in the same process on the same inputs (the op benchmark's shapes, bf16, 32K
tokens per batch unless ``--tokens`` says otherwise, a dynamic schedule): forward and
forward+backward median times of ``chunk_dla`` and the relative error of the other version's output
and gradients against this tree's. Only the walk's forward and backward (``walk_forward``,
``walk_backward``, which ``chunk_dla``'s fused path looks up at call time) are swapped; everything
around them is this tree's, so the other file must have both. Needs a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ops import TOKENS, make_inputs, timed  # noqa: E402

WALK_FUNCTIONS = ("walk_forward", "walk_backward")


def load_module(path: Path, name: str = "walk_other"):
    """The Python file ``path`` as a module named ``name`` (not registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("other", type=Path, help="another version of dla/ops/triton/chunk_inter.py")
    p.add_argument("--bases", nargs="+", choices=("mamba2", "gated_deltanet"), default=["gated_deltanet", "mamba2"])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--capacity", type=int, default=16)
    p.add_argument("--tokens", type=int, nargs="+", default=[TOKENS],
                   help="tokens per batch (default %(default)s); one row of 4096 is a 125M model's training step")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import torch
    import triton

    import dla
    from dla.ops.triton import chunk_inter

    other = load_module(args.other)
    if not all(hasattr(other, name) for name in WALK_FUNCTIONS):
        p.error(f"{args.other} has no {' and '.join(WALK_FUNCTIONS)} to swap in")
    versions = {name: {f: getattr(module, f) for f in WALK_FUNCTIONS}
                for name, module in (("this tree", chunk_inter), (str(args.other), other))}
    rows = []
    for base in args.bases:
        for T, tokens in itertools.product(args.lengths, args.tokens):
            B = max(1, tokens // T)
            x = make_inputs(base, B, T, "cuda", torch.bfloat16)
            H, K = x["q"].shape[2:]
            sched = dla.plan_schedule("dynamic", batch=B, heads=H, length=T, capacity=args.capacity,
                                      scores=dla.novelty_scores(x["k"]), threshold=0.5)
            lam = torch.full((B, T, H, sched.n_labels), 0.7, device="cuda", dtype=torch.bfloat16)
            leaves = [t.requires_grad_() for t in (*x.values(), lam) if t is not None]
            do = torch.randn(B, T, H, x["v"].shape[-1], device="cuda", dtype=torch.bfloat16)
            results = {}
            for name, walk in versions.items():
                for f, fn in walk.items():
                    setattr(chunk_inter, f, fn)

                def forward():
                    return dla.chunk_dla(x["q"], x["k"], x["v"], x["g"], lam, sched, beta=x["beta"],
                                         scale=K ** -0.5)[0]

                o = forward()
                results[name] = [o.float(), *(g.float() for g in torch.autograd.grad(o, leaves, do))]
                fwd, both, peak = timed(forward, leaves)
                row = dict(version=name, base=base, T=T, B=B, C=args.capacity, fwd_ms=fwd, fwd_bwd_ms=both,
                           peak_mib=peak)
                mine = results["this tree"]
                row["rel_err_vs_this_tree"] = max(float((a - b).norm() / b.norm().clamp_min(1e-30))
                                                  for a, b in zip(results[name], mine))
                rows.append(row)
                print(f"{base:15s} T={T:<6d} B={B:<3d} C={args.capacity:<3d} fwd {fwd:8.2f} ms  "
                      f"fwd+bwd {both:8.2f} ms  peak {peak:7.0f} MiB  "
                      f"max rel err {row['rel_err_vs_this_tree']:.1e}  {name}", flush=True)
            for f, fn in versions["this tree"].items():
                setattr(chunk_inter, f, fn)
            x = leaves = lam = do = results = None
            torch.cuda.empty_cache()
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"),
                "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
