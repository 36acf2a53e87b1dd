"""The O(T^2) reference: build the exact pairwise coefficient matrix and Λ, then one product.

Per (query t, key s <= t) the contribution of token s to the state at t is
``C[t,s] = A_t ... A_{s+1} w_s k_s v_s^T``, so ``o_t = scale * sum_s λ_t^{ℓ(t,s)} P[t,s] v_s``
with the scalar ``P[t,s] = w_s q_t^T A_t ... A_{s+1} k_s`` (spec §1-2).
"""

from __future__ import annotations

import torch

from dla.ops.common import prepare
from dla.schedule.schedule import pairwise_structure


def pairwise_coefficients(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor,
                          beta: torch.Tensor | None) -> torch.Tensor:
    """``P [N, H, T, T]`` (zero above the diagonal) for head-major rows ``q, k [N, H, T, K]``.

    Mamba-2 (``beta=None``): ``P = (q k^T) * exp(G_t - G_s)``. Gated DeltaNet: the vectors
    ``x_s = A_t ... A_{s+1} k_s`` for all ``s <= t`` are carried forward one step at a time, each
    step applying ``A_t = exp(g_t)(I - β_t k_t k_t^T)`` to all of them (O(T^2 K) in total).
    """
    T = q.shape[2]
    if beta is None:
        G = g.cumsum(-1)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        decay = torch.where(causal, G[..., :, None] - G[..., None, :], -torch.inf).exp()
        return (q @ k.transpose(-1, -2)) * decay
    X = q.new_zeros(q.shape[:2] + (q.shape[-1], T))  # columns x_s, zero for s > t
    eye = torch.eye(T, dtype=q.dtype, device=q.device)
    rows = []
    for t in range(T):
        kt = k[:, :, t]
        X = g[:, :, t, None, None].exp() * (X - beta[:, :, t, None, None] * kt[..., None] * (kt[..., None, :] @ X))
        X = X + kt[..., None] * eye[t]
        rows.append((q[:, :, t, None, :] @ X).squeeze(-2) * beta)
    return torch.stack(rows, 2) if rows else q.new_zeros(q.shape[:2] + (0, 0))


def naive_dla(q, k, v, g, lam, schedule, beta=None, scale=None, cu_seqlens=None) -> torch.Tensor:
    """Dynamic Linear Attention by its definition, O(T^2): returns ``o [B, T, H, V]``.

    Ground truth for tests; memory grows as T^2 (use ``chunk_dla`` for long sequences).
    """
    x = prepare(q, k, v, g, lam, schedule, beta, scale, cu_seqlens)
    P = pairwise_coefficients(x.q, x.k, x.g, x.beta)
    label = pairwise_structure(x.schedule)["label"]
    Lam = x.lam.gather(-1, label.clamp(min=0)) * (label >= 0)
    return x.output((P * Lam) @ x.v)
