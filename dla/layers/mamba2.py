"""DLA on the Mamba-2 base: the Mamba-2 layer of ``mamba_ssm`` with its SSD scan replaced by DLA."""

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


class DLAMamba2(DLAMixer):
    """Mamba-2 token mixer with Dynamic Linear Attention over its SSD states.

    As ``mamba_ssm.Mamba2``: ``in_proj`` to (z, x, B, C, dt), a causal depthwise convolution + SiLU
    over (x, B, C), dt = softplus(dt + dt_bias), A = -exp(A_log), and the SSD mapping onto the op:
    q = C, k = B (groups expanded to heads), v = dt·x, per-head log-decay g = dt·A, scale 1; then
    the D skip, the gated RMSNorm ``norm(y * silu(z))`` (mamba_ssm's default
    ``norm_before_gate=False``) and ``out_proj``. Heads: ``expand * hidden_size / head_dim``; the
    recurrent state of a head is ``state_size x head_dim``. ``policy="single"`` is Mamba-2.
    """

    def __init__(self, hidden_size: int, head_dim: int = 64, state_size: int = 128, expand: int = 2,
                 n_groups: int = 1, conv_size: int = 4, policy: PolicyConfig | None = None, chunk_size: int = 64,
                 norm_eps: float = 1e-5, A_init_range: tuple[float, float] = (1.0, 16.0)):
        inner = expand * hidden_size
        if inner % head_dim:
            raise ValueError(f"head_dim ({head_dim}) must divide expand * hidden_size ({inner})")
        num_heads = inner // head_dim
        if num_heads % n_groups:
            raise ValueError(f"n_groups ({n_groups}) must divide the number of heads ({num_heads})")
        super().__init__(hidden_size, num_heads, policy, chunk_size)
        self.hidden_size, self.head_dim, self.state_size = hidden_size, head_dim, state_size
        self.inner_size, self.n_groups, self.A_init_range = inner, n_groups, A_init_range
        conv_dim = inner + 2 * n_groups * state_size
        self.in_proj = nn.Linear(hidden_size, inner + conv_dim + num_heads, bias=False)
        self.conv1d = ShortConvolution(conv_dim, conv_size, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.empty(num_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(inner, group_size=inner // n_groups, eps=norm_eps, gate_first=True)
        self.out_proj = nn.Linear(inner, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """mamba_ssm's initialisation of the SSM parameters (the projections keep their own)."""
        H = self.num_heads
        copy_unless_loaded(self.dt_bias, inverse_softplus_dt(H))
        copy_unless_loaded(self.A_log, torch.empty(H).uniform_(*self.A_init_range).log())
        nn.init.ones_(self.D)
        self.reset_threshold()

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, cache: MixerCache | None = None,
                scores: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
        """``x [B, T, hidden]`` (packed: ``B = 1`` and ``cu_seqlens``) -> ``[B, T, hidden]``.
        ``cache`` continues earlier calls and is updated in place; ``scores`` for ``score="external"``;
        ``validate=False`` skips the checks that read values on the host (:meth:`DLAMixer.attend`)."""
        B, T, _ = x.shape
        H, P, N, G = self.num_heads, self.head_dim, self.state_size, self.n_groups
        z, xbc, dt = self.in_proj(x).split([self.inner_size, self.inner_size + 2 * G * N, H], -1)
        xbc = self.convolve("conv1d", xbc, cu_seqlens, cache)
        xs, b, c = xbc.split([self.inner_size, G * N, G * N], -1)
        xs = xs.unflatten(-1, (H, P))
        # each group's B and C shared by its heads: a view for one group (the planner, the soft gates and the
        # op copy them into their rows anyway, DLAMixer.step once for the one-token kernels)
        b = b.unflatten(-1, (G, 1, N)).expand(B, T, G, H // G, N).flatten(2, 3)
        c = c.unflatten(-1, (G, 1, N)).expand(B, T, G, H // G, N).flatten(2, 3)
        dt = F.softplus(dt + self.dt_bias)
        g = dt * -torch.exp(upcast(self.A_log))
        y = self.attend(x, c, b, (xs * dt[..., None]).to(xs.dtype), g, None, 1.0, cu_seqlens, cache, scores, validate)
        y = y + xs * self.D[:, None].to(xs.dtype)
        return self.out_proj(self.norm(y.flatten(-2), z))
