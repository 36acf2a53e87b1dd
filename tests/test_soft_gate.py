"""Soft gating of the dynamic policy (spec §3): the forward value is exactly the hard model's, the
recomputed scores are the ones the schedule used, and gradients reach τ, k, v and β."""

import pytest
import torch
from mixer_helpers import (
    one_thread,  # noqa: F401 (an autouse fixture)
    random_inputs,
)

import dla
from dla.layers import DLAGatedDeltaNet, DLAMamba2, PolicyConfig
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
