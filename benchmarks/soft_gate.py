"""Cost of the soft gate's recomputed state scores (:func:`dla.schedule.soft_gate.differentiable_scores`)
in one layer: forward+backward time, operations and what autograd keeps for the backward.

    OMP_NUM_THREADS=2 python benchmarks/soft_gate.py [--heads 24] [--length 4096] [--key 128] [--value 64]
                                                     [--repeats 7] [--device cpu]

One sequence, ``--heads`` heads, a ``dynamic`` schedule (capacity 30, τ = 1) planned with its trace on random
unit keys; rows for ``w = 1`` (Mamba-2) and ``w = β`` (Gated DeltaNet), each score. Columns: median time of
forward and backward; aten events the profiler records (nested ones included) and dispatched operations
other than views (about one kernel each on a GPU), forward / backward; MiB of tensors kept for the backward
that nothing else holds (not the inputs, not the trace). Freed CPU memory stays in the heap, as under the
``dla`` command (:mod:`dla.cpu_allocator`), so that times do not count the kernel zeroing fresh pages.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dla  # noqa: E402
from dla.cpu_allocator import keep_freed_memory  # noqa: E402
from dla.schedule.soft_gate import differentiable_scores  # noqa: E402

VIEWS = {"view", "_unsafe_view", "as_strided", "_reshape_alias", "expand", "slice", "select", "unsqueeze", "squeeze",
         "transpose", "permute", "t", "alias", "detach", "unbind", "split", "narrow", "diagonal", "lift_fresh",
         "empty", "empty_strided", "empty_like", "split_with_sizes", "scalar_tensor"}


class CountOperations(TorchDispatchMode):
    """Counts the operations dispatched under it, views and allocations left out."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] not in VIEWS
        return func(*args, **(kwargs or {}))


def aten_events(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return sum(e.name.startswith("aten::") for e in prof.events()), result


def dispatched_operations(fn):
    with CountOperations() as counter:
        result = fn()
    return counter.count, result


def kept_for_backward(fn, held: set[int]):
    """MiB of the storages autograd saves while ``fn`` runs, those in ``held`` (or ``fn``'s inputs) left out."""
    saved = {}

    def pack(x):
        saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        _, inputs = fn()
    held = held | {x.untyped_storage().data_ptr() for x in inputs}
    return sum(n for ptr, n in saved.items() if ptr not in held) / 2**20


def measure(schedule, score, k, v, g, beta, repeats: int) -> dict:
    def forward():
        inputs = [x.clone().requires_grad_() for x in (k, v) + (() if beta is None else (beta,))]
        w = None if beta is None else inputs[2]
        return differentiable_scores(schedule, score, inputs[0], inputs[1], g, w, "decayed"), inputs

    times = []
    for _ in range(repeats + 2):  # the first two warm up
        if k.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        forward()[0].sum().backward()
        if k.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    row = {"ms": 1e3 * statistics.median(times[2:])}
    for name, count in (("events", aten_events), ("operations", dispatched_operations)):
        n_forward, (scores, _) = count(forward)
        n_backward, _ = count(lambda: scores.sum().backward())
        row[name] = f"{n_forward}/{n_backward}"
    trace = [x for x in vars(schedule.trace).values() if isinstance(x, torch.Tensor)]
    row["MiB"] = kept_for_backward(forward, {x.untyped_storage().data_ptr() for x in trace})
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--key", type=int, default=128, help="key size K")
    parser.add_argument("--value", type=int, default=64, help="value size V")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    H, T, dev = args.heads, args.length, args.device
    k = torch.nn.functional.normalize(torch.randn(1, T, H, args.key, device=dev), dim=-1)
    v = torch.randn(1, T, H, args.value, device=dev)
    g = -0.1 * torch.rand(1, T, H, device=dev)
    print(f"H={H} T={T} K={args.key} V={args.value} {dev} threads={torch.get_num_threads()}")
    print(f"{'w':<5} {'score':<12} {'fwd+bwd ms':>10} {'aten events':>12} {'operations':>11} {'kept MiB':>9}")
    for w, beta in (("1", None), ("β", torch.rand(1, T, H, device=dev))):
        for score in ("state", "state_drift"):
            schedule = dla.plan_schedule("dynamic", batch=1, heads=H, length=T, k=k, v=v, g=g, beta=beta, capacity=30,
                                         threshold=1.0, score=score, keep_trace=True, device=dev)
            row = measure(schedule, score, k, v, g, beta, args.repeats)
            print(f"{w:<5} {score:<12} {row['ms']:10.1f} {row['events']:>12} {row['operations']:>11} {row['MiB']:9.1f}")


if __name__ == "__main__":
    main()
