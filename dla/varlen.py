"""Packed variable-length batches (``cu_seqlens``) <-> zero-padded dense rows.

Every op in ``dla`` works on dense rows ``[N, T_max, ...]``, one sequence per row, with
positions counted from each sequence's start. Packed inputs ``[1, T, ...]`` are unpacked on the
way in and packed on the way out; both directions are differentiable index operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

# cu_seqlens -> (its version, what was derived from it): every layer of a model reads the same offsets
# and unpacks and packs about fifteen tensors with the same index; on a GPU each read of the offsets
# waits until the GPU has run everything queued before it, and the index takes five launches to build
_HOST_OFFSETS = WeakIdKeyDictionary()
_TOKEN_INDEX = WeakIdKeyDictionary()
_SEQ_LENGTHS = WeakIdKeyDictionary()


def _derived_once(cache: WeakIdKeyDictionary, cu_seqlens: torch.Tensor, derive):
    """``derive(cu_seqlens)``, computed once per tensor (again only if it is modified in place) while
    ``cache`` keeps it. What is derived while a CUDA graph is being captured is not kept: its memory
    belongs to the graph's pool."""
    entry = cache.get(cu_seqlens)
    if entry is not None and entry[0] == cu_seqlens._version:
        return entry[1]
    value = derive(cu_seqlens)
    if not (cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing()):
        cache[cu_seqlens] = (cu_seqlens._version, value)
    return value


def host_offsets(cu_seqlens: torch.Tensor) -> list[int]:
    """``cu_seqlens.tolist()``, read from its device once per tensor, so that the layers of a model that
    all take one ``cu_seqlens`` wait for the GPU once, not at every place that needs the offsets."""
    return _derived_once(_HOST_OFFSETS, cu_seqlens, torch.Tensor.tolist)


def max_seq_length(cu_seqlens: torch.Tensor) -> int:
    """The longest sequence's length (0 for no sequence), from :func:`host_offsets`."""
    c = host_offsets(cu_seqlens)
    return max((b - a for a, b in zip(c[:-1], c[1:])), default=0)


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
    c = host_offsets(cu_seqlens)
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
    """The sequences' lengths, ``[N]`` int64 on the device of ``cu_seqlens``: computed once per tensor
    and shared, as :func:`token_index` (the convolution, the planner and the dense schedule of every layer
    read them; never modify them in place)."""
    return _derived_once(_SEQ_LENGTHS, cu_seqlens, lambda cu: (cu[1:] - cu[:-1]).long())


def token_index(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence id, position within the sequence) of every packed token, ``[T]`` int64 each, on the
    device of ``cu_seqlens``: built once per tensor and shared by every unpack and pack of a step (never
    modify them in place)."""
    return _derived_once(_TOKEN_INDEX, cu_seqlens, _build_token_index)


def _build_token_index(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cu = cu_seqlens.long()
    total = host_offsets(cu_seqlens)[-1]
    t = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], t, right=True)
    return seq, t - cu[seq]


def unpack(x: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """``[1, T, ...]`` packed -> ``[N, max_len, ...]`` dense, zero-padded at the end of each row."""
    n = cu_seqlens.numel() - 1
    if max_len is None:
        max_len = max_seq_length(cu_seqlens)
    seq, pos = token_index(cu_seqlens)
    out = x.new_zeros((n, max_len) + tuple(x.shape[2:]))
    return out.index_put((seq, pos), x.squeeze(0))  # (x[0]'s backward would copy the gradient into zeros)


def head_major_rows(x: torch.Tensor, cu_seqlens: torch.Tensor | None, max_len: int | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, T, H, ...]`` (packed: ``[1, T, H, ...]`` with ``cu_seqlens``) -> contiguous head-major rows
    ``[N, H, max_len, ...]`` in ``dtype`` (default: ``x``'s), zero past the end of each sequence;
    differentiable. The values of ``x.to(dtype)``, unpacked, transposed and made contiguous, in one
    copy (a packed input: a conversion and one scatter) instead of up to three. ``max_len`` defaults
    to the longest sequence; a longer one pads the rows with zeros (a dense input: in a pad's copy)."""
    dtype = x.dtype if dtype is None else dtype
    if cu_seqlens is None:
        rows = x.transpose(1, 2)
        if max_len is not None and max_len > x.shape[1]:  # (F.pad's copy is contiguous)
            return F.pad(rows.to(dtype), (0, 0) * (x.dim() - 3) + (0, max_len - x.shape[1]))
        # (``to`` with a memory format but no conversion would return the transposed view itself)
        return rows.contiguous() if dtype == x.dtype else rows.to(dtype, memory_format=torch.contiguous_format)
    seq, pos = token_index(cu_seqlens)
    if max_len is None:
        max_len = max_seq_length(cu_seqlens)
    out = x.new_zeros((cu_seqlens.numel() - 1, x.shape[2], max_len) + tuple(x.shape[3:]), dtype=dtype)
    tokens = x.squeeze(0).to(dtype)  # (x[0]'s backward would copy the gradient into zeros)
    if torch.is_grad_enabled() and tokens.requires_grad:
        # out of place: autograd's backward of an in-place write into a view costs more than the copy
        # it saves; the result keeps the strides of the transposed zeros, so it is head-major contiguous
        return out.transpose(1, 2).index_put((seq, pos), tokens).transpose(1, 2)
    out.transpose(1, 2).index_put_((seq, pos), tokens)  # writes into out, which stays contiguous
    return out


def pack(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[N, T_max, ...]`` dense -> ``[1, T, ...]`` packed (the inverse of :func:`unpack`)."""
    seq, pos = token_index(cu_seqlens)
    return x[seq, pos].unsqueeze(0)


def unpack_heads(x: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, fill) -> torch.Tensor:
    """``[1, H, T]`` packed, heads first (a schedule's layout) -> ``[N, H, max_len]`` contiguous rows,
    ``fill`` past the end of each sequence."""
    seq, pos = token_index(cu_seqlens)
    out = x.new_full((cu_seqlens.numel() - 1, x.shape[1], max_len), fill)
    out.transpose(1, 2).index_put_((seq, pos), x[0].transpose(0, 1))  # writes into out, which stays contiguous
    return out


def pack_heads(rows: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[N, H, T_max]`` rows -> ``[1, H, T]`` packed, contiguous (the inverse of :func:`unpack_heads`)."""
    seq, pos = token_index(cu_seqlens)
    return rows.transpose(0, 1)[:, seq, pos].unsqueeze(0).contiguous()
