"""What every op shares: the state it carries between calls, input checks, and the dense view.

Inputs are sequence-first, as in flash-linear-attention: ``q, k: [B, T, H, K]``,
``v: [B, T, H, V]``, ``g, beta: [B, T, H]``, ``lam: [B, T, H, n_labels]``. The ops compute on
head-major dense rows ``[N, H, T_max, ...]`` (one sequence per row), in float64 for float64
inputs and float32 otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass

import torch

from dla.checks import nonfinite_flags
from dla.schedule.schedule import DenseSchedule, Schedule, SegmentState
from dla.varlen import check_cu_seqlens, head_major_rows, pack, unpack


@dataclass
class DLAState:
    """Everything needed to continue a sequence: ``states [N, H, C, K, V]`` (one per segment,
    slot order newest first, fp32/fp64), the segmentation (:class:`SegmentState`: segment
    starts, information, position; the open segment's length is derived), and the last key of
    each sequence for the novelty score. Its size does not depend on the sequence length.

    ``scales [N, H, C]`` (None: 1) and ``places [N, H, C]`` (int32, None: slot ``c`` at place ``c``):
    slot ``c`` holds ``scales[..., c] * states[..., places[..., c], :, :]``. The decode kernel keeps
    them (:mod:`dla.ops.triton.decode`): a Mamba-2 slot that only decays has its scale multiplied
    rather than its state rewritten, and a slot that a birth makes one slot older keeps its place in
    ``states``, so a step writes only the slots whose numbers change.
    :meth:`slot_states` applies both."""

    states: torch.Tensor
    segments: SegmentState
    prev_key: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    places: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        seg = self.segments
        tensors = [self.states, self.scales, self.places, seg.starts, seg.info, seg.position, seg.open_state,
                   seg.open_norm, self.prev_key]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def slot_states(self) -> torch.Tensor:
        """Every slot's state, newest first, ``[N, H, C, K, V]``: ``states`` in slot order (``places``)
        times their ``scales``."""
        return scaled_slots(self.states, self.scales, self.places)


def own_places(N: int, H: int, C: int, device) -> torch.Tensor:
    """``DLAState.places`` with every slot at its own place: ``int32 [N, H, C]``, ``places[..., c] = c``."""
    return torch.arange(C, dtype=torch.int32, device=device).repeat(N, H, 1)


def source_ranges(dest: torch.Tensor):
    """``dest [..., C]`` (new slot of every old slot, ``C`` = nowhere) -> the first and last old
    slot merging into every new slot, ``int32 [..., C]`` (``lo > hi`` when none). Merges only
    join neighbours, so the sources of a new slot are a contiguous range of old slots."""
    C = dest.shape[-1]
    slot = torch.arange(C, device=dest.device)
    hit = dest[..., None, :] == slot[:, None]  # [..., new, old]
    lo = torch.where(hit, slot, C).amin(-1).to(torch.int32).contiguous()
    hi = torch.where(hit, slot, -1).amax(-1).to(torch.int32).contiguous()
    return lo, hi


def new_slot_places(lo: torch.Tensor, hi: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """The place of every new slot after a step routed as ``lo, hi`` (:func:`source_ranges`), from
    the old slots' ``places [..., C]``: a slot with sources keeps the place of its oldest source
    (``hi``); the places no new slot keeps go, in order, to the slots without sources (the token's
    new segment, empty slots), in order. The decode kernel's rule (``_new_places``)."""
    C = places.shape[-1]
    old = torch.arange(C, device=places.device)
    fed = lo <= hi  # [..., new]
    oldest = fed[..., :, None] & (hi[..., :, None] == old)  # [..., new, old]
    freed = ~oldest.any(-2)  # [..., old]: a place no new slot keeps
    unfed = ~fed
    in_turn = unfed.cumsum(-1)[..., :, None] == freed.cumsum(-1)[..., None, :]  # the i-th such slot, the i-th place
    given = unfed[..., :, None] & freed[..., None, :] & in_turn
    return torch.where(oldest | given, places[..., None, :], 0).sum(-1).to(places.dtype)


def scaled_slots(states: torch.Tensor | None, scales: torch.Tensor | None,
                 places: torch.Tensor | None = None) -> torch.Tensor | None:
    """The slots of ``states [..., C, K, V]``, slot ``c`` at ``places[..., c]`` (None: at ``c``), times
    their ``scales [..., C]`` (None: 1)."""
    if states is None:
        return None
    if places is not None:
        states = torch.take_along_dim(states, places.long()[..., None, None], dim=-3)
    return states if scales is None else states * scales[..., None, None].to(states.dtype)


@dataclass
class Prepared:
    """Checked inputs as dense head-major rows, in the compute dtype (float64 for float64 inputs,
    else float32); with ``prepare(..., upcast_qkv=False)``, q, k and v in the input dtype and q
    not yet multiplied by ``scale``. ``Tm``: the longest sequence's length (``schedule.max_len``),
    or more, zero-padded, for packed inputs and ``prepare(..., chunk_size)``."""

    q: torch.Tensor  # [N, H, Tm, K], multiplied by scale (unless upcast_qkv=False)
    k: torch.Tensor  # [N, H, Tm, K]
    v: torch.Tensor  # [N, H, Tm, V]
    scale: float
    compute_dtype: torch.dtype
    g: torch.Tensor  # [N, H, Tm]
    beta: torch.Tensor | None  # [N, H, Tm]
    lam: torch.Tensor  # [N, H, Tm, n_labels]
    schedule: DenseSchedule
    cu_seqlens: torch.Tensor | None
    out_dtype: torch.dtype
    initial: torch.Tensor | None  # [N, H, C, K, V]
    initial_prev_key: torch.Tensor | None  # [N, H, K]
    initial_scales: torch.Tensor | None = None  # [N, H, C] (DLAState.scales)
    initial_places: torch.Tensor | None = None  # [N, H, C] (DLAState.places)

    def output(self, o_rows: torch.Tensor) -> torch.Tensor:
        """``[N, H, Tm, V]`` rows -> ``[B, T, H, V]`` in the input dtype."""
        o = o_rows.transpose(1, 2)
        if self.cu_seqlens is not None:
            o = pack(o, self.cu_seqlens)
        return o.to(self.out_dtype)

    def final_state(self, states: torch.Tensor, starts: torch.Tensor, sched: Schedule,
                    scales: torch.Tensor | None = None, places: torch.Tensor | None = None) -> DLAState:
        """The op's final state: ``starts`` are the op's own slot starts (absolute positions)."""
        lengths = self.schedule.lengths
        last = (lengths - 1).clamp(min=0)
        rows = torch.arange(lengths.numel(), device=lengths.device)
        prev_key = self.k[rows, :, last].detach().to(self.compute_dtype) if self.k.shape[2] else None
        if self.initial_prev_key is not None:
            keep = (lengths > 0)[:, None, None]
            prev_key = self.initial_prev_key if prev_key is None else torch.where(keep, prev_key, self.initial_prev_key)
        segments = dataclasses.replace(sched.final, starts=starts)
        return DLAState(states=states, segments=segments, prev_key=prev_key, scales=scales, places=places)


def label_dtype(n_labels: int) -> torch.dtype:
    """The narrowest integer type that holds ``n_labels`` λ labels (one byte up to 256): the chunked
    path keeps the label of every unit at every query."""
    return torch.uint8 if n_labels <= 256 else torch.int32


def _check_tensor(name, x, dims, dtype=None, device=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != len(dims):
        raise ValueError(f"{name} must have shape [{', '.join(dims)}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but q has {dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")


def _check_values(finite: dict, g: torch.Tensor, beta: torch.Tensor | None = None) -> None:
    """NaN/Inf in any of ``finite``, a positive log-decay or a ``beta`` outside [0, 1]: one host sync
    for all the checks (each would stall a GPU's queue), and an error naming the first bad argument.
    Without gradients: ``isfinite`` is composed of differentiable ops, which would keep the inputs
    for a backward that never comes."""
    with torch.no_grad():
        checks = [nonfinite_flags(finite.values()), (g > 0).any()[None]]
        if beta is not None:
            checks.append(((beta < 0) | (beta > 1)).any()[None])
        bad = torch.cat(checks)
    if bool(bad.any()):
        flags = bad.tolist()
        for name, flag in zip(finite, flags):
            if flag:
                raise ValueError(f"{name} contains NaN or Inf")
        if flags[len(finite)]:
            raise ValueError("g is a log-decay and must be <= 0")
        raise ValueError("beta is the delta rule's write strength and must be in [0, 1] (a sigmoid's output)")


def check_backend(backend: str | None, device: torch.device) -> None:
    """``ValueError`` for a backend the op does not have, or ``"triton"`` for inputs off the GPU
    (allowed under ``TRITON_INTERPRET=1``, which runs the kernels on the CPU for tests)."""
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' runs on a CUDA GPU, but the inputs are on {device}; use backend='torch' "
                         "(or None: Triton on CUDA, PyTorch elsewhere)")


def prepare(q, k, v, g, lam, schedule, beta=None, scale=None, cu_seqlens=None, initial_state=None,
            validate: bool = True, upcast_qkv: bool = True, chunk_size: int = 1) -> Prepared:
    """Validate the op inputs (``ValueError``/``TypeError`` naming the argument) and unpack them.

    ``validate=False`` skips the checks that read tensor values on the host (NaN/Inf, signs and
    ranges, the schedule's level labels against ``lam``, ``initial_state`` against the schedule):
    on a GPU each one waits for the device, and none can be in a CUDA graph. Types, shapes and
    devices are still checked. For inputs that were checked once before a run of calls, as the
    decoding steps of :func:`dla.generate` after its prompt. ``upcast_qkv=False`` leaves q, k and v
    in the input dtype and q unscaled, for a caller that converts them where it needs them and
    would otherwise keep float32 copies for its backward (:func:`dla.chunk_dla`). ``chunk_size``:
    packed inputs are unpacked straight into rows zero-padded to a whole number of chunks, head-major
    and contiguous (the scatter that unpacks them fills zeros of any length, so the chunked caller
    need not pad them again); dense rows, and packed ones that are whole chunks already, keep their
    layout (transposed views of the inputs or of the unpacked rows)."""
    _check_tensor("q", q, "BTHK")
    dt, dev = q.dtype, q.device
    B, T, H, K = q.shape
    if K == 0:
        raise ValueError(f"q and k must have a key width K >= 1, got shape {tuple(q.shape)}")
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a number (or None for K ** -0.5), got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    _check_tensor("k", k, "BTHK", dt, dev)
    _check_tensor("v", v, "BTHV", dt, dev)
    _check_tensor("g", g, "BTH", None, dev)
    _check_tensor("lam", lam, ("B", "T", "H", "n_labels"), None, dev)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if g.shape != (B, T, H):
        raise ValueError(f"g must be [B, T, H] = [{B}, {T}, {H}], got {tuple(g.shape)}")
    if beta is not None:
        _check_tensor("beta", beta, "BTH", None, dev)
        if beta.shape != (B, T, H):
            raise ValueError(f"beta must be [B, T, H] = [{B}, {T}, {H}], got {tuple(beta.shape)}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a dla.Schedule, got {type(schedule).__name__}")
    if schedule.death.shape != (B, H, T):
        raise ValueError(f"schedule is for [B, H, T] = {tuple(schedule.death.shape)}, inputs are [{B}, {H}, {T}]")
    if schedule.death.device != dev:
        raise ValueError(f"schedule is on {schedule.death.device} but q is on {dev}")
    check_cu_seqlens(cu_seqlens, B, T, dev)
    if cu_seqlens is None:
        cu_seqlens = schedule.cu_seqlens
    elif schedule.cu_seqlens is None or not torch.equal(cu_seqlens.long(), schedule.cu_seqlens.long()):
        raise ValueError("cu_seqlens differs from the cu_seqlens the schedule was planned with")
    if lam.shape[:3] != (B, T, H):
        raise ValueError(f"lam must be [B, T, H, n_labels] = [{B}, {T}, {H}, n], got {tuple(lam.shape)}")
    if validate and lam.shape[-1] < schedule.n_labels:
        raise ValueError(f"lam has {lam.shape[-1]} labels but the schedule ({schedule.label_rule} labels, "
                         f"capacity {schedule.capacity}) needs {schedule.n_labels}")
    if scale is None:
        scale = K ** -0.5
    finite = {"q": q, "k": k, "v": v, "g": g, "lam": lam, **({} if beta is None else {"beta": beta})}
    dense = schedule.dense()
    N = dense.lengths.numel()
    C = schedule.capacity
    initial = initial_scales = initial_places = prev_key0 = None
    if initial_state is not None:
        if not isinstance(initial_state, DLAState):
            raise TypeError(f"initial_state must be a dla.DLAState, got {type(initial_state).__name__}")
        if schedule.initial is None:
            raise ValueError("initial_state is given but the schedule was not planned from it; "
                             "call plan_schedule(..., initial_state=state)")
        if validate and not torch.equal(initial_state.segments.starts.to(dev), schedule.initial.starts.to(dev)):
            raise ValueError("initial_state's segments differ from those the schedule was planned from")
        V = v.shape[-1]
        if initial_state.states.shape != (N, H, C, K, V):
            raise ValueError(f"initial_state.states must be [{N}, {H}, {C}, {K}, {V}], "
                             f"got {tuple(initial_state.states.shape)}")
        _check_tensor("initial_state.states", initial_state.states, "NHCKV", None, dev)
        finite["initial_state.states"] = initial_state.states
        initial, initial_scales = initial_state.states, initial_state.scales
        if initial_scales is not None:
            if initial_scales.shape != (N, H, C):
                raise ValueError(f"initial_state.scales must be [{N}, {H}, {C}], got {tuple(initial_scales.shape)}")
            _check_tensor("initial_state.scales", initial_scales, "NHC", None, dev)
            finite["initial_state.scales"] = initial_scales
        initial_places = initial_state.places
        if initial_places is not None:
            if not isinstance(initial_places, torch.Tensor) or initial_places.shape != (N, H, C):
                raise ValueError(f"initial_state.places must be a tensor [{N}, {H}, {C}], "
                                 f"got {getattr(initial_places, 'shape', initial_places)!r}")
            if initial_places.is_floating_point() or initial_places.dtype == torch.bool:
                raise TypeError(f"initial_state.places must be an integer tensor, got {initial_places.dtype}")
            if initial_places.device != dev:
                raise ValueError(f"initial_state.places is on {initial_places.device} but q is on {dev}")
            if validate and not torch.equal(initial_places.sort(-1).values, own_places(N, H, C, dev)):
                raise ValueError(f"initial_state.places must hold a permutation of 0..{C - 1} per row")
        prev_key0 = initial_state.prev_key
    elif validate and schedule.initial is not None and (schedule.initial.starts >= 0).any():
        raise ValueError("the schedule continues earlier segments; pass their states as initial_state")
    if validate:
        _check_values(finite, g, beta)

    cdt = torch.float64 if dt == torch.float64 else torch.float32

    padded = -(-dense.max_len // chunk_size) * chunk_size

    def rows(x, upcast=True):
        if cu_seqlens is not None and padded > dense.max_len:  # one scatter, not an unpack and a pad
            return head_major_rows(x, cu_seqlens, padded, cdt if upcast else x.dtype)
        x = x.to(cdt) if upcast else x
        if cu_seqlens is not None:
            x = unpack(x, cu_seqlens, dense.max_len)
        return x.transpose(1, 2)

    q_rows = rows(q) * scale if upcast_qkv else rows(q, upcast=False)
    p = Prepared(q=q_rows, k=rows(k, upcast_qkv), v=rows(v, upcast_qkv), scale=scale, compute_dtype=cdt, g=rows(g),
                 beta=None if beta is None else rows(beta),
                 lam=rows(lam), schedule=dense, cu_seqlens=cu_seqlens, out_dtype=v.dtype,
                 initial=None if initial is None else initial.to(cdt), initial_prev_key=prev_key0,
                 initial_scales=None if initial_scales is None else initial_scales.to(cdt),
                 initial_places=initial_places)
    return p
