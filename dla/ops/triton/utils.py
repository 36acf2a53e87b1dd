"""Helpers shared by the Triton kernels of :mod:`dla.ops.triton` (host functions and ``@triton.jit``
device functions)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# tests set this to fill kernel outputs with NaN first, so an element a kernel forgets is caught
POISON = os.environ.get("DLA_POISON_OUTPUTS") == "1"


def new_output(shape, like: torch.Tensor) -> torch.Tensor:
    """A float32 output buffer on ``like``'s device: uninitialised, or NaN-filled under ``POISON``."""
    return (torch.full if POISON else torch.empty)(shape, *([float("nan")] if POISON else []),
                                                   dtype=torch.float32, device=like.device)


def padded_size(n: int) -> int:
    """The power-of-two tile size (at least 16, ``tl.dot``'s minimum) that a key or value width
    ``n`` is zero-padded to."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def walk_start(S0_ptr, S_ptr, NC, C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
               KS: tl.constexpr):
    """The program's row ``r`` (program id 0), value columns ``vv`` (block ``program_id(1)`` of
    ``BV``), key rows ``kk`` (split ``program_id(2)`` of ``KS``: ``K / KS`` rows; all ``K`` for
    ``KS = 1``) and the offsets of its ``[K / KS, BV]`` tile in one K x V state; fills that tile of
    the first chunk boundary of the row's states ``S[r] [NC + 1, C, K, V]`` with ``S0[r]``."""
    KW: tl.constexpr = K // KS
    r = tl.program_id(0).to(tl.int64)
    vv = tl.program_id(1) * BV + tl.arange(0, BV)
    kk = tl.program_id(2) * KW + tl.arange(0, KW)
    tile = kk[:, None] * V + vv[None, :]
    S_row = S_ptr + r * (NC + 1) * C * K * V
    for j in range(C):
        tl.store(S_row + j * K * V + tile, tl.load(S0_ptr + r * C * K * V + j * K * V + tile))
    # the stores of S[r, 0] above happen before the walk's first loads of it, which other
    # threads of the program may make (in another layout)
    tl.debug_barrier()
    return r, vv, kk, tile


@triton.jit
def merged_slots(S_in, lo, hi, tile, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Σ of the old slots ``lo..hi`` (the ones merging into one new slot), one ``[BK, BV]`` tile of
    the K x V states (``tile``: its offsets in one state)."""
    acc = tl.zeros((BK, BV), dtype=tl.float32)
    for j in range(lo, hi + 1):
        acc += tl.load(S_in + j * K * V + tile)
    return acc


@triton.jit
def add_or_store(ptr, value, ATOMIC: tl.constexpr, mask=None):
    """Add ``value`` into a sum that several programs share (``ATOMIC``: atomically, in an order
    that varies from run to run), or store it as this program's own partial of that sum, which
    the host adds up in a fixed order (deterministic)."""
    if ATOMIC:
        tl.atomic_add(ptr, value, mask=mask)
    else:
        tl.store(ptr, value, mask=mask)
