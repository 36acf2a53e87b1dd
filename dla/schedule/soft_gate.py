"""Soft gating of the ``dynamic`` policy in training (spec §3, our reading of the paper).

The schedule is discrete and carries no gradient. To let the loss reach the threshold τ (learned per
layer and head) and, through the scores ``I_t``, the tokens' ``k, v, w``, every token's write is
multiplied by ``c_t + sg(1 - c_t)`` -- computed as ``1 + (c_t - sg(c_t))``, whose forward value is
exactly 1, so outputs equal the hard model's -- where ``p_t = σ((I_t - τ) / κ)`` and ``c_t = p_t`` if
``t`` opened a segment, else ``1 - p_t``.

For the state scores, ``I_t`` is recomputed here with gradients through the token's own
contribution ``s_t`` while the open state ``O_{t-1}`` is held constant: the planner's trace gives,
for every token, where the open segment started and ``‖O_{t-1}‖²``, and the open state at every
planning-chunk start; within a chunk ``⟨s_t, O_{t-1}⟩`` is the sum of the decayed products with the
open segment's tokens plus the product with the carried state, the planner's terms regrouped as the open
state read by the token's key (:class:`QueryProducts`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from dla.schedule.dynamic import STATE_SCORES, Trace, state_score, to_chunks
from dla.schedule.schedule import NONE, Schedule
from dla.schedule.scores import novelty_scores
from dla.varlen import head_major_rows, pack


def open_decay(g, open_start):
    """``decay [R * NC, L, L]``: ``exp(G_{t-1} - G_u)`` for the open segment's tokens ``u`` before ``t``
    in the chunk (``open_start <= u < t``), else 0 -- the decays of
    :func:`~dla.schedule.dynamic.pair_products`, the same sums -- and ``G_{t-1}`` ``[R * NC, L]``.
    ``g [R * NC, L]``: the chunk's log-decays; ``open_start``: where the open segment before ``t``
    starts, relative to the chunk's first token (negative: before the chunk)."""
    L = g.shape[-1]
    G = g.cumsum(-1)
    G_prev = torch.nn.functional.pad(G[:, :-1], (1, 0))  # G_{t-1}, exactly the previous sum
    u = torch.arange(L, device=g.device)
    outside = (u < open_start[..., None]) | (u >= u[:, None])
    decay = (G_prev[..., None] - G[:, None, :]).masked_fill_(outside, float("-inf")).exp_()
    return decay, G_prev


def weighted(v, w):
    """``w_u v_u`` ``[R * NC, L, V]`` (``w=None``: ``v``)."""
    return v if w is None else v * w[..., None]


class QueryProducts(torch.autograd.Function):
    """``⟨s_t, O_{t-1}⟩`` and ``‖s_t‖²``, ``[R * NC, L]`` each, of chunked tokens, differentiable in the
    query side ``k [R * NC, L, K]``, ``v [R * NC, L, V]``, ``w [R * NC, L]`` only. Constants: the key
    side (the open segment's tokens ``key_k, key_v, key_w`` and the log-decays ``g``), ``open_start``
    (:func:`open_decay`) and the open state at the chunk start, ``open_state [R * NC, K, V]``. ``w`` or
    ``key_w`` ``None``: 1 (Mamba-2's writes), the same numbers without the products by 1.

    ``⟨s_t, O_{t-1}⟩ = w_t ⟨O_{t-1}ᵀ k_t, v_t⟩``, and the open state read by the key, ``O_{t-1}ᵀ k_t =
    Σ_u decay[t, u] ⟨k_t, key_k_u⟩ key_w_u key_v_u + exp(G_{t-1}) open_stateᵀ k_t`` (the carried term only
    where the open segment started before the chunk), is two batched products: no pairwise ``[L, L]``
    terms to mask and sum. Kept for the backward: the inputs, the read (the size of ``v``) and ``[R * NC, L]``
    scalars; the decays are rebuilt, so no ``[L, L]`` tensor outlives the forward."""

    @staticmethod
    def forward(ctx, k, v, w, key_k, key_v, key_w, g, open_start, open_state):
        decay, G_prev = open_decay(g, open_start)
        carry_scale = torch.where(open_start < 0, G_prev.exp(), 0.0)
        pairs = torch.bmm(k, key_k.mT).mul_(decay)  # decay[t, u] ⟨k_t, key_k_u⟩
        read = torch.baddbmm(carry_scale[..., None] * (k @ open_state), pairs, weighted(key_v, key_w))
        kov = (read * v).sum(-1)  # k_tᵀ O_{t-1} v_t
        k_norm, v_norm = (k * k).sum(-1), (v * v).sum(-1)
        ctx.save_for_backward(k, v, w, key_k, key_v, key_w, g, open_start, open_state, carry_scale, read, kov,
                              k_norm, v_norm)
        if w is None:
            return kov, k_norm * v_norm
        return w * kov, (w * w) * k_norm * v_norm  # the norm as contribution_norms computes it

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x, grad_norm):
        k, v, w, key_k, key_v, key_w, g, open_start, open_state, carry_scale, read, kov, k_norm, v_norm = \
            ctx.saved_tensors
        decay, _ = open_decay(g, open_start)
        # ⟨s_t, O⟩ = w_t kov_t and ‖s_t‖² = w_t² ‖k_t‖² ‖v_t‖²; the 2 of d‖k‖²/dk = 2k (and of dw²/dw) taken here
        if w is None:
            grad_kov, grad_norm_kv = grad_x, 2 * grad_norm
        else:
            grad_kov, grad_norm_w = grad_x * w, 2 * grad_norm * w
            grad_norm_kv = grad_norm_w * w
        grad_read = grad_kov[..., None] * v
        grad_pairs = torch.bmm(grad_read, weighted(key_v, key_w).mT).mul_(decay)
        grad_k = carry_scale[..., None] * (grad_read @ open_state.mT)
        grad_k = grad_k.addcmul_((grad_norm_kv * v_norm)[..., None], k).baddbmm_(grad_pairs, key_k)
        grad_v = torch.addcmul((grad_norm_kv * k_norm)[..., None] * v, grad_kov[..., None], read)
        grad_w = torch.addcmul(grad_x * kov, grad_norm_w, k_norm * v_norm) if ctx.needs_input_grad[2] else None
        return grad_k, grad_v, grad_w, None, None, None, None, None, None


def scores_from_trace(trace: Trace, k, v, w, key_k, key_v, key_w, key_g, position, drift: bool = False):
    """``I_t`` ``[R, Tm]`` from dense rows (``k [R, Tm, K]``, ...): the query side ``k, v, w`` carries
    gradients, the key side (the open state's tokens) and the trace are constants. ``w``/``key_w``
    ``None``: 1. Rows zero-padded past the trace's tokens to whole chunks (whose chunks are then
    views, not padded copies) score 0 there."""
    R, Tm = key_g.shape
    if Tm == 0:
        return key_g.new_zeros(R, 0)
    L = trace.chunk
    NC = -(-Tm // L)
    chunk_start = torch.arange(0, NC * L, L, device=key_g.device)[:, None]
    open_start = (to_chunks(trace.open_start, L).view(R, NC, L) - chunk_start).view(R * NC, L)
    k, v, w, key_k, key_v, key_w, g = (None if x is None else to_chunks(x, L)
                                       for x in (k, v, w, key_k, key_v, key_w, key_g))
    x, norm = QueryProducts.apply(k, v, w, key_k, key_v, key_w, g, open_start, trace.open_states.flatten(0, 1))
    score, _ = state_score(x, norm, to_chunks(trace.open_norm, L), g.exp(), drift, eps=1e-12)
    scores = score.view(R, NC * L)[:, :Tm]
    first = (position[:, None] + torch.arange(Tm, device=key_g.device)) == 0  # a sequence start scores 0
    return scores.masked_fill(first, 0.0)


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
    R, padded = N * H, -(-Tm // trace.chunk) * trace.chunk

    def rows(x):  # [B, T, H, ...] -> [R, padded, ...] in cdt, contiguous: its chunks are views both sides share
        x = head_major_rows(x, cu_seqlens, padded, cdt)
        return x.view(R, padded, *x.shape[3:])

    # the rows are zero past each sequence's end and up to whole planning chunks: a padded token writes
    # nothing (k = v = 0) and ages nothing (g = 0), so no mask is needed
    cdt = trace.open_norm.dtype
    kr, vr = rows(k), rows(v)
    w = None if beta is None else rows(beta)
    gr = kr.new_zeros(R, padded) if open_state == "plain" else rows(g.detach())
    scores = scores_from_trace(trace, kr, vr, w, kr.detach(), vr.detach(), None if w is None else w.detach(), gr,
                               dense.position.repeat_interleave(H), drift=score == "state_drift")
    scores = scores[:, :Tm].view(N, H, Tm).transpose(1, 2)  # [N, Tm, H]
    return scores if cu_seqlens is None else pack(scores, cu_seqlens)


def opened_segments(schedule: Schedule):
    """``[B, T, H]`` bool: token ``t`` opened a segment (a boundary is born there)."""
    return (schedule.death != NONE).transpose(1, 2)
