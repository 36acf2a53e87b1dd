"""Soft gating of the dynamic policy (spec §3): the forward value is exactly the hard model's, the
recomputed scores are the ones the schedule used, and gradients reach τ, k, v and β; the batched scores
and their analytic backward against the straightforward pairwise form."""

import pytest
import torch
from mixer_helpers import (
    one_thread,  # noqa: F401 (an autouse fixture)
    random_inputs,
)

import dla
from dla.layers import DLAGatedDeltaNet, DLAMamba2, PolicyConfig
from dla.schedule.dynamic import Trace, carried_products, contribution_norms, pair_products, state_score, to_chunks
from dla.schedule.soft_gate import differentiable_scores, gate_factor, opened_segments, scores_from_trace


def make_layer(base, **policy):
    policy = PolicyConfig(**{"capacity": 4, "threshold": 1.0, **policy})
    torch.manual_seed(0)
    if base == "mamba2":
        return DLAMamba2(32, head_dim=16, state_size=8, policy=policy, chunk_size=16)
    return DLAGatedDeltaNet(32, num_heads=2, head_dim=16, policy=policy, chunk_size=16)


@pytest.mark.parametrize("base", ["mamba2", "gated_deltanet"])
@pytest.mark.parametrize("score", ["state", "state_drift", "novelty"])
def test_soft_gate_forward_is_the_hard_model(base, score):
    kw = dict(score=score, threshold=0.5 if score == "novelty" else 1.0)
    gated, hard = make_layer(base, **kw), make_layer(base, soft_gate=False, **kw)
    hard.load_state_dict(gated.state_dict())
    x = torch.randn(2, 70, 32)
    gated.train(), hard.train()
    out = gated(x)
    assert torch.equal(out, hard(x))
    out.square().mean().backward()
    assert gated.threshold.grad is not None and gated.threshold.grad.abs().sum() > 0
    assert hard.threshold.requires_grad is False


@pytest.mark.parametrize("score", ["state", "state_drift"])
@pytest.mark.parametrize("gated", [False, True])
def test_recomputed_scores_are_the_planned_ones(score, gated):
    k, v, g, beta = random_inputs(4, 150, H=2, K=4, V=3)
    beta = beta if gated else None
    cu = torch.tensor([0, 40, 150])
    s = dla.plan_schedule("dynamic", batch=1, heads=2, length=150, k=k, v=v, g=g, beta=beta, capacity=5,
                          threshold=1.2, score=score, cu_seqlens=cu, keep_trace=True)
    again = differentiable_scores(s, score, k, v, g, beta, "decayed", cu)
    assert torch.allclose(again, s.scores.transpose(1, 2), atol=1e-6)


def test_gate_factor_is_one_with_the_gradient_of_the_gate():
    scores = torch.rand(2, 5, 3, dtype=torch.float64, requires_grad=True)
    tau = torch.rand(3, dtype=torch.float64, requires_grad=True)
    opened = torch.rand(2, 5, 3) < 0.5
    f = gate_factor(scores, opened, tau, 0.1)
    assert torch.equal(f, torch.ones_like(f))
    f.sum().backward()
    p = torch.sigmoid((scores.detach() - tau.detach()) / 0.1)
    slope = p * (1 - p) / 0.1
    assert torch.allclose(scores.grad, torch.where(opened, slope, -slope))
    assert torch.allclose(tau.grad, -torch.where(opened, slope, -slope).sum((0, 1)))


@pytest.mark.parametrize("score", ["state", "state_drift"])
def test_gate_gradients_pass_gradcheck(score):
    """The gate probability c_t as a function of the tokens' own k, v, β and of τ, with the open states
    (the key side and the trace) held at their planned values, against finite differences."""
    k, v, g, beta = random_inputs(9, 70, H=2, K=3, V=2)
    s = dla.plan_schedule("dynamic", batch=1, heads=2, length=70, k=k, v=v, g=g, beta=beta, capacity=4,
                          threshold=1.2, score=score, keep_trace=True)
    rows = lambda x: x[0].transpose(0, 1).contiguous()  # noqa: E731 [1, T, H, ...] -> [H, T, ...]
    kr, vr, wr, gr = rows(k), rows(v), rows(beta), rows(g)
    opened = opened_segments(s)[0].T  # [H, T]
    position = torch.zeros(2, dtype=torch.long)

    def gate(kq, vq, wq, tau):
        scores = scores_from_trace(s.trace, kq, vq, wq, kr, vr, wr, gr, position, drift=score == "state_drift")
        p = torch.sigmoid((scores - tau[:, None]) / 0.5)
        return torch.where(opened, p, 1 - p)

    inputs = [x.clone().requires_grad_() for x in (kr, vr, wr, torch.tensor([1.1, 1.3], dtype=torch.float64))]
    assert torch.allclose(scores_from_trace(s.trace, kr, vr, wr, kr, vr, wr, gr, position,
                                            drift=score == "state_drift"), s.scores[0], atol=1e-6)
    assert torch.autograd.gradcheck(gate, inputs, eps=1e-6, atol=1e-5)


def test_threshold_moves_in_training():
    config = dla.DLAConfig(mixer="gated_deltanet", vocab_size=16, hidden_size=32, num_hidden_layers=1, head_dim=16,
                           capacity=4, threshold=1.0)
    torch.manual_seed(0)
    model = dla.DLAForCausalLM(config)
    tau = model.model.layers[0].mixer.threshold
    before = tau.detach().clone()
    opt = torch.optim.Adam([tau], lr=0.05)  # τ alone: what moves it is the gate's gradient
    ids = torch.randint(0, 16, (2, 48))
    for _ in range(4):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert (tau.detach() - before).abs().min() > 0.05


def pairwise_scores(trace: Trace, k, v, w, key_k, key_v, key_w, key_g, position, drift: bool = False):
    """The straightforward form of :func:`scores_from_trace`, autograd throughout: every chunk's pairwise
    products ``⟨s_t, decay s_u⟩`` masked to the open segment and summed, plus the product with the carried
    open state."""
    R, Tm = w.shape
    L = trace.chunk
    NC = -(-Tm // L)
    kq, vq, wq = to_chunks(k, L), to_chunks(v, L), to_chunks(w, L)
    g = to_chunks(key_g, L)
    pair, _, G_prev = pair_products(kq, vq, wq, to_chunks(key_k, L), to_chunks(key_v, L), to_chunks(key_w, L), g)
    start = to_chunks(trace.open_start, L)
    chunk_start = (torch.arange(NC) * L).repeat(R)[:, None]
    u = chunk_start + torch.arange(L)
    x = (pair * (u[:, None, :] >= start[..., None])).sum(-1)
    open_states = trace.open_states.reshape(R * NC, *trace.open_states.shape[2:])
    carried = carried_products(G_prev.exp() * wq, kq, vq, open_states)
    x = x + torch.where(start < chunk_start, carried, 0.0)
    score, _ = state_score(x, contribution_norms(kq, vq, wq), to_chunks(trace.open_norm, L), g.exp(), drift,
                           eps=1e-12)
    first = (position[:, None] + torch.arange(Tm)) == 0
    return torch.where(first, 0.0, score.reshape(R, NC * L)[:, :Tm])


def random_trace(seed, R, Tm, L, K=4, V=3, weighted=True):
    """Random never-zero rows ``k, v, w, g`` (``weighted=False``: ``w = 1``) and a trace that fits them:
    open segments born at random (the first one before the window), a random open state at every chunk
    start, and ``‖O_{t-1}‖²`` of the open state those imply (so ``|cos| <= 1``). Row 0 starts its sequence
    (``position = 0``), the others continue one; row 0 still carries a nonzero open state into its first
    token, which must score 0 all the same."""
    gen = torch.Generator().manual_seed(seed)
    NC = -(-Tm // L)
    k = torch.randn(R, Tm, K, generator=gen, dtype=torch.float64)
    v = torch.randn(R, Tm, V, generator=gen, dtype=torch.float64)
    w = torch.rand(R, Tm, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    w = w if weighted else torch.ones_like(w)
    g = -torch.rand(R, Tm, generator=gen, dtype=torch.float64) * 0.5
    position = torch.arange(R) * 7
    open_states = torch.randn(R, NC, K, V, generator=gen, dtype=torch.float64)
    open_start = torch.empty(R, Tm, dtype=torch.long)
    open_norm = torch.empty(R, Tm, dtype=torch.float64)
    for r in range(R):
        start = -1 - r  # the open segment's start before the window
        for t in range(Tm):
            open_start[r, t] = start
            a = t - t % L
            state = open_states[r, t // L] * g[r, a:t].sum().exp() if start < a else torch.zeros(K, V)
            for u in range(max(start, a), t):
                state = state + g[r, u + 1:t].sum().exp() * w[r, u] * torch.outer(k[r, u], v[r, u])
            open_norm[r, t] = state.square().sum()
            if torch.rand((), generator=gen) < 0.3:
                start = t
    trace = Trace(scores=torch.zeros(R, Tm, dtype=torch.float64), open_start=open_start, open_norm=open_norm,
                  open_states=open_states, chunk=L)
    return trace, k, v, w, g, position


def scores_and_gradients(scores_fn, trace, k, v, w, g, position, drift, weights):
    """Scores of ``scores_fn`` and the gradients of ``Σ weights · I`` in the query side ``k, v`` and ``w``
    (``w=None``: ``w = 1``, no gradient)."""
    query = [x.clone().requires_grad_() for x in (k, v) + (() if w is None else (w,))]
    scores = scores_fn(trace, query[0], query[1], None if w is None else query[2], k, v, w, g, position, drift=drift)
    return (scores, *torch.autograd.grad((scores * weights).sum(), query))


@pytest.mark.parametrize("Tm", [5, 16, 21])  # shorter than a chunk, whole chunks, a partial last chunk
@pytest.mark.parametrize("drift", [False, True])
@pytest.mark.parametrize("weighted", [True, False])
def test_scores_and_gradients_match_the_pairwise_form(Tm, drift, weighted):
    trace, k, v, w, g, position = random_trace(Tm, R=3, Tm=Tm, L=8, weighted=weighted)
    weights = torch.randn(3, Tm, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    new = scores_and_gradients(scores_from_trace, trace, k, v, w if weighted else None, g, position, drift, weights)
    ref = scores_and_gradients(pairwise_scores, trace, k, v, w, g, position, drift, weights)
    assert (new[0][1:] > 0.01).float().mean() > 0.9  # real scores, not clamped ones
    assert new[0][0, 0] == 0  # a sequence start scores 0
    assert len(new) == (4 if weighted else 3)
    for a, b in zip(new, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("drift", [False, True])
def test_scores_pass_gradcheck(drift):
    trace, k, v, w, g, position = random_trace(2, R=2, Tm=11, L=4, K=3, V=2)
    query = [x.clone().requires_grad_() for x in (k, v, w)]
    assert torch.autograd.gradcheck(lambda *q: scores_from_trace(trace, *q, k, v, w, g, position, drift=drift),
                                    query, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("drift", [False, True])
def test_parallel_contribution_has_finite_gradients(drift):
    """A token whose contribution points the open state's way scores ``I = 0`` in both readings (``cos = 1``;
    ``γO + s`` points the same way too), where the square root's slope is infinite: the ``eps`` clamp
    keeps the gradient finite (zero), as in the pairwise form."""
    trace, k, v, w, g, position = random_trace(3, R=2, Tm=12, L=4)
    for r in range(2):  # token 4 (a chunk start) reads only the carried open state: make it s_4 / 3
        trace.open_start[r, 4] = -1
        trace.open_states[r, 1] = w[r, 4] * torch.outer(k[r, 4], v[r, 4]) / 3
        trace.open_norm[r, 4] = trace.open_states[r, 1].square().sum()
    weights = torch.ones(2, 12, dtype=torch.float64)
    new = scores_and_gradients(scores_from_trace, trace, k, v, w, g, position, drift, weights)
    ref = scores_and_gradients(pairwise_scores, trace, k, v, w, g, position, drift, weights)
    assert (new[0][:, 4] <= 1e-6).all()
    for a, b in zip(new, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
