"""PyTorch operations of one training step (forward + backward), counted by name and by the ``dla`` line
that dispatched them (CPU; on a GPU each is a kernel launch costing ~5-20 µs of host time).

    python benchmarks/train_step_ops.py [--mixer mamba2] [--unpacked] [--bf16] [--top 25]
    TRITON_INTERPRET=1 python benchmarks/train_step_ops.py --triton [...]
    OMP_NUM_THREADS=2 python benchmarks/train_step_ops.py --time [--mixer mamba2]

A tiny 2-layer :class:`dla.DLAForCausalLM` (the default ``dynamic`` policy: state scores, soft gates) on
a packed row of 3 documents in 200 tokens (``cu_seqlens``) or an unpacked ``[2, 128]`` batch, in
float32 or under ``torch.autocast("cpu", dtype=torch.bfloat16)``. Views are not counted. An operation of
the backward is attributed to the ``dla`` line of the autograd Function that ran it, else to
``(autograd)``. ``--triton``: the path a GPU takes, the planner's walk and the chunked op's walks as
Triton kernels (run by Triton's interpreter, whose own PyTorch calls are not counted), each launch counted
as one operation ``kernel <name>``; without it the PyTorch walks (the CPU's path, a loop over time) make
most of the count; ``--no-walks`` leaves those out (their backward is still counted). ``--time``: the CPU
wall time of a larger step (hidden 256, 4 layers, 2048 packed tokens).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dla

NOT_COUNTED = {"view", "_unsafe_view", "as_strided", "_reshape_alias", "expand", "slice", "select", "unsqueeze",
               "squeeze", "transpose", "permute", "t", "alias", "detach", "unbind", "split", "narrow", "diagonal",
               "split_with_sizes", "unflatten", "view_as_real", "view_as_complex"}


class OperationCounter(TorchDispatchMode):
    """Counts the aten operations dispatched under it (views excluded) by name (``ops``) and, with
    ``sites=True``, by the innermost ``dla`` source line that called them (``sites``, slower)."""

    def __init__(self, sites: bool = False):
        super().__init__()
        self.ops, self.sites, self.by_site = collections.Counter(), collections.Counter(), sites
        self.in_kernel = False  # set while Triton's interpreter runs a kernel (see count_launches)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in NOT_COUNTED and not self.in_kernel:
            self.ops[name] += 1
            if self.by_site:
                frames = [f for f in traceback.extract_stack() if "/dla/" in f.filename]
                where = (f"{frames[-1].filename.split('/dla/')[-1]}:{frames[-1].lineno} {frames[-1].name}"
                         if frames else "(autograd)")
                self.sites[f"{where} [{name}]"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


@contextlib.contextmanager
def triton_path(counter: OperationCounter | None = None):
    """Plan and run the op with the Triton backends (in Triton's interpreter off the GPU), each kernel
    launch counted in ``counter`` as one operation, the interpreter's own PyTorch calls not at all."""
    import functools

    from triton.runtime import interpreter

    from dla.layers import common

    def launch(self, *args, **kwargs):
        if counter is None:
            return run(self, *args, **kwargs)
        counter.ops[f"kernel {self.fn.__name__}"] += 1
        counter.in_kernel = True
        try:
            return run(self, *args, **kwargs)
        finally:
            counter.in_kernel = False

    run = interpreter.GridExecutor.__call__
    saved = common.plan_schedule, common.chunk_dla
    common.plan_schedule = functools.partial(common.plan_schedule, backend="triton")
    common.chunk_dla = functools.partial(common.chunk_dla, backend="triton")
    interpreter.GridExecutor.__call__ = launch
    try:
        yield
    finally:
        common.plan_schedule, common.chunk_dla = saved
        interpreter.GridExecutor.__call__ = run


@contextlib.contextmanager
def walks_uncounted(counter: OperationCounter):
    """Leave out of ``counter`` what the PyTorch walks dispatch in the forward (the planner's walk over
    time, the chunked op's walks over chunks): a GPU runs them as Triton kernels, and on the CPU they
    make most of a step's operations."""
    import dataclasses
    import functools

    from dla.ops import chunk
    from dla.schedule import dynamic

    def paused(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            outer, counter.in_kernel = counter.in_kernel, True
            try:
                return fn(*args, **kwargs)
            finally:
                counter.in_kernel = outer
        return run

    saved_walk, saved_walks = dynamic.TorchWalker.walk, chunk.TORCH_WALKS
    dynamic.TorchWalker.walk = paused(saved_walk)
    chunk.TORCH_WALKS = dataclasses.replace(saved_walks, carried_slots=paused(saved_walks.carried_slots),
                                            unit_labels=paused(saved_walks.unit_labels),
                                            state_recurrence=paused(saved_walks.state_recurrence))
    try:
        yield
    finally:
        dynamic.TorchWalker.walk, chunk.TORCH_WALKS = saved_walk, saved_walks


def tiny_step(mixer: str, packed: bool, bf16: bool, seed: int = 0):
    """A closure running one training step of the tiny model, and the model."""
    torch.manual_seed(seed)
    config = dla.DLAConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, head_dim=16, state_size=8,
                           intermediate_size=64, max_position_embeddings=4096, chunk_size=16, pad_token_id=0,
                           bos_token_id=1, eos_token_id=None, mixer=mixer)
    model = dla.DLAForCausalLM(config).train()
    if packed:
        ids = torch.randint(1, 64, (1, 201))
        cu = torch.tensor([0, 57, 130, 200], dtype=torch.int32)
    else:
        ids, cu = torch.randint(1, 64, (2, 129)), None

    def step():
        model.zero_grad(set_to_none=True)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = model(ids[:, :-1], cu_seqlens=cu, labels=ids[:, 1:]).loss
        loss.backward()
        return loss

    return step, model


def count_step(mixer: str, packed: bool, bf16: bool, sites: bool = False, triton: bool = False,
               walks: bool = True) -> OperationCounter:
    step, _ = tiny_step(mixer, packed, bf16)
    counter = OperationCounter(sites)
    path = triton_path(counter) if triton else contextlib.nullcontext() if walks else walks_uncounted(counter)
    with path:
        step()  # warm: caches filled once per cu_seqlens tensor are not the step's cost
        counter.ops.clear()
        with counter:
            step()
    return counter


def time_step(mixer: str, repeats: int = 5) -> float:
    """Median seconds of one packed training step at hidden 256, 4 layers, 2048 tokens (4 documents)."""
    torch.manual_seed(0)
    config = dla.DLAConfig(vocab_size=256, hidden_size=256, num_hidden_layers=4, head_dim=64, state_size=64,
                           intermediate_size=512, max_position_embeddings=4096, chunk_size=64, mixer=mixer,
                           pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = dla.DLAForCausalLM(config).train()
    ids = torch.randint(1, 256, (1, 2049))
    cu = torch.tensor([0, 300, 1100, 1500, 2048], dtype=torch.int32)
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(ids[:, :-1], cu_seqlens=cu, labels=ids[:, 1:]).loss.backward()
        if i:  # the first step warms the allocator and the caches
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixer", default=None, choices=("mamba2", "gated_deltanet"), help="default: both")
    parser.add_argument("--unpacked", action="store_true", help="only the unpacked [2, 128] batch")
    parser.add_argument("--packed", action="store_true", help="only the packed batch")
    parser.add_argument("--bf16", action="store_true", help="only bfloat16 autocast")
    parser.add_argument("--fp32", action="store_true", help="only float32")
    parser.add_argument("--top", type=int, default=0, help="list the top sources and operations")
    parser.add_argument("--triton", action="store_true", help="the GPU's path: Triton walks (TRITON_INTERPRET=1)")
    parser.add_argument("--no-walks", action="store_true",
                        help="leave out what the PyTorch walks dispatch in the forward (Triton kernels on a GPU)")
    parser.add_argument("--time", action="store_true", help="time the larger step instead")
    args = parser.parse_args()
    if args.triton and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        parser.error("--triton runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    mixers = [args.mixer] if args.mixer else ["mamba2", "gated_deltanet"]
    if args.time:
        for mixer in mixers:
            print(f"{mixer}: {time_step(mixer) * 1e3:.0f} ms per step")
        return
    layouts = [p for p, skip in ((True, args.unpacked), (False, args.packed)) if not skip]
    dtypes = [b for b, skip in ((False, args.bf16), (True, args.fp32)) if not skip]
    for mixer in mixers:
        for packed in layouts:
            for bf16 in dtypes:
                counter = count_step(mixer, packed, bf16, sites=args.top > 0, triton=args.triton,
                                     walks=not args.no_walks)
                kinds = ", ".join(f"{n} {c}" for n, c in counter.ops.most_common(8))
                print(f"{mixer:14s} {'packed' if packed else 'unpacked':8s} {'bf16' if bf16 else 'fp32'}: "
                      f"{counter.total:5d} ops ({kinds})")
                if args.top:
                    for where, n in counter.sites.most_common(args.top):
                        print(f"    {n:5d} {where}")


if __name__ == "__main__":
    main()
