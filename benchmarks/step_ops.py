"""PyTorch operations of one decoding step, counted per ``dla`` function (CPU; a proxy for the kernels
a CUDA graph of the step replays, each about 2.5–4 µs).

    python benchmarks/step_ops.py [--mixer mamba2] [--policy dynamic] [--general]

One layer (hidden 64, two sequences after a 9-token prompt; ``fixed``: period 4), the step of :func:`dla.generate`
(unchecked, ``validate=False``). Views and allocations are not counted. ``--general`` counts the
general path (``plan_schedule`` -> ``Schedule`` -> ``recurrent_dla``, unchecked) that the one-token
step replaces: the layers run it for checked steps, and for layers that keep their schedule.
"""

from __future__ import annotations

import argparse
import collections
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
        if func.__name__.split(".")[0] not in NOT_COUNTED:
            frames = [f for f in traceback.extract_stack() if "/dla/" in f.filename]
            where = f"{frames[-1].filename.split('/dla/')[-1]} {frames[-1].name}" if frames else "?"
            self.sites[where] += 1
        return func(*args, **(kwargs or {}))


def count(mixer: str, policy: str, general: bool) -> collections.Counter:
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
    decoding.step(decoding.token)
    sites = OperationSites()
    with sites:
        decoding.step(decoding.token)
    return sites.sites


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixer", default="mamba2", choices=("mamba2", "gated_deltanet"))
    parser.add_argument("--policy", default="dynamic", choices=dla.schedule.POLICIES)
    parser.add_argument("--general", action="store_true", help="count the general path instead")
    args = parser.parse_args()
    sites = count(args.mixer, args.policy, args.general)
    print(f"total {sum(sites.values())}")
    for where, n in sites.most_common():
        print(f"{n:4d} {where}")


if __name__ == "__main__":
    main()
