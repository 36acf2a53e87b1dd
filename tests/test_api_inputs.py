"""The Python API refuses bad input with a ValueError / TypeError that names the argument (the
cases found by trying dla as a new user; the op shape and dtype checks are in test_errors.py)."""

import math

import numpy as np
import pytest
import torch
from conftest import make_case

import dla
from dla.models import DLACache, DLAConfig, DLAForCausalLM

OPS = {"naive": dla.naive_dla, "recurrent": dla.recurrent_dla, "chunk": dla.chunk_dla}
def case(base="gated_deltanet", **kw):
    inputs, schedule = make_case("dynamic", base, **{"B": 1, "T": 20, "H": 2, "K": 4, "V": 3, "capacity": 4, **kw})
    return dict(inputs, schedule=schedule)


# ----------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("cu", [[0, 10, 20], np.array([0, 10, 20])], ids=["list", "numpy"])
def test_cu_seqlens_must_be_a_tensor(op, cu):
    with pytest.raises(TypeError, match=r"cu_seqlens must be a torch.Tensor of int32/int64 offsets .*got "):
        OPS[op](**case(), cu_seqlens=cu)
    inputs, _ = make_case("single", "mamba2", B=1, T=20, H=2, K=4, V=3)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        dla.novelty_scores(inputs["k"], cu_seqlens=cu)


@pytest.mark.parametrize("op", OPS)
def test_keys_of_width_zero(op):
    c = case()
    c["q"], c["k"] = c["q"][..., :0], c["k"][..., :0]
    with pytest.raises(ValueError, match=r"key width K >= 1, got shape \(1, 20, 2, 0\)"):
        OPS[op](**c)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("scale, exc, match", [
    ("0.5", TypeError, "scale must be a number .* got str"),
    (True, TypeError, "scale must be a number .* got bool"),
    (float("nan"), ValueError, "scale must be finite, got nan"),
    (math.inf, ValueError, "scale must be finite, got inf"),
])
def test_scale_must_be_a_finite_number(op, scale, exc, match):
    with pytest.raises(exc, match=match):
        OPS[op](**case(), scale=scale)


def test_scale_may_be_a_one_element_tensor():
    c = case()
    o, _ = dla.chunk_dla(**c, scale=torch.tensor(0.5))
    assert torch.allclose(o, dla.chunk_dla(**c, scale=0.5)[0])


@pytest.mark.parametrize("op", OPS)
def test_beta_must_lie_in_0_1(op):
    c = case()
    for bad in (c["beta"] + 1, -c["beta"]):
        with pytest.raises(ValueError, match=r"beta is the delta rule's write strength and must be in \[0, 1\]"):
            OPS[op](**{**c, "beta": bad})
    edges = c["beta"].clone()
    edges[..., 0], edges[..., 1] = 0.0, 1.0  # a saturated sigmoid: allowed
    OPS[op](**{**c, "beta": edges})


@pytest.mark.parametrize("op", ["recurrent", "chunk"])
def test_triton_backend_needs_a_gpu(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (the suite runs Triton on the CPU through it)
    with pytest.raises(ValueError, match="backend='triton' runs on a CUDA GPU, but the inputs are on cpu"):
        OPS[op](**case(), backend="triton")


@pytest.mark.parametrize("base", ["gated_deltanet"])
def test_a_huge_capacity_allocates_memory_linear_in_it(base):
    """Capacity 50,000 at T = 8: the state routing used to be a [C, C] matrix per chunk (20 GB here)."""
    c = case(base, T=8, H=1, K=2, V=2, capacity=50_000)
    o, state = dla.chunk_dla(**c, output_final_state=True)
    reference = dla.naive_dla(**c)  # (memory linear in C: it has no state routing)
    reference = reference[0] if isinstance(reference, tuple) else reference
    assert torch.allclose(o, reference) and state.states.shape == (1, 1, 50_000, 2, 2)


@pytest.mark.parametrize("base", ["mamba2"])
def test_decoding_with_a_huge_capacity(base):
    c = case(base, T=3, H=1, K=2, V=2, capacity=50_000)
    o, state = dla.recurrent_dla(**c, output_final_state=True)
    assert torch.allclose(o, dla.chunk_dla(**c)[0]) and state.states.shape == (1, 1, 50_000, 2, 2)


@pytest.mark.parametrize("base", ["mamba2", "gated_deltanet"])
def test_the_scattered_state_routing_equals_the_dense_one(base, monkeypatch):
    from dla.ops import chunk

    c = case(base, T=70, capacity=3, requires_grad=True, decay=(0.001, 0.02))
    c["chunk_size"] = 16
    dense, _ = dla.chunk_dla(**c)
    g_dense = torch.autograd.grad(dense.sum(), [c["q"], c["v"], c["lam"]])
    monkeypatch.setattr(chunk, "DENSE_ROUTE_MAX_CAPACITY", 0)
    scattered, _ = dla.chunk_dla(**c)
    g_scattered = torch.autograd.grad(scattered.sum(), [c["q"], c["v"], c["lam"]])
    assert torch.allclose(dense, scattered, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g_dense, g_scattered))
    recurrent, _ = dla.recurrent_dla(**{k: v for k, v in c.items() if k != "chunk_size"})
    assert torch.allclose(recurrent, dense, atol=1e-10)


def state_tensors(state: dla.DLAState) -> list:
    seg = state.segments
    return [state.states, seg.starts, seg.info, seg.position, seg.open_state, seg.open_norm, state.prev_key]


@pytest.mark.parametrize("base", ["mamba2", "gated_deltanet"])
@pytest.mark.parametrize("policy", ["fixed", "fenwick", "dynamic"])
def test_unchecked_decoding_steps_equal_checked_ones(base, policy):
    """``validate=False`` (planner and recurrent op) leaves the checks that read values out and
    nothing else: after a chunked prefill, every one-token step plans the same schedule and gives
    the same output and state, bit for bit. A NaN then passes where the checked step refuses it."""
    x, _ = make_case(policy, base, B=2, T=14, H=2, K=4, V=3, capacity=5)
    prompt = 9

    def window(lo, hi):
        return {name: None if t is None else t[:, lo:hi] for name, t in x.items()}

    def plan(w, state, validate):
        return dla.plan_schedule(policy, batch=2, heads=2, length=w["q"].shape[1], capacity=5, period=3,
                                 k=w["k"], v=w["v"], g=w["g"], beta=w["beta"], initial_state=state,
                                 validate=validate)

    w = window(0, prompt)
    _, state = dla.chunk_dla(**w, schedule=plan(w, None, True), output_final_state=True)
    states = [state, state]
    for t in range(prompt, 14):
        w = window(t, t + 1)
        schedules = [plan(w, s, validate) for s, validate in zip(states, (True, False))]
        assert torch.equal(schedules[0].death, schedules[1].death)
        assert torch.equal(schedules[0].carried_death, schedules[1].carried_death)
        (o_checked, checked), (o_unchecked, unchecked) = (
            dla.recurrent_dla(**w, schedule=sched, initial_state=s, output_final_state=True, validate=validate)
            for sched, s, validate in zip(schedules, states, (True, False)))
        assert torch.equal(o_checked, o_unchecked)
        assert all((a is None and b is None) or torch.equal(a, b)
                   for a, b in zip(state_tensors(checked), state_tensors(unchecked)))
        states = [checked, unchecked]
    w = window(13, 14)
    w["q"] = w["q"] * float("nan")
    schedule = plan(w, states[0], False)
    with pytest.raises(ValueError, match="q contains NaN or Inf"):
        dla.recurrent_dla(**w, schedule=schedule, initial_state=states[0])
    o, _ = dla.recurrent_dla(**w, schedule=schedule, initial_state=states[0], validate=False)
    assert torch.isnan(o).all()


# ----------------------------------------------------------------------------- the schedule (being rewritten)
def test_plan_schedule_refuses_an_unknown_label_rule():
    with pytest.raises(ValueError, match="label_rule"):
        dla.plan_schedule("fenwick", batch=1, heads=2, length=20, label_rule="levels")


@pytest.mark.parametrize("convert", [lambda s: s.tolist(), lambda s: s.numpy()], ids=["list", "numpy"])
def test_plan_schedule_scores_must_be_a_tensor(convert):
    inputs, _ = make_case("single", "mamba2", B=1, T=20, H=2, K=4, V=3)
    scores = dla.novelty_scores(inputs["k"])
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        dla.plan_schedule("dynamic", batch=1, heads=2, length=20, capacity=4, scores=convert(scores))


def test_novelty_scores_prev_key_must_be_a_tensor():
    inputs, _ = make_case("single", "mamba2", B=1, T=20, H=2, K=4, V=3)
    with pytest.raises(TypeError, match="prev_key must be a torch.Tensor"):
        dla.novelty_scores(inputs["k"], prev_key=inputs["k"][:, 0].tolist())


def test_plan_schedule_cu_seqlens_must_be_a_tensor():
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        dla.plan_schedule("single", batch=1, heads=2, length=20, cu_seqlens=[0, 10, 20])


def test_fenwick_past_max_position_embeddings_names_the_setting():
    cfg = DLAConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, head_dim=16, state_size=8, policy="fenwick",
                    max_position_embeddings=16, chunk_size=16)
    model = DLAForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(torch.randint(32, (1, 8)), max_new_tokens=20, do_sample=False)


# ----------------------------------------------------------------------------- the config
def test_an_unknown_config_argument_names_the_closest():
    with pytest.raises(ValueError, match="unknown DLAConfig argument 'capacty'; did you mean 'capacity'"):
        DLAConfig(capacty=4)
    with pytest.raises(ValueError, match="unknown DLAConfig argument 'frobnicate'; the arguments are: mixer"):
        DLAConfig(frobnicate=1)
    # what Hugging Face passes stays accepted
    config = DLAConfig(gradient_checkpointing=True, torch_dtype="float32", architectures=["DLAForCausalLM"])
    assert config.gradient_checkpointing


def test_a_saved_config_still_loads(tmp_path):
    config = DLAConfig(hidden_size=32, head_dim=16, num_hidden_layers=1, state_size=8, vocab_size=32)
    config.save_pretrained(tmp_path)
    assert DLAConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    from pathlib import Path

    legacy = Path(__file__).parent / "data" / "legacy_novelty_checkpoint"
    assert DLAConfig.from_pretrained(legacy).hidden_size == 32


@pytest.mark.parametrize("eps", [-1, 0, float("nan"), math.inf, "1e-5"])
def test_norm_eps_must_be_positive(eps):
    with pytest.raises(ValueError, match="norm_eps must be a finite number > 0"):
        DLAConfig(norm_eps=eps)


# ----------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = DLAConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, head_dim=16, state_size=8, capacity=4,
                    max_position_embeddings=64, chunk_size=16)
    return DLAForCausalLM(cfg).eval()


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"input_ids": torch.tensor([[1, 2, 32]])}, ValueError,
     r"input_ids must be token ids in \[0, vocab_size = 32\), got values in \[1, 32\]"),
    ({"input_ids": torch.tensor([[1, -2, 3]])}, ValueError, r"got values in \[-2, 3\]"),
    ({"input_ids": torch.tensor([1, 2, 3])}, ValueError, r"input_ids must be \[B, T\] .*input_ids\[None\]"),
    ({"input_ids": torch.tensor([[1.0, 2.0]])}, TypeError, "input_ids must be an integer tensor"),
    ({"input_ids": [[1, 2]]}, TypeError, "input_ids must be a torch.Tensor"),
    ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, ValueError, r"input_ids has no tokens \(T = 0\)"),
    ({"inputs_embeds": torch.zeros(1, 0, 32)}, ValueError, r"inputs_embeds has no tokens \(T = 0\)"),
    ({"inputs_embeds": torch.zeros(1, 4, 7)}, ValueError, r"inputs_embeds must be a \[B, T, hidden_size = 32\]"),
    ({"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1, 2]])}, ValueError,
     r"labels must be a \[B, T\] = \[1, 3\] tensor like input_ids, got \(1, 2\)"),
    ({"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([1, 2, 3])}, ValueError, "labels must be"),
    ({"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1, 40, -100]])}, ValueError,
     r"labels must be token ids in \[0, vocab_size = 32\) or -100 \(ignored\), got 40"),
])
def test_model_inputs(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        model(**kwargs)


def test_a_new_cache_has_its_ids_checked_and_either_name_continues_it(model):
    cache = DLACache(model.config)
    with pytest.raises(ValueError, match="input_ids must be token ids"):
        model(input_ids=torch.tensor([[1, 32]]), cache=cache)
    model(input_ids=torch.tensor([[1, 2]]), cache=cache)
    model(input_ids=torch.tensor([[3]]), past_key_values=cache)
    assert cache.seen_tokens == 3


def test_model_accepts_ignored_labels(model):
    out = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, -100]]))
    assert torch.isfinite(out.loss)
