"""Policies: how segments are born and merged (spec §3). Each one fills a ``death`` tensor.

- ``single``: no boundaries, the base model.
- ``fixed``: a boundary every ``period`` positions; on overflow the two oldest segments merge.
- ``fenwick``: Log-Linear Attention's partition: every token is a boundary and the boundary born
  at position ``p`` dies at ``p + lowbit(p)`` (binary-counter carries), level labels.
- ``dynamic``: DLA. A boundary where the token score reaches ``threshold`` (or the open segment
  reaches ``max_segment_len``); on overflow the adjacent pair of closed segments with the
  smallest summed information merges, ties to the older pair (``merge="least_info"``, the spec);
  ``merge="oldest"`` (an ablation) merges the two oldest closed segments instead.

``single``, ``fixed`` and ``fenwick`` are closed forms of absolute positions; ``dynamic`` is a
scan over time, vectorised over sequences and heads, O(T * C) per sequence-head. All of them
continue from a :class:`SegmentState` (``initial_state``), which is how decoding advances the
schedule one token at a time.
"""

from __future__ import annotations

import torch

from dla.schedule.schedule import NEVER, NONE, Schedule, SegmentState
from dla.varlen import check_cu_seqlens, seq_lengths, unpack

POLICIES = ("single", "fixed", "fenwick", "dynamic")
MERGE_RULES = ("least_info", "oldest")
DEFAULT_CAPACITY = 16


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def plan_schedule(policy: str, *, batch: int, heads: int, length: int, capacity: int | None = None,
                  scores: torch.Tensor | None = None, threshold: float = 0.5, period: int | None = None,
                  max_segment_len: int | None = None, cu_seqlens: torch.Tensor | None = None,
                  label_rule: str | None = None, initial_state=None, device=None,
                  backend: str | None = None, merge: str = "least_info") -> Schedule:
    """Plan a :class:`Schedule` for ``[batch, heads, length]`` tokens.

    ``scores``: ``[B, T, H]`` token information in [0, 1] (``dynamic`` only; e.g.
    :func:`dla.novelty_scores`). ``capacity`` defaults to 16 (``fenwick``: ceil(log2 T) + 1,
    ``single``: 1); capacity 1 makes every policy ``single``. ``label_rule`` defaults to
    ``level`` for ``fenwick`` and ``recency`` otherwise. ``initial_state`` (a
    :class:`SegmentState` or :class:`dla.DLAState`) continues an earlier window of each sequence;
    the result then carries the death times of the continued segments' boundaries.
    ``device``: where the schedule lives (default: that of ``scores``, else of ``cu_seqlens``,
    else CPU; it must be the device of the op's inputs). ``backend``: ``"torch"`` or
    ``"triton"`` for the ``dynamic`` scan (default: Triton on CUDA
    tensors, PyTorch elsewhere); both give identical schedules. ``merge`` (``dynamic`` only): which
    adjacent closed pair merges on overflow, ``least_info`` (the spec) or ``oldest`` (an ablation).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    if merge not in MERGE_RULES:
        raise ValueError(f"merge must be one of {MERGE_RULES}, got {merge!r}")
    for name, value in (("batch", batch), ("heads", heads)):
        _check_int(name, value, 1)
    _check_int("length", length, 0)
    if capacity is not None:
        _check_int("capacity", capacity, 1)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if max_segment_len is not None:
        _check_int("max_segment_len", max_segment_len, 1)
    if label_rule is None:
        label_rule = "level" if policy == "fenwick" else "recency"
    if device is None:
        device = scores.device if scores is not None else (cu_seqlens.device if cu_seqlens is not None else "cpu")
    check_cu_seqlens(cu_seqlens, batch, length, device)
    if cu_seqlens is None:
        lengths = torch.full((batch,), length, dtype=torch.long, device=device)
    else:
        lengths = seq_lengths(cu_seqlens.to(device))
    num_seqs = lengths.numel()
    max_len = length if cu_seqlens is None else (int(lengths.max()) if num_seqs else 0)  # no sync if known

    seg = getattr(initial_state, "segments", initial_state)
    if seg is not None:
        if not isinstance(seg, SegmentState):
            raise TypeError("initial_state must be a SegmentState or a DLAState")
        if seg.starts.shape[:2] != (num_seqs, heads):
            raise ValueError(f"initial_state holds [{tuple(seg.starts.shape[:2])}] sequences x heads, "
                             f"expected [{num_seqs}, {heads}]")
        if capacity is not None and capacity != seg.capacity:
            raise ValueError(f"capacity {capacity} differs from initial_state's capacity {seg.capacity}")
        capacity = seg.capacity
        seg = seg.to(device)
        position = seg.position.long()
    else:
        position = torch.zeros(num_seqs, dtype=torch.long, device=device)

    if policy == "fenwick":
        last = int((position + lengths - 1).clamp(min=0).max()) if num_seqs else 0
        needed = last.bit_length() + 1
        if capacity is None:
            capacity = needed
        elif capacity != 1 and capacity < needed:
            raise ValueError(f"fenwick needs capacity >= {needed} for positions up to {last}, got {capacity}")
    elif capacity is None:
        capacity = 1 if policy == "single" else DEFAULT_CAPACITY
    if policy == "fixed":
        if period is None:
            raise ValueError("the fixed policy needs period")
        _check_int("period", period, 1)
    if seg is None:
        seg = SegmentState.empty(num_seqs, heads, capacity, device)
        seg.position = position

    rows_scores = None
    if policy == "dynamic":
        if scores is None:
            raise ValueError("the dynamic policy needs scores [B, T, H], e.g. dla.novelty_scores(k)")
        if not isinstance(scores, torch.Tensor) or scores.shape != (batch, length, heads):
            raise ValueError(f"scores must be [B, T, H] = [{batch}, {length}, {heads}], "
                             f"got {tuple(getattr(scores, 'shape', ()))}")
        if not bool(((scores >= 0) & (scores <= 1)).all()):  # one sync; NaN and Inf fail it too
            raise ValueError("scores must be finite and in [0, 1]")
        rows_scores = scores if cu_seqlens is None else unpack(scores, cu_seqlens, max_len)
        rows_scores = rows_scores.transpose(1, 2).to(device)  # [N, H, Tm]

    t = torch.arange(max_len, device=device)
    pos = position[:, None, None] + t  # [N, 1, Tm] absolute positions
    in_seq = t < lengths[:, None, None]
    starts = seg.starts
    final = None
    if capacity == 1 or policy == "single":
        death = torch.full((num_seqs, heads, max_len), NONE, dtype=torch.long, device=device)
        carried = torch.full_like(starts, NEVER)
    elif policy == "fenwick":
        death, carried = _closed_form(pos, in_seq, starts, position, pos >= 1, lambda p: p + (p & -p), heads)
    elif policy == "fixed":
        death, carried = _closed_form(pos, in_seq, starts, position, (pos >= 1) & (pos % period == 0),
                                      lambda p: p + (capacity - 1) * period, heads)
    else:
        if backend is None:
            backend = "triton" if rows_scores.is_cuda else "torch"
        if backend == "triton":
            from dla.schedule.triton_scan import dynamic_scan as scan
        else:
            scan = _dynamic
        death, carried, final = scan(rows_scores, lengths, seg, capacity, threshold, max_segment_len, merge)
    if initial_state is not None and ((starts > 0) & (carried < 0)).any():
        raise ValueError("initial_state's segments are inconsistent with the policy: a boundary would have died "
                         "before this window")
    carried = torch.where(starts > 0, carried, torch.full_like(carried, NONE))
    public = _to_public(death, lengths, cu_seqlens, length)
    return Schedule(public, capacity, label_rule, cu_seqlens=cu_seqlens, validate=False,
                    initial=None if initial_state is None else seg,
                    carried_death=None if initial_state is None else carried, final=final)


def _closed_form(pos, in_seq, starts, position, is_boundary, death_of, heads):
    """Deaths as a pure function of absolute positions: window tokens and carried boundaries."""
    born = is_boundary & in_seq
    death = torch.where(born, death_of(pos) - position[:, None, None], torch.full_like(pos, NONE))
    carried = death_of(starts) - position[:, None, None]
    return death.expand(-1, heads, -1).clone(), carried


def _dynamic(scores, lengths, seg: SegmentState, capacity: int, threshold: float, max_segment_len, merge):
    """The DLA scan. Slots are kept newest first with one spare for the moment of overflow."""
    N, H, Tm = scores.shape
    R, C = N * H, capacity
    device = scores.device
    u_all = scores.reshape(R, Tm)
    length = lengths.repeat_interleave(H)
    position = seg.position.long().repeat_interleave(H)
    slot_pos = torch.cat([seg.starts.reshape(R, C), torch.full((R, 1), NONE, dtype=torch.long, device=device)], 1)
    slot_info = torch.cat([seg.info.reshape(R, C).to(scores.dtype), scores.new_zeros(R, 1)], 1)
    # origin of each slot's start: window index (>= 0), or -(j + 1) for carried slot j
    origin = torch.cat([-(torch.arange(C, device=device) + 1).expand(R, C),
                        torch.full((R, 1), -(C + 1), device=device)], 1).clone()
    count = (slot_pos >= 0).sum(1)
    death = torch.full((R, Tm), NONE, dtype=torch.long, device=device)
    carried = torch.full((R, C + 1), NEVER, dtype=torch.long, device=device)
    slot_idx = torch.arange(C + 1, device=device)
    for t in range(Tm):
        active = t < length
        pos = position + t
        u = u_all[:, t]
        first = active & (count == 0)
        open_len = pos - slot_pos[:, 0]
        wants = u >= threshold
        if max_segment_len is not None:
            wants = wants | (open_len >= max_segment_len)
        birth = active & ~first & wants
        new = (first | birth)[:, None]
        slot_pos = torch.where(new, torch.cat([pos[:, None], slot_pos[:, :-1]], 1), slot_pos)
        shifted_info = torch.cat([u[:, None], slot_info[:, :-1]], 1)
        grown_info = torch.cat([torch.maximum(slot_info[:, :1], u[:, None]), slot_info[:, 1:]], 1)
        slot_info = torch.where(new, shifted_info, torch.where(active[:, None], grown_info, slot_info))
        origin = torch.where(new, torch.cat([torch.full_like(origin[:, :1], t), origin[:, :-1]], 1), origin)
        count = count + new[:, 0].long()
        death[:, t] = torch.where(birth, NEVER, NONE)
        # overflow: merge the adjacent closed pair (j, j+1), j in 1..C-1, of least summed information
        over = count > C
        cost = slot_info[:, 1:C] + slot_info[:, 2:C + 1]
        if merge == "oldest":  # every pair costs the same, so the tie rule picks the oldest
            cost = torch.zeros_like(cost)
        j = (C - 1 - cost.flip(1).argmin(1))[:, None]  # ties go to the older pair (larger j)
        dying = origin.gather(1, j)
        in_window = over[:, None] & (dying >= 0)
        death.scatter_(1, dying.clamp(min=0), torch.where(in_window, t, death.gather(1, dying.clamp(min=0))))
        c_idx = (-dying - 1).clamp(0, C)
        c_hit = over[:, None] & (dying < 0)
        carried.scatter_(1, c_idx, torch.where(c_hit, t, carried.gather(1, c_idx)))
        merged_info = torch.maximum(slot_info.gather(1, j), slot_info.gather(1, j + 1))
        info_m = slot_info.scatter(1, j + 1, merged_info)
        src = (slot_idx + (slot_idx >= j).long()).clamp(max=C)
        keep_last = slot_idx < C
        pos_m = torch.where(keep_last, slot_pos.gather(1, src), NONE)
        info_m = torch.where(keep_last, info_m.gather(1, src), 0.0)
        origin_m = torch.where(keep_last, origin.gather(1, src), -(C + 1))
        o = over[:, None]
        slot_pos = torch.where(o, pos_m, slot_pos)
        slot_info = torch.where(o, info_m, slot_info)
        origin = torch.where(o, origin_m, origin)
        count = count - over.long()
    final = SegmentState(starts=slot_pos[:, :C].reshape(N, H, C), info=slot_info[:, :C].reshape(N, H, C).float(),
                         position=seg.position.long() + lengths)
    return death.reshape(N, H, Tm), carried[:, :C].reshape(N, H, C), final


def _to_public(death, lengths, cu_seqlens, length):
    """Window-relative rows ``[N, H, Tm]`` -> ``[B, H, T]`` death (packed indices, never = T)."""
    never = (death >= lengths[:, None, None]) & (death != NONE)
    if cu_seqlens is None:
        return torch.where(never, length, death)
    offsets = cu_seqlens[:-1].long().to(death.device)[:, None, None]
    rows = torch.where(death == NONE, NONE, torch.where(never, length, death + offsets))
    H = death.shape[1]
    out = torch.full((1, H, length), NONE, dtype=torch.long, device=death.device)
    for n, (a, b) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        out[0, :, a:b] = rows[n, :, : b - a]
    return out
