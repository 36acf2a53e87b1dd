"""The recurrent form: at most C segment states, births and merges applied step by step.

O(T * C * K * V) with a Python loop over time (vectorised over sequences, heads and slots): the
second ground truth, and what decoding runs one token at a time. A one-token window without
gradients (decoding) runs the decode step instead, which keeps a scale and a place per slot and
rewrites only the slots whose numbers change: on CUDA one fused Triton kernel
(``dla.ops.triton.decode``), elsewhere for Mamba-2 its PyTorch twin (:func:`_torch_decode_step`).

Step t, per sequence and head, with slots ordered newest first (slot 0 = the open segment):
1. route (:func:`route_step`): if t starts a segment every slot moves one place older and the
   new slot 0 starts empty; each slot whose start boundary dies at t is added into its older
   neighbour (chains of merges fold into the oldest survivor) and the slots are compacted;
2. transition ``S <- A_t S`` on every slot and write ``S_0 += w_t k_t v_t^T``;
3. read-out ``o_t = Σ_j λ_t^{ℓ_j} S_j^T q_t`` (``ℓ_j = j`` for recency labels; for level labels 0
   for slot 0 and ``bit_length(size_j)`` otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dla.ops import chunk
from dla.ops.common import (
    DLAState,
    check_backend,
    new_slot_places,
    own_places,
    prepare,
    scaled_slots,
    source_ranges,
)
from dla.schedule.schedule import NONE, SegmentState, slot_labels


def route_step(slot_pos, slot_death, start_death_t, t: int):
    """Where every slot goes at window time ``t``.

    ``slot_pos``/``slot_death [N, H, C]``: slots before step t (newest first; empty: death -1);
    ``start_death_t [N, H]``: the token's start death (-1: no new segment). Returns ``dest
    [N, H, C]`` (new index of each old slot; ``C`` = dropped, only ever an empty slot), the new
    ``slot_pos``/``slot_death`` and the label of every new slot is then derived from them.
    """
    C = slot_pos.shape[-1]
    born = (start_death_t != NONE)[..., None]
    none = torch.full_like(slot_pos[..., :1], NONE)
    ext_pos = torch.where(born, torch.cat([torch.full_like(none, t), slot_pos], -1), torch.cat([slot_pos, none], -1))
    ext_death = torch.where(born, torch.cat([start_death_t[..., None], slot_death], -1),
                            torch.cat([slot_death, none], -1))
    idx = torch.arange(C + 1, device=slot_pos.device)
    keep = (ext_death != NONE) & (ext_death != t)
    # a dying slot folds into the next older survivor
    target = torch.where(keep, idx, C + 1).flip(-1).cummin(-1).values.flip(-1)
    new_index = keep.long().cumsum(-1) - 1
    ext_dest = torch.where(target <= C, new_index.gather(-1, target.clamp(max=C)), C)
    dest = torch.where(born, ext_dest[..., 1:], ext_dest[..., :C])
    dest = torch.where(slot_death != NONE, dest, C)
    compact = torch.where(keep, new_index, C)  # survivors move to their new index
    new_pos = torch.full_like(ext_pos, NONE).scatter(-1, compact, ext_pos)[..., :C]
    new_death = torch.full_like(ext_death, NONE).scatter(-1, compact, torch.where(keep, ext_death, NONE))[..., :C]
    return dest, new_pos, new_death


def recurrent_dla(q, k, v, g, lam, schedule, beta=None, scale=None, initial_state: DLAState | None = None,
                  output_final_state: bool = False, cu_seqlens=None, backend: str | None = None,
                  validate: bool = True):
    """Dynamic Linear Attention as a recurrence over at most ``C`` states.

    Returns ``(o [B, T, H, V], state)``; ``state`` is a :class:`dla.DLAState` when
    ``output_final_state`` else ``None``. ``initial_state`` continues earlier windows of each
    sequence; ``schedule`` must then be planned with ``initial_state=`` the same state.
    ``backend="triton"`` (the default for one-token windows on CUDA without gradients) runs each step
    as one fused kernel without autograd (decoding); ``"torch"`` is differentiable. By default a
    Mamba-2 one-token window without gradients elsewhere runs the kernel's PyTorch twin.
    ``validate=False`` skips the input checks that read tensor values on the host (see
    :func:`dla.ops.common.prepare`), so that a decoding step never waits for the GPU and can be
    captured in a CUDA graph.
    """
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    x = prepare(q, k, v, g, lam, schedule, beta, scale, cu_seqlens, initial_state, validate)
    check_backend(backend, x.q.device)
    ds = x.schedule
    N, H, Tm, K = x.q.shape
    V = x.v.shape[-1]
    C = ds.capacity
    step = _step_function(backend, Tm == 1, x.q.is_cuda, x.beta is not None)
    S = x.q.new_zeros(N, H, C, K, V) if x.initial is None else x.initial
    scales, places = x.initial_scales, x.initial_places
    if step is _torch_step:  # its new states carry no scales or places: applied once here, not at every step
        S, scales, places = scaled_slots(S, scales, places), None, None
    slot_pos, slot_death = ds.carried_pos, ds.carried_death  # window coordinates
    outs = []
    # unbind once: indexing step t of a whole tensor inside the loop would make every step's
    # backward allocate a gradient of the whole tensor, O(T^2) in all
    per_step = [t.unbind(2) for t in (x.q, x.k, x.v, x.g, x.lam)]
    betas = [None] * Tm if x.beta is None else x.beta.unbind(2)
    for t, (q_t, k_t, v_t, g_t, lam_all), beta_t in zip(range(Tm), zip(*per_step), betas):
        dest, slot_pos, slot_death = route_step(slot_pos, slot_death, ds.start_death[:, :, t], t)
        label = slot_labels(slot_pos, slot_death != NONE, t + 1, ds.label_rule)
        lam_t = lam_all.gather(-1, label) * (slot_death != NONE)
        S, scales, places, o_t = step(S, scales, places, dest, q_t, k_t, v_t, g_t, beta_t, lam_t)
        outs.append(o_t)
    o = torch.stack(outs, 2) if outs else x.v.new_zeros(N, H, 0, V)
    state = None
    if output_final_state:
        starts = torch.where(slot_death != NONE, slot_pos + ds.position[:, None, None], NONE)
        state = x.final_state(S, starts, schedule, scales, places)
    return x.output(o), state


def recurrent_step(q, k, v, g, lam, dest, initial_state: DLAState, segments: SegmentState, beta=None,
                   scale: float | None = None, backend: str | None = None, ranges=None, inplace: bool = False):
    """One token per sequence (``q, k [N, 1, H, K]``, ``v [N, 1, H, V]``, ``g, beta [N, 1, H]``)
    continuing ``initial_state``, its slots already routed by the schedule: ``dest [N, H, C]`` (the
    new slot of every old slot, ``C``: dropped) and ``lam [N, H, C]`` (λ of every new slot, 0 for
    empty ones), with ``segments`` the segmentation after the token. Returns ``(o [N, 1, H, V],
    state)``: the numbers of :func:`recurrent_dla` on that one-token window, without its checks or
    its dense schedule (nothing read on the host). ``backend``: as :func:`recurrent_dla`'s. ``ranges``:
    the routing as the decode kernel reads it (:func:`dla.ops.common.source_ranges` of ``dest``),
    when the planner has it. ``inplace``: the decode step writes the new states over
    ``initial_state.states`` when they are in the compute dtype (a decoding cache's own; the
    differentiable PyTorch step never does)."""
    check_backend(backend, q.device)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    step = _step_function(backend, True, q.is_cuda, beta is not None)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_t = k[:, 0].to(cdt)
    states, scales, places = initial_state.states.to(cdt), initial_state.scales, initial_state.places
    if step not in (_torch_step, _torch_decode_step):  # the kernel reads every input as float32, q scaled as read
        S, scales, places, o = step(states, scales, places, dest, q[:, 0], k[:, 0], v[:, 0], g[:, 0],
                                    None if beta is None else beta[:, 0], lam, scale=scale, ranges=ranges,
                                    inplace=inplace)
    else:
        q_t = q[:, 0].to(cdt)
        if scale != 1:  # a product with 1 changes no number
            q_t = q_t * scale
        kwargs = dict(ranges=ranges, inplace=inplace) if step is _torch_decode_step else {}
        S, scales, places, o = step(states, None if scales is None else scales.to(cdt), places, dest, q_t, k_t,
                                    v[:, 0].to(cdt), g[:, 0].to(cdt), None if beta is None else beta[:, 0].to(cdt),
                                    lam.to(cdt), **kwargs)
    prev_key = k_t.detach().contiguous()
    return o[:, None].to(v.dtype), DLAState(states=S, segments=segments, prev_key=prev_key, scales=scales,
                                            places=places)


def _step_function(backend: str | None, one_token: bool, on_cuda: bool, delta: bool):
    """The step of ``backend``: the fused Triton kernel (no autograd) or the differentiable PyTorch
    step. By default a one-token window without gradients (decoding) takes the decode kernel on
    CUDA, and elsewhere for Mamba-2 (not ``delta``) the kernel's PyTorch twin; anything else the
    differentiable step. (The delta rule rewrites every slot, so there the twin saved nothing: it
    took 1.3x the differentiable step on a CPU.)"""
    decoding = one_token and not torch.is_grad_enabled()
    if backend == "triton" or (backend is None and decoding and on_cuda):
        from dla.ops.triton.decode import decode_step

        return decode_step
    return _torch_decode_step if backend is None and decoding and not delta else _torch_step


def _torch_step(S, scales, places, dest, q, k, v, g, beta, lam):
    """One token: route the slots, transition, write into slot 0, read out. Differentiable. Returns
    ``(S_new, scales_new, places_new, o)``: the states in slot order with their ``scales`` applied,
    so new scales of 1 and every slot at its own place (None where ``scales``, ``places`` are None)."""
    N, H, C, K, V = S.shape
    new_scales = None if scales is None else torch.ones_like(scales)
    new_places = None if places is None else own_places(*places.shape, S.device)
    S = scaled_slots(S, scales, places)
    # the products below are matmuls over contiguous views: einsum permuted and copied the states
    # (6 ms of a 7 ms read-out per layer on a CPU at 24 heads, K = 128, V = 64, C = 30)
    if C <= chunk.DENSE_ROUTE_MAX_CAPACITY:
        route = F.one_hot(dest, C + 1)[..., :C].transpose(-1, -2).to(S.dtype)  # [N, H, new, old]
        S = (route @ S.reshape(N, H, C, K * V)).view(N, H, C, K, V)
    else:  # scatter to the new slots: memory linear in C (a [C, C] matrix would be 40 GB at C = 100,000)
        index = dest[..., None, None].expand(S.shape)
        S = S.new_zeros(S.shape[:2] + (C + 1,) + S.shape[3:]).scatter_add(2, index, S)
        S = S[:, :, :C].contiguous()  # (the decay below views the states as rows)
    if beta is None:
        w = torch.ones_like(g)
    else:
        w = beta
        kS = k[:, :, None, None, :] @ S  # [N, H, C, 1, V]
        S = S - (w[..., None] * k)[:, :, None, :, None] * kS
    # the decay in place (S is this step's own tensor: on a CPU a new one of this size costs more in page
    # faults than the product), per row over a [rows, C·K·V] view (a broadcast over five dimensions is slower)
    S.view(N * H, C * K * V).mul_(g.exp().reshape(N * H, 1))
    write = w[..., None, None] * k[..., :, None] * v[..., None, :]
    S[:, :, 0] += write  # in place: S is this step's own tensor, which no backward keeps
    read = (lam[..., None] * q[:, :, None, :]).reshape(N, H, 1, C * K)  # λ_c q for every slot's key rows
    return S, new_scales, new_places, (read @ S.reshape(N, H, C * K, V)).view(N, H, V)


def _torch_decode_step(S, scales, places, dest, q, k, v, g, beta, lam, ranges=None, inplace: bool = False):
    """:func:`_torch_step`'s numbers for Mamba-2 (``beta`` None) kept as the decode kernel keeps them
    (``dla.ops.triton.decode``, no autograd): slot ``c`` holds ``scales[c] * S[places[c]]``. A slot
    that stays closed keeps its numbers and place and takes the scale ``exp(g_t) scales[source]``;
    the slots whose numbers change (the open slot, a merge's sum) are computed from their sources
    and stored at their places (:func:`dla.ops.common.new_slot_places`). A step thus reads every
    state once, for the read-out, where :func:`_torch_step` routes, decays and reads out every
    slot. Returns ``(S_new, scales_new, places_new, o)``; ``inplace``: ``S_new`` is ``S``, else a
    copy. ``q`` comes multiplied by the scale, as for :func:`_torch_step`."""
    if beta is not None:
        raise ValueError("the decode step's PyTorch twin is Mamba-2's: the delta rule takes _torch_step")
    N, H, C, K, V = S.shape
    lo, hi = source_ranges(dest) if ranges is None else ranges
    lo, hi = lo.long(), hi.long()
    S = S.contiguous() if inplace else S.clone(memory_format=torch.contiguous_format)  # (viewed as rows below)
    scales = S.new_ones(N, H, C) if scales is None else scales.to(S.dtype)
    places = own_places(N, H, C, S.device) if places is None else places.to(torch.int32)
    new_places = new_slot_places(lo, hi, places)
    # 1. the new scales: a closed slot with one source decays by its scale alone
    slot = torch.arange(C, device=S.device)
    sources = (hi - lo + 1).clamp(min=0)
    decay = g.exp()
    kept = (sources == 1) & (slot > 0)
    empty = (sources == 0) & (slot > 0)
    source_scale = scales.gather(-1, lo.clamp(max=C - 1))
    new_scales = torch.where(empty, 0.0, torch.where(kept, decay[..., None] * source_scale, 1.0)).to(S.dtype)
    # 2. the numbers of every other slot (W in all rows): its sources summed oldest first, the decay, slot
    # 0's write; all computed before any is stored, so that the step may run in place
    rows = S.view(N * H, C, K, V)
    r, n = (~kept & ~empty).reshape(N * H, C).nonzero(as_tuple=True)  # [W]
    lo_w, count_w = lo.reshape(N * H, C)[r, n], sources.reshape(N * H, C)[r, n]
    row_places, row_scales = places.reshape(N * H, C).long(), scales.reshape(N * H, C)
    acc = S.new_zeros(r.numel(), K, V)
    for i in range(int(count_w.max()) if r.numel() else 0):
        j = (lo_w + i).clamp(max=C - 1)
        acc += torch.where(i < count_w, row_scales[r, j], 0)[:, None, None] * rows[r, row_places[r, j]]
    acc *= decay.reshape(N * H)[r][:, None, None]
    first = n == 0
    acc[first] += k.reshape(N * H, K)[r[first], :, None] * v.reshape(N * H, V)[r[first], None, :]
    rows[r, new_places.reshape(N * H, C).long()[r, n]] = acc
    # 3. the read-out Σ_c λ_c scales_c qᵀ S[places_c] as one product over the states where they lie
    # (an empty slot has λ = 0 and scale 0, and its numbers are finite: what it held last, or zeros)
    at_place = torch.zeros_like(new_scales).scatter_(-1, new_places.long(), lam.to(S.dtype) * new_scales)
    read = (at_place[..., None] * q[:, :, None, :]).reshape(N, H, 1, C * K)
    return S, new_scales, new_places, (read @ S.reshape(N, H, C * K, V)).view(N, H, V)
