"""GPU-only checks of the layers and models: the CUDA defaults (Triton chunk walks) agree with the
recurrent decoding path, bf16 runs, and generate() works on the device. Skipped without CUDA."""

import pytest
import torch

import dla
from dla.layers import Attention, DLAGatedDeltaNet, DLAMamba2, KVCache, MixerCache, PolicyConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

POLICIES = {"single": dict(policy="single"), "fixed": dict(policy="fixed", capacity=8, period=16),
            "fenwick": dict(policy="fenwick"), "dynamic": dict(policy="dynamic", capacity=8),
            "dynamic-router": dict(policy="dynamic", capacity=8, score="router"),
            "dynamic-novelty": dict(policy="dynamic", capacity=8, score="novelty", merge="least_info", threshold=0.5)}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_layer(base, policy, policies=POLICIES):
    p = PolicyConfig(max_position_embeddings=1024, **policies[policy])
    if base == "mamba2":
        return DLAMamba2(128, head_dim=32, state_size=32, policy=p)
    if base == "gated_deltanet":
        return DLAGatedDeltaNet(128, num_heads=4, head_dim=32, policy=p)
    return Attention(128, num_heads=4, head_dim=32)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("base", ["mamba2", "gated_deltanet"])
def test_layer_on_gpu(base, policy):
    layer = make_layer(base, policy).cuda()
    lengths, steps = (130, 77), 20
    xs = [torch.randn(1, n + steps, 128, device="cuda") for n in lengths]
    y = layer(torch.cat([x[:, :n] for x, n in zip(xs, lengths)], 1),
              cu_seqlens=torch.tensor([0, lengths[0], sum(lengths)], device="cuda"))
    y.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    with torch.no_grad():
        full = [layer(x) for x in xs]
        cache = MixerCache()
        layer(torch.cat([x[:, :n] for x, n in zip(xs, lengths)], 1),
              cu_seqlens=torch.tensor([0, lengths[0], sum(lengths)], device="cuda"), cache=cache)
        for i in range(steps):
            out = layer(torch.cat([x[:, n + i:n + i + 1] for x, n in zip(xs, lengths)], 0), cache=cache)
            for b, n in enumerate(lengths):
                assert rel_err(out[b], full[b][0, n + i:n + i + 1]) < 1e-4
        bf16 = make_layer(base, policy).cuda()
        bf16.load_state_dict(layer.state_dict())
        y32 = bf16(xs[0])
        y16 = bf16.bfloat16()(xs[0].bfloat16())
        assert y16.dtype == torch.bfloat16 and rel_err(y16, y32) < 3e-2


def cache_tensors(cache: MixerCache) -> dict:
    seg = cache.state.segments
    tensors = dict(states=cache.state.states, prev_key=cache.state.prev_key, router_key=cache.router_key,
                   starts=seg.starts, info=seg.info, position=seg.position, open_state=seg.open_state,
                   open_norm=seg.open_norm)
    return {**tensors, **{f"conv.{name}": c for name, c in cache.conv.items()}}


# a small capacity that overflows, with level labels
ONE_TOKEN_POLICIES = {**POLICIES,
                      "dynamic-level": dict(policy="dynamic", capacity=4, threshold=0.5, label_rule="level")}


@pytest.mark.parametrize("policy", list(ONE_TOKEN_POLICIES))
@pytest.mark.parametrize("base", ["mamba2", "gated_deltanet"])
def test_one_token_steps_on_gpu_equal_the_general_path(base, policy):
    """On CUDA the unchecked one-token step (its plan in PyTorch, the decode kernel) gives the outputs
    and cache tensors of the checked general step (the Triton walk, the dense schedule, the decode
    kernel) bit for bit, for sequences at different positions and past the capacity."""
    layer = make_layer(base, policy, ONE_TOKEN_POLICIES).cuda().eval()
    lengths, steps = (130, 77), 60
    xs = torch.randn(2, max(lengths) + steps, 128, device="cuda")
    cu = torch.tensor([0, lengths[0], sum(lengths)], device="cuda")
    caches = [MixerCache(), MixerCache()]
    with torch.no_grad():
        for cache in caches:
            layer(torch.cat([xs[b:b + 1, :n] for b, n in enumerate(lengths)], 1), cu_seqlens=cu, cache=cache)
        for i in range(steps):
            x = torch.stack([xs[b, n + i] for b, n in enumerate(lengths)])[:, None]
            general, fast = (layer(x, cache=cache, validate=validate) for cache, validate in zip(caches, (True, False)))
            assert torch.equal(general, fast), f"step {i}"
            ours, theirs = cache_tensors(caches[1]), cache_tensors(caches[0])
            for name, a in theirs.items():
                b = ours[name]
                assert (a is None) == (b is None), name
                assert a is None or (a.dtype == b.dtype and torch.equal(a, b)), f"{name}, step {i}"


def test_attention_on_gpu():
    attn = make_layer("attention", "single").cuda()
    x = torch.randn(2, 50, 128, device="cuda")
    with torch.no_grad():
        full, cache = attn(x), KVCache()
        outs = [attn(x[:, :31], cache=cache)] + [attn(x[:, t:t + 1], cache=cache) for t in range(31, 50)]
    assert rel_err(torch.cat(outs, 1), full) < 1e-4


@pytest.mark.parametrize("mixer", ["mamba2", "gated_deltanet", "attention"])
def test_model_generate_on_gpu(mixer):
    pytest.importorskip("transformers")
    config = dla.DLAConfig(mixer=mixer, vocab_size=256, hidden_size=128, num_hidden_layers=2, head_dim=32,
                           state_size=32, max_position_embeddings=1024, capacity=8, pad_token_id=0, eos_token_id=None)
    model = dla.DLAForCausalLM(config).cuda().eval()
    seqs = [torch.randint(1, 256, (n,), device="cuda") for n in (70, 23)]
    ids = torch.zeros(2, 70, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, 70 - len(s):], mask[i, 70 - len(s):] = s, 1
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    for i, s in enumerate(seqs):
        alone = model.generate(s[None], max_new_tokens=16, do_sample=False)
        assert torch.equal(alone[0, len(s):], generated[i, 70:])
    with torch.no_grad():
        full = model(generated[:1, -80:]).logits
        out = model(generated[:1, -80:-10], use_cache=True)
        logits = [out.logits]
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for t in range(70, 80):
            logits.append(model(generated[:1, -80:][:, t:t + 1], cache=cache).logits)
    assert rel_err(torch.cat(logits, 1), full) < 1e-4


@pytest.mark.parametrize("mixer", ["mamba2", "gated_deltanet"])
def test_checkpointed_training_replays_the_triton_walks(mixer, monkeypatch):
    """Under activation checkpointing the recomputed forward replays the Triton walks: each layer walks
    once per step, the recomputation plans the first pass's schedule and soft gates' trace exactly, and
    the gradients are those of training without checkpointing."""
    pytest.importorskip("transformers")
    from dla.layers import common
    from dla.schedule import triton_scan
    from dla.train.distributed import enable_activation_checkpointing

    walkers, schedules = [], []

    class CountingWalker(triton_scan.TritonWalker):
        def __init__(self, *args):
            super().__init__(*args)
            walkers.append(self)

    def recording_plan(*args, **kwargs):
        schedules.append(plan(*args, **kwargs))
        return schedules[-1]

    plan = common.plan_schedule
    # the walks launched one by one (a graphed plan walks once per shape, tested below)
    monkeypatch.setenv("DLA_PLAN_CUDA_GRAPHS", "0")
    monkeypatch.setattr(triton_scan, "TritonWalker", CountingWalker)
    monkeypatch.setattr(common, "plan_schedule", recording_plan)
    config = dla.DLAConfig(mixer=mixer, vocab_size=256, hidden_size=128, num_hidden_layers=2, head_dim=32,
                           state_size=32, max_position_embeddings=1024, capacity=8, pad_token_id=0, eos_token_id=None)
    ids = torch.randint(1, 256, (1, 300), device="cuda")
    cu = torch.tensor([0, 211, 300], device="cuda")
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = dla.DLAForCausalLM(config).cuda().train()
        if checkpointing:
            enable_activation_checkpointing(model)
        walkers.clear()
        schedules.clear()
        model(ids, cu_seqlens=cu, labels=ids).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        assert len(walkers) == 2
    assert len(schedules) == 4  # the forward's two layers, then their recomputation in reverse order
    for first, replayed in zip(schedules[:2], schedules[:1:-1]):
        assert torch.equal(first.death, replayed.death) and torch.equal(first.scores, replayed.scores)
        for name in ("open_start", "open_norm", "open_states"):
            assert torch.equal(getattr(first.trace, name), getattr(replayed.trace, name)), name
    for name, want in grads[0].items():
        assert (grads[1][name] - want).norm() <= 1e-5 * want.norm(), name


@pytest.mark.parametrize("mixer, soft_gate", [("mamba2", False), ("gated_deltanet", False), ("mamba2", True),
                                               ("gated_deltanet", True)])
def test_checkpointed_training_replays_graphed_plans(mixer, soft_gate, monkeypatch):
    """A state-scored plan runs as a CUDA graph (dla.schedule.graphed), with the soft gates' trace
    where they train: under activation checkpointing the forward's graph records each walk and the
    recomputation replays it in a graph of its own; the schedules, traces and gradients are those of
    training without checkpointing, and of training without graphs (up to the order of the kernels' sums)."""
    pytest.importorskip("transformers")
    from dla.layers import common
    from dla.schedule import graphed
    from dla.train.distributed import enable_activation_checkpointing

    schedules = []
    plan = common.plan_schedule
    monkeypatch.setattr(common, "plan_schedule", lambda *a, **kw: schedules.append(plan(*a, **kw)) or schedules[-1])
    config = dla.DLAConfig(mixer=mixer, vocab_size=256, hidden_size=128, num_hidden_layers=2, head_dim=32,
                           state_size=32, max_position_embeddings=1024, capacity=8, soft_gate=soft_gate, pad_token_id=0,
                           eos_token_id=None)
    ids = torch.randint(1, 256, (1, 300), device="cuda")
    cu = torch.tensor([0, 211, 300], device="cuda")
    runs = []
    for graphs, checkpointing in (("0", False), ("1", False), ("1", True)):
        monkeypatch.setenv("DLA_PLAN_CUDA_GRAPHS", graphs)
        graphed.clear_graphs()
        torch.manual_seed(0)
        model = dla.DLAForCausalLM(config).cuda().train()
        if checkpointing:
            enable_activation_checkpointing(model)
        schedules.clear()
        model(ids, cu_seqlens=cu, labels=ids).loss.backward()
        runs.append(({name: p.grad for name, p in model.named_parameters()}, list(schedules)))
        # the layers share one graph; the recomputation's replay of the records has another
        assert len(graphed._GRAPHS) == (0 if graphs == "0" else 1 + checkpointing)
    (want, plain), (got, graphed_plans), (checkpointed, replayed) = runs
    assert len(replayed) == 4  # the forward's two layers, then their recomputation in reverse order
    for a, b, c, d in zip(plain, graphed_plans, replayed[:2], replayed[:1:-1]):
        for s in (b, c, d):
            assert torch.equal(s.death, a.death) and torch.equal(s.scores, a.scores)
            assert torch.equal(s.final.open_state, a.final.open_state)
            assert (s.trace is None) == (a.trace is None) == (not soft_gate)
            for name in ("open_start", "open_norm", "open_states") if soft_gate else ():
                assert torch.equal(getattr(s.trace, name), getattr(a.trace, name)), name
    for name, g in want.items():  # the backward kernels may accumulate in any order
        assert (got[name] - g).norm() <= 1e-5 * g.norm(), name
        assert (checkpointed[name] - g).norm() <= 1e-5 * g.norm(), name
