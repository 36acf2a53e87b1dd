"""One decoding step for a whole batch as a single Triton kernel (no autograd).

Per (sequence-head, value block): every new slot sums the old slots routed to it (a contiguous
range, see :func:`dla.ops.recurrent.route_step`), applies the transition ``A_t``, slot 0 adds
the write ``w_t k_t v_t^T``, the slot is stored and its read-out ``λ_n S_n^T q_t`` accumulated.
Each old state is read once and each new state written once: the step's floor is those bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dla.ops.triton.utils import source_ranges


@triton.jit
def decode_dla_step_kernel(S_ptr, S_new_ptr, lo_ptr, hi_ptr, q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, lam_ptr, o_ptr,
                           scale, C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr,
                           DELTA: tl.constexpr):
    """One token for one row (sequence-head) and value columns ``vv``: new slot ``n`` = the old
    slots ``lo[n]..hi[n]`` summed, times ``A_t`` (``exp(g_t)``, and ``I - β_t k_t k_tᵀ`` when
    ``DELTA``, Gated DeltaNet), plus the write ``w_t k_t v_tᵀ`` in slot 0; ``o = Σ_n λ_n S_nᵀ q``.
    ``KP`` is ``K`` rounded up to a power of two (masked); ``q`` is read times ``scale``, in float32.

    New slots are made oldest first. Where every new slot ``n`` reads old slots ``<= n`` only (a
    birth shifts every slot one place older, and at most one merge folds a slot into the next older
    one: every policy but fenwick, whose carries fold a run of slots into an older one), ``S_new``
    may be ``S`` itself, updated in place; a barrier between an iteration's reads and its write
    keeps the warps from writing a slot another warp has still to read."""
    r = tl.program_id(0).to(tl.int64)
    vv = tl.program_id(1) * BV + tl.arange(0, BV)
    kk = tl.arange(0, KP)
    mask = (kk[:, None] < K) & (vv[None, :] < V)
    tile = kk[:, None] * V + vv[None, :]
    q = tl.load(q_ptr + r * K + kk, mask=kk < K, other=0.0).to(tl.float32) * scale
    k = tl.load(k_ptr + r * K + kk, mask=kk < K, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + r * V + vv, mask=vv < V, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(g_ptr + r).to(tl.float32))
    w = tl.load(beta_ptr + r).to(tl.float32) if DELTA else 1.0
    o = tl.zeros((BV,), dtype=tl.float32)
    for i in range(C):
        n = C - 1 - i
        lo = tl.load(lo_ptr + r * C + n)
        hi = tl.load(hi_ptr + r * C + n)
        acc = tl.zeros((KP, BV), dtype=tl.float32)
        for j in range(lo, hi + 1):
            acc += tl.load(S_ptr + (r * C + j) * K * V + tile, mask=mask, other=0.0)
        if DELTA:
            kS = tl.sum(k[:, None] * acc, axis=0)
            acc = decay * (acc - w * k[:, None] * kS[None, :])
        else:
            acc = decay * acc
        if n == 0:
            acc += w * k[:, None] * v[None, :]
        tl.debug_barrier()
        tl.store(S_new_ptr + (r * C + n) * K * V + tile, acc, mask=mask)
        o += tl.load(lam_ptr + r * C + n).to(tl.float32) * tl.sum(q[:, None] * acc, axis=0)
    tl.store(o_ptr + r * V + vv, o, mask=vv < V)


def launch_shape(K: int, V: int, delta: bool) -> tuple[int, int]:
    """``(BV, num_warps)``: at most 8192 state numbers per program ([K, BV] tile), and 8 warps
    where the delta rule's extra products would otherwise spill (K = V = 128 and K = 256 spilled
    with 4 warps: benchmarks/kernel_resources.py)."""
    KP = triton.next_power_of_2(K)
    BV = min(64, triton.next_power_of_2(V), max(16, 8192 // KP))
    return BV, 8 if delta and KP * BV >= 8192 else 4


def decode_step(S, dest, q, k, v, g, beta, lam, scale: float = 1.0, ranges=None, inplace: bool = False):
    """The contract of ``dla.ops.recurrent._torch_step``: returns ``(S_new, o)``, the states in ``S``'s
    dtype (computed in float32) and the output in ``q``'s. The inputs may be in any float dtype (read
    as float32); ``q`` is multiplied by ``scale`` as it is read. ``ranges``: :func:`source_ranges` of
    ``dest``, when the planner has them. ``inplace``: the new states overwrite ``S`` (when it is
    float32 and contiguous; a decoding cache that owns its states), so that a step allocates none;
    only for routings where no new slot reads an old slot older than itself (see the kernel)."""
    N, H, C, K, V = S.shape
    lo, hi = source_ranges(dest) if ranges is None else ranges
    dtype = S.dtype
    S = S.float().contiguous()
    S_new = S if inplace else torch.empty_like(S)
    o = torch.empty(N, H, V, dtype=torch.float32, device=S.device)
    BV, num_warps = launch_shape(K, V, beta is not None)
    grid = (N * H, triton.cdiv(V, BV))
    decode_dla_step_kernel[grid](S, S_new, lo, hi, q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
                                 g if beta is None else beta.contiguous(), lam.contiguous(), o, scale,
                                 C=C, K=K, V=V, KP=triton.next_power_of_2(K), BV=BV, DELTA=beta is not None,
                                 num_warps=num_warps)
    return S_new.to(dtype), o.to(q.dtype)
