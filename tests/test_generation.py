"""``dla.generate`` against ``model.generate``, the static (CUDA graph) step run eagerly on a CPU, the
attention baseline's preallocated KV cache, and ``benchmarks/generate.py --smoke``."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch

import dla

pytest.importorskip("transformers")
from mixer_helpers import max_err, one_thread  # noqa: E402, F401 (one_thread is an autouse fixture)

from dla import generation  # noqa: E402
from dla.layers import KVCache  # noqa: E402
from dla.layers.common import DLAMixer  # noqa: E402
from dla.models.modeling_dla import CACHE_FIELD  # noqa: E402
from dla.ops import recurrent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
POLICY_KWARGS = {
    "single": dict(policy="single"),
    "fixed": dict(policy="fixed", capacity=4, period=5),
    "fenwick": dict(policy="fenwick"),
    # thresholds at which both tiny bases open segments and merge them while they decode
    "dynamic": dict(policy="dynamic", capacity=4, threshold=0.3),
    # the other scores, merge rules and options of the planner, and level labels without fenwick
    "dynamic-drift": dict(policy="dynamic", capacity=4, score="state_drift", open_state="plain", max_segment_len=6,
                          threshold=0.3),
    "dynamic-novelty": dict(policy="dynamic", capacity=4, score="novelty", merge="least_info", threshold=0.05),
    "dynamic-router": dict(policy="dynamic", capacity=4, score="router", merge="oldest"),
    "fixed-level": dict(policy="fixed", capacity=4, period=3, label_rule="level"),
}
DLA_CASES = [(m, p) for m in ("mamba2", "gated_deltanet") for p in POLICY_KWARGS]
CASES = [("attention", "single")] + DLA_CASES
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, head_dim=16, state_size=8, intermediate_size=64,
            max_position_embeddings=256, chunk_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=None)


def tiny_model(mixer, policy="single", device="cpu", **overrides):
    torch.manual_seed(0)
    config = dla.DLAConfig(**{**TINY, "mixer": mixer, **POLICY_KWARGS[policy], **overrides})
    return dla.DLAForCausalLM(config).to(device).eval()


def left_padded(lengths, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids, mask = torch.zeros(len(lengths), T, dtype=torch.long), torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:], mask[i, T - n:] = torch.randint(2, 64, (n,), generator=gen), 1
    return ids.to(device), mask.to(device)


@pytest.fixture
def static_steps(monkeypatch):
    """Decode through :class:`dla.generation.GraphStep` run eagerly: the static buffers, the
    in-place write-back and the attention cache's static form, without a GPU."""
    made = []

    def make(model, cache):
        step = generation.GraphStep(model, cache, cache.batch_size)
        step.capture(graph=False)
        made.append(step)
        return step

    monkeypatch.setattr(generation, "EagerStep", make)
    return made


# ----------------------------------------------------------------------------- same tokens as generate()
@pytest.mark.parametrize("mixer, policy", CASES)
def test_generate_returns_the_tokens_of_model_generate(mixer, policy):
    model = tiny_model(mixer, policy)
    ids, mask = left_padded((9, 4, 7))
    want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(dla.generate(model, ids, 10, attention_mask=mask), want)
    dense = ids[:, -4:]
    assert torch.equal(dla.generate(model, dense, 6), model.generate(dense, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("mixer, policy", CASES)
def test_static_step_returns_the_same_tokens(mixer, policy, static_steps):
    model = tiny_model(mixer, policy)
    ids, mask = left_padded((9, 4, 7))
    want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(dla.generate(model, ids, 8, attention_mask=mask), want)
    step = static_steps[0]
    # the cache still holds the buffers the step was built on, updated in place
    now = [value for _, _, value in generation.cache_entries(step.cache) if isinstance(value, torch.Tensor)]
    assert len(now) == len(step.buffers) and all(a is b for a, b in zip(now, step.buffers))
    if mixer == "attention":
        layer = step.cache.layers[0]
        assert layer.static and int(layer.cursor) == layer.size == ids.shape[1] + 7


def test_end_of_sequence_stops_and_pads_as_generate_does():
    model = tiny_model("mamba2", "fixed")
    ids, mask = left_padded((6, 3))
    free = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)[:, ids.shape[1]:]
    # an eos id that row 0 produces at its third token: row 0 ends there and is padded after
    model.generation_config.eos_token_id = int(free[0, 2])
    want = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    got = dla.generate(model, ids, 40, attention_mask=mask)
    assert torch.equal(got, want)
    # every row ends: generate() stops after the token that ends the last one
    model.generation_config.eos_token_id = [int(free[0, 2]), int(free[1, 1])]
    want = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    got = dla.generate(model, ids, 40, attention_mask=mask)
    assert torch.equal(got, want) and got.shape[1] < ids.shape[1] + 40


def test_padding_is_inferred_from_the_pad_token_as_generate_does():
    model = tiny_model("attention")
    ids, _ = left_padded((8, 3))  # pad id 0 at the left of row 1
    assert torch.equal(dla.generate(model, ids, 5), model.generate(ids, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=torch.zeros(3, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.zeros(1, 3)), "input_ids"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(attention_mask=torch.ones(1, 4)), "attention_mask"),
    (dict(use_cuda_graph=1), "use_cuda_graph"),
])
def test_bad_arguments_raise_naming_them(kwargs, match):
    model = tiny_model("mamba2")
    args = {"input_ids": torch.ones(1, 3, dtype=torch.long), "max_new_tokens": 2, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        dla.generate(model, args.pop("input_ids"), args.pop("max_new_tokens"), **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of CUDA graphs")
def test_cuda_graph_on_a_cpu_model_is_refused():
    with pytest.raises(ValueError, match="use_cuda_graph"):
        dla.generate(tiny_model("mamba2"), torch.ones(1, 3, dtype=torch.long), 2, use_cuda_graph=True)


# ----------------------------------------------------------------------------- attention KV cache
def test_kv_cache_is_written_in_place_and_padded_decoding_equals_the_full_forward():
    model = tiny_model("attention")
    ids, mask = left_padded((9, 4, 7))
    cache = dla.DLACache(model.config, max_length=ids.shape[1] + 6)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache, use_cache=True)
        layer = cache.layers[0]
        pointer, logits, tokens = layer.keys.data_ptr(), [], [out.logits[:, -1:].argmax(-1)]
        for _ in range(6):
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], 1)
            out = model(tokens[-1], attention_mask=mask, cache=cache)
            logits.append(out.logits)
            tokens.append(out.logits.argmax(-1))
            assert layer.keys.data_ptr() == pointer  # no reallocation, no concatenation
        assert not layer.dense and layer.size == ids.shape[1] + 6
        for i, n in enumerate((9, 4, 7)):
            alone = torch.cat([ids[i, -n:]] + [t[i] for t in tokens[:6]])[None]
            full = model(alone).logits[0, n:]
            assert max_err(torch.cat(logits, 1)[i], full) < 1e-5


def test_kv_cache_without_a_length_doubles_and_counts_the_slots_it_holds():
    model = tiny_model("attention")
    cache = dla.DLACache(model.config)
    ids = torch.randint(2, 64, (2, 5))
    with torch.no_grad():
        model(ids, cache=cache)
        layer = cache.layers[0]
        assert layer.keys.shape[2] == 5 and layer.dense
        before = cache.nbytes
        model(ids[:, :1], cache=cache)
        assert layer.keys.shape[2] == 10 and layer.size == 6 and cache.nbytes > before
    per_token = 2 * 2 * 2 * 16 * 4 + 2  # keys and values of 2 rows x 2 heads x 16, and the row's valid flag
    assert cache.nbytes - before == model.config.num_hidden_layers * per_token


def test_model_generate_preallocates_the_attention_cache():
    model = tiny_model("attention")
    ids = torch.randint(2, 64, (2, 5))
    out = model.generate(ids, max_new_tokens=7, do_sample=False, return_dict_in_generate=True)
    layer = getattr(out, CACHE_FIELD).layers[0]
    assert isinstance(layer, KVCache) and layer.keys.shape[2] == layer.size == 5 + 6


def test_model_generate_continues_a_cache_it_is_given():
    """A preallocated cache passed to ``generate()`` under the version's name for it (as the
    generation benchmark does): filled in place, the same tokens as the cache generate() makes."""
    model = tiny_model("attention")
    ids, mask = left_padded((7, 3))
    cache = dla.DLACache(model.config, max_length=32)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **{CACHE_FIELD: cache})
    assert torch.equal(got, model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))
    layer = cache.layers[0]
    assert layer.keys.shape[2] == 32 and layer.size == 7 + 4 and cache.seen_tokens == 7 + 4


def test_beam_search_reorders_the_preallocated_cache():
    model = tiny_model("attention")
    ids, mask = left_padded((7, 3))
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    alone = model.generate(ids[1:, -3:], max_new_tokens=6, num_beams=3, do_sample=False)
    assert beams.shape == (2, 13) and torch.equal(beams[1, -6:], alone[0, -6:])


def test_static_dla_steps_give_the_states_slot_scales_and_places_and_beams_reorder_them():
    """Before its steps are captured, a DLA layer's cache gets slot scales of 1 and every slot its own
    place (the decode kernel keeps them, dla.DLAState.scales and .places), so that a step replaces
    the cache's tensors and adds none; reordering the sequences (beam search) moves every slot's
    states with their scales and places."""
    model = tiny_model("mamba2", "dynamic")
    cache = dla.DLACache(model.config)
    with torch.no_grad():
        model(torch.randint(1, 64, (3, 9)), cache=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.state.scales is None
    layer.make_static()
    assert layer.state.scales.shape == layer.state.states.shape[:3] and bool((layer.state.scales == 1).all())
    C = layer.state.states.shape[2]
    assert layer.state.places.dtype == torch.int32 and torch.equal(layer.state.places[1, 0], torch.arange(C).int())
    layer.state.scales = torch.rand_like(layer.state.scales)
    layer.state.places = torch.stack([torch.randperm(C) for _ in range(layer.state.places[..., 0].numel())]).view(
        layer.state.places.shape).int()
    want = layer.state.slot_states()[[2, 0, 0]]
    before = cache.nbytes
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(layer.state.slot_states(), want) and cache.nbytes == before


# ----------------------------------------------------------------------------- host synchronisation
@pytest.fixture
def host_reads(monkeypatch):
    """Every place in ``dla`` that reads a tensor's value on the host (on a GPU each one waits for
    the device and cannot be in a CUDA graph): ``file:line`` of the innermost ``dla`` frame."""
    package = ROOT / "dla"
    found = []

    def note():
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = Path(frame.filename).resolve()
            if path.is_relative_to(package):
                found.append(f"{path.relative_to(ROOT)}:{frame.lineno}")
                return

    def watch(owner, name, when=lambda *args: True):
        original = getattr(owner, name)

        def watched(*args, **kwargs):
            if when(*args):
                note()
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, watched)

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
        watch(torch.Tensor, name)
    for name in ("equal", "nonzero"):
        watch(torch, name)
    # indexing with a boolean mask sizes its result from the mask's values
    def boolean(self, index):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                   for i in (index if isinstance(index, tuple) else (index,)))
    watch(torch.Tensor, "__getitem__", boolean)
    return found


def one_step_reads(model, host_reads, monkeypatch):
    """The host reads of one decoding step outside the op's own step, which is set to the
    differentiable PyTorch one: on a GPU the decode kernel runs there, and the decode kernel's
    PyTorch twin, which runs only off the GPU, reads the routing on the host by design."""
    monkeypatch.setattr(recurrent, "_step_function", lambda backend, one_token, on_cuda, delta: recurrent._torch_step)
    decoding = generation.start_decoding(model, torch.randint(1, 64, (2, 9)), 4)
    host_reads.clear()
    decoding.step(decoding.token)
    return list(host_reads)


def test_attention_step_reads_nothing_on_the_host(host_reads, monkeypatch):
    assert one_step_reads(tiny_model("attention"), host_reads, monkeypatch) == []


def test_model_generate_passes_no_mask_after_the_prompt():
    """The forward calls of ``generate()`` itself: the prompt's with its padding mask, every new
    token's without one (whatever the version names the cache argument)."""
    model = tiny_model("attention")
    ids, mask = left_padded((9, 4))
    calls = []
    model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs), with_kwargs=True)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert [call["input_ids"].shape[1] for call in calls] == [9, 1, 1, 1]
    assert torch.equal(calls[0]["attention_mask"], mask)
    assert all(call.get("attention_mask") is None for call in calls[1:])
    assert all(call[CACHE_FIELD] is calls[0][CACHE_FIELD] for call in calls)


@pytest.mark.parametrize("policy", ["dynamic", "fenwick"])
def test_model_generate_decodes_through_the_one_token_step(policy, monkeypatch):
    """generate()'s decoding steps skip the checks that read values, as dla.generate's do, and so
    run the layers' one-token step (the prompt's call checks); a step whose sequences would run past
    the fenwick capacity takes the checked path, which raises its error (the test above). Padded
    prompts give the tokens of dla.generate."""
    model = tiny_model("mamba2", policy, max_position_embeddings=16)
    steps = []
    step = DLAMixer.step
    monkeypatch.setattr(DLAMixer, "step", lambda self, *a, **kw: steps.append(1) or step(self, *a, **kw))
    calls = []
    model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs.get("validate", True)),
                                    with_kwargs=True)
    ids, mask = left_padded((9, 4))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert calls == [True] + [False] * 7  # the prompt checked, then 7 unchecked steps
    assert len(steps) == 7 * model.config.num_hidden_layers
    assert torch.equal(out, dla.generate(model, ids, 8, attention_mask=mask))


@pytest.mark.parametrize("mixer, policy", DLA_CASES)
def test_dla_step_reads_nothing_on_the_host(mixer, policy, host_reads, monkeypatch):
    assert one_step_reads(tiny_model(mixer, policy), host_reads, monkeypatch) == []


@pytest.mark.parametrize("mixer, policy", DLA_CASES)
def test_unchecked_steps_equal_checked_ones_bit_for_bit(mixer, policy):
    """``validate=False`` only leaves checks out: the logits and every cache tensor after each
    step equal those of the checking forward exactly."""
    model = tiny_model(mixer, policy)
    ids, mask = left_padded((9, 4, 7))
    caches = [dla.DLACache(model.config) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            token = model(ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1].argmax(-1)
        for _ in range(5):
            checked, unchecked = (model(token[:, None], cache=cache, validate=validate).logits
                                  for cache, validate in zip(caches, (True, False)))
            assert torch.equal(checked, unchecked)
            held = [[v for _, _, v in generation.cache_entries(c) if isinstance(v, torch.Tensor)] for c in caches]
            assert len(held[0]) == len(held[1]) and all(torch.equal(a, b) for a, b in zip(*held))
            token = checked[:, -1].argmax(-1)


@pytest.mark.parametrize("mixer, policy", DLA_CASES)
def test_the_cached_states_hold_only_their_own_memory(mixer, policy):
    """After the prompt (three chunks) every layer's segment states own exactly their bytes: the
    chunked walks' final states are views of their states at every chunk boundary, and a cache
    holding the views kept all of them alive (on a GPU, every layer's: 70 of 80 GB after a batch of
    8 x 2K prompts at C = 30)."""
    model = tiny_model(mixer, policy)
    decoding = generation.start_decoding(model, torch.randint(1, 64, (2, 40)), 4)
    for layer in decoding.cache.layers:
        states = layer.state.states
        assert states.untyped_storage().nbytes() == states.numel() * states.element_size()


@pytest.mark.parametrize("policy", ["fixed", "dynamic"])
def test_the_prompt_is_still_checked(policy):
    """The steps skip the checks that read values; the prompt's call makes them: its ids, and
    NaN reaching the layers' op (through one embedding row made NaN)."""
    model = tiny_model("mamba2", policy)
    with pytest.raises(ValueError, match="input_ids must be token ids"):
        dla.generate(model, torch.full((1, 3), 64), 2)
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        dla.generate(model, torch.tensor([[7, 5, 9]]), 2)


@pytest.mark.parametrize("policy", ["fenwick", "fixed-level"])
def test_a_sequence_past_the_level_labels_is_refused_before_decoding(policy):
    """The steps no longer check the labels a position needs: generate() checks the longest
    sequence once. max_position_embeddings = 16 holds positions up to 15: a prompt of 9 and 8
    new tokens (16 through the model) fits and gives generate()'s tokens, 9 new tokens do not."""
    model = tiny_model("mamba2", policy, max_position_embeddings=16)
    ids = torch.randint(2, 64, (2, 9))
    assert torch.equal(dla.generate(model, ids, 8), model.generate(ids, max_new_tokens=8, do_sample=False))
    with pytest.raises(ValueError, match="max_position_embeddings|needs 6"):  # fenwick's message, or the labels'
        model.generate(ids, max_new_tokens=9, do_sample=False)
    with pytest.raises(ValueError, match="max_position_embeddings = 16"):
        dla.generate(model, ids, 9)


# ----------------------------------------------------------------------------- CUDA graphs
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@cuda
def test_cuda_graph_generate_of_attention_returns_the_tokens_of_model_generate():
    model = tiny_model("attention", device="cuda")
    ids, mask = left_padded((9, 4, 7), device="cuda")
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        got = dla.generate(model, ids, 12, attention_mask=mask, use_cuda_graph=True)
    assert torch.equal(got, want)


@cuda
@pytest.mark.parametrize("mixer, policy", DLA_CASES)
def test_cuda_graph_generate_of_dla_policies_gives_the_same_tokens(mixer, policy):
    """Every DLA step is captured (no warning that it decodes eagerly), and replaying it gives the
    tokens of ``model.generate()``."""
    model = tiny_model(mixer, policy, device="cuda")
    ids, mask = left_padded((9, 4, 7), device="cuda")
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoding = generation.start_decoding(model, ids, 12, attention_mask=mask, use_cuda_graph=True)
        got = dla.generate(model, ids, 12, attention_mask=mask, use_cuda_graph=True)
    # torch's own warnings (its sync debug mode is a prototype) are not dla's to check
    assert [str(w.message) for w in caught if "dla.generate" in str(w.message)] == []
    assert not [w for w in caught if "Synchronization debug mode" in str(w.message)]
    assert decoding.graph and isinstance(decoding.step, generation.GraphStep)
    assert torch.equal(got, want)


def test_the_trial_copy_of_the_cache_stays_on_the_device_only_where_it_fits_twice():
    gpu = torch.device("cuda", 0)
    assert generation.trial_copy_device(gpu, 10 * 2**30, 20 * 2**30) == gpu
    assert generation.trial_copy_device(gpu, 10 * 2**30, 20 * 2**30 - 1) == torch.device("cpu")
    assert generation.trial_copy_device(torch.device("cpu"), 10 * 2**30, None) == torch.device("cpu")


@cuda
def test_cuda_graph_generate_with_the_trial_copy_in_host_memory(monkeypatch):
    """A cache too large to copy on the device is copied to the host for the trial steps: the
    restored cache decodes the tokens of ``model.generate()``."""
    places = []
    monkeypatch.setattr(generation, "trial_copy_device", lambda *a: places.append(1) or torch.device("cpu"))
    model = tiny_model("mamba2", "dynamic", device="cuda")
    ids, mask = left_padded((9, 4, 7), device="cuda")
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    decoding = generation.start_decoding(model, ids, 12, attention_mask=mask, use_cuda_graph=True)
    assert places and decoding.graph
    assert torch.equal(dla.generate(model, ids, 12, attention_mask=mask, use_cuda_graph=True), want)


@cuda
@pytest.mark.parametrize("mixer, policy", DLA_CASES)
def test_dla_step_on_cuda_runs_the_decode_kernel_and_never_waits(mixer, policy, monkeypatch):
    """The eager step on a GPU: one Triton decoding kernel per layer, and no synchronisation with
    the host (torch's sync debug mode raises at the first)."""
    from dla.ops.triton import decode

    launches = []

    def counted(*args, **kwargs):
        launches.append(args[0].shape)
        return original(*args, **kwargs)

    original = decode.decode_step
    monkeypatch.setattr(decode, "decode_step", counted)
    model = tiny_model(mixer, policy, device="cuda")
    decoding = generation.start_decoding(model, torch.randint(1, 64, (2, 9), device="cuda"), 6,
                                         use_cuda_graph=False)
    token = decoding.step(decoding.token)  # the first step compiles the kernels
    launches.clear()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype feature")
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                token = decoding.step(token)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    assert len(launches) == 3 * model.config.num_hidden_layers


# ----------------------------------------------------------------------------- benchmark
def test_generate_benchmark_smoke_writes_its_rows(tmp_path):
    out = tmp_path / "generate.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"device", "torch", "triton", "fla", "date", "copy_bandwidth_GBps"} <= set(report["meta"])
    rows = report["rows"]
    assert {r["model"] for r in rows} == {"attention", "mamba2-single", "mamba2-dynamic", "gated_deltanet-single",
                                          "gated_deltanet-dynamic"}
    assert {r["path"] for r in rows} == {"model.generate", "dla.generate"}
    for r in rows:
        assert {"model", "batch", "context", "ms_per_step", "tokens_per_s", "cache_bytes", "floor_ms", "path"} <= set(r)
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["cache_bytes"] > 0 and r["floor_ms"] > 0
    assert out.with_suffix(".png").is_file() or "matplotlib" in run.stderr


def test_decode_profile_smoke_lists_each_models_step(capsys):
    """``benchmarks/profile_decode.py --smoke``: per model, the step's time and operation count, and
    its ``--top`` largest operations by time, the largest first; a batch of 0 is refused."""
    spec = importlib.util.spec_from_file_location("profile_decode", ROOT / "benchmarks" / "profile_decode.py")
    profile_decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_decode)
    profile_decode.main(["--smoke", "--models", "mamba2-single", "gated_deltanet-dynamic", "--top", "4",
                         "--device", "cpu"])
    out = capsys.readouterr().out
    headers = re.findall(r"^(\S+), batch 2: eager step ([\d.]+) ms, (\d+) operations taking ([\d.]+) ms per step$",
                         out, re.M)
    assert [h[0] for h in headers] == ["mamba2-single", "gated_deltanet-dynamic"]
    assert all(float(wall) > 0 and int(n) > 10 and float(busy) > 0 for _, wall, n, busy in headers)
    for block in out.split("\n\n")[1:]:
        rows = [line.split() for line in block.splitlines()[2:]]
        assert len(rows) == 4
        times = [float(row[2]) for row in rows]
        assert times == sorted(times, reverse=True) and all(float(row[0]) > 0 for row in rows)
    with pytest.raises(SystemExit):
        profile_decode.main(["--batch", "0", "--device", "cpu"])


def test_generate_benchmark_resumes_a_report_and_refuses_one_of_other_versions(tmp_path, capsys):
    """``--resume`` measures only the rows a report lacks, keeps the others as they were and lists
    both runs' commands; rows of another torch are not mixed in."""
    spec = importlib.util.spec_from_file_location("generate_benchmark", ROOT / "benchmarks" / "generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "generate.json"
    commands = [["--smoke", "--models", "attention", "--out", str(out)],
                ["--smoke", "--models", "attention", "mamba2-single", "--resume", "--out", str(out)]]
    bench.main(commands[0])
    first = json.loads(out.read_text())
    bench.main(commands[1])
    both = json.loads(out.read_text())
    assert len(first["rows"]) == 8 and len(both["rows"]) == 16
    assert len({(r["model"], r["batch"], r["context"], r["path"]) for r in both["rows"]}) == 16
    assert both["rows"][:8] == first["rows"]  # measured once, kept as they were
    assert {r["model"] for r in both["rows"][8:]} == {"mamba2-single"}
    assert [run["command"] for run in both["meta"]["runs"]] == [
        " ".join(["python", "benchmarks/generate.py", *argv]) for argv in commands]
    assert both["meta"]["runs"][0]["date"] == first["meta"]["date"]
    both["meta"]["torch"] = "0.0"
    out.write_text(json.dumps(both))
    with pytest.raises(SystemExit, match="another torch"):
        bench.main(["--smoke", "--models", "gated_deltanet-single", "--resume", "--out", str(out)])
    assert len(json.loads(out.read_text())["rows"]) == 16
