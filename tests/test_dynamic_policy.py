"""The paper's ``dynamic`` policy (spec §3): the state information score, density merging and their
options, against a plain-Python reading of the spec; every walker and continuation plans the same."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mixer_helpers import random_inputs

import dla


# ----------------------------------------------------------------------------- the spec, line by line
def rms(x):
    return x / math.sqrt(sum(e * e for e in x) / len(x))


def rms_distance(a, b):
    """‖RMS(a) − RMS(b)‖_F / ‖RMS(b)‖_F, 0 where either vanishes (Eq. 13)."""
    if not any(a) or not any(b):
        return 0.0
    ra, rb = rms_list(a), rms_list(b)
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(ra, rb))) / math.sqrt(sum(y * y for y in rb))


def rms_list(x):
    scale = math.sqrt(sum(e * e for e in x) / len(x))
    return [e / scale for e in x]


def reference_dla(k, v, g, w, capacity, threshold, score="state", merge="density", open_state="decayed",
                  max_segment_len=None, given=None):
    """One sequence-head, plain Python floats. ``k [T][K]``, ``v [T][V]``, ``g``, ``w [T]``; ``given``:
    scores to use instead of the state scores. Returns (death with never = T, the scores used)."""
    T = len(g)
    death, used = [-1] * T, []
    segs = []  # oldest first: [start, information]
    O = None  # the open state, flattened K*V
    for t in range(T):
        s = [w[t] * a * b for a in k[t] for b in v[t]]  # the token's contribution w k vᵀ
        decay = math.exp(g[t]) if open_state == "decayed" else 1.0
        if given is not None:
            info = given[t]
        elif t == 0:
            info = 0.0  # I_0 = 0
        elif score == "state":
            info = rms_distance(s, O)
        else:  # state_drift
            info = rms_distance([decay * o + e for o, e in zip(O, s)], O)
        used.append(info)
        if t == 0:
            segs.append([0, info])
            O = s
            continue
        wants = info >= threshold or (max_segment_len is not None and t - segs[-1][0] >= max_segment_len)
        if capacity > 1 and wants:
            segs.append([t, info])
            death[t] = T
            O = s
        else:
            segs[-1][1] = max(segs[-1][1], info) if merge == "least_info" else segs[-1][1] + info
            O = [decay * o + e for o, e in zip(O, s)]
        if len(segs) > capacity:
            def cost(i):  # pair (i, i + 1), both closed; segment i + 1 ends where i + 2 starts
                if merge == "oldest":
                    return 0.0
                both = segs[i][1] + segs[i + 1][1]
                return both if merge == "least_info" else both / (segs[i + 2][0] - segs[i][0])

            i = min(range(len(segs) - 2), key=lambda i: (cost(i), i))  # ties: the older pair
            death[segs[i + 1][0]] = t
            a, b = segs[i][1], segs[i + 1][1]
            segs[i][1] = max(a, b) if merge == "least_info" else a + b
            del segs[i + 1]
    return death, used


def plan(k, v, g, beta, **kw):
    B, T, H, _ = k.shape
    return dla.plan_schedule("dynamic", batch=B, heads=H, length=T, k=k, v=v, g=g, beta=beta, **kw)


def reference_rows(k, v, g, beta, **kw):
    """The reference per head, ``(death [1, H, T], scores [1, H, T])``."""
    H = k.shape[2]
    deaths, scores = [], []
    for h in range(H):
        w = [1.0] * k.shape[1] if beta is None else beta[0, :, h].tolist()
        d, s = reference_dla(k[0, :, h].tolist(), v[0, :, h].tolist(), g[0, :, h].tolist(), w, **kw)
        deaths.append(d)
        scores.append(s)
    return torch.tensor(deaths)[None], torch.tensor(scores, dtype=torch.float64)[None]


# ----------------------------------------------------------------------------- against the reference
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), T=st.integers(1, 200), capacity=st.integers(1, 32),
       threshold=st.sampled_from([0.0, 0.3, 1.0, 1.3, 1.45, 2.0]), stable=st.booleans(),
       score=st.sampled_from(["state", "state_drift"]), merge=st.sampled_from(["density", "least_info", "oldest"]),
       open_state=st.sampled_from(["decayed", "plain"]), gated=st.booleans(), max_len=st.sampled_from([None, 5]))
def test_state_scores_match_the_spec(seed, T, capacity, threshold, stable, score, merge, open_state, gated, max_len):
    k, v, g, beta = random_inputs(seed, T, stable=stable)
    beta = beta if gated else None
    kw = dict(capacity=capacity, threshold=threshold, score=score, merge=merge, open_state=open_state,
              max_segment_len=max_len)
    s = plan(k, v, g, beta, **kw)
    death, used = reference_rows(k, v, g, beta, **kw)
    assert torch.equal(s.death, death)
    if capacity > 1:  # capacity 1 is the single-state policy: no scores
        assert torch.allclose(s.scores, used, atol=1e-6)


@pytest.mark.parametrize("stable", [False, True])
@pytest.mark.parametrize("capacity", [2, 30])
def test_state_score_long_sequence(stable, capacity):
    """T = 1000 (16 planning chunks), both readings of the merge rule's inputs kept in step."""
    k, v, g, beta = random_inputs(7, 1000, stable=stable)
    kw = dict(capacity=capacity, threshold=1.2 if not stable else 0.5)
    s = plan(k, v, g, beta, **kw)
    death, used = reference_rows(k, v, g, beta, **kw)
    assert (death >= 0).sum() > 10 and torch.equal(s.death, death)
    assert torch.allclose(s.scores, used, atol=1e-6)


def test_scores_are_the_rms_distance_of_eq_13():
    """I_t = sqrt(2 - 2 cos_F(s_t, O_{t-1})) of the contribution against the open state, on a case by hand."""
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).view(1, 3, 1, 2)
    v = torch.tensor([[1.0], [2.0], [1.0]], dtype=torch.float64).view(1, 3, 1, 1)
    g = torch.zeros(1, 3, 1, dtype=torch.float64)
    s = plan(k, v, g, None, capacity=4, threshold=1.0)
    # t = 1: parallel to the open state (I = 0); t = 2: orthogonal (I = sqrt 2), a boundary
    assert torch.allclose(s.scores[0, 0], torch.tensor([0.0, 0.0, math.sqrt(2)], dtype=torch.float64))
    assert s.death[0, 0].tolist() == [-1, -1, 3]
    assert s.final.info[0, 0, :2].tolist() == pytest.approx([math.sqrt(2), 0.0])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(u=st.integers(1, 200).flatmap(lambda T: st.lists(st.integers(0, 8), min_size=T, max_size=T)),
       capacity=st.integers(1, 32), threshold=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
       merge=st.sampled_from(["density", "least_info", "oldest"]), max_len=st.sampled_from([None, 1, 4]))
def test_given_scores_and_ties_match_the_spec(u, capacity, threshold, merge, max_len):
    """Scores on a coarse grid make ties of density common: they go to the older pair."""
    u = [x / 8 for x in u]
    T = len(u)
    scores = torch.tensor(u).view(1, T, 1)
    s = dla.plan_schedule("dynamic", batch=1, heads=1, length=T, capacity=capacity, scores=scores,
                          threshold=threshold, merge=merge, max_segment_len=max_len)
    zeros = [[0.0]] * T
    death, _ = reference_dla(zeros, zeros, [0.0] * T, [1.0] * T, capacity, threshold, merge=merge,
                             max_segment_len=max_len, given=u)
    assert s.death[0, 0].tolist() == death


def test_density_merge_differs_from_least_info():
    """A planted case: the pair of least summed maxima (the oldest: 0.9 + 1.0) is the densest (4.6 / 5),
    and the pair after it holds 2.0 over 5 tokens, so the two rules merge different pairs."""
    u = [0.9, 0.9, 0.9, 0.9, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    T = len(u)
    kw = dict(batch=1, heads=1, length=T, capacity=4, scores=torch.tensor(u).view(1, T, 1), threshold=0.95)
    density = dla.plan_schedule("dynamic", **kw).death[0, 0].tolist()
    least = dla.plan_schedule("dynamic", merge="least_info", **kw).death[0, 0].tolist()
    zeros = [[0.0]] * T
    ref = {m: reference_dla(zeros, zeros, [0.0] * T, [1.0] * T, 4, 0.95, merge=m, given=u)[0]
           for m in ("density", "least_info")}
    assert density == ref["density"] and least == ref["least_info"] and density != least


def test_oldest_merge_differs_from_least_info():
    """A planted case: the newest closed pair holds the least information, so the two rules part."""
    u = [1.0, 0.9, 0.9, 0.1, 0.1, 1.0]  # every token opens a segment (threshold 0.05), capacity 4
    T = len(u)
    kw = dict(batch=1, heads=1, length=T, capacity=4, scores=torch.tensor(u).view(1, T, 1), threshold=0.05)
    least = dla.plan_schedule("dynamic", merge="least_info", **kw).death[0, 0].tolist()
    oldest = dla.plan_schedule("dynamic", merge="oldest", **kw).death[0, 0].tolist()
    zeros = [[0.0]] * T
    ref = {m: reference_dla(zeros, zeros, [0.0] * T, [1.0] * T, 4, 0.05, merge=m, given=u)[0]
           for m in ("least_info", "oldest")}
    assert least == ref["least_info"] and oldest == ref["oldest"]
    assert oldest[1] == 4 and least[1] != 4  # at t = 4 the oldest pair (0, 1) merges: segment 1 dies


# ----------------------------------------------------------------------------- continuation and varlen
@pytest.mark.parametrize("score", ["state", "state_drift", "novelty"])
@pytest.mark.parametrize("T1", [0, 1, 37, 64])
def test_prefill_then_one_token_steps_plan_the_whole_pass(score, T1):
    B, T, H = 2, 100, 2
    k, v, g, beta = (x.expand(B, *x.shape[1:]).clone() for x in random_inputs(3, T, H=H, K=4, V=3))
    k[1] = k[1].flip(0)
    kw = dict(capacity=6, threshold=1.2 if score != "novelty" else 0.5, score=score)
    whole = plan(k, v, g, beta, **kw)
    death = torch.full((B, H, T), -1, dtype=torch.long)
    s = plan(k[:, :T1], v[:, :T1], g[:, :T1], beta[:, :T1], **kw)
    death[..., :T1] = torch.where(s.death >= T1, T, s.death)
    state = s.final
    prev_key = k[:, T1 - 1] if T1 else None
    for t in range(T1, T):
        window = [x[:, t:t + 1] for x in (k, v, g, beta)]
        initial = dla.DLAState(states=torch.zeros(0), segments=state, prev_key=prev_key)
        step = plan(*window, initial_state=initial, **kw)
        death[..., t] = torch.where(step.death[..., 0] >= 1, T, step.death[..., 0])
        b, h, j = (step.carried_death == 0).nonzero(as_tuple=True)
        death[b, h, state.starts[b, h, j]] = t
        state, prev_key = step.final, k[:, t]
    assert torch.equal(death, whole.death)
    assert torch.equal(state.starts, whole.final.starts)
    assert torch.allclose(state.info, whole.final.info)
    if score != "novelty":
        assert torch.allclose(state.open_state, whole.final.open_state)
        assert torch.allclose(state.open_norm, whole.final.open_norm)


def test_open_state_is_the_decayed_open_segment():
    """For Mamba-2 the open state is exactly the open segment's state (spec §3)."""
    k, v, g, _ = random_inputs(5, 90, H=2, K=4, V=3)
    s = plan(k, v, g, None, capacity=8, threshold=1.1)
    start = s.final.starts[0, :, 0]
    for h in range(2):
        a = int(start[h])
        decay = torch.stack([g[0, u + 1:, h].sum() for u in range(a, 90)]).exp()
        O = torch.einsum("u,uk,uv->kv", decay, k[0, a:, h], v[0, a:, h])
        assert torch.allclose(s.final.open_state[0, h], O)
        assert torch.allclose(s.final.open_norm[0, h], O.pow(2).sum())


def test_varlen_restarts_at_every_sequence():
    cu = torch.tensor([0, 17, 17, 80, 150])
    k, v, g, beta = random_inputs(11, 150, H=2, K=4, V=3)
    kw = dict(capacity=5, threshold=1.2)
    packed = dla.plan_schedule("dynamic", batch=1, heads=2, length=150, k=k, v=v, g=g, beta=beta, cu_seqlens=cu, **kw)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            one = plan(k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], **kw)
            assert torch.equal(_local(packed.death[..., a:b], a, b), one.death)
            assert torch.allclose(packed.scores[..., a:b], one.scores)


def _local(death, a, b):
    """Packed death times of one sequence -> its own coordinates (never = its length)."""
    return torch.where(death < 0, death, torch.where(death >= b, b - a, death - a))


# ----------------------------------------------------------------------------- defaults and options
def test_defaults_are_the_papers():
    k, v, g, _ = random_inputs(1, 50, H=2)
    s = plan(k, v, g, None)
    assert s.capacity == 30
    explicit = plan(k, v, g, None, capacity=30, score="state", merge="density", open_state="decayed", threshold=1.0)
    assert torch.equal(s.death, explicit.death)
    assert dla.schedule.DEFAULT_CAPACITY == 30


def test_per_head_threshold():
    k, v, g, _ = random_inputs(2, 80, H=2)
    both = plan(k, v, g, None, capacity=8, threshold=torch.tensor([0.0, 2.0]))
    assert (both.death[0, 0, 1:] != -1).all()  # τ = 0: every token opens a segment
    assert (both.death[0, 1] == -1).all()  # τ = 2: none does


@pytest.mark.parametrize("kwargs, match", [
    (dict(score="entropy"), "score must be one of"),
    (dict(merge="smallest"), "merge must be one of"),
    (dict(open_state="fresh"), "open_state must be one of"),
    (dict(threshold=2.5), r"threshold must be a number in \[0, 2\]"),
    (dict(threshold=torch.zeros(3)), "threshold must be a number or a"),
    (dict(k=None), "need k"),
    (dict(g=None), "needs the log-decay g"),
    (dict(v=torch.randn(1, 9, 2, 2)), "v must be"),
    (dict(k=[[0.0]]), "k must be a torch.Tensor"),
    (dict(label_rule="levels"), "label_rule must be None or one of"),
    (dict(score="external"), "needs scores"),
    (dict(v=torch.full((1, 8, 2, 2), float("nan"))), "v contains NaN or Inf"),
    (dict(threshold=torch.tensor([0.5, float("nan")])), "threshold contains NaN"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    k, v, g, _ = random_inputs(1, 8, H=2)
    base = dict(k=k, v=v, g=g)
    base.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        dla.plan_schedule("dynamic", batch=1, heads=2, length=8, **base)
