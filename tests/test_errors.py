"""Bad input gets a ValueError or TypeError that names the argument."""

import dataclasses

import pytest
import torch
from conftest import make_case

import dla

OPS = {
    "naive": lambda **kw: dla.naive_dla(**kw),
    "recurrent": lambda **kw: dla.recurrent_dla(**kw),
    "chunk": lambda **kw: dla.chunk_dla(**kw),
}


def base_case():
    inputs, schedule = make_case("dynamic", "gated_deltanet", B=2, T=20, H=2, K=4, V=3, capacity=4)
    return dict(inputs, schedule=schedule)


def nan_at(x):
    x = x.clone()
    x.view(-1)[3] = float("nan")
    return x


CASES = [
    (lambda c: {"q": c["q"][0]}, ValueError, "q must have shape"),
    (lambda c: {"k": c["k"][..., :3]}, ValueError, "k must have the shape of q"),
    (lambda c: {"v": c["v"][:, :5]}, ValueError, "v must be"),
    (lambda c: {"g": c["g"][..., :1]}, ValueError, "g must be"),
    (lambda c: {"beta": c["beta"][:, :3]}, ValueError, "beta must be"),
    (lambda c: {"lam": c["lam"][..., :2]}, ValueError, "lam has 2 labels but the schedule"),
    (lambda c: {"lam": c["lam"][:, :4]}, ValueError, "lam must be"),
    (lambda c: {"k": c["k"].float()}, TypeError, "k has dtype torch.float32 but q has torch.float64"),
    (lambda c: {"q": c["q"].long()}, TypeError, "q must be a floating-point tensor"),
    (lambda c: {"v": c["v"].to("meta")}, ValueError, "v is on meta"),
    (lambda c: {"g": c["g"].abs()}, ValueError, "g is a log-decay and must be <= 0"),
    (lambda c: {"q": nan_at(c["q"])}, ValueError, "q contains NaN or Inf"),
    (lambda c: {"v": c["v"] / 0}, ValueError, "v contains NaN or Inf"),
    (lambda c: {"g": nan_at(c["g"])}, ValueError, "g contains NaN or Inf"),
    (lambda c: {"beta": nan_at(c["beta"])}, ValueError, "beta contains NaN or Inf"),
    (lambda c: {"lam": nan_at(c["lam"])}, ValueError, "lam contains NaN or Inf"),
    (lambda c: {"schedule": c["schedule"].death}, TypeError, "schedule must be a dla.Schedule"),
    (lambda c: {"schedule": dla.plan_schedule("single", batch=2, heads=2, length=19)}, ValueError,
     "schedule is for"),
    (lambda c: {"cu_seqlens": torch.tensor([0, 10, 20])}, ValueError, "cu_seqlens"),
    (lambda c: {"q": "not a tensor"}, TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mutate, exc, match", CASES)
def test_bad_inputs(op, mutate, exc, match):
    case = base_case()
    case.update(mutate(case))
    with pytest.raises(exc, match=match):
        OPS[op](**case)


@pytest.mark.parametrize("cu, match", [
    (torch.tensor([0, 12, 8, 20]), "non-decreasing"),
    (torch.tensor([0, 12, 25]), "must end at the sequence length 20"),
    (torch.tensor([1, 12, 20]), "must start at 0"),
    (torch.tensor([0.0, 20.0]), "integer tensor"),
])
def test_bad_cu_seqlens(cu, match):
    inputs, _ = make_case("single", "mamba2", B=1, T=20, H=2, K=4, V=3)
    with pytest.raises((ValueError, TypeError), match=match):
        dla.novelty_scores(inputs["k"], cu_seqlens=cu)
    with pytest.raises((ValueError, TypeError), match=match):
        dla.plan_schedule("single", batch=1, heads=2, length=20, cu_seqlens=cu)


def test_initial_state_must_match_the_schedule():
    inputs, schedule = make_case("dynamic", "mamba2", B=2, T=20, H=2, K=4, V=3, capacity=4)
    _, state = dla.chunk_dla(**inputs, schedule=schedule, output_final_state=True)
    with pytest.raises(ValueError, match="plan_schedule\\(..., initial_state=state\\)"):
        dla.chunk_dla(**inputs, schedule=schedule, initial_state=state)
    cont = dla.plan_schedule("dynamic", batch=2, heads=2, length=20, capacity=4,
                             scores=dla.novelty_scores(inputs["k"]), initial_state=state)
    with pytest.raises(ValueError, match="pass their states as initial_state"):
        dla.recurrent_dla(**inputs, schedule=cont)
    with pytest.raises(TypeError, match="initial_state must be a dla.DLAState"):
        dla.recurrent_dla(**inputs, schedule=cont, initial_state=state.states)
    scaled = dataclasses.replace(state, scales=torch.ones(2, 2, 3))
    with pytest.raises(ValueError, match=r"initial_state.scales must be \[2, 2, 4\], got \(2, 2, 3\)"):
        dla.chunk_dla(**inputs, schedule=cont, initial_state=scaled)
    nan = dataclasses.replace(state, scales=torch.full((2, 2, 4), float("nan")))
    with pytest.raises(ValueError, match="initial_state.scales"):
        dla.recurrent_dla(**inputs, schedule=cont, initial_state=nan)
    twice = dataclasses.replace(state, places=torch.tensor([0, 1, 1, 3], dtype=torch.int32).repeat(2, 2, 1))
    with pytest.raises(ValueError, match=r"initial_state.places must hold a permutation of 0..3 per row"):
        dla.chunk_dla(**inputs, schedule=cont, initial_state=twice)
    with pytest.raises(TypeError, match="initial_state.places must be an integer tensor"):
        dla.recurrent_dla(**inputs, schedule=cont,
                          initial_state=dataclasses.replace(state, places=torch.zeros(2, 2, 4)))
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        dla.chunk_dla(**inputs, schedule=schedule, chunk_size=48)


def test_device_names_without_index_match():
    from dla.varlen import same_device

    assert same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert not same_device(torch.device("cuda:1"), torch.device("cuda:0"))
    assert not same_device(torch.device("cpu"), torch.device("cuda"))


def test_keep_freed_memory_applies_on_glibc():
    """The dla command raises glibc's mmap/trim thresholds; elsewhere it reports that it could not."""
    import platform

    from dla.cpu_allocator import keep_freed_memory

    applied = keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied is True
    else:
        assert applied is False
