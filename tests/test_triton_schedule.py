"""The Triton walk of the ``dynamic`` policy (GPU; Triton's interpreter on CPU) plans exactly what
PyTorch plans: the same deaths, scores, segment information and open-state norms, bit for bit."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mixer_helpers import random_inputs

import dla

pytest.importorskip("triton", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_same(out, ref):
    assert torch.equal(out.death.cpu(), ref.death)
    assert torch.equal(out.scores.cpu(), ref.scores)
    assert torch.equal(out.final.starts.cpu(), ref.final.starts)
    assert torch.equal(out.final.info.cpu(), ref.final.info)
    if ref.final.open_norm is not None:
        assert torch.equal(out.final.open_norm.cpu(), ref.final.open_norm)
    if ref.carried_death is not None:
        assert torch.equal(out.carried_death.cpu(), ref.carried_death)


def both(**kw):
    """Plan with PyTorch on the CPU-side copy and with Triton on ``DEVICE``. On a GPU both walkers
    read terms computed there, so PyTorch plans on the GPU too."""
    dev = {name: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x) for name, x in kw.items()}
    if isinstance(kw.get("initial_state"), dla.SegmentState):
        dev["initial_state"] = kw["initial_state"].to(DEVICE)
    ref = dla.plan_schedule("dynamic", backend="torch", **dev)
    out = dla.plan_schedule("dynamic", backend="triton", **dev)
    return out, _cpu(ref)


def _cpu(s):
    s.death = s.death.cpu()
    s.scores = None if s.scores is None else s.scores.cpu()
    s.final = s.final.to("cpu")
    if s.carried_death is not None:
        s.carried_death = s.carried_death.cpu()
    return s


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), T=st.integers(1, 130), capacity=st.integers(2, 9),
       threshold=st.sampled_from([0.3, 1.0, 1.3]), stable=st.booleans(),
       score=st.sampled_from(["state", "state_drift"]),
       merge=st.sampled_from(["density", "least_info", "oldest"]), max_len=st.sampled_from([None, 3]),
       split=st.floats(0, 1))
def test_triton_state_walk_matches_torch(seed, T, capacity, threshold, stable, score, merge, max_len, split):
    k, v, g, beta = random_inputs(seed, T, H=2, K=4, V=3, stable=stable, dtype=torch.float32)
    kw = dict(batch=1, heads=2, capacity=capacity, threshold=threshold, score=score, merge=merge,
              max_segment_len=max_len)
    out, ref = both(length=T, k=k, v=v, g=g, beta=beta, **kw)
    assert_same(out, ref)
    # continuing from a prefix's final segments and open state
    T1 = int(split * T)
    head = dla.plan_schedule("dynamic", length=T1, k=k[:, :T1], v=v[:, :T1], g=g[:, :T1], beta=beta[:, :T1], **kw)
    out, ref = both(length=T - T1, k=k[:, T1:], v=v[:, T1:], g=g[:, T1:], beta=beta[:, T1:],
                    initial_state=head.final, **kw)
    assert_same(out, ref)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), T=st.integers(1, 120), capacity=st.integers(1, 9),
       threshold=st.sampled_from([0.0, 0.4, 0.5, 1.0]), max_len=st.sampled_from([None, 3]),
       merge=st.sampled_from(["density", "least_info", "oldest"]))
def test_triton_given_scores_match_torch(seed, T, capacity, threshold, max_len, merge):
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.rand(2, T, 2, generator=gen) * 8).round() / 8  # a coarse grid makes ties common
    out, ref = both(batch=2, heads=2, length=T, scores=scores, capacity=capacity, threshold=threshold,
                    max_segment_len=max_len, merge=merge)
    if capacity > 1:
        assert_same(out, ref)
    else:
        assert torch.equal(out.death.cpu(), ref.death)


@pytest.mark.parametrize("T", [63, 64, 65, 130])
def test_triton_walk_across_planning_chunks(T):
    """The state score is planned 64 tokens at a time: exact chunk ends, one past, a partial last chunk."""
    k, v, g, beta = random_inputs(T, T, H=3, K=4, V=3, dtype=torch.float32)
    out, ref = both(batch=1, heads=3, length=T, k=k, v=v, g=g, beta=beta, capacity=4, threshold=1.2)
    assert (ref.death != dla.NONE).any()  # segments really closed
    assert_same(out, ref)


def test_triton_walk_varlen():
    cu = torch.tensor([0, 17, 17, 60, 100])
    k, v, g, beta = random_inputs(3, 100, H=3, K=4, V=3, dtype=torch.float32)
    out, ref = both(batch=1, heads=3, length=100, k=k, v=v, g=g, beta=beta, capacity=5, threshold=1.2, cu_seqlens=cu)
    assert_same(out, ref)
