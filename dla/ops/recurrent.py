"""The recurrent form: at most C segment states, births and merges applied step by step.

O(T * C * K * V) with a Python loop over time (vectorised over sequences, heads and slots): the
second ground truth, and what decoding runs one token at a time.

Step t, per sequence and head, with slots ordered newest first (slot 0 = the open segment):
1. birth: if t starts a segment, every slot moves one place older and slot 0 starts empty;
2. merges: each slot whose start boundary dies at t is added into its older neighbour (newest
   first, so chains of merges fold correctly) and the slots are compacted;
3. transition ``S <- A_t S`` on every slot and write ``S_0 += w_t k_t v_t^T``;
4. read-out ``o_t = Σ_j λ_t^{ℓ_j} S_j^T q_t`` (``ℓ_j = j`` for recency labels; for level labels 0
   for slot 0 and ``bit_length(size_j)`` otherwise).
"""

from __future__ import annotations

import torch

from dla.ops.common import DLAState, prepare
from dla.schedule.schedule import NONE, bit_length


def recurrent_dla(q, k, v, g, lam, schedule, beta=None, scale=None, initial_state: DLAState | None = None,
                  output_final_state: bool = False, cu_seqlens=None):
    """Dynamic Linear Attention as a recurrence over at most ``C`` states.

    Returns ``(o [B, T, H, V], state)``; ``state`` is a :class:`dla.DLAState` when
    ``output_final_state`` else ``None``. ``initial_state`` continues earlier windows of each
    sequence; ``schedule`` must then be planned with ``initial_state=`` the same state.
    """
    x = prepare(q, k, v, g, lam, schedule, beta, scale, cu_seqlens, initial_state)
    ds = x.schedule
    N, H, Tm, K = x.q.shape
    V = x.v.shape[-1]
    C = ds.capacity
    dev = x.q.device
    # one spare slot holds the overflow between a birth and the merge that follows it
    S = x.q.new_zeros(N, H, C + 1, K, V)
    if x.initial is not None:
        S = torch.cat([x.initial, S[:, :, :1]], 2)
    slot_pos = torch.cat([ds.carried_pos, ds.carried_pos.new_full((N, H, 1), NONE)], -1)  # window coords
    slot_death = torch.cat([ds.carried_death, ds.carried_death.new_full((N, H, 1), NONE)], -1)
    slot = torch.arange(C + 1, device=dev)
    outs = []
    for t in range(Tm):
        sd = ds.start_death[:, :, t]
        born = (sd != NONE)[..., None]
        S = torch.where(born[..., None, None], torch.cat([torch.zeros_like(S[:, :, :1]), S[:, :, :-1]], 2), S)
        slot_pos = torch.where(born, torch.cat([torch.full_like(slot_pos[..., :1], t), slot_pos[..., :-1]], -1),
                               slot_pos)
        slot_death = torch.where(born, torch.cat([sd[..., None], slot_death[..., :-1]], -1), slot_death)
        dies = (slot_death == t)
        if dies.any():
            folded = []
            carry = torch.zeros_like(S[:, :, 0])
            for j in range(C + 1):
                Sj = S[:, :, j] + carry
                d = dies[:, :, j, None, None]
                carry = torch.where(d, Sj, torch.zeros_like(Sj))
                folded.append(torch.where(d, torch.zeros_like(Sj), Sj))
            S = torch.stack(folded, 2)
            keep = ~dies & (slot_death != NONE)
            dest = torch.where(keep, keep.long().cumsum(-1) - 1, C + 1)  # C + 1: dropped
            S = _compact(S, dest, C)
            slot_pos = _compact(slot_pos, dest, C, NONE)
            slot_death = _compact(slot_death, dest, C, NONE)
        kt, vt, qt = x.k[:, :, t], x.v[:, :, t], x.q[:, :, t]
        decay = x.g[:, :, t, None, None, None].exp()
        if x.beta is None:
            S = decay * S
            w = torch.ones_like(x.g[:, :, t])
        else:
            w = x.beta[:, :, t]
            kS = torch.einsum("nhk,nhckv->nhcv", kt, S)
            S = decay * (S - w[..., None, None, None] * kt[:, :, None, :, None] * kS[:, :, :, None, :])
        write = (w[..., None, None] * kt[..., :, None] * vt[..., None, :])
        S = torch.cat([S[:, :, :1] + write[:, :, None], S[:, :, 1:]], 2)
        filled = slot_death != NONE
        label = _slot_labels(slot_pos, filled, t, ds.label_rule)
        lam_t = x.lam[:, :, t].gather(-1, label) * filled
        outs.append(torch.einsum("nhk,nhckv,nhc->nhv", qt, S, lam_t))
    o = torch.stack(outs, 2) if outs else x.v.new_zeros(N, H, 0, V)
    state = None
    if output_final_state:
        starts = torch.where(slot_death[..., :C] != NONE, slot_pos[..., :C] + ds.position[:, None, None], NONE)
        state = x.final_state(S[:, :, :C], starts, schedule)
    return x.output(o), state


def _compact(x: torch.Tensor, dest: torch.Tensor, C: int, fill=0) -> torch.Tensor:
    """Move slot ``j`` of ``x [N, H, C+1, ...]`` to ``dest[..., j]`` (``C + 1`` = dropped)."""
    shape = dest.shape + x.shape[3:]
    idx = dest.reshape(dest.shape + (1,) * (x.dim() - 3)).expand(shape)
    out = torch.full_like(x, fill)
    out = torch.cat([out, out[:, :, :1]], 2)  # scratch slot for dropped entries
    out = out.scatter(2, idx, x)
    return out[:, :, : C + 1]


def _slot_labels(slot_pos: torch.Tensor, filled: torch.Tensor, t: int, label_rule: str) -> torch.Tensor:
    j = torch.arange(slot_pos.shape[-1], device=slot_pos.device).expand_as(slot_pos)
    if label_rule == "recency":
        return torch.where(filled, j, 0)
    newer_start = torch.cat([torch.full_like(slot_pos[..., :1], t + 1), slot_pos[..., :-1]], -1)
    size = (newer_start - slot_pos).clamp(min=1)
    return torch.where((j == 0) | ~filled, 0, bit_length(size))
