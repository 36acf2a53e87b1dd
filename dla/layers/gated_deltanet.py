"""DLA on the Gated DeltaNet base: flash-linear-attention's ``GatedDeltaNet`` layer with its delta
rule replaced by DLA."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dla.layers.common import (
    DLAMixer,
    GatedRMSNorm,
    MixerCache,
    PolicyConfig,
    ShortConvolution,
    copy_unless_loaded,
    inverse_softplus_dt,
    upcast,
)


def l2_normalize(*xs: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, ...]:
    """fla's ``l2norm`` of each of ``xs`` (tensors of one shape and dtype): x / sqrt(sum x² + eps), in
    float32 (or wider). They are normalised together, stacked, so that a decoding step launches one
    set of kernels for q and k, not two."""
    h = upcast(torch.stack(xs))
    return (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + eps)).to(xs[0].dtype).unbind(0)


class DLAGatedDeltaNet(DLAMixer):
    """Gated DeltaNet token mixer with Dynamic Linear Attention over its delta-rule states.

    As fla's ``GatedDeltaNet`` (``use_gate=True``, short convolutions on): q/k/v projections, each
    followed by a causal depthwise convolution + SiLU, L2-normalised q and k, β = sigmoid(b_proj x),
    g = -exp(A_log) · softplus(a_proj x + dt_bias), scale ``head_dim^-1/2``, then a per-head gated
    RMSNorm ``norm(o) * silu(g_proj x)`` and ``o_proj``. Keys are ``head_dim`` wide, values
    ``head_dim * expand_v``. ``policy="single"`` is Gated DeltaNet.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, expand_v: float = 2.0, conv_size: int = 4,
                 policy: PolicyConfig | None = None, chunk_size: int = 64, norm_eps: float = 1e-5):
        value_dim = head_dim * expand_v
        if value_dim != int(value_dim):
            raise ValueError(f"head_dim * expand_v must be an integer, got {head_dim} * {expand_v}")
        super().__init__(hidden_size, num_heads, policy, chunk_size)
        self.hidden_size, self.head_dim, self.head_v_dim = hidden_size, head_dim, int(value_dim)
        key_size, value_size = num_heads * head_dim, num_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_size, bias=False)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.g_proj = nn.Linear(hidden_size, value_size, bias=False)
        self.q_conv1d = ShortConvolution(key_size, conv_size)
        self.k_conv1d = ShortConvolution(key_size, conv_size)
        self.v_conv1d = ShortConvolution(value_size, conv_size)
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_size, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """fla's initialisation of the gate parameters (the projections keep their own)."""
        copy_unless_loaded(self.A_log, torch.empty(self.num_heads).uniform_(0, 16).log())
        copy_unless_loaded(self.dt_bias, inverse_softplus_dt(self.num_heads))
        self.reset_threshold()

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, cache: MixerCache | None = None,
                scores: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
        """``x [B, T, hidden]`` (packed: ``B = 1`` and ``cu_seqlens``) -> ``[B, T, hidden]``.
        ``cache`` continues earlier calls and is updated in place; ``scores`` for ``score="external"``;
        ``validate=False`` skips the checks that read values on the host (:meth:`DLAMixer.attend`)."""
        H = self.num_heads
        q = self.convolve("q_conv1d", self.q_proj(x), cu_seqlens, cache).unflatten(-1, (H, self.head_dim))
        k = self.convolve("k_conv1d", self.k_proj(x), cu_seqlens, cache).unflatten(-1, (H, self.head_dim))
        v = self.convolve("v_conv1d", self.v_proj(x), cu_seqlens, cache).unflatten(-1, (H, self.head_v_dim))
        q, k = l2_normalize(q, k)
        beta = torch.sigmoid(self.b_proj(x))
        g = -torch.exp(upcast(self.A_log)) * F.softplus(upcast(self.a_proj(x)) + self.dt_bias)
        o = self.attend(x, q, k, v, g, beta, self.head_dim ** -0.5, cu_seqlens, cache, scores, validate)
        o = self.o_norm(o, self.g_proj(x).unflatten(-1, (H, self.head_v_dim)))
        return self.o_proj(o.flatten(-2))
