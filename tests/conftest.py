import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU through Triton's interpreter (must be set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F

import dla

BASES = ("mamba2", "gated_deltanet")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300)).item()


FAST_DECAY = (0.05, 0.7)  # per-token log-decay magnitudes: forgets within a few tokens
SLOW_DECAY = (0.001, 0.02)  # per-token decay 0.98-0.999: a 64-token chunk keeps 28-94% of a state


def make_case(policy="dynamic", base="mamba2", label_rule=None, B=2, T=33, H=2, K=6, V=5, capacity=4,
              dtype=torch.float64, cu_seqlens=None, seed=0, requires_grad=False, threshold=0.5, period=3,
              extra_labels=1, device="cpu", decay=FAST_DECAY):
    """Random, never-zero inputs and a schedule planned on them (novelty scores of the keys).

    Keys are unit-norm for Gated DeltaNet, λ in [0.25, 1.25], log-decays uniform in
    ``[-decay[1], -decay[0]]``: ``FAST_DECAY`` (the default) forgets within a few tokens (short
    sequences see every path); ``SLOW_DECAY`` keeps states over many chunks, as trained models do,
    so that the inter-chunk transitions dominate the output."""
    gen = torch.Generator().manual_seed(seed)
    gd = base == "gated_deltanet"
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    if gd:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = -(torch.rand(B, T, H, generator=gen, dtype=torch.float64) * (decay[1] - decay[0]) + decay[0])
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.9 + 0.05 if gd else None
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.cpu()
    scores = dla.novelty_scores(k, cu_seqlens=cu_seqlens) if policy == "dynamic" else None
    if device != "cpu":
        k, cu_seqlens = k.to(device), None if cu_seqlens is None else cu_seqlens.to(device)
        scores = None if scores is None else scores.to(device)
    schedule = dla.plan_schedule(policy, batch=B, heads=H, length=T,
                                 capacity=None if policy == "fenwick" else capacity, scores=scores,
                                 threshold=threshold, period=period, label_rule=label_rule, cu_seqlens=cu_seqlens,
                                 device=device)
    lam = torch.rand(B, T, H, schedule.n_labels + extra_labels, generator=gen, dtype=torch.float64) + 0.25
    inputs = dict(q=q, k=k, v=v, g=g, beta=beta, lam=lam)
    for name, x in inputs.items():
        if x is not None:
            inputs[name] = x.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return inputs, schedule


def grads(out: torch.Tensor, inputs: dict, seed=1) -> dict:
    """Gradients of a fixed random projection of ``out`` w.r.t. every input that needs one."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = w.to(device=out.device, dtype=out.dtype)
    names = [n for n, x in inputs.items() if x is not None and x.requires_grad]
    gs = torch.autograd.grad((out * w).sum(), [inputs[n] for n in names])
    return dict(zip(names, gs))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
