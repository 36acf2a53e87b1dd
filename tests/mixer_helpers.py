"""Helpers shared by the schedule, layer and model tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread is faster than two, and far faster when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def random_inputs(seed, T, H=1, K=3, V=2, stable=False, dtype=torch.float64):
    """Random contributions, or piecewise-stable ones: runs of tokens whose k and v point nearly the same
    way (a small jitter keeps scores inside a run apart, so no decision rests on rounding)."""
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(1, T, H, K, generator=gen, dtype=dtype), torch.randn(1, T, H, V, generator=gen, dtype=dtype)
    if stable:
        run = torch.randint(0, 2, (T,), generator=gen).bool() | (torch.rand(T, generator=gen) < 0.85)
        run[0] = False
        for t in range(T):
            if run[t]:
                jitter = 0.02 * torch.randn(2, H, max(K, V), generator=gen, dtype=dtype)
                k[0, t] = k[0, t - 1] * (0.5 + torch.rand((), generator=gen, dtype=dtype)) + jitter[0, :, :K]
                v[0, t] = v[0, t - 1] * (0.5 + torch.rand((), generator=gen, dtype=dtype)) + jitter[1, :, :V]
    g = -torch.rand(1, T, H, generator=gen, dtype=dtype) * 0.5
    beta = torch.rand(1, T, H, generator=gen, dtype=dtype) * 0.9 + 0.05
    return k, v, g, beta
