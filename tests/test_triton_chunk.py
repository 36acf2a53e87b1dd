"""The Triton walks of the chunked path (carried segments, state recurrence with its hand-written
backward) against the PyTorch path and the O(T^2) reference. On CPU they run in Triton's
interpreter (tiny shapes); on a GPU the same tests check the compiled kernels."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BASES,
    FAST_DECAY,
    SLOW_DECAY,
    WALK_RESULTS,
    counted,
    grads,
    make_case,
    rel_err,
    walk_case,
    walk_results,
)

import dla

pytest.importorskip("triton", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 kernels with IEEE dot products; the references run in float64
TOL = 1e-5
# (base, Gated DeltaNet through the fused walk): the tests below run for both Gated DeltaNet walks
WALKS = [("mamba2", False), ("gated_deltanet", False), ("gated_deltanet", True)]
WALK_IDS = ["mamba2", "gated_deltanet", "gated_deltanet-fused"]
# chunks per state checkpoint of the fused walk: every boundary kept, or several groups of 2 (the
# default, 8, makes one group of these few chunks)
CHECKPOINT_GROUPS = ["1", "2"]


@pytest.fixture(autouse=True)
def _gated_deltanet_walk(request, monkeypatch):
    """Sets the walk a WALKS case asks for (and the fused walk's checkpoint group a CHECKPOINT_GROUPS
    case asks for), and checks afterwards that the fused walk ran iff it should."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if "fused" not in params:
        yield
        return
    if "group" in params:
        if params["group"] != CHECKPOINT_GROUPS[0] and not (params["base"] == "mamba2" or params["fused"]):
            pytest.skip("the checkpoint group is the fused walk's")
        monkeypatch.setenv("DLA_WALK_CHECKPOINT_GROUP", params["group"])
    from dla.ops.triton import chunk_inter

    monkeypatch.setattr(dla.ops.chunk, "FUSED_GATED_DELTANET", params["fused"])
    calls, walk_forward = [], chunk_inter.walk_forward
    monkeypatch.setattr(chunk_inter, "walk_forward", lambda *a, **kw: calls.append(1) or walk_forward(*a, **kw))
    yield
    assert bool(calls) == (params["base"] == "mamba2" or params["fused"]), "the fused walk ran iff it should"


def check(inputs, schedule, chunk_size=16, cu_seqlens=None, initial_state=None, tol=TOL):
    ref_inputs = {n: None if x is None else x.detach().double().requires_grad_() for n, x in inputs.items()}
    kw = dict(schedule=schedule, chunk_size=chunk_size, cu_seqlens=cu_seqlens, output_final_state=True)
    o_ref, s_ref = dla.chunk_dla(**ref_inputs, backend="torch", initial_state=initial_state, **kw)
    o, s = dla.chunk_dla(**inputs, backend="triton", initial_state=initial_state, **kw)
    assert torch.isfinite(o).all()
    assert rel_err(o, o_ref) <= tol
    assert rel_err(s.states, s_ref.states) <= tol
    assert torch.equal(s.segments.starts, schedule.final.starts)
    g_ref, g = grads(o_ref, ref_inputs), grads(o, inputs)
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) <= 10 * tol, f"d{name}"


@pytest.mark.parametrize("label_rule", ["recency", "level"])
@pytest.mark.parametrize("base, fused", WALKS, ids=WALK_IDS)
@pytest.mark.parametrize("policy", ["single", "fixed", "fenwick", "dynamic"])
def test_triton_chunk_matches_torch(policy, base, fused, label_rule):
    inputs, schedule = make_case(policy, base, label_rule, B=2, T=45, H=2, K=16, V=16, capacity=4, period=5,
                                 dtype=torch.float32, requires_grad=True, device=DEVICE)
    check(inputs, schedule)


@pytest.mark.parametrize("group", CHECKPOINT_GROUPS)
@pytest.mark.parametrize("base, fused", WALKS, ids=WALK_IDS)
def test_triton_chunk_odd_head_sizes_and_varlen(base, fused, group):
    cu = torch.tensor([0, 5, 40, 40, 77], device=DEVICE)
    inputs, schedule = make_case("dynamic", base, None, B=1, T=77, H=3, K=7, V=20, capacity=3,
                                 dtype=torch.float32, requires_grad=True, cu_seqlens=cu, device=DEVICE)
    check(inputs, schedule, chunk_size=32, cu_seqlens=cu)


@pytest.mark.parametrize("base, fused", WALKS, ids=WALK_IDS)
def test_triton_chunk_wide_heads(base, fused):
    """K = 64 (the transition in two row blocks of 32), V = 40 (padded to 64: several value
    blocks whose gradients meet in atomics)."""
    inputs, schedule = make_case("dynamic", base, None, B=1, T=40, H=1, K=64, V=40, capacity=3,
                                 dtype=torch.float32, requires_grad=True, device=DEVICE)
    check(inputs, schedule)


@pytest.mark.parametrize("base, fused", WALKS, ids=WALK_IDS)
def test_triton_chunk_slow_decays_across_many_chunks(base, fused):
    """Decays near 1 (as trained models have) over 8 chunks with two key blocks: the states carried
    across chunks, and so the transitions and their gradients, dominate o."""
    inputs, schedule = make_case("dynamic", base, None, B=1, T=128, H=2, K=64, V=16, capacity=4,
                                 dtype=torch.float32, requires_grad=True, device=DEVICE, decay=SLOW_DECAY)
    check(inputs, schedule)


@pytest.mark.parametrize("group", CHECKPOINT_GROUPS)
@pytest.mark.parametrize("base, fused", WALKS, ids=WALK_IDS)
def test_triton_chunk_initial_state_gradient(base, fused, group):
    T, T1 = 70, 33
    inputs, _ = make_case("dynamic", base, "level", B=2, T=T, H=2, K=16, V=16, capacity=4, dtype=torch.float32,
                          device=DEVICE)
    head = {n: None if x is None else x[:, :T1] for n, x in inputs.items()}
    tail = {n: None if x is None else x[:, T1:].detach().requires_grad_() for n, x in inputs.items()}
    kw = dict(batch=2, heads=2, capacity=4, label_rule="level")
    s1 = dla.plan_schedule("dynamic", length=T1, scores=dla.novelty_scores(head["k"]), **kw)
    _, state = dla.chunk_dla(**head, schedule=s1, chunk_size=16, output_final_state=True, backend="torch")
    s2 = dla.plan_schedule("dynamic", length=T - T1, scores=dla.novelty_scores(tail["k"], prev_key=state.prev_key),
                           initial_state=state, **kw)
    state.states = state.states.float().requires_grad_()
    o_ref, _ = dla.chunk_dla(**tail, schedule=s2, initial_state=state, chunk_size=16, backend="torch")
    o, _ = dla.chunk_dla(**tail, schedule=s2, initial_state=state, chunk_size=16, backend="triton")
    assert rel_err(o, o_ref) <= TOL
    w = torch.randn_like(o)
    (g_ref,) = torch.autograd.grad((o_ref * w).sum(), state.states)
    (g,) = torch.autograd.grad((o * w).sum(), state.states)
    assert g_ref.abs().sum() > 0 and rel_err(g, g_ref) <= TOL


@pytest.mark.parametrize("group", CHECKPOINT_GROUPS)
@pytest.mark.parametrize("base, fused", WALKS, ids=WALK_IDS)
def test_triton_chunk_final_state_gradient(base, fused, group):
    """A loss on the final states (as when a prefill's state is trained through) reaches every input."""
    inputs, schedule = make_case("dynamic", base, "recency", B=2, T=50, H=2, K=16, V=16, capacity=4,
                                 dtype=torch.float32, requires_grad=True, device=DEVICE)
    ref_inputs = {n: None if x is None else x.detach().double().requires_grad_() for n, x in inputs.items()}

    def loss(backend, xs):
        o, state = dla.chunk_dla(**xs, schedule=schedule, chunk_size=16, output_final_state=True, backend=backend)
        w = torch.randn(state.states.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        return (o * o).sum() + (state.states * w.to(state.states)).sum()

    names = [n for n, x in inputs.items() if x is not None and x.requires_grad]
    g_ref = torch.autograd.grad(loss("torch", ref_inputs), [ref_inputs[n] for n in names])
    g = torch.autograd.grad(loss("triton", inputs), [inputs[n] for n in names])
    for name, a, b in zip(names, g, g_ref):
        assert rel_err(a, b) <= 10 * TOL, f"d{name}"


def test_triton_chunk_matches_naive_directly():
    inputs, schedule = make_case("dynamic", "gated_deltanet", "recency", B=1, T=50, H=2, K=16, V=16,
                                 capacity=5, dtype=torch.float64, device=DEVICE)
    o_ref = dla.naive_dla(**inputs, schedule=schedule)
    o, _ = dla.chunk_dla(**inputs, schedule=schedule, chunk_size=16, backend="triton")
    assert rel_err(o, o_ref) <= TOL


UNIT_LABEL_CASES = [("dynamic", "recency", 1), ("dynamic", "level", 1), ("fenwick", "level", 1),
                    ("fixed", "recency", 300), ("single", "recency", 1)]


@pytest.mark.parametrize("policy, label_rule, extra_labels, chunk_size",
                         [case + (L,) for case in UNIT_LABEL_CASES for L in (16, 64)]
                         + [case + (128,) for case in UNIT_LABEL_CASES[1:3]])
def test_the_unit_labels_kernel_gives_the_torch_bookkeeping(policy, label_rule, extra_labels, chunk_size,
                                                            monkeypatch):
    """Ranks, labels and routing of every chunk's units from the Triton kernel equal, integer for
    integer, those of the PyTorch bookkeeping (segment_structure), for fresh and continued windows,
    padded sequences, a capacity that is no power of two and more than 256 labels (int32 labels)."""
    from dla.ops import chunk
    from dla.ops.triton import chunk_state

    compared = []

    def both(*args):
        ours, reference = chunk_state.unit_labels(*args), chunk._torch_unit_labels(*args)
        for a, b in zip(ours, reference):
            assert a.dtype == b.dtype and torch.equal(a, b)
        compared.append(ours[0].dtype)
        return ours

    monkeypatch.setattr(chunk, "backend_walks", lambda name: dataclasses.replace(chunk.TORCH_WALKS, unit_labels=both))
    T, T1 = 150, 70
    inputs, _ = make_case(policy, "mamba2", label_rule, B=3, T=T, H=2, K=8, V=8, capacity=5, period=4,
                          extra_labels=extra_labels, device=DEVICE)
    kw = dict(batch=3, heads=2, capacity=9 if policy == "fenwick" else 5, label_rule=label_rule, period=4,
              device=DEVICE)
    head = {n: None if x is None else x[:, :T1] for n, x in inputs.items()}
    tail = {n: None if x is None else x[:, T1:] for n, x in inputs.items()}
    dynamic = policy == "dynamic"
    s1 = dla.plan_schedule(policy, length=T1, scores=dla.novelty_scores(head["k"]) if dynamic else None, **kw)
    _, state = dla.chunk_dla(**head, schedule=s1, chunk_size=chunk_size, output_final_state=True)
    s2 = dla.plan_schedule(policy, length=T - T1, initial_state=state, **kw,
                           scores=dla.novelty_scores(tail["k"], prev_key=state.prev_key) if dynamic else None)
    dla.chunk_dla(**tail, schedule=s2, initial_state=state, chunk_size=chunk_size)  # carried segments
    cu = torch.tensor([0, 40, 41, 150])
    packed, s3 = make_case(policy, "mamba2", label_rule, B=1, T=T, H=2, K=8, V=8, capacity=5, period=4,
                           extra_labels=extra_labels, cu_seqlens=cu, device=DEVICE)
    dla.chunk_dla(**packed, schedule=s3, cu_seqlens=cu.to(DEVICE), chunk_size=chunk_size)
    assert compared == [torch.int32 if extra_labels > 256 else torch.uint8] * 3


@pytest.mark.parametrize("base, fused", WALKS[0::2], ids=WALK_IDS[0::2])
def test_the_backward_reruns_step_3_in_groups_of_chunks(base, fused, monkeypatch):
    """Step 3 rerun one chunk at a time in the backward (the fused walk's groups made as small as
    they go) gives the gradients of the reference."""
    from dla.ops import chunk

    monkeypatch.setattr(chunk, "RECOMPUTE_MIN_CHUNKS", 1)
    monkeypatch.setattr(chunk, "RECOMPUTE_GROUPS", 1000)
    assert chunk.recompute_groups(3) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    inputs, schedule = make_case("dynamic", base, B=2, T=45, H=2, K=16, V=16, capacity=4, dtype=torch.float32,
                                 requires_grad=True, device=DEVICE)
    check(inputs, schedule)


def test_recompute_groups():
    from dla.ops.chunk import recompute_groups

    assert recompute_groups(5) == [slice(0, 5)]
    assert recompute_groups(64) == [slice(0, 16), slice(16, 32), slice(32, 48), slice(48, 64)]
    assert recompute_groups(130) == [slice(0, 33), slice(33, 66), slice(66, 99), slice(99, 130)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("base", BASES)
def test_bfloat16_inputs_get_the_gradients_of_their_values(base, backend):
    """The op keeps q, k and v in bfloat16 for its backward and converts them again there: output
    and every gradient those of the same values in float64, to bfloat16's rounding."""
    inputs, schedule = make_case("dynamic", base, B=2, T=70, H=2, K=16, V=16, capacity=4, dtype=torch.bfloat16,
                                 requires_grad=True, device=DEVICE)
    ref = {n: None if x is None else x.detach().double().requires_grad_() for n, x in inputs.items()}
    kw = dict(schedule=schedule, chunk_size=16, output_final_state=True)
    o_ref, s_ref = dla.chunk_dla(**ref, backend="torch", **kw)
    o, s = dla.chunk_dla(**inputs, backend=backend, **kw)
    # the fused walk's products of bfloat16 inputs run in TF32 on a GPU (chunk_inter.input_precision)
    state_tol = 1e-5 if backend == "torch" or DEVICE == "cpu" else 2e-3
    assert o.dtype == torch.bfloat16 and rel_err(o, o_ref) <= 1e-2 and rel_err(s.states, s_ref.states) <= state_tol
    g_ref, g = grads(o_ref.float() + s_ref.states.sum(), ref), grads(o.float() + s.states.sum(), inputs)
    for name in g_ref:
        assert g[name].dtype == inputs[name].dtype and rel_err(g[name], g_ref[name]) <= 1e-2, f"d{name}"


@pytest.mark.parametrize("base", BASES)
def test_the_fused_walk_keeps_step_3s_inputs_labels_and_state_checkpoints(base):
    """What the chunked op on the fused walk keeps for its backward, storage by storage: q, k and v
    as given (bfloat16), g, β and λ, one-byte labels, the λ of the carried slots, the routing and
    the states at every 8th chunk boundary; none of step 3's O(L²) or O(L K) per-chunk tensors."""
    N, T, H, K, V, C, L = 1, 256, 2, 32, 16, 4, 16
    inputs, schedule = make_case("dynamic", base, B=N, T=T, H=H, K=K, V=V, capacity=C, dtype=torch.bfloat16,
                                 requires_grad=True, device=DEVICE)
    for name in ("g", "beta", "lam"):
        if inputs[name] is not None:
            inputs[name] = inputs[name].detach().float().requires_grad_()
    kept = {}  # storage -> bytes

    def keep(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        dla.chunk_dla(**inputs, schedule=schedule, chunk_size=L, backend="triton")
    NC, n_labels = T // L, inputs["lam"].shape[-1]
    expected = (2 * T * H * K * 2 + T * H * V * 2  # q, k, v
                + T * H * 4 * (1 + (base == "gated_deltanet") + n_labels)  # g, β, λ
                + N * H * NC * L * (C + L)  # the label of every unit at every query, one byte each
                + N * H * NC * L * C * 4  # λ of the carried slots
                + N * H * NC * C  # which carried slots exist
                + N * H * NC * (L + 3 * C) * 4  # the routing, int32: tokens' slots, slots' sources and new slots
                + N * H * (NC // 8 + 1) * C * K * V * 4)  # the state checkpoints
    assert sum(kept.values()) == expected


@pytest.mark.parametrize("decay", [FAST_DECAY, SLOW_DECAY], ids=["fast", "slow"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("policy", ["fixed", "fenwick", "dynamic"])
def test_triton_decode_steps_match_recurrent(policy, base, decay):
    """Decoding token by token with the fused kernel == the differentiable recurrence (2000 steps
    on a GPU, 40 in the interpreter); slow decays keep merged old states in the output."""
    T, B, H = (2000 if DEVICE == "cuda" else 40), 2, 3
    capacity = (T - 1).bit_length() + 1 if policy == "fenwick" else 4
    inputs, schedule = make_case(policy, base, "level", B=B, T=T, H=H, K=12, V=20, capacity=capacity, period=7,
                                 dtype=torch.float32, device=DEVICE, decay=decay)
    o_ref, ref_state = dla.recurrent_dla(**inputs, schedule=schedule, output_final_state=True, backend="torch")
    kw = dict(batch=B, heads=H, capacity=schedule.capacity, label_rule="level", device=DEVICE,
              period=7 if policy == "fixed" else None)
    state = dla.DLAState(torch.zeros(B, H, schedule.capacity, 12, 20, device=DEVICE),
                         dla.SegmentState.empty(B, H, schedule.capacity, DEVICE))
    outs = []
    for t in range(T):
        step = {n: None if x is None else x[:, t:t + 1] for n, x in inputs.items()}
        u = dla.novelty_scores(step["k"], prev_key=state.prev_key) if policy == "dynamic" else None
        s = dla.plan_schedule(policy, length=1, scores=u, initial_state=state, **kw)
        with torch.no_grad():
            o_t, state = dla.recurrent_dla(**step, schedule=s, initial_state=state, output_final_state=True,
                                           backend="triton")
        outs.append(o_t)
    assert rel_err(torch.cat(outs, 1), o_ref) <= TOL
    assert rel_err(state.slot_states(), ref_state.states) <= TOL


@pytest.mark.parametrize("base, step, value_blocks", [(base, "kernel", blocks) for base in BASES for blocks in (1, 2)]
                         + [("mamba2", "pytorch", 1)])
@pytest.mark.parametrize("inplace", [True, False], ids=["in-place", "out-of-place"])
def test_the_decode_kernel_writes_only_the_slots_whose_numbers_change(base, inplace, step, value_blocks, monkeypatch):
    """Five steps on C = 5 slots stored at shuffled places: a token that extends its segment (the
    oldest slot empty), a birth (every slot one older), a birth at capacity (the two oldest merge),
    an extension of a full cache and a fold of a run of four slots into the oldest (fenwick's
    carries). Every step's output and slots equal the PyTorch step's on the slots in order
    (float64), and the places stay a permutation. Mamba-2 writes only the open slot and a merge's
    sum (a moved slot keeps its place, a closed one takes the scale ``exp(g) * scale``); Gated
    DeltaNet rewrites every held slot with scale 1; an empty slot gets scale 0. Out of place the
    new states hold the same numbers at every place. With two value blocks per row (the launch for
    a GPU of many SMs and few rows) the programs of a row share its scales and places. The kernel's
    PyTorch twin (``_torch_decode_step``, Mamba-2's decoding step off the GPU) keeps the slots alike."""
    from dla.ops.recurrent import _torch_decode_step, _torch_step
    from dla.ops.triton import decode
    from dla.ops.triton.decode import decode_step

    def pytorch_step(S, scales, places, dest, q, k, v, g, beta, lam, scale, inplace):  # q comes multiplied by scale
        return _torch_decode_step(S, scales, places, dest, q * scale, k, v, g, beta, lam, inplace=inplace)

    run_step = decode_step if step == "kernel" else pytorch_step
    if value_blocks == 2:  # 6 rows on 64 SMs: 16 value columns per program, V = 20 in two blocks
        monkeypatch.setattr(decode, "multiprocessor_count", lambda device: 64)
    else:
        monkeypatch.setattr(decode, "multiprocessor_count", lambda device: None)
    launched = []
    monkeypatch.setattr(decode, "decode_dla_step_kernel", counted(decode.decode_dla_step_kernel, launched))
    torch.manual_seed(0)
    N, H, C, K, V = 2, 3, 5, 12, 20
    S = torch.randn(N, H, C, K, V, device=DEVICE)
    scales = torch.rand(N, H, C, device=DEVICE) + 0.5
    places = torch.stack([torch.randperm(C) for _ in range(N * H)]).view(N, H, C).int().to(DEVICE)
    beta = torch.rand(N, H, device=DEVICE) if base == "gated_deltanet" else None
    routings = {  # dest: the new slot of every old slot (C: none)
        "extend": [0, 1, 2, 3, C],
        "birth": [1, 2, 3, 4, C],
        "birth at capacity": [1, 2, 3, 4, 4],
        "extend full": [0, 1, 2, 3, 4],
        "fold a run": [1, 4, 4, 4, 4],
    }
    for name, dest in routings.items():
        dest = torch.tensor(dest, device=DEVICE).expand(N, H, C).contiguous()
        filled = torch.zeros(C, dtype=torch.bool, device=DEVICE)  # the new slots that hold a segment
        filled[dest[0, 0][dest[0, 0] < C]] = True
        filled[0] = True  # the token's slot
        q, k = torch.randn(N, H, K, device=DEVICE), F.normalize(torch.randn(N, H, K, device=DEVICE), dim=-1)
        v, g = torch.randn(N, H, V, device=DEVICE), -torch.rand(N, H, device=DEVICE)
        lam = torch.rand(N, H, C, device=DEVICE) * filled
        old = dla.DLAState(S, None, scales=scales, places=places).slot_states()
        want_S, _, _, want_o = _torch_step(old.double(), None, None, dest, q.double() * 0.5, k.double(), v.double(),
                                           g.double(), None if beta is None else beta.double(), lam.double())
        before = S.clone()
        S_new, scales_new, places_new, o = run_step(S, scales, places, dest, q, k, v, g, beta, lam, scale=0.5,
                                                       inplace=inplace)
        assert (S_new.data_ptr() == S.data_ptr()) == inplace, name
        assert torch.equal(places_new.sort(-1).values, torch.arange(C, device=DEVICE).int().expand(N, H, C)), name
        got = dla.DLAState(S_new, None, scales=scales_new, places=places_new).slot_states()
        assert rel_err(o, want_o) <= TOL and rel_err(got[:, :, filled], want_S[:, :, filled]) <= TOL, name
        assert bool((scales_new[:, :, ~filled] == 0).all()), name
        # the places whose numbers the step changed, per row: [N, H, C] by place
        changed = (S_new != before).flatten(-2).any(-1)
        written = torch.zeros_like(changed)
        slot = torch.arange(C, device=DEVICE)
        if base == "mamba2":  # the open slot, and a new slot that sums several old ones
            hit = dest[..., :, None] == slot  # [N, H, old, new]
            rewritten = (slot == 0) | (hit.sum(-2) > 1)
            kept = filled & ~rewritten  # [N, H, new]: one source, the old slot below
            source = torch.where(hit, slot[:, None], 0).amax(-2)
            torch.testing.assert_close(scales_new[kept], (g.exp()[..., None] * scales.gather(-1, source))[kept],
                                       rtol=1e-6, atol=0)
        else:
            rewritten = filled.expand(N, H, C)
        assert bool((scales_new[rewritten] == 1).all()), name
        written.scatter_(-1, places_new.long(), rewritten)
        assert torch.equal(changed, written), name
        S, scales, places = S_new, scales_new, places_new
    assert launched == ([(N * H, value_blocks)] * len(routings) if step == "kernel" else [])


def test_the_decode_launch_narrows_its_value_blocks_for_few_rows():
    """At least two programs per SM where the value columns allow: batch 8 of DLA-Mamba-2 125M (24
    heads, K = 128, V = 64) on 132 SMs takes blocks of 32 columns; batch 64, or no SM count, keeps 64;
    a single row goes down to 16. Both bases take tiles of at most 8192 numbers: 64 columns at
    K = 128 (and at K = 96, padded to 128), 32 at K = 256. Always 4 warps."""
    from dla.ops.triton.decode import launch_shape

    assert launch_shape(128, 64) == launch_shape(128, 64, 64 * 24, 132) == (64, 4)
    assert launch_shape(128, 64, 8 * 24, 132) == (32, 4)
    assert launch_shape(128, 64, 1, 132) == (16, 4)
    assert launch_shape(128, 128, 64 * 16, 132) == launch_shape(96, 192, 64 * 6, 132) == (64, 4)
    assert launch_shape(96, 192, 8 * 6, 132) == (32, 4)
    assert launch_shape(256, 512, 64 * 16, 132) == (32, 4)
    assert launch_shape(128, 128, 8, 132) == (16, 4)


def test_gated_deltanet_inter_in_value_blocks(monkeypatch):
    """The unfused (Gated DeltaNet) inter part over value blocks, recomputed in the backward:
    Triton walks per block == the PyTorch path (40 columns -> 4 blocks of 10, padded to 16)."""
    monkeypatch.setattr(dla.ops.chunk, "INTER_BLOCK_BYTES", 1)
    monkeypatch.setattr(dla.ops.chunk, "FUSED_GATED_DELTANET", False)  # the value blocks are the unfused path's
    inputs, schedule = make_case("dynamic", "gated_deltanet", None, B=1, T=40, H=2, K=8, V=40, capacity=3,
                                 dtype=torch.float32, device=DEVICE, requires_grad=True)
    check(inputs, schedule)


@pytest.mark.parametrize("key_block", ["32", "64", "128"])
@pytest.mark.parametrize("K, V", [(64, 40), (40, 16), (128, 16), (200, 16)])
@pytest.mark.parametrize("matrix", [False, True], ids=["scalar", "matrix"])
def test_fused_walk_against_the_torch_walks(matrix, K, V, key_block, monkeypatch):
    """fused_inter directly against the unfused PyTorch walks (:func:`walk_case`), with a final-state
    gradient, and several key blocks or one (K = 40 is padded to 64; 128 is the scalar walk's
    default block at K = 128); K = 200 (padded to 256) also splits the transition's columns into
    two blocks of 128."""
    monkeypatch.setenv("DLA_WALK_KEY_BLOCK", key_block)
    case = walk_case(matrix, NC=4, C=3, K=K, V=V, seed=K + V + matrix, device=DEVICE)
    want, got = walk_results(case, fused=False), walk_results(case, fused=True)
    for name, a, b in zip(WALK_RESULTS, got, want):
        assert rel_err(a.double(), b) < 1e-5, name


@pytest.mark.parametrize("matrix, NC, C, group", [(False, 3, 8, 4), (True, 3, 1, 4), (False, 9, 3, 4),
                                                   (True, 9, 3, 4), (False, 17, 1, 8), (True, 17, 3, 8)],
                         ids=lambda p: ("matrix" if p else "scalar") if isinstance(p, bool) else str(p))
def test_fused_walk_state_checkpoints(matrix, NC, C, group):
    """The forward keeps the states only every ``group`` chunks and the backward recomputes those
    between, one group at a time from the last: the same numbers, bit for bit, as keeping every
    chunk boundary (group 1), and the PyTorch walks' within 1e-5. NC is no multiple of the group
    (one partial group of 3 chunks, or full groups and a last one of a single chunk). V = 20 is
    padded to 32: two forward value blocks of 16 in the interpreter, one backward block of 32, so
    the backward recomputes the states in other tiles than the forward stored them."""
    case = walk_case(matrix, NC=NC, C=C, K=16, V=20, seed=NC + C + matrix, device=DEVICE)
    every, checkpointed = walk_results(case, fused=True, group=1), walk_results(case, fused=True, group=group)
    want = walk_results(case, fused=False)
    for name, a, b, c in zip(WALK_RESULTS, checkpointed, every, want):
        assert torch.equal(a, b), name
        assert rel_err(a.double(), c) < 1e-5, name


def spy_key_tiles(monkeypatch) -> list:
    """The walks' (key splits, key block) per launch, forward and backward, from now on."""
    from dla.ops.triton import chunk_inter

    tiles, key_tiles = [], chunk_inter.key_tiles
    monkeypatch.setattr(chunk_inter, "key_tiles", lambda K, matrix: tiles.append(key_tiles(K, matrix)) or tiles[-1])
    return tiles


@pytest.mark.parametrize("K, V, key_block, splits", [(64, 40, "16", "2"), (64, 40, "16", "4"), (128, 16, "32", "2"),
                                                     (128, 16, "32", "4")])
def test_fused_walk_in_key_splits(K, V, key_block, splits, monkeypatch):
    """The scalar walk in key splits (DLA_WALK_KEY_SPLITS: a program per row, value block and split
    of K / KS key rows, walked in key blocks, two per split or one) gives the PyTorch walks' o,
    final states and gradients within 1e-5, and the unsplit walk's to rounding: the read-out and
    dv add the splits' partials, dλ and the decay's gradient the splits' atomic adds, in another
    order (V = 40 is padded to 64: several value blocks as well)."""
    monkeypatch.setenv("DLA_WALK_KEY_BLOCK", key_block)
    case = walk_case(False, NC=4, C=3, K=K, V=V, seed=K + V, device=DEVICE)
    want, whole = walk_results(case, fused=False), walk_results(case, fused=True)
    monkeypatch.setenv("DLA_WALK_KEY_SPLITS", splits)
    tiles = spy_key_tiles(monkeypatch)
    got = walk_results(case, fused=True)
    assert tiles == [(int(splits), min(int(key_block), K // int(splits)))] * 2  # forward, backward
    for name, a, b, c in zip(WALK_RESULTS, got, want, whole):
        assert rel_err(a.double(), b) < 1e-5, name
        assert rel_err(a, c) < 1e-6, name


@pytest.mark.parametrize("splits", ["2", "4"])
def test_fused_walk_state_checkpoints_in_key_splits(splits, monkeypatch):
    """As :func:`test_fused_walk_state_checkpoints` for the scalar walk in key splits (K = 64 in
    blocks of 16: two per split or one): every split recomputes its key rows of the states from
    the checkpoints (every 4 of 9 chunks) as the forward computed them, so the numbers equal those
    of keeping every boundary bit for bit, except dλ and the decay's gradient, which add the
    splits' contributions atomically: in the interpreter in one order, on a GPU in any (there to
    rounding)."""
    monkeypatch.setenv("DLA_WALK_KEY_BLOCK", "16")
    monkeypatch.setenv("DLA_WALK_KEY_SPLITS", splits)
    case = walk_case(False, NC=9, C=3, K=64, V=20, seed=9 + int(splits), device=DEVICE)
    every, checkpointed = walk_results(case, fused=True, group=1), walk_results(case, fused=True, group=4)
    want = walk_results(case, fused=False)
    for name, a, b, c in zip(WALK_RESULTS, checkpointed, every, want):
        if DEVICE == "cuda" and name in ("dlam", "dgamma"):
            assert rel_err(a, b) < 1e-6, name
        else:
            assert torch.equal(a, b), name
        assert rel_err(a.double(), c) < 1e-5, name


def test_the_matrix_walk_takes_no_key_splits(monkeypatch):
    """Gated DeltaNet's K x K transition couples the key rows: DLA_WALK_KEY_SPLITS leaves its walk
    in one split, with the numbers of the unset variable bit for bit (V = 16: one value block, so
    no atomic sum meets two programs)."""
    monkeypatch.setenv("DLA_WALK_KEY_BLOCK", "16")
    case = walk_case(True, NC=3, C=2, K=32, V=16, device=DEVICE)
    whole = walk_results(case, fused=True)
    monkeypatch.setenv("DLA_WALK_KEY_SPLITS", "2")
    tiles = spy_key_tiles(monkeypatch)
    for name, a, b in zip(WALK_RESULTS, walk_results(case, fused=True), whole):
        assert torch.equal(a, b), name
    assert tiles == [(1, 16)] * 2


@pytest.mark.parametrize("matrix", [False, True], ids=["scalar", "matrix"])
def test_the_backward_walk_without_a_final_state_gradient(matrix, monkeypatch):
    """The reverse walk's two halves of state gradients are not zero-filled: the first is dS_NC (the
    final states' gradient, or zeros), the second is written before it is read. In NaN-poisoned buffers
    the gradients of a loss on ``o`` alone equal the PyTorch walks', and no final gradient (None) gives
    what a zero one gives, bit for bit."""
    from dla.ops.chunk import TORCH_WALKS, _inter
    from dla.ops.triton import chunk_inter, utils

    monkeypatch.setattr(utils, "POISON", True)
    leaves, rank, dest, w_o, _ = walk_case(matrix, NC=5, C=3, K=32, V=16, seed=7, device=DEVICE)
    grads = []
    for fused in (True, False):
        ins = [t.clone().requires_grad_() for t in leaves]
        if fused:
            o, _ = chunk_inter.fused_inter(*(t.float() for t in ins[:4]), rank, ins[4].float(), dest, ins[5].float())
        else:
            o, _ = _inter(TORCH_WALKS, ins[0], ins[1], ins[2].transpose(-1, -2), ins[3], rank, ins[4], dest, ins[5])
        grads.append(torch.autograd.grad((o * w_o).sum(), ins))
    for name, a, b in zip(WALK_RESULTS[2:], *grads):
        assert torch.isfinite(a).all() and rel_err(a.double(), b) < 1e-5, name
    q_eff, lam, x, v, gamma, S0 = (t.float() for t in leaves)
    w = chunk_inter.walk_rows(q_eff, lam, x, v, gamma, chunk_inter.routing_rows(rank, dest))
    R, NC, L, K = w.qe.shape
    S0 = chunk_inter.padded_rows(S0)
    _, S = chunk_inter.walk_forward(w, S0, "ieee", 2)
    do = w_o.float().reshape(R, NC, L, -1)
    none, zero = (chunk_inter.walk_backward(w, S, do, dS, "ieee", 2) for dS in (None, torch.zeros_like(S0)))
    for a, b in zip(none, zero):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("matrix, K, splits", [(False, 64, "2"), (False, 32, "1"), (True, 32, "1")],
                         ids=["scalar-in-splits", "scalar", "matrix"])
def test_the_deterministic_backward_sums_every_programs_partial(matrix, K, splits, monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the backward walk adds nothing atomically:
    every program (two value blocks, V = 40 padded to 64; the scalar walk also in two key splits)
    stores its own partial of dq_eff and dx (per value block), dλ and the transition's gradient (per
    value block and split), summed over key blocks of 16 in registers, and the host adds the
    partials up in a fixed order. The buffers are NaN-poisoned, so an element no program writes
    shows; the results are the PyTorch walks' within 1e-5 and the atomic sums' to rounding."""
    from dla.ops.triton import chunk_inter, utils

    monkeypatch.setattr(utils, "POISON", True)
    monkeypatch.setenv("DLA_WALK_KEY_BLOCK", "16")
    monkeypatch.setenv("DLA_WALK_KEY_SPLITS", splits)
    case = walk_case(matrix, NC=5, C=3, K=K, V=40, seed=K + matrix, device=DEVICE)
    want, atomic = walk_results(case, fused=False), walk_results(case, fused=True)
    shapes, new_output = [], chunk_inter.new_output
    monkeypatch.setattr(chunk_inter, "new_output", lambda shape, like: shapes.append(tuple(shape))
                        or new_output(shape, like))
    torch.use_deterministic_algorithms(True)
    try:
        got = walk_results(case, fused=True)
    finally:
        torch.use_deterministic_algorithms(False)
    R, NC, L, C, programs = 2, 5, 16, 3, 2 * int(splits)
    assert (2, R, NC, L, K) in shapes and (programs, R, NC, L, C) in shapes  # dq_eff and dx, dλ: partials
    for name, a, b, c in zip(WALK_RESULTS, got, want, atomic):
        assert torch.isfinite(a).all(), name
        assert rel_err(a.double(), b) < 1e-5, name
        assert rel_err(a, c) < 1e-6, name


@pytest.mark.parametrize("base", BASES)
def test_the_backward_recomputes_the_walk_inputs_under_the_forwards_autocast(base, monkeypatch):
    """The fused walk's backward reruns step 3 (the coefficients inside every chunk) for the walk's
    inputs: under autocast it must run it as the forward did (bf16 products for float32 inputs),
    so that the reverse walk reads the effective queries, decayed keys and transitions the forward
    walked, bit for bit, and not a float32 recomputation of them."""
    from dla.ops.triton import chunk_inter

    monkeypatch.setattr(dla.ops.chunk, "FUSED_GATED_DELTANET", True)
    walked, walk_rows = [], chunk_inter.walk_rows
    monkeypatch.setattr(chunk_inter, "walk_rows", lambda *a: walked.append(walk_rows(*a)) or walked[-1])
    inputs, schedule = make_case("dynamic", base, None, B=1, T=40, H=2, K=16, V=16, capacity=3,
                                 dtype=torch.float32, requires_grad=True, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        o, _ = dla.chunk_dla(**inputs, schedule=schedule, chunk_size=16, backend="triton")
    o.float().square().sum().backward()
    forward, backward = walked
    for name in ("qe", "x", "M", "lam", "v"):
        assert torch.equal(getattr(forward, name), getattr(backward, name)), name


def test_key_splits(monkeypatch):
    from dla.ops.triton.chunk_inter import key_splits, key_tiles

    monkeypatch.delenv("DLA_WALK_KEY_SPLITS", raising=False)
    monkeypatch.delenv("DLA_WALK_KEY_BLOCK", raising=False)
    # the default: two splits for the scalar walk where each keeps 16 rows, one for the matrix walk
    assert key_tiles(128, False) == (2, 64) and [key_splits(K, False) for K in (16, 32, 256)] == [1, 2, 2]
    assert key_tiles(128, True) == (1, 32)
    monkeypatch.setenv("DLA_WALK_KEY_SPLITS", "4")
    assert key_tiles(128, False) == (4, 32) and key_tiles(64, False) == (4, 16) and key_tiles(256, False) == (4, 32)
    assert key_tiles(128, True) == (1, 32)  # the K x K transition: one split
    with pytest.raises(ValueError, match="DLA_WALK_KEY_SPLITS=4 leaves 8 of the 32"):
        key_splits(32, False)  # fewer than 16 key rows per split
    for bad in ("0", "3", "-2", "two"):
        monkeypatch.setenv("DLA_WALK_KEY_SPLITS", bad)
        with pytest.raises(ValueError, match="DLA_WALK_KEY_SPLITS must be a power of two"):
            key_splits(128, True)


@pytest.mark.parametrize("splits", ["2", "4"])
def test_triton_chunk_in_key_splits(splits, monkeypatch):
    """chunk_dla's Mamba-2 walk in key splits (the variable is read at the forward's and at the
    backward's launch) against the PyTorch path; K = 64, V = 40 as in the wide-heads case."""
    monkeypatch.setenv("DLA_WALK_KEY_SPLITS", splits)
    tiles = spy_key_tiles(monkeypatch)
    inputs, schedule = make_case("dynamic", "mamba2", None, B=1, T=40, H=1, K=64, V=40, capacity=3,
                                 dtype=torch.float32, requires_grad=True, device=DEVICE)
    check(inputs, schedule)
    assert [ks for ks, _ in tiles] == [int(splits)] * 2


def test_fused_walk_without_gradients_keeps_the_first_and_last_boundaries(monkeypatch):
    """Without a backward to come (torch.no_grad: inference, a prefill) the walk keeps the states
    of the first and the last chunk boundary only, the rest passing through its ring; o and the
    final states are those of a differentiable call (9 chunks: 3 checkpoints in groups of 8)."""
    from dla.ops.triton import chunk_inter

    (q_eff, lam, x, v, gamma, S0), rank, dest, _, _ = walk_case(False, NC=9, C=3, K=16, V=16, device=DEVICE)
    inputs = [t.float().requires_grad_() for t in (q_eff, lam, x, v)]
    gamma, S0 = gamma.float().requires_grad_(), S0.float().requires_grad_()
    shapes, new_output = [], chunk_inter.new_output
    monkeypatch.setattr(chunk_inter, "new_output", lambda shape, like: shapes.append(shape) or new_output(shape, like))
    o, S = chunk_inter.fused_inter(*inputs, rank, gamma, dest, S0)
    with torch.no_grad():
        o_inference, S_inference = chunk_inter.fused_inter(*inputs, rank, gamma, dest, S0)
    assert [s[1] for s in shapes] == [3, 2, 9, 2, 2, 9]  # per call: checkpoints, ring (boundaries), o (chunks)
    assert torch.equal(o_inference, o) and torch.equal(S_inference, S)


@pytest.mark.parametrize("base", BASES)
def test_the_chunked_op_without_gradients_keeps_the_first_and_last_boundaries(base, monkeypatch):
    """chunk_dla under torch.no_grad (a prefill) runs the fused walk with one group: the states of the
    first and last boundaries only, and the numbers of the differentiable call."""
    from dla.ops.triton import chunk_inter

    groups, walk_forward = [], chunk_inter.walk_forward
    monkeypatch.setattr(chunk_inter, "walk_forward", lambda w, S0, prec, group: groups.append(group)
                        or walk_forward(w, S0, prec, group))
    inputs, schedule = make_case("dynamic", base, B=1, T=9 * 16, H=2, K=16, V=16, capacity=4, dtype=torch.float32,
                                 requires_grad=True, device=DEVICE)
    kw = dict(schedule=schedule, chunk_size=16, output_final_state=True, backend="triton")
    o, s = dla.chunk_dla(**inputs, **kw)
    with torch.no_grad():
        o_inference, s_inference = dla.chunk_dla(**inputs, **kw)
    assert groups == [8, 16]  # 9 chunks: checkpoints every 8, then one group for all
    assert torch.equal(o_inference, o) and torch.equal(s_inference.states, s.states)


def test_checkpoint_group(monkeypatch):
    from dla.ops.triton.chunk_inter import checkpoint_group

    assert [checkpoint_group(nc) for nc in (1, 3, 5, 8, 64, 513)] == [1, 4, 8, 8, 8, 8]
    assert checkpoint_group(64, 16) == 16 and checkpoint_group(64, 1) == 1
    monkeypatch.setenv("DLA_WALK_CHECKPOINT_GROUP", "2")
    assert checkpoint_group(64) == 2 and checkpoint_group(64, 4) == 4  # the argument wins
    for bad in (0, 3, 12):
        with pytest.raises(ValueError, match="power of two"):
            checkpoint_group(64, bad)


def test_walks_and_decode_spill_nothing_at_the_paper_shape():
    """Compiled for Hopper (no GPU needed: PTX, then the ptxas that ships with Triton), the fused
    walk keeps no per-token K-sized tile in registers, so at K = 256 (DLA-GDN 1.3B) neither walk
    spills a tile (they spilled kilobytes before the key-row blocks), nor does the Gated DeltaNet
    decode step in its launch's tiles at K = 256 or 128 ([256, 32] and [128, 64] on 4 warps; with
    the read-out summed over the slots, as Mamba-2's is, [128, 64] spilled;
    benchmarks/kernel_resources.py, which compiles with the 16-byte aligned pointers a launch gets),
    nor the planner's open-state update, alone or in the walk over a whole window (its products as
    IEEE tl.dot spilled ~16 KB and, in the window walk's 4 warps, ~32 KB at K = 128, V = 64).
    The bound of 64 bytes leaves room for a few registers' worth of spills, which ptxas versions
    differ in."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin").is_dir():
        pytest.skip("this Triton ships no ptxas")
    root = Path(__file__).resolve().parent.parent
    code = ("import json; from benchmarks.kernel_resources import compile_advance, compile_decode, "
            "compile_plan_window, compile_walk; "
            "from dla.ops.triton.chunk_inter import chunk_dla_inter_fwd_kernel as f, chunk_dla_inter_bwd_kernel as b; "
            "print(json.dumps([compile_walk(f, 256, 512, 30, True, 16, 4), compile_walk(b, 256, 512, 30, True, 32, 8), "
            "compile_decode(256, 512, 30, True), compile_decode(128, 128, 16, True), compile_advance(128, 64), "
            "compile_advance(256, 512), compile_plan_window(128, 64, 30)]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    reports = json.loads(out.stdout.strip().splitlines()[-1])  # fwd, bwd, decode (K = 256 and 128), advance (2), window
    assert all(r["registers"] > 0 for r in reports)
    assert all(r["spill_stores"] <= 64 for r in reports), reports
    # compiled as launched, with aligned pointers: the tiles move several numbers per load (compiled
    # without the alignment, every number took a load and an address of its own)
    assert all(r["vector_loads"] > 0 for r in reports), reports
