"""The state-scored plan of a window replayed as one CUDA graph (GPU).

:func:`dla.schedule.dynamic.plan_dynamic` walks a window chunk by chunk: per 64-token chunk one
Triton walk and one launch of the open state's update and the next chunk's products with it
(:mod:`dla.schedule.triton_terms`). Their GPU work is short, so the GPU waits on the host that
launches them. The
first plan of a shape is captured into a CUDA graph, and every plan of that shape replays it: the
same kernels on the same inputs, so the same schedule bit for bit, from one launch. With
``keep_trace`` (the soft gates in training) the graph also returns the trace the soft gates read:
the open segment's start and ``‖O‖²`` before every token and the open state at every chunk start.

Graphs are kept per input shapes, dtypes and options, the ``MAX_GRAPHS`` most recently used: a
graph keeps its plan's intermediate tensors (the chunk terms, ~``R * T * 64 * 4`` bytes for ``R``
sequence-heads of ``T`` tokens) allocated, and a model whose layers plan the same shapes shares one.
A shape is captured the second time it is planned (the first plan is launched chunk by chunk):
capturing costs about two launched plans, which only a shape that comes back repays. Batches of
fixed shape (unpacked rows, or packed rows whose documents keep their lengths) replay from their
second plan on; packed rows whose document lengths change every step keep planning launched.
Under activation checkpointing (:mod:`dla.schedule.replay`) the forward's graph records the walk,
and the recomputation replays the record in a graph of its own. ``DLA_PLAN_CUDA_GRAPHS=0`` turns the graphs off.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from dla.schedule.dynamic import Contributions, Trace, plan_dynamic
from dla.schedule.replay import RecordWalks, ReplayWalks, WalkRecord, active_memo
from dla.schedule.schedule import SegmentState

MAX_GRAPHS = 2
_GRAPHS: OrderedDict[tuple, WindowGraph] = OrderedDict()
MAX_SEEN = 64
_SEEN: OrderedDict[tuple, None] = OrderedDict()  # shapes planned once, not (yet) captured


def clear_graphs() -> None:
    """Forget every captured graph and every shape planned once (their memory is freed with them)."""
    _GRAPHS.clear()
    _SEEN.clear()


def graphs_enabled(seg: SegmentState) -> bool:
    """Whether a plan continuing ``seg`` runs as a graph: on CUDA, unless turned off, and not inside
    another capture."""
    return (seg.starts.is_cuda and os.environ.get("DLA_PLAN_CUDA_GRAPHS", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


def plan_dynamic_graphed(seg: SegmentState, lengths, threshold, max_segment_len, merge: str, score: str,
                         contributions: Contributions, keep_trace: bool = False):
    """:func:`dla.schedule.dynamic.plan_dynamic` with the Triton walker and a state score, as a graph
    replay: the same ``(death, carried, final, trace)``, the trace with its extras under ``keep_trace``."""
    inputs = dict(starts=seg.starts, info=seg.info, position=seg.position, open_state=seg.open_state,
                  open_norm=seg.open_norm, lengths=lengths, threshold=threshold, k=contributions.k,
                  v=contributions.v, w=contributions.w, g=contributions.g)
    memo = active_memo()
    if isinstance(memo, ReplayWalks):  # a checkpointed forward's recomputation: the walk is the recorded one
        r = memo.peek_record()
        inputs.update(record_death=r.finish[0], record_carried=r.finish[1], record_starts=r.finish[2],
                      record_info=r.finish[3], record_open_norm=r.open_norm, record_scores=r.scores,
                      record_open_starts=torch.stack(r.open_starts) if r.open_starts else None,
                      record_trace_open_start=r.trace_open_start, record_trace_open_norm=r.trace_open_norm)
    options = (max_segment_len, merge, score, keep_trace, contributions.length, torch.is_autocast_enabled("cuda"),
               torch.get_autocast_dtype("cuda"))
    key = (*((name, None if x is None else (tuple(x.shape), x.dtype, x.device)) for name, x in inputs.items()),
           *options)
    graph = _GRAPHS.get(key)
    if graph is None and key not in _SEEN:  # a first sighting: planned launched
        _SEEN[key] = None
        if len(_SEEN) > MAX_SEEN:
            _SEEN.popitem(last=False)
        return plan_dynamic(seg, lengths, threshold, max_segment_len, merge, score, "triton",
                            contributions=contributions, keep_trace=keep_trace)
    if isinstance(memo, ReplayWalks):
        memo.next_record()  # the graph replays the record peeked above
    if graph is None:
        del _SEEN[key]
        graph = _GRAPHS[key] = WindowGraph(inputs, max_segment_len, merge, score, keep_trace, contributions.length)
        if len(_GRAPHS) > MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    out = graph.replay(inputs)
    if isinstance(memo, RecordWalks):  # a checkpointed forward: keep the walk for its recomputation
        N, H, C = seg.starts.shape
        finish = tuple(out[name].clone() for name in ("death", "carried", "starts", "info"))
        memo.walks.append(WalkRecord(finish, out["open_norm"].reshape(N * H).clone(),
                                     list(out["open_starts"].unbind(0)), out["scores"].clone(),
                                     *(None if x is None else x.clone()
                                       for x in (out["trace_open_start"], out["trace_open_norm"]))))
    final = SegmentState(out["starts"], out["info"], out["position"], open_state=out["open_state"],
                         open_norm=out["open_norm"])
    trace = Trace(scores=out["scores"], open_start=out["trace_open_start"], open_norm=out["trace_open_norm"],
                  open_states=out["open_states"], chunk=graph.chunk)
    return out["death"], out["carried"], final, trace


class WindowGraph:
    """One captured plan: static copies of its inputs, and the outputs that a replay overwrites."""

    def __init__(self, inputs: dict, max_segment_len, merge: str, score: str, keep_trace: bool, length: int):
        self.options = (max_segment_len, merge, score)
        self.keep_trace, self.length = keep_trace, length
        self.inputs = {name: None if x is None else x.clone() for name, x in inputs.items()}
        device = inputs["starts"].device
        with torch.cuda.device(device), torch.no_grad():
            # a first run compiles the kernels and initialises the libraries outside the capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._plan()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self._plan()

    def _plan(self) -> dict:
        x = self.inputs
        seg = SegmentState(x["starts"], x["info"], x["position"], open_state=x["open_state"],
                           open_norm=x["open_norm"])
        walks = []
        if "record_death" in x:  # replay the recorded walk
            open_starts = x["record_open_starts"]
            walks.append(WalkRecord(tuple(x[f"record_{name}"] for name in ("death", "carried", "starts", "info")),
                                    x["record_open_norm"], [] if open_starts is None else list(open_starts.unbind(0)),
                                    x["record_scores"], x["record_trace_open_start"], x["record_trace_open_norm"]))
            memo = ReplayWalks(walks)
        else:  # walk, and keep the open segment's start after each chunk for a checkpointed forward
            memo = RecordWalks(walks)
        with memo:
            death, carried, final, trace = plan_dynamic(
                seg, x["lengths"], x["threshold"], *self.options, "triton",
                contributions=Contributions(x["k"], x["v"], x["w"], x["g"], self.length),
                keep_trace=self.keep_trace)
        N, H = x["starts"].shape[:2]
        starts = walks[0].open_starts
        open_starts = torch.stack(starts) if starts else torch.zeros(0, N * H, dtype=torch.long, device=death.device)
        self.chunk = trace.chunk
        return dict(death=death, carried=carried, starts=final.starts, info=final.info, position=final.position,
                    open_state=final.open_state, open_norm=final.open_norm, scores=trace.scores,
                    open_starts=open_starts, trace_open_start=trace.open_start, trace_open_norm=trace.open_norm,
                    open_states=trace.open_states)

    def replay(self, inputs: dict) -> dict:
        """The plan of ``inputs``: copied into the static inputs, the graph replayed, the outputs copied
        out (the next replay overwrites them)."""
        with torch.no_grad():
            for name, x in inputs.items():
                if x is not None:
                    self.inputs[name].copy_(x)
            self.graph.replay()
            return {name: None if y is None else y.clone() for name, y in self.outputs.items()}
