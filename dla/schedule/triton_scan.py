"""The ``dynamic`` policy's walk as one Triton program per sequence-head (GPU; CPU via TRITON_INTERPRET).

The twin of :class:`dla.schedule.dynamic.TorchWalker`: the same decisions bit for bit. Both read
the same precomputed chunk terms and do the same float32 operations in the same order; the kernel
is compiled without fused multiply-adds and with correctly rounded division and square root, so
every score, sum and density equals PyTorch's.

Slots are unordered here: a birth takes any free slot, the open segment is the slot with the
newest start, and on overflow each closed slot finds its older and newer neighbours by comparing
starts (a C x C comparison, only at overflow). The slots live in registers during a launch and in
small buffers between launches (one launch per chunk for the state scores, one for a window of
given scores); :meth:`TritonWalker.finish` orders them newest first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dla.schedule.dynamic import ChunkTerms, Trace
from dla.schedule.schedule import NEVER, NONE, SegmentState

_NEVER = tl.constexpr(NEVER)
_MERGE_CODES = {"density": 0, "least_info": 1, "oldest": 2}


@triton.jit
def _walk_kernel(score_ptr, prefix_ptr, carry_ptr, norm_ptr, gamma_ptr,
                 lengths_ptr, position_ptr, threshold_ptr,
                 start_ptr, info_ptr, origin_ptr, count_ptr, open_norm_ptr,
                 death_ptr, carried_ptr, trace_score_ptr, trace_start_ptr, trace_norm_ptr,
                 a, b, Tm, H, L, max_segment_len,
                 C: tl.constexpr, CP: tl.constexpr, BL: tl.constexpr, SCORE: tl.constexpr, MERGE: tl.constexpr,
                 HAS_MAX: tl.constexpr, TRACE_OPEN: tl.constexpr):
    """Walk tokens ``[a, b)`` of row ``r`` (one sequence-head). ``SCORE``: 0 given scores
    (``score_ptr [R, Tm]``), 1 the state score, 2 its drift reading (chunk terms ``[R, L(, L)]``
    of the chunk starting at ``a``, ``L <= BL``). ``MERGE``: 0 density, 1 least_info, 2 oldest.

    The walk is a chain of dependent steps, so no step waits on memory: the chunk's per-token
    terms are loaded as ``[BL]`` blocks up front, the next token's row of ``prefix`` is loaded a
    step ahead, and a step reads its values out of the blocks by a masked sum (one nonzero term:
    exact)."""
    r = tl.program_id(0).to(tl.int64)
    n = r // H
    length = tl.load(lengths_ptr + n)
    pos0 = tl.load(position_ptr + n)
    threshold = tl.load(threshold_ptr + r)
    o_c = tl.arange(0, CP)
    start = tl.load(start_ptr + r * CP + o_c)  # [CP] absolute start positions, -1: empty
    info = tl.load(info_ptr + r * CP + o_c)
    origin = tl.load(origin_ptr + r * CP + o_c)  # window time of the start, or -(carried slot + 1)
    count = tl.load(count_ptr + r)
    open_norm = tl.load(open_norm_ptr + r)
    open_start = tl.max(start, axis=0)
    o_l = tl.arange(0, BL)
    m_l = o_l < L
    if SCORE != 0:
        b_carry = tl.load(carry_ptr + r * L + o_l, mask=m_l, other=0.0)  # [BL]
        b_norm = tl.load(norm_ptr + r * L + o_l, mask=m_l, other=0.0)
        b_gamma = tl.load(gamma_ptr + r * L + o_l, mask=m_l, other=0.0)
        b_row = tl.load(prefix_ptr + r * L * L + o_l, mask=m_l, other=0.0)  # prefix[0, :]
    for t in range(a, tl.minimum(b, length)):
        pos = pos0 + t
        first = count == 0
        if SCORE == 0:
            score = tl.load(score_ptr + r * Tm + t)
        else:
            i = t - a
            row = b_row
            b_row = tl.load(prefix_ptr + (r * L + i + 1) * L + o_l, mask=o_l < tl.where(i + 1 < L, L, 0), other=0.0)
            s0 = open_start - pos0 - a  # the open segment's start, chunk time
            at_i = o_l == i
            if s0 < 0:
                x = tl.sum(tl.where(at_i, b_carry, 0.0), axis=0) + tl.sum(tl.where(o_l == 0, row, 0.0), axis=0)
            else:
                x = tl.sum(tl.where(o_l == s0, row, 0.0), axis=0)
            norm = tl.sum(tl.where(at_i, b_norm, 0.0), axis=0)
            gamma = tl.sum(tl.where(at_i, b_gamma, 0.0), axis=0)
            # dla.schedule.dynamic.state_score, operation for operation
            extended = gamma * gamma * open_norm + 2 * gamma * x + norm
            if SCORE == 2:
                num = gamma * open_norm + x
                den = extended * open_norm
            else:
                num = x
                den = norm * open_norm
            ok = den > 0
            cos = tl.div_rn(num, tl.sqrt_rn(tl.where(ok, den, 1.0)))
            d = tl.minimum(tl.maximum(1 - cos, 0.0), 2.0)
            score = tl.where(ok, tl.sqrt_rn(d + d), 0.0)
            score = tl.where(first, 0.0, score)
            if TRACE_OPEN:
                tl.store(trace_start_ptr + r * Tm + t, s0 + a)
                tl.store(trace_norm_ptr + r * Tm + t, open_norm)
        tl.store(trace_score_ptr + r * Tm + t, score)
        wants = score >= threshold
        if HAS_MAX:
            wants = wants | ((pos - open_start) >= max_segment_len)
        new = first | wants
        if SCORE != 0:
            open_norm = tl.where(new, norm, tl.maximum(extended, 0.0))
        if new:
            free = tl.min(tl.where(start < 0, o_c, CP), axis=0)
            at_free = o_c == free
            start = tl.where(at_free, pos, start)
            info = tl.where(at_free, score, info)
            origin = tl.where(at_free, t, origin)
            if not first:
                tl.store(death_ptr + r * Tm + t, _NEVER)
            count += 1
            open_start = pos
        else:
            if MERGE == 1:
                info = tl.where(start == open_start, tl.maximum(info, score), info)
            else:
                info = tl.where(start == open_start, info + score, info)
        if count > C:
            s_i = start[:, None]
            s_j = start[None, :]
            older_start = tl.max(tl.where((s_j < s_i) & (s_j >= 0), s_j, -1), axis=1)
            newer_start = tl.min(tl.where(s_j > s_i, s_j, 2**62), axis=1)
            # exactly one slot matches: the masked sum is that slot's value
            older_info = tl.sum(tl.where(s_j == older_start[:, None], info[None, :], 0.0), axis=1)
            closed = (start >= 0) & (start < pos) & (older_start >= 0)
            if MERGE == 0:
                cost = tl.div_rn(info + older_info, (newer_start - older_start).to(tl.float32))
            elif MERGE == 1:
                cost = info + older_info
            else:  # every pair costs the same, so the tie rule picks the oldest
                cost = tl.zeros_like(info)
            cost = tl.where(closed, cost, float("inf"))
            cheapest = closed & (cost == tl.min(cost, axis=0))
            dying_start = tl.min(tl.where(cheapest, start, 2**62), axis=0)  # ties: the older pair
            dying = start == dying_start
            dying_info = tl.sum(tl.where(dying, info, 0.0), axis=0)
            dying_origin = tl.sum(tl.where(dying, origin, 0), axis=0)
            survivor = start == tl.sum(tl.where(dying, older_start, 0), axis=0)
            if MERGE == 1:
                info = tl.where(survivor, tl.maximum(info, dying_info), info)
            else:
                info = tl.where(survivor, dying_info + info, info)
            if dying_origin >= 0:
                tl.store(death_ptr + r * Tm + dying_origin, t)
            else:
                tl.store(carried_ptr + r * C - dying_origin - 1, t)
            start = tl.where(dying, -1, start)
            info = tl.where(dying, 0.0, info)
            origin = tl.where(dying, -(C + 1), origin)
            count -= 1
    tl.store(start_ptr + r * CP + o_c, start)
    tl.store(info_ptr + r * CP + o_c, info)
    tl.store(origin_ptr + r * CP + o_c, origin)
    tl.store(count_ptr + r, count)
    tl.store(open_norm_ptr + r, open_norm)


class TritonWalker:
    """The walker interface of :class:`dla.schedule.dynamic.TorchWalker`, one Triton launch per walk."""

    def __init__(self, seg: SegmentState, lengths, threshold, max_segment_len, merge, dtype):
        N, H, C = seg.starts.shape
        R, dev = N * H, seg.starts.device
        self.N, self.H, self.C, self.CP = N, H, C, triton.next_power_of_2(C + 1)
        self.merge, self.max_segment_len = merge, max_segment_len
        self.threshold = threshold.float().contiguous()
        self.lengths = lengths.long().contiguous()
        self.position = seg.position.long().contiguous()
        pad = self.CP - C
        self.slot_start = torch.cat([seg.starts.reshape(R, C).long(),
                                torch.full((R, pad), NONE, dtype=torch.long, device=dev)], 1).contiguous()
        self.info = torch.cat([seg.info.reshape(R, C).float(), torch.zeros(R, pad, device=dev)], 1).contiguous()
        origin = torch.where(torch.arange(self.CP, device=dev) < C, -(torch.arange(self.CP, device=dev) + 1), -(C + 1))
        self.origin = origin.expand(R, self.CP).contiguous()
        self.count = (self.slot_start >= 0).sum(1).contiguous()
        self.open_norm = (torch.zeros(R, device=dev) if seg.open_norm is None
                          else seg.open_norm.reshape(R).float().contiguous())
        self.carried = torch.full((R, C), NEVER, dtype=torch.long, device=dev)

    def start(self, Tm: int, trace: Trace):
        self.Tm, self.trace = Tm, trace
        self.death = torch.full((self.slot_start.shape[0], Tm), NONE, dtype=torch.long, device=self.slot_start.device)

    def open_start(self) -> torch.Tensor:
        newest = self.slot_start.max(1).values
        position = self.position.repeat_interleave(self.H)
        return torch.where(newest >= 0, newest - position, NONE - position)

    def walk(self, a: int, b: int, scores=None, terms: ChunkTerms | None = None, drift: bool = False):
        R = self.slot_start.shape[0]
        if R == 0 or b <= a:
            return
        dummy = self.info
        if terms is None:
            score_code, prefix, carry, norm, gamma, L = 0, dummy, dummy, dummy, dummy, 1
            scores = scores.float().contiguous()
        else:
            score_code = 2 if drift else 1
            prefix, carry, norm, gamma = (x.float().contiguous() for x in
                                          (terms.prefix, terms.carry, terms.norm, terms.gamma))
            L, scores = b - a, dummy
        tr = self.trace
        _walk_kernel[(R,)](
            scores, prefix, carry, norm, gamma, self.lengths, self.position, self.threshold,
            self.slot_start, self.info, self.origin, self.count, self.open_norm,
            self.death, self.carried,
            tr.scores, self.death if tr.open_start is None else tr.open_start,
            dummy if tr.open_norm is None else tr.open_norm,
            a, b, self.Tm, self.H, L, int(self.max_segment_len or 0),
            C=self.C, CP=self.CP, BL=triton.next_power_of_2(L), SCORE=score_code, MERGE=_MERGE_CODES[self.merge],
            HAS_MAX=self.max_segment_len is not None, TRACE_OPEN=tr.open_start is not None,
            num_warps=1, enable_fp_fusion=False)

    def finish(self, N: int, H: int):
        C = self.C
        order = self.slot_start.argsort(dim=1, descending=True, stable=True)[:, :C]  # newest first, empty (-1) last
        starts = self.slot_start.gather(1, order)
        info = torch.where(starts >= 0, self.info.gather(1, order), 0.0)
        return (self.death.view(N, H, -1), self.carried.view(N, H, C), starts.view(N, H, C), info.view(N, H, C))
