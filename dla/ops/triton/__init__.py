"""Triton kernels (GPU; run on CPU through TRITON_INTERPRET=1 for tests).

- :mod:`.chunk_state`: the segments carried into every chunk, and the unfused state walk;
- :mod:`.chunk_inter`: the fused inter-chunk walk (read-out, token writes, state walk);
- :mod:`.decode`: one decoding step for a batch;
- :mod:`.utils`: helpers they share.

Conventions, after flash-linear-attention's: a kernel is named ``<form>_dla_<part>_<fwd|bwd>_kernel``
(``chunk_dla_inter_fwd_kernel``, ``decode_dla_step_kernel``) and its host wrapper after the part
(``fused_inter``, ``state_recurrence``, ``decode_step``). Pointer arguments end in ``_ptr``; sizes
and switches known at compile time are ``tl.constexpr`` in capitals: ``L`` chunk length, ``C``
capacity, ``K`` / ``V`` key / value width (padded to powers of two), ``BK`` / ``BV`` / ``BT`` block
sizes, ``NC`` chunks per row. Indices: ``r`` the program's row (one sequence-head), ``c`` a chunk,
``rc = r * NC + c`` (int64, so offsets do not overflow), ``j`` an old (carried) slot, ``n`` a new
slot, ``vv`` / ``kk`` value / key offsets. The chunk transition ``A_end ... A_start`` is ``M``
everywhere (a scalar for Mamba-2, ``K x K`` for Gated DeltaNet); ``S`` are states, ``G`` / ``dS``
their gradients. Every ``tl.debug_barrier()`` says which stores it orders before which loads.
"""
