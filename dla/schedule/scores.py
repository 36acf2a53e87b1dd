"""Token information scores ``u_t in [0, 1]`` for the ``dynamic`` policy (spec §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dla.varlen import check_cu_seqlens


def novelty_scores(k: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                   prev_key: torch.Tensor | None = None, differentiable: bool = False) -> torch.Tensor:
    """``u_t = (1 - cos(k_t, k_{t-1})) / 2`` per head, ``[B, T, H]``.

    ``u`` is 1 at every sequence start, unless ``prev_key`` (``[N, H, K]``, the last key of the
    previous window of each sequence, as kept in :class:`dla.DLAState`) continues the sequence.
    Computed in float32 (float64 for float64 keys); no gradient flows through the schedule, so the
    keys are detached unless ``differentiable`` (soft gating).
    """
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"k must be a tensor [B, T, H, K], got {getattr(k, 'shape', type(k))}")
    B, T, H, K = k.shape
    check_cu_seqlens(cu_seqlens, B, T, k.device)
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    k = (k if differentiable else k.detach()).to(dtype)
    prev = torch.cat([torch.zeros_like(k[:, :1]), k[:, :-1]], 1)
    starts = torch.zeros(B, T, dtype=torch.bool, device=k.device)
    if cu_seqlens is None:
        starts[:, :1] = True
        start_rows, start_cols = torch.arange(B, device=k.device), torch.zeros(B, dtype=torch.long, device=k.device)
    else:
        start_cols = cu_seqlens[:-1].long().clamp(max=max(T - 1, 0))
        start_rows = torch.zeros_like(start_cols)
        nonempty = cu_seqlens[1:] > cu_seqlens[:-1]
        starts[start_rows[nonempty], start_cols[nonempty]] = True
    if prev_key is not None:
        if not isinstance(prev_key, torch.Tensor):
            raise TypeError(f"prev_key must be a torch.Tensor, got {type(prev_key).__name__}")
        n = start_cols.numel()
        if prev_key.shape != (n, H, K):
            raise ValueError(f"prev_key must be [{n}, {H}, {K}], got {tuple(prev_key.shape)}")
        prev_key = prev_key.detach().to(dtype)
        if cu_seqlens is not None:  # an empty sequence has no first token to continue
            start_rows, start_cols, prev_key = start_rows[nonempty], start_cols[nonempty], prev_key[nonempty]
        prev = prev.index_put((start_rows, start_cols), prev_key)
    u = (1 - F.cosine_similarity(k, prev, dim=-1, eps=1e-6)) / 2
    if prev_key is None:
        u = torch.where(starts[..., None], torch.ones_like(u), u)
    return u.clamp(0, 1)
