"""The ``dynamic`` policy's walk as one Triton program per sequence-head (GPU; CPU via TRITON_INTERPRET).

The twin of :class:`dla.schedule.dynamic.TorchWalker`: the same decisions bit for bit. Both read
the same precomputed chunk terms and do the same float32 operations in the same order; the kernel
is compiled without fused multiply-adds and with correctly rounded division and square root, so
every score, sum and density equals PyTorch's.

The walk is a chain of dependent steps, one per token, so a step's latency is what it costs. The
slots are kept in chronological order (lane ``i`` holds the ``i``-th oldest segment, the open one
last): a segment's older and newer neighbours are the next lanes, read by shifting a ``[CP]``
vector by one lane (``tl.gather``, warp shuffles), a birth appends a lane and a merge removes one
and shifts the newer lanes down. A step has two chains that meet only at its end: the score (and
so the birth decision) from the open segment's terms, and the merge a birth would need, priced
from the slots before the token (the newcomer takes the newest lane, so no candidate pair depends
on the score). The merge's choice is one reduction that returns the cheapest pair's lane and the
origin of its dying segment. The slots live in registers during a launch and in small buffers
between launches (one launch per chunk for the state scores, one for a window of given scores);
:meth:`TritonWalker.finish` orders them newest first.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dla.schedule.dynamic import ChunkTerms, Trace, WindowTerms
from dla.schedule.schedule import NEVER, NONE, SegmentState
from dla.schedule.triton_terms import advance_blocks, advance_open_state

_NEVER = tl.constexpr(NEVER)
MERGE_CODES = {"density": 0, "least_info": 1, "oldest": 2}
SCORE_BLOCK = 64  # given scores are read in blocks of this many tokens, the next block a block ahead
WINDOW_WARPS = 4  # a window's walk also runs the open state's [K, V] products between chunks


@triton.jit
def _cheaper_pair(cost_a, j_a, origin_a, cost_b, j_b, origin_b):
    """The merge's argmin with its payload: the cheaper pair, the older (lower lane) on ties."""
    a_wins = (cost_a < cost_b) | ((cost_a == cost_b) & (j_a < j_b))
    return tl.where(a_wins, cost_a, cost_b), tl.where(a_wins, j_a, j_b), tl.where(a_wins, origin_a, origin_b)


@triton.jit
def triton_state_score(x, norm, gamma, open_norm, DRIFT: tl.constexpr):
    """:func:`dla.schedule.dynamic.state_score`, operation for operation: the score ``I`` and
    ``‖γO + s_t‖²`` (not yet clamped at 0) from ``x = ⟨s_t, O⟩``, ``‖s_t‖²``, ``γ`` and ``‖O‖²``."""
    extended = gamma * gamma * open_norm + 2 * gamma * x + norm
    if DRIFT:
        num = gamma * open_norm + x
        den = extended * open_norm
    else:
        num = x
        den = norm * open_norm
    ok = den > 0
    cos = tl.div_rn(num, tl.sqrt_rn(tl.where(ok, den, 1.0)))
    d = tl.minimum(tl.maximum(1 - cos, 0.0), 2.0)
    return tl.where(ok, tl.sqrt_rn(d + d), 0.0), extended


@triton.jit
def _open_product(b_row, b_carry, b_first, o_u, s0):
    """``⟨s_u, O_{u-1}⟩`` of chunk token ``o_u`` (``[1]``) from its row of ``prefix`` (``[BL]``) when
    the open segment starts at chunk time ``s0``: the carried product plus the whole row's sum if
    it started before the chunk. The order of TorchWalker's sum."""
    x_in = tl.gather(b_row, tl.maximum(s0, 0).to(tl.int32), 0)
    return tl.where(s0 < 0, tl.gather(b_carry, o_u, 0) + tl.gather(b_first, o_u, 0), x_in)


@triton.jit
def _walk_kernel(score_ptr, prefix_ptr, carry_ptr, norm_ptr, gamma_ptr,
                 lengths_ptr, position_ptr, threshold_ptr,
                 start_ptr, info_ptr, origin_ptr, count_ptr, open_norm_ptr,
                 death_ptr, carried_ptr, trace_score_ptr, trace_start_ptr, trace_norm_ptr, open_start_out_ptr,
                 k_ptr, v_ptr, write_scale_ptr, chunk_decay_ptr, carry_scale_ptr, state_ptr, final_ptr,
                 a, b, Tm, R, H, L, NC, stride_prefix_r, stride_prefix_t, stride_carry, stride_norm, stride_gamma,
                 stride_state_r, stride_state_c, SLOTS, max_segment_len,
                 C: tl.constexpr, CP: tl.constexpr, BL: tl.constexpr, SCORE: tl.constexpr, MERGE: tl.constexpr,
                 HAS_MAX: tl.constexpr, TRACE_OPEN: tl.constexpr, WINDOW: tl.constexpr, K: tl.constexpr,
                 V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Walk tokens ``[a, b)`` of row ``i_r`` (one sequence-head). ``SCORE``: 0 given scores
    (``score_ptr [R, Tm]``, read ``BL`` tokens at a time), 1 the state score, 2 its drift reading
    (chunk terms ``[R, L(, L)]`` of the chunk starting at ``a``, ``L <= BL``). ``MERGE``: 0 density,
    1 least_info, 2 oldest.

    Values that are one per row (the score, the open segment, the slot count) are ``[1]`` blocks,
    so that a token's terms are read out of the chunk's ``[BL]`` blocks by a gather (one shuffle)
    instead of a reduction. The state score's product with the open state is prepared a token
    ahead for both outcomes of the current token (it opens a segment, or not), and the rows of
    ``prefix`` it needs are loaded two tokens ahead: the score's chain is only its arithmetic.

    ``WINDOW`` (state scores): walk every chunk of the window ``[a, b)`` (terms ``[R, NC, L(, L)]``,
    ``carry`` the first chunk's) and between two chunks advance the open state and take the next chunk's
    products with it (:func:`dla.schedule.triton_terms.advance_open_state`): the open state at chunk
    ``i``'s start is ``state_ptr + (i % SLOTS) * stride_state_c`` (``SLOTS = NC``: every chunk's kept,
    ``2``: two tiles in turn), the one after the last chunk ``final_ptr``; where the open segment starts
    after each chunk goes to ``open_start_out [NC, R]``. Otherwise one chunk per launch, and the open
    segment's start after it to ``open_start_out [R]``."""
    i_r = tl.program_id(0).to(tl.int64)
    i_n = i_r // H
    length = tl.load(lengths_ptr + i_n)
    pos0 = tl.load(position_ptr + i_n)
    threshold = tl.load(threshold_ptr + i_r)
    end = tl.minimum(b, length).to(tl.int32)  # window times fit int32: the origins are int32
    o_1 = tl.zeros([1], dtype=tl.int32)
    o_c = tl.arange(0, CP)
    o_next = tl.minimum(o_c + 1, CP - 1)  # the lanes (and so the segments) one and two newer
    o_next2 = tl.minimum(o_c + 2, CP - 1)
    b_start = tl.load(start_ptr + i_r * CP + o_c)  # [CP] absolute starts, oldest first, -1: empty
    b_info = tl.load(info_ptr + i_r * CP + o_c)
    b_origin = tl.load(origin_ptr + i_r * CP + o_c)  # window time of the start, or -(carried slot + 1)
    count = tl.load(count_ptr + i_r + o_1)  # [1]
    open_norm = tl.load(open_norm_ptr + i_r + o_1)
    open_start = tl.max(b_start, axis=0) + o_1.to(tl.int64)  # [1], -1 before the first segment
    o_l = tl.arange(0, BL)
    if SCORE != 0:
        b_carry = tl.load(carry_ptr + i_r * stride_carry + o_l, mask=o_l < L, other=0.0)  # [BL], the first chunk's
        if WINDOW:
            hi, step = b, L
        else:
            hi, step = tl.minimum(end, a + 1), BL  # one chunk (none past the row's end)
    else:
        b_score_next = tl.load(score_ptr + i_r * Tm + a + o_l, mask=a + o_l < end, other=0.0)
        hi, step = end, BL
    for a0 in range(a, hi, step):  # blocks of given scores, or chunks of state-scored tokens
        if SCORE == 0:
            b_score = b_score_next
            b_score_next = tl.load(score_ptr + i_r * Tm + a0 + BL + o_l, mask=a0 + BL + o_l < end, other=0.0)
        else:  # the chunk's terms
            i_c = (a0 - a) // L
            n = tl.minimum(L, b - a0)  # the chunk's tokens
            m_l = o_l < n
            p_prefix = prefix_ptr + i_r * stride_prefix_r + i_c * L * L
            b_norm = tl.load(norm_ptr + i_r * stride_norm + i_c * L + o_l, mask=m_l, other=0.0)
            b_gamma = tl.load(gamma_ptr + i_r * stride_gamma + i_c * L + o_l, mask=m_l, other=0.0)
            b_first = tl.load(p_prefix + o_l * stride_prefix_t, mask=m_l, other=0.0)  # prefix[u, 0]
            b_diag = tl.load(p_prefix + o_l * stride_prefix_t + o_l - 1, mask=m_l & (o_l > 0), other=0.0)  # [u, u-1]
            b_row = tl.load(p_prefix + o_l, mask=m_l, other=0.0)  # prefix[0, :]
            x = _open_product(b_row, b_carry, b_first, o_1, open_start - pos0 - a0)  # [1]
            b_row_next = tl.load(p_prefix + stride_prefix_t + o_l, mask=o_l < tl.where(1 < n, n, 0), other=0.0)
            b_row_next2 = tl.load(p_prefix + 2 * stride_prefix_t + o_l, mask=o_l < tl.where(2 < n, n, 0), other=0.0)
        for t in range(a0, tl.minimum(a0 + step, end)):
            pos = pos0 + t
            first = count == 0
            i = t - a0
            if SCORE == 0:
                score = tl.gather(b_score, i + o_1, 0)
            else:
                s0 = open_start - pos0 - a0  # the open segment's start, chunk time
                o_i = i + o_1
                # the next token's product with the open state: if this token opens a segment, or not
                o_u = tl.minimum(i + 1, BL - 1) + o_1
                x_born = tl.gather(b_diag, o_u, 0)
                x_kept = _open_product(b_row_next, b_carry, b_first, o_u, s0)
                b_row_next = b_row_next2
                b_row_next2 = tl.load(p_prefix + (i + 3) * stride_prefix_t + o_l,
                                      mask=o_l < tl.where(i + 3 < n, n, 0), other=0.0)
                norm = tl.gather(b_norm, o_i, 0)
                gamma = tl.gather(b_gamma, o_i, 0)
                score, extended = triton_state_score(x, norm, gamma, open_norm, SCORE == 2)
                score = tl.where(first, 0.0, score)
                if TRACE_OPEN:
                    tl.store(trace_start_ptr + i_r * Tm + t + o_1, s0 + a0)
                    tl.store(trace_norm_ptr + i_r * Tm + t + o_1, open_norm)
            tl.store(trace_score_ptr + i_r * Tm + t + o_1, score)
            # the merge a birth with all C slots in use would need (lanes 0..C-1 in use, the
            # newcomer at lane C, at pos): the pair (j, j + 1) of closed segments, j <= C - 2
            b_start1 = tl.gather(b_start, o_next, 0)
            b_info1 = tl.gather(b_info, o_next, 0)
            b_origin1 = tl.gather(b_origin, o_next, 0)
            if MERGE == 0:
                b_start2 = tl.where(o_c == C - 2, pos, tl.gather(b_start, o_next2, 0))
                span = b_start2 - b_start  # the pair's tokens: from its start to the next segment's
                b_cost = tl.div_rn(b_info1 + b_info, tl.where(span > 0, span, 1).to(tl.float32))
            elif MERGE == 1:
                b_cost = b_info1 + b_info
            else:  # every pair costs the same, so the tie rule picks the oldest
                b_cost = tl.zeros_like(b_info)
            b_cost = tl.where(o_c < C - 1, b_cost, float("inf"))
            _, j, dying_origin = tl.reduce((b_cost, o_c, b_origin1), 0, _cheaper_pair, keep_dims=True)  # [1]
            if MERGE == 1:
                merged = tl.maximum(b_info, b_info1)
            else:
                merged = b_info1 + b_info
            # the score's chain: a birth, and with all slots in use a merge
            wants = score >= threshold
            if HAS_MAX:
                wants = wants | ((pos - open_start) >= max_segment_len)
            new = first | wants
            over = new & (count == C)
            if SCORE != 0:
                open_norm = tl.where(new, norm, tl.maximum(extended, 0.0))
                x = tl.where(new, x_born, x_kept)
            open_start = tl.where(new, pos, open_start)
            tl.store(death_ptr + i_r * Tm + t + o_1, _NEVER, mask=new & ~first)
            tl.store(death_ptr + i_r * Tm + tl.maximum(dying_origin, 0) + o_1, t, mask=over & (dying_origin >= 0))
            tl.store(carried_ptr + i_r * C - tl.minimum(dying_origin, -1) - 1 + o_1, t, mask=over & (dying_origin < 0))
            # merge j + 1 into j and shift the newer lanes down, then append the newcomer or grow the open segment
            b_start = tl.where(over & (o_c > j), b_start1, b_start)
            b_info = tl.where(over & (o_c >= j), tl.where(o_c == j, merged, b_info1), b_info)
            b_origin = tl.where(over & (o_c > j), b_origin1, b_origin)
            at_birth = new & (o_c == tl.minimum(count, C - 1))
            at_open = ~new & (o_c == count - 1)
            b_start = tl.where(at_birth, pos, b_start)
            if MERGE == 1:
                grown = tl.maximum(b_info, score)
            else:
                grown = b_info + score
            b_info = tl.where(at_birth, score, tl.where(at_open, grown, b_info))
            b_origin = tl.where(at_birth, t, b_origin)
            count = tl.minimum(count + new.to(tl.int32), C)
        if WINDOW:  # the chunk walked: the open segment's start, the open state after it, the next chunk's products
            i_w = a0 // L
            tl.store(open_start_out_ptr + i_w * R + i_r + o_1, open_start - pos0)
            p_state = state_ptr + i_r * stride_state_r
            p_out = p_state + ((i_w + 1) % SLOTS) * stride_state_c
            if i_w + 1 == NC:
                p_out = final_ptr + i_r * K * V
            tl.debug_barrier()  # the open state the last chunk stored, every thread's part of it
            b_carry = advance_open_state(p_state + (i_w % SLOTS) * stride_state_c, p_out, k_ptr, v_ptr,
                                         write_scale_ptr, chunk_decay_ptr, carry_scale_ptr, i_r, i_w, NC, L,
                                         tl.sum(open_start, 0) - pos0, K, V, BL, BK, BV, True,
                                         1)  # rolled loops in this program (triton_terms.ADVANCE_UNROLL)
    tl.store(start_ptr + i_r * CP + o_c, b_start)
    tl.store(info_ptr + i_r * CP + o_c, b_info)
    tl.store(origin_ptr + i_r * CP + o_c, b_origin)
    tl.store(count_ptr + i_r + o_1, count)
    tl.store(open_norm_ptr + i_r + o_1, open_norm)
    if not WINDOW:
        tl.store(open_start_out_ptr + i_r + o_1, open_start - pos0)  # window time (an empty row's -1 included)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 with contiguous rows (the kernel takes the other strides as arguments)."""
    x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


class TritonWalker:
    """The walker interface of :class:`dla.schedule.dynamic.TorchWalker`, one Triton launch per walk;
    with ``walks_windows`` (``DLA_PLAN_WINDOW_WALK=1``) the planner walks a state-scored window in one
    launch (:meth:`walk_window`) instead of a launch per chunk and one per update of the open state."""

    walks_windows = os.environ.get("DLA_PLAN_WINDOW_WALK", "0") == "1"

    def __init__(self, seg: SegmentState, lengths, threshold, max_segment_len, merge, dtype):
        N, H, C = seg.starts.shape
        R, dev = N * H, seg.starts.device
        self.N, self.H, self.C, self.CP = N, H, C, triton.next_power_of_2(C + 1)
        self.merge, self.max_segment_len = merge, max_segment_len
        self.threshold = threshold.float().contiguous()
        self.lengths = lengths.long().contiguous()
        self.position = seg.position.long().contiguous()
        # lanes oldest first: lane i holds slot count - 1 - i of the newest-first SegmentState
        starts = seg.starts.reshape(R, C).long()
        count = (starts >= 0).sum(1, keepdim=True)
        lane = torch.arange(self.CP, device=dev)
        slot = (count - 1 - lane).clamp(0, C - 1)
        used = lane < count
        self.slot_start = torch.where(used, starts.gather(1, slot), NONE).contiguous()
        self.info = torch.where(used, seg.info.reshape(R, C).float().gather(1, slot), 0.0).contiguous()
        self.origin = torch.where(used, -(slot + 1), -(C + 1)).to(torch.int32).contiguous()
        self.count = count.view(R).to(torch.int32).contiguous()
        # a copy: the kernel writes the walk's norms here, and a float32 state's would be the caller's own
        self.open_norm = (torch.zeros(R, device=dev) if seg.open_norm is None
                          else seg.open_norm.reshape(R).float().clone())
        self.carried = torch.full((R, C), NEVER, dtype=torch.long, device=dev)

    def start(self, Tm: int, trace: Trace):
        self.Tm, self.trace = Tm, trace
        self.death = torch.full((self.slot_start.shape[0], Tm), NONE, dtype=torch.long, device=self.slot_start.device)
        self._open_start = self.slot_start.max(1).values - self.position.repeat_interleave(self.H)  # NONE: -1 - pos

    def open_start(self) -> torch.Tensor:
        """Where the open segment starts, window time ``[R]``: written by the last walk (a new tensor
        per walk, so that a recorded walk keeps each)."""
        return self._open_start

    def walk(self, a: int, b: int, scores=None, terms: ChunkTerms | None = None, drift: bool = False):
        R = self.slot_start.shape[0]
        if R == 0 or b <= a:
            return
        dummy = self.info
        if terms is None:
            score_code, prefix, carry, norm, gamma, L, BL = 0, dummy, dummy, dummy, dummy, 1, SCORE_BLOCK
            scores = scores.float().contiguous()
        else:
            score_code = 2 if drift else 1
            prefix, carry, norm, gamma = (_unit_stride(x) for x in (terms.prefix, terms.carry, terms.norm, terms.gamma))
            L, scores = b - a, dummy
            BL = triton.next_power_of_2(L)
        self._open_start = torch.empty_like(self._open_start)
        self._launch(scores, prefix, carry, norm, gamma, self._open_start, a, b, L, score_code, BL)

    def walk_window(self, window: WindowTerms, open_state, drift: bool = False, keep_states: bool = False):
        """Every chunk of ``window`` in one launch, with the open state's updates between them (the
        products of :meth:`WindowTerms.advance`, the same numbers): ``(open_state [R, K, V] after the
        window, the open state at every chunk start [R, NC, K, V] if keep_states else None, where the open
        segment starts after each chunk [NC, R])``."""
        R, NC, L, K = window.k.shape
        V = window.v.shape[-1]
        final = torch.empty_like(open_state)
        open_starts = torch.empty(NC, R, dtype=torch.long, device=open_state.device)
        self._open_start = open_starts[-1] if NC else self._open_start
        if R == 0 or NC == 0:
            return open_state.clone(), open_state.new_empty(R, NC, K, V) if keep_states else None, open_starts
        states = open_state.new_empty(R, NC if keep_states else 2, K, V)
        states[:, 0] = open_state
        self._launch(self.info, window.prefix, window.carried(0, open_state), window.norm, window.gamma, open_starts,
                     0, self.Tm, L, 2 if drift else 1, window=window, states=states, final=final)
        return final, states if keep_states else None, open_starts

    def _launch(self, scores, prefix, carry, norm, gamma, open_start_out, a, b, L, score_code, BL=None, window=None,
                states=None, final=None):
        """One launch of the walk kernel: ``[a, b)`` in blocks of ``BL``, or with ``window`` its every chunk
        (the open state's tiles ``states`` and ``final``, the tiles of :func:`advance_blocks`)."""
        tr, dummy, w = self.trace, self.info, window
        K, V = (1, 1) if w is None else (w.k.shape[-1], w.v.shape[-1])
        blocks = dict(BL=BL, BK=16, BV=16) if w is None else advance_blocks(K, V, L)
        _walk_kernel[(self.slot_start.shape[0],)](
            scores, prefix, carry, norm, gamma, self.lengths, self.position, self.threshold,
            self.slot_start, self.info, self.origin, self.count, self.open_norm,
            self.death, self.carried,
            tr.scores, self.death if tr.open_start is None else tr.open_start,
            dummy if tr.open_norm is None else tr.open_norm, open_start_out,
            *((dummy,) * 7 if w is None else (w.k, w.v, w.write_scale, w.chunk_decay, w.carry_scale, states, final)),
            a, b, self.Tm, self.slot_start.shape[0], self.H, L, 1 if w is None else w.NC,
            prefix.stride(0), prefix.stride(-2) if prefix.dim() > 2 else 0, carry.stride(0), norm.stride(0),
            gamma.stride(0), 0 if w is None else states.stride(0), 0 if w is None else states.stride(1),
            1 if w is None else states.shape[1], int(self.max_segment_len or 0),
            C=self.C, CP=self.CP, SCORE=score_code, MERGE=MERGE_CODES[self.merge],
            HAS_MAX=self.max_segment_len is not None, TRACE_OPEN=tr.open_start is not None, WINDOW=w is not None,
            K=K, V=V, num_warps=1 if w is None else WINDOW_WARPS, enable_fp_fusion=False, **blocks)

    def finish(self, N: int, H: int):
        C = self.C
        order = self.slot_start.argsort(dim=1, descending=True, stable=True)[:, :C]  # newest first, empty (-1) last
        starts = self.slot_start.gather(1, order)
        info = torch.where(starts >= 0, self.info.gather(1, order), 0.0)
        return (self.death.view(N, H, -1), self.carried.view(N, H, C), starts.view(N, H, C), info.view(N, H, C))
