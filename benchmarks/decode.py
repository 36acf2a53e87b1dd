"""GPU decoding benchmark: one DLA step for a whole batch vs its memory floor and SDPA decoding.

    python benchmarks/decode.py [--batch 64] [--heads 16] [--dim 128] [--value-dim 128] [--capacity 16]
    python benchmarks/decode.py --batch 8 --heads 24 --dim 128 --value-dim 64 --capacity 30  # the 125M DLA-Mamba-2

A DLA step reads C states of K x V fp32 per head. Gated DeltaNet's transition rewrites every one;
Mamba-2's, a number per head, only rescales the closed slots, which keep their places in the cache
when a birth makes them older, so a step without a birth writes one state (the open one) and a
birth's step at capacity two (the new open one and the merged pair's sum). Each floor is those
bytes over the measured copy bandwidth. Reported: the fused kernel alone for a
token that extends its segment and for one that opens a segment (C slots full: every slot moves
and the cheapest pair merges), the same kernel launched with the widest value blocks (the launch
narrows them where few rows would leave SMs idle: ``dla.ops.triton.decode.launch_shape``), and the
whole step a model runs (novelty score, online policy step, checks, kernel). SDPA: one query
against a bf16 KV cache of each context length. Writes JSON next to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import dla
from dla.ops.common import own_places
from dla.ops.triton import decode
from dla.ops.triton.decode import decode_step, launch_shape, multiprocessor_count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128, help="key width K (and SDPA's head width)")
    ap.add_argument("--value-dim", type=int, help="value width V (default: --dim)")
    ap.add_argument("--capacity", type=int, default=16)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    args = ap.parse_args()
    B, H, D, C = args.batch, args.heads, args.dim, args.capacity
    DV = args.value_dim or D
    dev = "cuda"
    big = torch.empty(2**28, dtype=torch.float32, device=dev)
    copy_ms = do_bench(lambda: big.clone(), warmup=10, rep=50, return_mode="median")
    bandwidth = 2 * big.numel() * 4 / (copy_ms * 1e-3)  # bytes read + written per second
    big = None  # free it before the benchmark
    rows = {"meta": {"date": time.strftime("%Y-%m-%d"),
                     "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "B": B, "H": H, "K": D, "V": DV, "C": C, "copy_bandwidth_GBps": bandwidth / 1e9}}
    slot_bytes = B * H * D * DV * 4
    for base in ("mamba2", "gated_deltanet"):
        k = F.normalize(torch.randn(B, 1, H, D, device=dev), dim=-1)
        q, v = torch.randn(B, 1, H, D, device=dev), torch.randn(B, 1, H, DV, device=dev)
        g = -torch.rand(B, 1, H, device=dev) * 0.1
        beta = torch.rand(B, 1, H, device=dev) if base == "gated_deltanet" else None
        # a full cache: C segments alive, as after a long prompt
        prompt = 4 * C
        kp = F.normalize(torch.randn(B, prompt, H, D, device=dev), dim=-1)
        s = dla.plan_schedule("dynamic", batch=B, heads=H, length=prompt, capacity=C, scores=dla.novelty_scores(kp),
                              threshold=0.0)
        state = dla.DLAState(torch.randn(B, H, C, D, DV, device=dev) * 0.01, s.final, kp[:, -1])
        lam = torch.full((B, 1, H, C), 0.7, device=dev)
        scales = torch.rand(B, H, C, device=dev) + 0.5
        slot = torch.arange(C, device=dev)
        extend = slot.expand(B, H, C).contiguous()
        # a birth at capacity: every slot one slot older, the two oldest merge
        birth = torch.minimum(slot + 1, torch.tensor(C - 1, device=dev)).expand(B, H, C).contiguous()

        places = own_places(B, H, C, dev)

        def kernel(dest):
            return decode_step(state.states, scales, places, dest, q.reshape(B, H, D), k.reshape(B, H, D),
                               v.reshape(B, H, DV), g.reshape(B, H), None if beta is None else beta.reshape(B, H),
                               lam.reshape(B, H, C), inplace=True)

        kernel_ms = do_bench(lambda: kernel(extend), warmup=10, rep=50, return_mode="median")
        birth_ms = do_bench(lambda: kernel(birth), warmup=10, rep=50, return_mode="median")
        value_block = launch_shape(D, DV, B * H, multiprocessor_count(state.states.device))[0]
        widest = decode.multiprocessor_count
        decode.multiprocessor_count = lambda device: None  # launch_shape without the SM count: its widest blocks
        try:
            wide_ms = do_bench(lambda: kernel(extend), warmup=10, rep=50, return_mode="median")
        finally:
            decode.multiprocessor_count = widest
        floor_ms = (C + (C if beta is not None else 1)) * slot_bytes / bandwidth * 1e3
        birth_floor_ms = (C + (C if beta is not None else 2)) * slot_bytes / bandwidth * 1e3

        @torch.no_grad()
        def full_step():
            step = dla.plan_schedule("dynamic", batch=B, heads=H, length=1, initial_state=state,
                                     scores=dla.novelty_scores(k, prev_key=state.prev_key))
            return dla.recurrent_dla(q, k, v, g, lam, step, beta=beta, initial_state=state, output_final_state=True)

        step_ms = do_bench(full_step, warmup=10, rep=50, return_mode="median")
        rows[f"dla-{base}"] = {"kernel_ms": kernel_ms, "full_step_ms": step_ms, "floor_ms": floor_ms,
                               "kernel_over_floor": kernel_ms / floor_ms, "birth_kernel_ms": birth_ms,
                               "birth_floor_ms": birth_floor_ms, "value_block": value_block,
                               "widest_blocks_kernel_ms": wide_ms, "cache_MiB": state.nbytes / 2**20}
        print(f"dla-{base:15s} kernel {kernel_ms:7.3f} ms (floor {floor_ms:7.3f} ms, {kernel_ms / floor_ms:4.2f}x)  "
              f"birth {birth_ms:7.3f} ms (floor {birth_floor_ms:7.3f} ms)  widest blocks {wide_ms:7.3f} ms "
              f"(BV {value_block} in the launch)  full step {step_ms:7.3f} ms  "
              f"cache {state.nbytes / 2**20:8.1f} MiB", flush=True)
    for ctx in args.contexts:
        try:
            kc = torch.randn(B, H, ctx, D, device=dev, dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            qd = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16)
            ms = do_bench(lambda: F.scaled_dot_product_attention(qd, kc, vc), warmup=10, rep=50, return_mode="median")
            rows[f"sdpa-ctx{ctx}"] = {"ms": ms, "kv_cache_MiB": 2 * kc.numel() * 2 / 2**20}
            print(f"sdpa context {ctx:6d}: {ms:7.3f} ms  kv cache {2 * kc.numel() * 2 / 2**20:8.1f} MiB", flush=True)
            kc = vc = None
        except torch.OutOfMemoryError:
            rows[f"sdpa-ctx{ctx}"] = {"error": "out of memory"}
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
