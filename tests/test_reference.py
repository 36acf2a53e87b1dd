"""The two references agree, and reduce to the models they generalise."""

import pytest
import torch
from conftest import BASES, make_case, rel_err

import dla

POLICIES = ("single", "fixed", "fenwick", "dynamic")


def run_both(inputs, schedule, **kw):
    o_naive = dla.naive_dla(**inputs, schedule=schedule, **kw)
    o_rec, state = dla.recurrent_dla(**inputs, schedule=schedule, output_final_state=True, **kw)
    return o_naive, o_rec, state


@pytest.mark.parametrize("T", [1, 2, 17, 64, 257])
@pytest.mark.parametrize("label_rule", ["recency", "level"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_naive_equals_recurrent(policy, base, label_rule, T):
    inputs, schedule = make_case(policy, base, label_rule, B=2, T=T, H=3, K=6, V=5, capacity=4,
                                 threshold=0.45, period=5)
    o_naive, o_rec, state = run_both(inputs, schedule)
    assert o_naive.shape == (2, T, 3, 5)
    assert rel_err(o_rec, o_naive) <= 1e-10
    assert torch.equal(state.segments.starts, schedule.final.starts)


@pytest.mark.parametrize("label_rule", ["recency", "level"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_varlen_equals_separate_sequences(policy, base, label_rule):
    cu = torch.tensor([0, 9, 9, 40, 71])  # includes an empty sequence
    inputs, schedule = make_case(policy, base, label_rule, B=1, T=71, H=2, K=4, V=3, cu_seqlens=cu, capacity=3)
    o_naive, o_rec, state = run_both(inputs, schedule, cu_seqlens=cu)
    assert rel_err(o_rec, o_naive) <= 1e-10
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if a == b:
            continue
        sub = {name: None if x is None else x[:, a:b] for name, x in inputs.items()}
        sub_schedule = make_sub_schedule(policy, sub, label_rule, schedule)
        sub["lam"] = inputs["lam"][:, a:b]
        o_sub = dla.naive_dla(**sub, schedule=sub_schedule)
        assert rel_err(o_naive[:, a:b], o_sub) <= 1e-12
        assert torch.equal(state.segments.starts[n], sub_schedule.final.starts[0])


def make_sub_schedule(policy, sub, label_rule, packed):
    B, T, H, _ = sub["k"].shape
    scores = dla.novelty_scores(sub["k"]) if policy == "dynamic" else None
    return dla.plan_schedule(policy, batch=B, heads=H, length=T, scores=scores, period=3, label_rule=label_rule,
                             capacity=packed.capacity)


def test_varlen_death_is_per_sequence_restart():
    cu = torch.tensor([0, 20, 45])
    s = dla.plan_schedule("fenwick", batch=1, heads=1, length=45, cu_seqlens=cu)
    for a, b in [(0, 20), (20, 45)]:
        one = dla.plan_schedule("fenwick", batch=1, heads=1, length=b - a, capacity=s.capacity)
        expect = torch.where(one.death >= 0, torch.where(one.death >= b - a, 45, one.death + a), one.death)
        assert torch.equal(s.death[..., a:b], expect)


# ----------------------------------------------------------------------------- reductions
def plain_recurrence(q, k, v, g, beta, scale):
    """Mamba-2 / Gated DeltaNet with one state, written from spec §1 independently of dla."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for t in range(T):
        kt, vt, qt = k[:, t], v[:, t], q[:, t]
        a = g[:, t].exp()[..., None, None]
        if beta is None:
            S = a * S + kt[..., None] * vt[..., None, :]
        else:
            b = beta[:, t][..., None, None]
            S = a * (S - b * kt[..., None] * (kt[..., None, :] @ S)) + b * kt[..., None] * vt[..., None, :]
        out.append(scale * (qt[..., None, :] @ S).squeeze(-2))
    return torch.stack(out, 1)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_capacity_one_is_the_base_model(policy, base):
    inputs, _ = make_case(policy, base, B=2, T=45, H=2, K=5, V=4)
    B, T, H, K = inputs["q"].shape
    scores = dla.novelty_scores(inputs["k"])
    schedule = dla.plan_schedule(policy, batch=B, heads=H, length=T, capacity=1, scores=scores, period=3)
    assert (schedule.death == dla.NONE).all()
    inputs["lam"] = torch.ones(B, T, H, 1, dtype=torch.float64)
    o_naive, o_rec, _ = run_both(inputs, schedule)
    ref = plain_recurrence(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], K ** -0.5)
    assert rel_err(o_naive, ref) <= 1e-12
    assert rel_err(o_rec, ref) <= 1e-12


@pytest.mark.parametrize("base", BASES)
def test_uniform_lambda_sums_states_to_the_base_model(base):
    """With λ ≡ 1 every policy reads Σ_B S^B = S: the multi-state model equals the base."""
    inputs, schedule = make_case("dynamic", base, B=1, T=50, H=2, K=4, V=3, capacity=3)
    inputs["lam"] = torch.ones_like(inputs["lam"])
    o, _, _ = run_both(inputs, schedule)
    ref = plain_recurrence(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], 4 ** -0.5)
    assert rel_err(o, ref) <= 1e-12
    assert (schedule.death >= 0).sum() > 5  # the schedule did open states


@pytest.mark.parametrize("T", [1, 2, 3, 100, 1024])
def test_fenwick_labels_are_log_linear_levels(T):
    s = dla.plan_schedule("fenwick", batch=1, heads=1, length=T)
    label = s.pairwise()["label"][0, 0]
    t = torch.arange(T)
    xor = t[:, None] ^ t[None, :]
    expect = torch.where(t[None, :] <= t[:, None], torch.frexp(xor.double())[1].long(), -1)
    assert torch.equal(label, expect)
    assert s.capacity == s.n_labels == (T - 1).bit_length() + 1


def test_fenwick_matches_fla_naive_log_linear_attn():
    fla_naive = pytest.importorskip("fla.ops.log_linear_attn.naive",
                                    reason="flash-linear-attention is not installed; install the 'fla' extra")
    inputs, schedule = make_case("fenwick", "mamba2", B=2, T=70, H=3, K=8, V=6)
    lam = inputs["lam"][..., : schedule.n_labels]
    inputs["lam"] = lam
    o, o_rec, _ = run_both(inputs, schedule)
    ref = fla_naive.naive_log_linear_attn(inputs["q"], inputs["k"], inputs["v"], inputs["g"], lam, scale=None)
    assert rel_err(o, ref) <= 1e-12
    assert rel_err(o_rec, ref) <= 1e-12


# ----------------------------------------------------------------------------- continuation
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_recurrent_continues_from_its_final_state(policy, base):
    T, T1 = 60, 23
    inputs, schedule = make_case(policy, base, B=2, T=T, H=2, K=4, V=3, capacity=4, label_rule="level")
    o_full, _ = dla.recurrent_dla(**inputs, schedule=schedule)
    k = inputs["k"]
    scores = dla.novelty_scores(k) if policy == "dynamic" else None
    head = {n: None if x is None else x[:, :T1] for n, x in inputs.items()}
    tail = {n: None if x is None else x[:, T1:] for n, x in inputs.items()}
    cap = schedule.capacity
    kw = dict(batch=2, heads=2, capacity=cap, period=3, label_rule="level")
    s1 = dla.plan_schedule(policy, length=T1, scores=None if scores is None else scores[:, :T1], **kw)
    o1, state = dla.recurrent_dla(**head, schedule=s1, output_final_state=True)
    tail_scores = dla.novelty_scores(tail["k"], prev_key=state.prev_key) if policy == "dynamic" else None
    s2 = dla.plan_schedule(policy, length=T - T1, scores=tail_scores, initial_state=state, **kw)
    o2, _ = dla.recurrent_dla(**tail, schedule=s2, initial_state=state)
    assert rel_err(torch.cat([o1, o2], 1), o_full) <= 1e-12


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("policy", ["fenwick", "dynamic"])
def test_recurrent_gradients_equal_the_chunked_ones(policy, base):
    """The recurrence is differentiable: its gradients in every input, through the outputs and the
    final states, equal those of the chunked form (an independent computation) in float64."""
    inputs, schedule = make_case(policy, base, B=2, T=37, H=2, K=4, V=3, capacity=3, requires_grad=True)
    leaves = [x for x in inputs.values() if x is not None]
    grads = []
    for op, kw in ((dla.recurrent_dla, {}), (dla.chunk_dla, {"chunk_size": 16})):
        o, final = op(**inputs, schedule=schedule, output_final_state=True, **kw)
        weights = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
        grads.append(torch.autograd.grad((o * weights).sum() + final.states.square().sum(), leaves))
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-10
