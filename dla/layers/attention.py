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
    """Keys (rotary applied) and values of every token seen, one row per sequence, in preallocated
    buffers ``[N, H, S_alloc, D]`` written in place: the first ``size`` slots hold tokens.

    A packed window is stored as dense rows, so a row can hold padding slots; ``valid [N, S_alloc]``
    marks the slots that hold tokens (``dense``: every written slot does, known without reading
    ``valid``). Slots are chronological within a row. ``length [N]``: tokens seen per sequence (the
    position of its next token). ``max_length`` slots are allocated at the first write (more if it
    needs more); when a write does not fit, the buffers double.

    ``static`` (set by :func:`dla.generate` for CUDA graphs): one-token steps write the slot
    ``cursor`` (a device tensor) and attend over every allocated slot with ``valid`` as the mask, so
    a step's shapes and addresses never change and it reads no host value.
    """

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    length: torch.Tensor | None = None
    size: int = 0
    dense: bool = True
    max_length: int | None = None
    static: bool = False
    cursor: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the slots that hold tokens (the allocated but unwritten tail is not counted)."""
        if self.keys is None:
            return 0
        N, H, _, D = self.keys.shape
        per_slot = N * (2 * H * D * self.keys.element_size() + self.valid.element_size())
        return self.size * per_slot + self.length.numel() * self.length.element_size()

    def index_select(self, index: torch.Tensor) -> None:
        """Keep (and reorder, repeat) the sequences ``index`` -- beam search and batch expansion."""
        if self.keys is not None:
            index = index.to(self.keys.device)
            self.keys, self.values = self.keys[index], self.values[index]
            self.valid, self.length = self.valid[index], self.length[index]

    def make_static(self) -> None:
        """Switch one-token steps to the static form (see the class docstring); the buffers must
        already hold every slot the steps will write."""
        self.static = True
        self.cursor = torch.tensor([self.size], device=self.keys.device)

    def append(self, k: torch.Tensor, v: torch.Tensor, new_valid: torch.Tensor, length: torch.Tensor, dense: bool):
        """Write ``k, v [N, H, Tm, D]`` after the held slots; returns the keys, values and validity of
        the slots to attend over (every slot held, or every slot allocated when static)."""
        N, H, Tm, D = k.shape
        if self.static:
            if Tm != 1 or not dense:
                raise ValueError("a static KVCache takes one token per sequence and no padding")
            self.keys.index_copy_(2, self.cursor, k)
            self.values.index_copy_(2, self.cursor, v)
            self.valid.index_fill_(1, self.cursor, True)
            self.cursor.add_(1)
            self.length = length
            self.size += 1
            return self.keys, self.values, self.valid
        need = self.size + Tm
        if self.keys is None or need > self.keys.shape[2]:
            self._grow(N, H, D, k, need)
        self.keys[:, :, self.size:need] = k
        self.values[:, :, self.size:need] = v
        self.valid[:, self.size:need] = new_valid
        self.length, self.size, self.dense = length, need, self.dense and dense
        return self.keys[:, :, :need], self.values[:, :, :need], self.valid[:, :need]

    def _grow(self, N, H, D, like: torch.Tensor, need: int) -> None:
        held = 0 if self.keys is None else self.keys.shape[2]
        slots = max(need, self.max_length or 0, 2 * held)
        # zeros, not garbage: a static step attends over unwritten slots, and a masked NaN still
        # turns its zero weight into NaN
        keys, values = (like.new_zeros(N, H, slots, D) for _ in range(2))
        valid = torch.zeros(N, slots, dtype=torch.bool, device=like.device)
        if self.keys is not None:
            n = self.size
            keys[:, :, :n], values[:, :, :n] = self.keys[:, :, :n], self.values[:, :, :n]
            valid[:, :n] = self.valid[:, :n]
        self.keys, self.values, self.valid = keys, values, valid


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
    included). ``cache`` (:class:`KVCache`) grows by the keys and values of every call. One query
    per sequence against a cache without padding runs SDPA without a mask (its fast path).
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
        # whether every slot attended to holds a token is known on the host: padding only ever
        # enters through a packed window
        valid, dense = new_valid, cu_seqlens is None
        if cache is not None:
            k, v, valid = cache.append(k, v, new_valid, seen + lengths, dense)
            dense = cache.dense and not cache.static
        S = k.shape[2]
        if dense and S == Tm:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif Tm == 1 and cu_seqlens is None:  # one query per sequence: it sees exactly the valid slots
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if dense else valid[:, None, None])
        else:
            causal = torch.arange(S, device=x.device) <= (S - Tm + steps)[:, None]  # [Tm, S]
            # a padding query attends to everything so that no row is empty; its output is dropped
            mask = (valid[:, None, :] & causal) | ~new_valid[:, :, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        o = o.transpose(1, 2)
        if cu_seqlens is not None:
            o = pack(o, cu_seqlens)
        return self.o_proj(o.flatten(-2))
