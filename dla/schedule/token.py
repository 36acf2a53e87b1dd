"""One token per sequence, planned straight from the segmentation (decoding).

:func:`plan_token` is :func:`dla.plan_schedule` for a window of one token per sequence that
continues a :class:`SegmentState`, without the window machinery: no chunk terms (for one token
the pairwise products vanish and the decays are ``exp(0) = 1``), no walker, no dense schedule and
no routing scan. It returns what the op's step needs -- where every old slot goes (``dest``) and
the label of every new slot -- and the segmentation after the token. The scores, sums, densities
and the open state are computed by the same float operations, in the same order, as the walk of
:mod:`dla.schedule.dynamic` (through its helpers), so the plan equals the general planner's bit
for bit; the tests compare the two token by token. It checks nothing and reads nothing on the
host: it is for the unchecked decoding steps (``validate=False``) and can be captured in a CUDA
graph.

Slots are newest first (slot 0: the open segment). A token that opens a segment shifts every slot
one place older; the slots whose start boundaries die at this token fold into their next older
survivor (``fixed`` and ``fenwick``: closed forms of the starts; ``dynamic``: on overflow, the
adjacent closed pair chosen by the merge rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dla.schedule.dynamic import STATE_SCORES, contribution_norms, state_score, terms_backend
from dla.schedule.policies import DEFAULT_THRESHOLD
from dla.schedule.schedule import NONE, SegmentState, slot_labels
from dla.schedule.scores import novelty_scores

__all__ = ["TokenPlan", "plan_token"]


@dataclass
class TokenPlan:
    """The schedule of one token per sequence: ``dest [N, H, C]`` (the new slot of every old slot;
    ``C``: an empty slot, dropped), ``label [N, H, C]`` (the λ label of every new slot, 0 where
    empty), ``lam [N, H, C]`` (λ of every new slot, in the token's λ's dtype, 0 where empty),
    ``segments`` (the segmentation after the token), ``scores [N, H]`` (the ``dynamic`` policy's
    information scores, else ``None``) and ``ranges`` (``dest`` as the decode kernel reads it, where
    the Triton plan wrote it)."""

    dest: torch.Tensor
    label: torch.Tensor
    lam: torch.Tensor
    segments: SegmentState
    scores: torch.Tensor | None = None
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None


def plan_token(policy: str, initial_state, *, threshold: torch.Tensor | float | None = None, score: str = "state",
               merge: str = "density", open_state: str = "decayed", k: torch.Tensor | None = None,
               v: torch.Tensor | None = None, g: torch.Tensor | None = None, beta: torch.Tensor | None = None,
               scores: torch.Tensor | None = None, period: int | None = None, max_segment_len: int | None = None,
               label_rule: str = "recency", lam: torch.Tensor | None = None, backend: str | None = None,
               inplace: bool = False) -> TokenPlan:
    """Plan one token for every sequence continuing ``initial_state`` (a :class:`SegmentState` or
    :class:`dla.DLAState`). The arguments are :func:`dla.plan_schedule`'s, for ``[N, 1, H, ...]``
    inputs (``threshold``: a number or ``[heads]``); the capacity is the state's. ``lam [N, 1, H,
    n_labels]``: the token's λ, which the plan gives every new slot by its label (None: λ ≡ 1). ``backend``: the
    ``dynamic`` walk that the general planner would run (``"triton"``, the default on CUDA, walks
    in float32), whose numbers the plan repeats. Nothing is checked: the inputs must be valid.
    ``inplace``: the Triton plan of a state score writes the new open state over the old one (a
    decoding cache's own)."""
    seg = getattr(initial_state, "segments", initial_state)
    N, H, C = seg.starts.shape
    if C == 1:
        return _one_slot_token(seg, lam)
    if policy == "single":
        return _closed_form_token(seg, label_rule, lam, None)
    if policy == "fenwick":
        return _closed_form_token(seg, label_rule, lam, lambda p: p + (p & -p))
    if policy == "fixed":
        return _closed_form_token(seg, label_rule, lam, lambda p: p + (C - 1) * period, period)
    if backend is None:
        backend = "triton" if seg.starts.is_cuda else "torch"
    if threshold is None:
        threshold = DEFAULT_THRESHOLD[score]
    if score == "novelty" and scores is None:
        scores = novelty_scores(k, None, getattr(initial_state, "prev_key", None))
    return _dynamic_token(seg, threshold, score, merge, open_state, k, v, g, beta, scores, max_segment_len,
                          label_rule, lam, backend, inplace)


def _one_slot_token(seg: SegmentState, lam) -> TokenPlan:
    """One slot (``single``, or any policy at capacity 1: the base models' decoding step): the token
    opens it at a sequence's first token and extends it after. :func:`_closed_form_token` without
    boundaries for ``C = 1``, in a third of its operations, with the routing as the decode kernel
    reads it: the slot stays (or, empty before the first token, goes nowhere), and its label is 0
    under both label rules. Slots are compact, so the slot is empty exactly before the first token."""
    starts, position = seg.starts, seg.position.long()
    filled = starts >= 0  # [N, H, 1]
    dest = (~filled).long()  # 0: stays, 1 (= C): empty, dropped
    new_starts = torch.where(filled, starts, position[:, None, None])
    segments = SegmentState(new_starts, torch.zeros(new_starts.shape, device=starts.device), position + 1)
    label = torch.zeros_like(dest)
    opened = new_starts >= 0
    slot_lam = opened.float() if lam is None else lam[:, 0, :, :1] * opened
    lo = dest.to(torch.int32)  # dla.ops.common.source_ranges of dest: the slot's own, or none (lo > hi)
    return TokenPlan(dest, label, slot_lam, segments, ranges=(lo, -lo))


def _closed_form_token(seg: SegmentState, label_rule: str, lam, death_of, period: int | None = None) -> TokenPlan:
    """``single`` (``death_of=None``: no boundaries), ``fenwick`` (every token a boundary) and
    ``fixed`` (every ``period``-th): a boundary born at ``p`` dies at ``death_of(p)``."""
    starts, position = seg.starts, seg.position.long()
    pos = position[:, None, None]  # [N, 1, 1]
    C = starts.shape[-1]
    slot = torch.arange(C, device=starts.device)
    filled = starts >= 0
    born = pos == 0  # a sequence start opens the first segment (all slots are empty before it)
    if death_of is None:  # no boundaries: no slot moves
        dest = (slot + born).masked_fill(~filled, C)
        new_starts = torch.where(born & (slot == 0), pos, starts)
    else:
        born = born | ((pos >= 1) if period is None else (pos >= 1) & (pos % period == 0))
        keep = filled & ((starts <= 0) | (death_of(starts) != pos))
        # a survivor moves past the newer survivors (and the new segment); a dying slot folds into its next
        # older survivor
        survivors = keep.long().cumsum(-1)
        dest = born + survivors - keep.long()
        dest = torch.where(filled & (dest < born + survivors[..., -1:]), dest, C)
        moved = torch.full(starts.shape[:-1] + (C + 1,), NONE, dtype=starts.dtype, device=starts.device)
        moved = moved.scatter(-1, torch.where(keep, dest, C), starts)
        new_starts = torch.where(born & (slot == 0), pos, moved[..., :C])
    segments = SegmentState(new_starts, torch.zeros(new_starts.shape, device=starts.device), position + 1)
    return _finish(dest, segments, label_rule, lam)


def _finish(dest, segments: SegmentState, label_rule: str, lam, scores=None) -> TokenPlan:
    filled = segments.starts >= 0
    label = slot_labels(segments.starts, filled, segments.position[:, None, None], label_rule)
    slot_lam = filled.float() if lam is None else lam[:, 0].gather(-1, label) * filled
    return TokenPlan(dest, label, slot_lam, segments, scores)


def _dynamic_token(seg: SegmentState, threshold, score, merge, open_state, k, v, g, beta, scores, max_segment_len,
                   label_rule, lam, backend, inplace: bool = False) -> TokenPlan:
    """The ``dynamic`` policy's step of :class:`dla.schedule.dynamic.TorchWalker` (and of the state
    score's chunk terms, for a chunk of one token) for one token. Products by an exact 1 (Mamba-2's
    ``w``, the decays ``exp(0)`` of a one-token chunk) and sums with an exact 0 (its pairwise
    products) are left out: they change no number."""
    starts, position = seg.starts, seg.position.long()
    N, H, C = starts.shape
    pos = position[:, None]  # [N, 1]
    state = score in STATE_SCORES
    if state:
        dtype = torch.float64 if k.dtype == torch.float64 and backend == "torch" else torch.float32
    else:
        dtype = torch.float32 if backend == "triton" else scores.dtype
    info = seg.info.to(dtype)
    open_norm = open_state_new = norm = extended = None
    if state:
        R, K, V = N * H, k.shape[-1], v.shape[-1]
        beta_rows = None if beta is None else beta.detach().to(dtype)  # [N, 1, H]
        w = None if beta is None else beta_rows.transpose(1, 2).reshape(R, 1)
        gamma = (torch.ones(N, H, dtype=dtype, device=k.device) if open_state == "plain"
                 else g.detach().to(dtype).transpose(1, 2).reshape(N, H).exp())
        O = (torch.zeros(R, K, V, dtype=dtype, device=k.device) if seg.open_state is None
             else seg.open_state.reshape(R, K, V).to(dtype))
        open_norm = (torch.zeros(N, H, dtype=dtype, device=k.device) if seg.open_norm is None
                     else seg.open_norm.to(dtype))
        kf, vf = k.detach().to(dtype), v.detach().to(dtype)  # [N, 1, H, ...]
        # ⟨s_t, O⟩: the chunk's carried product (its scale exp(G_{t-1}) w_t is w_t at the chunk's first token)
        if terms_backend(k.device, dtype) == "triton":
            # as the general planner's window takes them: the same kernels on the same float32 numbers (a
            # kernel compiled for other input types may sum in another order)
            from dla.schedule import triton_terms

            x = triton_terms.open_products(kf, vf, O, w)
            norm = triton_terms.contribution_norms(kf, vf, beta_rows)
        else:
            kr, vr = kf.transpose(1, 2).reshape(R, 1, K), vf.transpose(1, 2).reshape(R, 1, V)
            x = ((kr @ O) * vr).sum(-1)
            x = x if w is None else w * x
            norm = contribution_norms(kr, vr, w)
        x, norm = x.view(N, H), norm.view(N, H)
        if backend == "triton":
            return _fused_state_token(starts, info, position, None if seg.open_state is None else O, open_norm,
                                      x, norm, gamma, k, v, beta, threshold, score, merge, max_segment_len,
                                      label_rule, lam, inplace)
    # slots are compact, newest first: the first slot is empty before the first token, the last once full
    first = starts[..., 0] < 0
    full = starts[..., -1] >= 0
    if state:
        token_score, extended = state_score(x, norm, open_norm, gamma, score == "state_drift")
        token_score = token_score.masked_fill(first, 0.0)
    else:
        token_score = scores[:, 0].to(dtype)
    wants = token_score >= torch.as_tensor(threshold, device=starts.device).float().to(dtype)
    if max_segment_len is not None:
        wants = wants | (pos - starts[..., 0] >= max_segment_len)
    new = first | wants  # [N, H]: the token opens a segment
    over = new & full
    slot = torch.arange(C, device=starts.device)
    # the merge: closed pairs (i, i + 1) of the old slots, i in 0..C-2, i.e. (i + 1, i + 2) once shifted; its
    # choice is only used where the slots overflow, and there every slot holds a segment (a positive span)
    pair_info = info[..., :C - 1] + info[..., 1:]
    if merge == "oldest":  # every pair costs the same, so the tie rule picks the oldest
        newer = torch.full_like(starts[..., 0], C - 2)
    else:
        if merge == "density":
            newer_start = torch.cat([pos[..., None].expand(N, H, 1), starts[..., :C - 2]], -1)
            span = newer_start - starts[..., 1:]  # the pair's tokens: from start i + 1 to the start before i
            cost = pair_info / span.clamp(min=1)
        else:
            cost = pair_info
        newer = C - 2 - cost.flip(-1).argmin(-1)  # ties go to the older pair
    if merge == "least_info":  # the earlier variant: a segment's information is its maximum
        pair_info = torch.maximum(info[..., :C - 1], info[..., 1:])
    merged = pair_info.gather(-1, newer[..., None])
    dying = newer.masked_fill(~over, C)[..., None]  # old slot of the boundary that dies (C: none)
    dest = (slot + (new[..., None] & (slot <= dying))).masked_fill(starts < 0, C)
    source = slot + (slot > dying)  # new slot <- this slot of [token, old slots]
    opened_starts = torch.cat([pos[..., None].expand(N, H, 1), starts], -1).gather(-1, source)
    opened_info = torch.cat([token_score[..., None], info], -1).gather(-1, source)
    opened_info = torch.where(slot == dying + 1, merged, opened_info)
    grown = (torch.maximum(info[..., :1], token_score[..., None]) if merge == "least_info"
             else info[..., :1] + token_score[..., None])
    newc = new[..., None]
    new_starts = torch.where(newc, opened_starts, starts)
    new_info = torch.where(newc, opened_info, torch.cat([grown, info[..., 1:]], -1))
    if state:
        # a new segment restarts the open state at the token's contribution: O = exp(g) O + w k vᵀ otherwise
        kept = gamma.masked_fill(new, 0.0).view(R)
        write = (kr if w is None else kr * w[..., None]).transpose(1, 2) @ vr
        open_state_new = (kept[:, None, None] * O + write).view(N, H, K, V)
        open_norm = torch.where(new, norm, extended)
    segments = SegmentState(new_starts, new_info, position + 1, open_state=open_state_new, open_norm=open_norm)
    return _finish(dest, segments, label_rule, lam, token_score)


def _fused_state_token(starts, info, position, open_state, open_norm, x, norm, gamma, k, v, beta, threshold, score,
                       merge, max_segment_len, label_rule, lam, inplace: bool) -> TokenPlan:
    """The rest of :func:`_dynamic_token` for a state score, after its products with the open state, as
    one Triton program per sequence-head (:mod:`dla.schedule.triton_token`): the same numbers."""
    from dla.schedule.triton_token import plan_state_token

    N, H, C = starts.shape
    threshold = torch.as_tensor(threshold, device=starts.device).float().expand(H)
    K, V = k.shape[-1], v.shape[-1]
    open_state = None if open_state is None else open_state.view(N, H, K, V)
    planned = plan_state_token(starts, info, position, open_state, open_norm, x, norm, gamma, k[:, 0], v[:, 0],
                               None if beta is None else beta[:, 0], threshold, None if lam is None else lam[:, 0],
                               drift=score == "state_drift", merge=merge, max_segment_len=max_segment_len,
                               level=label_rule == "level", inplace=inplace)
    dest, ranges, label, slot_lam, new_starts, new_info, token_score, open_norm, open_state, new_position = planned
    segments = SegmentState(new_starts, new_info, new_position, open_state=open_state, open_norm=open_norm)
    return TokenPlan(dest, label, slot_lam, segments, token_score, ranges)
