"""What the two DLA token mixers (Mamba-2 and Gated DeltaNet bases) share.

- :class:`PolicyConfig`: the schedule options of a layer (policy, capacity, score, ...), validated
  once and resolved to the capacity / label rule / number of λ labels the layer uses;
- :class:`LambdaProjection`: λ_t = softplus(L ⊙ (W_λ x_t)) (spec §2);
- :class:`RouterScore`: the learned ``router`` information score;
- :class:`ShortConvolution`: the causal depthwise convolution both bases put before the
  recurrence, exact across packed sequences and across calls;
- :class:`GatedRMSNorm`: the output norm with a SiLU gate (before or after normalising);
- :class:`MixerCache`: what a DLA layer carries between calls, per sequence;
- :class:`DLAMixer`: scores -> schedule -> λ -> op, the part of ``forward`` that is DLA.

Inputs are ``[B, T, ...]`` (dense) or packed ``[1, T_total, ...]`` with ``cu_seqlens``, exactly as
the ops take them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from dla.ops import DLAState, chunk_dla, recurrent_dla, recurrent_step
from dla.ops.common import own_places
from dla.schedule import (
    DEFAULT_CAPACITY,
    DEFAULT_THRESHOLD,
    LABEL_RULES,
    MERGE_RULES,
    OPEN_STATES,
    POLICIES,
    SCORES,
    plan_schedule,
    score_range,
)
from dla.schedule.soft_gate import differentiable_scores, gate_factor, opened_segments
from dla.schedule.token import plan_token
from dla.varlen import pack, seq_lengths, unpack


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def level_count(length: int) -> int:
    """Level labels (0 = the open segment) that positions ``0 .. length - 1`` can use: also the
    capacity a fenwick schedule needs for sequences of ``length`` tokens."""
    return max(length - 1, 0).bit_length() + 1


@dataclass(frozen=True)
class PolicyConfig:
    """How a DLA layer plans its segments (spec §3), validated at construction.

    ``capacity`` is resolved: ``single`` -> 1, ``fenwick`` -> bit_length(max_position_embeddings - 1) + 1
    (a fixed capacity, so a prefill and the decoding steps after it plan the same schedule),
    otherwise 30 (the paper's C). ``label_rule`` is resolved to ``level`` for ``fenwick`` and
    ``recency`` otherwise. ``dynamic`` only: ``score`` -- ``state`` (the paper's state information
    score of the token's contribution against the open state), ``state_drift``, ``novelty`` (the
    keys the layer writes; the earlier variant), ``router`` (learned, see :class:`RouterScore`) or
    ``external`` (passed to ``forward`` as ``scores``); ``merge`` -- ``density`` (the paper),
    ``least_info`` or ``oldest``; ``open_state`` -- ``decayed`` or ``plain``; ``threshold`` -- the
    initial τ (default 1.0 for the state scores, 0.5 for the others), learned per head when
    ``soft_gate`` (the training-time soft gates, temperature ``gate_temperature`` κ).
    Invalid values raise ``ValueError`` naming the field.
    """

    policy: str = "dynamic"
    capacity: int | None = None
    threshold: float | None = None
    period: int | None = None
    max_segment_len: int | None = None
    merge: str = "density"
    score: str = "state"
    open_state: str = "decayed"
    soft_gate: bool = True
    gate_temperature: float = 0.1
    label_rule: str | None = None
    max_position_embeddings: int = 2048

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.merge not in MERGE_RULES:
            raise ValueError(f"merge must be one of {MERGE_RULES}, got {self.merge!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.open_state not in OPEN_STATES:
            raise ValueError(f"open_state must be one of {OPEN_STATES}, got {self.open_state!r}")
        if not isinstance(self.soft_gate, bool):
            raise ValueError(f"soft_gate must be true or false, got {self.soft_gate!r}")
        if (isinstance(self.gate_temperature, bool) or not isinstance(self.gate_temperature, (int, float))
                or not math.isfinite(self.gate_temperature) or self.gate_temperature <= 0):
            raise ValueError(f"gate_temperature must be a number > 0, got {self.gate_temperature!r}")
        if self.label_rule is not None and self.label_rule not in LABEL_RULES:
            raise ValueError(f"label_rule must be None or one of {LABEL_RULES}, got {self.label_rule!r}")
        if not _is_int(self.max_position_embeddings) or self.max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be an int >= 1, got {self.max_position_embeddings!r}")
        if self.capacity is not None and (not _is_int(self.capacity) or self.capacity < 1):
            raise ValueError(f"capacity must be None or an int >= 1, got {self.capacity!r}")
        top = score_range(self.score)
        if self.threshold is None:
            object.__setattr__(self, "threshold", DEFAULT_THRESHOLD[self.score])
        elif (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
                or not 0 <= self.threshold <= top):
            raise ValueError(f"threshold must be a number in [0, {top:g}] for score={self.score!r}, "
                             f"got {self.threshold!r}")
        if self.max_segment_len is not None and (not _is_int(self.max_segment_len) or self.max_segment_len < 1):
            raise ValueError(f"max_segment_len must be None or an int >= 1, got {self.max_segment_len!r}")
        if self.policy == "fixed" and (not _is_int(self.period) or self.period < 1):
            raise ValueError(f"period must be an int >= 1 for policy='fixed', got {self.period!r}")
        levels = self.levels
        if self.policy == "single":
            if self.capacity not in (None, 1):
                raise ValueError(f"capacity must be 1 (or None) for policy='single', got {self.capacity}")
            capacity = 1
        elif self.policy == "fenwick":
            if self.capacity is not None and self.capacity < levels:
                raise ValueError(f"capacity must be >= {levels} for policy='fenwick' with max_position_embeddings="
                                 f"{self.max_position_embeddings}, got {self.capacity}")
            capacity = self.capacity or levels
        else:
            capacity = self.capacity or DEFAULT_CAPACITY
        object.__setattr__(self, "capacity", capacity)
        if self.label_rule is None:
            object.__setattr__(self, "label_rule", "level" if self.policy == "fenwick" else "recency")

    @property
    def levels(self) -> int:
        """Level labels a sequence of ``max_position_embeddings`` tokens can use (0 = the open segment)."""
        return level_count(self.max_position_embeddings)

    def _level_bound(self) -> int | None:
        """The most levels the layer holds (fenwick capacity, level labels), None where unbounded."""
        held = [n for n, bound in ((self.capacity, self.policy == "fenwick"),
                                   (self.n_labels, self.label_rule == "level")) if bound]
        return min(held) if self.capacity > 1 and held else None

    def fits_length(self, length: int) -> bool:
        """Whether sequences of ``length`` tokens fit the layer's fenwick capacity and level labels
        (:meth:`check_length` without the error)."""
        bound = self._level_bound()
        return bound is None or level_count(length) <= bound

    def check_length(self, length: int) -> None:
        """``ValueError`` naming ``max_position_embeddings`` unless sequences of ``length`` tokens fit
        the layer's fenwick capacity and level labels (by default, positions up to the power of two
        at or above ``max_position_embeddings``, less one): what the planner and the op check at
        every call, once, for callers whose steps skip those checks (:func:`dla.generate`)."""
        if not self.fits_length(length):
            needed, held = level_count(length), self._level_bound()
            raise ValueError(f"sequences of {length} tokens run past max_position_embeddings = "
                             f"{self.max_position_embeddings}: positions up to {length - 1} need {needed} levels, "
                             f"the layers' fenwick capacity or level labels hold {held}; raise "
                             "max_position_embeddings")

    @property
    def n_labels(self) -> int:
        """λ labels the layer projects: ``capacity`` for recency labels, :attr:`levels` for level labels."""
        if self.capacity == 1:
            return 1
        return self.capacity if self.label_rule == "recency" else self.levels

    @property
    def dynamic(self) -> bool:
        """The layer plans with the ``dynamic`` policy (and so keeps a threshold τ per head)."""
        return self.policy == "dynamic" and self.capacity > 1


class LambdaProjection(nn.Module):
    """λ_t = softplus(L ⊙ (W_λ x_t)), ``[..., heads, n_labels]`` (spec §2, as Log-Linear Attention).

    ``label_scale`` is L (ones, no weight decay) and ``proj`` is W_λ (N(0, 0.006²)), so λ ≈ ln 2
    for every label at initialisation.
    """

    def __init__(self, hidden_size: int, num_heads: int, n_labels: int):
        super().__init__()
        self.num_heads, self.n_labels = num_heads, n_labels
        self.proj = nn.Linear(hidden_size, num_heads * n_labels, bias=False)
        self.label_scale = nn.Parameter(torch.ones(num_heads, n_labels))
        self.label_scale._no_weight_decay = True
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.proj.weight, mean=0.0, std=0.006)
        nn.init.ones_(self.label_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.label_scale * self.proj(x).unflatten(-1, (self.num_heads, self.n_labels)))


def sequence_starts(cu_seqlens: torch.Tensor | None, batch: int, length: int, device) -> tuple:
    """``(rows, cols, nonempty)``: where every sequence's first token sits in a ``[batch, length]``
    (or packed ``[1, length]``) layout, and which sequences have any token in this window: a
    boolean mask, or for a dense batch a slice (all or none), which selects without reading a
    value on the host (a decoding step must not wait for the GPU)."""
    if cu_seqlens is None:
        rows = torch.arange(batch, device=device)
        cols = torch.zeros(batch, dtype=torch.long, device=device)
        return rows, cols, slice(None) if length > 0 else slice(0)
    cols = cu_seqlens[:-1].long()
    return torch.zeros_like(cols), cols, cu_seqlens[1:] > cu_seqlens[:-1]


def last_tokens(x: torch.Tensor, cu_seqlens: torch.Tensor | None, previous: torch.Tensor | None) -> torch.Tensor:
    """``[N, ...]``: each sequence's last token of ``x`` in this window, or ``previous`` (the value
    kept from earlier windows) for a sequence without tokens in it."""
    B, T = x.shape[:2]
    if cu_seqlens is None:
        return x[:, -1] if T else previous
    ends = (cu_seqlens[1:].long() - 1).clamp(min=0)
    last = x[0, ends.clamp(max=max(T - 1, 0))] if T else x.new_zeros((ends.numel(),) + x.shape[2:])
    nonempty = (cu_seqlens[1:] > cu_seqlens[:-1]).view(-1, *[1] * (x.dim() - 2))
    fallback = torch.zeros_like(last) if previous is None else previous.to(last.dtype)
    return torch.where(nonempty, last, fallback)


class RouterScore(nn.Module):
    """The ``router`` information score, H-Net-style: u_t = (1 - cos(W_a x_t, W_b x_{t-1})) / 2 per
    head, on the layer input, with u = 1 at a sequence start.

    The schedule is discrete and carries no gradient (spec §3), and this implementation adds no
    straight-through estimator, so no loss through the model reaches W_a and W_b: they are fixed
    random projections, kept as buffers (saved with the model, never trained). As parameters an
    optimizer would hold them without ever making state for them, and a checkpoint of such a run
    did not load when it resumed. Decoding keeps W_b x of each sequence's last token
    (:attr:`MixerCache.router_key`).
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = max(hidden_size // num_heads, 1)
        shape = (num_heads * self.head_dim, hidden_size)
        self.register_buffer("query_weight", torch.empty(shape))
        self.register_buffer("key_weight", torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self):
        # the cosine ignores scale: only the directions of the projected vectors matter
        nn.init.normal_(self.query_weight)
        nn.init.normal_(self.key_weight)

    def forward(self, x, cu_seqlens=None, previous_key=None):
        """Returns ``(u [B, T, H], last key [N, H, head_dim])`` for the ``[B, T, D]`` input ``x``."""
        B, T = x.shape[:2]
        with torch.no_grad():
            a = upcast(F.linear(x, self.query_weight.to(x.dtype)).unflatten(-1, (self.num_heads, self.head_dim)))
            b = upcast(F.linear(x, self.key_weight.to(x.dtype)).unflatten(-1, (self.num_heads, self.head_dim)))
            b_prev = torch.cat([torch.zeros_like(b[:, :1]), b[:, :-1]], 1)
            rows, cols, nonempty = sequence_starts(cu_seqlens, B, T, x.device)
            rows, cols = rows[nonempty], cols[nonempty]
            if previous_key is not None:
                b_prev = b_prev.index_put((rows, cols), previous_key[nonempty].to(b.dtype))
            u = (1 - F.cosine_similarity(a, b_prev, dim=-1, eps=1e-6)) / 2
            if previous_key is None:
                u = u.index_put((rows, cols), torch.ones_like(u[rows, cols]))
            return u.clamp(0, 1), last_tokens(b, cu_seqlens, previous_key)


class ShortConvolution(nn.Conv1d):
    """Causal depthwise convolution + SiLU over ``[B, T, D]``, as both bases put before the recurrence.

    Packed sequences (``cu_seqlens``) never see each other's tokens, and ``state`` (the inputs of
    each sequence's last ``kernel_size - 1`` tokens, ``[N, D, kernel_size - 1]``) continues a
    sequence exactly across calls.
    """

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = False):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, state: torch.Tensor | None = None,
                output_state: bool = True):
        """Returns ``(y [B, T, D], state [N, D, kernel_size - 1])``; the state is None unless ``output_state``
        (a layer without a cache to continue, as in training, has no use for it)."""
        B, T, D = x.shape
        W = self.kernel_size[0]
        rows = x if cu_seqlens is None else unpack(x, cu_seqlens)
        N = rows.shape[0]
        past = rows.new_zeros(N, D, W - 1) if state is None else state.to(rows.dtype)
        full = torch.cat([past, rows.transpose(1, 2)], -1)  # [N, D, W - 1 + T_max]
        y = F.silu(F.conv1d(full, self.weight, self.bias, groups=D)).transpose(1, 2)
        if cu_seqlens is not None:
            y = pack(y, cu_seqlens)
        if not output_state:
            return y, None
        if cu_seqlens is None:  # a copy: the state must not keep the whole window alive
            return y, full[..., T:].contiguous()
        # the last W - 1 inputs of each sequence end where its tokens end, not at the padded row end
        window = seq_lengths(cu_seqlens)[:, None] + torch.arange(W - 1, device=x.device)
        return y, full.gather(-1, window[:, None, :].expand(N, D, W - 1))


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of ``group_size`` channels with a SiLU gate ``z``, computed in float32.

    ``gate_first``: normalise ``x * silu(z)`` (Mamba-2's ``norm_before_gate=False``); otherwise
    ``norm(x) * silu(z)`` (Gated DeltaNet's output norm).
    """

    def __init__(self, dim: int, group_size: int | None = None, eps: float = 1e-5, gate_first: bool = False):
        super().__init__()
        self.group_size = group_size or dim
        self.eps, self.gate_first = eps, gate_first
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h, gate = upcast(x), F.silu(upcast(z))
        if self.gate_first:
            h = h * gate
        groups = h.unflatten(-1, (-1, self.group_size))
        h = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight
        if not self.gate_first:
            h = h * gate
        return h.to(x.dtype)


def inverse_softplus_dt(num_heads: int, dt_min: float = 0.001, dt_max: float = 0.1,
                        dt_init_floor: float = 1e-4) -> torch.Tensor:
    """mamba_ssm's ``dt_bias`` initialisation: softplus(dt_bias) log-uniform in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or wider if it already is (float64 stays exact for tests)."""
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)  # (promote_types is dispatched)


def copy_unless_loaded(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write an initial value, except into a parameter that Hugging Face has already loaded from a
    checkpoint (it flags those ``_is_hf_initialized`` before re-running the initialisers)."""
    if not getattr(param, "_is_hf_initialized", False):
        with torch.no_grad():
            param.copy_(value)


@dataclass
class MixerCache:
    """What a DLA layer keeps for each sequence between calls; its size does not grow with the
    number of tokens: the :class:`dla.DLAState` (segment states, segmentation, previous key), the
    convolution states by module name, and the router's last key (``score="router"`` only)."""

    state: DLAState | None = None
    conv: dict[str, torch.Tensor] = field(default_factory=dict)
    router_key: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        tensors = list(self.conv.values()) + ([] if self.router_key is None else [self.router_key])
        return (0 if self.state is None else self.state.nbytes) + sum(t.numel() * t.element_size() for t in tensors)

    def make_static(self) -> None:
        """Prepare for one-token steps replayed as a CUDA graph: give the state scales of 1 and every
        slot its own place where it has none (:attr:`dla.DLAState.scales`, :attr:`dla.DLAState.places`,
        which every step then returns), so that the steps replace the cache's tensors and never add one."""
        s = self.state
        if s is not None and s.scales is None:
            s = self.state = replace(s, scales=s.states.new_ones(s.states.shape[:3]))
        if s is not None and s.places is None:
            self.state = replace(s, places=own_places(*s.states.shape[:3], s.states.device))

    def index_select(self, index: torch.Tensor) -> None:
        """Keep (and reorder, repeat) the sequences ``index`` -- beam search and batch expansion."""
        if self.state is None:
            return
        index = index.to(self.state.states.device)
        s = self.state
        self.state = DLAState(states=s.states[index], segments=s.segments.index_select(index),
                              prev_key=None if s.prev_key is None else s.prev_key[index],
                              scales=None if s.scales is None else s.scales[index],
                              places=None if s.places is None else s.places[index])
        self.conv = {name: c[index] for name, c in self.conv.items()}
        if self.router_key is not None:
            self.router_key = self.router_key[index]


class DLAMixer(nn.Module):
    """The DLA part of a token mixer: information scores, the schedule, λ and the op.

    Subclasses build the base layer's projections, call :meth:`convolve` for their short
    convolutions and :meth:`attend` with the base's (q, k, v, g, beta). ``policy="single"`` has no
    λ projection (λ ≡ 1), so it is the base layer exactly. The ``dynamic`` policy keeps its threshold
    τ per head in ``threshold``: a parameter, learned through the soft gates, when ``soft_gate``,
    else a buffer.
    """

    def __init__(self, hidden_size: int, num_heads: int, policy: PolicyConfig | None, chunk_size: int):
        super().__init__()
        self.policy = policy if policy is not None else PolicyConfig()
        self.num_heads, self.chunk_size = num_heads, chunk_size
        p = self.policy
        self.lam_proj = None if p.policy == "single" else LambdaProjection(hidden_size, num_heads, p.n_labels)
        self.router = (RouterScore(hidden_size, num_heads) if p.policy == "dynamic" and p.score == "router"
                       else None)
        tau = torch.full((num_heads,), float(p.threshold)) if p.dynamic else None
        if p.dynamic and p.soft_gate:
            self.threshold = nn.Parameter(tau)
            self.threshold._no_weight_decay = True
        else:
            self.register_buffer("threshold", tau)
        # set by inspection tools: keep the last forward's schedule and scores on the module
        self.record_schedule = False
        self.last_schedule = self.last_scores = None

    def reset_threshold(self):
        """τ back to the configured value (kept if Hugging Face has loaded it from a checkpoint)."""
        if self.threshold is not None:
            copy_unless_loaded(self.threshold, torch.full_like(self.threshold, float(self.policy.threshold)))

    def convolve(self, name: str, x: torch.Tensor, cu_seqlens, cache: MixerCache | None) -> torch.Tensor:
        """Run the :class:`ShortConvolution` ``name`` and keep its state in ``cache``."""
        y, state = getattr(self, name)(x, cu_seqlens, None if cache is None else cache.conv.get(name),
                                       output_state=cache is not None)
        if cache is not None:
            cache.conv[name] = state
        return y

    def information_scores(self, x, cu_seqlens, cache: MixerCache | None, scores):
        """Given scores u ``[B, T, H]`` for the ``dynamic`` policy's ``router`` and ``external`` scores
        (None otherwise: the planner computes the state and novelty scores from k, v, g, beta and the
        cache's state)."""
        p = self.policy
        if p.policy != "dynamic":
            return None
        B, T = x.shape[:2]
        if p.score == "external":
            if scores is None:
                raise ValueError("score='external' needs scores [B, T, heads] passed to forward")
            if tuple(scores.shape) != (B, T, self.num_heads):
                raise ValueError(f"scores must be [B, T, heads] = [{B}, {T}, {self.num_heads}], "
                                 f"got {tuple(scores.shape)}")
            return scores
        if scores is not None:
            raise ValueError(f"scores are only used with score='external', this layer has score={p.score!r}")
        if p.score == "router":
            u, last = self.router(x, cu_seqlens, None if cache is None else cache.router_key)
            if cache is not None:
                cache.router_key = last
            return u
        return None

    def attend(self, x, q, k, v, g, beta, scale, cu_seqlens=None, cache: MixerCache | None = None, scores=None,
               validate: bool = True):
        """Plan the schedule and run the op; ``x`` is the layer input (for λ and the router).
        A single token per sequence continuing a cache runs the recurrent step, anything else the
        chunked path. Returns ``o [B, T, H, V]`` and leaves the final state in ``cache``.
        ``validate=False``: the planner and the recurrent step skip the checks that read tensor
        values on the host (the chunked path always checks); a single token per sequence then
        runs :meth:`step`, which gives the same numbers with far fewer operations."""
        p = self.policy
        B, T, H = q.shape[:3]
        state = None if cache is None else cache.state
        u = self.information_scores(x, cu_seqlens, cache, scores)
        gated = p.dynamic and p.soft_gate and self.training and torch.is_grad_enabled()
        if state is not None and cu_seqlens is None and T == 1 and not validate and not gated \
                and not self.record_schedule:
            return self.step(x, q, k, v, g, beta, scale, cache, u)
        try:
            schedule = plan_schedule(p.policy, batch=B, heads=H, length=T, capacity=p.capacity,
                                     threshold=self.threshold.detach() if p.dynamic else p.threshold, score=p.score,
                                     merge=p.merge, open_state=p.open_state, k=k, v=v, g=g, beta=beta, scores=u,
                                     period=p.period, max_segment_len=p.max_segment_len, cu_seqlens=cu_seqlens,
                                     label_rule=p.label_rule, initial_state=state, device=q.device, keep_trace=gated,
                                     validate=validate)
        except ValueError as error:
            if p.policy == "fenwick" and str(error).startswith("fenwick needs capacity"):
                raise ValueError(f"a sequence runs past max_position_embeddings = {p.max_position_embeddings}, which "
                                 f"fixes the fenwick capacity at {p.capacity} states ({error}); raise "
                                 "max_position_embeddings") from error
            raise
        if self.record_schedule:
            self.last_schedule, self.last_scores = schedule, schedule.scores
        if gated:
            prev_key = None if state is None else state.prev_key
            info = differentiable_scores(schedule, p.score, k, v, g, beta, p.open_state, cu_seqlens, prev_key)
            factor = gate_factor(info, opened_segments(schedule), self.threshold, p.gate_temperature)
            v = v * factor.to(v.dtype)[..., None]
        lam = q.new_ones(B, T, H, 1) if self.lam_proj is None else self.lam_proj(x)
        kwargs = dict(beta=beta, scale=scale, initial_state=state, output_final_state=cache is not None,
                      cu_seqlens=cu_seqlens)
        if state is not None and cu_seqlens is None and T == 1:
            o, final = recurrent_dla(q, k, v, g, lam, schedule, validate=validate, **kwargs)
        else:
            o, final = chunk_dla(q, k, v, g, lam, schedule, chunk_size=self.chunk_size, **kwargs)
        if cache is not None:
            cache.state = final
        return o

    def step(self, x, q, k, v, g, beta, scale, cache: MixerCache, scores=None):
        """One token per sequence continuing ``cache``, unchecked (a decoding step): the schedule
        planned straight from the cache's segmentation (:func:`dla.schedule.token.plan_token`) and
        the op's one-token step (:func:`dla.ops.recurrent_step`), with the numbers, final state and
        segmentation of the general path. On CUDA the kernels update the cache's states and open state
        in place (the cache owns them), so a captured step allocates and copies no state.
        ``scores``: the layer's given scores ``[B, 1, H]``."""
        p = self.policy
        state = cache.state
        # the one-token kernels read q and k contiguous: expanded ones (Mamba-2's groups, shared by their
        # heads) are copied once here, not by the planner and the step each; k in the float32 (or float64)
        # that the planner's terms and the state's previous key take it in, which the step reads the same
        q = q.contiguous()
        k = upcast(k).contiguous()
        lam = None if self.lam_proj is None else self.lam_proj(x)
        plan = plan_token(p.policy, state, threshold=self.threshold.detach() if p.dynamic else p.threshold,
                          score=p.score, merge=p.merge, open_state=p.open_state, k=k, v=v, g=g, beta=beta,
                          scores=scores, period=p.period, max_segment_len=p.max_segment_len, label_rule=p.label_rule,
                          lam=lam, inplace=True)
        o, cache.state = recurrent_step(q, k, v, g, plan.lam, plan.dest, state, plan.segments,
                                        beta=beta, scale=scale, ranges=plan.ranges, inplace=True)
        return o


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model``, a tied (shared) parameter counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
