"""Soft gating of the ``dynamic`` policy in training (spec §3, our reading of the paper).

The schedule is discrete and carries no gradient. To let the loss reach the threshold τ (learned per
layer and head) and, through the scores ``I_t``, the tokens' ``k, v, w``, every token's write is
multiplied by ``c_t + sg(1 - c_t)`` -- computed as ``1 + (c_t - sg(c_t))``, whose forward value is
exactly 1, so outputs equal the hard model's -- where ``p_t = σ((I_t - τ) / κ)`` and ``c_t = p_t`` if
``t`` opened a segment, else ``1 - p_t``.

For the state scores, ``I_t`` is recomputed here with gradients through the token's own
contribution ``s_t`` while the open state ``O_{t-1}`` is held constant: the planner's trace gives,
for every token, where the open segment started and ``‖O_{t-1}‖²``, and the open state at every
planning-chunk start; within a chunk ``⟨s_t, O_{t-1}⟩`` is the sum of the pairwise products over
the open segment's tokens plus the product with the carried state, as the planner computes it.
"""

from __future__ import annotations

import torch

from dla.schedule.dynamic import (
    STATE_SCORES,
    Trace,
    carried_products,
    contribution_norms,
    pair_products,
    state_score,
    to_chunks,
)
from dla.schedule.schedule import NONE, Schedule
from dla.schedule.scores import novelty_scores
from dla.varlen import pack, unpack


def scores_from_trace(trace: Trace, k, v, w, key_k, key_v, key_w, key_g, position, drift: bool = False):
    """``I_t`` ``[R, Tm]`` from dense rows (``k [R, Tm, K]``, ...): the query side ``k, v, w`` carries
    gradients, the key side (the open state's tokens) and the trace are constants."""
    R, Tm = w.shape
    if Tm == 0:
        return w.new_zeros(R, 0)
    L = trace.chunk
    NC = -(-Tm // L)
    kq, vq, wq = to_chunks(k, L), to_chunks(v, L), to_chunks(w, L)  # every chunk at once: [R * NC, L, ...]
    g = to_chunks(key_g, L)
    pair, _, G_prev = pair_products(kq, vq, wq, to_chunks(key_k, L), to_chunks(key_v, L), to_chunks(key_w, L), g)
    start = to_chunks(trace.open_start, L)  # the open segment's start before t, window time
    chunk_start = (torch.arange(NC, device=w.device) * L).repeat(R)[:, None]  # [R * NC, 1]
    u = chunk_start + torch.arange(L, device=w.device)
    x = (pair * (u[:, None, :] >= start[..., None])).sum(-1)
    carried = carried_products(kq, vq, wq, G_prev, trace.open_states.reshape(R * NC, *trace.open_states.shape[2:]))
    x = x + torch.where(start < chunk_start, carried, 0.0)
    open_norm = to_chunks(trace.open_norm, L)
    score, _ = state_score(x, contribution_norms(kq, vq, wq), open_norm, g.exp(), drift, eps=1e-12)
    scores = score.reshape(R, NC * L)[:, :Tm]
    first = (position[:, None] + torch.arange(Tm, device=w.device)) == 0  # a sequence start scores 0
    return torch.where(first, 0.0, scores)


def gate_factor(scores, opened, threshold, temperature: float):
    """``1 + (c - sg(c))`` with ``c = σ((I - τ) / κ)`` where a segment opened, else ``1 - σ(...)``:
    forward value exactly 1, gradient that of ``c``. ``scores``/``opened`` ``[B, T, H]``, ``threshold [H]``."""
    p = torch.sigmoid((scores - threshold) / temperature)
    c = torch.where(opened, p, 1 - p)
    return 1 + (c - c.detach())


def differentiable_scores(schedule: Schedule, score: str, k, v, g, beta, open_state: str, cu_seqlens=None,
                          prev_key=None):
    """The scores the schedule used, ``[B, T, H]``, with gradients where the score has them: the state
    scores through ``k, v, beta`` (the open state held constant; needs ``keep_trace=True``), novelty
    through ``k`` (``prev_key``: as the planner had it); given scores (router, external) are constants."""
    if score not in STATE_SCORES:
        if score == "novelty":
            return novelty_scores(k, cu_seqlens, prev_key, differentiable=True)
        return schedule.scores.transpose(1, 2)
    trace = schedule.trace
    if trace is None:
        raise ValueError("soft gating of the state scores needs a schedule planned with keep_trace=True")
    dense = schedule.dense()
    N, H, Tm = dense.start_death.shape
    R = N * H

    def rows(x):  # [B, T, H, ...] -> [R, Tm, ...]
        x = x if cu_seqlens is None else unpack(x, cu_seqlens, Tm)
        x = x.transpose(1, 2)
        return x.reshape(R, Tm, *x.shape[3:])

    in_seq = (torch.arange(Tm, device=k.device) < dense.lengths[:, None]).repeat_interleave(H, 0)
    cdt = trace.open_norm.dtype
    kr, vr = rows(k.to(cdt)), rows(v.to(cdt))
    w = torch.ones_like(in_seq, dtype=cdt) if beta is None else rows(beta.to(cdt))
    w = torch.where(in_seq, w, 0.0)
    gr = torch.zeros_like(w) if open_state == "plain" else torch.where(in_seq, rows(g.detach().to(cdt)), 0.0)
    scores = scores_from_trace(trace, kr, vr, w, kr.detach(), vr.detach(), w.detach(), gr,
                               dense.position.repeat_interleave(H), drift=score == "state_drift")
    scores = scores.view(N, H, Tm).transpose(1, 2)  # [N, Tm, H]
    return scores if cu_seqlens is None else pack(scores, cu_seqlens)


def opened_segments(schedule: Schedule):
    """``[B, T, H]`` bool: token ``t`` opened a segment (a boundary is born there)."""
    return (schedule.death != NONE).transpose(1, 2)
