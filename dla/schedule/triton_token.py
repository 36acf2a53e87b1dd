"""The ``dynamic`` policy's one-token plan with a state score as one Triton program per sequence-head
(decoding on the GPU; CPU via TRITON_INTERPRET).

The twin of the PyTorch token step in :mod:`dla.schedule.token` after its products with the open
state: from ``x = ⟨s_t, O⟩``, ``‖s_t‖²`` and ``γ_t`` (computed by PyTorch, as the general planner
computes them) one program scores the token, decides the birth, prices the merge, routes the slots,
labels them and extends or restarts the open state. Every operation is the PyTorch step's, in its
order, compiled without fused multiply-adds and with correctly rounded division and square root,
so the plan equals the general planner's bit for bit (tests compare the two token by token). It
replaces some seventy small PyTorch operations per layer and decoding step with one launch.

Slots are newest first (slot 0: the open segment), as in :class:`dla.schedule.schedule.SegmentState`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dla.schedule.triton_scan import MERGE_CODES, triton_state_score

__all__ = ["plan_state_token"]


@triton.jit
def _new_starts(p_start, o_c, new, dying, pos, C: tl.constexpr):
    """The start of every new slot ``o_c`` (``-1``: empty): after a birth, slot ``j`` holds old slot
    ``j - 1`` (``j <= dying``) or ``j`` (past the merge), slot 0 the token; without one, the old slot."""
    m_c = (o_c >= 0) & (o_c < C)
    source = o_c + (o_c > dying).to(o_c.dtype)  # index into [token, old slots]
    b_opened = tl.load(p_start + source - 1, mask=m_c & (source >= 1), other=-1)
    b_opened = tl.where(source == 0, pos, b_opened)
    return tl.where(new, b_opened, tl.load(p_start + o_c, mask=m_c, other=-1))


@triton.jit
def _token_plan_kernel(x_ptr, norm_ptr, gamma_ptr, threshold_ptr, position_ptr, start_ptr, info_ptr, open_norm_ptr,
                       open_ptr, k_ptr, v_ptr, w_ptr, lam_ptr, dest_ptr, lo_ptr, hi_ptr, label_ptr, slot_lam_ptr,
                       new_start_ptr, new_info_ptr, score_ptr, new_open_norm_ptr, new_open_ptr, new_position_ptr,
                       H, max_segment_len, n_labels,
                       C: tl.constexpr, CP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr,
                       BV: tl.constexpr, DRIFT: tl.constexpr, MERGE: tl.constexpr, HAS_MAX: tl.constexpr,
                       LEVEL: tl.constexpr, HAS_OPEN: tl.constexpr, HAS_W: tl.constexpr, HAS_LAM: tl.constexpr):
    """Row ``i_r`` (one sequence-head). ``MERGE``: 0 density, 1 least_info, 2 oldest; ``LEVEL``: level
    labels (else recency); ``HAS_OPEN``: an open state exists (else it is zero); ``HAS_W``: the
    contribution's weight ``w_t = β_t`` (Gated DeltaNet; else 1); ``HAS_LAM``: the token's λ per label
    (else 1)."""
    i_r = tl.program_id(0).to(tl.int64)
    i_n = i_r // H
    pos = tl.load(position_ptr + i_n).to(tl.int64)
    if i_r % H == 0:  # the sequence's first head moves it on
        tl.store(new_position_ptr + i_n, pos + 1)
    o_c = tl.arange(0, CP)
    m_c = o_c < C
    p_start = start_ptr + i_r * C
    b_start = tl.load(p_start + o_c, mask=m_c, other=-1)  # [CP]
    b_info = tl.load(info_ptr + i_r * C + o_c, mask=m_c, other=0.0)
    b_start_older = tl.load(p_start + o_c + 1, mask=o_c + 1 < C, other=-1)  # the next older slot's
    b_info_older = tl.load(info_ptr + i_r * C + o_c + 1, mask=o_c + 1 < C, other=0.0)
    b_start_newer = tl.where(o_c == 0, pos, tl.load(p_start + o_c - 1, mask=m_c & (o_c >= 1), other=-1))
    open_start = tl.load(p_start)
    first = open_start < 0  # slots are compact: the first slot is empty before the first token, the last once full
    full = tl.load(p_start + C - 1) >= 0
    norm = tl.load(norm_ptr + i_r)
    gamma = tl.load(gamma_ptr + i_r)
    score, extended = triton_state_score(tl.load(x_ptr + i_r), norm, gamma, tl.load(open_norm_ptr + i_r), DRIFT)
    score = tl.where(first, 0.0, score)
    wants = score >= tl.load(threshold_ptr + i_r % H)
    if HAS_MAX:
        wants = wants | (pos - open_start >= max_segment_len)
    new = first | wants
    over = new & full
    # the merge: closed pairs (i, i + 1) of the old slots, i <= C - 2; only used where the slots overflow
    pair_info = b_info + b_info_older
    if MERGE == 0:
        span = b_start_newer - b_start_older  # the pair's tokens: from start i + 1 to the start before i
        cost = tl.div_rn(pair_info, tl.maximum(span, 1).to(tl.float32))
    elif MERGE == 1:
        cost = pair_info
    else:  # every pair costs the same, so the tie rule picks the oldest
        cost = tl.zeros_like(pair_info)
    cost = tl.where(o_c < C - 1, cost, float("inf"))
    newer = tl.max(tl.where(cost == tl.min(cost, 0), o_c, -1), 0)  # ties go to the older pair
    if MERGE == 1:  # the earlier variant: a segment's information is its maximum
        pair_info = tl.maximum(b_info, b_info_older)
    merged = tl.sum(tl.where(o_c == newer, pair_info, 0.0), 0)
    dying = tl.where(over, newer, C)  # old slot of the boundary that dies (C: none)
    dest = tl.where(b_start < 0, C, o_c + (new & (o_c <= dying)).to(o_c.dtype))
    # new slot j takes [token, old slots][j + (j > dying)]; the slot after the dying one is the merged pair
    source = o_c + (o_c > dying).to(o_c.dtype)
    b_opened_info = tl.load(info_ptr + i_r * C + source - 1, mask=m_c & (source >= 1), other=0.0)
    b_opened_info = tl.where(source == 0, score, b_opened_info)
    b_opened_info = tl.where(o_c == dying + 1, merged, b_opened_info)
    if MERGE == 1:
        grown = tl.maximum(b_info, score)
    else:
        grown = b_info + score
    b_new_start = _new_starts(p_start, o_c, new, dying, pos, C)
    b_new_info = tl.where(new, b_opened_info, tl.where(o_c == 0, grown, b_info))
    filled = b_new_start >= 0
    if LEVEL:  # dla.schedule.schedule.slot_labels: bit_length of the size, 0 for the open segment
        size = tl.maximum(_new_starts(p_start, o_c - 1, new, dying, pos, C) - b_new_start, 1)
        label = tl.zeros_like(o_c)
        for bit in tl.static_range(62):
            label += ((size >> bit) > 0).to(o_c.dtype)
        label = tl.where((o_c == 0) | ~filled, 0, label)
    else:
        label = tl.where(filled, o_c, 0)
    tl.store(dest_ptr + i_r * C + o_c, dest.to(tl.int64), mask=m_c)
    # the same routing as the decode kernel reads it: the old slots lo..hi fold into new slot j
    # (dla.ops.common.source_ranges of dest); old j - 1 moves to j, old j stays at j
    moved = new & (o_c - 1 <= dying) & (o_c >= 1) & (b_start_newer >= 0)
    stays = (~new | (o_c > dying)) & (b_start >= 0)
    tl.store(lo_ptr + i_r * C + o_c, tl.where(moved, o_c - 1, tl.where(stays, o_c, C)).to(tl.int32), mask=m_c)
    tl.store(hi_ptr + i_r * C + o_c, tl.where(stays, o_c, tl.where(moved, o_c - 1, -1)).to(tl.int32), mask=m_c)
    tl.store(label_ptr + i_r * C + o_c, label.to(tl.int64), mask=m_c)
    # λ of every new slot by its label, 0 where empty (the value itself: no product with the 0/1 filling)
    if HAS_LAM:
        b_lam = tl.load(lam_ptr + i_r * n_labels + label, mask=m_c & filled, other=0.0)
    else:
        b_lam = filled.to(tl.float32)
    tl.store(slot_lam_ptr + i_r * C + o_c, b_lam, mask=m_c)
    tl.store(new_start_ptr + i_r * C + o_c, b_new_start, mask=m_c)
    tl.store(new_info_ptr + i_r * C + o_c, b_new_info, mask=m_c)
    tl.store(score_ptr + i_r, score)
    tl.store(new_open_norm_ptr + i_r, tl.where(new, norm, tl.maximum(extended, 0.0)))
    # a new segment restarts the open state at the token's contribution: O = γ O + w k vᵀ otherwise
    kept = tl.where(new, 0.0, gamma)
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    b_k = tl.load(k_ptr + i_r * K + o_k, mask=m_k, other=0.0).to(tl.float32)  # [KP]
    if HAS_W:
        b_k = b_k * tl.load(w_ptr + i_r).to(tl.float32)
    for i_v in range(0, V, BV):
        o_v = i_v + tl.arange(0, BV)
        m_v = o_v < V
        b_v = tl.load(v_ptr + i_r * V + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
        tile = i_r * K * V + o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_write = b_k[:, None] * b_v[None, :]  # [KP, BV]
        if HAS_OPEN:
            b_open = kept * tl.load(open_ptr + tile, mask=m_kv, other=0.0) + b_write
        else:
            b_open = b_write
        tl.store(new_open_ptr + tile, b_open, mask=m_kv)


def plan_state_token(starts, info, position, open_state, open_norm, x, norm, gamma, k, v, w, threshold, lam=None, *,
                     drift: bool, merge: str, max_segment_len: int | None, level: bool, inplace: bool = False):
    """The one-token plan of :mod:`dla.schedule.token` for the state scores, float32: ``starts, info
    [N, H, C]`` (newest first), ``position [N]``, ``open_state [N, H, K, V]`` (or ``None``: zero),
    ``open_norm, x, norm, gamma [N, H]``, ``k [N, H, K]``, ``v [N, H, V]``, ``w [N, H]`` (or
    ``None``: 1), ``threshold [H]``, ``lam [N, H, n_labels]`` the token's λ (or ``None``: 1). Returns
    ``(dest, (lo, hi), label, slot_lam, new_starts, new_info, score, new_open_norm, new_open_state,
    new_position)``, with ``(lo, hi)`` the routing as the decode kernel reads it, ``slot_lam [N, H, C]``
    the λ of every new slot (in ``lam``'s dtype, float32 without; 0 where empty) and ``new_position [N]``
    one past ``position``.
    ``inplace``: the new open state overwrites ``open_state`` (when it is float32 and contiguous)."""
    N, H, C = starts.shape
    K, V = k.shape[-1], v.shape[-1]
    dev = starts.device
    f32 = dict(dtype=torch.float32, device=dev)
    dest = torch.empty(N, H, C, dtype=torch.long, device=dev)
    lo = torch.empty(N, H, C, dtype=torch.int32, device=dev)
    hi = torch.empty_like(lo)
    label = torch.empty_like(dest)
    slot_lam = torch.empty(N, H, C, dtype=torch.float32 if lam is None else lam.dtype, device=dev)
    new_starts = torch.empty_like(dest)
    new_info = torch.empty(N, H, C, **f32)
    score = torch.empty(N, H, **f32)
    new_open_norm = torch.empty(N, H, **f32)
    new_position = torch.empty(N, dtype=torch.long, device=dev)
    overwrite = inplace and open_state is not None and open_state.dtype == torch.float32 \
        and open_state.is_contiguous()
    new_open = open_state if overwrite else torch.empty(N, H, K, V, **f32)
    KP = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), max(16, 8192 // KP))
    _token_plan_kernel[(N * H,)](
        x.contiguous(), norm.contiguous(), gamma.contiguous(), threshold.contiguous(), position.contiguous(),
        starts.contiguous(), info.contiguous(), open_norm.contiguous(),
        new_open if open_state is None else open_state.contiguous(), k.contiguous(), v.contiguous(),
        gamma if w is None else w.contiguous(), slot_lam if lam is None else lam.contiguous(),
        dest, lo, hi, label, slot_lam, new_starts, new_info, score, new_open_norm, new_open, new_position,
        H, int(max_segment_len or 0), 1 if lam is None else lam.shape[-1],
        C=C, CP=triton.next_power_of_2(C), K=K, V=V, KP=KP, BV=BV, DRIFT=drift, MERGE=MERGE_CODES[merge],
        HAS_MAX=max_segment_len is not None, LEVEL=level, HAS_OPEN=open_state is not None, HAS_W=w is not None,
        HAS_LAM=lam is not None, enable_fp_fusion=False)
    return dest, (lo, hi), label, slot_lam, new_starts, new_info, score, new_open_norm, new_open, new_position
