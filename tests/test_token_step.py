"""The one-token decoding step (``dla.schedule.token.plan_token`` + ``dla.ops.recurrent_step``, run by
``DLAMixer.step`` for unchecked steps) against the general path (``plan_schedule`` -> ``Schedule`` ->
``recurrent_dla``), token by token: the same routing, labels, scores and segmentation, and through
whole models the same logits and cache tensors, bit for bit."""

import pytest
import torch
from conftest import counted
from mixer_helpers import random_inputs
from test_generation import DLA_CASES, left_padded, tiny_model

import dla
from dla import generation
from dla.layers import common
from dla.ops.common import source_ranges
from dla.ops.recurrent import route_step
from dla.schedule.schedule import NONE, slot_labels
from dla.schedule.token import plan_token

STEPS = 100


def slot_lambda(lam, label, starts):
    """λ of every slot by its label from the token's ``lam [N, 1, H, labels]`` (None: 1), 0 where empty."""
    filled = starts >= 0
    return filled.float() if lam is None else torch.where(filled, lam[:, 0].gather(-1, label), 0.0)
PLANS = {
    "single": dict(policy="single"),
    "single-3": dict(policy="single", capacity=3),  # the closed form without boundaries, past one slot
    "capacity-1": dict(policy="dynamic", capacity=1),
    "fixed": dict(policy="fixed", capacity=4, period=5),
    "fixed-2-level": dict(policy="fixed", capacity=2, period=3, label_rule="level"),
    "fenwick": dict(policy="fenwick", capacity=9),
    "dynamic": dict(policy="dynamic", capacity=4, threshold=1.0),
    "dynamic-2": dict(policy="dynamic", capacity=2, threshold=1.0),
    "dynamic-30": dict(policy="dynamic", capacity=30, threshold=0.1),
    "dynamic-drift-plain": dict(policy="dynamic", capacity=4, score="state_drift", open_state="plain",
                                max_segment_len=6, threshold=1.0),
    "dynamic-least-info-level": dict(policy="dynamic", capacity=5, merge="least_info", threshold=1.0,
                                     label_rule="level"),
    "dynamic-oldest": dict(policy="dynamic", capacity=3, merge="oldest", threshold=1.0),
    "dynamic-novelty": dict(policy="dynamic", capacity=4, score="novelty", merge="least_info", threshold=0.3),
    "dynamic-external": dict(policy="dynamic", capacity=4, score="external", threshold=0.5, max_segment_len=5),
}
OPTIONS = ("score", "merge", "open_state", "period", "max_segment_len", "label_rule", "threshold")


def sequences(lengths, H, dtype, seed):
    """Contributions of sequences of ``lengths`` tokens, ``[N, T, H, ...]`` each: piecewise stable, so
    that the state scores both open segments and extend them."""
    T = max(lengths)
    rows = [random_inputs(seed + n, T, H=H, K=4, V=3, stable=True, dtype=dtype) for n in range(len(lengths))]
    return [torch.cat(x) for x in zip(*rows)]


def general_token(policy, kw, state, k, v, g, beta, scores, backend):
    """The general planner on a one-token window, and the op's routing of it: ``(schedule, dest, label, starts)``."""
    N, _, H = k.shape[:3]
    schedule = dla.plan_schedule(policy, batch=N, heads=H, length=1, k=k, v=v, g=g, beta=beta, scores=scores,
                                 initial_state=state, backend=backend, validate=False,
                                 **{name: kw[name] for name in OPTIONS if name in kw})
    dense = schedule.dense()
    dest, slot_pos, slot_death = route_step(dense.carried_pos, dense.carried_death, dense.start_death[:, :, 0], 0)
    label = slot_labels(slot_pos, slot_death != NONE, 1, dense.label_rule)
    starts = torch.where(slot_death != NONE, slot_pos + dense.position[:, None, None], NONE)
    return schedule, dest, label, starts


@pytest.mark.parametrize("delta", [False, True], ids=["mamba2", "gated_deltanet"])
@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_planned_token_equals_the_general_planner(name, delta, dtype):
    """Sequences at different positions (a packed prompt of 7, 1 and 12 tokens), then 100 tokens
    each: every step's routing, labels, scores and segmentation equal the general planner's."""
    kw = PLANS[name]
    policy, H = kw["policy"], 2
    lengths = (7, 1, 12)
    k, v, g, beta_all = sequences([n + STEPS for n in lengths], H, dtype, seed=10 * len(name) + delta)
    beta = beta_all if delta else None
    # given scores in quarters: equal densities, so the merge's tie rule decides
    external = torch.randint(0, 5, k.shape[:3], generator=torch.Generator().manual_seed(1)).to(dtype) / 4
    scores = external if kw.get("score") == "external" else None
    cu = torch.tensor([0, 7, 8, 20])
    prompt = [torch.cat([x[n, :m] for n, m in enumerate(lengths)])[None] for x in (k, v, g, external, beta_all)]
    first = dla.plan_schedule(policy, batch=1, heads=H, length=20, k=prompt[0], v=prompt[1], g=prompt[2],
                              beta=None if beta is None else prompt[4],
                              scores=prompt[3] if scores is not None else None, cu_seqlens=cu,
                              capacity=kw.get("capacity"), backend="torch",
                              **{name: kw[name] for name in OPTIONS if name in kw})
    state = dla.DLAState(states=torch.zeros(0), segments=first.final,
                         prev_key=torch.stack([k[n, m - 1] for n, m in enumerate(lengths)]).to(dtype))
    merges = births = 0
    lam_all = torch.rand(3, STEPS, H, 64, generator=torch.Generator().manual_seed(2), dtype=dtype) + 0.1
    for step in range(STEPS):
        lam = lam_all[:, step:step + 1] if step % 2 else None  # None: λ ≡ 1
        at = torch.tensor(lengths) + step
        token = [x[torch.arange(3), at][:, None] for x in (k, v, g)]
        b = None if beta is None else beta[torch.arange(3), at][:, None]
        s = None if scores is None else external[torch.arange(3), at][:, None]
        schedule, dest, label, starts = general_token(policy, kw, state, *token, b, s, "torch")
        plan = plan_token(policy, state, threshold=kw.get("threshold"), score=kw.get("score", "state"),
                          merge=kw.get("merge", "density"), open_state=kw.get("open_state", "decayed"),
                          k=token[0], v=token[1], g=token[2], beta=b, scores=s, period=kw.get("period"),
                          max_segment_len=kw.get("max_segment_len"), label_rule=schedule.label_rule, lam=lam)
        assert torch.equal(plan.dest, dest), f"step {step}"
        assert torch.equal(plan.label, label), f"step {step}"
        assert torch.equal(plan.lam, slot_lambda(lam, label, starts)), f"step {step}"
        # the routing as the decode kernel reads it, where the plan gives it (one slot: always)
        assert plan.ranges is not None or starts.shape[-1] > 1
        assert plan.ranges is None or all(torch.equal(a, b) for a, b in zip(plan.ranges, source_ranges(dest)))
        assert torch.equal(plan.segments.starts, starts)
        final = schedule.final
        for field in ("info", "position", "open_state", "open_norm"):
            ours, theirs = getattr(plan.segments, field), getattr(final, field)
            assert (ours is None) == (theirs is None), field
            assert ours is None or (ours.dtype == theirs.dtype and torch.equal(ours, theirs)), f"{field}, step {step}"
        if schedule.scores is None:
            assert plan.scores is None
        else:
            assert torch.equal(plan.scores, schedule.scores[:, :, 0])
        merges += int((dest[..., 1:] == dest[..., :-1]).logical_and(dest[..., 1:] < dest.shape[-1]).sum())
        births += int((starts[..., 0] == at[:, None]).sum())
        state = dla.DLAState(states=state.states, segments=plan.segments, prev_key=token[0][:, 0])
    single = policy == "single" or kw.get("capacity") == 1
    assert births == 0 if single else births > 0
    if not single:
        assert merges > 0  # overflow happened
        assert births < STEPS * 3 * H or policy == "fenwick"  # and so did tokens that extend the open segment


STATE_PLANS = [name for name, kw in PLANS.items() if kw["policy"] == "dynamic" and kw.get("capacity", 2) > 1
               and kw.get("score", "state").startswith("state")]


@pytest.mark.parametrize("delta", [False, True], ids=["mamba2", "gated_deltanet"])
@pytest.mark.parametrize("name", STATE_PLANS)
def test_the_fused_token_plan_repeats_the_float32_walk_of_the_gpu(name, delta, monkeypatch):
    """``backend="triton"`` (the default on CUDA) plans a state-scored token with one Triton program
    per sequence-head (:mod:`dla.schedule.triton_token`; Triton's interpreter on CPU): from the first
    token of two sequences on, every plan equals the general planner's Triton walk bit for bit, with
    births and, at small capacities, merges, its open state written over the old one. On a GPU the
    inputs are bfloat16, as in a model. Both take the score's terms (the token's norm and its product
    with the open state) from the launched kernels of dla.schedule.triton_terms, as on a GPU."""
    pytest.importorskip("triton", reason="triton is not installed")
    from dla.schedule import dynamic, token, triton_terms, triton_token

    fused, terms = [], []
    monkeypatch.setattr(triton_token, "_token_plan_kernel", counted(triton_token._token_plan_kernel, fused))
    monkeypatch.setattr(triton_terms, "_token_terms_kernel", counted(triton_terms._token_terms_kernel, terms))
    for module in (dynamic, token):
        monkeypatch.setattr(module, "terms_backend", lambda *args: "triton")
    kw = PLANS[name]
    H, steps = 2, 30
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float64
    rows = [random_inputs(3 + delta + n, steps, H=H, K=4, V=3) for n in range(2)]  # scores on both sides of τ
    k, v, g, beta = (torch.cat(x).to(device, dtype) for x in zip(*rows))
    beta = beta if delta else None
    state = dla.SegmentState.empty(2, H, kw["capacity"], device=device)
    lam_all = torch.rand(2, steps, H, 64, generator=torch.Generator().manual_seed(3)).to(device, dtype) + 0.1
    births = merges = 0
    for step in range(steps):
        lam = lam_all[:, step:step + 1] if step % 2 else None  # None: λ ≡ 1
        token = [x[:, step:step + 1] for x in (k, v, g)]
        b = None if beta is None else beta[:, step:step + 1]
        schedule, dest, label, starts = general_token("dynamic", kw, state, *token, b, None, "triton")
        launched = len(terms)
        plan = plan_token("dynamic", state, threshold=kw["threshold"], score=kw.get("score", "state"),
                          merge=kw.get("merge", "density"), open_state=kw.get("open_state", "decayed"),
                          k=token[0], v=token[1], g=token[2], beta=b,
                          max_segment_len=kw.get("max_segment_len"), label_rule=schedule.label_rule,
                          lam=lam, backend="triton", inplace=True)
        assert len(terms) - launched == 2  # the token's norm and its product with the open state
        if state.open_state is not None:  # the new open state overwrote the old
            assert plan.segments.open_state.data_ptr() == state.open_state.data_ptr()
        assert torch.equal(plan.dest, dest) and torch.equal(plan.label, label), f"step {step}"
        assert plan.lam.dtype == (torch.float32 if lam is None else dtype)
        assert torch.equal(plan.lam, slot_lambda(lam, label, starts)), f"step {step}"
        assert all(torch.equal(a, b) for a, b in zip(plan.ranges, source_ranges(dest))), f"step {step}"
        assert torch.equal(plan.segments.starts, starts), f"step {step}"
        assert torch.equal(plan.segments.position, schedule.final.position.long())
        for field in ("info", "open_state", "open_norm"):
            assert torch.equal(getattr(plan.segments, field), getattr(schedule.final, field)), f"{field}, step {step}"
        assert torch.equal(plan.scores, schedule.scores[:, :, 0]), f"step {step}"
        births += int((starts[..., 0] == step).sum())
        merges += int((dest[..., 1:] == dest[..., :-1]).logical_and(dest[..., 1:] < dest.shape[-1]).sum())
        state = plan.segments
    assert len(fused) == steps
    assert births > 2 * H and (births < steps * 2 * H or kw["threshold"] < 0.5)  # tokens open and extend segments
    assert merges > 0 or kw["capacity"] > 8


MODEL_CASES = DLA_CASES + [
    ("mamba2", "dynamic", dict(capacity=1)),
    ("gated_deltanet", "dynamic", dict(capacity=2, threshold=0.2)),
    ("mamba2", "dynamic", dict(capacity=30, threshold=0.1)),
    ("gated_deltanet", "fixed", dict(capacity=2, period=2)),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: "-".join(str(x) for x in (c[:2] if len(c) == 2 else
                                                                                      c[:2] + tuple(c[2].values()))))
def test_the_decoding_step_equals_the_general_path_for_100_tokens(case, monkeypatch):
    """Random models, a batch of three left-padded prompts (sequences at different positions), then
    100 tokens: unchecked steps (the one-token path) give the logits and every cache tensor of
    checked ones (the general path) exactly."""
    mixer, policy, overrides = (*case, {})[:3]
    model = tiny_model(mixer, policy, **overrides)
    planned = []
    monkeypatch.setattr(common, "plan_token", lambda *a, **kw: planned.append(1) or plan_token(*a, **kw))
    ids, mask = left_padded((9, 4, 7))
    caches = [dla.DLACache(model.config) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            token = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1].argmax(-1)
        assert not planned
        overflows = 0
        for step in range(STEPS):
            full = [layer.state.segments.starts.min(-1).values >= 0 for layer in caches[1].layers]
            position = caches[1].layers[0].state.segments.position[:, None]
            general, fast = (model(token[:, None], cache=cache, validate=validate).logits
                             for cache, validate in zip(caches, (True, False)))
            overflows += sum(int((was & (layer.state.segments.starts[..., 0] == position)).sum())
                             for was, layer in zip(full, caches[1].layers))
            assert torch.equal(general, fast), f"step {step}"
            held = [[(key, v) for _, key, v in generation.cache_entries(c) if isinstance(v, torch.Tensor)]
                    for c in caches]
            assert len(held[0]) == len(held[1])
            for (key, a), (_, b) in zip(*held):
                assert a.dtype == b.dtype and torch.equal(a, b), f"{key}, step {step}"
            # sample, so that the tokens (and the segments) vary
            sampler = torch.Generator().manual_seed(step)
            token = torch.multinomial(general[:, -1].softmax(-1), 1, generator=sampler)[:, 0]
    assert len(planned) == STEPS * model.config.num_hidden_layers
    # fenwick's capacity holds every position (its merges are the carries, tested above)
    assert overflows > 0 or policy in ("single", "fenwick") or overrides.get("capacity") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the decode kernel in Triton's interpreter on CPU tensors; "
                    "on a GPU, test_one_token_steps_on_gpu_equal_the_general_path checks the same")
@pytest.mark.parametrize("mixer, policy", [("mamba2", "dynamic"), ("gated_deltanet", "dynamic"), ("mamba2", "fenwick")])
def test_the_decode_kernel_reads_a_steps_raw_inputs_as_the_general_path_reads_prepared_ones(mixer, policy,
                                                                                             monkeypatch):
    """With the decode kernel (Triton's interpreter on CPU) on both paths, the one-token step hands it
    the token's q, k, v, g, β and λ as they are (read as float32, q scaled as it is read) and has it
    update the cache's states in place (fenwick's carries too: every slot keeps its place), where the
    general path converts and scales them first and writes new states: bfloat16 logits and caches
    equal for 20 tokens."""
    pytest.importorskip("triton", reason="triton is not installed")
    from dla.ops import recurrent
    from dla.ops.triton.decode import decode_step

    monkeypatch.setattr(recurrent, "_step_function", lambda backend, one_token, on_cuda, delta: decode_step)
    model = tiny_model(mixer, policy).to(torch.bfloat16)
    ids, mask = left_padded((9, 4, 7))
    caches = [dla.DLACache(model.config) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            token = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1].argmax(-1)
        # the tensors themselves, kept alive, so that an out-of-place step cannot be handed their memory
        owned = [layer.state.states for layer in caches[1].layers]
        for step in range(20):
            general, fast = (model(token[:, None], cache=cache, validate=validate).logits
                             for cache, validate in zip(caches, (True, False)))
            assert general.dtype == torch.bfloat16 and torch.equal(general, fast), f"step {step}"
            # the kernel wrote the new states over the cache's own
            in_place = [layer.state.states.data_ptr() == old.data_ptr() for layer, old in zip(caches[1].layers, owned)]
            assert all(in_place), f"step {step}"
            for (key, a), (_, b) in zip(*[[(key, v) for _, key, v in generation.cache_entries(c)
                                           if isinstance(v, torch.Tensor)] for c in caches]):
                assert a.dtype == b.dtype and torch.equal(a, b), f"{key}, step {step}"
            token = general[:, -1].argmax(-1)
