"""The ``dynamic`` policy as one Triton program per sequence-head (GPU; CPU via TRITON_INTERPRET).

Same decisions as :func:`dla.schedule.policies._dynamic`, bit for bit (float32 scores, same sums
and maxima), but the slots live in registers of one program that walks the sequence, instead of
a Python loop launching tensor ops for every token.

Slots are unordered here: a birth takes any free slot, the open segment is the slot with the
newest start, and on overflow each closed slot finds its older neighbour by comparing starts
(a C x C comparison, only at overflow). The final slots are written newest first. Scores are
loaded 64 tokens at a time, so the sequential walk does not wait on a memory load per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dla.schedule.schedule import NEVER, NONE, SegmentState

_NEVER = tl.constexpr(NEVER)


@triton.jit
def _scan_step(t, u, pos0, start, info, origin, count, open_start, idx, r, Tm, threshold, max_segment_len,
               death_ptr, carried_ptr, C: tl.constexpr, CP: tl.constexpr, HAS_MAX: tl.constexpr,
               OLDEST: tl.constexpr):
    """Token ``t`` (score ``u``): open a segment or extend the open one, then merge on overflow."""
    pos = pos0 + t
    wants = u >= threshold
    if HAS_MAX:
        wants = wants | ((pos - open_start) >= max_segment_len)
    first = count == 0
    new = first | wants
    if new:
        free = tl.min(tl.where(start < 0, idx, CP), axis=0)
        at_free = idx == free
        start = tl.where(at_free, pos, start)
        info = tl.where(at_free, u, info)
        origin = tl.where(at_free, t, origin)
        if not first:
            tl.store(death_ptr + r * Tm + t, _NEVER)
        count += 1
        open_start = pos
    else:
        info = tl.where(start == open_start, tl.maximum(info, u), info)
    if count > C:
        s_i = start[:, None]
        s_j = start[None, :]
        older_start = tl.max(tl.where((s_j < s_i) & (s_j >= 0), s_j, -1), axis=1)
        older_info = tl.max(tl.where(s_j == older_start[:, None], info[None, :], -1.0), axis=1)
        closed = (start >= 0) & (start < pos) & (older_start >= 0)
        if OLDEST:  # every pair costs the same, so the tie rule picks the oldest
            cost = tl.where(closed, 0.0, float("inf"))
        else:
            cost = tl.where(closed, info + older_info, float("inf"))
        cheapest = closed & (cost == tl.min(cost, axis=0))
        dying_start = tl.min(tl.where(cheapest, start, 2**62), axis=0)  # ties: the older pair
        dying = start == dying_start
        dying_origin = tl.sum(tl.where(dying, origin, 0), axis=0)
        survivor = start == tl.sum(tl.where(dying, older_start, 0), axis=0)
        info = tl.where(survivor, tl.maximum(info, tl.sum(tl.where(dying, info, 0.0), axis=0)), info)
        if dying_origin >= 0:
            tl.store(death_ptr + r * Tm + dying_origin, pos - pos0)
        else:
            tl.store(carried_ptr + r * C - dying_origin - 1, pos - pos0)
        start = tl.where(dying, -1, start)
        info = tl.where(dying, 0.0, info)
        origin = tl.where(dying, -(C + 1), origin)
        count -= 1
    return start, info, origin, count, open_start


@triton.jit
def _dynamic_scan_kernel(scores_ptr, lengths_ptr, position_ptr, starts_ptr, info_ptr,
                         death_ptr, carried_ptr, final_starts_ptr, final_info_ptr,
                         Tm, H, threshold, max_segment_len,
                         C: tl.constexpr, CP: tl.constexpr, HAS_MAX: tl.constexpr, OLDEST: tl.constexpr,
                         TB: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    n = r // H
    length = tl.load(lengths_ptr + n)
    pos0 = tl.load(position_ptr + n)
    idx = tl.arange(0, CP)
    in_c = idx < C
    start = tl.load(starts_ptr + r * C + idx, mask=in_c, other=-1)
    info = tl.load(info_ptr + r * C + idx, mask=in_c, other=0.0)
    origin = tl.where(in_c, -(idx + 1), -(C + 1)).to(tl.int64)  # window index, or -(carried slot + 1)
    # the live count and the open segment's start are carried as scalars, not reduced every step:
    # a birth adds one and becomes the open segment, a merge removes one closed segment
    count = tl.sum((start >= 0).to(tl.int32), axis=0)
    open_start = tl.max(start, axis=0)
    tb = tl.arange(0, TB)
    for t0 in range(0, length, TB):
        # a block of scores per load: the walk then waits on no memory access per token
        u_blk = tl.load(scores_ptr + r * Tm + t0 + tb, mask=t0 + tb < length, other=0.0)
        for tt in range(0, tl.minimum(TB, length - t0)):
            t = t0 + tt
            u = tl.max(tl.where(tb == tt, u_blk, float("-inf")), axis=0)
            start, info, origin, count, open_start = _scan_step(
                t, u, pos0, start, info, origin, count, open_start, idx, r, Tm, threshold, max_segment_len,
                death_ptr, carried_ptr, C, CP, HAS_MAX, OLDEST)
    filled = start >= 0
    newer = tl.sum(((start[None, :] > start[:, None]) & (start[None, :] >= 0)).to(tl.int32), axis=1)
    tl.store(final_starts_ptr + r * C + newer, start, mask=filled)
    tl.store(final_info_ptr + r * C + newer, info, mask=filled)


def dynamic_scan(scores: torch.Tensor, lengths: torch.Tensor, seg: SegmentState, capacity: int,
                 threshold: float, max_segment_len: int | None, merge: str = "least_info"):
    """Triton twin of ``policies._dynamic``: ``(death [N,H,Tm], carried [N,H,C], final)``."""
    N, H, Tm = scores.shape
    R, C = N * H, capacity
    dev = scores.device
    death = torch.full((R, Tm), NONE, dtype=torch.long, device=dev)
    carried = torch.full((R, C), NEVER, dtype=torch.long, device=dev)
    final_starts = torch.full((R, C), NONE, dtype=torch.long, device=dev)
    final_info = torch.zeros(R, C, dtype=torch.float32, device=dev)
    if R:
        _dynamic_scan_kernel[(R,)](
            scores.float().contiguous(), lengths.long().contiguous(), seg.position.long().contiguous(),
            seg.starts.long().contiguous(), seg.info.float().contiguous(),
            death, carried, final_starts, final_info, Tm, H, float(threshold),
            int(max_segment_len or 0), C=C, CP=triton.next_power_of_2(C + 1),
            HAS_MAX=max_segment_len is not None, OLDEST=merge == "oldest", TB=64, num_warps=1)
    final = SegmentState(final_starts.view(N, H, C), final_info.view(N, H, C), seg.position.long() + lengths)
    return death.view(N, H, Tm), carried.view(N, H, C), final
