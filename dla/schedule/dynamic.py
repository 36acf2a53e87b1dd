"""The ``dynamic`` policy (DLA, spec §3): information scores, births and merges, planned chunk by chunk.

Per sequence and head, for every token ``t`` in order:

1. score it: ``I_t``, the state information score (Eq. 13) ``sqrt(2 - 2 cos_F(s_t, O_{t-1}))`` of the
   token's contribution ``s_t = w_t k_t v_tᵀ`` against the open state ``O`` (``score="state"``), its
   ``state_drift`` reading, or a given score (``novelty``, ``router``, ``external``);
2. open a segment where ``I_t >= τ`` (or the open segment is ``max_segment_len`` long); a new
   segment resets the open state ``O_t = s_t``, otherwise ``O_t = exp(g_t) O_{t-1} + s_t``;
3. on overflow merge an adjacent pair of closed segments: the least dense one (``density``,
   Eq. 16–17: summed scores over summed lengths), the one of least summed maxima
   (``least_info``, the earlier variant) or the two oldest (``oldest``); ties go to the older pair.

The state score needs three scalars per token: ``⟨s_t, O_{t-1}⟩``, ``‖s_t‖²`` and ``‖O_{t-1}‖²``.
The first is computed chunk-parallel: within a chunk of ``PLAN_CHUNK`` tokens, from the pairwise
products ``⟨s_t, s_u⟩`` (decayed) summed over every possible start of the open segment, plus the
product with ``O`` at the chunk start; the second is a row norm; the third follows a scalar
recurrence. So the sequential walk (:class:`TorchWalker`, or the Triton twin in
:mod:`dla.schedule.triton_scan`) is scalar work, and both walkers read the same precomputed terms
and do the same float operations in the same order: they plan identical schedules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dla.schedule.replay import ReplayingWalker, planning_walker
from dla.schedule.schedule import NEVER, NONE, SegmentState

SCORES = ("state", "state_drift", "novelty", "router", "external")
STATE_SCORES = ("state", "state_drift")
MERGE_RULES = ("density", "least_info", "oldest")
OPEN_STATES = ("decayed", "plain")
PLAN_CHUNK = 64


@dataclass
class Contributions:
    """The tokens' contributions ``s_t = w_t k_t v_tᵀ`` as dense rows (one per sequence-head), with
    the log-decay that ages the open state (zero for ``open_state="plain"`` and beyond each row's
    length). ``k [R, Tm, K]``, ``v [R, Tm, V]``, ``w``, ``g [R, Tm]``; the window has ``length`` tokens
    (default: ``Tm``), and rows longer than that are zero past them (padded to whole planning chunks,
    :func:`planned_length`, the rows' chunks are views, not padded copies)."""

    k: torch.Tensor
    v: torch.Tensor
    w: torch.Tensor
    g: torch.Tensor
    length: int | None = None

    def __post_init__(self):
        if self.length is None:
            self.length = self.k.shape[1]


@dataclass
class ChunkTerms:
    """What the walk reads for the tokens ``t`` of one chunk (``[R, L]`` unless noted).

    ``prefix[t, b] = Σ_{b <= u < t} ⟨s_t, decay(u -> t-1) s_u⟩`` (``[R, L, L]``): ``⟨s_t, O_{t-1}⟩``
    when the open segment starts at chunk token ``b``; ``carry[t] = ⟨s_t, decay(a-1 -> t-1) O_{a-1}⟩``,
    to add when it started before the chunk; ``norm[t] = ‖s_t‖²``; ``gamma[t] = exp(g_t)``."""

    prefix: torch.Tensor
    carry: torch.Tensor
    norm: torch.Tensor
    gamma: torch.Tensor


def pair_products(kq, vq, wq, k, v, w, g):
    """``pair[t, u] = ⟨s_t, decay(u -> t-1) s_u⟩`` for ``u < t`` (0 elsewhere), ``[R, L, L]``, and the
    cumulative log-decay ``G [R, L]`` of the chunk. The query side (``kq, vq, wq``) may carry
    gradients; the key side is the open state's, held constant by the callers that need it."""
    G = g.cumsum(-1)
    G_prev = torch.cat([torch.zeros_like(G[:, :1]), G[:, :-1]], -1)  # G_{t-1}, exactly the previous sum
    L = g.shape[-1]
    earlier = torch.ones(L, L, dtype=torch.bool, device=g.device).tril(-1)
    decay = torch.where(earlier, G_prev[:, :, None] - G[:, None, :], float("-inf")).exp()
    pair = (wq[:, :, None] * w[:, None, :]) * (kq @ k.transpose(1, 2)) * (vq @ v.transpose(1, 2)) * decay
    return pair, G, G_prev


def carried_products(scale, k, v, open_state):
    """``⟨s_t, decay(a-1 -> t-1) O_{a-1}⟩`` for the chunk's tokens, ``[R, L]``, from their
    ``scale = exp(G_{t-1}) w_t`` and ``k, v``, and the open state before the chunk."""
    return scale * ((k @ open_state) * v).sum(-1)


def contribution_norms(k, v, w=None):
    """``‖s_t‖² = w_t² ‖k_t‖² ‖v_t‖²`` (``w=None``: ``w = 1``, the same numbers without the products by 1)."""
    k_norm = (k * k).sum(-1)
    return (k_norm if w is None else (w * w) * k_norm) * (v * v).sum(-1)


def to_chunks(x: torch.Tensor, L: int) -> torch.Tensor:
    """``[R, Tm, ...]`` -> ``[R * NC, L, ...]``, zero-padded to ``NC = ceil(Tm / L)`` whole chunks (a
    view of a contiguous ``x`` when ``Tm`` is a whole number of chunks: nothing to pad)."""
    R, Tm = x.shape[:2]
    NC = -(-Tm // L)
    if NC * L != Tm:
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, NC * L - Tm))
    return x.reshape(R * NC, L, *x.shape[2:])


def planned_length(Tm: int) -> int:
    """The tokens of a window of ``Tm`` in whole planning chunks (of ``PLAN_CHUNK`` tokens, or the whole
    window if shorter)."""
    L = min(PLAN_CHUNK, Tm) or 1
    return -(-Tm // L) * L


def terms_backend(device: torch.device, dtype: torch.dtype) -> str:
    """How :class:`WindowTerms` takes the state score's per-token terms and its products with the open
    state by default: Triton for float32 CUDA tensors, else PyTorch. The one-token plan of decoding
    (:mod:`dla.schedule.token`) asks too, so that both compute a token's terms alike."""
    return "triton" if device.type == "cuda" and dtype == torch.float32 else "torch"


class WindowTerms:
    """Everything the state score needs that does not depend on the walk, for all chunks of a window
    at once (the window zero-padded to ``NC * L`` tokens; a padded token writes nothing): per chunk
    ``prefix [R, NC, L, L]``, ``norm`` and ``gamma`` (:class:`ChunkTerms`), the factors
    ``exp(G_{t-1}) w_t`` of the carried products and ``exp(G_end - G_u) w_u`` of the chunk's writes
    into the open state, ``[R, NC, L]``, and the chunk's decay ``exp(G_end)``, ``[R, NC]``. What is
    left per chunk, after the walk, is two small products with the open state. ``walk=False``: only
    what the open state needs (a replayed walk reads no terms, :mod:`dla.schedule.replay`).
    ``backend``: how those two products run, ``"torch"`` or ``"triton"`` (default: Triton for float32
    CUDA tensors)."""

    def __init__(self, c: Contributions, L: int, walk: bool = True, backend: str | None = None):
        R, Tm = c.w.shape[0], c.length
        NC = -(-Tm // L)
        k, v, w, g = (to_chunks(x, L).contiguous() for x in (c.k, c.v, c.w, c.g))
        self.L, self.NC, self.Tm = L, NC, Tm
        self.backend = backend or terms_backend(c.k.device, c.k.dtype)
        if walk:
            pair, G, G_prev = pair_products(k, v, w, k, v, w, g)
            # prefix[t, b] = Σ_{u >= b} pair[t, u]: one product with a triangular 0/1 matrix. As a
            # cumulative sum between two flips, CUDA's innermost-axis scan took ~6 of the planner's 17 ms
            # of GPU time at 256 rows x 4K tokens (docs/kernels.md); on a CPU the product is faster too
            # (30 against 59 ms for 4096 chunks of 64 on 2 threads), so both devices take it
            suffix = torch.ones(L, L, dtype=pair.dtype, device=pair.device).tril()  # [u, b]: u >= b
            self.prefix = (pair @ suffix).view(R, NC, L, L)
            if self.backend == "triton":
                from dla.schedule import triton_terms

                self.norm = triton_terms.contribution_norms(k.view(R, NC * L, 1, -1), v.view(R, NC * L, 1, -1),
                                                            w.view(R, NC * L, 1)).view(R, NC, L)
            else:
                self.norm = contribution_norms(k, v, w).view(R, NC, L)
            self.gamma = g.exp().view(R, NC, L)
            self.carry_scale = (G_prev.exp() * w).view(R, NC, L)
        else:
            G = g.cumsum(-1)  # pair_products' G, the same sum
            self.carry_scale = None
        G_end = G[:, -1:]
        self.write_scale = ((G_end - G).exp() * w).view(R, NC, L)
        self.chunk_decay = G_end.exp().view(R, NC)
        self.k, self.v = k.view(R, NC, L, -1), v.view(R, NC, L, -1)

    def carried(self, i: int, open_state) -> torch.Tensor:
        """The products ``⟨s_t, decay(a-1 -> t-1) O_{a-1}⟩`` of chunk ``i``'s tokens with the open state
        before it, ``[R, L]``."""
        if self.backend == "triton":
            from dla.schedule.triton_terms import open_products

            return open_products(self.k[:, i, :, None], self.v[:, i, :, None], open_state, self.carry_scale[:, i])
        return carried_products(self.carry_scale[:, i], self.k[:, i], self.v[:, i], open_state)

    def chunk(self, i: int, carried) -> ChunkTerms:
        """The terms of chunk ``i`` for the walk, given its products with the open state (:meth:`carried`)."""
        n = min(self.L, self.Tm - i * self.L)
        return ChunkTerms(self.prefix[:, i, :n, :n], carried[:, :n], self.norm[:, i, :n], self.gamma[:, i, :n])

    def advance(self, i: int, open_state, open_start, carry: bool = True):
        """The open state after chunk ``i``, given where the open segment starts (window time, ``[R]``):
        the carried state aged through the chunk if it started before the chunk, plus the decayed writes
        of the chunk's tokens from its start on; and with ``carry`` (and a chunk after ``i``) that
        chunk's :meth:`carried`, else ``None``. On CUDA one Triton launch
        (:mod:`dla.schedule.triton_terms`) does both."""
        carry = carry and i + 1 < self.NC
        if self.backend == "triton":
            from dla.schedule.triton_terms import advance

            return advance(self.k, self.v, self.write_scale, self.chunk_decay, self.carry_scale, i, open_state,
                           open_start, carry)
        a = i * self.L
        t = torch.arange(a, a + self.L, device=open_state.device)
        coef = self.write_scale[:, i].masked_fill(t < open_start[:, None], 0.0)
        kept = self.chunk_decay[:, i].masked_fill(open_start >= a, 0.0)
        open_state = kept[:, None, None] * open_state + (self.k[:, i] * coef[..., None]).transpose(1, 2) @ self.v[:, i]
        return open_state, self.carried(i + 1, open_state) if carry else None


def state_score(x, norm, open_norm, gamma, drift: bool, eps: float = 0.0):
    """``I = sqrt(2 - 2 cos)`` from ``x = ⟨s_t, O⟩``, ``norm = ‖s_t‖²``, ``open_norm = ‖O‖²`` (0 where a
    norm vanishes), and ``‖γO + s_t‖²`` (the open state's norm should ``t`` extend it). The Triton
    walker repeats these operations in this order; keep the two in step. ``eps`` (soft gating) keeps
    the square root's gradient finite where ``I = 0``."""
    extended = gamma * gamma * open_norm + 2 * gamma * x + norm
    if drift:
        num, den = gamma * open_norm + x, extended * open_norm
    else:
        num, den = x, norm * open_norm
    vanishes = ~(den > 0)  # (NaN included; masked_fill takes one operation where where takes two, as its backward)
    cos = num / sqrt_rn(den.masked_fill(vanishes, 1.0))
    d = (1 - cos).clamp(0, 2)
    return sqrt_rn((d + d).clamp(min=eps)).masked_fill(vanishes, 0.0), extended.clamp(min=0)


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root (PyTorch's float32 ``sqrt`` on the CPU can be one unit in the
    last place off): through float64, whose square root rounds to the float32 one exactly."""
    return torch.sqrt(x.double()).to(x.dtype) if x.dtype == torch.float32 else torch.sqrt(x)


class TorchWalker:
    """The sequential part of the policy, vectorised over rows (sequence-heads), a Python loop over
    tokens. Slots are kept newest first (slot 0: the open segment), with one spare for the moment
    of overflow; ``origin`` says where each slot's start came from (window time ``>= 0``, or
    ``-(j + 1)`` for carried slot ``j``)."""

    def __init__(self, seg: SegmentState, lengths, threshold, max_segment_len, merge, dtype):
        N, H, C = seg.starts.shape  # the capacity is the slots' count
        R, dev = N * H, seg.starts.device
        self.C, self.merge, self.max_segment_len = C, merge, max_segment_len
        self.threshold = threshold.to(dtype)
        self.length = lengths.repeat_interleave(H)
        self.position = seg.position.long().repeat_interleave(H)
        self.slot_pos = torch.cat([seg.starts.reshape(R, C), torch.full((R, 1), NONE, dtype=torch.long, device=dev)], 1)
        self.slot_info = torch.cat([seg.info.reshape(R, C).to(dtype), torch.zeros(R, 1, dtype=dtype, device=dev)], 1)
        self.origin = torch.cat([-(torch.arange(C, device=dev) + 1).expand(R, C),
                                 torch.full((R, 1), -(C + 1), device=dev)], 1).clone()
        self.count = (self.slot_pos >= 0).sum(1)
        self.open_norm = (torch.zeros(R, dtype=dtype, device=dev) if seg.open_norm is None
                          else seg.open_norm.reshape(R).to(dtype))
        self.death = None
        self.carried = torch.full((R, C + 1), NEVER, dtype=torch.long, device=dev)

    def start(self, Tm: int, trace: Trace):
        R, dev = self.slot_pos.shape[0], self.slot_pos.device
        self.death = torch.full((R, Tm), NONE, dtype=torch.long, device=dev)
        self.trace = trace

    def open_start(self) -> torch.Tensor:
        """Window time at which the open segment starts (negative: before the window), ``[R]``."""
        return torch.where(self.slot_pos[:, 0] >= 0, self.slot_pos[:, 0] - self.position, NONE - self.position)

    def walk(self, a: int, b: int, scores=None, terms: ChunkTerms | None = None, drift: bool = False):
        """Tokens ``[a, b)``: ``scores [R, Tm]`` given, or the state score from ``terms`` (chunk ``a``)."""
        C = self.C
        rows = torch.arange(self.slot_pos.shape[0], device=self.slot_pos.device)
        slot_idx = torch.arange(C + 1, device=rows.device)
        for t in range(a, b):
            active = t < self.length
            pos = self.position + t
            first = active & (self.count == 0)
            open_start = self.slot_pos[:, 0]
            if terms is None:
                score = scores[:, t]
            else:
                i = t - a
                start = open_start - self.position - a  # the open segment's start, chunk time
                before = start < 0
                x = torch.where(before, terms.carry[:, i] + terms.prefix[:, i, 0],
                                terms.prefix[rows, i, start.clamp(min=0)])
                norm, gamma = terms.norm[:, i], terms.gamma[:, i]
                score, extended = state_score(x, norm, self.open_norm, gamma, drift)
                score = torch.where(first, 0.0, score)
                if self.trace.open_start is not None:
                    self.trace.record(t, start + a, self.open_norm)
            wants = score >= self.threshold
            if self.max_segment_len is not None:
                wants = wants | (pos - open_start >= self.max_segment_len)
            birth = active & ~first & wants
            new = first | birth
            if terms is not None:
                self.open_norm = torch.where(new, norm, torch.where(active, extended, self.open_norm))
            self.trace.scores[:, t] = score
            newc = new[:, None]
            self.slot_pos = torch.where(newc, torch.cat([pos[:, None], self.slot_pos[:, :-1]], 1), self.slot_pos)
            info = self.slot_info
            shifted = torch.cat([score[:, None], info[:, :-1]], 1)
            if self.merge == "least_info":  # the earlier variant: a segment's information is its maximum
                grown = torch.maximum(info[:, :1], score[:, None])
            else:
                grown = info[:, :1] + score[:, None]
            grown = torch.cat([grown, info[:, 1:]], 1)
            self.slot_info = torch.where(newc, shifted, torch.where(active[:, None], grown, info))
            self.origin = torch.where(newc, torch.cat([torch.full_like(self.origin[:, :1], t), self.origin[:, :-1]], 1),
                                      self.origin)
            self.count = self.count + new.long()
            self.death[:, t] = torch.where(birth, NEVER, NONE)
            # merging where no row overflows changes nothing: no host read decides whether to
            self._merge(self.count > C, t, slot_idx)

    def _merge(self, over, t, slot_idx):
        """Merge one adjacent closed pair ``(j, j + 1)``, ``j in 1..C-1``, in every overflowing row."""
        C, info, pos = self.C, self.slot_info, self.slot_pos
        pair_info = info[:, 1:C] + info[:, 2:C + 1]
        if self.merge == "density":
            span = pos[:, 0:C - 1] - pos[:, 2:C + 1]  # the pair's tokens: from start j+1 to start j-1
            cost = pair_info / torch.where(span > 0, span, 1).to(info.dtype)
        elif self.merge == "least_info":
            cost = pair_info
        else:  # oldest: every pair costs the same, so the tie rule picks the oldest
            cost = torch.zeros_like(pair_info)
        j = (C - 1 - cost.flip(1).argmin(1))[:, None]  # ties go to the older pair (larger j)
        dying = self.origin.gather(1, j)
        in_window = over[:, None] & (dying >= 0)
        at = dying.clamp(min=0)
        self.death.scatter_(1, at, torch.where(in_window, t, self.death.gather(1, at)))
        c_idx = (-dying - 1).clamp(0, C)
        c_hit = over[:, None] & (dying < 0)
        self.carried.scatter_(1, c_idx, torch.where(c_hit, t, self.carried.gather(1, c_idx)))
        a, b = info.gather(1, j), info.gather(1, j + 1)
        merged = torch.maximum(a, b) if self.merge == "least_info" else a + b
        info_m = info.scatter(1, j + 1, merged)
        src = (slot_idx + (slot_idx >= j).long()).clamp(max=C)
        keep = slot_idx < C
        o = over[:, None]
        self.slot_pos = torch.where(o, torch.where(keep, pos.gather(1, src), NONE), pos)
        self.slot_info = torch.where(o, torch.where(keep, info_m.gather(1, src), 0.0), info)
        self.origin = torch.where(o, torch.where(keep, self.origin.gather(1, src), -(C + 1)), self.origin)
        self.count = self.count - over.long()

    def finish(self, N: int, H: int):
        """``(death [N, H, Tm], carried [N, H, C], starts [N, H, C], info [N, H, C])``, slots newest first."""
        C = self.C
        return (self.death.reshape(N, H, -1), self.carried[:, :C].reshape(N, H, C),
                self.slot_pos[:, :C].reshape(N, H, C), self.slot_info[:, :C].reshape(N, H, C))


@dataclass
class Trace:
    """What the planner saw at every token, ``[R, Tm]``: the score ``I_t`` it used, and for the state
    scores the open segment's start before ``t`` (window time) and ``‖O_{t-1}‖²``; ``open_states``
    ``[R, NC, K, V]``: the open state at every chunk start. Soft gating recomputes ``I_t`` from these
    with gradients (:func:`dla.schedule.soft_gate.differentiable_scores`); inspection shows them."""

    scores: torch.Tensor
    open_start: torch.Tensor | None = None
    open_norm: torch.Tensor | None = None
    open_states: torch.Tensor | None = None
    chunk: int = PLAN_CHUNK

    def record(self, t, open_start, open_norm):
        self.open_start[:, t] = open_start
        self.open_norm[:, t] = open_norm


def plan_dynamic(seg: SegmentState, lengths, threshold: torch.Tensor, max_segment_len, merge: str,
                 score: str, backend: str, scores=None, contributions: Contributions | None = None,
                 keep_trace: bool = False):
    """Walk every row; ``scores [N, H, Tm]`` (given scores) or ``contributions`` (state scores).
    Returns ``(death, carried, final SegmentState, trace)``; the trace always holds the scores used,
    and with ``keep_trace`` (soft gating) what the state scores need to be recomputed."""
    N, H, _ = seg.starts.shape
    state = score in STATE_SCORES
    Tm = contributions.length if state else scores.shape[-1]
    dtype = (contributions.k.dtype if state else scores.dtype)
    if backend == "triton":
        from dla.schedule.triton_scan import TritonWalker as Walker
        dtype = torch.float32
    else:
        Walker = TorchWalker
    # under activation checkpointing the recomputed forward replays the first pass's walk (dla.schedule.replay)
    walker = planning_walker(Walker, seg, lengths, threshold.repeat(N), max_segment_len, merge, dtype)
    R, dev = N * H, seg.starts.device
    trace = Trace(scores=torch.zeros(R, Tm, dtype=dtype, device=dev))
    keep_trace = keep_trace and state
    if keep_trace:
        trace.open_start = torch.full((R, Tm), NONE, dtype=torch.long, device=dev)
        trace.open_norm = torch.zeros(R, Tm, dtype=dtype, device=dev)
    walker.start(Tm, trace)
    open_state = None
    if not state:
        walker.walk(0, Tm, scores=scores.reshape(R, Tm).to(dtype))
    else:
        c = Contributions(*(x.to(dtype) for x in (contributions.k, contributions.v, contributions.w,
                                                    contributions.g)), Tm)
        K, V = c.k.shape[-1], c.v.shape[-1]
        open_state = (torch.zeros(R, K, V, dtype=dtype, device=dev) if seg.open_state is None
                      else seg.open_state.reshape(R, K, V).to(dtype))
        starts, open_states = [], None
        if Tm:
            decides = not isinstance(walker, ReplayingWalker)  # a replayed walk reads no terms
            window = WindowTerms(c, min(PLAN_CHUNK, Tm), walk=decides)
            if decides and window.backend == "triton" and getattr(walker, "walks_windows", False):
                open_state, open_states, _ = walker.walk_window(window, open_state, score == "state_drift", keep_trace)
            else:
                carried = window.carried(0, open_state) if decides else None
                for i in range(window.NC):
                    a = i * window.L
                    if keep_trace:
                        starts.append(open_state)
                    walker.walk(a, min(a + window.L, Tm), terms=window.chunk(i, carried) if decides else None,
                                drift=score == "state_drift")
                    open_state, carried = window.advance(i, open_state, walker.open_start(), carry=decides)
        if keep_trace:
            if open_states is None:
                open_states = torch.stack(starts, 1) if starts else c.k.new_zeros(R, 0, K, V)
            trace.open_states = open_states
            trace.chunk = window.L if Tm else PLAN_CHUNK
    death, carried, final_starts, final_info = walker.finish(N, H)
    final = SegmentState(final_starts, final_info, seg.position.long() + lengths,
                         open_state=None if open_state is None else open_state.reshape(N, H, *open_state.shape[1:]),
                         open_norm=None if not state else walker.open_norm.reshape(N, H))
    return death, carried, final, trace
