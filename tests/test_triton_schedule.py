"""The Triton dynamic scan (GPU; Triton's interpreter on CPU) plans exactly what PyTorch plans."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dla

pytest.importorskip("triton", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), T=st.integers(1, 120), capacity=st.integers(1, 9),
       threshold=st.sampled_from([0.0, 0.4, 0.5, 1.0]), max_len=st.sampled_from([None, 3]),
       split=st.floats(0, 1), merge=st.sampled_from(["least_info", "oldest"]))
def test_triton_scan_matches_torch(seed, T, capacity, threshold, max_len, split, merge):
    gen = torch.Generator().manual_seed(seed)
    B, H = 2, 2
    scores = (torch.rand(B, T, H, generator=gen) * 8).round() / 8  # a coarse grid makes ties common
    kw = dict(batch=B, heads=H, capacity=capacity, threshold=threshold, max_segment_len=max_len, merge=merge)
    ref = dla.plan_schedule("dynamic", length=T, scores=scores, backend="torch", **kw)
    out = dla.plan_schedule("dynamic", length=T, scores=scores.to(DEVICE), backend="triton", **kw)
    assert torch.equal(out.death.cpu(), ref.death)
    assert torch.equal(out.final.starts.cpu(), ref.final.starts)
    assert torch.equal(out.final.info.cpu(), ref.final.info)
    # continuing from a prefix's final segments
    T1 = int(split * T)
    head = dla.plan_schedule("dynamic", length=T1, scores=scores[:, :T1], backend="torch", **kw)
    ref2 = dla.plan_schedule("dynamic", length=T - T1, scores=scores[:, T1:], initial_state=head.final,
                             backend="torch", **kw)
    out2 = dla.plan_schedule("dynamic", length=T - T1, scores=scores[:, T1:].to(DEVICE),
                             initial_state=head.final.to(DEVICE), backend="triton", **kw)
    assert torch.equal(out2.death.cpu(), ref2.death)
    assert torch.equal(out2.carried_death.cpu(), ref2.carried_death)


@pytest.mark.parametrize("T", [63, 64, 65, 200])
@pytest.mark.parametrize("merge", ["least_info", "oldest"])
def test_triton_scan_across_score_blocks(T, merge):
    """The scan loads scores 64 at a time: exact block ends, one token past, and a partial last block."""
    scores = (torch.rand(2, T, 3, generator=torch.Generator().manual_seed(T)) * 8).round() / 8
    kw = dict(batch=2, heads=3, length=T, capacity=4, threshold=0.5, merge=merge)
    ref = dla.plan_schedule("dynamic", scores=scores, backend="torch", **kw)
    out = dla.plan_schedule("dynamic", scores=scores.to(DEVICE), backend="triton", **kw)
    assert (ref.death != dla.schedule.schedule.NONE).any()  # segments really closed
    assert torch.equal(out.death.cpu(), ref.death) and torch.equal(out.final.starts.cpu(), ref.final.starts)
    assert torch.equal(out.final.info.cpu(), ref.final.info)


def test_triton_scan_varlen():
    cu = torch.tensor([0, 17, 17, 60, 100])
    scores = dla.novelty_scores(torch.randn(1, 100, 3, 8), cu_seqlens=cu)
    kw = dict(batch=1, heads=3, length=100, capacity=5, cu_seqlens=cu)
    ref = dla.plan_schedule("dynamic", scores=scores, backend="torch", **kw)
    out = dla.plan_schedule("dynamic", scores=scores.to(DEVICE), backend="triton",
                            **{**kw, "cu_seqlens": cu.to(DEVICE)})
    assert torch.equal(out.death.cpu(), ref.death)
