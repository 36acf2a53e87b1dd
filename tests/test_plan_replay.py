"""Activation checkpointing plans the ``dynamic`` schedule once per step: the recomputed forward replays
the first pass's walks (``dla.schedule.replay``), with the loss and gradients, bit for bit, of the model
without checkpointing and of checkpointing that plans again."""

import functools
import warnings

import pytest
import torch
from mixer_helpers import one_thread, random_inputs  # noqa: F401 (one_thread is an autouse fixture)
from test_models import tiny_model
from torch.utils.checkpoint import checkpoint

import dla
from dla.schedule import NEVER, dynamic
from dla.schedule.replay import walk_replay_contexts, with_walk_replay
from dla.schedule.soft_gate import differentiable_scores
from dla.train.distributed import enable_activation_checkpointing

BASES = ("mamba2", "gated_deltanet")
THRESHOLD = {"mamba2": 0.4, "gated_deltanet": 1.4}  # τ where the tiny models open some segments, not all
LAYERS = 2


@pytest.fixture
def walkers(monkeypatch):
    """The PyTorch walkers that walk, in the order they were made."""
    made = []

    class CountingWalker(dynamic.TorchWalker):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(dynamic, "TorchWalker", CountingWalker)
    return made


def model_with(mixer, how, seed=0, **overrides):
    """The tiny float64 model in training: ``how`` is ``off`` (no checkpointing), ``replay`` (the
    model's checkpointing, which replays the walks) or ``again`` (non-reentrant checkpointing that
    plans again in the recomputation)."""
    torch.manual_seed(seed)
    model = tiny_model(mixer, threshold=THRESHOLD[mixer], **overrides).double().train()
    if how != "off":
        enable_activation_checkpointing(model)
    if how == "again":
        for block in model.model.layers:
            block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    return model


def step(model, batches, backwards=1):
    """Loss and gradients of one step on the summed losses of ``batches`` (``(ids, cu_seqlens)`` pairs,
    one forward each); ``backwards`` > 1: backward again through the retained graph."""
    model.zero_grad()
    loss = sum(model(ids, cu_seqlens=cu, labels=ids).loss for ids, cu in batches)
    for i in range(backwards):
        loss.backward(retain_graph=i + 1 < backwards)
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_step(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


def batch(packed: bool, seed=0):
    """Two sequences of odd lengths, up to three planning chunks (64 tokens) long."""
    gen = torch.Generator().manual_seed(seed)
    if packed:
        return torch.randint(1, 64, (1, 170), generator=gen), torch.tensor([0, 131, 170])
    return torch.randint(1, 64, (2, 135), generator=gen), None


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("soft_gate", [True, False])
@pytest.mark.parametrize("mixer", BASES)
def test_replayed_walks_give_the_loss_and_gradients_of_planning_again(mixer, soft_gate, packed, walkers,
                                                                      monkeypatch):
    ids, cu = batch(packed)
    steps = {}
    term_windows = []  # the walk's chunk terms (pairwise products): computed only where a walk decides
    pair_products = dynamic.pair_products
    monkeypatch.setattr(dynamic, "pair_products", lambda *a: term_windows.append(1) or pair_products(*a))
    for how, walks in (("off", LAYERS), ("replay", LAYERS), ("again", 2 * LAYERS)):
        walkers.clear()
        term_windows.clear()
        steps[how] = step(model_with(mixer, how, soft_gate=soft_gate), [(ids, cu)])
        assert len(walkers) == walks, how  # with replay, each layer walks once per step
        assert len(term_windows) == walks, how
        if how == "off":
            for w in walkers:  # schedules with births, merges and tokens that open nothing
                born = w.death >= 0
                assert born.any() and (born & (w.death < NEVER)).any() and not born[:, 1:].all()
    assert_same_step(steps["replay"], steps["off"])
    assert_same_step(steps["again"], steps["off"])
    threshold_grads = [g for name, g in steps["off"][1].items() if name.endswith("mixer.threshold")]
    assert len(threshold_grads) == (LAYERS if soft_gate else 0)
    assert all(g.abs().sum() > 0 for g in threshold_grads)  # the soft gates reach τ


@pytest.mark.parametrize("mixer", BASES)
def test_each_checkpointed_call_replays_its_own_walks(mixer, walkers):
    """A block used twice in one forward, two forwards before one backward, two steps in a row and a
    second backward through the retained graph: every recomputation replays its own call's walk."""
    packed, dense = batch(packed=True), batch(packed=False, seed=1)
    steps = {}
    for how in ("off", "replay"):
        model = model_with(mixer, how)
        model.model.layers[1] = model.model.layers[0]  # the same block twice: other inputs, other schedules
        walkers.clear()
        steps[how] = [step(model, [packed])]
        assert len(walkers) == LAYERS and not torch.equal(walkers[0].death, walkers[1].death)
        walkers.clear()
        steps[how] += [step(model, [packed, dense]), step(model, [dense]), step(model, [dense], backwards=2)]
        assert len(walkers) == 4 * LAYERS
    for replayed, planned in zip(steps["replay"], steps["off"]):
        assert_same_step(replayed, planned)


def test_forwards_without_a_backward_plan_as_before(walkers):
    """Evaluation, and a training-mode forward without gradients, do not checkpoint: they plan once,
    keep nothing, and leave planning outside the model as it was."""
    ids, cu = batch(packed=True)
    plain, checkpointed = model_with("gated_deltanet", "off"), model_with("gated_deltanet", "replay")
    for train in (False, True):
        plain.train(train)
        checkpointed.train(train)
        with torch.no_grad():
            walkers.clear()
            want = plain(ids, cu_seqlens=cu).logits
            got = checkpointed(ids, cu_seqlens=cu).logits
            assert len(walkers) == 2 * LAYERS and torch.equal(got, want)
    k, v, g, beta = random_inputs(0, 40, H=2)
    walkers.clear()
    dla.plan_schedule("dynamic", batch=1, heads=2, length=40, capacity=4, threshold=0.5, k=k, v=v, g=g, beta=beta)
    assert len(walkers) == 1


def test_every_checkpointing_switch_replays_the_walks(walkers):
    """Hugging Face's switches and the config flag replay; reentrant checkpointing (no ``context_fn``)
    plans again, with the same gradients."""
    packed = batch(packed=True)
    want = step(model_with("mamba2", "off"), [packed])
    switches = {
        "enable": enable_activation_checkpointing,
        "gradient_checkpointing_enable": lambda m: m.gradient_checkpointing_enable(),
        "non-reentrant": lambda m: m.gradient_checkpointing_enable({"use_reentrant": False}),
        "reentrant": lambda m: m.gradient_checkpointing_enable({"use_reentrant": True}),
    }
    for name, switch in [*switches.items(), ("config", None)]:
        torch.manual_seed(0)
        model = tiny_model("mamba2", threshold=THRESHOLD["mamba2"], **({"gradient_checkpointing": True}
                                                                     if switch is None else {}))
        model = model.double().train()
        if switch is not None:
            with warnings.catch_warnings():  # the older name warns in newer transformers
                warnings.simplefilter("ignore", FutureWarning)
                switch(model)
        replays = name != "reentrant"
        for block in model.model.layers:
            assert block.gradient_checkpointing
            assert (block._gradient_checkpointing_func.keywords.get("context_fn") is walk_replay_contexts) == replays
        walkers.clear()
        assert_same_step(step(model, [packed]), want)
        assert len(walkers) == (1 if replays else 2) * LAYERS, name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_disable()
    walkers.clear()
    assert_same_step(step(model, [packed]), want)
    assert len(walkers) == LAYERS


def test_only_non_reentrant_checkpointing_gets_the_replay():
    plain = functools.partial(checkpoint, use_reentrant=False)
    assert with_walk_replay(plain).keywords == {"use_reentrant": False, "context_fn": walk_replay_contexts}
    own = functools.partial(checkpoint, use_reentrant=False, context_fn=torch.utils.checkpoint.noop_context_fn)
    for func in (checkpoint, functools.partial(checkpoint, use_reentrant=True), functools.partial(checkpoint), own):
        assert with_walk_replay(func) is func


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_checkpoint_replays_the_walk_bit_for_bit(backend, monkeypatch):
    """``walk_replay_contexts`` as ``torch.utils.checkpoint``'s ``context_fn``, around a plan with the
    soft gates' trace (varlen, two heads, several planning chunks): the recomputation walks nothing
    and plans the first pass's schedule, open states and trace exactly."""
    from dla.schedule import triton_scan

    made = []
    walker_class = triton_scan.TritonWalker if backend == "triton" else dynamic.TorchWalker

    class CountingWalker(walker_class):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(triton_scan if backend == "triton" else dynamic, walker_class.__name__, CountingWalker)
    T, cu = 150, torch.tensor([0, 83, 150])
    k, v, g, beta = random_inputs(3, T, H=2, K=4, V=3, dtype=torch.float32)
    seen = []

    def gated_scores(k):
        schedule = dla.plan_schedule("dynamic", batch=1, heads=2, length=T, capacity=4, threshold=0.7, k=k, v=v,
                                     g=g, beta=beta, cu_seqlens=cu, backend=backend, keep_trace=True)
        seen.append(schedule)
        return differentiable_scores(schedule, "state", k, v, g, beta, "decayed", cu).square().sum()

    want_k = k.clone().requires_grad_()
    gated_scores(want_k).backward()
    got_k = k.clone().requires_grad_()
    checkpoint(gated_scores, got_k, use_reentrant=False, context_fn=walk_replay_contexts).backward()
    assert len(made) == 2 and len(seen) == 3  # the plain plan, the checkpointed forward; not its recomputation
    assert torch.equal(got_k.grad, want_k.grad)
    first, replayed = seen[1], seen[2]
    assert ((first.death >= 0) & (first.death < T)).any()  # merges happened
    for name in ("death", "scores", "carried_death"):
        a, b = getattr(first, name), getattr(replayed, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    for name in ("starts", "info", "position", "open_state", "open_norm"):
        assert torch.equal(getattr(first.final, name), getattr(replayed.final, name)), name
    for name in ("scores", "open_start", "open_norm", "open_states"):
        assert torch.equal(getattr(first.trace, name), getattr(replayed.trace, name)), name
    assert first.trace.chunk == replayed.trace.chunk


def test_a_recomputation_that_plans_otherwise_raises():
    k, v, g, beta = random_inputs(1, 40, H=2)

    def plan(T):
        return dla.plan_schedule("dynamic", batch=1, heads=2, length=T, capacity=4, threshold=0.5, k=k[:, :T],
                                 v=v[:, :T], g=g[:, :T], beta=beta[:, :T])

    record, replay = walk_replay_contexts()
    with record:
        want = plan(40)
    with replay, pytest.raises(RuntimeError, match="recomputed forward plans"):
        plan(39)
    with replay:
        assert torch.equal(plan(40).death, want.death)
        with pytest.raises(RuntimeError, match="more walks than its first pass"):
            plan(40)
