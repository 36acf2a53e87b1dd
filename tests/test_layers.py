"""Token-mixer layers: the DLA policies on both bases, the base reductions, decoding, varlen, init."""

import math

import pytest
import torch
import torch.nn.functional as F
from mixer_helpers import max_err, one_thread  # noqa: F401 (one_thread is an autouse fixture)

import dla
from dla.layers import (
    Attention,
    DLAGatedDeltaNet,
    DLAMamba2,
    KVCache,
    LambdaProjection,
    MixerCache,
    PolicyConfig,
    ShortConvolution,
)

HIDDEN, MAXPOS = 32, 256
POLICY_CASES = {  # name -> PolicyConfig kwargs
    "single": dict(policy="single"),
    "fixed": dict(policy="fixed", capacity=4, period=5),
    "fenwick": dict(policy="fenwick"),
    "dynamic": dict(policy="dynamic", capacity=4, threshold=0.5),
    "dynamic-level": dict(policy="dynamic", capacity=4, label_rule="level", max_segment_len=6),
    "dynamic-router": dict(policy="dynamic", capacity=4, score="router"),
    "dynamic-novelty": dict(policy="dynamic", capacity=4, score="novelty", merge="least_info", threshold=0.5),
    "dynamic-drift": dict(policy="dynamic", capacity=4, score="state_drift", open_state="plain", threshold=0.3),
}


def make_layer(base, policy_case="dynamic", chunk_size=16):
    policy = PolicyConfig(max_position_embeddings=MAXPOS, **POLICY_CASES[policy_case])
    if base == "mamba2":
        return DLAMamba2(HIDDEN, head_dim=16, state_size=8, policy=policy, chunk_size=chunk_size)
    return DLAGatedDeltaNet(HIDDEN, num_heads=2, head_dim=16, policy=policy, chunk_size=chunk_size)


# ----------------------------------------------------------------------------- policy options
@pytest.mark.parametrize("kwargs, field", [
    (dict(policy="greedy"), "policy"),
    (dict(score="entropy"), "score"),
    (dict(label_rule="oldest"), "label_rule"),
    (dict(merge="newest"), "merge"),
    (dict(capacity=0), "capacity"),
    (dict(capacity=2.5), "capacity"),
    (dict(policy="single", capacity=4), "capacity"),
    (dict(policy="fenwick", capacity=3), "capacity"),
    (dict(threshold=2.5), "threshold"),
    (dict(threshold=1.5, score="novelty"), "threshold"),
    (dict(open_state="fresh"), "open_state"),
    (dict(soft_gate="yes"), "soft_gate"),
    (dict(gate_temperature=0.0), "gate_temperature"),
    (dict(threshold=-0.1), "threshold"),
    (dict(threshold=True), "threshold"),
    (dict(policy="fixed"), "period"),
    (dict(policy="fixed", period=0), "period"),
    (dict(max_segment_len=0), "max_segment_len"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
])
def test_policy_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PolicyConfig(**kwargs)


def test_policy_config_resolves_capacity_and_labels():
    assert PolicyConfig(policy="single").capacity == 1
    assert PolicyConfig(policy="single").n_labels == 1
    fenwick = PolicyConfig(policy="fenwick", max_position_embeddings=2048)
    assert (fenwick.capacity, fenwick.label_rule, fenwick.n_labels) == (12, "level", 12)
    dynamic = PolicyConfig()  # the paper's DLA
    assert (dynamic.capacity, dynamic.label_rule, dynamic.n_labels) == (30, "recency", 30)
    assert (dynamic.score, dynamic.merge, dynamic.open_state, dynamic.threshold, dynamic.soft_gate) == (
        "state", "density", "decayed", 1.0, True)
    assert PolicyConfig(score="novelty").threshold == 0.5
    assert PolicyConfig(capacity=5, label_rule="level", max_position_embeddings=100).n_labels == 8


# ----------------------------------------------------------------------------- training path
@pytest.mark.parametrize("policy_case", list(POLICY_CASES))
@pytest.mark.parametrize("base", ["mamba2", "gated_deltanet"])
def test_forward_backward(base, policy_case):
    layer = make_layer(base, policy_case)
    x = torch.randn(2, 37, HIDDEN, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():  # the router's projections are buffers: no gradient reaches them
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    print(f"{base} {policy_case}: {dla.count_parameters(layer)} parameters")


@pytest.mark.parametrize("base", ["mamba2", "gated_deltanet"])
def test_dynamic_policy_opens_and_merges_segments(base):
    """The layer's schedule is not degenerate: several segments, and the capacity binds."""
    layer = make_layer(base, "dynamic")
    cache = MixerCache()
    with torch.no_grad():
        layer(torch.randn(2, 60, HIDDEN), cache=cache)
    count = cache.state.segments.count
    assert (count > 1).all() and (count <= 4).all() and (count == 4).any()


@pytest.mark.parametrize("base", ["mamba2", "gated_deltanet"])
def test_external_scores(base):
    layer = make_layer(base, "dynamic")
    layer.policy = PolicyConfig(policy="dynamic", capacity=4, score="external")
    x, H = torch.randn(1, 20, HIDDEN), layer.num_heads
    with pytest.raises(ValueError, match="scores"):
        layer(x)
    with pytest.raises(ValueError, match="scores must be"):
        layer(x, scores=torch.ones(1, 20, H + 1))
    never = layer(x, scores=torch.zeros(1, 20, H))
    always = layer(x, scores=torch.ones(1, 20, H))
    assert max_err(never, always) > 1e-4


# ----------------------------------------------------------------------------- base reductions
def mamba2_recurrence(layer: DLAMamba2, x):
    """Mamba-2 written out: conv with zero left padding, SSD recurrence per token, D skip, gated norm."""
    H, P, N = layer.num_heads, layer.head_dim, layer.state_size
    z, xbc, dt = layer.in_proj(x).split([layer.inner_size, layer.inner_size + 2 * N, H], -1)
    W = layer.conv1d.kernel_size[0]
    xbc = F.silu(F.conv1d(F.pad(xbc.transpose(1, 2), (W - 1, 0)), layer.conv1d.weight, layer.conv1d.bias,
                          groups=xbc.shape[-1])).transpose(1, 2)
    xs, b, c = xbc.split([layer.inner_size, N, N], -1)
    xs = xs.unflatten(-1, (H, P))
    dt = F.softplus(dt + layer.dt_bias)
    A = -torch.exp(layer.A_log)
    S = x.new_zeros(x.shape[0], H, N, P)
    ys = []
    for t in range(x.shape[1]):
        S = torch.exp(dt[:, t] * A)[..., None, None] * S + dt[:, t, :, None, None] * b[:, t, None, :, None] \
            * xs[:, t, :, None, :]
        ys.append(torch.einsum("bn,bhnp->bhp", c[:, t], S))
    y = torch.stack(ys, 1) + xs * layer.D[:, None]
    h = y.flatten(-2) * F.silu(z)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + layer.norm.eps) * layer.norm.weight
    return layer.out_proj(h)


def gated_deltanet_recurrence(layer: DLAGatedDeltaNet, x):
    """Gated DeltaNet written out: S <- exp(g)(I - β k kᵀ) S + β k vᵀ, o = scale Sᵀ q, gated norm."""
    H, K, V = layer.num_heads, layer.head_dim, layer.head_v_dim

    def conv(module, h):
        W = module.kernel_size[0]
        return F.silu(F.conv1d(F.pad(h.transpose(1, 2), (W - 1, 0)), module.weight, groups=h.shape[-1])).transpose(1, 2)

    def l2norm(h):  # fla's form
        return h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + 1e-6)

    q = l2norm(conv(layer.q_conv1d, layer.q_proj(x)).unflatten(-1, (H, K)))
    k = l2norm(conv(layer.k_conv1d, layer.k_proj(x)).unflatten(-1, (H, K)))
    v = conv(layer.v_conv1d, layer.v_proj(x)).unflatten(-1, (H, V))
    beta = torch.sigmoid(layer.b_proj(x))
    g = -torch.exp(layer.A_log) * F.softplus(layer.a_proj(x) + layer.dt_bias)
    S = x.new_zeros(x.shape[0], H, K, V)
    outs = []
    for t in range(x.shape[1]):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        S = torch.exp(g[:, t])[..., None, None] * (S - bt * kt[..., :, None] * torch.einsum("bhk,bhkv->bhv", kt, S)[
            ..., None, :])
        S = S + bt * kt[..., :, None] * v[:, t, :, None, :]
        outs.append(K ** -0.5 * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, 1)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight
    o = o * F.silu(layer.g_proj(x).unflatten(-1, (H, V)))
    return layer.o_proj(o.flatten(-2))


@pytest.mark.parametrize("base", ["mamba2", "gated_deltanet"])
def test_single_policy_is_the_base_layer(base):
    """policy='single' has no λ and computes the hand-written base recurrence; its parameters are
    exactly the base layer's."""
    layer = make_layer(base, "single").double()
    assert layer.lam_proj is None
    x = torch.randn(2, 45, HIDDEN, dtype=torch.float64)
    reference = mamba2_recurrence if base == "mamba2" else gated_deltanet_recurrence
    assert max_err(layer(x), reference(layer, x)) < 1e-10
    d = HIDDEN
    if base == "mamba2":  # mamba_ssm.Mamba2 with ngroups=1, conv bias, no projection biases
        inner, N, H = layer.inner_size, layer.state_size, layer.num_heads
        base_count = d * (2 * inner + 2 * N + H) + (inner + 2 * N) * 5 + 3 * H + inner + inner * d
    else:  # fla GatedDeltaNet, use_gate=True, use_short_conv=True
        key, value, H = layer.num_heads * layer.head_dim, layer.num_heads * layer.head_v_dim, layer.num_heads
        base_count = 2 * d * key + 2 * d * value + 2 * d * H + (2 * key + value) * 4 + 2 * H + layer.head_v_dim \
            + value * d
    assert dla.count_parameters(layer) == base_count


@pytest.mark.parametrize("base", ["mamba2", "gated_deltanet"])
def test_capacity_one_with_unit_lambda_is_the_single_layer(base):
    """Any policy at capacity 1 with λ forced to 1 is the base layer."""
    single = make_layer(base, "single")
    dynamic = make_layer(base, "dynamic")
    dynamic.policy = PolicyConfig(policy="dynamic", capacity=1)
    dynamic.load_state_dict(single.state_dict(), strict=False)
    dynamic.lam_proj = LambdaProjection(HIDDEN, dynamic.num_heads, 1)
    torch.nn.init.zeros_(dynamic.lam_proj.proj.weight)
    dynamic.lam_proj.forward = lambda x: torch.ones(*x.shape[:2], dynamic.num_heads, 1)
    x = torch.randn(2, 40, HIDDEN)
    assert max_err(dynamic(x), single(x)) < 1e-6


# ----------------------------------------------------------------------------- λ parameterisation
def test_lambda_is_ln2_at_init_and_L_has_no_weight_decay():
    proj = LambdaProjection(64, num_heads=4, n_labels=6)
    assert proj.label_scale._no_weight_decay and torch.equal(proj.label_scale, torch.ones(4, 6))
    assert abs(proj.proj.weight.std().item() - 0.006) < 0.0005
    lam = proj(torch.randn(8, 50, 64))
    assert lam.shape == (8, 50, 4, 6)
    assert abs(lam.mean().item() - math.log(2)) < 2e-3
    assert (lam - math.log(2)).abs().max() < 0.12


@pytest.mark.parametrize("base", ["mamba2", "gated_deltanet"])
def test_no_weight_decay_marks(base):
    layer = make_layer(base, "dynamic")
    marked = {n for n, p in layer.named_parameters() if getattr(p, "_no_weight_decay", False)}
    expected = {"A_log", "dt_bias", "lam_proj.label_scale", "threshold"} | ({"D"} if base == "mamba2" else set())
    assert marked == expected


# ----------------------------------------------------------------------------- decoding and varlen
@pytest.mark.parametrize("policy_case", list(POLICY_CASES))
@pytest.mark.parametrize("base", ["mamba2", "gated_deltanet"])
def test_packed_prefill_then_steps_equal_full_forward(base, policy_case):
    """Two sequences (23 and 9 tokens) prefilled packed with cu_seqlens, then decoded token by token
    as a dense batch, equal each sequence's full forward."""
    layer = make_layer(base, policy_case).eval()
    lengths, total = (23, 9), 40
    xs = [torch.randn(1, total, HIDDEN) for _ in lengths]
    with torch.no_grad():
        full = [layer(x) for x in xs]
        cache = MixerCache()
        prompt = torch.cat([x[:, :n] for x, n in zip(xs, lengths)], 1)
        cu = torch.tensor([0, lengths[0], sum(lengths)])
        out = layer(prompt, cu_seqlens=cu, cache=cache)
        assert max_err(out[:, :lengths[0]], full[0][:, :lengths[0]]) < 1e-5
        assert max_err(out[:, lengths[0]:], full[1][:, :lengths[1]]) < 1e-5
        steps = min(total - n for n in lengths)
        for i in range(steps):
            token = torch.cat([x[:, n + i:n + i + 1] for x, n in zip(xs, lengths)], 0)
            out = layer(token, cache=cache)
            for b, n in enumerate(lengths):
                assert max_err(out[b], full[b][0, n + i:n + i + 1]) < 1e-5


def test_short_convolution_varlen_and_continuation():
    conv = ShortConvolution(6, kernel_size=4, bias=True)
    a, b = torch.randn(1, 7, 6), torch.randn(1, 2, 6)
    ya, _ = conv(a)
    yb, _ = conv(b)
    packed, state = conv(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 7, 9]))
    assert max_err(packed, torch.cat([ya, yb], 1)) < 1e-6
    # continue both sequences (one with no new tokens) and compare with the unsplit runs
    more = torch.randn(1, 3, 6)
    cont, state2 = conv(more, cu_seqlens=torch.tensor([0, 3, 3]), state=state)
    y_full, _ = conv(torch.cat([a, more], 1))
    assert max_err(cont, y_full[:, 7:]) < 1e-6
    assert torch.equal(state2[1], state[1])


def test_attention_packed_and_cached_equal_dense():
    attn = Attention(HIDDEN, num_heads=2, head_dim=16).eval()
    a, b = torch.randn(1, 19, HIDDEN), torch.randn(1, 6, HIDDEN)
    with torch.no_grad():
        ya, yb = attn(a), attn(b)
        cache = KVCache()
        packed = attn(torch.cat([a[:, :12], b[:, :3]], 1), cu_seqlens=torch.tensor([0, 12, 15]), cache=cache)
        assert max_err(packed, torch.cat([ya[:, :12], yb[:, :3]], 1)) < 1e-5
        for i in range(3):
            out = attn(torch.cat([a[:, 12 + i:13 + i], b[:, 3 + i:4 + i]], 0), cache=cache)
            assert max_err(out[0], ya[0, 12 + i:13 + i]) < 1e-5 and max_err(out[1], yb[0, 3 + i:4 + i]) < 1e-5
    assert cache.length.tolist() == [15, 6]


def test_router_scores_start_at_one_and_continue():
    layer = make_layer("mamba2", "dynamic-router")
    x = torch.randn(1, 12, HIDDEN)
    u, last = layer.router(x)
    assert torch.all(u[:, 0] == 1) and u.shape == (1, 12, layer.num_heads)
    u_head, last_head = layer.router(x[:, :5])
    u_tail, _ = layer.router(x[:, 5:], previous_key=last_head)
    assert max_err(torch.cat([u_head, u_tail], 1), u) < 1e-6
