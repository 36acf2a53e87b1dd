"""Triton kernels for the bookkeeping and the unfused walks of the chunked path (GPU; CPU via
TRITON_INTERPRET). Everything else in ``dla.ops.chunk`` is parallel over chunks (batched matrix
products) or the fused walk of :mod:`dla.ops.triton.chunk_inter`:

- :func:`carried_slots`: the segments alive at every chunk boundary (positions and deaths), from
  the schedule alone: one program per sequence-head, slots in registers;
- :func:`unit_labels`: from those, the rank and λ label of every chunk's ``C + L`` units at every
  query and the routing at the chunk's end: one program per (sequence-head, chunk), ``[L, C + L]``
  in registers, where the PyTorch bookkeeping builds several int64 tensors of that size per chunk;
- :func:`state_recurrence` (Gated DeltaNet): ``S_{c+1}[n] = M_c Σ_{j -> n} S_c[j] + W_c[n]``
  with a hand-written backward (reverse walk). One program per (sequence-head, value block).
  ``M_c`` is the chunk's K x K transition; ``W_c[n]`` (the chunk's tokens written into slot n)
  is computed outside, in parallel over chunks, on tensor cores. (Mamba-2's scalar decay takes
  the fused walk of :mod:`dla.ops.triton.chunk_inter` instead.)
  Old slot ``j`` goes to new slot ``dest[c, j]``; the sources of a new slot are a contiguous
  range of old slots (merges join neighbours), given as ``[lo, hi]``. ``C`` means "nowhere".
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dla.ops.common import label_dtype, source_ranges
from dla.ops.triton.utils import merged_slots, new_output, padded_size, walk_start
from dla.schedule.schedule import NONE


@triton.jit
def chunk_dla_carried_slots_kernel(sd_ptr, pos_ptr, death_ptr, out_pos_ptr, out_death_ptr, NC,
                                   L: tl.constexpr, C: tl.constexpr, CP: tl.constexpr):
    """The ``C`` segments alive at every chunk boundary of one sequence-head (program ``r``):
    positions and deaths of the slots entering chunk ``c + 1``, newest first, from those entering
    chunk ``c`` and the chunk's tokens (``sd``: the death of the boundary each token starts, -1 if
    none). ``CP`` is ``C`` rounded up to a power of two; slots past ``C`` are masked."""
    r = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, CP)
    in_c = idx < C
    tok = tl.arange(0, L)
    sp = tl.load(pos_ptr + r * C + idx, mask=in_c, other=-1)
    sdth = tl.load(death_ptr + r * C + idx, mask=in_c, other=-1)
    base = out_pos_ptr + r * (NC + 1) * C
    dbase = out_death_ptr + r * (NC + 1) * C
    tl.store(base + idx, sp, mask=in_c)
    tl.store(dbase + idx, sdth, mask=in_c)
    for c in range(NC):
        e = c * L + L - 1
        td = tl.load(sd_ptr + r * NC * L + c * L + tok)
        t_live = (td != -1) & (td > e)
        s_live = (sdth != -1) & (sdth > e) & in_c
        n_tok = tl.sum(t_live.to(tl.int32), axis=0)
        t_rank = n_tok - tl.cumsum(t_live.to(tl.int32), axis=0)  # newer live tokens
        s_rank = n_tok + tl.cumsum(s_live.to(tl.int32), axis=0) - s_live.to(tl.int32)
        out = (c + 1) * C
        tl.store(base + out + t_rank, (c * L + tok).to(tl.int64), mask=t_live & (t_rank < C))
        tl.store(dbase + out + t_rank, td, mask=t_live & (t_rank < C))
        tl.store(base + out + s_rank, sp, mask=s_live & (s_rank < C))
        tl.store(dbase + out + s_rank, sdth, mask=s_live & (s_rank < C))
        # the slots stored above (each thread stores some) are complete before they are loaded
        # back as the next chunk's input (each thread loads others)
        tl.debug_barrier()
        sp = tl.load(base + out + idx, mask=in_c, other=-1)
        sdth = tl.load(dbase + out + idx, mask=in_c, other=-1)


def carried_slots(start_death: torch.Tensor, carried_pos: torch.Tensor, carried_death: torch.Tensor, L: int):
    """``start_death [N, H, NC*L]`` (window coords) -> positions and deaths of the slots alive at
    every chunk boundary, ``[N, H, NC + 1, C]`` (index ``c``: before chunk ``c``)."""
    N, H, T = start_death.shape
    C = carried_pos.shape[-1]
    NC = T // L
    out_pos = torch.full((N, H, NC + 1, C), NONE, dtype=torch.long, device=start_death.device)
    out_death = torch.full_like(out_pos, NONE)
    if N * H:
        chunk_dla_carried_slots_kernel[(N * H,)](start_death.contiguous(), carried_pos.contiguous(),
                                                 carried_death.contiguous(), out_pos, out_death, NC, L=L, C=C,
                                                 CP=triton.next_power_of_2(C), num_warps=1)
    return out_pos, out_death


@triton.jit
def chunk_units(pos_row, death_row, sd_row, m, i, c, C: tl.constexpr, L: tl.constexpr):
    """The units ``m`` of chunk ``c`` (the ``C`` carried slots, oldest first, then the chunk's ``L``
    tokens; past ``C + L`` none) at its queries ``i``: position, whether the unit holds tokens at
    or before the query, and whether its first token starts a segment alive at the query. Slots
    are stored newest first; -1 is ``NONE`` (an empty slot, a token that starts nothing)."""
    carried = m < C
    token = (m >= C) & (m < C + L)
    pos = tl.where(carried, tl.load(pos_row + (C - 1 - m), mask=carried, other=-1), c * L + m - C)
    death = tl.where(carried, tl.load(death_row + (C - 1 - m), mask=carried, other=-1),
                     tl.load(sd_row + c * L + m - C, mask=token, other=-1))
    t = c * L + i
    exists = (carried & (death != -1)) | (token & (m - C <= i))
    live = exists & (death != -1) & (death > t) & (pos <= t)
    return pos, exists, live


@triton.jit
def chunk_dla_unit_labels_kernel(pos_ptr, death_ptr, sd_ptr, label_ptr, dest_ptr, tok_rank_ptr, NC,
                                 L: tl.constexpr, C: tl.constexpr, MP: tl.constexpr, LEVEL: tl.constexpr):
    """Rank and λ label of the ``C + L`` units of chunk ``c`` at each of its queries (program
    ``(r, c)``; :func:`dla.schedule.schedule.segment_structure`'s numbers, computed in registers):
    the rank of a unit is the number of live segment starts after it; its label the rank
    (recency) or, under ``LEVEL``, the bit length of its closed segment's size. Also the routing
    at the chunk's last query: the new slot of every carried slot (``dest``) and of every token
    (``tok_rank``), ``C`` for none. ``MP`` is ``C + L`` rounded up to a power of two."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    rc = r * NC + c
    i = tl.arange(0, L)[:, None]
    m = tl.arange(0, MP)[None, :]
    pos_row = pos_ptr + (rc + r) * C  # the slots entering chunk c: rows hold NC + 1 boundaries
    death_row = death_ptr + (rc + r) * C
    sd_row = sd_ptr + r * NC * L
    pos, exists, live = chunk_units(pos_row, death_row, sd_row, m, i, c, C, L)
    n_live = live.to(tl.int32)
    rank = tl.where(exists, tl.sum(n_live, axis=1)[:, None] - tl.cumsum(n_live, axis=1), 0)  # live starts after
    if LEVEL:
        # the units of rank r are the segment of rank r: its start is the least position among them
        # (its first unit's, which starts it), and the segment of rank r - 1 begins where it ends
        start = tl.zeros((L, MP), dtype=tl.int64)
        end = tl.zeros((L, MP), dtype=tl.int64)
        newer = tl.zeros((L,), dtype=tl.int64)  # the start of the segment of rank r - 1
        for seg in range(C + 1):  # (not r: the program's row, an int64, is named so)
            of_r = exists & (rank == seg)
            first = tl.min(tl.where(of_r, pos, 2 ** 62), axis=1)  # [L]
            start = tl.where(of_r, first[:, None], start)
            end = tl.where(of_r, newer[:, None], end)
            newer = first
        size = tl.maximum(end - start, 1)
        bits = tl.zeros((L, MP), dtype=tl.int32)
        for b in tl.static_range(53):  # bit_length, exact where the reference's (float64) is
            bits += ((size >> b) > 0).to(tl.int32)
        label = tl.where(exists & (rank > 0), bits, 0)
    else:
        label = rank
    tl.store(label_ptr + (rc * L + i) * (C + L) + m, label, mask=m < C + L)
    last = tl.sum(tl.where(i == L - 1, tl.where(exists, rank, C), 0), axis=0)  # [MP]: ranks at the last query
    units = tl.arange(0, MP)
    tl.store(dest_ptr + rc * C + (C - 1 - units), last, mask=units < C)
    tl.store(tok_rank_ptr + rc * L + (units - C), last, mask=(units >= C) & (units < C + L))


def unit_labels(slots_pos: torch.Tensor, slots_death: torch.Tensor, start_death: torch.Tensor, L: int,
                label_rule: str, n_labels: int):
    """:func:`dla.ops.chunk.TORCH_WALKS`' ``unit_labels`` as one Triton program per (sequence-head,
    chunk): ``slots_pos, slots_death [N, H, NC + 1, C]`` (:func:`carried_slots`), ``start_death
    [N, H, NC, L]`` -> ``(label [N, H, NC, L, C + L]`` in the narrowest integer type,
    ``dest [N, H, NC, C]``, ``tok_rank [N, H, NC, L])``."""
    N, H, NC, _ = start_death.shape
    C = slots_pos.shape[-1]
    dev = start_death.device
    label = torch.empty(N, H, NC, L, C + L, dtype=label_dtype(n_labels), device=dev)
    dest = torch.empty(N, H, NC, C, dtype=torch.long, device=dev)
    tok_rank = torch.empty(N, H, NC, L, dtype=torch.long, device=dev)
    MP = triton.next_power_of_2(C + L)
    if N * H * NC:  # 8 warps for [L, MP] tiles of 8K elements or more (L = 64 and C = 30; L = 128)
        chunk_dla_unit_labels_kernel[(N * H, NC)](slots_pos.contiguous(), slots_death.contiguous(),
                                                  start_death.contiguous(), label, dest, tok_rank, NC, L=L, C=C,
                                                  MP=MP, LEVEL=label_rule == "level",
                                                  num_warps=4 if L * MP <= 4096 else 8)
    return label, dest, tok_rank


def fitting_blocks(configs, named_args, **kwargs):
    """Autotuning prune: the configurations whose key and value blocks fit ``K`` and ``V``."""
    K, V = kwargs.get("K", named_args.get("K")), kwargs.get("V", named_args.get("V"))
    return [c for c in configs if c.kwargs["BK"] <= K and c.kwargs["BV"] <= V]


# the forward walk writes every output element, so it can be tuned by re-running it; the backward
# accumulates atomically and in place, so it runs one fixed configuration. (Under the interpreter
# there is nothing to tune.)
STATE_FWD_CONFIGS = [triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=1)
                for bk in (16, 32, 64) for bv in (16, 32) for w in (4, 8)]
if os.environ.get("TRITON_INTERPRET") == "1":
    STATE_FWD_CONFIGS = [triton.Config({"BK": 16, "BV": 16})]


@triton.autotune(configs=STATE_FWD_CONFIGS, key=["C", "K", "V"],
                 prune_configs_by={"early_config_prune": fitting_blocks})
@triton.jit
def chunk_dla_state_fwd_kernel(S0_ptr, S_ptr, lo_ptr, hi_ptr, M_ptr, W_ptr, NC,
                               C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                               BK: tl.constexpr):
    """S[c+1, n] = M_c Σ_{j = lo..hi} S[c, j] + W[c, n]: one program per (row, value block)."""
    r, vv, kk, tile = walk_start(S0_ptr, S_ptr, NC, C, K, V, BV, 1)
    bk = tl.arange(0, BK)
    for c in range(NC):
        rc = r * NC + c  # int64 (r is), so offsets from it do not overflow as c * C*K*V (int32) would
        S_in = S_ptr + (rc + r) * C * K * V  # S[r, c]: rows hold NC + 1 boundaries
        S_out = S_in + C * K * V
        W_c = W_ptr + rc * C * K * V
        for n in range(C):
            acc = merged_slots(S_in, tl.load(lo_ptr + rc * C + n), tl.load(hi_ptr + rc * C + n), tile, K, V, K, BV)
            for kb in tl.static_range(K // BK):
                rows = kb * BK + bk
                M_blk = tl.load(M_ptr + (rc * K + rows[:, None]) * K + kk[None, :])  # [BK, K]
                blk = rows[:, None] * V + vv[None, :]
                out = tl.dot(M_blk, acc, input_precision="ieee") + tl.load(W_c + n * K * V + blk)
                tl.store(S_out + n * K * V + blk, out)
        # S[c + 1] is fully stored before the next chunk loads it as its input (other threads,
        # another layout)
        tl.debug_barrier()


@triton.jit
def chunk_dla_state_bwd_kernel(S_ptr, dS_ptr, lo_ptr, hi_ptr, M_ptr, dM_ptr, NC,
                               C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                               BK: tl.constexpr):
    """Reverse walk. ``dS`` enters holding the gradients w.r.t. every S_c from outside the
    recurrence and leaves holding the total gradients (so dW[c] = dS[c + 1]); dM is accumulated
    atomically over value blocks."""
    r = tl.program_id(0).to(tl.int64)
    vv = tl.program_id(1) * BV + tl.arange(0, BV)
    kk = tl.arange(0, K)
    bk = tl.arange(0, BK)
    tile = kk[:, None] * V + vv[None, :]
    for ci in range(NC):
        c = NC - 1 - ci
        rc = r * NC + c  # int64, as in the forward
        S_in = S_ptr + (rc + r) * C * K * V
        dS_in = dS_ptr + (rc + r) * C * K * V
        dS_out = dS_in + C * K * V
        for n in range(C):
            lo = tl.load(lo_ptr + rc * C + n)
            hi = tl.load(hi_ptr + rc * C + n)
            G = tl.load(dS_out + n * K * V + tile)  # [K, BV]
            acc = merged_slots(S_in, lo, hi, tile, K, V, K, BV)
            for kb in tl.static_range(K // BK):
                rows = kb * BK + bk
                G_blk = tl.load(dS_out + n * K * V + rows[:, None] * V + vv[None, :])  # [BK, BV]
                tl.atomic_add(dM_ptr + (rc * K + rows[:, None]) * K + kk[None, :],
                              tl.dot(G_blk, tl.trans(acc), input_precision="ieee"))
                Mt_blk = tl.load(M_ptr + (rc * K + kk[None, :]) * K + rows[:, None])  # rows of M^T
                dA_blk = tl.dot(Mt_blk, G, input_precision="ieee")
                for j in range(lo, hi + 1):
                    p = dS_in + j * K * V + rows[:, None] * V + vv[None, :]
                    tl.store(p, tl.load(p) + dA_blk)
        # dS[c] is fully updated (read-modify-write above) before the next step, chunk c - 1,
        # loads it as the gradient flowing back
        tl.debug_barrier()


class _StateRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S0, M, W, lo, hi):
        R, NC, C, K, Vd = W.shape
        S = new_output((R, NC + 1, C, K, Vd), S0)
        grid = lambda meta: (R, Vd // meta["BV"])  # noqa: E731
        chunk_dla_state_fwd_kernel[grid](S0, S, lo, hi, M, W, NC, C=C, K=K, V=Vd)
        ctx.save_for_backward(S, M, lo, hi)
        return S

    @staticmethod
    def backward(ctx, dS):
        S, M, lo, hi = ctx.saved_tensors
        R, NC1, C, K, Vd = S.shape
        BV, BK = min(32, Vd), min(32, K)
        dS = dS.float().contiguous().clone()
        dM = torch.zeros_like(M)
        chunk_dla_state_bwd_kernel[(R, Vd // BV)](S, dS, lo, hi, M, dM, NC1 - 1, C=C, K=K, V=Vd, BV=BV, BK=BK,
                                                   num_warps=8)
        return dS[:, 0], dM, dS[:, 1:], None, None


def state_recurrence(S0, M, W, dest):
    """States at every chunk boundary, ``[N, H, NC + 1, C, K, V]`` (float32):
    ``S[c + 1, n] = M_c Σ_{j: dest[c, j] = n} S[c, j] + W[c, n]``, differentiable in ``S0
    [N,H,C,K,V]``, the transitions ``M [N,H,NC,K,K]`` and ``W [N,H,NC,C,K,V]``;
    ``dest [N,H,NC,C]`` routes old slots to new ones (``C`` = nowhere)."""
    N, H, NC, C = dest.shape
    K, Vd = W.shape[-2], W.shape[-1]
    Kp, Vp = padded_size(K), padded_size(Vd)
    lo, hi = source_ranges(dest)
    f32 = torch.float32

    def pad(x, widths):  # zero-pad K and V up to the kernel's power-of-two tiles (no copy if none)
        return torch.nn.functional.pad(x, widths) if any(widths) else x

    S0 = pad(S0.to(f32), (0, Vp - Vd, 0, Kp - K))
    W = pad(W.to(f32), (0, Vp - Vd, 0, Kp - K))
    M = pad(M.to(f32), (0, Kp - K, 0, Kp - K))
    rows = N * H
    S = _StateRecurrence.apply(S0.reshape(rows, C, Kp, Vp).contiguous(), M.reshape(rows, NC, Kp, Kp).contiguous(),
                               W.reshape(rows, NC, C, Kp, Vp).contiguous(),
                               lo.reshape(rows, NC, C).contiguous(), hi.reshape(rows, NC, C).contiguous())
    return S.reshape(N, H, NC + 1, C, Kp, Vp)[..., :K, :Vd]
