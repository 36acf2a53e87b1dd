"""The chunked form: O(T (L + C K) V) for training and prefill (spec §4), pure PyTorch.

Per chunk ``[a, a + L)`` with the ``<= C`` segments alive at ``a - 1`` carried in as states:

- intra: ``O_intra = (Λ ⊙ P) V`` with ``P`` the exact pairwise coefficients inside the chunk.
  Mamba-2: ``P = Q K^T ⊙ D``. Gated DeltaNet (UT transform): ``T = (I + tril(β K K^T ⊙ D, -1))^-1
  diag(β)`` and ``P = (Q K^T ⊙ D) T``;
- inter: ``O_inter[t] = Σ_j λ_t^{ℓ_t(j)} Q_eff[t] S_j`` with ``Q_eff = Γ ⊙ Q`` (Mamba-2) or
  ``Γ ⊙ Q - (Q K^T ⊙ D) T (Γ ⊙ K)`` (Gated DeltaNet), ``Γ_t = exp(g_a + ... + g_t)``; a carried
  segment has one label per query because merges only join whole segments;
- state update: new slot ``r`` = ``M Σ_{j -> r} S_j + X diag(1[s -> r]) V``, where ``j -> r`` /
  ``s -> r`` means "the carried segment / chunk token belongs to the segment of rank r at the
  chunk's last step", ``M = A_{a+L-1} ... A_a`` and ``X[:, s] = A_{a+L-1} ... A_{s+1} w_s k_s``.

Ranks and labels come from :func:`dla.schedule.schedule.segment_structure` on ``C + L`` units
(the carried segments, oldest first, then the chunk's tokens), so a chunk costs O(L (C + L)) of
bookkeeping and nothing is ever T x T; the Triton backend computes the same integers in one
kernel (:func:`dla.ops.triton.chunk_state.unit_labels`).

Memory kept for backward: on CUDA the inter part of both bases is one fused Triton walk
(:mod:`dla.ops.triton.chunk_inter`) that keeps the carried states at every ``G``-th chunk boundary,
and step 3 (the coefficients inside every chunk, ``O_intra`` and what the walk reads) keeps only its
inputs, the chunks' q, k, v (in their own dtype), g, β, λ and one-byte labels, and reruns in the
backward (:class:`_RecomputedIntraFusedWalk`; its intermediates are ``O(L² + L K)`` floats per
chunk). The unfused inter part (:func:`_inter`, the PyTorch walks) keeps the states carried into
every chunk (``T K V C / L`` in total), the weighted queries (``T C K``) and the token writes
(``T / L · C K V``), in blocks of value columns recomputed in the backward when the states would
exceed ``INTER_BLOCK_BYTES``; beside those, step 3's intermediates are kept. The sequential walks
come from a :class:`Walks` backend (PyTorch loops or Triton kernels).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dla.ops.common import DLAState, check_backend, label_dtype, prepare, scaled_slots
from dla.schedule.schedule import NONE, advance_slots, segment_structure

CHUNK_SIZES = (16, 32, 64, 128)
# The unfused inter part keeps the state of every slot at every chunk boundary (N·H·(NC+1)·C·K·V
# floats) and its backward several buffers of that size. Above this many bytes for that tensor it
# runs over blocks of value columns, which are independent there, and recomputes each block in the
# backward instead of keeping it, so peak memory is that of one block (at ~1/3 more inter time).
INTER_BLOCK_BYTES = 4 * 2**30
# Gated DeltaNet through the fused walk (its K x K transition per chunk; the GPU tests check it
# against the PyTorch path). DLA_FUSED_GDN=0 falls back to the unfused Triton walks, which keep
# every slot's state at every chunk boundary (about twice the memory), should a Triton version
# miscompile the fused one.
FUSED_GATED_DELTANET = os.environ.get("DLA_FUSED_GDN", "1") != "0"


def default_backend(is_cuda: bool, gated: bool = False) -> str:
    """The walks' backend when the caller names none: Triton on CUDA, also under deterministic
    algorithms (the fused walk's backward then sums every program's partial in a fixed order),
    except for the unfused Gated DeltaNet walk (``gated`` with DLA_FUSED_GDN=0), whose backward
    adds its transition's gradient atomically."""
    if not is_cuda:
        return "torch"
    unfused = gated and not FUSED_GATED_DELTANET
    return "torch" if unfused and torch.are_deterministic_algorithms_enabled() else "triton"


def chunk_dla(q, k, v, g, lam, schedule, beta=None, scale=None, initial_state: DLAState | None = None,
              output_final_state: bool = False, cu_seqlens=None, chunk_size: int = 64, backend: str | None = None):
    """Dynamic Linear Attention, chunked. Same contract as :func:`dla.recurrent_dla`.

    Returns ``(o [B, T, H, V], state)``; gradients flow to q, k, v, g, beta, lam and
    ``initial_state.states``. ``chunk_size`` is one of 16, 32, 64, 128. ``backend``: the
    bookkeeping and the walks over chunks (carried segments, the units' ranks and labels, the
    state recurrence, fused with the read-out on Triton) run as Triton kernels (``"triton"``,
    the default on CUDA) or as PyTorch loops (``"torch"``, the default elsewhere). Under
    ``torch.use_deterministic_algorithms(True)`` the Triton backward sums its programs' partials in
    a fixed order instead of adding them atomically, so that gradients repeat bit for bit
    (:func:`default_backend`).
    """
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}")
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    x = prepare(q, k, v, g, lam, schedule, beta, scale, cu_seqlens, initial_state, upcast_qkv=False,
                chunk_size=chunk_size)
    check_backend(backend, x.q.device)
    if backend is None:
        backend = default_backend(x.q.is_cuda, gated=x.beta is not None)
    walks = backend_walks(backend)
    ds = x.schedule
    N, H, _, K = x.q.shape
    Tm, V, C, L = ds.max_len, x.v.shape[-1], ds.capacity, chunk_size
    NC = max(1, -(-Tm // L))

    def chunks(t, fill=0.0):  # [N, H, Tm or NC * L, ...] -> [N, H, NC, L, ...], padded with identity steps
        pad = NC * L - t.shape[2]  # (packed inputs come padded; F.pad copies even when there is nothing to pad)
        if pad:
            t = F.pad(t, (0, 0) * (t.dim() - 3) + (0, pad), value=fill)
        return t.reshape(N, H, NC, L, *t.shape[3:])

    q_c, k_c, v_c, g_c, lam_c = chunks(x.q), chunks(x.k), chunks(x.v), chunks(x.g), chunks(x.lam)
    sd = chunks(ds.start_death, NONE)

    # 1. the segments carried into every chunk (no gradient: the schedule is data)
    slots_pos, slots_death = walks.carried_slots(sd.reshape(N, H, NC * L), ds.carried_pos, ds.carried_death, L)
    filled = slots_death[:, :, :NC] != NONE  # [N, H, NC, C]: the slots entering every chunk that hold a segment

    # 2. ranks and labels of the C + L units of every chunk, at every query of the chunk, and the
    # routing at its end: old slot -> new slot, token -> slot
    label, dest, tok_rank = walks.unit_labels(slots_pos, slots_death, sd, L, ds.label_rule, lam_c.shape[-1])
    # λ in slot order, zero for empty slots (the mask [N, H, NC, 1, C] is what the product keeps)
    lam_inter = gather_labels(lam_c, label[..., :C]).flip(-1) * filled[..., None, :]

    # 3. the base model's coefficients inside every chunk and what the queries read there (parallel
    # over chunks; rerun in the backward from the chunks' inputs), and 4. the carried states,
    # chunk by chunk, and what the queries read from them
    b_c = None if x.beta is None else chunks(x.beta)
    S0 = (x.g.new_zeros(N, H, C, K, V) if x.initial is None
          else scaled_slots(x.initial, x.initial_scales, x.initial_places))
    step3 = (g_c, b_c, lam_c, label[..., C:])  # step 3's inputs but q, k and v
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (q_c, k_c, v_c, g_c, b_c, lam_c, lam_inter, S0))
    if backend == "triton" and (x.beta is None or FUSED_GATED_DELTANET):  # one fused Triton walk
        o, S_final = _RecomputedIntraFusedWalk.apply(q_c, k_c, v_c, *step3, lam_inter, tok_rank, dest, S0, x.scale,
                                                     x.out_dtype, needs_grad)
    else:
        q, k, v = compute_qkv(q_c, k_c, v_c, x.scale, x.compute_dtype)
        # (the PyTorch walks keep every slot's state at every chunk boundary, ~20 times what step 3
        # keeps, so there step 3 is not worth rerunning: it would cost 5-10 % more time on a CPU)
        o_intra, q_eff, X, M = intra_chunk(q, k, v, *step3)
        o_inter, S_final = _inter_blocked(walks, q_eff, lam_inter, X, v, tok_rank, M, dest, S0)
        o = o_intra + o_inter
    o = o.reshape(N, H, NC * L, V)[:, :, :Tm]
    state = None
    if output_final_state:
        final_pos, final_death = slots_pos[:, :, NC], slots_death[:, :, NC]
        starts = torch.where(final_death != NONE, final_pos + ds.position[:, None, None], NONE)
        # a copy: the walks' final states are views of their states at every chunk boundary, which a
        # cache holding the view would keep alive (every layer's, for as long as it decodes)
        state = x.final_state(S_final.to(x.compute_dtype, copy=True), starts, schedule)
    return x.output(o), state


class _GatherLabels(torch.autograd.Function):
    """``lam.gather(-1, label)`` whose backward keeps ``label`` in the narrowest integer type that
    holds it (one byte for up to 256 labels, against eight for ``gather``'s own int64 index: the
    labels of every unit at every query are ``[N, H, NC, L, C + L]``)."""

    @staticmethod
    def forward(ctx, lam, label):
        ctx.lam_shape = lam.shape
        ctx.save_for_backward(narrow_labels(label, lam.shape[-1]))
        return lam.gather(-1, label.long())

    @staticmethod
    def backward(ctx, grad):
        (label,) = ctx.saved_tensors
        return grad.new_zeros(ctx.lam_shape).scatter_add_(-1, label.long(), grad), None


def gather_labels(lam: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """λ of every unit at every query, ``lam [..., n_labels]`` gathered by ``label [..., M]`` (any
    integer type)."""
    if torch.is_grad_enabled() and lam.requires_grad:
        return _GatherLabels.apply(lam, label)
    return lam.gather(-1, label.long())


def narrow_labels(label: torch.Tensor, n_labels: int) -> torch.Tensor:
    """``label`` in the narrowest integer type that holds ``n_labels`` labels (:func:`label_dtype`)."""
    return label.to(label_dtype(n_labels))


def intra_chunk(q_c, k_c, v_c, g_c, b_c, lam_c, label_intra, output: bool = True):
    """Step 3 of :func:`chunk_dla` for every chunk at once: the intra-chunk output ``(Λ ⊙ P) V`` and
    the coefficients the inter part needs, ``(o_intra, q_eff, X, M)`` (module docstring). Inputs
    ``[N, H, NC, L, ...]``; ``b_c`` is β (Gated DeltaNet) or None (Mamba-2); ``label_intra
    [N, H, NC, L, L]`` the label of token ``s`` at query ``t`` (any label where ``s > t``, where
    ``P`` is zero). ``output=False`` gives None for ``o_intra`` (the walk's inputs alone)."""
    K, L, dev = q_c.shape[-1], q_c.shape[-2], q_c.device
    gc = g_c.cumsum(-1)
    D = (gc[..., :, None] - gc[..., None, :]).masked_fill_(later_tokens(L, dev), -torch.inf).exp_()
    gamma = gc.exp()
    QKD = (q_c @ k_c.transpose(-1, -2)) * D if output or b_c is not None else None
    k_end = k_c * D[..., -1, :, None]  # A_{end} ... A_{s+1} applied to k_s (Mamba-2 part)
    if b_c is None:
        P = QKD
        q_eff = q_c * gamma[..., None]
        X = k_end.transpose(-1, -2)
        M = gamma[..., -1]  # the chunk's transition A_end ... A_start: its total decay
    else:
        A = (b_c[..., :, None] * D * (k_c @ k_c.transpose(-1, -2))).tril(-1)
        # (I + A)^-1: unitriangular, so the solve reads A's strictly lower part and takes ones on the diagonal
        T_ut = torch.linalg.solve_triangular(A, torch.diag_embed(b_c), upper=False, unitriangular=True)
        W_k = T_ut @ (k_c * gamma[..., None])
        P = QKD @ T_ut
        q_eff = q_c * gamma[..., None] - QKD @ W_k
        X = k_end.transpose(-1, -2) @ T_ut
        M = gamma[..., -1, None, None] * torch.eye(K, dtype=A.dtype, device=dev) - k_end.transpose(-1, -2) @ W_k
    o_intra = (P * lam_c.gather(-1, label_intra.long())) @ v_c if output else None
    return o_intra, q_eff, X, M


_LATER_TOKENS: dict[tuple[int, torch.device], torch.Tensor] = {}


def later_tokens(L: int, device: torch.device) -> torch.Tensor:
    """``[L, L]`` bool, true where token ``s`` comes after query ``t`` (``s > t``): made once per size
    and device (step 3 runs up to three times a layer and step), except while a CUDA graph is captured
    (its memory pool would own the mask)."""
    mask = _LATER_TOKENS.get((L, device))
    if mask is None:
        mask = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)
        if not (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
            _LATER_TOKENS[L, device] = mask
    return mask


def compute_qkv(q_c, k_c, v_c, scale: float, dtype: torch.dtype):
    """q, k and v in the compute dtype, q multiplied by ``scale`` (``prepare(..., upcast_qkv=False)``
    leaves this to the op)."""
    return scaled(q_c.to(dtype), scale), k_c.to(dtype), v_c.to(dtype)


def scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``t * scale``; ``t`` itself for Mamba-2's scale 1, whose product would be a copy of the same values."""
    return t if scale == 1 else t * scale


class _RecomputedIntraFusedWalk(torch.autograd.Function):
    """Steps 3 and 4 on the fused Triton walk, ``(o, final states)``, from q, k and v in the input
    dtype (q unscaled), keeping for the backward only step 3's inputs as given (it reruns step 3),
    ``lam_inter``, the routing (int32) and the walk's state checkpoints: float32 copies of q, k and v, the effective
    queries, the decayed keys and the kernels' copies of them (~2 KB per token and head at K = 128,
    V = 64 for bfloat16 inputs) are never kept. ``needs_grad=False`` (inference, a prefill): the walk
    keeps only its first and last boundaries."""

    @staticmethod
    def forward(ctx, q_c, k_c, v_c, g_c, b_c, lam_c, label_intra, lam_inter, tok_rank, dest, S0, scale, input_dtype,
                needs_grad):
        from dla.ops.triton.chunk_inter import (
            input_precision,
            padded_rows,
            routing_rows,
            walk_forward,
            walk_group,
            walk_rows,
        )

        N, H, NC, L, K = q_c.shape
        C, V = dest.shape[-1], v_c.shape[-1]
        q, k, v = compute_qkv(q_c, k_c, v_c, scale, g_c.dtype)
        o_intra, q_eff, X, M = intra_chunk(q, k, v, g_c, b_c, lam_c, label_intra)
        routing = routing_rows(tok_rank, dest)  # kept for the backward: int32, in the kernels' layout
        w = walk_rows(q_eff, lam_inter, X.transpose(-1, -2), v, M, routing)
        Kp, Vp = w.qe.shape[-1], w.v.shape[-1]
        ctx.prec, ctx.group, ctx.scale = input_precision(input_dtype), walk_group(NC, needs_grad), scale
        ctx.autocast = autocast_state(q_c.device.type)
        ctx.set_materialize_grads(False)  # final states left unused (training) need no zero gradient, padded, copied
        o_inter, S = walk_forward(w, padded_rows(S0, (0, Vp - V, 0, Kp - K)), ctx.prec, ctx.group)
        ctx.save_for_backward(q_c, k_c, v_c, g_c, b_c, lam_c, label_intra, lam_inter, *routing, S)
        o = o_intra + o_inter.reshape(N, H, NC, L, Vp)[..., :V].to(o_intra.dtype)
        return o, S[:, -1].reshape(N, H, C, Kp, Vp)[..., :K, :V].to(S0.dtype)

    @staticmethod
    def backward(ctx, do, dS_final):
        from dla.ops.triton.chunk_inter import padded_rows, walk_backward, walk_rows

        q_c, k_c, v_c, g_c, b_c, lam_c, label_intra, lam_inter, *routing, S = ctx.saved_tensors
        needs = ctx.needs_input_grad[:6]
        N, H, NC, L, K = q_c.shape
        C, V, cdt = routing[-1].shape[-1], v_c.shape[-1], g_c.dtype
        if do is None:  # only the final states were used
            do = g_c.new_zeros((N, H, NC, L, V))
        groups = recompute_groups(NC)

        def step3_inputs(sl):  # step 3's inputs for the chunks sl, q, k and v in the compute dtype
            qkv = compute_qkv(q_c[:, :, sl], k_c[:, :, sl], v_c[:, :, sl], ctx.scale, cdt)
            return (*qkv, g_c[:, :, sl], None if b_c is None else b_c[:, :, sl], lam_c[:, :, sl])

        # 1. the walk's inputs, step 3 again without gradients, a group of chunks at a time
        q_eff = x = M = None
        with torch.no_grad(), autocast_as(ctx.autocast):
            for sl in groups:
                _, q_eff_sl, X_sl, M_sl = intra_chunk(*step3_inputs(sl), label_intra[:, :, sl], output=False)
                q_eff, x, M = (in_chunks(t, sl, part, NC) for t, part in
                               zip((q_eff, x, M), (q_eff_sl, X_sl.transpose(-1, -2), M_sl)))
        w = walk_rows(q_eff, lam_inter, x, v_c.to(cdt), M, routing)
        del q_eff, x
        # 2. the reverse walk
        Kp, Vp = w.qe.shape[-1], w.v.shape[-1]
        dS_rows = None if dS_final is None else padded_rows(dS_final, (0, Vp - V, 0, Kp - K))
        dqe, dlam, dx, dv, dM, dS0 = walk_backward(w, S, padded_rows(do, (0, Vp - V)), dS_rows, ctx.prec, ctx.group)
        del w
        dq_eff = dqe.reshape(N, H, NC, L, Kp)[..., :K]
        dX = dx.reshape(N, H, NC, L, Kp)[..., :K].transpose(-1, -2)
        dM = dM.reshape(M.shape) if M.dim() == 3 else dM.reshape(N, H, NC, Kp, Kp)[..., :K, :K]
        dv = dv.reshape(N, H, NC, L, Vp)[..., :V]
        # 3. step 3 once more with gradients, a group of chunks at a time: the gradients of q, k and v
        # are summed in the compute dtype (the values' from inside the chunk and from the walk) and
        # rounded to the input dtype last
        inputs = (q_c, k_c, v_c, g_c, b_c, lam_c)
        d = [None] * len(inputs)
        for sl in groups:
            leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(step3_inputs(sl), needs)]
            with torch.enable_grad(), autocast_as(ctx.autocast):
                outputs = intra_chunk(*leaves, label_intra[:, :, sl])
            upstream = (do[:, :, sl], dq_eff[:, :, sl], dX[:, :, sl], dM[:, :, sl])
            found = iter(torch.autograd.grad(outputs, [t for t, n in zip(leaves, needs) if n],
                                             [g.to(o.dtype) for o, g in zip(outputs, upstream)]))
            for i, n in enumerate(needs):
                if n:
                    grad = next(found)
                    if i == 0:
                        grad = scaled(grad, ctx.scale)
                    elif i == 2:  # the values are read inside the chunk and written into the states
                        grad = grad + dv[:, :, sl].to(grad.dtype)
                    d[i] = in_chunks(d[i], sl, grad, NC, like=inputs[i])
        dlam_inter = dlam.reshape(lam_inter.shape).to(lam_inter.dtype)
        dS0 = dS0.reshape(N, H, C, Kp, Vp)[..., :K, :V].to(cdt)
        return *d, None, dlam_inter, None, None, dS0, None, None, None


def autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """The caller's autocast on ``device_type``: ``(device_type, enabled, dtype)``. A backward that
    reruns forward code runs it under the forward's autocast (:func:`autocast_as`, as
    torch.utils.checkpoint does), else its products would be computed in another precision than
    the forward's and the recomputed values would not be the ones the forward used."""
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def autocast_as(state: tuple[str, bool, torch.dtype]):
    """The autocast context that :func:`autocast_state` recorded."""
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def in_chunks(t: torch.Tensor | None, sl: slice, part: torch.Tensor, NC: int, like: torch.Tensor | None = None):
    """Write ``part``, the chunks ``sl`` of an ``[N, H, NC, ...]`` tensor, into ``t`` and return it (``t``
    None: allocated here, contiguous, or with the strides and dtype of ``like``). A part of all ``NC``
    chunks, in those strides, is the tensor itself (in the dtype of ``like``): a single group of chunks
    needs no buffer and no copy."""
    if sl == slice(0, NC) and (like is None or part.stride() == like.stride()):
        return part if like is None else part.to(like.dtype)
    if t is None:
        t = part.new_empty(part.shape[:2] + (NC,) + part.shape[3:]) if like is None else torch.empty_like(like)
    t[:, :, sl] = part
    return t


# The backward reruns step 3 in at most RECOMPUTE_GROUPS groups of at least RECOMPUTE_MIN_CHUNKS
# chunks: its intermediates (~4 KB per token and head at L = 64, K = 128) then exist for a quarter
# of the sequence at a time, at four times the launches (few enough that none of them dominates).
RECOMPUTE_GROUPS, RECOMPUTE_MIN_CHUNKS = 4, 16


def recompute_groups(NC: int) -> list[slice]:
    """The groups of chunks in which the fused path's backward reruns step 3."""
    size = max(RECOMPUTE_MIN_CHUNKS, -(-NC // RECOMPUTE_GROUPS))
    return [slice(a, min(a + size, NC)) for a in range(0, NC, size)]


# above this capacity the PyTorch state walk routes states by scatter instead of a [C, C] matrix per
# chunk, whose memory would grow with C² whatever the sequence length (capacity 100,000: 40 GB a chunk)
DENSE_ROUTE_MAX_CAPACITY = 256


def _inter_blocked(walks, q_eff, lam_inter, X, v_c, tok_rank, M, dest, S0):
    """:func:`_inter` over blocks of value columns, each recomputed in the backward, when the
    stored states would exceed ``INTER_BLOCK_BYTES`` (halving the block while it is over 16 columns)."""
    N, H, NC, L, K = q_eff.shape
    C, V = dest.shape[-1], v_c.shape[-1]
    column_bytes = N * H * (NC + 1) * C * K * 4
    block = V
    while block > 16 and column_bytes * block > INTER_BLOCK_BYTES:
        block = -(-block // 2)
    if block == V:
        return _inter(walks, q_eff, lam_inter, X, v_c, tok_rank, M, dest, S0)
    parts = [checkpoint(_inter, walks, q_eff, lam_inter, X, v_c[..., a:a + block], tok_rank, M, dest,
                        S0[..., a:a + block], use_reentrant=False) for a in range(0, V, block)]
    return torch.cat([o for o, _ in parts], -1), torch.cat([s for _, s in parts], -1)


def _inter(walks, q_eff, lam_inter, X, v_c, tok_rank, M, dest, S0):
    """Read-out of the carried states and the state walk, unfused: token writes ``W`` and
    weighted queries are tensors. Returns ``o_inter [N, H, NC, L, V]`` and the final states."""
    N, H, NC, L, K = q_eff.shape
    C = dest.shape[-1]
    # the chunk's tokens written into each segment they belong to at the chunk's end
    route_tokens = F.one_hot(tok_rank, C + 1)[..., :C].to(v_c.dtype)  # [N, H, NC, L, C]
    W = X[:, :, :, None] @ (route_tokens.transpose(-1, -2)[..., None] * v_c[:, :, :, None])  # [N,H,NC,C,K,V]
    S = walks.state_recurrence(S0, M, W, dest).to(q_eff.dtype)
    S_in = S[:, :, :NC]  # [N, H, NC, C, K, V]
    # one [L, C*K] x [C*K, V] product per chunk: queries weighted by the label of each carried slot
    q_lam = (lam_inter[..., None] * q_eff[..., None, :]).reshape(N, H, NC, L, C * K)
    return q_lam @ S_in.reshape(N, H, NC, C * K, -1), S[:, :, NC]


@dataclass(frozen=True)
class Walks:
    """One backend of the chunked path's bookkeeping and sequential walks over chunks: the
    segments carried into every chunk, the ranks and labels of every chunk's units (with the
    routing at its end), and the (unfused) state recurrence. ``TORCH_WALKS`` is the reference;
    :func:`backend_walks` gives the one a backend name selects."""

    name: str
    carried_slots: Callable
    unit_labels: Callable
    state_recurrence: Callable


def _torch_carried_slots(start_death, carried_pos, carried_death, L):
    N, H, T = start_death.shape
    C = carried_pos.shape[-1]
    tok = torch.arange(L, device=start_death.device)
    pos, death = [carried_pos], [carried_death]
    for c in range(T // L):
        t_end = torch.full((N, H), c * L + L - 1, device=start_death.device)
        p, d = advance_slots(pos[-1], death[-1], c * L + tok, start_death[..., c * L:(c + 1) * L], t_end, C)
        pos.append(p)
        death.append(d)
    return torch.stack(pos, 2), torch.stack(death, 2)


def _torch_unit_labels(slots_pos, slots_death, start_death, L, label_rule, n_labels):
    N, H, NC, C = slots_death[:, :, :-1].shape
    in_pos, in_death = slots_pos[:, :, :NC], slots_death[:, :, :NC]
    tq = torch.arange(NC * L, device=start_death.device).reshape(NC, L)  # every query
    unit_pos = torch.cat([in_pos.flip(-1), tq.expand(N, H, NC, L)], -1)  # [N, H, NC, C + L], oldest first
    unit_death = torch.cat([in_death.flip(-1), start_death], -1)
    t_i = tq[..., :, None]  # [NC, L, 1]
    live = (unit_death[..., None, :] != NONE) & (unit_death[..., None, :] > t_i) & (unit_pos[..., None, :] <= t_i)
    exists = torch.cat([(in_death.flip(-1) != NONE)[..., None, :].expand(N, H, NC, L, C),
                        (tq[..., None, :] <= t_i).expand(N, H, NC, L, L)], -1)
    st = segment_structure(live, unit_pos, exists, tq.expand(N, H, NC, L), label_rule)
    rank_end = torch.where(exists[..., -1, :], st["rank"][..., -1, :], C)  # C: routed nowhere
    return narrow_labels(st["label"], n_labels), rank_end[..., :C].flip(-1), rank_end[..., C:]


def _torch_state_recurrence(S0, M, W, dest):
    C = dest.shape[-1]
    if C <= DENSE_ROUTE_MAX_CAPACITY:  # a [C, C] routing matrix per chunk: one product
        routes = F.one_hot(dest, C + 1)[..., :C].transpose(-1, -2).to(W.dtype).unbind(2)  # [.., new, old]
    else:  # a large capacity: scatter the states to their new slots (memory linear in C, not C²)
        routes = dest.unbind(2)
    # unbind once: indexing chunk c of a big tensor inside the loop would make every step's
    # backward allocate (and fill) a gradient of the whole tensor, O(T^2) in all
    S, out = S0, [S0]
    for route_c, M_c, W_c in zip(routes, M.unbind(2), W.unbind(2)):
        if route_c.dim() == 4:
            merged = torch.einsum("nhij,nhjkv->nhikv", route_c, S)
        else:  # old slot j goes to slot route_c[j]; C means nowhere (the extra slot, dropped)
            index = route_c[..., None, None].expand(S.shape)
            merged = S.new_zeros(S.shape[:2] + (C + 1,) + S.shape[3:]).scatter_add(2, index, S)[:, :, :C]
        if M_c.dim() == 2:  # Mamba-2: a scalar decay per chunk
            merged = M_c[:, :, None, None, None] * merged
        else:
            merged = torch.einsum("nhab,nhibv->nhiav", M_c, merged)
        S = merged + W_c
        out.append(S)
    return torch.stack(out, 2)


# the bookkeeping and the walks as PyTorch code: the reference for the Triton kernels
TORCH_WALKS = Walks("torch", _torch_carried_slots, _torch_unit_labels, _torch_state_recurrence)


def backend_walks(backend: str) -> Walks:
    """The walks of ``backend`` (``"torch"`` or ``"triton"``; Triton is imported only here)."""
    if backend == "triton":
        from dla.ops.triton.chunk_state import carried_slots, state_recurrence, unit_labels

        return Walks("triton", carried_slots, unit_labels, state_recurrence)
    return TORCH_WALKS
