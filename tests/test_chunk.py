"""The chunked path equals the O(T^2) reference, forward and backward, and continues exactly."""

import dataclasses

import pytest
import torch
from conftest import BASES, SLOW_DECAY, grads, make_case, rel_err

import dla

POLICIES = ("single", "fixed", "fenwick", "dynamic")


def check_chunk_vs_naive(inputs, schedule, chunk_size, tol, cu_seqlens=None):
    o_ref = dla.naive_dla(**inputs, schedule=schedule, cu_seqlens=cu_seqlens)
    o, state = dla.chunk_dla(**inputs, schedule=schedule, chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                             output_final_state=True)
    assert o.dtype == inputs["v"].dtype
    assert rel_err(o, o_ref) <= tol, "forward"
    assert torch.equal(state.segments.starts, schedule.final.starts)
    g_ref, g = grads(o_ref, inputs), grads(o, inputs)
    assert set(g) == {n for n, x in inputs.items() if x is not None}
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) <= tol, f"d{name}"


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("label_rule", ["recency", "level"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_chunk_equals_naive_float64(policy, base, label_rule, T, chunk_size):
    inputs, schedule = make_case(policy, base, label_rule, B=2, T=T, H=2, K=5, V=4, capacity=5, period=7,
                                 threshold=0.55, requires_grad=True)
    check_chunk_vs_naive(inputs, schedule, chunk_size, 1e-9)


@pytest.mark.parametrize("label_rule", ["recency", "level"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_chunk_equals_naive_long(policy, base, label_rule):
    inputs, schedule = make_case(policy, base, label_rule, B=1, T=1000, H=2, K=4, V=3, capacity=8, period=37,
                                 threshold=0.6, requires_grad=True)
    check_chunk_vs_naive(inputs, schedule, 64, 1e-9)


@pytest.mark.parametrize("label_rule", ["recency", "level"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_chunk_equals_naive_with_slow_decays(policy, base, label_rule):
    """Decays near 1: states carried (and merged) over many chunks dominate o and its gradients."""
    inputs, schedule = make_case(policy, base, label_rule, B=1, T=300, H=2, K=6, V=4, capacity=6, period=23,
                                 threshold=0.55, requires_grad=True, decay=SLOW_DECAY)
    check_chunk_vs_naive(inputs, schedule, 16, 1e-9)


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_chunk_equals_naive_float32(policy, base, chunk_size):
    inputs, schedule = make_case(policy, base, None, B=2, T=150, H=3, K=8, V=8, capacity=6, period=9,
                                 dtype=torch.float32, requires_grad=True)
    check_chunk_vs_naive(inputs, schedule, chunk_size, 1e-4)


@pytest.mark.parametrize("label_rule", ["recency", "level"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_chunk_varlen(policy, base, label_rule):
    cu = torch.tensor([0, 1, 70, 70, 133, 200])
    inputs, schedule = make_case(policy, base, label_rule, B=1, T=200, H=2, K=4, V=3, capacity=4, period=6,
                                 cu_seqlens=cu, requires_grad=True)
    check_chunk_vs_naive(inputs, schedule, 32, 1e-9, cu_seqlens=cu)


def test_chunk_bfloat16_inputs_accumulate_in_float32():
    inputs, schedule = make_case("dynamic", "gated_deltanet", B=1, T=130, H=2, K=16, V=16, capacity=8)
    o_ref = dla.naive_dla(**inputs, schedule=schedule)
    bf = {n: None if x is None else x.to(torch.bfloat16) for n, x in inputs.items()}
    o, state = dla.chunk_dla(**bf, schedule=schedule, output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.states.dtype == torch.float32
    assert rel_err(o, o_ref) <= 3e-2


# ----------------------------------------------------------------------------- continuation
@pytest.mark.parametrize("T1", [0, 1, 40, 64, 100])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_chunk_prefill_then_online_decoding(policy, base, T1):
    """chunk over T1 tokens, then one recurrent step per token with the policy advanced online
    from the final state, equals chunk over all T tokens."""
    T, B, H = 110, 2, 2
    inputs, schedule = make_case(policy, base, "recency", B=B, T=T, H=H, K=6, V=5, capacity=5, period=4)
    o_full, _ = dla.chunk_dla(**inputs, schedule=schedule, chunk_size=32)
    kw = dict(batch=B, heads=H, capacity=schedule.capacity, period=4, label_rule="recency")
    k = inputs["k"]
    head = {n: None if x is None else x[:, :T1] for n, x in inputs.items()}
    s1 = dla.plan_schedule(policy, length=T1, scores=dla.novelty_scores(k[:, :T1]) if policy == "dynamic" else None,
                           **kw)
    o_head, state = dla.chunk_dla(**head, schedule=s1, chunk_size=32, output_final_state=True)
    outs = [o_head]
    for t in range(T1, T):
        step = {n: None if x is None else x[:, t:t + 1] for n, x in inputs.items()}
        u = dla.novelty_scores(step["k"], prev_key=state.prev_key) if policy == "dynamic" else None
        s = dla.plan_schedule(policy, length=1, scores=u, initial_state=state, **kw)
        o_t, state = dla.recurrent_dla(**step, schedule=s, initial_state=state, output_final_state=True)
        outs.append(o_t)
    assert rel_err(torch.cat(outs, 1), o_full) <= 1e-10
    assert torch.equal(state.segments.starts, schedule.final.starts)


def continued_window(base, label_rule, T, T1):
    """A ``dynamic`` case of ``T`` tokens (2 sequences, 2 heads, C = 4) run by the chunked path over its
    first ``T1`` tokens: ``(inputs, schedule, o1, state, tail, s2)``, with ``tail`` the inputs of the
    other tokens and ``s2`` their schedule planned from ``state``."""
    inputs, schedule = make_case("dynamic", base, label_rule, B=2, T=T, H=2, K=4, V=3, capacity=4)
    head = {n: None if x is None else x[:, :T1] for n, x in inputs.items()}
    tail = {n: None if x is None else x[:, T1:] for n, x in inputs.items()}
    kw = dict(batch=2, heads=2, capacity=4, label_rule=label_rule)
    s1 = dla.plan_schedule("dynamic", length=T1, scores=dla.novelty_scores(head["k"]), **kw)
    o1, state = dla.chunk_dla(**head, schedule=s1, chunk_size=16, output_final_state=True)
    s2 = dla.plan_schedule("dynamic", length=T - T1, scores=dla.novelty_scores(tail["k"], prev_key=state.prev_key),
                           initial_state=state, **kw)
    return inputs, schedule, o1, state, tail, s2


@pytest.mark.parametrize("base", BASES)
def test_chunk_continues_from_chunk_and_initial_state_gets_gradients(base):
    inputs, schedule, o1, state, tail, s2 = continued_window(base, "level", 150, 77)
    o_full, final_full = dla.chunk_dla(**inputs, schedule=schedule, chunk_size=16, output_final_state=True)
    state.states.requires_grad_(True)
    o2, final = dla.chunk_dla(**tail, schedule=s2, initial_state=state, chunk_size=16, output_final_state=True)
    o2_rec, final_rec = dla.recurrent_dla(**tail, schedule=s2, initial_state=state, output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), o_full) <= 1e-10
    assert rel_err(final.states, final_full.states) <= 1e-10
    assert rel_err(final_rec.states, final_full.states) <= 1e-10
    w = torch.randn_like(o2)
    (g_chunk,) = torch.autograd.grad((o2 * w).sum(), state.states)
    (g_rec,) = torch.autograd.grad((o2_rec * w).sum(), state.states)
    assert g_chunk.abs().sum() > 0
    assert rel_err(g_chunk, g_rec) <= 1e-10


@pytest.mark.parametrize("base", BASES)
def test_a_state_kept_with_slot_scales_and_places_continues_as_its_scaled_states(base):
    """``DLAState.scales`` and ``DLAState.places`` (what the decode kernel keeps): continuing
    ``(states, scales, places)`` with the chunked or the recurrent path gives the outputs, final
    states and gradients (through states and scales) of continuing the slots' states ``scales *
    states[places]`` themselves, in slot order."""
    _, _, _, state, tail, s2 = continued_window(base, "recency", 60, 33)
    scales = (torch.rand(2, 2, 4, dtype=torch.float64) + 0.5).requires_grad_(True)
    places = torch.stack([torch.randperm(4) for _ in range(4)]).view(2, 2, 4).to(torch.int32)
    # slot c's numbers stored at place places[c]
    stored = torch.empty_like(state.states).scatter_(2, places.long()[..., None, None].expand_as(state.states),
                                                     state.states)
    states = (stored / scales.detach().gather(-1, places.argsort(-1))[..., None, None]).requires_grad_(True)
    assert not torch.equal(places, torch.arange(4, dtype=torch.int32).expand(2, 2, 4))
    lazy = dataclasses.replace(state, states=states, scales=scales, places=places)
    w = None
    for op in (dla.chunk_dla, dla.recurrent_dla):
        in_order = states.gather(2, places.long()[..., None, None].expand_as(states))
        plain = dataclasses.replace(state, states=(in_order * scales[..., None, None]))
        results = []
        for initial in (lazy, plain):
            o, final = op(**tail, schedule=s2, initial_state=initial, output_final_state=True)
            w = torch.randn_like(o) if w is None else w
            results.append((o, final.slot_states(), *torch.autograd.grad((o * w).sum(), (states, scales))))
        for name, a, b in zip(("o", "final states", "d states", "d scales"), *results):
            assert rel_err(a, b) <= 1e-12, (op.__name__, name)
        assert results[0][3].abs().sum() > 0


def test_permuting_labels_changes_the_output():
    """A planted check: λ's label axis matters for dynamic with C >= 3 (a wrong label is caught)."""
    inputs, schedule = make_case("dynamic", "mamba2", "recency", B=1, T=120, H=2, K=4, V=3, capacity=4)
    o, _ = dla.chunk_dla(**inputs, schedule=schedule, chunk_size=32)
    lam = inputs["lam"][..., : schedule.n_labels]
    for perm in ([1, 0, 2, 3], [0, 1, 3, 2], [3, 2, 1, 0]):
        o_perm, _ = dla.chunk_dla(**{**inputs, "lam": lam[..., perm]}, schedule=schedule, chunk_size=32)
        assert rel_err(o_perm, o) > 1e-3
    o_same, _ = dla.chunk_dla(**{**inputs, "lam": lam}, schedule=schedule, chunk_size=32)
    assert rel_err(o_same, o) <= 1e-12


@pytest.mark.parametrize("base", BASES)
def test_inter_in_value_blocks_equals_whole(base, monkeypatch):
    """Over the memory budget, the unfused inter part runs in blocks of value columns (40 -> 4
    blocks of 10 here), each recomputed in the backward: the same function, gradients included."""
    inputs, schedule = make_case("dynamic", base, None, B=2, T=70, H=2, K=5, V=40, capacity=4,
                                 threshold=0.55, requires_grad=True)
    kw = dict(schedule=schedule, chunk_size=16, output_final_state=True)
    o_ref, s_ref = dla.chunk_dla(**inputs, **kw)
    g_ref = grads(o_ref + s_ref.states.sum(), inputs)
    monkeypatch.setattr(dla.ops.chunk, "INTER_BLOCK_BYTES", 1)
    inter, widths = dla.ops.chunk._inter, []

    def spy(*args):
        widths.append(args[4].shape[-1])  # the value block
        return inter(*args)

    monkeypatch.setattr(dla.ops.chunk, "_inter", spy)
    o, s = dla.chunk_dla(**inputs, **kw)
    assert widths == [10] * 4
    g = grads(o + s.states.sum(), inputs)
    assert widths == [10] * 8  # each block recomputed once in the backward
    assert rel_err(o, o_ref) <= 1e-12 and rel_err(s.states, s_ref.states) <= 1e-12
    for name in g_ref:
        assert rel_err(g[name], g_ref[name]) <= 1e-12, f"d{name}"


def test_deterministic_mode_keeps_the_fused_triton_walks(monkeypatch):
    """The fused walks' backward sums per-program partials under deterministic algorithms, so CUDA
    keeps them; only the unfused Gated DeltaNet walk (DLA_FUSED_GDN=0), whose backward adds its
    transition's gradient atomically, falls back to the PyTorch walks."""
    import dla.ops.chunk
    from dla.ops.chunk import default_backend

    assert default_backend(is_cuda=True) == "triton" and default_backend(is_cuda=False) == "torch"
    torch.use_deterministic_algorithms(True)
    try:
        assert default_backend(is_cuda=True) == default_backend(is_cuda=True, gated=True) == "triton"
        assert default_backend(is_cuda=False) == "torch"
        monkeypatch.setattr(dla.ops.chunk, "FUSED_GATED_DELTANET", False)
        assert default_backend(is_cuda=True, gated=True) == "torch" and default_backend(is_cuda=True) == "triton"
    finally:
        torch.use_deterministic_algorithms(False)
    assert default_backend(is_cuda=True, gated=True) == "triton"  # atomics allowed: the unfused walk on Triton


def test_lambda_labels_are_kept_in_one_byte_with_the_gradients_of_gather():
    """The chunked op keeps the λ labels of every unit at every query for its backward in one byte
    (dla.ops.chunk.gather_labels) and gives the gradients of ``gather`` with its int64 index."""
    from dla.ops.chunk import gather_labels

    gen = torch.Generator().manual_seed(0)
    lam = torch.rand(2, 3, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    label = torch.randint(0, 7, (2, 3, 5, 11), generator=gen)
    grad = torch.randn(2, 3, 5, 11, generator=gen, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = gather_labels(lam, label)
    assert [t.dtype for t in saved] == [torch.uint8]
    (ours,) = torch.autograd.grad(out, lam, grad)
    (theirs,) = torch.autograd.grad(lam.gather(-1, label), lam, grad)
    assert torch.equal(out, lam.gather(-1, label)) and torch.equal(ours, theirs)
