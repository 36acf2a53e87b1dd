"""GPU-only checks: bf16/fp32 inputs against the fp32/fp64 PyTorch path at realistic sizes, and
independent anchors in flash-linear-attention. Skipped on machines without CUDA."""

import os

import pytest
import torch
from conftest import BASES, FAST_DECAY, SLOW_DECAY, WALK_RESULTS, grads, make_case, rel_err, walk_case, walk_results

import dla
from dla.schedule.soft_gate import differentiable_scores

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU CI checks the "
                                "Triton kernels through the interpreter in test_triton_*.py)")
os.environ["DLA_POISON_OUTPUTS"] = "1"


def rel_rmse(a, b):
    return rel_err(a, b)


@pytest.mark.parametrize("T", [63, 1000, 4096])
@pytest.mark.parametrize("capacity", [1, 8, 16, 32])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("policy", ["fixed", "fenwick", "dynamic"])
def test_kernels_vs_torch_path(policy, base, capacity, T):
    if policy == "fenwick" and capacity != 16:
        pytest.skip("fenwick's capacity is set by T")
    compare_with_torch_path(policy, base, capacity, T)


@pytest.mark.parametrize("capacity", [1, 16])
@pytest.mark.parametrize("base", BASES)
def test_kernels_vs_torch_path_with_slow_decays(base, capacity):
    """States that survive many chunks (as in trained models), so that the inter-chunk transitions
    dominate the output; the cases above forget within a few tokens."""
    compare_with_torch_path("dynamic", base, capacity, 4096, decay=SLOW_DECAY)


@pytest.mark.parametrize("T", [63, 4096])
@pytest.mark.parametrize("capacity", [1, 16, 32])
@pytest.mark.parametrize("policy", ["fixed", "dynamic"])
def test_unfused_gated_deltanet_walks_vs_torch_path(policy, capacity, T, monkeypatch):
    """Gated DeltaNet's fallback (DLA_FUSED_GDN=0): the unfused walks; the cases above take the fused one."""
    monkeypatch.setattr(dla.ops.chunk, "FUSED_GATED_DELTANET", False)
    compare_with_torch_path(policy, "gated_deltanet", capacity, T)


@pytest.mark.parametrize("K, V", [(128, 64), (256, 128)])
@pytest.mark.parametrize("base", BASES)
def test_kernels_vs_torch_path_at_wide_heads(base, K, V):
    """The benchmark's and the paper's head sizes, which the cases above (K = 64) do not reach:
    whole-K key blocks of the Mamba-2 walk (K = 128), two column blocks of the Gated DeltaNet
    transition and eight key blocks (K = 256); fp16 inputs as well."""
    compare_with_torch_path("dynamic", base, 16, 1000, K=K, V=V,
                            dtypes=((torch.float32, 1e-5), (torch.bfloat16, 5e-3), (torch.float16, 5e-3)))


def compare_with_torch_path(policy, base, capacity, T, decay=FAST_DECAY, K=64, V=64,
                            dtypes=((torch.float32, 1e-5), (torch.bfloat16, 5e-3))):
    """o and every gradient of the Triton path, for inputs of each of ``dtypes`` (with its
    tolerance), against the fp64 PyTorch path."""
    inputs, schedule = make_case(policy, base, None, B=2, T=T, H=4, K=K, V=V, capacity=capacity, period=64,
                                 dtype=torch.float32, requires_grad=True, device="cuda", decay=decay)
    ref = {n: None if x is None else x.detach().double().requires_grad_() for n, x in inputs.items()}
    o_ref, _ = dla.chunk_dla(**ref, schedule=schedule, backend="torch")
    g_ref = grads(o_ref, ref)
    for dtype, tol in dtypes:
        cast = {n: None if x is None else x.detach().to(dtype).requires_grad_() for n, x in inputs.items()}
        o, _ = dla.chunk_dla(**cast, schedule=schedule, backend="triton")
        assert torch.isfinite(o).all()
        # bf16 / fp16 inputs: compare against the fp64 path on the same rounded inputs
        ref_c = {n: None if x is None else x.detach().double().requires_grad_() for n, x in cast.items()}
        o_ref_c, _ = dla.chunk_dla(**ref_c, schedule=schedule, backend="torch") if dtype != torch.float32 else (
            o_ref, None)
        g_ref_c = grads(o_ref_c, ref_c) if dtype != torch.float32 else g_ref
        assert rel_rmse(o.float(), o_ref_c) <= tol, f"o {dtype}"
        g = grads(o, cast)
        for name in g:
            assert rel_rmse(g[name].float(), g_ref_c[name]) <= 10 * tol, f"d{name} {dtype}"


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("matrix, V", [(False, 64), (True, 32)], ids=["mamba2", "gated_deltanet"])
def test_fused_walk_state_checkpoints_on_gpu(matrix, V, input_dtype, monkeypatch):
    """At the benchmark's head and chunk size (K = 128, L = 64) and C = 16 over 37 chunks, the fused
    walk that keeps the states every 8 chunks (the default; the last group holds 5) gives the same
    o, final states and gradients, bit for bit, as the one that keeps every boundary: the backward
    recomputes them (on 8 warps, 32 value columns) exactly as the autotuned forward computed them,
    for IEEE fp32 and tf32 (bf16 inputs) products. At most two value blocks meet in each atomic sum
    (one key block at V = 64, one value block at V = 32), so the gradients are deterministic: in one
    key split (two would make four addends, summed in no fixed order; test_fused_walk_in_key_splits_on_gpu)."""
    monkeypatch.setenv("DLA_WALK_KEY_SPLITS", "1")
    case = walk_case(matrix, NC=37, C=16, K=128, V=V, N=2, H=2, L=64, device="cuda")
    every = walk_results(case, fused=True, group=1, input_dtype=input_dtype)
    checkpointed = walk_results(case, fused=True, group=8, input_dtype=input_dtype)
    for name, a, b in zip(WALK_RESULTS, checkpointed, every):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
    if input_dtype == torch.float32:  # (tf32 products against the PyTorch path: the bf16 cases above)
        for name, a, b in zip(WALK_RESULTS, checkpointed, walk_results(case, fused=False)):
            assert rel_err(a, b) <= 1e-5 * (1 if name in ("o", "S_final") else 10), name


@pytest.mark.parametrize("splits", ["2", "4"])
def test_fused_walk_in_key_splits_on_gpu(splits, monkeypatch):
    """The Mamba-2 walk in key splits (DLA_WALK_KEY_SPLITS: K / KS key rows per program) at the
    benchmark's head and chunk size (K = 128, V = 64, L = 64) and C = 16 over 37 chunks, fp32: the
    PyTorch walks' o and final states within 1e-5, gradients 1e-4, and checkpoints every 8 chunks
    give the numbers of keeping every boundary bit for bit, except dλ and the decay's gradient:
    those add 2 value blocks times KS splits atomically, in no fixed order (to rounding there)."""
    monkeypatch.setenv("DLA_WALK_KEY_SPLITS", splits)
    case = walk_case(False, NC=37, C=16, K=128, V=64, N=2, H=2, L=64, device="cuda")
    every = walk_results(case, fused=True, group=1)
    checkpointed = walk_results(case, fused=True, group=8)
    for name, a, b in zip(WALK_RESULTS, checkpointed, every):
        assert torch.isfinite(a).all(), name
        if name in ("dlam", "dgamma"):
            assert rel_err(a, b) <= 1e-6, name
        else:
            assert torch.equal(a, b), name
    for name, a, b in zip(WALK_RESULTS, checkpointed, walk_results(case, fused=False)):
        assert rel_err(a, b) <= 1e-5 * (1 if name in ("o", "S_final") else 10), name


@pytest.mark.parametrize("base", BASES)
def test_varlen_on_gpu(base):
    cu = torch.tensor([0, 100, 1100, 1101, 3000], device="cuda")
    inputs, schedule = make_case("dynamic", base, None, B=1, T=3000, H=4, K=64, V=64, capacity=16,
                                 dtype=torch.float32, requires_grad=True, cu_seqlens=cu, device="cuda")
    ref = {n: None if x is None else x.detach().double().requires_grad_() for n, x in inputs.items()}
    o_ref, _ = dla.chunk_dla(**ref, schedule=schedule, backend="torch", cu_seqlens=cu)
    o, _ = dla.chunk_dla(**inputs, schedule=schedule, backend="triton", cu_seqlens=cu)
    assert rel_rmse(o, o_ref) <= 1e-5
    g_ref, g = grads(o_ref, ref), grads(o, inputs)
    for name in g:
        assert rel_rmse(g[name], g_ref[name]) <= 1e-4, name


def test_gpu_scheduler_matches_cpu():
    """Given scores: the Triton walk on the GPU plans what PyTorch plans on the CPU, bit for bit."""
    k = torch.randn(4, 4096, 8, 64)
    scores = dla.novelty_scores(k)
    kw = dict(batch=4, heads=8, length=4096, capacity=16, threshold=0.5, merge="least_info")
    ref = dla.plan_schedule("dynamic", scores=scores, backend="torch", **kw)
    out = dla.plan_schedule("dynamic", scores=scores.cuda(), **kw)
    assert torch.equal(out.death.cpu(), ref.death)


@pytest.mark.parametrize("score", ["state", "state_drift"])
def test_gpu_state_score_walks_agree(score):
    """The paper's state score at C = 30 on bf16 inputs: the Triton and PyTorch walks read the same
    chunk terms on the GPU and plan identical schedules; the scores equal those recomputed from the
    planner's trace (the soft gate's formula)."""
    B, T, H, K, V = 2, 4096, 4, 128, 64
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, device="cuda"), dim=-1).bfloat16()
    v, g = torch.randn(B, T, H, V, device="cuda").bfloat16(), -torch.rand(B, T, H, device="cuda") * 0.1
    beta = torch.rand(B, T, H, device="cuda").bfloat16()
    kw = dict(batch=B, heads=H, length=T, k=k, v=v, g=g, beta=beta, threshold=1.3 if score == "state" else 0.3,
              score=score)
    out = dla.plan_schedule("dynamic", backend="triton", keep_trace=True, **kw)
    ref = dla.plan_schedule("dynamic", backend="torch", **kw)
    assert (ref.death != dla.NONE).float().mean() > 0.01
    assert torch.equal(out.death, ref.death) and torch.equal(out.scores, ref.scores)
    assert torch.equal(out.final.info, ref.final.info) and torch.equal(out.final.open_norm, ref.final.open_norm)
    again = differentiable_scores(out, score, k, v, g, beta, "decayed")
    assert (again - out.scores.transpose(1, 2)).abs().max() < 1e-4


@pytest.mark.parametrize("M, p", [(80, 0.3), (2048, 1.0), (2051, 1.0)])
def test_count_after_on_gpu_equals_the_cumulative_sum(M, p):
    """On CUDA ``count_after`` is an fp16 product up to M = 2048 (all entries true: counts up to
    2047) and a cumulative sum beyond, where fp16 would round the counts 2049 and 2050 (an
    off-by-one in the guard fails M = 2051); both equal the CPU's cumulative sum."""
    from dla.schedule.schedule import count_after

    mask = torch.rand(3, 5, M, generator=torch.Generator().manual_seed(M)) < p
    want = mask.sum(-1, keepdim=True) - mask.cumsum(-1)
    assert torch.equal(count_after(mask.cuda()).cpu(), want)


fla_simple_gla = pytest.importorskip("fla.ops.simple_gla", reason="flash-linear-attention is not installed")


def fla_or_skip(fn, *args, **kwargs):
    """fla 0.6.0 refuses its gated kernels on Hopper with Triton 3.4-3.7.0 (a compiler bug)."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        if "Triton" in str(e):
            pytest.skip(f"flash-linear-attention refuses here: {str(e)[:120]}")
        raise


def test_single_equals_fla_simple_gla():
    inputs, schedule = make_case("single", "mamba2", None, B=2, T=1000, H=4, K=64, V=64, capacity=1,
                                 dtype=torch.float32, device="cuda")
    lam = torch.ones_like(inputs["lam"][..., :1])
    o, _ = dla.chunk_dla(**{**inputs, "lam": lam}, schedule=schedule)
    o_fla, _ = fla_or_skip(fla_simple_gla.chunk_simple_gla, inputs["q"], inputs["k"], inputs["v"], g=inputs["g"],
                           scale=64 ** -0.5)
    assert rel_rmse(o, o_fla) <= 5e-3


def test_single_equals_fla_gated_delta_rule():
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    inputs, schedule = make_case("single", "gated_deltanet", None, B=2, T=1000, H=4, K=64, V=64, capacity=1,
                                 dtype=torch.float32, device="cuda")
    lam = torch.ones_like(inputs["lam"][..., :1])
    o, _ = dla.chunk_dla(**{**inputs, "lam": lam}, schedule=schedule)
    o_fla, _ = fla_or_skip(chunk_gated_delta_rule, inputs["q"], inputs["k"], inputs["v"], inputs["g"],
                           inputs["beta"], scale=64 ** -0.5)
    assert rel_rmse(o, o_fla) <= 5e-3


def test_fenwick_equals_fla_log_linear_forward_and_backward():
    from fla.ops.log_linear_attn import chunk_log_linear_attn

    inputs, schedule = make_case("fenwick", "mamba2", None, B=2, T=1024, H=4, K=64, V=64,
                                 dtype=torch.float32, requires_grad=True, device="cuda")
    lam = inputs["lam"][..., : schedule.n_labels].detach().requires_grad_()
    inputs["lam"] = lam
    o, _ = dla.chunk_dla(**inputs, schedule=schedule)
    o_fla, _ = fla_or_skip(chunk_log_linear_attn, inputs["q"], inputs["k"], inputs["v"], inputs["g"], lam,
                           scale=64 ** -0.5)
    assert rel_rmse(o, o_fla) <= 5e-3
    g, g_fla = grads(o, inputs), grads(o_fla, inputs)
    for name in g:
        assert rel_rmse(g[name], g_fla[name]) <= 5e-3, name


@pytest.mark.parametrize("base, splits", [("mamba2", "1"), ("mamba2", "4"), ("gated_deltanet", "1")])
def test_deterministic_mode_repeats_gradients_bit_for_bit(base, splits, monkeypatch):
    """Under torch.use_deterministic_algorithms the Triton backward stores every program's partial
    instead of adding atomically (two value blocks; for Mamba-2 also in four key splits): two backward
    passes give identical gradients (the ablation sweep's reruns of one seed differed by up to 43
    accuracy points with atomic sums), and they are the PyTorch path's within the fp32 tolerance."""
    from dla.ops.triton import chunk_inter

    monkeypatch.setenv("DLA_WALK_KEY_SPLITS", splits)
    walks, walk_backward = [], chunk_inter.walk_backward
    monkeypatch.setattr(chunk_inter, "walk_backward", lambda *a: walks.append(1) or walk_backward(*a))
    inputs, schedule = make_case("dynamic", base, None, B=2, T=1000, H=4, K=64, V=64, capacity=16,
                                 dtype=torch.float32, requires_grad=True, device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        runs = [grads(dla.chunk_dla(**inputs, schedule=schedule)[0], inputs) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert walks == [1, 1]  # the Triton walks, not the PyTorch ones
    ref = {n: None if x is None else x.detach().double().requires_grad_() for n, x in inputs.items()}
    g_ref = grads(dla.chunk_dla(**ref, schedule=schedule, backend="torch")[0], ref)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name
        assert rel_rmse(runs[0][name], g_ref[name]) <= 1e-4, name
