"""Where one decoding step goes: the kernels of the step ``dla.generate`` replays per token.

    python benchmarks/profile_decode.py --models mamba2-single mamba2-dynamic --batch 8
    python benchmarks/profile_decode.py --smoke            # tiny models on a CPU: every path in seconds

For every model of ``benchmarks/generate.py`` (the same sizes, bf16 on CUDA), a prompt of
``--context`` random tokens through the model, then the one-token step of ``dla.generate`` (the
captured CUDA graph where it can be, else the eager step). Prints the step's wall time (the mean of
``--steps`` steps, on the device's timeline) and, from ``torch.profiler`` over ``--profiled`` more
steps, its device kernels per step (on a CPU: its operations) with their count and time, the
largest first. In a replayed graph every kernel costs at least its launch: the count says how much
of a step small operations take, the times where the bytes go.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generate import MODELS, Clock, build_model  # noqa: E402

from dla.generation import start_decoding  # noqa: E402


def step_ms(decoding, token, steps: int, device: torch.device):
    """Mean milliseconds of ``steps`` decoding steps (on the device's timeline) and the token after them."""
    clock = Clock(device)
    clock.mark()
    for _ in range(steps):
        token = decoding.step(token)
    clock.mark()
    return clock.step_ms(0)[0] / steps, token


def kernels_per_step(decoding, token, steps: int, device: torch.device) -> dict[str, list]:
    """``{name: [launches, microseconds]}`` per step: the device's kernels (CUDA) or the host's
    operations (CPU, the outermost ones, so that nothing is counted twice), over ``steps`` steps."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            token = decoding.step(token)
        if cuda:
            torch.cuda.synchronize(device)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    totals = defaultdict(lambda: [0.0, 0.0])
    for event in prof.events():
        if event.device_type != kind or (not cuda and event.cpu_parent is not None):
            continue
        entry = totals[event.name]
        entry[0] += 1 / steps
        entry[1] += (event.device_time_total if cuda else event.cpu_time_total) / steps
    return dict(totals)


def report(name: str, batch: int, graph: bool, wall_ms: float, kernels: dict, top: int, cuda: bool) -> str:
    unit = "kernels" if cuda else "operations"
    launches = sum(n for n, _ in kernels.values())
    busy_ms = sum(us for _, us in kernels.values()) / 1e3
    lines = [f"\n{name}, batch {batch}: {'CUDA graph' if graph else 'eager'} step {wall_ms:.3f} ms, "
             f"{launches:.0f} {unit} taking {busy_ms:.3f} ms per step",
             f"{'per step':>9s} {'us each':>9s} {'ms':>8s}  {unit[:-1]}"]
    for kernel, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{n:9.1f} {us / n:9.2f} {us / 1e3:8.3f}  {kernel[:100]}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=["mamba2-single", "mamba2-dynamic"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=512, help="prompt tokens per sequence (default 512)")
    ap.add_argument("--steps", type=int, default=50, help="timed steps (default 50)")
    ap.add_argument("--profiled", type=int, default=8, help="profiled steps (default 8)")
    ap.add_argument("--top", type=int, default=30, help="kernels listed per model (default 30)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny models, batch 2, 16-token prompts, 3 steps")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.context, args.steps, args.profiled = 2, 16, 3, 2
    for option in ("batch", "context", "steps", "profiled", "top"):
        if getattr(args, option) < 1:
            ap.error(f"--{option} must be at least 1")
    device = torch.device(args.device)
    # warm-up steps (kernels compile), timed and profiled steps: the cache must hold them all
    new_tokens = 10 + args.steps + args.profiled
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, args.smoke, device, args.context + new_tokens)
        prompt = torch.randint(1, model.config.vocab_size, (args.batch, args.context), device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the eager fallback's warning: the report says which step ran
            decoding = start_decoding(model, prompt, new_tokens)
        _, token = step_ms(decoding, decoding.token, 10, device)
        wall_ms, token = step_ms(decoding, token, args.steps, device)
        kernels = kernels_per_step(decoding, token, args.profiled, device)
        print(report(name, args.batch, decoding.graph, wall_ms, kernels, args.top, device.type == "cuda"), flush=True)
        del model, decoding
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
