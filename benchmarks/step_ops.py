"""PyTorch operations of one decoding step, counted per ``dla`` function (CPU; a proxy for the kernels
a CUDA graph of the step replays, each about 2.5–4 µs).

    python benchmarks/step_ops.py [--mixer mamba2] [--policy dynamic] [--general]
    TRITON_INTERPRET=1 python benchmarks/step_ops.py --cuda-kernels [--mixer mamba2] [--policy dynamic]

One layer (hidden 64, two sequences after a 9-token prompt; ``fixed``: period 4), the step of :func:`dla.generate`
(unchecked, ``validate=False``). Views and allocations are not counted. ``--general`` counts the
general path (``plan_schedule`` -> ``Schedule`` -> ``recurrent_dla``, unchecked) that the one-token
step replaces: the layers run it for checked steps, and for layers that keep their schedule.
"""

from __future__ import annotations

import argparse
import collections
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dla
from dla import generation
from dla.layers.common import DLAMixer

NOT_COUNTED = {"view", "_unsafe_view", "as_strided", "_reshape_alias", "expand", "slice", "select", "unsqueeze",
               "squeeze", "transpose", "permute", "t", "alias", "detach", "unbind", "split", "narrow", "diagonal",
               "lift_fresh", "empty", "empty_strided", "empty_like", "split_with_sizes"}


class OperationSites(TorchDispatchMode):
    """Counts every operation under it by the innermost ``dla`` function that called it."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        stack = traceback.extract_stack()
        in_interpreter = any("/triton/" in f.filename and "/dla/" not in f.filename for f in stack)
        if func.__name__.split(".")[0] not in NOT_COUNTED and not in_interpreter:
            frames = [f for f in stack if "/dla/" in f.filename]
            where = f"{frames[-1].filename.split('/dla/')[-1]} {frames[-1].name}" if frames else "?"
            self.sites[where] += 1
        return func(*args, **(kwargs or {}))


class CountedLaunches:
    """A Triton kernel whose launches (``kernel[grid](...)``) are counted in ``sites`` as one operation
    each; it runs in Triton's interpreter, whose own PyTorch calls are not counted."""

    def __init__(self, kernel, name: str, sites: collections.Counter):
        self.kernel, self.name, self.sites = kernel, name, sites

    def __getitem__(self, grid):
        self.sites.update([self.name])
        return self.kernel[grid]


def launch_cuda_kernels(sites: collections.Counter):
    """Take the step's CUDA path on the CPU: the Triton token plan, its terms and the decode kernel in
    place of their PyTorch twins (in Triton's interpreter), each launch counted in ``sites``."""
    import functools

    from dla.layers import common
    from dla.ops import recurrent
    from dla.ops.triton import decode
    from dla.schedule import token, triton_terms, triton_token

    common.plan_token = functools.partial(token.plan_token, backend="triton")
    token.terms_backend = lambda device, dtype: "triton"
    triton_terms._token_terms_kernel = CountedLaunches(triton_terms._token_terms_kernel, "kernel: token terms", sites)
    recurrent._step_function = lambda backend, one_token, on_cuda, delta: decode.decode_step
    triton_token._token_plan_kernel = CountedLaunches(triton_token._token_plan_kernel, "kernel: token plan", sites)
    decode.decode_dla_step_kernel = CountedLaunches(decode.decode_dla_step_kernel, "kernel: decode step", sites)


def count(mixer: str, policy: str, general: bool, cuda_kernels: bool = False) -> collections.Counter:
    torch.manual_seed(0)
    config = dla.DLAConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, head_dim=16, state_size=16,
                           intermediate_size=128, max_position_embeddings=256, chunk_size=16, mixer=mixer,
                           policy=policy, period=4 if policy == "fixed" else None)
    model = dla.DLAForCausalLM(config).eval()
    decoding = generation.start_decoding(model, torch.randint(1, 64, (2, 9)), 4, use_cuda_graph=False)
    if general:  # a layer that keeps its schedule for inspection takes the general path
        for module in model.modules():
            if isinstance(module, DLAMixer):
                module.record_schedule = True
    sites = OperationSites()
    if cuda_kernels:
        launch_cuda_kernels(sites.sites)
    decoding.step(decoding.token)
    sites.sites.clear()
    with sites:
        decoding.step(decoding.token)
    return sites.sites


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixer", default="mamba2", choices=("mamba2", "gated_deltanet"))
    parser.add_argument("--policy", default="dynamic", choices=dla.schedule.POLICIES)
    path = parser.add_mutually_exclusive_group()
    path.add_argument("--general", action="store_true", help="count the general path instead")
    path.add_argument("--cuda-kernels", action="store_true",
                      help="count the one-token step as CUDA runs it: its Triton kernels (the token plan of the "
                           "state scores, the decode step) in place of their PyTorch twins, one operation a launch")
    args = parser.parse_args()
    if args.cuda_kernels and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--cuda-kernels runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    sites = count(args.mixer, args.policy, args.general, args.cuda_kernels)
    print(f"total {sum(sites.values())}")
    for where, n in sites.most_common():
        print(f"{n:4d} {where}")


if __name__ == "__main__":
    main()
