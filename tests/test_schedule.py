"""Schedules: closed forms, invariants under random scores, continuation, and the validator (the
``dynamic`` policy against a plain-Python reading of the spec: ``test_dynamic_policy.py``)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dla
from dla.schedule.schedule import live_boundary_count


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 4096), capacity=st.integers(1, 32),
       threshold=st.floats(0, 1), policy=st.sampled_from(["dynamic", "fixed", "fenwick"]))
def test_schedule_invariants(seed, T, capacity, threshold, policy):
    gen = torch.Generator().manual_seed(seed)
    B, H = 2, 3
    scores = torch.rand(B, T, H, generator=gen)
    kw = dict(batch=B, heads=H, length=T, scores=scores, threshold=threshold, period=1 + seed % 7,
              capacity=None if policy == "fenwick" else capacity)
    s = dla.plan_schedule(policy, **kw)
    dense = s.dense()
    # capacity never exceeded (the validator checks it too; assert the number here)
    assert int(live_boundary_count(dense).max()) <= s.capacity - 1
    # the planner skips validation; its output passes every check of the validator
    checked = dla.Schedule(s.death, s.capacity, s.label_rule)
    assert torch.equal(checked.dense().start_death, dense.start_death)
    # identical whether the batch is planned at once or one sequence (and head) at a time
    one = dla.plan_schedule(policy, **{**kw, "batch": 1, "heads": 1, "scores": scores[1:2, :, 2:3]})
    assert torch.equal(one.death[0, 0], s.death[1, 2])
    death = s.death[1, 2].tolist()
    p = torch.arange(T)
    if policy == "dynamic":
        # the open segment is never merged: when a boundary dies, a newer boundary is live
        for q, d in enumerate(death):
            if 0 <= d < T:
                assert any(death[r] != -1 and q < r <= d and death[r] > d for r in range(q + 1, d + 1))
    # merges happen only on overflow: at a birth into a full cache, one pair at a time (fenwick:
    # binary-counter carries, also only at births)
    d = s.death[1, 2]
    dead = d[(d >= 0) & (d < T)]
    deaths_at = torch.bincount(dead, minlength=T)
    live = live_boundary_count(dense)[1, 2]
    for t in deaths_at.nonzero().flatten().tolist():
        assert d[t] != -1
        if policy != "fenwick":
            assert deaths_at[t] == 1 and live[t - 1] == s.capacity - 1
    assert ((d == -1) | (d > p)).all()


def test_fenwick_closed_form():
    s = dla.plan_schedule("fenwick", batch=1, heads=1, length=300)
    p = torch.arange(300)
    expect = torch.where(p > 0, p + (p & -p), -1)
    expect = torch.where(expect >= 300, 300, expect)
    assert torch.equal(s.death[0, 0], expect)


def test_fixed_merges_the_two_oldest():
    s = dla.plan_schedule("fixed", batch=1, heads=1, length=40, capacity=3, period=4)
    death = s.death[0, 0].tolist()
    boundaries = [p for p in range(40) if death[p] != -1]
    assert boundaries == list(range(4, 40, 4))
    for i, p in enumerate(boundaries):  # boundary i dies when boundary i + C - 1 is born
        later = i + 2
        assert death[p] == (boundaries[later] if later < len(boundaries) else 40)


def test_max_segment_len_forces_boundaries():
    scores = torch.zeros(1, 50, 1)
    s = dla.plan_schedule("dynamic", batch=1, heads=1, length=50, capacity=64, scores=scores, threshold=1.0,
                          max_segment_len=7)
    assert (s.death[0, 0] != -1).nonzero().flatten().tolist() == list(range(7, 50, 7))


@pytest.mark.parametrize("policy", ["single", "fixed", "fenwick", "dynamic"])
@pytest.mark.parametrize("T1", [0, 1, 13, 64])
def test_online_continuation_gives_identical_deaths(policy, T1):
    """Planning a whole sequence == planning a prefix, then advancing one token at a time."""
    B, T, H = 2, 90, 2
    k = torch.randn(B, T, H, 8)
    scores = dla.novelty_scores(k)
    cu = None
    kw = dict(batch=B, heads=H, capacity=None if policy == "fenwick" else 5, period=4, threshold=0.5)
    whole = dla.plan_schedule(policy, length=T, scores=scores, **kw)
    kw["capacity"] = whole.capacity
    death = torch.full((B, H, T), -1, dtype=torch.long)
    s = dla.plan_schedule(policy, length=T1, scores=scores[:, :T1], **kw, cu_seqlens=cu)
    death[..., :T1] = torch.where(s.death >= T1, T, s.death)
    state = s.final
    for t in range(T1, T):
        prev_key = k[:, t - 1] if t > 0 else None
        u = dla.novelty_scores(k[:, t:t + 1], prev_key=prev_key) if policy == "dynamic" else None
        step = dla.plan_schedule(policy, length=1, scores=u, initial_state=state, **kw)
        # a continued window passes the validator's checks of its carried segments too
        dla.Schedule(step.death, step.capacity, step.label_rule, initial=step.initial, carried_death=step.carried_death)
        death[..., t] = torch.where(step.death[..., 0] >= 1, T, step.death[..., 0])
        dies = step.carried_death == 0
        b, h, j = dies.nonzero(as_tuple=True)
        death[b, h, state.starts[b, h, j]] = t
        state = step.final
    assert torch.equal(death, whole.death)
    assert torch.equal(state.starts, whole.final.starts)
    if policy == "dynamic":
        assert torch.allclose(state.info, whole.final.info)


def test_final_segments_match_derivation():
    k = torch.randn(1, 200, 2, 4)
    s = dla.plan_schedule("dynamic", batch=1, heads=2, length=200, capacity=6, scores=dla.novelty_scores(k))
    derived = dla.Schedule(s.death, s.capacity)  # final segments derived from death alone
    assert torch.equal(derived.final.starts, s.final.starts)
    assert (s.final.count == 6).all()
    assert (s.final.open_length >= 1).all()


def test_pairwise_structure_small_example():
    # T = 8, boundaries at 3 (dies at 6) and 5 (never): segments [0,3) [3,5) [5,..]
    death = torch.tensor([[[-1, -1, -1, 6, -1, 5 + 3, -1, -1]]])
    death[0, 0, 5] = 8
    s = dla.Schedule(death, capacity=3, label_rule="level")
    pw = s.pairwise()
    rank, start, end, label = (pw[n][0, 0] for n in ("rank", "start", "end", "label"))
    assert rank[5].tolist() == [2, 2, 2, 1, 1, 0, -1, -1]
    assert start[5].tolist() == [0, 0, 0, 3, 3, 5, -1, -1]
    assert end[5].tolist() == [2, 2, 2, 4, 4, 5, -1, -1]
    assert rank[6].tolist() == [1, 1, 1, 1, 1, 0, 0, -1]  # 3 died at 6: [0,5) merged
    assert label[6].tolist() == [3, 3, 3, 3, 3, 0, 0, -1]  # size 5 -> bit_length 3
    assert s.live_at(4)[0, 0].nonzero().flatten().tolist() == [3]


def test_novelty_scores():
    k = torch.randn(2, 10, 3, 4)
    u = dla.novelty_scores(k)
    assert u.shape == (2, 10, 3)
    assert (u[:, 0] == 1).all()
    cos = torch.nn.functional.cosine_similarity(k[:, 5], k[:, 4], dim=-1)
    assert torch.allclose(u[:, 5], (1 - cos) / 2, atol=1e-6)
    repeated = k.clone()
    repeated[:, 6] = 3 * repeated[:, 5]
    assert torch.allclose(dla.novelty_scores(repeated)[:, 6], torch.zeros(2, 3), atol=1e-6)
    cu = torch.tensor([0, 4, 10])
    packed = dla.novelty_scores(k[:1], cu_seqlens=cu)
    assert (packed[0, [0, 4]] == 1).all() and torch.allclose(packed[0, 5:], u[:1, 5:].squeeze(0))


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("death, capacity, match", [
    ([[[-1, 1, -1, -1]]], 2, "must be -1 .* or > its birth"),
    ([[[-1, 3, 4, -1]]], 2, "capacity 2 exceeded at time 2"),
    ([[[4, -1, -1, -1]]], 2, "position 0 of sequence 0"),
    ([[[-1, 5, 6, 7]]], 2, "capacity 2 exceeded"),
])
def test_validator_rejects_malformed(death, capacity, match):
    with pytest.raises(ValueError, match=match):
        dla.Schedule(torch.tensor(death), capacity=capacity)


def test_validator_rejects_cross_sequence_death_and_bad_args():
    cu = torch.tensor([0, 3, 6])
    with pytest.raises(ValueError, match="later sequence"):
        dla.Schedule(torch.tensor([[[-1, 4, -1, -1, -1, -1]]]), capacity=4, cu_seqlens=cu)
    with pytest.raises(ValueError, match="position 0 of sequence 1"):
        dla.Schedule(torch.tensor([[[-1, -1, -1, 6, -1, -1]]]), capacity=4, cu_seqlens=cu)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        dla.Schedule(torch.full((1, 1, 3), -1), capacity=0)
    with pytest.raises(ValueError, match="label_rule"):
        dla.Schedule(torch.full((1, 1, 3), -1), capacity=2, label_rule="lru")
    with pytest.raises(TypeError, match="LongTensor"):
        dla.Schedule(torch.full((1, 1, 3), -1.0), capacity=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(policy="sliding"), "policy must be one of"),
    (dict(capacity=0), "capacity must be >= 1"),
    (dict(threshold=1.5), "threshold must be a number in"),
    (dict(threshold=2.5, score="state"), "threshold must be a number in"),
    (dict(threshold=-0.1), "threshold must be a number in"),
    (dict(scores=None, score="external"), "needs scores"),
    (dict(scores=torch.rand(1, 5, 2)), "scores must be"),
    (dict(scores=torch.full((2, 8, 3), 2.0)), "scores must be finite and in"),
    (dict(scores=torch.full((2, 8, 3), float("nan"))), "scores must be finite and in"),
    (dict(max_segment_len=0), "max_segment_len must be >= 1"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 8])), "cu_seqlens"),
    (dict(policy="fixed", period=None), "needs period"),
    (dict(policy="fenwick", capacity=3), "fenwick needs capacity >= 4"),
])
def test_plan_schedule_rejects_bad_arguments(kwargs, match):
    base = dict(policy="dynamic", batch=2, heads=3, length=8, capacity=4, scores=torch.rand(2, 8, 3))
    base.update(kwargs)
    if "cu_seqlens" in kwargs:
        base.update(batch=1, scores=torch.rand(1, 8, 3))
    policy = base.pop("policy")
    with pytest.raises((ValueError, TypeError), match=match):
        dla.plan_schedule(policy, **base)


def test_novelty_prev_key_continues_sequences_and_skips_empty_ones():
    k = torch.randn(1, 5, 3, 4)
    prev = torch.randn(3, 3, 4)
    u = dla.novelty_scores(k, cu_seqlens=torch.tensor([0, 2, 5, 5]), prev_key=prev)
    cos = torch.nn.functional.cosine_similarity
    assert torch.allclose(u[0, 0], (1 - cos(k[0, 0], prev[0], dim=-1)) / 2, atol=1e-6)
    assert torch.allclose(u[0, 2], (1 - cos(k[0, 2], prev[1], dim=-1)) / 2, atol=1e-6)
    assert torch.allclose(u[0, 4], (1 - cos(k[0, 4], k[0, 3], dim=-1)) / 2, atol=1e-6)
