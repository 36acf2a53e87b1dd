"""One decoding step for a whole batch as a single Triton kernel (no autograd).

Per (sequence-head, value block): every new slot sums the old slots routed to it (a contiguous
range, see :func:`dla.ops.recurrent.route_step`), applies the transition ``A_t``, slot 0 adds
the write ``w_t k_t v_t^T``, the slot is stored and its read-out ``λ_n S_n^T q_t`` accumulated (for
Mamba-2 as the sum ``Σ_n λ_n S_n``, read out once after the last slot). The slots are made one
after another, and each one's first source is loaded while the slot before it is computed.

The states are kept with a scale and a place per slot (:attr:`dla.DLAState.scales`,
:attr:`dla.DLAState.places`: slot ``n`` holds ``scales[n] * states[places[n]]``). A slot keeps its
place for life: a birth makes every slot one slot older without moving a number, a merge stores
the pair's sum at the older one's place, and a new segment takes a place that a merge (or an empty
slot) gave up. Mamba-2's transition is a number per head, the same for every slot, so a closed
slot only has its scale multiplied by ``exp(g_t)``: it is read for the read-out and not written.
A Mamba-2 step thus reads every state once and writes the open slot, and at a merge the merged
pair (two states, where without places a birth rewrote every slot); an empty slot is neither read
nor written (scale 0). Gated DeltaNet's transition ``I - β_t k_t k_tᵀ`` acts on every slot, so
every slot it holds is rewritten (at its place).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dla.ops.common import own_places, source_ranges


@triton.jit
def _new_places(p_place, p_lo, p_hi, C: tl.constexpr, CP: tl.constexpr):
    """The place of every new slot, ``[CP]`` (lanes ``>= C`` unused): a slot with sources takes the
    place of its oldest source (``hi``); the places no new slot keeps go, in order, to the slots
    without sources (the token's new segment, empty slots), in order. PyTorch's twin:
    :func:`dla.ops.common.new_slot_places`."""
    o_c = tl.arange(0, CP)
    m_c = o_c < C
    b_place = tl.load(p_place + o_c, mask=m_c, other=0)
    b_lo = tl.load(p_lo + o_c, mask=m_c, other=C)
    b_hi = tl.load(p_hi + o_c, mask=m_c, other=-1)
    fed = m_c & (b_lo <= b_hi)  # [CP]: the new slot has sources
    oldest = fed[:, None] & (b_hi[:, None] == o_c[None, :])  # [new, old]: old slot j is new slot n's oldest source
    kept = tl.max(oldest.to(tl.int32), 0) > 0  # [old]
    freed = m_c & ~kept
    unfed = m_c & ~fed
    rank_freed = tl.cumsum(freed.to(tl.int32), 0)
    rank_unfed = tl.cumsum(unfed.to(tl.int32), 0)
    given = unfed[:, None] & freed[None, :] & (rank_unfed[:, None] == rank_freed[None, :])  # [new, old]
    return tl.sum(tl.where(oldest | given, b_place[None, :], 0), 1)


@triton.jit
def decode_dla_step_kernel(S_ptr, S_new_ptr, scales_ptr, scales_new_ptr, places_ptr, places_new_ptr, lo_ptr, hi_ptr,
                           q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, lam_ptr, o_ptr, scale,
                           C: tl.constexpr, CP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr,
                           BV: tl.constexpr, DELTA: tl.constexpr, INPLACE: tl.constexpr):
    """One token for one row (sequence-head) and value columns ``vv``: new slot ``n`` = the old
    slots ``lo[n]..hi[n]`` (each times its scale) summed, times ``A_t`` (``exp(g_t)``, and ``I -
    β_t k_t k_tᵀ`` when ``DELTA``, Gated DeltaNet), plus the write ``w_t k_t v_tᵀ`` in slot 0;
    ``o = Σ_n λ_n S_nᵀ q``. Without ``DELTA`` a slot ``n > 0`` with one source keeps its numbers and
    place and takes the scale ``exp(g_t) scales[source]``. ``KP`` is ``K`` rounded up to a power of two
    (masked); ``q`` is read times ``scale``, in float32.

    New slots are made oldest first, each stored at the place of its oldest source (or, for the
    token's new segment, slot 0, made last, at a place given up by a merge or an empty slot), so
    every place is written at most once and after the step's last read of it: ``S_new`` may be
    ``S`` itself (``INPLACE``), updated in place, where a kept or empty slot is not written and a
    barrier between an iteration's reads and its write keeps the warps from writing a state another
    warp has still to read. Out of place ``S_new`` gets the same numbers: kept and empty slots are
    copied. The scales and places are read from ``scales``, ``places`` and written to ``scales_new``,
    ``places_new`` (other tensors: the programs of a row's other value blocks may still read the old
    ones)."""
    r = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    o_c = tl.arange(0, CP)
    b_place_new = _new_places(places_ptr + r * C, lo_ptr + r * C, hi_ptr + r * C, C, CP)
    if i_v == 0:
        tl.store(places_new_ptr + r * C + o_c, b_place_new, mask=o_c < C)
    place_open = tl.sum(tl.where(o_c == 0, b_place_new, 0), 0)  # (used only where slot 0 has no sources)
    vv = i_v * BV + tl.arange(0, BV)
    kk = tl.arange(0, KP)
    mask = (kk[:, None] < K) & (vv[None, :] < V)
    tile = kk[:, None] * V + vv[None, :]
    q = tl.load(q_ptr + r * K + kk, mask=kk < K, other=0.0).to(tl.float32) * scale
    k = tl.load(k_ptr + r * K + kk, mask=kk < K, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + r * V + vv, mask=vv < V, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(g_ptr + r).to(tl.float32))
    w = tl.load(beta_ptr + r).to(tl.float32) if DELTA else 1.0
    o = tl.zeros((BV,), dtype=tl.float32)
    # Mamba-2 sums λ_n S_n and reduces it with q once, after the loop: a slot costs its load and no
    # reduction across warps. The delta rule reduces per slot: its sum's registers made the step
    # slower (and spilled at K = 256)
    read = tl.zeros((KP, BV), dtype=tl.float32)
    # Each slot's first source (``head``) is loaded one iteration ahead, while the slot before it is
    # computed, and the numbers a slot reads are loaded before they are needed: its source range and
    # first source's place two iterations ahead, its λ, first source's scale and own place one
    # iteration ahead. So no load waits on a load of the same iteration (on an H100 a Gated DeltaNet
    # step took 1.7-4% less time, a Mamba-2 step the same). Safe in place: a slot's sources are other
    # old slots than the previous one's, at other places.
    lo_next = tl.load(lo_ptr + r * C + C - 1)
    hi_next = tl.load(hi_ptr + r * C + C - 1)
    fed_next = lo_next <= hi_next
    place_next = tl.load(places_ptr + r * C + lo_next, mask=fed_next, other=0)
    # (tl.where, not `mask & fed_next`: Triton's interpreter rejects a tile mask combined with a scalar)
    head_next = tl.load(S_ptr + (r * C + place_next) * K * V + tile, mask=tl.where(fed_next, mask, False), other=0.0)
    lam_next = tl.load(lam_ptr + r * C + C - 1).to(tl.float32)
    # (a slot without sources has lo = C: its first source's scale and its place are not read)
    first_scale_next = tl.load(scales_ptr + r * C + lo_next, mask=fed_next, other=0.0)
    place_own_next = tl.load(places_ptr + r * C + hi_next, mask=fed_next, other=0)
    older = tl.maximum(C - 2, 0)  # the slot after next (for C = 1, none)
    lo_after = tl.load(lo_ptr + r * C + older)
    hi_after = tl.load(hi_ptr + r * C + older)
    place_after = tl.load(places_ptr + r * C + lo_after, mask=(older < C - 1) & (lo_after <= hi_after), other=0)
    for i in range(C):
        n = C - 1 - i
        lo, hi, head = lo_next, hi_next, head_next
        lam, first_scale, place_own = lam_next, first_scale_next, place_own_next
        younger = tl.maximum(n - 1, 0)
        lo_next, hi_next = lo_after, hi_after
        fed_next = (younger < n) & (lo_next <= hi_next)  # (younger < n: n > 0, as a tensor the interpreter takes)
        head_next = tl.load(S_ptr + (r * C + place_after) * K * V + tile, mask=tl.where(fed_next, mask, False),
                            other=0.0)
        lam_next = tl.load(lam_ptr + r * C + younger).to(tl.float32)
        first_scale_next = tl.load(scales_ptr + r * C + lo_next, mask=fed_next, other=0.0)
        place_own_next = tl.load(places_ptr + r * C + hi_next, mask=fed_next, other=0)
        youngest = tl.maximum(n - 2, 0)
        lo_after = tl.load(lo_ptr + r * C + youngest)
        hi_after = tl.load(hi_ptr + r * C + youngest)
        empty = (hi < lo) & (n > 0)  # slot 0 without sources: a segment opens with the token's write
        kept = (lo == hi) & (n > 0) & (not DELTA)
        if hi >= lo:  # a slot with sources stays at its oldest source's place
            place = place_own
        elif n == 0:  # the token's new segment: the first place given up
            place = place_open
        elif INPLACE:  # an empty slot: neither read nor written
            place = 0
        else:  # an empty slot, copied out of place (a reduction across the program)
            place = tl.sum(tl.where(o_c == n, b_place_new, 0), 0)
        at = (r * C + place) * K * V
        new_scale = tl.where(empty, 0.0, tl.where(kept, decay * first_scale, 1.0))
        if empty:  # scale 0: its numbers are not read again (out of place: copied, as in place they stay)
            if not INPLACE:
                tl.store(S_new_ptr + at + tile, tl.load(S_ptr + at + tile, mask=mask, other=0.0), mask=mask)
        elif kept:  # a closed slot that stays at its place: only its scale decays
            if not INPLACE:
                tl.store(S_new_ptr + at + tile, head, mask=mask)
            read += (lam * new_scale) * head
        else:
            acc = first_scale * head
            for j in range(lo + 1, hi + 1):
                p_source = S_ptr + (r * C + tl.load(places_ptr + r * C + j)) * K * V + tile
                acc += tl.load(scales_ptr + r * C + j) * tl.load(p_source, mask=mask, other=0.0)
            if DELTA:
                kS = tl.sum(k[:, None] * acc, axis=0)
                acc = decay * (acc - w * k[:, None] * kS[None, :])
            else:
                acc = decay * acc
            if n == 0:
                acc += w * k[:, None] * v[None, :]
            tl.debug_barrier()
            tl.store(S_new_ptr + at + tile, acc, mask=mask)
            if DELTA:
                o += lam * tl.sum(q[:, None] * acc, axis=0)
            else:
                read += lam * acc
        if i_v == 0:
            tl.store(scales_new_ptr + r * C + n, new_scale)
        place_after = tl.load(places_ptr + r * C + lo_after, mask=(youngest < younger) & (lo_after <= hi_after),
                              other=0)
    if not DELTA:
        o = tl.sum(q[:, None] * read, axis=0)
    tl.store(o_ptr + r * V + vv, o, mask=vv < V)


def launch_shape(K: int, V: int, rows: int | None = None, sms: int | None = None) -> tuple[int, int]:
    """``(BV, num_warps)``: 4 warps and at most 8192 state numbers per program ([K, BV] tile; on an
    H100, [128, 64] tiles on 4 warps were the fastest for both bases at batch 64, where 8 warps
    were 1.1-1.3x slower and, for the delta rule, [128, 32] tiles 1.06-1.1x; no shape spills,
    benchmarks/kernel_resources.py). Given the ``rows`` (sequence-heads) and the GPU's ``sms``,
    narrower value blocks (down to 16 columns) where the grid would give an SM fewer than two
    programs: each program walks its C slots one after another, so a small batch is bound by the
    latency of those loads unless more programs share the SMs."""
    KP = triton.next_power_of_2(K)
    BV = min(64, triton.next_power_of_2(V), max(16, 8192 // KP))
    if rows is not None and sms is not None:
        while BV > 16 and rows * triton.cdiv(V, BV) < 2 * sms:
            BV //= 2
    return BV, 4


@functools.cache
def multiprocessor_count(device: torch.device) -> int | None:
    """The streaming multiprocessors of a CUDA ``device`` (None elsewhere)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def decode_step(S, scales, places, dest, q, k, v, g, beta, lam, scale: float = 1.0, ranges=None,
                inplace: bool = False):
    """The contract of ``dla.ops.recurrent._torch_step``: returns ``(S_new, scales_new, places_new, o)``,
    the states in ``S``'s dtype (computed in float32) with their scales and places (``scales [N, H,
    C]``, None: 1; ``places [N, H, C]``, None: slot ``c`` at place ``c``; see the module's docstring)
    and the output in ``q``'s. The inputs may be in any float dtype (read as float32); ``q`` is
    multiplied by ``scale`` as it is read. ``ranges``: :func:`source_ranges` of ``dest``, when the
    planner has them. ``inplace``: the new states overwrite ``S`` (when it is float32 and
    contiguous; a decoding cache that owns its states), so that a step allocates none."""
    N, H, C, K, V = S.shape
    lo, hi = source_ranges(dest) if ranges is None else ranges
    dtype = S.dtype
    S = S.float().contiguous()
    S_new = S if inplace else torch.empty_like(S)
    scales = S.new_ones(N, H, C) if scales is None else scales.float().contiguous()
    scales_new = torch.empty_like(scales)
    places = own_places(N, H, C, S.device) if places is None else places.to(torch.int32).contiguous()
    places_new = torch.empty_like(places)
    o = torch.empty(N, H, V, dtype=torch.float32, device=S.device)
    BV, num_warps = launch_shape(K, V, N * H, multiprocessor_count(S.device))
    grid = (N * H, triton.cdiv(V, BV))
    decode_dla_step_kernel[grid](S, S_new, scales, scales_new, places, places_new, lo, hi, q.contiguous(),
                                 k.contiguous(), v.contiguous(), g.contiguous(),
                                 g if beta is None else beta.contiguous(), lam.contiguous(), o, scale,
                                 C=C, CP=triton.next_power_of_2(C), K=K, V=V, KP=triton.next_power_of_2(K), BV=BV,
                                 DELTA=beta is not None, INPLACE=S_new is S, num_warps=num_warps)
    return S_new.to(dtype), scales_new, places_new, o.to(q.dtype)
