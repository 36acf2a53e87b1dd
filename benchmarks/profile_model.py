"""Where one training step of a model goes on GPU: the mixer's phases against the rest.

    python benchmarks/profile_model.py benchmarks/configs/dla_mamba2_125m.yaml --seq-len 4096
    python benchmarks/profile_model.py dla_mamba2_780m --seq-len 16384      # a paper config by name

One packed row of ``--seq-len`` random tokens (documents of mixed lengths, as in
``train_throughput.py``), bf16 autocast, forward and backward. Prints

1. the forward's wall time (building the graph for a backward) per phase of
   :meth:`dla.layers.common.DLAMixer.attend`, measured with a synchronisation around each phase
   (``plan``: scores and policy, ``soft_gate``: the differentiable scores and gates, ``op``:
   ``chunk_dla``; the rest of the model is what is left);
2. the step's CUDA kernels by total time (torch.profiler), the backward included;
3. with ``--by-function N``, the N (``dla`` function, operation) pairs that took the most CUDA time
   (the innermost function of the package on the Python stack that dispatched the operation, named
   by the line that defines it; the backward of PyTorch's own operations has none and is listed
   as ``(autograd)``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed_phases(module, names: list[str], totals: dict):
    """Wrap ``module.<name>`` so that every call adds its synchronised wall time to ``totals[name]``;
    returns the originals."""
    import torch

    originals = {name: getattr(module, name) for name in names}
    for name in names:
        fn = getattr(module, name)

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = _fn(*args, **kwargs)
            torch.cuda.synchronize()
            totals[_name] += time.perf_counter() - t0
            return out

        setattr(module, name, wrapper)
    return originals


def device_time_by_function(prof, rows: int, package: str = "dla") -> str:
    """A table of the profile's CUDA time by the innermost ``package`` function that dispatched each
    operation (a Python frame of ``with_stack=True``: the event's recorded stack, or the Python events
    above it), the ``rows`` largest, and what no CPU event launched (the kernels of CUDA graphs)."""
    from torch.autograd import DeviceType

    def in_package(frame: str) -> bool:  # "dla/ops/chunk.py(224): compute_qkv", or with the whole path
        return ".py(" in frame and (frame.startswith(f"{package}/") or f"/{package}/" in frame)

    totals = defaultdict(lambda: [0.0, 0])
    attributed = everything = 0.0
    for evt in prof.events():
        spent = evt.self_device_time_total
        if spent <= 0:
            continue
        # a kernel is listed twice, as an event of its own and in the CPU event that launched it (an
        # operation, or a Python frame for a Triton launch): the device's events give the total, the
        # CPU events what launched each
        if evt.device_type != DeviceType.CPU:
            everything += spent
            continue
        attributed += spent
        frames = list(evt.stack or ())
        parent = evt
        while parent is not None:
            frames.append(parent.name)
            parent = parent.cpu_parent
        function = next((f[f.find(f"{package}/"):] for f in frames if in_package(f)), "(autograd)")
        operation = "launches of its own" if ".py(" in evt.name else evt.name  # a Triton kernel's frame
        totals[(function, operation)][0] += spent
        totals[(function, operation)][1] += 1
    if everything > attributed:
        totals[("(no CPU event: CUDA graphs)", "kernels")] = [everything - attributed, 0]
    out = [f"{'time':>10s} {'share':>6s} {'calls':>6s}  function [operation]"]
    for (function, name), (spent, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        out.append(f"{spent / 1e3:8.2f}ms {spent / everything:6.1%} {calls:6d}  {function} [{name}]")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="a paper config name or a YAML path")
    ap.add_argument("--seq-len", type=int, default=4096, help="tokens in the row (default 4096)")
    ap.add_argument("--steps", type=int, default=2, help="untimed steps first (compilation; default 2)")
    ap.add_argument("--rows", type=int, default=30, help="kernel rows to print (default 30)")
    ap.add_argument("--by-function", type=int, default=0, metavar="N",
                    help="also print the N (dla function, operation) pairs that took the most CUDA time")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, _ExperimentalConfig, profile

    import dla.layers.common as common
    from dla.data import Batch
    from dla.models import DLAForCausalLM
    from dla.train.distributed import enable_activation_checkpointing
    from dla.train.loop import lm_loss
    from experiments.paper.recipe import load, model_config

    cfg = load(args.config)
    config = model_config(cfg)
    config.max_position_embeddings = max(config.max_position_embeddings, args.seq_len)
    torch.manual_seed(0)
    model = DLAForCausalLM(config).cuda().train()
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    gen = torch.Generator().manual_seed(0)
    lengths = [args.seq_len // 4, args.seq_len // 2, args.seq_len - 3 * (args.seq_len // 4)]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)

    def step():
        ids = torch.randint(0, config.vocab_size, (1, args.seq_len + 1), generator=gen)
        batch = Batch(ids[:, :-1], ids[:, 1:], cu).to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    step_s = time.perf_counter() - t0

    totals = defaultdict(float)
    originals = timed_phases(common, ["plan_schedule", "differentiable_scores", "chunk_dla"], totals)
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len + 1), generator=gen)
    batch = Batch(ids[:, :-1], ids[:, 1:], cu).to("cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):  # with the graph for a backward, which is not run
        loss = lm_loss(model, batch)
    torch.cuda.synchronize()
    forward_s = time.perf_counter() - t0
    del loss
    print(f"{args.config}: {args.seq_len} tokens, step (forward + backward) {step_s * 1e3:.1f} ms, "
          f"{args.seq_len / step_s:,.0f} tokens/s")
    print(f"forward {forward_s * 1e3:.1f} ms (synchronised per phase):")
    names = {"plan_schedule": "plan", "differentiable_scores": "soft_gate", "chunk_dla": "op"}
    for name, seconds in totals.items():
        print(f"  {names[name]:10s} {seconds * 1e3:9.1f} ms  {seconds / forward_s:6.1%}")
    rest = forward_s - sum(totals.values())
    print(f"  {'rest':10s} {rest * 1e3:9.1f} ms  {rest / forward_s:6.1%}")

    for name, fn in originals.items():  # the profiled step without the synchronising wrappers
        setattr(common, name, fn)
    # the Python stack of every operation (verbose: torch 2.11 records it only so)
    stacks = dict(with_stack=True, experimental_config=_ExperimentalConfig(verbose=True)) if args.by_function else {}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], **stacks) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    if args.by_function:
        print(f"\nCUDA time by the dla function that dispatched it (the {args.by_function} largest):")
        print(device_time_by_function(prof, args.by_function))


if __name__ == "__main__":
    main()
