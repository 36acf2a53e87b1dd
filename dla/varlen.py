"""Packed variable-length batches (``cu_seqlens``) <-> zero-padded dense rows.

Every op in ``dla`` works on dense rows ``[N, T_max, ...]``, one sequence per row, with
positions counted from each sequence's start. Packed inputs ``[1, T, ...]`` are unpacked on the
way in and packed on the way out; both directions are differentiable index operations.
"""

from __future__ import annotations

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, length: int, device=None) -> None:
    """Raise ``ValueError``/``TypeError`` naming ``cu_seqlens`` if it cannot index a ``[1, length]`` batch."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of int32/int64 offsets on the inputs' device (e.g. "
                        f"torch.tensor([0, 12, 20], dtype=torch.int32)), got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an integer tensor (int32/int64), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if device is not None and not same_device(cu_seqlens.device, torch.device(device)):
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (packed sequences), got {batch}")
    c = cu_seqlens.tolist()
    if c[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {c[0]}")
    if c[-1] != length:
        raise ValueError(f"cu_seqlens must end at the sequence length {length}, got {c[-1]}")
    if any(b < a for a, b in zip(c[:-1], c[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {c}")


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when one of them names no index."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def seq_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def _token_index(cu_seqlens: torch.Tensor):
    """(sequence id, position within the sequence) of every packed token."""
    cu = cu_seqlens.long()
    total = int(cu[-1])
    t = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], t, right=True)
    return seq, t - cu[seq]


def unpack(x: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """``[1, T, ...]`` packed -> ``[N, max_len, ...]`` dense, zero-padded at the end of each row."""
    lengths = seq_lengths(cu_seqlens)
    n = lengths.numel()
    if max_len is None:
        max_len = int(lengths.max()) if n else 0
    seq, pos = _token_index(cu_seqlens)
    out = x.new_zeros((n, max_len) + tuple(x.shape[2:]))
    return out.index_put((seq, pos), x[0])


def pack(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[N, T_max, ...]`` dense -> ``[1, T, ...]`` packed (the inverse of :func:`unpack`)."""
    seq, pos = _token_index(cu_seqlens)
    return x[seq, pos].unsqueeze(0)
