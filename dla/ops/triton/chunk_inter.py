"""The inter-chunk part of the chunked path fused into one walk (Triton).

For every sequence-head the walk over chunks ``c`` does, with ``S_c[j]`` the ``C`` carried
states entering chunk ``c``:

- read-out: ``o[c] = Σ_j (λ[c, :, j] ⊙ Q_eff[c]) S_c[j]`` (``[L, K] @ [K, V]`` per slot);
- state update: ``S_{c+1}[n] = M_c Σ_{j -> n} S_c[j] + X_c^T diag(1[rank_s = n]) V_c``, where
  ``X_c[s] = A_end ... A_{s+1} k_s`` (the token's key decayed to the chunk's end) and ``M_c``, the
  chunk's transition ``A_end ... A_start``, is a scalar decay (Mamba-2) or a ``K x K`` matrix
  (Gated DeltaNet, whose ``X_c`` also carries the UT transform).

The unfused PyTorch path builds the weighted queries ``λ ⊙ Q_eff`` (``T·C·K``) and the token
writes (``T/L · C·K·V``) as tensors and reads them back; here both exist only in registers. The
forward keeps the states (fp32) only at every ``G``-th chunk boundary and the last, the
checkpoints (``(T/L/G + 1) · C·K·V``, :func:`checkpoint_group`); the backward walk goes over
groups of ``G`` chunks from the last, recomputes a group's states from its checkpoint (the
forward's state update, one shared function, so bit for bit the same) and then, in reverse, turns
``dS_{c+1}`` into the gradients of the token writes (``dX``, ``dV``), of the read-out (``dQ_eff``,
``dλ``) and of the decay, and ``dS_c``.
One program per (sequence-head, value block, key split); gradients that sum over value blocks
(``dQ_eff``, ``dλ``, ``dX``, ``dM``) are accumulated atomically, or, under
``torch.use_deterministic_algorithms(True)``, stored as one partial per program and summed in
PyTorch (a fixed order: bitwise repeatable). With a scalar decay the key rows of a state never mix,
so a program may walk ``K / KS`` of them (:func:`key_splits`; more programs for a walk that has
few rows): the read-out ``o`` and ``dV``, which sum over key rows, are written as one partial per
split and summed in PyTorch, and ``dλ`` and ``dM`` also sum over the splits. The ``K x K``
transition couples the rows: Gated DeltaNet walks whole K.
The read-out, the transition and the gradients run over blocks of ``BK`` key rows, so no
per-token ``[L, K]`` tile of queries or gradients stays in registers (at K = 256 those spilled:
benchmarks/kernel_resources.py); the scalar state update holds its split's ``K / KS`` rows whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dla.ops.common import source_ranges
from dla.ops.triton.utils import add_or_store, merged_slots, new_output, padded_size, walk_start

INTER_FWD_CONFIGS = [triton.Config({"BV": bv}, num_warps=w, num_stages=1) for bv in (16, 32, 64) for w in (4, 8)]
if os.environ.get("TRITON_INTERPRET") == "1":
    INTER_FWD_CONFIGS = [triton.Config({"BV": 16})]


def fitting_value_blocks(configs, named_args, **kwargs):
    """Autotuning prune: the configurations whose value block fits ``V``."""
    V = kwargs.get("V", named_args.get("V"))
    return [c for c in configs if c.kwargs["BV"] <= V]


@triton.jit
def boundary_states(S_ptr, scratch_ptr, r, b, NC, GROUP, slot, SLOTS, C: tl.constexpr, K: tl.constexpr,
                    V: tl.constexpr):
    """Where the states ``[C, K, V]`` of row ``r`` at chunk boundary ``b`` lie: in the checkpoints
    ``S [rows, cdiv(NC, GROUP) + 1, C, K, V]`` when ``b`` is a multiple of ``GROUP`` or the last
    boundary ``NC``, else in slot ``slot`` of the row's ``SLOTS`` boundaries of ``scratch``."""
    if ((b % GROUP) == 0) | (b == NC):
        states = S_ptr + (r * (tl.cdiv(NC, GROUP) + 1) + tl.cdiv(b, GROUP)) * C * K * V
    else:
        states = scratch_ptr + (r * SLOTS + slot) * C * K * V
    return states


@triton.jit
def walk_state_update(S_in, S_out, x_ptr, v_ptr, rank_ptr, M_ptr, lo_ptr, hi_ptr, rc, vv, k0,
                      L: tl.constexpr, C: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                      BK: tl.constexpr, KW: tl.constexpr, PREC: tl.constexpr, MATRIX: tl.constexpr):
    """The states after chunk ``rc`` (``S_out``, value columns ``vv``, the ``KW`` key rows from
    ``k0``) from those before it (``S_in``): every new slot is the merged old slots times the
    transition ``M_c`` plus the chunk's token writes. The forward walk runs it after each read-out
    and the backward walk reruns it from a checkpoint: one code, so the recomputed states equal the
    forward's bit for bit. With a scalar ``M_c`` a key row depends on that row alone, so a program
    may hold any ``KW`` of them (a key split); the ``K x K`` transition (``MATRIX``) needs all:
    ``KW = K``, ``k0 = 0``."""
    tl.static_assert(KW == K or not MATRIX, "the K x K transition couples all key rows: no key splits")
    tok = rc * L + tl.arange(0, L)
    kk = k0 + tl.arange(0, KW)
    bk = tl.arange(0, BK)
    tile = kk[:, None] * V + vv[None, :]
    rank = tl.load(rank_ptr + tok)
    vals = tl.load(v_ptr + tok[:, None] * V + vv[None, :])  # [L, BV]
    xt = tl.load(x_ptr + tok[None, :] * K + kk[:, None])  # [KW, L] (unused, so not loaded, if MATRIX)
    for n in range(C):
        merged = merged_slots(S_in, tl.load(lo_ptr + rc * C + n), tl.load(hi_ptr + rc * C + n), tile, K, V, KW, BV)
        mine = rank == n
        writes = tl.max(mine.to(tl.int32), axis=0) > 0  # the chunk writes tokens into slot n
        mine_vals = tl.where(mine[:, None], vals, 0.0)
        if MATRIX:  # M_c [K, K] applied in blocks of BK rows (tf32 for bf16 inputs: docs/kernels.md)
            for kb in range(K // BK):
                rows = kb * BK + bk
                M_blk = tl.load(M_ptr + (rc * K + rows[:, None]) * K + kk[None, :])  # [BK, K]
                out = tl.dot(M_blk, merged, input_precision=PREC)
                if writes:
                    xt_blk = tl.load(x_ptr + tok[None, :] * K + rows[:, None])  # [BK, L]
                    out += tl.dot(xt_blk, mine_vals, input_precision=PREC)
                tl.store(S_out + n * K * V + rows[:, None] * V + vv[None, :], out)
        else:
            acc = tl.load(M_ptr + rc) * merged
            if writes:
                acc += tl.dot(xt, mine_vals, input_precision=PREC)
            tl.store(S_out + n * K * V + tile, acc)


@triton.autotune(configs=INTER_FWD_CONFIGS, key=["C", "K", "V", "L", "KS", "PREC", "MATRIX"],
                 prune_configs_by={"early_config_prune": fitting_value_blocks})
@triton.jit
def chunk_dla_inter_fwd_kernel(qe_ptr, lam_ptr, x_ptr, v_ptr, rank_ptr, M_ptr, lo_ptr, hi_ptr, S0_ptr, S_ptr,
                               ring_ptr, o_ptr, NC, GROUP, L: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                               V: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr,
                               PREC: tl.constexpr, MATRIX: tl.constexpr):
    """Forward walk over the ``NC`` chunks of one row (sequence-head), value columns ``vv`` and
    key rows ``k0 .. k0 + K / KS`` (split ``i_k`` of ``KS``): per chunk the read-out ``o`` of the
    carried states, then the states after the chunk (merged old slots times the transition
    ``M_c``, plus the chunk's token writes). ``MATRIX``: ``M_c`` is ``K x K`` (Gated DeltaNet, one
    split only), else a scalar (Mamba-2). ``PREC``: ``tl.dot``'s input precision. The states at
    every ``GROUP``-th chunk boundary and at the last are kept in ``S`` (the checkpoints of the
    backward walk); those between pass through the row's two boundaries of ``ring``. ``o`` is
    ``[R, NC, L, V]`` for ``KS = 1``, else the splits' partial read-outs ``[KS, R, NC, L, V]``
    (the host sums them)."""
    tl.static_assert(KS == 1 or not MATRIX, "the K x K transition couples all key rows: no key splits")
    KW: tl.constexpr = K // KS  # key rows per split
    r, vv, _, _ = walk_start(S0_ptr, S_ptr, tl.cdiv(NC, GROUP), C, K, V, BV, KS)  # rows hold cdiv(NC, GROUP) + 1
    i_k = tl.program_id(2)
    k0 = i_k * KW
    o_ptr += (i_k * tl.num_programs(0)).to(tl.int64) * NC * L * V  # the split's partial read-out
    ll = tl.arange(0, L)
    bk = tl.arange(0, BK)
    for c in range(NC):
        rc = r * NC + c  # int64 (r is), so offsets from it do not overflow as c * C*K*V (int32) would
        S_in = boundary_states(S_ptr, ring_ptr, r, c, NC, GROUP, c % 2, 2, C, K, V)
        S_out = boundary_states(S_ptr, ring_ptr, r, c + 1, NC, GROUP, (c + 1) % 2, 2, C, K, V)
        tok = rc * L + ll
        o = tl.zeros((L, BV), dtype=tl.float32)
        for kb in range(KW // BK):  # blocks of key rows: a whole [L, K] query tile spills at K = 256
            rows = k0 + kb * BK + bk
            qe = tl.load(qe_ptr + tok[:, None] * K + rows[None, :])  # [L, BK]
            for j in range(C):
                lam_j = tl.load(lam_ptr + tok * C + j)
                S_blk = tl.load(S_in + j * K * V + rows[:, None] * V + vv[None, :])  # [BK, BV]
                o += tl.dot(qe * lam_j[:, None], S_blk, input_precision=PREC)
        tl.store(o_ptr + tok[:, None] * V + vv[None, :], o)
        walk_state_update(S_in, S_out, x_ptr, v_ptr, rank_ptr, M_ptr, lo_ptr, hi_ptr, rc, vv, k0,
                          L, C, K, V, BV, BK, KW, PREC, MATRIX)
        # the states after chunk c are fully stored before the next chunk loads them as S_in (other
        # threads, another layout), and this chunk's loads of S_in are done before the ring slot
        # that holds it is overwritten two chunks on
        tl.debug_barrier()


@triton.jit
def chunk_dla_inter_bwd_kernel(qe_ptr, lam_ptr, x_ptr, v_ptr, rank_ptr, M_ptr, lo_ptr, hi_ptr, dest_ptr, S_ptr,
                               scratch_ptr, do_ptr, G_ptr, dqe_ptr, dlam_ptr, dx_ptr, dv_ptr, dM_ptr, NC, GROUP,
                               L: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                               BV: tl.constexpr, BK: tl.constexpr, KS: tl.constexpr, PREC: tl.constexpr,
                               MATRIX: tl.constexpr, ATOMIC: tl.constexpr):
    """Reverse walk of :func:`chunk_dla_inter_fwd_kernel`, over groups of ``GROUP`` chunks from
    the last: the states inside a group are recomputed from its checkpoint in ``S`` (the forward's
    state update without the read-out) into the row's ``GROUP - 1`` boundaries of ``scratch``,
    then its chunks are walked in reverse. ``G`` ([rows, 2, C, K, V]) enters with ``dS_NC`` (the
    final state's gradient) in its first half and leaves with ``dS_0`` in half ``NC % 2``; the two
    halves alternate as ``dS_{c+1}`` (read) and ``dS_c`` (written). A program holds the key rows
    ``k0 .. k0 + K / KS`` (split ``i_k`` of ``KS``; ``KS = 1`` when ``MATRIX``) of the states and
    their gradients. ``dv`` is stored, as the splits' partials ``[KS, R, NC, L, V]`` when ``KS >
    1`` (the host sums them). ``dqe``, ``dlam``, ``dx`` and ``dM`` sum over value blocks (and
    ``dlam``, ``dM`` over splits): with ``ATOMIC`` the programs add into one buffer (the order of
    the adds varies from run to run), else each program stores its own partial, ``dqe`` and ``dx``
    at value block ``i_v`` of ``[NV, R, NC, L, K]``, ``dlam`` and ``dM`` at ``i_v * KS + i_k`` of
    ``[NV * KS, R, NC, ...]``, and the host sums them in a fixed order (deterministic). ``CP``: ``C``
    rounded up to a power of two (``dlam``'s register tile)."""
    tl.static_assert(KS == 1 or not MATRIX, "the K x K transition couples all key rows: no key splits")
    KW: tl.constexpr = K // KS  # key rows per split
    r = tl.program_id(0).to(tl.int64)
    vv = tl.program_id(1) * BV + tl.arange(0, BV)
    i_v, i_k = tl.program_id(1), tl.program_id(2)
    k0 = i_k * KW
    rows_all = tl.num_programs(0).to(tl.int64)
    dv_ptr += i_k * rows_all * NC * L * V  # the split's partial dv
    if not ATOMIC:  # this program's partials of the sums over value blocks and splits
        dqe_ptr += i_v * rows_all * NC * L * K
        dx_ptr += i_v * rows_all * NC * L * K
        dlam_ptr += (i_v * KS + i_k) * rows_all * NC * L * C
        dM_ptr += (i_v * KS + i_k) * rows_all * NC * (K * K if MATRIX else 1)
    cc = tl.arange(0, CP)
    ll = tl.arange(0, L)
    bk = tl.arange(0, BK)
    BT: tl.constexpr = 128 if K > 128 else K  # columns of a transition tile: [BK, 256] ones spill
    bt = tl.arange(0, BT)
    G_row = G_ptr + r * 2 * C * K * V
    groups = tl.cdiv(NC, GROUP)
    for gi in range(groups):
        c_first = (groups - 1 - gi) * GROUP
        c_end = tl.minimum(c_first + GROUP, NC)
        # the boundaries c_first + 1 .. c_end - 1 (scratch slot b - c_first - 1) from the checkpoint
        for c in range(c_first, c_end - 1):
            S_in = boundary_states(S_ptr, scratch_ptr, r, c, NC, GROUP, c - c_first - 1, GROUP - 1, C, K, V)
            S_out = boundary_states(S_ptr, scratch_ptr, r, c + 1, NC, GROUP, c - c_first, GROUP - 1, C, K, V)
            walk_state_update(S_in, S_out, x_ptr, v_ptr, rank_ptr, M_ptr, lo_ptr, hi_ptr, r * NC + c, vv, k0,
                              L, C, K, V, BV, BK, KW, PREC, MATRIX)
            # the boundary is fully stored before the next update (or the reverse steps) load it
            # (other threads, another layout)
            tl.debug_barrier()
        for cg in range(c_end - c_first):
            c = c_end - 1 - cg
            ci = NC - 1 - c  # reverse steps so far: the parity of the gradient halves
            rc = r * NC + c  # int64, as in the forward
            S_in = boundary_states(S_ptr, scratch_ptr, r, c, NC, GROUP, c - c_first - 1, GROUP - 1, C, K, V)
            G_out = G_row + (ci % 2) * C * K * V  # dS_{c+1}
            G_in = G_row + ((ci + 1) % 2) * C * K * V  # dS_c, written here
            tok = rc * L + ll
            # Everything below runs over blocks of BK key rows, so no [L, K] or [K, K] tile is ever
            # held: at K = 256 those spill (benchmarks/kernel_resources.py). The transition's products
            # use [BK, BT] and [BT, BV] tiles (BT = K up to 128): one dot per slot and block at K = 128
            # instead of K / BK small ones, each with its own trip through shared memory.
            # token writes: W[n] = X^T diag(rank = n) V
            rank = tl.load(rank_ptr + tok)
            vals = tl.load(v_ptr + tok[:, None] * V + vv[None, :])  # [L, BV]
            dv = tl.zeros((L, BV), dtype=tl.float32)
            for kb in range(KW // BK):
                rows = k0 + kb * BK + bk
                x = tl.load(x_ptr + tok[:, None] * K + rows[None, :])  # [L, BK]
                dx = tl.zeros((L, BK), dtype=tl.float32)
                for n in range(C):
                    mine = rank == n
                    if tl.max(mine.to(tl.int32), axis=0) > 0:
                        Gn = tl.load(G_out + n * K * V + rows[:, None] * V + vv[None, :])  # [BK, BV]
                        dv += tl.where(mine[:, None], tl.dot(x, Gn, input_precision=PREC), 0.0)
                        dx += tl.where(mine[:, None], tl.dot(vals, tl.trans(Gn), input_precision=PREC), 0.0)
                add_or_store(dx_ptr + tok[:, None] * K + rows[None, :], dx, ATOMIC)
            tl.store(dv_ptr + tok[:, None] * V + vv[None, :], dv)
            # read-out and merges, per carried slot j
            do = tl.load(do_ptr + tok[:, None] * V + vv[None, :])  # [L, BV]
            m_c = tl.load(M_ptr + rc)  # the scalar transition (read, unused, when MATRIX)
            dm_c = tl.zeros((BV,), dtype=tl.float32)
            dlam = tl.zeros((L, CP), dtype=tl.float32)  # summed over key blocks here, over programs below
            for kb in range(KW // BK):
                rows = k0 + kb * BK + bk
                qe = tl.load(qe_ptr + tok[:, None] * K + rows[None, :])  # [L, BK]
                dqe = tl.zeros((L, BK), dtype=tl.float32)
                for j in range(C):
                    Sj = tl.load(S_in + j * K * V + rows[:, None] * V + vv[None, :])  # [BK, BV]
                    lam_j = tl.load(lam_ptr + tok * C + j)
                    dqs = tl.dot(do, tl.trans(Sj), input_precision=PREC)  # [L, BK]: dO S_j^T
                    dqe += lam_j[:, None] * dqs
                    dlam += tl.where(cc[None, :] == j, tl.sum(qe * dqs, axis=1)[:, None], 0.0)
                    dSj = tl.dot(tl.trans(qe * lam_j[:, None]), do, input_precision=PREC)  # [BK, BV]
                    n = tl.load(dest_ptr + rc * C + j)
                    if n < C:
                        if MATRIX:  # S_{c+1}[n] = M_c (... + S_c[j] + ...): dS_c[j] += M_c^T G_n (dM_c below)
                            for kt in range(K // BT):
                                cols = kt * BT + bt
                                Gn = tl.load(G_out + n * K * V + cols[:, None] * V + vv[None, :])  # [BT, BV]
                                Mt = tl.load(M_ptr + (rc * K + cols[None, :]) * K + rows[:, None])  # [BK, BT]: M^T
                                dSj += tl.dot(Mt, Gn, input_precision=PREC)
                        else:
                            Gn = tl.load(G_out + n * K * V + rows[:, None] * V + vv[None, :])
                            dm_c += tl.sum(Gn * Sj, axis=0)
                            dSj += m_c * Gn
                    tl.store(G_in + j * K * V + rows[:, None] * V + vv[None, :], dSj)
                add_or_store(dqe_ptr + tok[:, None] * K + rows[None, :], dqe, ATOMIC)
            add_or_store(dlam_ptr + tok[:, None] * C + cc[None, :], dlam, ATOMIC, cc[None, :] < C)
            if MATRIX:
                # dM_c = sum_j G_{dest j} S_c[j]^T, one [BK, BT] block at a time summed over the slots in
                # registers: one atomic add per block, not one per slot
                for ka in range(K // BK):
                    rows_a = ka * BK + bk
                    for kt in range(K // BT):
                        cols = kt * BT + bt
                        dM = tl.zeros((BK, BT), dtype=tl.float32)
                        for j in range(C):
                            n = tl.load(dest_ptr + rc * C + j)
                            if n < C:
                                G_blk = tl.load(G_out + n * K * V + rows_a[:, None] * V + vv[None, :])  # [BK, BV]
                                St = tl.load(S_in + j * K * V + cols[None, :] * V + vv[:, None])  # [BV, BT]: S_c[j]^T
                                dM += tl.dot(G_blk, St, input_precision=PREC)
                        add_or_store(dM_ptr + (rc * K + rows_a[:, None]) * K + cols[None, :], dM, ATOMIC)
            else:
                add_or_store(dM_ptr + rc, tl.sum(dm_c, axis=0), ATOMIC)
            # dS_c (G_in) is fully stored, and this chunk's loads of dS_{c+1} (G_out) are done, before
            # the next step reads G_in as its dS_{c+1} and overwrites G_out with its dS_c; this
            # group's loads of scratch are done before the next group recomputes into it
            tl.debug_barrier()


def input_precision(dtype) -> str:
    """``tl.dot``'s input precision: IEEE for fp32 inputs (the 1e-5 contract), tf32 below."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def key_block(K: int, matrix: bool) -> int:
    """Key rows per block of the walks: whole-K blocks for the scalar walk at K <= 128 (fewer,
    larger dots, each with one trip through shared memory), 32 for the Gated DeltaNet walk, which
    also holds transition tiles, and at K = 256, where larger blocks spill. Measurements:
    docs/kernels.md. The environment variable DLA_WALK_KEY_BLOCK overrides it."""
    default = 128 if K <= 128 and not matrix else 32
    block = int(os.environ.get("DLA_WALK_KEY_BLOCK", default))
    if block < 16 or block & (block - 1):
        raise ValueError(f"DLA_WALK_KEY_BLOCK must be a power of two >= 16, got {block}")
    return min(block, K)


# the scalar walk's key splits: in the 125M DLA-Mamba-2 step at 4K tokens (H100, Triton 3.6) two
# splits took the forward walk from 31.9 to 24.0 ms and the backward from 93.3 to 85.6 ms; four
# took the backward to 106.6 ms (docs/kernels.md)
DEFAULT_KEY_SPLITS = 2


def key_splits(K: int, matrix: bool) -> int:
    """Key splits of the walks: programs per (sequence-head, value block), each walking ``K / KS``
    of the state's key rows. With a scalar decay (Mamba-2) the key rows of a state never mix, so
    only the read-out ``o`` and ``dv`` sum over splits (per-split partials, summed by the host);
    the splits give the walks, latency-bound with few programs (a row per sequence-head), ``KS``
    times the programs. Gated DeltaNet's ``K x K`` transition couples the rows: always 1 there.
    The environment variable DLA_WALK_KEY_SPLITS sets it (a power of two leaving at least 16 rows
    per split, ``tl.dot``'s minimum; read at every call, the forward's and the backward's); by
    default :data:`DEFAULT_KEY_SPLITS`, fewer where ``K`` is too narrow for them."""
    value = os.environ.get("DLA_WALK_KEY_SPLITS")
    if value is None:
        return 1 if matrix else max(1, min(DEFAULT_KEY_SPLITS, K // 16))
    try:
        splits = int(value)
    except ValueError:
        splits = 0
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"DLA_WALK_KEY_SPLITS must be a power of two, got {value!r}")
    if matrix:
        return 1
    if K // splits < 16:
        raise ValueError(f"DLA_WALK_KEY_SPLITS={splits} leaves {K // splits} of the {K} (padded) key rows per split: "
                         "fewer than 16")
    return splits


def key_tiles(K: int, matrix: bool) -> tuple[int, int]:
    """The walks' key splits and key block: ``(KS, BK)``, :func:`key_splits` and :func:`key_block`
    within a split's ``K / KS`` rows."""
    splits = key_splits(K, matrix)
    return splits, min(key_block(K, matrix), K // splits)


def atomic_sums(value_blocks: int, splits: int) -> bool:
    """Whether the backward walk adds ``dqe`` and ``dx`` (summed over the value blocks) and ``dlam`` and
    ``dM`` (also over the key splits) atomically into zeroed buffers; else every program stores its own
    partial and the host adds them up in a fixed order: under deterministic algorithms, and where one
    program covers a row (nothing to add)."""
    return value_blocks * splits > 1 and not torch.are_deterministic_algorithms_enabled()


def checkpoint_group(NC: int, group: int | None = None) -> int:
    """Chunks per state checkpoint of the fused walk: the forward keeps the states at every
    ``group``-th chunk boundary (and the last) for the backward, which recomputes the ``group - 1``
    boundaries between two checkpoints from the first, one group at a time. The states kept
    are then ``NC / group + 1`` boundaries plus ``group - 1`` of scratch per row (2 in the forward),
    against ``NC + 1`` for ``group = 1`` (every boundary, no recomputation), and the backward reruns
    the state update (not the read-out) of all but one chunk per group. The default 8 is about
    ``sqrt(NC)`` (least memory) at 64 chunks, 4K tokens per sequence; ``group``, else the
    environment variable DLA_WALK_CHECKPOINT_GROUP, overrides it. A power of two, at most
    ``NC`` rounded up to one (larger groups would only hold unused scratch)."""
    if group is None:
        group = int(os.environ.get("DLA_WALK_CHECKPOINT_GROUP", 8))
    if group < 1 or group & (group - 1):
        raise ValueError(f"the checkpoint group (DLA_WALK_CHECKPOINT_GROUP) must be a power of two, got {group}")
    return min(group, triton.next_power_of_2(NC))


@dataclass(frozen=True)
class WalkRows:
    """The fused walk's inputs in the kernels' layout: float32, contiguous, one row per
    sequence-head ``[R, ...]``, K and V zero-padded to power-of-two tiles (:func:`walk_rows`)."""

    qe: torch.Tensor  # [R, NC, L, Kp]
    lam: torch.Tensor  # [R, NC, L, C]
    x: torch.Tensor  # [R, NC, L, Kp]
    v: torch.Tensor  # [R, NC, L, Vp]
    M: torch.Tensor  # [R, NC] or [R, NC, Kp, Kp]
    rank: torch.Tensor  # int32 [R, NC, L]
    lo: torch.Tensor  # int32 [R, NC, C]
    hi: torch.Tensor  # int32 [R, NC, C]
    dest: torch.Tensor  # int32 [R, NC, C]


def padded_rows(t: torch.Tensor, pad=()) -> torch.Tensor:
    """``t [N, H, ...]`` as float32 contiguous rows ``[N·H, ...]``, zero-padded by ``pad`` (F.pad's order)."""
    t = t.to(torch.float32)
    if any(pad):
        t = torch.nn.functional.pad(t, pad)
    return t.reshape(-1, *t.shape[2:]).contiguous()


def routing_rows(tok_rank, dest) -> tuple[torch.Tensor, ...]:
    """The routing in the kernels' layout, int32 ``[R, NC, ...]``: ``(rank, lo, hi, dest)`` (the
    token's slot, the first and last old slot merging into every new slot, the new slot of every old one)."""
    N, H, NC, C = dest.shape
    lo, hi = source_ranges(dest)
    return (tok_rank.to(torch.int32).reshape(N * H, NC, -1).contiguous(), lo.reshape(N * H, NC, C),
            hi.reshape(N * H, NC, C), dest.to(torch.int32).reshape(N * H, NC, C).contiguous())


def walk_rows(q_eff, lam_inter, x, v, M, routing) -> WalkRows:
    """:func:`fused_inter`'s inputs (its shapes) in the kernels' layout; ``routing``: :func:`routing_rows`."""
    K = q_eff.shape[-1]
    Kp, Vp = padded_size(K), padded_size(v.shape[-1])
    return WalkRows(padded_rows(q_eff, (0, Kp - K)), padded_rows(lam_inter), padded_rows(x, (0, Kp - K)),
                    padded_rows(v, (0, Vp - v.shape[-1])),
                    padded_rows(M, (0, Kp - K, 0, Kp - K)) if M.dim() == 5 else padded_rows(M), *routing)


def walk_forward(w: WalkRows, S0: torch.Tensor, prec: str, group: int):
    """The forward walk: ``(o [R, NC, L, Vp], S)``, ``S [R, NC / group + 1, C, Kp, Vp]`` the states
    at every ``group``-th chunk boundary and the last (the final states), kept for :func:`walk_backward`.
    ``S0 [R, C, Kp, Vp]``. One program per row, value block and key split (:func:`key_splits`)."""
    R, NC, L, K = w.qe.shape
    C, Vd = S0.shape[1], w.v.shape[-1]
    matrix = w.M.dim() == 4
    KS, BK = key_tiles(K, matrix)
    S = new_output((R, -(-NC // group) + 1, C, K, Vd), w.qe)  # the checkpoints: boundaries 0, G, 2G, ..., NC
    ring = new_output((R, 2 if group > 1 else 0, C, K, Vd), w.qe)  # the boundaries between them, in turn
    o = new_output((KS, R, NC, L, Vd) if KS > 1 else (R, NC, L, Vd), w.qe)  # the splits' partials, or o
    grid = lambda meta: (R, Vd // meta["BV"], KS)  # noqa: E731
    chunk_dla_inter_fwd_kernel[grid](w.qe, w.lam, w.x, w.v, w.rank, w.M, w.lo, w.hi, S0, S, ring, o, NC, group, L=L,
                                     C=C, K=K, V=Vd, BK=BK, KS=KS, PREC=prec, MATRIX=matrix)
    return o.sum(0) if KS > 1 else o, S  # a sum in a fixed order, not atomics: deterministic


def walk_backward(w: WalkRows, S: torch.Tensor, do: torch.Tensor, dS_final: torch.Tensor | None, prec: str,
                  group: int):
    """The reverse walk over the states ``S`` that :func:`walk_forward` kept: the gradients of
    ``qe, lam, x, v, M`` (``WalkRows``' layout) and of the initial states, from those of ``o`` and
    of the final states (None: zero)."""
    R, NC, L, K = w.qe.shape
    C, Vd = S.shape[2], w.v.shape[-1]
    matrix = w.M.dim() == 4
    KS, BK = key_tiles(K, matrix)  # as the forward's, read again (the backward need not come right after it)
    G = new_output((R, 2, C, K, Vd), w.qe)  # half 1 is written (dS_{NC-1}) before it is read
    if dS_final is None:
        G[:, 0].zero_()
    else:
        G[:, 0] = dS_final
    scratch = new_output((R, group - 1, C, K, Vd), w.qe)  # one group's boundaries between checkpoints
    dv = new_output((KS, *w.v.shape) if KS > 1 else w.v.shape, w.v)  # the splits' partials, or dv
    BV = min(32, Vd)
    NV = Vd // BV
    atomic = atomic_sums(NV, KS)
    if atomic:
        dqe, dlam, dx, dM = (torch.zeros_like(t) for t in (w.qe, w.lam, w.x, w.M))
    else:
        dqe, dx = (new_output((NV, *t.shape), t) for t in (w.qe, w.x))
        dlam, dM = (new_output((NV * KS, *t.shape), t) for t in (w.lam, w.M))
    chunk_dla_inter_bwd_kernel[(R, NV, KS)](w.qe, w.lam, w.x, w.v, w.rank, w.M, w.lo, w.hi, w.dest, S, scratch,
                                            do.float().contiguous(), G, dqe, dlam, dx, dv, dM, NC, group, L=L, C=C,
                                            CP=triton.next_power_of_2(C), K=K, V=Vd, BV=BV, BK=BK, KS=KS, PREC=prec,
                                            MATRIX=matrix, ATOMIC=atomic, num_warps=8,
                                            num_stages=1)  # the default (3) spills at K = 256
    if not atomic:
        dqe, dlam, dx, dM = (t.sum(0) if t.shape[0] > 1 else t[0] for t in (dqe, dlam, dx, dM))
    return dqe, dlam, dx, dv.sum(0) if KS > 1 else dv, dM, G[:, NC % 2]


class _FusedInter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qe, lam, x, v, M, S0, rank, lo, hi, dest, prec, group):
        w = WalkRows(qe, lam, x, v, M, rank, lo, hi, dest)
        o, S = walk_forward(w, S0, prec, group)
        ctx.save_for_backward(qe, lam, x, v, M, rank, lo, hi, dest, S)
        ctx.prec, ctx.group = prec, group
        return o, S[:, -1]

    @staticmethod
    def backward(ctx, do, dS_final):
        *inputs, S = ctx.saved_tensors
        grads = walk_backward(WalkRows(*inputs), S, do, dS_final, ctx.prec, ctx.group)
        return *grads, None, None, None, None, None, None


def walk_group(NC: int, needs_grad: bool, group: int | None = None) -> int:
    """Chunks per checkpoint: :func:`checkpoint_group` when a backward is to come; otherwise (inference,
    a prefill) one group for the whole walk, which keeps the first and last boundaries only."""
    return checkpoint_group(NC, group) if needs_grad else triton.next_power_of_2(NC)


def fused_inter(q_eff, lam_inter, x, v, tok_rank, M, dest, S0, input_dtype=torch.float32, group=None):
    """Inter-chunk read-out and state walk with the chunk transition ``M``: a scalar decay per
    chunk (Mamba-2, ``M [N, H, NC]``) or a ``K x K`` matrix per chunk (Gated DeltaNet, ``M [N, H,
    NC, K, K]``).

    ``q_eff``, ``x`` (keys decayed to the chunk's end) ``[N, H, NC, L, K]``; ``lam_inter [N, H,
    NC, L, C]`` (λ of every query for every carried slot, zero for empty slots); ``v [N, H, NC,
    L, V]``; ``tok_rank [N, H, NC, L]`` (the slot a token is written into at the chunk's end,
    ``C`` = none); ``dest [N, H, NC, C]`` (new slot
    of every carried slot, ``C`` = none); ``S0 [N, H, C, K, V]``; ``input_dtype``: the caller's
    dtype (float32 inputs get IEEE products, lower precisions tf32); ``group``: chunks per state
    checkpoint kept for the backward (:func:`checkpoint_group`; without gradients only the final
    states are kept). Returns ``o_inter [N, H, NC,
    L, V]`` and the final states ``[N, H, C, K, V]`` (float32), differentiable in every float input.
    """
    N, H, NC, L, K = q_eff.shape
    C, Vd = dest.shape[-1], v.shape[-1]
    Kp, Vp = padded_size(K), padded_size(Vd)
    w = walk_rows(q_eff, lam_inter, x, v, M, routing_rows(tok_rank, dest))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_eff, lam_inter, x, v, M, S0))
    o, S = _FusedInter.apply(w.qe, w.lam, w.x, w.v, w.M, padded_rows(S0, (0, Vp - Vd, 0, Kp - K)), w.rank, w.lo,
                             w.hi, w.dest, input_precision(input_dtype), walk_group(NC, needs_grad, group))
    return o.reshape(N, H, NC, L, Vp)[..., :Vd], S.reshape(N, H, C, Kp, Vp)[..., :K, :Vd]
