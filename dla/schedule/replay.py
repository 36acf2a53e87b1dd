"""Plan once per training step under activation checkpointing: the recomputed forward replays the walks.

A checkpointed block runs its forward twice per step, the second time in the backward pass from the
same inputs (and the same τ), so the ``dynamic`` policy plans the same schedule twice. The sequential
walk is most of that cost; the rest (the chunk-parallel terms, the open state at every chunk start,
the soft gates' scores with gradients) is what the backward pass needs again anyway.

:func:`walk_replay_contexts` is a ``context_fn`` for non-reentrant ``torch.utils.checkpoint``: the
first context records the outputs of every walk planned in the checkpointed forward (per token and
per slot: deaths, the scores used, the open segment's start and ``‖O‖²`` where the soft gates need
them, the carried deaths, the final slots and ``‖O‖²``, and where the open segment starts after each
planning chunk), the second hands them back, in the same order, to the recomputation's planner
through :class:`ReplayingWalker`, which has the walker interface but walks nothing. Everything the
planner computes around the walk runs as in the first pass, so the schedule, the open states and the
trace come out bit for bit the same. The open states per chunk (``[R, NC, K, V]``) are recomputed,
never kept. The other policies are closed forms of positions and plan nothing worth keeping.

Each checkpointed call gets its own record (``context_fn`` is called once per call), so a block used
twice in a forward, or several forwards before one backward, replay their own walks.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from dataclasses import dataclass

import torch

_ACTIVE: ContextVar[WalkMemo | None] = ContextVar("dla_walk_memo", default=None)


@dataclass
class WalkRecord:
    """What one walk decided: ``finish`` (the walker's ``(death, carried, starts, info)``), the final
    ``open_norm [R]``, ``open_starts`` (one ``[R]`` per planning chunk, in order), and the trace it
    wrote, ``[R, Tm]``: ``scores`` and, when the soft gates keep them, ``open_start`` and ``open_norm``
    before each token (``trace_open_start`` / ``trace_open_norm``)."""

    finish: tuple
    open_norm: torch.Tensor
    open_starts: list
    scores: torch.Tensor
    trace_open_start: torch.Tensor | None
    trace_open_norm: torch.Tensor | None


def _copy(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.clone()


class RecordingWalker:
    """A walker (``TorchWalker`` or ``TritonWalker``) whose decisions are appended to ``walks`` when it
    finishes."""

    def __init__(self, walker, walks: list):
        self.walker, self.walks = walker, walks
        self.open_starts = []

    @property
    def open_norm(self) -> torch.Tensor:
        return self.walker.open_norm

    def start(self, Tm: int, trace):
        self.trace = trace
        self.walker.start(Tm, trace)

    def walk(self, a: int, b: int, **kwargs):
        self.walker.walk(a, b, **kwargs)

    def open_start(self) -> torch.Tensor:
        start = self.walker.open_start()
        self.open_starts.append(start)
        return start

    @property
    def walks_windows(self) -> bool:
        return getattr(self.walker, "walks_windows", False)

    def walk_window(self, *args):
        open_state, states, open_starts = self.walker.walk_window(*args)
        self.open_starts.extend(open_starts.unbind(0))
        return open_state, states, open_starts

    def finish(self, N: int, H: int):
        out = self.walker.finish(N, H)
        t = self.trace
        # copies: the planner hands these tensors on, and what it hands on must not change the record
        self.walks.append(WalkRecord(tuple(x.clone() for x in out), self.walker.open_norm.clone(), self.open_starts,
                                     t.scores.clone(), _copy(t.open_start), _copy(t.open_norm)))
        return out


class ReplayingWalker:
    """The walker interface over a :class:`WalkRecord`: the recorded trace is written at ``start``,
    ``walk`` decides nothing, ``open_start`` and ``finish`` return what the recorded walk returned."""

    def __init__(self, record: WalkRecord):
        self.record = record
        self.open_norm = record.open_norm
        self.chunks_walked = 0

    def start(self, Tm: int, trace):
        r = self.record
        if (trace.scores.shape != r.scores.shape or trace.scores.dtype != r.scores.dtype
                or (trace.open_start is None) != (r.trace_open_start is None)):
            raise RuntimeError(f"activation checkpointing: the recomputed forward plans {tuple(trace.scores.shape)} "
                               f"{trace.scores.dtype} scores where its first pass planned {tuple(r.scores.shape)} "
                               f"{r.scores.dtype}; a checkpointed forward must plan the same walks in the same order")
        trace.scores.copy_(r.scores)
        if trace.open_start is not None:
            trace.open_start.copy_(r.trace_open_start)
            trace.open_norm.copy_(r.trace_open_norm)

    def walk(self, a: int, b: int, **kwargs):
        """Nothing to decide: the record holds the decisions for every token."""

    def open_start(self) -> torch.Tensor:
        start = self.record.open_starts[self.chunks_walked]
        self.chunks_walked += 1
        return start

    def finish(self, N: int, H: int):
        return tuple(x.clone() for x in self.record.finish)


class WalkMemo:
    """While entered, :func:`planning_walker` asks it for the walker; ``walks`` is the record shared by
    a checkpointed forward and its recomputations. Entered again for every recomputation (a second
    backward through a retained graph recomputes too)."""

    def __init__(self, walks: list):
        self.walks = walks
        self.tokens = []

    def __enter__(self):
        self.tokens.append(_ACTIVE.set(self))
        return self

    def __exit__(self, *exc):
        _ACTIVE.reset(self.tokens.pop())


class RecordWalks(WalkMemo):
    """The checkpointed forward's context: every walk is run and recorded."""

    def walker(self, Walker, *args):
        return RecordingWalker(Walker(*args), self.walks)


class ReplayWalks(WalkMemo):
    """The recomputation's context: the recorded walks are replayed in the order they were planned."""

    def __enter__(self):
        self.replayed = 0
        return super().__enter__()

    def walker(self, Walker, *args):
        return ReplayingWalker(self.next_record())

    def next_record(self) -> WalkRecord:
        """The record of the next walk the recomputation plans."""
        record = self.peek_record()
        self.replayed += 1
        return record

    def peek_record(self) -> WalkRecord:
        """The record :meth:`next_record` returns next, left for it."""
        if self.replayed == len(self.walks):
            raise RuntimeError(f"activation checkpointing: the recomputed forward plans more walks than its first "
                               f"pass ({len(self.walks)}); a checkpointed forward must plan the same walks in the "
                               "same order")
        return self.walks[self.replayed]


def walk_replay_contexts() -> tuple[RecordWalks, ReplayWalks]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the
    recomputation replays the ``dynamic`` policy's walks of the forward instead of walking again."""
    walks = []
    return RecordWalks(walks), ReplayWalks(walks)


def active_memo() -> WalkMemo | None:
    """The checkpointing context the planner runs in (recording or replaying walks), if any."""
    return _ACTIVE.get()


def planning_walker(Walker, *args):
    """The walker :func:`dla.schedule.dynamic.plan_dynamic` uses: ``Walker(*args)``, recorded in a
    checkpointed forward, or the recorded walk in its recomputation."""
    memo = active_memo()
    return Walker(*args) if memo is None else memo.walker(Walker, *args)


def with_walk_replay(checkpoint_func):
    """``checkpoint_func`` -- ``torch.utils.checkpoint.checkpoint`` with its keywords bound by
    ``functools.partial``, as Hugging Face hands it to the layers -- with :func:`walk_replay_contexts`
    as its ``context_fn``. Only non-reentrant checkpointing takes a ``context_fn``: a function that
    does not bind ``use_reentrant=False``, or binds its own ``context_fn``, is returned as it is (its
    recomputation plans again, with the same result)."""
    keywords = getattr(checkpoint_func, "keywords", None) or {}
    if keywords.get("use_reentrant") is not False or "context_fn" in keywords:
        return checkpoint_func
    return functools.partial(checkpoint_func, context_fn=walk_replay_contexts)
