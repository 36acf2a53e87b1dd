"""Policies: how segments are born and merged (spec §3). Each one fills a ``death`` tensor.

- ``single``: no boundaries, the base model.
- ``fixed``: a boundary every ``period`` positions; on overflow the two oldest segments merge.
- ``fenwick``: Log-Linear Attention's partition: every token is a boundary and the boundary born
  at position ``p`` dies at ``p + lowbit(p)`` (binary-counter carries), level labels.
- ``dynamic``: DLA (:mod:`dla.schedule.dynamic`). A boundary where the token's information score
  reaches ``threshold`` (or the open segment reaches ``max_segment_len``); on overflow the adjacent
  pair of closed segments of least information density merges (``merge="density"``, the paper),
  ties to the older pair. The default score is the paper's state information score of the token's
  contribution ``w_t k_t v_tᵀ`` against the open state, computed while planning from ``k, v, g``
  (and ``beta``); the earlier variant is ``score="novelty", merge="least_info", capacity=16``.

``single``, ``fixed`` and ``fenwick`` are closed forms of absolute positions; ``dynamic`` is a
walk over time, vectorised over sequences and heads. All of them continue from a
:class:`SegmentState` (``initial_state``), which is how decoding advances the schedule one token
at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dla.checks import nonfinite_flags
from dla.schedule.dynamic import (
    MERGE_RULES,
    OPEN_STATES,
    SCORES,
    STATE_SCORES,
    Contributions,
    plan_dynamic,
    planned_length,
)
from dla.schedule.graphed import graphs_enabled, plan_dynamic_graphed
from dla.schedule.schedule import LABEL_RULES, NEVER, NONE, Schedule, SegmentState
from dla.schedule.scores import novelty_scores
from dla.varlen import check_cu_seqlens, head_major_rows, max_seq_length, pack_heads, seq_lengths

POLICIES = ("single", "fixed", "fenwick", "dynamic")
DEFAULT_CAPACITY = 30  # the paper's C
DEFAULT_THRESHOLD = {"state": 1.0, "state_drift": 1.0, "novelty": 0.5, "router": 0.5, "external": 0.5}


def score_range(score: str) -> float:
    """The largest value a score takes: 2 for the state scores, 1 for the others."""
    return 2.0 if score in STATE_SCORES else 1.0


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def plan_schedule(policy: str, *, batch: int, heads: int, length: int, capacity: int | None = None,
                  threshold: float | torch.Tensor | None = None, score: str | None = None, merge: str = "density",
                  open_state: str = "decayed", k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                  g: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                  scores: torch.Tensor | None = None, period: int | None = None,
                  max_segment_len: int | None = None, cu_seqlens: torch.Tensor | None = None,
                  label_rule: str | None = None, initial_state=None, device=None,
                  backend: str | None = None, keep_trace: bool = False, validate: bool = True) -> Schedule:
    """Plan a :class:`Schedule` for ``[batch, heads, length]`` tokens.

    ``dynamic`` (spec §3): ``score`` is ``"state"`` (the paper's state information score, Eq. 13),
    ``"state_drift"`` (the other reading), ``"novelty"`` (key novelty, the earlier variant),
    ``"router"`` or ``"external"`` (given ``scores [B, T, H]`` in [0, 1]). The state scores read the
    tokens' contributions ``w_t k_t v_tᵀ`` from ``k [B, T, H, K]``, ``v [B, T, H, V]``, the log-decay
    ``g [B, T, H]`` that ages the open state (``open_state="decayed"``; not needed for ``"plain"``)
    and ``beta [B, T, H]`` (Gated DeltaNet's ``w``; ``None``: Mamba-2, ``w = 1``). ``novelty``
    computes its scores from ``k`` unless ``scores`` are given. ``score`` defaults to ``"external"``
    when ``scores`` are given, else ``"state"``. ``threshold`` τ: a number, or one per head
    (``[heads]`` tensor, e.g. learned), in [0, 2] for the state scores and [0, 1] for the others
    (default 1.0 and 0.5). ``merge``: ``"density"`` (Eq. 16–17), ``"least_info"`` (segment
    information as a maximum, the earlier variant) or ``"oldest"``.

    ``capacity`` defaults to 30 (``fenwick``: ceil(log2 T) + 1, ``single``: 1); capacity 1 makes
    every policy ``single``. ``label_rule`` defaults to ``level`` for ``fenwick`` and ``recency``
    otherwise. ``initial_state`` (a :class:`SegmentState` or :class:`dla.DLAState`) continues an
    earlier window of each sequence; the result then carries the death times of the continued
    segments' boundaries. ``device``: where the schedule lives (default: that of ``k``, ``scores``
    or ``cu_seqlens``, else CPU; it must be the device of the op's inputs). ``backend``: ``"torch"``
    or ``"triton"`` for the ``dynamic`` walk (default: Triton on CUDA tensors, PyTorch elsewhere);
    both give identical schedules. ``keep_trace``: keep what the walk saw (``schedule.trace``).
    The schedule's ``scores [B, H, T]`` are the scores the ``dynamic`` policy used.

    ``validate=False`` skips the checks that read tensor values on the host (finite inputs and
    threshold, scores in [0, 1], ``initial_state`` consistent with the policy, and, when
    ``capacity`` is given, the positions the fenwick capacity holds): on a GPU each one waits for
    the device, and none can be in a CUDA graph. For inputs checked once before a run of calls, as
    the decoding steps of :func:`dla.generate`; the schedule is the same.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    if merge not in MERGE_RULES:
        raise ValueError(f"merge must be one of {MERGE_RULES}, got {merge!r}")
    if open_state not in OPEN_STATES:
        raise ValueError(f"open_state must be one of {OPEN_STATES}, got {open_state!r}")
    if label_rule is not None and label_rule not in LABEL_RULES:
        raise ValueError(f"label_rule must be None or one of {LABEL_RULES}, got {label_rule!r}")
    if score is None:
        score = "external" if scores is not None else "state"
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    for name, value in (("batch", batch), ("heads", heads)):
        _check_int(name, value, 1)
    _check_int("length", length, 0)
    if capacity is not None:
        _check_int("capacity", capacity, 1)
    if max_segment_len is not None:
        _check_int("max_segment_len", max_segment_len, 1)
    # a threshold tensor's values are checked with the state scores' inputs, in their one host sync
    check_with_inputs = (validate and policy == "dynamic" and score in STATE_SCORES
                         and isinstance(threshold, torch.Tensor))
    threshold = _check_threshold(threshold, score, heads, validate and not check_with_inputs)
    for name, x in (("k", k), ("v", v), ("g", g), ("beta", beta), ("scores", scores)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if label_rule is None:
        label_rule = "level" if policy == "fenwick" else "recency"
    if device is None:
        device = next((x.device for x in (k, scores, cu_seqlens) if isinstance(x, torch.Tensor)), "cpu")
    check_cu_seqlens(cu_seqlens, batch, length, device)
    if cu_seqlens is None:
        lengths = torch.full((batch,), length, dtype=torch.long, device=device)
    else:
        lengths = seq_lengths(cu_seqlens.to(device))
    num_seqs = lengths.numel()
    max_len = length if cu_seqlens is None else max_seq_length(cu_seqlens)

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

    if policy == "fenwick" and (capacity is None or validate):
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

    t = torch.arange(max_len, device=device)
    pos = position[:, None, None] + t  # [N, 1, Tm] absolute positions
    in_seq = t < lengths[:, None, None]
    starts = seg.starts
    final = trace = used = None
    if capacity == 1 or policy == "single":
        death = torch.full((num_seqs, heads, max_len), NONE, dtype=torch.long, device=device)
        carried = torch.full_like(starts, NEVER)
    elif policy == "fenwick":
        death, carried = _closed_form(pos, in_seq, starts, position, pos >= 1, lambda p: p + (p & -p), heads)
    elif policy == "fixed":
        death, carried = _closed_form(pos, in_seq, starts, position, (pos >= 1) & (pos % period == 0),
                                      lambda p: p + (capacity - 1) * period, heads)
    else:
        shape = (batch, length, heads)
        rows_scores = contributions = None

        def rows(x, dtype=None, length=max_len):  # [B, T, H, ...] -> contiguous rows [N, H, length, ...] in dtype
            return head_major_rows(x, cu_seqlens, length, dtype).to(device)

        if score in STATE_SCORES:
            contributions = _contributions(k, v, g, beta, shape, open_state, rows, in_seq, validate,
                                           threshold.to(device) if check_with_inputs else None)
            if validate and initial_state is not None and seg.open_state is None and bool((seg.starts >= 0).any()):
                raise ValueError(f"score={score!r} continues from the open state, but initial_state carries none "
                                 "(it was planned with another score)")
        else:
            if scores is None and score == "novelty":
                if k is None:
                    raise ValueError("score='novelty' needs k [B, T, H, K] (or its scores)")
                prev_key = getattr(initial_state, "prev_key", None)
                scores = novelty_scores(k, cu_seqlens, prev_key)
            if scores is None:
                raise ValueError(f"score={score!r} needs scores [B, T, H], e.g. dla.novelty_scores(k)")
            if scores.shape != shape:
                raise ValueError(f"scores must be [B, T, H] = [{batch}, {length}, {heads}], "
                                 f"got {tuple(scores.shape)}")
            if validate and not bool(((scores >= 0) & (scores <= 1)).all()):  # one sync; NaN, Inf fail it
                raise ValueError("scores must be finite and in [0, 1]")
            rows_scores = rows(scores)
        if backend is None:
            backend = "triton" if torch.device(device).type == "cuda" else "torch"
        if backend == "triton" and contributions is not None and graphs_enabled(seg):
            death, carried, final, trace = plan_dynamic_graphed(seg, lengths, threshold.to(device), max_segment_len,
                                                                merge, score, contributions, keep_trace)
        else:
            death, carried, final, trace = plan_dynamic(
                seg, lengths, threshold.to(device), max_segment_len, merge, score, backend,
                scores=rows_scores, contributions=contributions, keep_trace=keep_trace)
        used = _to_public(trace.scores.view(num_seqs, heads, max_len), lengths, cu_seqlens, length, fill=0)
        if not keep_trace:
            trace = None
    if validate and initial_state is not None and ((starts > 0) & (carried < 0)).any():
        raise ValueError("initial_state's segments are inconsistent with the policy: a boundary would have died "
                         "before this window")
    carried = torch.where(starts > 0, carried, torch.full_like(carried, NONE))
    public = _to_public(death, lengths, cu_seqlens, length)
    return Schedule(public, capacity, label_rule, cu_seqlens=cu_seqlens, validate=False,
                    initial=None if initial_state is None else seg,
                    carried_death=None if initial_state is None else carried, final=final, scores=used,
                    trace=trace)


def _check_threshold(threshold, score: str, heads: int, validate: bool) -> torch.Tensor:
    """τ as a ``[heads]`` tensor (one per head); ``validate``: a tensor's values must be finite."""
    top = score_range(score)
    if threshold is None:
        return torch.full((heads,), DEFAULT_THRESHOLD[score])
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() not in (1, heads) or threshold.dim() > 1:
            raise ValueError(f"threshold must be a number or a [heads] = [{heads}] tensor, "
                             f"got shape {tuple(threshold.shape)}")
        threshold = threshold.detach().float().reshape(-1).expand(heads)
        if validate and not bool(torch.isfinite(threshold).all()):
            raise ValueError("threshold contains NaN or Inf")
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= top:
        raise ValueError(f"threshold must be a number in [0, {top:g}] for score={score!r}, got {threshold!r}")
    return torch.full((heads,), float(threshold))


def _contributions(k, v, g, beta, shape, open_state, rows, in_seq, validate: bool,
                   threshold: torch.Tensor | None = None) -> Contributions:
    """The dense rows the state scores read: ``k, v``, ``w`` (β or 1) and the open state's decay
    (``validate``: all finite, and ``threshold`` with them)."""
    B, T, H = shape
    if k is None or v is None:
        raise ValueError("the state scores need k [B, T, H, K] and v [B, T, H, V]")
    if k.dim() != 4 or k.shape[:3] != shape:
        raise ValueError(f"k must be [B, T, H, K] = [{B}, {T}, {H}, K], got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != shape:
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x is not None and x.shape != shape:
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}], got {tuple(x.shape)}")
    if g is None and open_state == "decayed":
        raise ValueError("open_state='decayed' needs the log-decay g [B, T, H] (or open_state='plain')")
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    Tm = in_seq.shape[-1]
    padded = planned_length(Tm)  # whole planning chunks: the walk's terms take the rows' chunks as views
    kr, vr = rows(k.detach(), dtype, padded), rows(v.detach(), dtype, padded)
    N, H_ = kr.shape[:2]
    # the rows are zero past each sequence's end (no write, no decay there); Mamba-2 writes with w = 1
    # inside the sequences
    if beta is None:
        inside = in_seq if padded == Tm else F.pad(in_seq, (0, padded - Tm))
        w = inside.expand(N, H_, padded).to(dtype)
    else:
        w = rows(beta.detach(), dtype, padded)
    gr = torch.zeros_like(w) if open_state == "plain" else rows(g.detach(), dtype, padded)
    if validate:
        checked = (kr, vr, w, gr) if threshold is None else (kr, vr, w, gr, threshold)
        bad = nonfinite_flags(checked)
        if bool(bad.any()):  # one host sync for all the checks
            name = ("k", "v", "beta", "g", "threshold")[bad.long().argmax()]
            raise ValueError(f"{name} contains NaN or Inf")
    R = N * H_
    return Contributions(kr.reshape(R, padded, k.shape[-1]), vr.reshape(R, padded, v.shape[-1]),
                         w.reshape(R, padded), gr.reshape(R, padded), Tm)


def _closed_form(pos, in_seq, starts, position, is_boundary, death_of, heads):
    """Deaths as a pure function of absolute positions: window tokens and carried boundaries."""
    born = is_boundary & in_seq
    death = torch.where(born, death_of(pos) - position[:, None, None], torch.full_like(pos, NONE))
    carried = death_of(starts) - position[:, None, None]
    return death.expand(-1, heads, -1).clone(), carried


def _to_public(death, lengths, cu_seqlens, length, fill=None):
    """Window-relative rows ``[N, H, Tm]`` -> ``[B, H, T]`` death (packed indices, never = T); with
    ``fill``, any per-token rows (e.g. scores) are packed as they are, ``fill`` between sequences."""
    if fill is not None:
        # (the sequences cover the packed row: no token between two takes ``fill``)
        return death if cu_seqlens is None else pack_heads(death, cu_seqlens)
    never = (death >= lengths[:, None, None]) & (death != NONE)
    if cu_seqlens is None:
        return death.masked_fill(never, length)
    offsets = cu_seqlens[:-1].long().to(death.device)[:, None, None]
    rows = (death + offsets).masked_fill_(never, length).masked_fill_(death == NONE, NONE)
    return pack_heads(rows, cu_seqlens)
