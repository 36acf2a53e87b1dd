"""One GPU vs. N GPUs with the same global batch: the loss curves should coincide.

    python scripts/ddp_equivalence.py [--nproc 2] [--parallel ddp|fsdp] [--steps 200]
                                      [--config configs/mqar.yaml] [--out runs/ddp_equivalence] [KEY=VALUE ...]

Runs ``dla train`` twice through torchrun: 1 process with ``grad_accum = N``, then N processes
with ``grad_accum = 1``, the same ``batch_size`` (per process and micro-batch), seed and config.
Every step then averages the gradients of the same N micro-batches (micro-batch ``a`` of
process ``r`` is batch ``step * N + a * world + r``), so the curves differ only by the order of
floating-point reductions (and bf16 rounding on GPUs). Writes ``OUT/ddp_equivalence.json``
(both curves, the largest difference) and ``OUT/ddp_equivalence.png``. Works on CPUs too (gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(nproc: int, grad_accum: int, out: Path, args, overrides: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "dla",
           "train", str(args.config), f"out_dir={out}", f"steps={args.steps}", f"grad_accum={grad_accum}",
           f"parallel={args.parallel}", "log_every=1", f"checkpoint_every={args.steps}", *overrides, "--quiet"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the multi-process run")
    ap.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "mqar.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "ddp_equivalence")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more dla train overrides")
    args = ap.parse_args()
    one = run(1, args.nproc, args.out / "1proc", args, args.overrides)
    many = run(args.nproc, 1, args.out / f"{args.nproc}proc", args, args.overrides)
    steps = [r["step"] for r in one]
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(one, many)]
    result = {"nproc": args.nproc, "parallel": args.parallel, "steps": steps,
              "loss_1proc": [r["loss"] for r in one], f"loss_{args.nproc}proc": [r["loss"] for r in many],
              "max_abs_diff": max(diffs), "final_abs_diff": diffs[-1]}
    (args.out / "ddp_equivalence.json").write_text(json.dumps(result, indent=1))
    print(f"max |loss difference| over {len(steps)} steps: {result['max_abs_diff']:.3g} "
          f"(final {result['final_abs_diff']:.3g})")

    sys.path.insert(0, str(ROOT))
    from dla.plots import pyplot, save

    plt = pyplot()
    if plt is not None:
        fig, (curves, gap) = plt.subplots(1, 2, figsize=(11, 4))
        curves.plot(steps, result["loss_1proc"], label=f"1 process, grad_accum={args.nproc}")
        curves.plot(steps, result[f"loss_{args.nproc}proc"], "--", label=f"{args.nproc} processes ({args.parallel})")
        curves.set(title="training loss, same global batch", xlabel="step", ylabel="loss")
        curves.legend()
        gap.semilogy(steps, [max(d, 1e-12) for d in diffs])
        gap.set(title="|difference|", xlabel="step", ylabel="absolute loss difference")
        for ax in (curves, gap):
            ax.grid(True, alpha=0.3)
        save(fig, args.out / "ddp_equivalence.png")
    print(f"wrote {args.out / 'ddp_equivalence.json'}")


if __name__ == "__main__":
    main()
