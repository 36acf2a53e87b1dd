"""The schedule: one ``death`` integer per token, sequence and head (spec §3).

``death[b, h, p]`` is the time at which the segment boundary born at position ``p`` dies
(its two segments merge), ``-1`` if ``p`` is not a boundary, and any value ``>= T`` if it never
dies. Policies fill it (``dla.schedule.policies``); every op consumes it and never knows which
policy made it. Everything else -- live boundaries, ranks, labels, segment extents -- is derived
here.

Internally the ops work on a :class:`DenseSchedule`: one row per sequence, positions counted
from the start of the window, and a single sentinel :data:`NEVER` for "never dies". A *window*
is the stretch of tokens an op call sees; when it continues an earlier call (``initial_state``)
the segments alive before the window are *carried*, each with the window time at which its
start boundary dies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dla.varlen import check_cu_seqlens, host_offsets, max_seq_length, seq_lengths, unpack_heads

NONE = -1
NEVER = 2**62  # dense sentinel for "never dies" (public schedules use any value >= T)
LABEL_RULES = ("recency", "level")


def bit_length(x: torch.Tensor) -> torch.Tensor:
    """Python's ``int.bit_length`` for non-negative integer tensors (exact below 2**53)."""
    _, exponent = torch.frexp(x.to(torch.float64))
    return torch.where(x > 0, exponent.long(), torch.zeros_like(x))



def slot_labels(starts: torch.Tensor, filled: torch.Tensor, end, label_rule: str) -> torch.Tensor:
    """The λ label of every slot (newest first, ``[..., C]``; 0 for empty ones): its recency rank,
    or for level labels 0 for the open segment and ``bit_length(size)`` for a closed one. ``end``:
    the position after the newest token, in the coordinates of ``starts`` (an int, or a tensor that
    broadcasts against ``starts[..., :1]``)."""
    j = torch.arange(starts.shape[-1], device=starts.device)
    if label_rule == "recency":
        return torch.where(filled, j, 0)
    end = torch.full_like(starts[..., :1], end) if isinstance(end, int) else end.expand_as(starts[..., :1])
    size = (torch.cat([end, starts[..., :-1]], -1) - starts).clamp(min=1)  # to the next newer start
    return torch.where((j == 0) | ~filled, 0, bit_length(size))

@dataclass
class SegmentState:
    """The segmentation after a window: what a policy needs to continue, and what an op's
    final state reports next to the segment states.

    ``starts[n, h, j]``: absolute position (from the sequence start) of the first token of the
    segment in slot ``j``; slots are ordered newest first (slot 0 is the open segment), ``-1``
    marks an empty slot. ``info``: each segment's information ``Ī(B)`` (tracked by the ``dynamic``
    policy; zeros otherwise). ``position[n]``: tokens seen so far. For the ``dynamic`` policy's
    state scores, ``open_state [N, H, K, V]`` is the open state ``O`` and ``open_norm [N, H]`` its
    squared norm as the policy tracks it (spec §3); ``None`` otherwise. Segment lengths follow
    from the starts (:attr:`lengths`).
    """

    starts: torch.Tensor
    info: torch.Tensor
    position: torch.Tensor
    open_state: torch.Tensor | None = None
    open_norm: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.starts.shape[-1]

    @property
    def count(self) -> torch.Tensor:
        """Number of segments, ``[N, H]``."""
        return (self.starts >= 0).sum(-1)

    @property
    def open_length(self) -> torch.Tensor:
        """Tokens in the open segment, ``[N, H]`` (0 before the first token)."""
        return self.lengths[..., 0]

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens in every segment, ``[N, H, C]`` (0 for empty slots)."""
        newer = torch.cat([self.position[:, None, None].expand_as(self.starts[..., :1]), self.starts[..., :-1]], -1)
        return torch.where(self.starts >= 0, newer - self.starts, torch.zeros_like(self.starts))

    @classmethod
    def empty(cls, num_seqs: int, heads: int, capacity: int, device=None) -> SegmentState:
        return cls(
            starts=torch.full((num_seqs, heads, capacity), NONE, dtype=torch.long, device=device),
            info=torch.zeros(num_seqs, heads, capacity, device=device),
            position=torch.zeros(num_seqs, dtype=torch.long, device=device),
        )

    def _map(self, fn) -> SegmentState:
        optional = [None if x is None else fn(x) for x in (self.open_state, self.open_norm)]
        return SegmentState(fn(self.starts), fn(self.info), fn(self.position), *optional)

    def to(self, device) -> SegmentState:
        return self._map(lambda x: x.to(device))

    def index_select(self, index: torch.Tensor) -> SegmentState:
        """The sequences ``index`` (reordered, repeated): beam search and batch expansion."""
        return self._map(lambda x: x[index])


@dataclass
class DenseSchedule:
    """A schedule as dense rows; what the ops consume.

    ``start_death[n, h, t]``: for window token ``t``, ``-1`` if it does not start a segment,
    else the window time at which it stops starting one (``NEVER`` for a sequence start).
    ``carried_pos``/``carried_death``: the segments alive before the window, slot order (newest
    first), positions in window coordinates (negative, so ``-1`` is a real position: a slot is
    empty exactly when its death is ``-1``).
    """

    start_death: torch.Tensor  # [N, H, Tm]
    lengths: torch.Tensor  # [N]
    position: torch.Tensor  # [N] absolute position of window token 0
    carried_pos: torch.Tensor  # [N, H, C]
    carried_death: torch.Tensor  # [N, H, C]
    capacity: int
    label_rule: str

    @property
    def max_len(self) -> int:
        return self.start_death.shape[-1]


@dataclass
class Schedule:
    """Segment births, merges and labels for a batch: ``death: LongTensor[B, H, T]``.

    With ``cu_seqlens`` (``B == 1``) the schedule restarts at every sequence start and death
    times are packed token indices. ``initial``/``carried_death`` describe the segments carried
    into this window when it continues an earlier one (set by :func:`dla.plan_schedule` with
    ``initial_state``); ``final`` is the segmentation after the window (set by the planner, or
    derived from ``death``). ``scores [B, H, T]``: the information scores the ``dynamic`` policy
    used (``None`` for the others); ``trace``: what its walk saw (``plan_schedule(keep_trace=True)``,
    see :class:`dla.schedule.dynamic.Trace`). Construction validates everything and raises ``ValueError`` with the
    offending position and time; ``validate=False`` skips those checks (each one synchronises a
    GPU with the host), for schedules made by :func:`dla.plan_schedule`, whose output the tests
    hold to the same checks.
    """

    death: torch.Tensor
    capacity: int
    label_rule: str = "recency"
    cu_seqlens: torch.Tensor | None = None
    initial: SegmentState | None = None
    carried_death: torch.Tensor | None = None
    final: SegmentState | None = field(default=None, repr=False)
    validate: bool = field(default=True, repr=False)
    scores: torch.Tensor | None = field(default=None, repr=False)
    trace: object | None = field(default=None, repr=False)

    def __post_init__(self):
        self._dense = _validate(self) if self.validate else _to_dense(self)
        if self.final is None:
            dense = self.dense()
            starts = _final_starts(dense)
            self.final = SegmentState(
                starts=starts,
                info=torch.zeros(starts.shape, device=starts.device),
                position=dense.position + dense.lengths,
            )

    # ----------------------------------------------------------------------------- shapes
    @property
    def batch(self) -> int:
        return self.death.shape[0]

    @property
    def heads(self) -> int:
        return self.death.shape[1]

    @property
    def length(self) -> int:
        return self.death.shape[2]

    @property
    def num_seqs(self) -> int:
        return self.batch if self.cu_seqlens is None else self.cu_seqlens.numel() - 1

    @property
    def n_labels(self) -> int:
        """How many λ labels the schedule can address (``lam``'s last dimension must be >= this)."""
        if self.label_rule == "recency" or self.capacity == 1:
            return self.capacity
        dense = self.dense()
        last = (dense.position + dense.lengths - 1).clamp(min=0)
        return int(bit_length(last).max()) + 1 if last.numel() else 1

    # ----------------------------------------------------------------------------- views
    def dense(self) -> DenseSchedule:
        if self._dense is None:
            self._dense = _to_dense(self)
        return self._dense

    def live_at(self, t: int) -> torch.Tensor:
        """``[B, H, T]`` bool: boundaries live at (packed) time ``t``: ``p <= t < death[p]``."""
        p = torch.arange(self.length, device=self.death.device)
        return (self.death != NONE) & (p <= t) & (self.death > t)

    def pairwise(self) -> dict[str, torch.Tensor]:
        """O(T^2) derived quantities, ``[B, H, T, T]`` indexed ``[t, s]`` (packed coordinates):
        ``rank`` (0 = open segment), ``label``, and the ``start``/``end`` positions (inclusive) of
        the segment that holds ``s`` at time ``t``. Entries with ``s > t`` or ``s`` in another
        sequence are ``-1``. For references, tests and inspection, not for long sequences."""
        dense = self.dense()
        rows = pairwise_structure(dense)
        if self.cu_seqlens is None:
            return rows
        out = {}
        cu = host_offsets(self.cu_seqlens)
        for name, x in rows.items():
            full = x.new_full((1, self.heads, self.length, self.length), NONE)
            for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
                block = x[n, :, : b - a, : b - a]
                if name in ("start", "end"):
                    block = torch.where(block >= 0, block + a, block)
                full[0, :, a:b, a:b] = block
            out[name] = full
        return out


# ----------------------------------------------------------------------------- validation
def _fail(msg: str):
    raise ValueError(f"invalid schedule: {msg}")


def _validate(s: Schedule) -> DenseSchedule:
    if not isinstance(s.death, torch.Tensor) or s.death.dtype != torch.long:
        raise TypeError("schedule.death must be a torch.LongTensor [B, H, T]")
    if s.death.dim() != 3:
        raise ValueError(f"schedule.death must have shape [B, H, T], got {tuple(s.death.shape)}")
    if isinstance(s.capacity, bool) or not isinstance(s.capacity, int):
        raise TypeError(f"capacity must be an int, got {type(s.capacity).__name__}")
    if s.capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {s.capacity}")
    if s.label_rule not in LABEL_RULES:
        raise ValueError(f"label_rule must be one of {LABEL_RULES}, got {s.label_rule!r}")
    B, H, T = s.death.shape
    check_cu_seqlens(s.cu_seqlens, B, T, s.death.device)
    if (s.initial is None) != (s.carried_death is None):
        raise ValueError("schedule.initial and schedule.carried_death must be given together")
    n = B if s.cu_seqlens is None else s.cu_seqlens.numel() - 1
    if s.initial is not None:
        if s.initial.starts.shape != (n, H, s.capacity):
            raise ValueError(
                f"schedule.initial.starts must be [{n}, {H}, {s.capacity}], got {tuple(s.initial.starts.shape)}")
        if s.carried_death.shape != (n, H, s.capacity):
            raise ValueError(
                f"schedule.carried_death must be [{n}, {H}, {s.capacity}], got {tuple(s.carried_death.shape)}")
        carried = s.initial.starts > 0
        if (carried & (s.carried_death < 0)).any():
            _fail("a carried segment boundary (schedule.initial.starts > 0) has no death time in carried_death")
    d = s.death
    p = torch.arange(T, device=d.device)
    bad = (d != NONE) & (d <= p)
    if bad.any():
        b, h, t = bad.nonzero()[0].tolist()
        _fail(f"death[{b}, {h}, {t}] = {int(d[b, h, t])} must be -1 (no boundary) or > its birth {t}")
    if s.cu_seqlens is not None:
        cu = s.cu_seqlens.long()
        seq_end = cu[1:][torch.searchsorted(cu[1:], p, right=True)]
        bad = (d > p) & (d >= seq_end) & (d < T)
        if bad.any():
            b, h, t = bad.nonzero()[0].tolist()
            _fail(f"death[{b}, {h}, {t}] = {int(d[b, h, t])} lies in a later sequence; use a value >= T for never")
    # position 0 of a sequence starts its first segment and is never a boundary
    if s.cu_seqlens is None:
        rows, cols = torch.arange(B, device=d.device), torch.zeros(B, dtype=torch.long, device=d.device)
        lengths = torch.full((B,), T, dtype=torch.long, device=d.device)
    else:
        cols = s.cu_seqlens[:-1].long()
        rows, lengths = torch.zeros_like(cols), seq_lengths(s.cu_seqlens)
    position = torch.zeros_like(lengths) if s.initial is None else s.initial.position.to(d.device)
    if T:
        first = d[rows, :, cols.clamp(max=T - 1)]
        bad = ((position == 0) & (lengths > 0))[:, None] & (first != NONE)
        if bad.any():
            i, h = bad.nonzero()[0].tolist()
            _fail(f"position 0 of sequence {i} (token {int(cols[i])}, head {h}) is marked as a boundary; "
                  "a sequence start never is")
    dense = _to_dense(s)
    # capacity: live boundaries (sequence starts excluded) <= capacity - 1 at every time
    live = live_boundary_count(dense)
    valid = torch.arange(dense.max_len, device=d.device) < dense.lengths[:, None, None]
    over = (live > s.capacity - 1) & valid
    if over.any():
        i, h, t = over.nonzero()[0].tolist()
        _fail(f"capacity {s.capacity} exceeded at time {t} of sequence {i}, head {h}: "
              f"{int(live[i, h, t])} live boundaries, at most {s.capacity - 1} allowed")
    return dense


def live_boundary_count(dense: DenseSchedule) -> torch.Tensor:
    """``[N, H, Tm]``: number of live boundaries (sequence starts excluded) at every window time."""
    sd = dense.start_death
    N, H, Tm = sd.shape
    # a sequence start is marked NEVER at window time 0 and is no boundary
    births = (sd != NONE) & ~((sd == NEVER) & (dense.position[:, None, None] + torch.arange(Tm, device=sd.device) == 0))
    # one spare column collects deaths at or after the window's end
    delta = F.pad(births.long(), (0, 1))
    delta = delta.scatter_add(-1, torch.where(births, sd, Tm).clamp(max=Tm), -births.long())
    carried = (dense.carried_death != NONE) & (dense.carried_pos + dense.position[:, None, None] > 0)
    delta = delta.scatter_add(-1, torch.where(carried, dense.carried_death, Tm).clamp(max=Tm), -carried.long())
    return (delta.cumsum(-1) + carried.sum(-1, keepdim=True))[..., :Tm]


# ----------------------------------------------------------------------------- dense view
def _to_dense(s: Schedule) -> DenseSchedule:
    d = s.death
    B, H, T = d.shape
    device = d.device
    if s.cu_seqlens is None:
        rows = d
        lengths = torch.full((B,), T, dtype=torch.long, device=device)
    else:
        cu = s.cu_seqlens.long()
        lengths = seq_lengths(s.cu_seqlens)
        rows = unpack_heads(d, s.cu_seqlens, max_seq_length(s.cu_seqlens), NONE)
        # packed death times -> times within the sequence (padding is NONE, so it stays)
        rows = torch.where(rows >= 0, rows - cu[:-1, None, None], rows)
    Tm = rows.shape[-1]
    rows = rows.masked_fill(rows >= lengths[:, None, None], NEVER)  # (a new tensor: the dense schedule's own)
    N = rows.shape[0]
    if s.initial is None:
        position = torch.zeros(N, dtype=torch.long, device=device)
        carried_pos = torch.full((N, H, s.capacity), NONE, dtype=torch.long, device=device)
        carried_death = carried_pos.clone()
    else:
        position = s.initial.position.to(device).long()
        starts = s.initial.starts.to(device)
        carried_pos = torch.where(starts >= 0, starts - position[:, None, None], torch.full_like(starts, NONE))
        cd = s.carried_death.to(device).long()
        carried_death = torch.where(starts < 0, torch.full_like(cd, NONE),
                                    torch.where((cd >= lengths[:, None, None]) | (starts == 0),
                                                torch.full_like(cd, NEVER), cd))
    if Tm:
        at_start = (position == 0) & (lengths > 0)
        rows[:, :, 0].masked_fill_(at_start[:, None], NEVER)
    return DenseSchedule(rows, lengths, position, carried_pos, carried_death, s.capacity, s.label_rule)


# ----------------------------------------------------------------------------- derived quantities
def count_after(mask: torch.Tensor) -> torch.Tensor:
    """``[..., M]`` (long): the number of true entries strictly after each position of the last axis.

    On a GPU this is one product with a strictly lower-triangular 0/1 matrix rather than a
    cumulative sum over the innermost axis, which is an order of magnitude faster there
    (``docs/kernels.md`` has the timing). It is exact because the operands are 0/1, the products
    accumulate in fp32, and fp16 holds every count up to 2048. Longer rows, and the CPU (where
    the scan is cheap and an [M, M] product per row is not), keep the cumulative sum."""
    M = mask.shape[-1]
    if not mask.is_cuda or M > 2048:
        return mask.sum(-1, keepdim=True) - mask.cumsum(-1)
    later = torch.ones(M, M, dtype=torch.float16, device=mask.device).tril(-1)  # later[m', m] = [m' > m]
    return (mask.to(torch.float16) @ later).long()


def segment_structure(live: torch.Tensor, pos: torch.Tensor, exists: torch.Tensor, t: torch.Tensor,
                      label_rule: str, extents: bool = False) -> dict[str, torch.Tensor]:
    """Rank and label of *units* at query times; the one place labels are computed.

    A unit is a run of tokens whose first token is a segment-start candidate: a single token, or
    a segment carried into the window. Units are in chronological order along the last axis.
    ``live[..., i, m]``: unit m's first token starts a segment at query time ``t[..., i]``;
    ``pos[..., m]``: position of that token; ``exists[..., i, m]``: the unit holds tokens at or
    before ``t``. Returns ``rank`` and ``label`` ``[..., I, M]`` (0 where the unit does not
    exist) and, with ``extents`` or the level rule, the ``start`` position and exclusive ``end``
    of the segment holding the unit:

    - rank = live starts strictly after the unit (0 = the open segment);
    - recency label = rank; level label = 0 for the open segment, else bit_length of the size
      of the closed segment that holds the unit.
    """
    live = live & exists
    zero = torch.zeros((), dtype=torch.long, device=live.device)
    after = count_after(live)  # live starts strictly after each unit
    out = {"rank": torch.where(exists, after, zero)}
    if label_rule == "recency" and not extents:
        out["label"] = out["rank"]
        return out
    M = live.shape[-1]
    idx = torch.arange(M, device=live.device)
    pos_b = pos.unsqueeze(-2).expand(live.shape)
    start_idx = torch.where(live, idx, -1).cummax(-1).values
    nxt = torch.where(live, idx, M).flip(-1).cummin(-1).values.flip(-1)
    next_after = torch.cat([nxt[..., 1:], torch.full_like(nxt[..., :1], M)], -1)
    out["start"] = pos_b.gather(-1, start_idx.clamp(min=0))
    out["end"] = torch.where(next_after < M, pos_b.gather(-1, next_after.clamp(max=M - 1)), t.unsqueeze(-1) + 1)
    if label_rule == "recency":
        out["label"] = out["rank"]
    else:
        level = bit_length((out["end"] - out["start"]).clamp(min=1))
        out["label"] = torch.where(exists & (out["rank"] > 0), level, zero)
    return out


def pairwise_structure(dense: DenseSchedule) -> dict[str, torch.Tensor]:
    """Rank, label and segment extent (``start``/``end`` inclusive) for every (t, s) pair of a
    window without carried segments, ``[N, H, Tm, Tm]``, ``-1`` where ``s > t`` or beyond the
    sequence."""
    sd = dense.start_death
    N, H, Tm = sd.shape
    t = torch.arange(Tm, device=sd.device)
    tq = t[:, None]
    live = (sd[..., None, :] != NONE) & (t <= tq) & (sd[..., None, :] > tq)
    valid = ((t <= tq) & (tq < dense.lengths[:, None, None, None])).expand(N, H, Tm, Tm)
    s = segment_structure(live, t.expand(N, H, Tm), valid, t.expand(N, H, Tm), dense.label_rule, extents=True)
    s["end"] = s["end"] - 1
    return {k: torch.where(valid, v, NONE) for k, v in s.items()}


def advance_slots(slot_pos, slot_death, tok_pos, tok_death, t_end, capacity: int):
    """Segments alive at time ``t_end`` given the slots alive before a stretch of tokens and the
    tokens' start deaths: returns ``(pos, death)`` ``[..., capacity]``, newest first; empty
    slots have death ``-1``. ``t_end`` broadcasts over the leading dims."""
    pos = torch.cat([slot_pos, tok_pos.expand(slot_pos.shape[:-1] + tok_pos.shape[-1:])], -1)
    death = torch.cat([slot_death, tok_death], -1)
    te = t_end.unsqueeze(-1)
    live = (death != NONE) & (death > te) & (pos <= te)
    key = torch.where(live, pos, torch.full_like(pos, -(2**62)))
    k = min(capacity, key.shape[-1])
    top, idx = key.topk(k, dim=-1, sorted=True)
    keep = top > -(2**62)
    new_pos = torch.where(keep, pos.gather(-1, idx), torch.full_like(top, NONE))
    new_death = torch.where(keep, death.gather(-1, idx), torch.full_like(top, NONE))
    if k < capacity:
        pad = new_pos.new_full(new_pos.shape[:-1] + (capacity - k,), NONE)
        new_pos, new_death = torch.cat([new_pos, pad], -1), torch.cat([new_death, pad], -1)
    return new_pos, new_death


def _final_starts(dense: DenseSchedule) -> torch.Tensor:
    """Absolute start positions of the segments alive after the window, newest first."""
    N, H, Tm = dense.start_death.shape
    tok_pos = torch.arange(Tm, device=dense.start_death.device)
    t_end = (dense.lengths - 1)[:, None].expand(N, H)
    pos, death = advance_slots(dense.carried_pos, dense.carried_death, tok_pos, dense.start_death, t_end,
                               dense.capacity)
    return torch.where(death != NONE, pos + dense.position[:, None, None], NONE)
