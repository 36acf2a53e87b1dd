"""Registers and spills of the fused inter-chunk walks, the decode step and the planner's
open-state update and window walk, compiled for Hopper without a GPU.

Triton compiles a kernel to PTX on any machine; ptxas (shipped with Triton) then reports what
each thread needs. A walk that spills keeps its tiles in local memory and runs many times slower,
so this table predicts which shapes the GPU run will find slow, before a GPU is at hand.

    python benchmarks/kernel_resources.py                 # the benchmark and paper shapes
    python benchmarks/kernel_resources.py --out benchmarks/results/kernel_resources.json

Columns: registers per thread, bytes of spill stores / loads in the code (static counts), stack
frame per thread, shared memory, compile seconds. Numbers depend on the Triton version (and its
ptxas): the device's Triton may differ in detail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (label, K, V, C, MATRIX): the op benchmark's shapes (docs/kernels.md) and the paper configs'
SHAPES = [
    ("mamba2 bench (K=128, V=64)", 128, 64, 16, False),
    ("gdn bench (K=V=128)", 128, 128, 16, True),
    ("dla_mamba2_780m (K=128, V=64, C=30)", 128, 64, 30, False),
    ("dla_gdn_1.3b (K=256, V=512, C=30)", 256, 512, 30, True),
]
INT_POINTERS = {"rank_ptr", "lo_ptr", "hi_ptr", "dest_ptr", "places_ptr", "places_new_ptr"}  # the rest are fp32
# the planner's walk (dla/schedule/triton_scan.py): its integer pointers (its carried_ptr holds int64
# slots, where the open-state update's holds float32 products)
PLAN_WALK_POINTERS = {**dict.fromkeys(("origin_ptr", "count_ptr"), "*i32"),
                      **dict.fromkeys(("lengths_ptr", "position_ptr", "start_ptr", "death_ptr", "carried_ptr",
                                       "trace_start_ptr", "open_start_out_ptr"), "*i64")}


def ptxas_report(ptx: str) -> dict:
    """``ptxas -v`` on one PTX file for sm_90a, with whichever bundled ptxas accepts its version."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        for name in ("ptxas", "ptxas-blackwell"):
            if not (bin_dir / name).exists():
                continue
            r = subprocess.run([str(bin_dir / name), "-v", "--gpu-name", "sm_90a", str(src), "-o",
                                os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
            if r.returncode == 0:
                text = r.stderr

                def num(pattern):
                    m = re.search(pattern, text)
                    return int(m.group(1)) if m else None

                return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
                        "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}
    raise RuntimeError("no bundled ptxas accepted the PTX")


def compile_kernel(kernel, const: dict, num_warps: int, num_stages: int, pointer_types=None, **options) -> dict:
    """Compile ``kernel`` (a Triton JIT function, maybe autotuned) for sm_90a with the constexprs
    ``const`` and the launch's warps and stages (the stages change the registers: keep them equal
    to the launch's; ``options``: the launch's other compiler options); pointers are fp32 except those
    named in INT_POINTERS (int32) and in ``pointer_types`` (name: Triton type, for this kernel), and
    16-byte aligned.
    Returns ptxas's report and the number of vectorised global loads in the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):  # unwrap the Autotuner
        fn = fn.fn
    pointer_types = {**dict.fromkeys(INT_POINTERS, "*i32"), **(pointer_types or {})}
    signature = {name: ("constexpr" if name in const else pointer_types.get(name, "*fp32") if name.endswith("_ptr")
                        else "i32") for name in fn.arg_names}
    # pointers 16-byte aligned, as a launch specialises them (PyTorch's allocations are): the loads and
    # stores of a tile are then vectorised, which changes the registers
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if signature[name][0] == "*"}
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()}, attrs=aligned)
    started = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages, **options))
    ptx = compiled.asm["ptx"]
    return {**ptxas_report(ptx), "shared": compiled.metadata.shared,
            "vector_loads": len(re.findall(r"ld\.global[\w:.]*\.v[24]\.", ptx)),  # 2 or 4 numbers per load
            "compile_s": round(time.time() - started, 1)}


def compile_walk(kernel, K: int, V: int, C: int, matrix: bool, BV: int, num_warps: int, L: int = 64) -> dict:
    """One of the fused inter-chunk walks (dla/ops/triton/chunk_inter.py) at one shape, with the
    launch's key splits and key block (DLA_WALK_KEY_SPLITS and DLA_WALK_KEY_BLOCK apply); both are
    launched with one stage; the backward with the atomic sums over programs (not those of
    deterministic algorithms) where several programs share a row."""
    import triton

    from dla.ops.triton.chunk_inter import atomic_sums, chunk_dla_inter_bwd_kernel, key_tiles

    KS, BK = key_tiles(K, matrix)
    const = dict(L=L, C=C, K=K, V=V, BV=BV, BK=BK, KS=KS, PREC="tf32", MATRIX=matrix)
    if kernel is chunk_dla_inter_bwd_kernel:
        const.update(CP=triton.next_power_of_2(C), ATOMIC=atomic_sums(V // BV, KS))
    return compile_kernel(kernel, const, num_warps, 1)


def compile_decode(K: int, V: int, C: int, delta: bool) -> dict:
    """The decode step (dla/ops/triton/decode.py) at one shape, with the launch's own BV, warps and
    stages (Triton's default, 3)."""
    import triton

    from dla.ops.triton.decode import decode_dla_step_kernel, launch_shape

    BV, num_warps = launch_shape(K, V)
    return {"BV": BV, "num_warps": num_warps,
            **compile_kernel(decode_dla_step_kernel,
                             dict(C=C, CP=triton.next_power_of_2(C), K=K, V=V, KP=triton.next_power_of_2(K), BV=BV,
                                  DELTA=delta, INPLACE=True),
                             num_warps, 3)}


def compile_advance(K: int, V: int, L: int = 64) -> dict:
    """The planner's step between two chunks (``_advance_kernel`` of dla/schedule/triton_terms.py: the
    open state's update and the next chunk's products with it) as launched: its tiles, warps, Triton's
    default stages (3) and no fused multiply-adds beyond its own."""
    from dla.schedule.triton_terms import _advance_kernel, advance_blocks, advance_warps

    blocks = advance_blocks(K, V, L)
    return {"BV": blocks["BV"], "num_warps": advance_warps(blocks),
            **compile_kernel(_advance_kernel, dict(K=K, V=V, CARRY=True, **blocks), advance_warps(blocks), 3,
                             pointer_types={"open_start_ptr": "*i64"}, enable_fp_fusion=False)}


def compile_plan_window(K: int, V: int, C: int, L: int = 64) -> dict:
    """The planner's walk over a whole window in one launch (``_walk_kernel`` of
    dla/schedule/triton_scan.py with ``WINDOW``, as ``DLA_PLAN_WINDOW_WALK=1`` launches it: the paper's
    state score, density merging, the trace a soft-gated training step keeps), which runs the
    open-state update between chunks in its own program."""
    import triton

    from dla.schedule.triton_scan import WINDOW_WARPS, _walk_kernel
    from dla.schedule.triton_terms import advance_blocks

    blocks = advance_blocks(K, V, L)
    const = dict(C=C, CP=triton.next_power_of_2(C + 1), SCORE=1, MERGE=0, HAS_MAX=False, TRACE_OPEN=True, WINDOW=True,
                 K=K, V=V, **blocks)
    return {"BV": blocks["BV"], "num_warps": WINDOW_WARPS,
            **compile_kernel(_walk_kernel, const, WINDOW_WARPS, 3, pointer_types=PLAN_WALK_POINTERS,
                             enable_fp_fusion=False)}


def print_row(r: dict) -> None:
    print(f"{r['shape']:40s} {r['kernel']:6s} {r['BV']:3d} {r['num_warps']:5d} {r['registers']:5d} "
          f"{r['spill_stores']:>8d}/{r['spill_loads']:<8d} {r['stack']:6d} {r['shared']:7d} {r['compile_s']:7.1f}s",
          flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the table as JSON here")
    args = p.parse_args(argv)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # compile from scratch: honest compile times
    import torch
    import triton

    from dla.ops.triton.chunk_inter import (
        INTER_FWD_CONFIGS,
        chunk_dla_inter_bwd_kernel,
        chunk_dla_inter_fwd_kernel,
    )

    rows = []
    print(f"Triton {triton.__version__}, target sm_90a (compiled on this machine, no GPU needed)")
    print(f"{'shape':40s} {'kernel':6s} {'BV':>3s} {'warps':>5s} {'regs':>5s} {'spill st/ld (B)':>17s} "
          f"{'stack':>6s} {'shared':>7s} {'compile':>8s}")
    for label, K, V, C, matrix in SHAPES:
        fwd = [(c.kwargs["BV"], c.num_warps) for c in INTER_FWD_CONFIGS if c.kwargs["BV"] <= V]
        kernels = ((chunk_dla_inter_fwd_kernel, "fwd", fwd), (chunk_dla_inter_bwd_kernel, "bwd", [(32, 8)]))
        for kernel, name, configs in kernels:
            for BV, warps in configs:
                rows.append({"shape": label, "K": K, "V": V, "C": C, "matrix": matrix, "kernel": name, "BV": BV,
                             "num_warps": warps, **compile_walk(kernel, K, V, C, matrix, BV, warps)})
                print_row(rows[-1])
    for label, K, V, C, matrix in SHAPES:
        rows.append({"shape": label, "K": K, "V": V, "C": C, "matrix": matrix, "kernel": "decode",
                     **compile_decode(K, V, C, matrix)})
        print_row(rows[-1])
    for label, K, V, C, matrix in SHAPES:
        rows.append({"shape": label, "K": K, "V": V, "C": C, "matrix": matrix, "kernel": "advance",
                     **compile_advance(K, V)})
        print_row(rows[-1])
        rows.append({"shape": label, "K": K, "V": V, "C": C, "matrix": matrix, "kernel": "window",
                     **compile_plan_window(K, V, C)})
        print_row(rows[-1])
    if args.out:
        meta = {"device": "none: compiled for sm_90a on a CPU machine (ptxas of Triton)", "target": "sm_90a",
                "torch": torch.__version__, "triton": triton.__version__, "fla": "not used",
                "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/kernel_resources.py"}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
