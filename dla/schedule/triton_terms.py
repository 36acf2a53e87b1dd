"""The state score's terms in Triton: its per-chunk products with the open state, one launch per
planning chunk, and the per-token terms (norms, products with the open state) that the planner's
window and the one-token plan of decoding share.

Between the walks of two planning chunks the planner ages the open state through the chunk just
walked and adds the chunk's writes from the open segment's start on
(:meth:`dla.schedule.dynamic.WindowTerms.advance`), then takes the next chunk's products with it
(``⟨s_t, decay O⟩``, :meth:`~dla.schedule.dynamic.WindowTerms.carried`). In PyTorch that is about a
dozen small operations per chunk, and a 32K-token window has 512 chunks; here it is one program per
row (sequence-head) that keeps a ``[K, BV]`` tile of the open state in registers for both steps.
The walkers read whatever terms the window gives them, so both plan identical schedules from these
products as from PyTorch's; the two sets of products differ in the rounding of their sums only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def advance_open_state(open_ptr, out_ptr, k_ptr, v_ptr, write_scale_ptr, chunk_decay_ptr, carry_scale_ptr, i_r, i, NC,
                       L, start, K: tl.constexpr, V: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, CARRY: tl.constexpr, UNROLL: tl.constexpr):
    """Row ``i_r``: ``out = kept * open + Σ_u coef_u k_u v_uᵀ`` over chunk ``i`` (``coef``: the write
    scale from the open segment's start ``start`` (window time) on, ``kept``: the chunk's decay if the
    segment started before it), ``open`` and ``out`` ``[K, V]`` tiles (the same one: in place), and
    with ``CARRY`` the products of chunk ``i + 1``'s tokens with ``out``, returned as ``[BL]`` (zeros after
    the last chunk):
    ``carried[t] = carry_scale_t Σ_v (k_t out)_v v_{t,v}``. Chunks are ``[R, NC, L, ...]``, contiguous.
    ``UNROLL``: the loops' unroll factor (:data:`ADVANCE_UNROLL` for the launch of this step alone)."""
    o_l = tl.arange(0, BL)
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    a = i * L  # the chunk's first token, window time
    kept = tl.where(start < a, tl.load(chunk_decay_ptr + i_r * NC + i), 0.0)
    p_chunk = (i_r * NC + i) * L
    m_n = (o_l < L) & (o_l < (NC - 1 - i) * L)  # chunk i + 1's tokens (none after the last chunk)
    b_acc = tl.zeros([BL], dtype=tl.float32)
    # Both products are chains of fused multiply-adds in ascending order (as Triton lowers an IEEE
    # tl.dot) over vectors loaded per step: the IEEE dot (FMA units, no tensor cores) holds whole
    # operand tiles per thread and spilled ~16 KB of them at K = 128, V = 64 (kernel_resources.py)
    for v0 in range(0, V, BV):
        m_v = v0 + o_v < V
        o_kv = o_k[:, None] * V + v0 + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_w = tl.zeros([BK, BV], dtype=tl.float32)  # the chunk's writes Σ_u coef_u k_u v_uᵀ
        for u in tl.range(L, loop_unroll_factor=UNROLL):
            c_u = tl.where(a + u >= start, tl.load(write_scale_ptr + p_chunk + u), 0.0)
            k_u = tl.load(k_ptr + (p_chunk + u) * K + o_k, mask=m_k, other=0.0) * c_u  # [BK]
            v_u = tl.load(v_ptr + (p_chunk + u) * V + v0 + o_v, mask=m_v, other=0.0)  # [BV]
            b_w = tl.fma(k_u[:, None], v_u[None, :], b_w)
        # launched without fused multiply-adds: the product and the sum round apart, as in PyTorch and
        # in the one-token plan (dla.schedule.token)
        b_open = kept * tl.load(open_ptr + o_kv, mask=m_kv, other=0.0) + b_w  # [BK, BV]
        tl.store(out_ptr + o_kv, b_open, mask=m_kv)
        if CARRY:
            tl.debug_barrier()  # the rows just stored are read back below, by other threads
            b_p = tl.zeros([BL, BV], dtype=tl.float32)  # k_t out for chunk i + 1's tokens t
            for kk in tl.range(K, loop_unroll_factor=UNROLL):
                k_t = tl.load(k_ptr + (p_chunk + L + o_l) * K + kk, mask=m_n, other=0.0)  # [BL]
                o_row = tl.load(out_ptr + kk * V + v0 + o_v, mask=m_v, other=0.0)  # [BV]
                b_p = tl.fma(k_t[:, None], o_row[None, :], b_p)
            b_vn = tl.load(v_ptr + (p_chunk + L + o_l)[:, None] * V + v0 + o_v[None, :],
                           mask=m_n[:, None] & m_v[None, :], other=0.0)  # [BL, BV]
            b_acc += tl.sum(b_p * b_vn, 1)
    if CARRY:
        b_acc = tl.load(carry_scale_ptr + (p_chunk + L) + o_l, mask=m_n, other=0.0) * b_acc
    return b_acc


# The launch of the step alone unrolls its loops by 8, so that eight steps' loads are in flight at
# once: one at a time, it waited on every load (H100, K = 128, V = 64: 87 -> 64 µs per launch at 24
# rows, 102 -> 80 at 256, the same numbers bit for bit). The walk over a whole window, which runs the
# step in its own program, keeps them rolled: unrolled, its registers rose from 168 to 234 per
# thread and the 125M model's window walks from 31.5 to 41.8 ms per training step.
ADVANCE_UNROLL = tl.constexpr(8)


@triton.jit
def _advance_kernel(open_ptr, out_ptr, k_ptr, v_ptr, write_scale_ptr, chunk_decay_ptr, open_start_ptr,
                    carry_scale_ptr, carried_ptr, i, NC, L,
                    K: tl.constexpr, V: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    CARRY: tl.constexpr):
    """:func:`advance_open_state` of row ``i_r``, the open segment's start read from ``open_start_ptr``
    and the carried products stored to ``carried_ptr [R, L]``."""
    i_r = tl.program_id(0).to(tl.int64)
    b_carried = advance_open_state(open_ptr + i_r * K * V, out_ptr + i_r * K * V, k_ptr, v_ptr, write_scale_ptr,
                                   chunk_decay_ptr, carry_scale_ptr, i_r, i, NC, L, tl.load(open_start_ptr + i_r),
                                   K, V, BL, BK, BV, CARRY, ADVANCE_UNROLL)
    if CARRY:
        o_l = tl.arange(0, BL)
        tl.store(carried_ptr + i_r * L + o_l, b_carried, mask=o_l < L)


def advance_blocks(K: int, V: int, L: int) -> dict:
    """The tiles of :func:`advance_open_state` (the carried products' sums run over value blocks of
    ``BV``, so every launch that must give the same numbers takes these)."""
    return dict(BL=max(16, triton.next_power_of_2(L)), BK=max(16, triton.next_power_of_2(K)),
                BV=min(64, max(16, triton.next_power_of_2(V))))


def advance_warps(blocks: dict) -> int:
    """Warps of the launch of :func:`advance_open_state` alone (one ``[BK, BV]`` state tile)."""
    return 4 if blocks["BK"] * blocks["BV"] <= 4096 else 8


def advance(k, v, write_scale, chunk_decay, carry_scale, i: int, open_state, open_start, carry: bool):
    """:meth:`dla.schedule.dynamic.WindowTerms.advance` and, with ``carry``, the next chunk's
    :meth:`~dla.schedule.dynamic.WindowTerms.carried`, in one launch: ``(open_state [R, K, V],
    carried [R, L] or None)``. ``k [R, NC, L, K]``, ``v [R, NC, L, V]`` and the scales ``[R, NC(, L)]``
    float32 and contiguous, ``open_start [R]`` (window time)."""
    R, NC, L, K = k.shape
    V = v.shape[-1]
    out = torch.empty_like(open_state)
    carried = torch.empty(R, L, dtype=torch.float32, device=k.device) if carry else out
    if R:
        blocks = advance_blocks(K, V, L)
        _advance_kernel[(R,)](open_state.contiguous(), out, k, v, write_scale, chunk_decay, open_start.contiguous(),
                              carry_scale if carry else write_scale, carried, i, NC, L, K=K, V=V, CARRY=carry,
                              num_warps=advance_warps(blocks), enable_fp_fusion=False,
                              **blocks)
    return out, carried if carry else None


@triton.jit
def _token_terms_kernel(k_ptr, v_ptr, w_ptr, open_ptr, out_ptr, H, T,
                        s_kn, s_kt, s_kh, s_vn, s_vt, s_vh, s_wn, s_wt, s_wh,
                        K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, VP: tl.constexpr, BV: tl.constexpr,
                        PRODUCTS: tl.constexpr, HAS_W: tl.constexpr):
    """Token ``i_t`` of row ``i_r`` (sequence ``i_r // H``, head ``i_r % H``), one per program, so that a
    token's number does not depend on the others launched with it: ``‖s_t‖² = w² ‖k‖² ‖v‖²`` (the
    order of :func:`dla.schedule.dynamic.contribution_norms`), or with ``PRODUCTS`` its product with
    the row's open state ``O [K, V]`` times the weight, ``w ⟨Oᵀ k, v⟩``. ``HAS_W``: a weight (else 1)."""
    i_r = tl.program_id(0).to(tl.int64)
    i_t = tl.program_id(1).to(tl.int64)
    i_n, i_h = i_r // H, i_r % H
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    p_v = v_ptr + i_n * s_vn + i_t * s_vt + i_h * s_vh
    b_k = tl.load(k_ptr + i_n * s_kn + i_t * s_kt + i_h * s_kh + o_k, mask=m_k, other=0.0).to(tl.float32)  # [KP]
    if HAS_W:
        w = tl.load(w_ptr + i_n * s_wn + i_t * s_wt + i_h * s_wh).to(tl.float32)
    if PRODUCTS:
        acc = 0.0
        for v0 in range(0, V, BV):
            o_v = v0 + tl.arange(0, BV)
            m_v = o_v < V
            b_open = tl.load(open_ptr + i_r * K * V + o_k[:, None] * V + o_v[None, :],
                             mask=m_k[:, None] & m_v[None, :], other=0.0)  # [KP, BV]
            b_v = tl.load(p_v + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
            acc += tl.sum(tl.sum(b_k[:, None] * b_open, 0) * b_v, 0)
        if HAS_W:
            acc = w * acc
        tl.store(out_ptr + i_r * T + i_t, acc)
    else:
        o_v = tl.arange(0, VP)
        b_v = tl.load(p_v + o_v, mask=o_v < V, other=0.0).to(tl.float32)  # [VP]
        k_norm = tl.sum(b_k * b_k, 0)
        if HAS_W:
            k_norm = (w * w) * k_norm
        tl.store(out_ptr + i_r * T + i_t, k_norm * tl.sum(b_v * b_v, 0))


def _token_terms(k, v, w, open_state):
    """:func:`contribution_norms` (``open_state`` None) or :func:`open_products` (``w`` the scale),
    ``w`` with the inputs' ``[N, T, H]`` indexing."""
    N, T, H, K = k.shape
    V = v.shape[-1]
    out = torch.empty(N * H, T, dtype=torch.float32, device=k.device)
    if out.numel():
        KP = triton.next_power_of_2(K)
        _token_terms_kernel[(N * H, T)](
            k, v, out if w is None else w, out if open_state is None else open_state.contiguous(), out, H, T,
            *k.stride()[:3], *v.stride()[:3], *((0, 0, 0) if w is None else w.stride()),
            K=K, V=V, KP=KP, VP=triton.next_power_of_2(V), BV=min(triton.next_power_of_2(V), max(16, 4096 // KP)),
            PRODUCTS=open_state is not None, HAS_W=w is not None, enable_fp_fusion=False)
    return out


def contribution_norms(k, v, w=None):
    """``‖s_t‖² = w_t² ‖k_t‖² ‖v_t‖²`` of every token, ``[N * H, T]``, on CUDA
    (:func:`dla.schedule.dynamic.contribution_norms` in Triton): ``k [N, T, H, K]``, ``v [N, T, H, V]``
    and ``w [N, T, H]`` (None: 1) in any float dtype, strides with a unit last one. The planner's window
    (:class:`dla.schedule.dynamic.WindowTerms`, its rows as ``N`` with ``H = 1``) and the one-token plan of
    decoding (:mod:`dla.schedule.token`) both take the state score's terms from here and from
    :func:`open_products`, one token per program: a decoding step scores a token as the general
    planner does, bit for bit."""
    return _token_terms(k, v, w, None)


def open_products(k, v, open_state, scale=None):
    """``scale_t ⟨O_rᵀ k_t, v_t⟩`` of every token with its row's ``open_state [N * H, K, V]`` (float32),
    ``[N * H, T]``; ``scale [N * H, T]`` None: 1. Inputs as :func:`contribution_norms`'."""
    N, T, H = k.shape[:3]
    # the scale's rows are sequence-heads: seen with the inputs' [N, T, H] indexing
    w = None if scale is None else scale.reshape(N, H, T).transpose(1, 2)
    return _token_terms(k, v, w, open_state)
