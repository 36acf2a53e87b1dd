import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU through Triton's interpreter (must be set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist's workers (`-n auto`) share the machine's cores: each takes its share of torch's threads
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
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


def walk_case(matrix, NC, C, K, V, N=1, H=2, L=16, seed=0, device="cpu"):
    """Random inputs of fused_inter (float64, on ``device``) in the regime the model-level cases barely
    reach: decays of order 1 and a non-symmetric K x K transition (so a transposed or misplaced key
    block of M or dM shows), merges and dropped slots; and random weights of o and the final
    states for the loss. Returns (leaves, rank, dest, w_o, w_s)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    rank = torch.randint(0, C + 1, (N, H, NC, L), generator=gen)  # C: the token is routed nowhere
    dest = torch.randint(0, C + 1, (N * H * NC, C), generator=gen).sort(-1).values.reshape(N, H, NC, C)
    if matrix:
        gam = 0.9 * torch.eye(K, dtype=torch.float64) + 0.2 * randn(N, H, NC, K, K) / K ** 0.5
    else:
        gam = 0.4 + 0.5 * torch.rand(N, H, NC, generator=gen, dtype=torch.float64)
    leaves = [randn(N, H, NC, L, K), torch.rand(N, H, NC, L, C, generator=gen, dtype=torch.float64),
              randn(N, H, NC, L, K) / K ** 0.5, randn(N, H, NC, L, V), gam, randn(N, H, C, K, V)]
    w_o, w_s = randn(N, H, NC, L, V), randn(N, H, C, K, V)
    # made on the CPU: the same numbers on either device
    return [t.to(device) for t in leaves], rank.to(device), dest.to(device), w_o.to(device), w_s.to(device)


WALK_RESULTS = ["o", "S_final", "dq_eff", "dlam", "dx", "dv", "dgamma", "dS0"]


def walk_results(case, fused, group=None, input_dtype=torch.float32):
    """o, the final states and the gradients of (o * w_o).sum() + (S * w_s).sum() w.r.t. q_eff, λ,
    x, v, the transition and S0 (:data:`WALK_RESULTS`): through fused_inter (fp32, with the products
    of ``input_dtype`` inputs, ``group`` chunks per state checkpoint) or the unfused PyTorch walks
    (float64)."""
    from dla.ops.chunk import TORCH_WALKS, _inter
    from dla.ops.triton.chunk_inter import fused_inter

    leaves, rank, dest, w_o, w_s = case
    ins = [t.clone().requires_grad_() for t in leaves]
    q_eff, lam, x, v, gamma, S0 = ins
    if fused:
        o, S = fused_inter(*(t.float() for t in (q_eff, lam, x, v)), rank, gamma.float(), dest, S0.float(),
                           input_dtype, group)
    else:
        o, S = _inter(TORCH_WALKS, q_eff, lam, x.transpose(-1, -2), v, rank, gamma, dest, S0)
    return [o, S, *torch.autograd.grad((o * w_o).sum() + (S * w_s).sum(), ins)]


def counted(kernel, calls: list):
    """``kernel`` with its launches (``kernel[grid](...)``) recorded in ``calls``."""
    class Counted:
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]
    return Counted()
