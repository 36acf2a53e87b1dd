"""The Transformer baseline's token mixer: causal softmax attention (SDPA) with rotary embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dla.layers.common import upcast
from dla.varlen import pack, seq_lengths, unpack


@dataclass
class KVCache:
    """Keys (rotary applied) and values of every token seen, one row per sequence: ``[N, H, S, D]``.

    A packed window is stored as dense rows, so a row can hold padding slots; ``valid [N, S]`` marks
    the slots that hold tokens. Slots are chronological within a row. ``length [N]``: tokens seen
    per sequence (the position of its next token).
    """

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    length: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.keys, self.values, self.valid, self.length) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def index_select(self, index: torch.Tensor) -> None:
        """Keep (and reorder, repeat) the sequences ``index`` -- beam search and batch expansion."""
        if self.keys is not None:
            index = index.to(self.keys.device)
            self.keys, self.values = self.keys[index], self.values[index]
            self.valid, self.length = self.valid[index], self.length[index]


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of ``x [N, T, H, D]`` at ``positions [N, T]``."""
    D = x.shape[-1]
    inv_freq = theta ** -(torch.arange(0, D, 2, device=x.device, dtype=upcast(x).dtype) / D)
    angles = positions[..., None].to(inv_freq.dtype) * inv_freq  # [N, T, D/2]
    cos, sin = (torch.cat([angles, angles], -1).cos()[:, :, None], torch.cat([angles, angles], -1).sin()[:, :, None])
    h = upcast(x)
    rotated = torch.cat([-h[..., D // 2:], h[..., : D // 2]], -1)
    return (h * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal attention with rotary position embeddings (``F.scaled_dot_product_attention``).

    Positions count from each sequence's start (packed sequences and cached continuations
    included). ``cache`` (:class:`KVCache`) grows by the keys and values of every call.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, rope_theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        self.num_heads, self.head_dim, self.rope_theta = num_heads, head_dim, rope_theta
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """``x [B, T, hidden]`` (packed: ``B = 1`` and ``cu_seqlens``) -> ``[B, T, hidden]``."""
        B, T, _ = x.shape
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, self.head_dim))
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if cu_seqlens is not None:  # attend within each sequence: one dense row per sequence
            q, k, v = (unpack(t, cu_seqlens) for t in (q, k, v))
            lengths = seq_lengths(cu_seqlens)
        else:
            lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
        N, Tm = q.shape[:2]
        steps = torch.arange(Tm, device=x.device)
        new_valid = steps < lengths[:, None]
        seen = cache.length if cache is not None and cache.length is not None else torch.zeros_like(lengths)
        positions = seen[:, None] + steps
        q, k = rotate(q, positions, self.rope_theta), rotate(k, positions, self.rope_theta)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [N, H, Tm, D]
        valid = new_valid
        if cache is not None:
            if cache.keys is not None:
                k, v = torch.cat([cache.keys, k], 2), torch.cat([cache.values, v], 2)
                valid = torch.cat([cache.valid, new_valid], 1)
            cache.keys, cache.values, cache.valid, cache.length = k, v, valid, seen + lengths
        S = k.shape[2]
        if S == Tm and bool(valid.all()):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            causal = torch.arange(S, device=x.device) <= (S - Tm + steps)[:, None]  # [Tm, S]
            # a padding query attends to everything so that no row is empty; its output is dropped
            mask = (valid[:, None, :] & causal) | ~new_valid[:, :, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        o = o.transpose(1, 2)
        if cu_seqlens is not None:
            o = pack(o, cu_seqlens)
        return self.o_proj(o.flatten(-2))
