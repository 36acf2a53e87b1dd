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
    if ref.trace is not None:  # what the soft gates recompute the scores from
        for name in ("scores", "open_start", "open_norm", "open_states"):
            assert torch.equal(getattr(out.trace, name).cpu(), getattr(ref.trace, name).cpu()), name


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
@given(seed=st.integers(0, 10**6), T=st.integers(1, 120), capacity=st.integers(2, 9),
       threshold=st.sampled_from([0.0, 0.4, 0.5, 1.0]), max_len=st.sampled_from([None, 3]),
       merge=st.sampled_from(["density", "least_info", "oldest"]))
def test_triton_given_scores_match_torch(seed, T, capacity, threshold, max_len, merge):
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.rand(2, T, 2, generator=gen) * 8).round() / 8  # a coarse grid makes ties common
    out, ref = both(batch=2, heads=2, length=T, scores=scores, capacity=capacity, threshold=threshold,
                    max_segment_len=max_len, merge=merge)
    assert_same(out, ref)


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


# ----------------------------------------------------------------------------- merges under stress
def given_scores(seed, B, T, H, piecewise):
    """Scores in [0, 1]: uniform, or piecewise constant on a grid of quarters (runs of equal
    scores, so equal pair costs and ties everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    if not piecewise:
        return torch.rand(B, T, H, generator=gen)
    levels = (torch.rand(B, T, H, generator=gen) * 4).round() / 4
    change = torch.rand(B, T, H, generator=gen) < 0.3
    change[:, 0] = True
    run_start = torch.where(change, torch.arange(T)[None, :, None], 0).cummax(1).values
    return levels.gather(1, run_start)


@pytest.mark.parametrize("piecewise", [False, True])
@pytest.mark.parametrize("merge", ["density", "least_info", "oldest"])
@pytest.mark.parametrize("capacity", [2, 3, 8, 30, 32])
def test_triton_given_scores_merge_at_every_token(capacity, merge, piecewise):
    """Threshold 0: every token opens a segment, so once the C slots are in use every token merges
    a pair (capacity 1 is the single state, planned without a walk). 32 slots take two lanes per
    thread on the GPU."""
    T = max(2 * capacity + 20, 30)
    scores = given_scores(capacity, 1, T, 2, piecewise)
    out, ref = both(batch=1, heads=2, length=T, scores=scores, capacity=capacity, threshold=0.0, merge=merge)
    assert bool((ref.death[..., 1:] >= 0).all())
    assert_same(out, ref)


@pytest.mark.parametrize("merge", ["density", "least_info", "oldest"])
@pytest.mark.parametrize("capacity", [2, 8, 30])
def test_triton_given_scores_continue_across_windows(capacity, merge):
    """A window that continues from another's segments: carried slots merge (``carried_death``),
    from a full set of slots and from a partly used one; piecewise scores, a segment length cap."""
    T = 2 * capacity + 30
    scores = given_scores(7 * capacity, 2, T, 2, piecewise=True)
    kw = dict(batch=2, heads=2, capacity=capacity, threshold=0.5, merge=merge, max_segment_len=4)
    for split in (5, capacity + 7):
        head = dla.plan_schedule("dynamic", length=split, scores=scores[:, :split], **kw)
        out, ref = both(length=T - split, scores=scores[:, split:], initial_state=head.final, **kw)
        assert bool((ref.carried_death >= 0).any())
        assert_same(out, ref)


@pytest.mark.parametrize("merge", ["density", "least_info", "oldest"])
@pytest.mark.parametrize("capacity", [3, 30])
def test_triton_given_scores_varlen(capacity, merge):
    """Packed sequences of lengths 0, 9, 2C + 11 and 3: rows end before the window does."""
    lengths = [0, 9, 2 * capacity + 11, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    scores = given_scores(capacity, 1, int(cu[-1]), 2, piecewise=False)
    out, ref = both(batch=1, heads=2, length=int(cu[-1]), scores=scores, capacity=capacity, threshold=0.2,
                    merge=merge, cu_seqlens=cu)
    assert_same(out, ref)


@pytest.mark.parametrize("merge", ["density", "least_info", "oldest"])
@pytest.mark.parametrize("score", ["state", "state_drift"])
@pytest.mark.parametrize("capacity", [2, 3, 8, 30, 32])
def test_triton_state_walk_merges_every_token(capacity, score, merge):
    """Random contributions under a low threshold open a segment at nearly every token, so the
    walk merges at nearly every token once full, across planning chunks; the trace the soft gates
    read (scores, open-segment starts and norms, open states) is the same too."""
    T = max(2 * capacity + 20, 70)
    k, v, g, beta = random_inputs(capacity, T, H=2, K=4, V=3, dtype=torch.float32)
    threshold = 0.5 if score == "state" else 0.05
    out, ref = both(batch=1, heads=2, length=T, k=k, v=v, g=g, beta=beta, capacity=capacity, threshold=threshold,
                    score=score, merge=merge, keep_trace=True)
    assert (ref.death[..., 1:] >= 0).float().mean() > 0.7
    assert_same(out, ref)


@pytest.mark.parametrize("merge", ["density", "least_info", "oldest"])
@pytest.mark.parametrize("capacity", [2, 8, 30])
def test_triton_state_walk_continues_with_a_length_cap(capacity, merge):
    """Piecewise-stable contributions (long runs, few boundaries from the score) with a segment
    length cap that opens the rest, continued from a full and from a partly used set of slots."""
    T = 5 * capacity + 40
    k, v, g, beta = random_inputs(capacity + 1, T, H=2, K=4, V=3, stable=True, dtype=torch.float32)
    kw = dict(batch=1, heads=2, capacity=capacity, threshold=1.3, merge=merge, max_segment_len=5)
    for split in (4, 5 * capacity + 3):
        head = dla.plan_schedule("dynamic", length=split, k=k[:, :split], v=v[:, :split], g=g[:, :split],
                                 beta=beta[:, :split], **kw)
        out, ref = both(length=T - split, k=k[:, split:], v=v[:, split:], g=g[:, split:], beta=beta[:, split:],
                        initial_state=head.final, keep_trace=True, **kw)
        assert_same(out, ref)


def test_triton_walk_leaves_the_initial_state_unchanged():
    """Continuing from a segmentation plans into new tensors: the caller's state (its open-state norms
    included, which the kernel updates as it walks) is the same afterwards."""
    k, v, g, beta = random_inputs(3, 40, H=2, K=4, V=3, dtype=torch.float32)
    kw = dict(batch=1, heads=2, capacity=4, threshold=0.3)
    head = dla.plan_schedule("dynamic", length=20, k=k[:, :20], v=v[:, :20], g=g[:, :20], beta=beta[:, :20], **kw)
    seg = head.final.to(DEVICE)
    before = {name: getattr(seg, name).clone() for name in ("starts", "info", "open_norm", "open_state")}
    dev = [x[:, 20:].to(DEVICE) for x in (k, v, g, beta)]
    dla.plan_schedule("dynamic", length=20, k=dev[0], v=dev[1], g=dev[2], beta=dev[3], initial_state=seg,
                      backend="triton", **kw)
    for name, value in before.items():
        assert torch.equal(getattr(seg, name), value), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("score, merge, capacity, max_len, keep_trace", [
    ("state", "density", 4, None, False), ("state", "density", 30, None, True),
    ("state_drift", "least_info", 5, 7, False), ("state_drift", "density", 5, None, True)])
def test_a_graphed_plan_equals_the_launched_plan(score, merge, capacity, max_len, keep_trace, monkeypatch):
    """A state-scored plan on CUDA replays one CUDA graph per shape (dla.schedule.graphed), captured the
    second time the shape is planned: over new inputs through the same graph, packed sequences and a
    continued window with its open state, it plans what the chunk-by-chunk launches plan, bit for bit,
    and keeps the same trace for the soft gates."""
    from dla.schedule import graphed

    graphed.clear_graphs()
    cu = torch.tensor([0, 100, 333, 400], device="cuda")
    # where these random tokens open a segment at a third to a half of the tokens: the state score of
    # random keys and values is near √2, the drift score lower (at τ = 1 one opened at every token, the other
    # at 1 in 60)
    threshold = {"state": 1.42, "state_drift": 0.7}[score]
    kw = dict(batch=1, heads=3, capacity=capacity, score=score, merge=merge, max_segment_len=max_len,
              threshold=threshold, cu_seqlens=cu, device="cuda", keep_trace=keep_trace)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        k, v = (torch.randn(1, 400, 3, d, generator=gen).cuda().bfloat16() for d in (32, 16))
        g = -torch.rand(1, 400, 3, generator=gen).cuda() * 0.3
        beta = torch.rand(1, 400, 3, generator=gen).cuda()
        plans = []
        for graphs in ("0", "1"):
            monkeypatch.setenv("DLA_PLAN_CUDA_GRAPHS", graphs)
            first = dla.plan_schedule("dynamic", length=400, k=k, v=v, g=g, beta=beta, **kw)
            state = first.final
            # a continued window: three more tokens of each sequence
            more = dla.plan_schedule("dynamic", length=9, k=k[:, :9], v=v[:, :9], g=g[:, :9], beta=beta[:, :9],
                                     initial_state=state, **{**kw, "cu_seqlens": torch.tensor([0, 3, 6, 9]).cuda()})
            plans.append((first, more))
        # the first seed's shapes were planned once, launched; from the second seed on they replay graphs
        assert len(graphed._GRAPHS) == (0 if seed == 0 else 2)
        for launched, replayed in zip(*plans):
            assert torch.equal(replayed.death, launched.death) and torch.equal(replayed.scores, launched.scores)
            for field in ("starts", "info", "position", "open_state", "open_norm"):
                assert torch.equal(getattr(replayed.final, field), getattr(launched.final, field)), field
            assert (replayed.trace is None) == (launched.trace is None) == (not keep_trace)
            for field in ("open_start", "open_norm", "open_states", "chunk") if keep_trace else ():
                want, got = getattr(launched.trace, field), getattr(replayed.trace, field)
                assert torch.equal(got, want) if torch.is_tensor(want) else got == want, field
        opened = (plans[0][0].death != dla.NONE).sum()
        assert 100 < opened < 900  # segments opened (and, at these capacities, died), not at every token


@pytest.mark.parametrize("T, K, V", [(10, 4, 3), (150, 96, 64), (130, 128, 128)])
def test_the_open_state_update_in_one_launch_matches_pytorch(T, K, V):
    """The planner's step between two chunks (age the open state through the chunk, add its writes from
    the open segment's start on, take the next chunk's products with it) as one Triton launch
    (dla.schedule.triton_terms) and as PyTorch's operations: the same numbers up to the rounding of
    their sums, for open segments starting before, inside and after the chunk, chunks shorter than a
    tile (T = 10) and the last chunk (no next chunk to take products with)."""
    from dla.schedule.dynamic import PLAN_CHUNK, Contributions, WindowTerms

    R = 4
    gen = torch.Generator().manual_seed(T)
    c = Contributions(torch.randn(R, T, K, generator=gen), torch.randn(R, T, V, generator=gen),
                      torch.rand(R, T, generator=gen) + 0.1, -torch.rand(R, T, generator=gen) * 0.2)
    c = Contributions(*(x.to(DEVICE) for x in (c.k, c.v, c.w, c.g)))
    L = min(PLAN_CHUNK, T)
    ref, out = (WindowTerms(c, L, backend=backend) for backend in ("torch", "triton"))
    open_state = torch.randn(R, K, V, generator=gen).to(DEVICE)
    for i in sorted({0, ref.NC - 2, ref.NC - 1} - {-1}):
        open_start = torch.tensor([i * L - 5, i * L, i * L + L // 2, i * L + L], device=DEVICE)
        want, want_carried = ref.advance(i, open_state, open_start)
        got, got_carried = out.advance(i, open_state, open_start)
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-5 * scale, i
        if i + 1 < ref.NC:
            assert (got_carried - want_carried).abs().max() <= 1e-5 * want_carried.abs().max(), i
        else:
            assert want_carried is None and got_carried is None
        # only the tokens from the open segment's start on write; a start before the chunk keeps the decayed state
        fresh = (open_start >= i * L).nonzero().flatten()
        rest = ref.advance(i, torch.zeros_like(open_state), open_start)[0]
        assert torch.equal(want[fresh], rest[fresh])
        assert (want[3] == 0).all() and (got[3] == 0).all()  # a segment starting after the chunk: nothing yet


@pytest.mark.parametrize("K, V", [(5, 3), (128, 64)])
def test_the_per_token_terms_launched_equal_pytorchs(K, V):
    """The state score's per-token terms as Triton launches (one token per program,
    dla.schedule.triton_terms): ``‖s_t‖²`` and the products with the open state equal
    dla.schedule.dynamic's to float32 rounding, for bf16 inputs in the layout of a model's
    ``[N, T, H, ...]`` (values a slice of a wider projection: not contiguous), several heads, widths
    that are no power of two; a window's terms (rows as ``N``, ``H = 1``) are the same numbers."""
    from dla.schedule import triton_terms
    from dla.schedule.dynamic import carried_products, contribution_norms

    N, T, H = 2, 7, 3
    gen = torch.Generator().manual_seed(K)
    k = torch.randn(N, T, H, K, generator=gen).bfloat16().to(DEVICE)
    v = torch.randn(N, T, H, 2 * V, generator=gen).bfloat16().to(DEVICE)[..., :V]
    w = (torch.rand(N, T, H, generator=gen) + 0.1).to(DEVICE)
    O = torch.randn(N * H, K, V, generator=gen).to(DEVICE)
    scale = (torch.rand(N * H, T, generator=gen) + 0.5).to(DEVICE)
    rows = [x.float().transpose(1, 2).reshape(N * H, T, -1) for x in (k, v)]
    w_rows = w.transpose(1, 2).reshape(N * H, T)
    for got, want in [(triton_terms.contribution_norms(k, v, w), contribution_norms(*rows, w_rows)),
                      (triton_terms.contribution_norms(k, v), contribution_norms(*rows)),
                      (triton_terms.open_products(k, v, O, scale), carried_products(scale, *rows, O)),
                      (triton_terms.open_products(k, v, O), carried_products(1.0, *rows, O))]:
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    as_window = [x.float().transpose(1, 2).reshape(N * H, T, 1, -1) for x in (k, v)]
    assert torch.equal(triton_terms.contribution_norms(*as_window, w_rows[..., None]),
                       triton_terms.contribution_norms(k.float(), v.float(), w))
    assert torch.equal(triton_terms.open_products(*as_window, O, scale),
                       triton_terms.open_products(k.float(), v.float(), O, scale))


@pytest.mark.parametrize("score", ["state", "state_drift"])
def test_plans_from_the_launched_products_equal_plans_from_pytorchs(score, monkeypatch):
    """Both walkers plan from the products of either backend; on random inputs (no score within
    rounding of τ) the schedules are the same and the final open states agree to rounding."""
    from dla.schedule import dynamic

    k, v, g, beta = random_inputs(11, 300, H=3, K=32, V=16, dtype=torch.float32)
    cu = torch.tensor([0, 70, 230, 300])
    kw = dict(batch=1, heads=3, length=300, capacity=6, threshold=1.0, score=score, k=k.to(DEVICE), v=v.to(DEVICE),
              g=g.to(DEVICE), beta=beta.to(DEVICE), cu_seqlens=cu.to(DEVICE), keep_trace=True)
    plans = {}
    for terms in ("torch", "triton"):
        monkeypatch.setattr(dynamic, "terms_backend", lambda *args, terms=terms: terms)
        for walker in ("torch", "triton"):
            plans[terms, walker] = dla.plan_schedule("dynamic", backend=walker, **kw)
    ref = plans["torch", "torch"]
    assert (ref.death != dla.NONE).sum() > 50
    for key, plan in plans.items():
        assert torch.equal(plan.death, ref.death), key
        assert torch.equal(plan.final.starts, ref.final.starts), key
        assert (plan.scores - ref.scores).abs().max() < 1e-4, key
        scale = ref.final.open_state.abs().max()
        assert (plan.final.open_state - ref.final.open_state).abs().max() <= 1e-5 * scale, key


@pytest.mark.parametrize("score, merge, capacity, max_len, keep_trace, T, K, V", [
    ("state", "density", 4, None, True, 150, 16, 8), ("state_drift", "least_info", 6, 5, False, 140, 32, 16),
    ("state", "oldest", 3, None, True, 70, 8, 4), ("state", "density", 30, None, False, 140, 128, 64)])
def test_a_window_walked_in_one_launch_plans_what_the_chunk_launches_plan(score, merge, capacity, max_len, keep_trace,
                                                                           T, K, V, monkeypatch):
    """The planner's window in one launch (TritonWalker.walk_window: every chunk's walk and the open
    state's updates between them) against a launch per chunk and per update (the products of the
    launched update, dla.schedule.triton_terms): the same deaths, scores, slots, open states and
    trace bit for bit, over packed sequences, a window continuing another's open state, and the open
    segment's start after every chunk that a checkpointed forward records."""
    from dla.schedule import dynamic, triton_scan
    from dla.schedule.replay import RecordWalks

    monkeypatch.setattr(dynamic, "terms_backend", lambda *args: "triton")
    k, v, g, beta = (x.to(DEVICE) for x in random_inputs(T, T, H=3, K=K, V=V, dtype=torch.float32))
    cu = torch.tensor([0, 40, T - 20, T], device=DEVICE)
    kw = dict(batch=1, heads=3, capacity=capacity, threshold=1.0, score=score, merge=merge, max_segment_len=max_len,
              keep_trace=keep_trace, backend="triton")
    plans = []
    for one_launch in (False, True):
        monkeypatch.setattr(triton_scan.TritonWalker, "walks_windows", one_launch)
        walks = []
        with RecordWalks(walks):
            first = dla.plan_schedule("dynamic", length=T, k=k, v=v, g=g, beta=beta, cu_seqlens=cu, **kw)
            more = dla.plan_schedule("dynamic", length=9, k=k[:, :9], v=v[:, :9], g=g[:, :9], beta=beta[:, :9],
                                     cu_seqlens=torch.tensor([0, 3, 6, 9], device=DEVICE), initial_state=first.final,
                                     **kw)
        plans.append((first, more, walks))
    for launched, one in zip(plans[0][:2], plans[1][:2]):
        assert_same(one, _cpu(launched))
        assert torch.equal(one.final.open_state.cpu(), launched.final.open_state)
    assert (plans[0][0].death != dla.NONE).sum() > 30  # segments opened (and at these capacities died)
    for launched, one in zip(plans[0][2], plans[1][2]):
        assert len(one.open_starts) == len(launched.open_starts) > 0
        assert all(torch.equal(a, b) for a, b in zip(one.open_starts, launched.open_starts))
