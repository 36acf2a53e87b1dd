"""Decoding speed of whole models: milliseconds per generated token step, through ``model.generate()``
and ``dla.generate()`` (CUDA graph where the step can be captured), against the memory floor.

    python benchmarks/generate.py --out benchmarks/results/generate_h200.json       # GPU: the full grid
    python benchmarks/generate.py --models attention mamba2-dynamic --batches 8 --contexts 2048
    python benchmarks/generate.py --smoke --out /tmp/generate.json                  # CPU, tiny models, seconds
    python benchmarks/generate.py --batches 64 --resume --out FILE.json   # add rows to FILE (same device and versions)

(with ``dla`` installed from this checkout, ``pip install -e .``, or ``PYTHONPATH=.``).

Models (12 layers, hidden 768, 32K vocabulary, SwiGLU 2048, tied embeddings, bf16 on CUDA):
``attention`` (rotary, 12 heads), ``mamba2-single`` / ``mamba2-dynamic`` (24 heads of 128 x 64
states; dynamic: the paper's DLA, capacity 30), ``gated_deltanet-single`` / ``gated_deltanet-dynamic`` (6
heads, key 96, value 192). Each (model, batch, context) row prefills a random prompt (ids >= 1,
no padding, no end-of-sequence token), then decodes ``--new-tokens`` tokens greedily; only the
decoding steps are timed (CUDA events between consecutive steps, the first ``--skip`` steps
dropped, median). Reported per row: ``ms_per_step``, ``tokens_per_s`` (batch / step time),
``cache_bytes`` after the prefill, and ``floor_ms``: the weights and the cache read once per
step at the bandwidth of a large device-to-device copy (measured here), and on CUDA
``peak_bytes`` (the most allocated during the row); for ``dla.generate`` rows of DLA models
``births_per_step``, the share of heads whose token opened a state in 8 more steps (the models'
weights are random, and on such keys and values the paper's score opens a state at nearly every
token: a birth and, at capacity, a merge per step, the decode kernel's costliest step). A row that
runs out of memory is recorded with ``"error": "out of memory"``, its peak and ``where``: the
innermost ``dla`` lines of the failure.
``--resume`` keeps the rows already in ``--out`` and measures only the missing ones (a grid split over
jobs, or a run cut short: every row is saved as it is measured); ``meta`` describes the latest run
and ``meta["runs"]`` every run whose rows the file holds, with its command.
Writes ``--out`` (JSON) and a PNG of ms per step against the context next to it (one panel per
batch, a line per model and path).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
import traceback
import warnings
from importlib import metadata
from pathlib import Path

import torch

import dla
from dla.generation import start_decoding
from dla.models.modeling_dla import CACHE_FIELD
from dla.plots import pyplot, save

MODELS = {
    "attention": dict(mixer="attention"),
    "mamba2-single": dict(mixer="mamba2", policy="single"),
    "mamba2-dynamic": dict(mixer="mamba2", policy="dynamic"),
    "gated_deltanet-single": dict(mixer="gated_deltanet", policy="single"),
    "gated_deltanet-dynamic": dict(mixer="gated_deltanet", policy="dynamic"),
}
FULL = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, intermediate_size=2048)
FULL_HEADS = {"attention": dict(num_heads=12), "mamba2": {}, "gated_deltanet": dict(num_heads=6, head_dim=96)}
# tiny sizes for --smoke: every code path, in seconds on a CPU
SMOKE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=128, head_dim=16, state_size=16,
             chunk_size=16)
PATHS = ("model.generate", "dla.generate")


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class Clock:
    """Timestamps on the device's timeline (CUDA events) or the host's (CPU, which runs in order)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self, skip: int) -> list[float]:
        """Milliseconds between consecutive marks, the first ``skip`` intervals dropped."""
        if self.cuda:
            torch.cuda.synchronize()
            gaps = [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        else:
            gaps = [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return gaps[skip:]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second (read + written) of a large device-to-device copy, median of repeats."""
    numel = 2**28 if device.type == "cuda" else 2**24
    big = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    out = torch.empty_like(big)
    times = []
    for _ in range(12):
        clock = Clock(device)
        clock.mark()
        out.copy_(big)
        clock.mark()
        times.append(clock.step_ms(0)[0])
    del big, out
    return 2 * numel * 4 / (statistics.median(times[2:]) * 1e-3)


def through_model_generate(model, prompt, new_tokens: int, skip: int, device) -> tuple[list[float], int]:
    """``model.generate()`` with a stopping criterion that only marks the time after every token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    cache = dla.DLACache(model.config, max_length=prompt.shape[1] + new_tokens)
    clock, sizes = Clock(device), []

    class Mark(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            clock.mark()
            if not sizes:
                sizes.append(cache.nbytes)  # called first right after the prompt's token
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, stopping_criteria=StoppingCriteriaList([Mark()]),
                   **{CACHE_FIELD: cache})
    return clock.step_ms(skip), sizes[0]


def through_dla_generate(model, prompt, new_tokens: int, skip: int, device) -> tuple[list[float], int, bool, float]:
    """The step ``dla.generate()`` runs per token (captured where it can be), timed between steps, and
    the share of its layers' heads whose token opened a state (:func:`births_per_step`)."""
    decoding = start_decoding(model, prompt, new_tokens + BIRTH_STEPS)
    size, token, clock = decoding.cache.nbytes, decoding.token, Clock(device)
    clock.mark()
    for _ in range(new_tokens - 1):
        token = decoding.step(token)
        clock.mark()
    return clock.step_ms(skip), size, decoding.graph, births_per_step(decoding, token)


BIRTH_STEPS = 8  # untimed steps after the timed ones, in which the births are counted


def births_per_step(decoding, token) -> float | None:
    """Of every DLA layer's heads and sequences, the share whose token opened a state, over
    ``BIRTH_STEPS`` more steps (read between steps, so after the timing): a birth with a merge is
    the decode kernel's most expensive step. ``None`` for a model without DLA layers."""
    layers = [layer for layer in decoding.cache.layers if getattr(layer, "state", None) is not None]
    if not layers:
        return None
    births = []
    for _ in range(BIRTH_STEPS):
        before = [layer.state.segments.starts[..., 0].clone() for layer in layers]
        token = decoding.step(token)
        births += [(layer.state.segments.starts[..., 0] != start).float().mean().item()
                   for layer, start in zip(layers, before)]
    return sum(births) / len(births)


def peak_bytes(device) -> int | None:
    """The most memory allocated since the row began (CUDA), else ``None``."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def parameter_bytes(model) -> int:
    """Bytes of the weights a step reads: every parameter once (tied embeddings counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# a report's rows compare only if these agree; every run that added rows is listed in meta["runs"] with RUN_FIELDS
SAME_IN_A_REPORT = ("device", "torch", "triton", "fla", "transformers", "dtype", "sizes")
RUN_FIELDS = ("date", "new_tokens", "timed_steps", "copy_bandwidth_GBps")


def resumed(path: Path, meta: dict) -> tuple[list[dict], list[dict]]:
    """The rows of the report at ``path`` (none if there is none yet) and the runs that measured them,
    after checking that they were measured as this run's ``meta`` says it measures (``SystemExit``)."""
    if not path.exists():
        return [], []
    report = json.loads(path.read_text())
    earlier = report["meta"]
    for field in SAME_IN_A_REPORT:
        if earlier.get(field) != meta[field]:
            raise SystemExit(f"--resume: {path} holds rows measured with another {field} ({earlier.get(field)!r}; "
                             f"here {meta[field]!r}): write them to another --out")
    return report["rows"], earlier.get("runs") or [{k: earlier.get(k) for k in RUN_FIELDS}]


def save_report(report: dict, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


def build_model(name: str, smoke: bool, device: torch.device, max_length: int) -> dla.DLAForCausalLM:
    """The model ``name`` of ``MODELS`` at the full (or ``smoke``) sizes, random weights, in eval mode,
    bf16 on CUDA (float32 elsewhere); positions up to ``max_length``."""
    variant = MODELS[name]
    sizes = SMOKE if smoke else {**FULL, **FULL_HEADS[variant["mixer"]]}
    config = dla.DLAConfig(**sizes, **variant, pad_token_id=None, eos_token_id=None,
                           max_position_embeddings=max_length)
    return dla.DLAForCausalLM(config).to(device, model_dtype(device)).eval()


def model_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = model_dtype(device)
    sizes = SMOKE if args.smoke else FULL
    bandwidth = copy_bandwidth(device)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": version("triton"), "fla": version("flash-linear-attention"),
            "transformers": version("transformers"), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "dtype": str(dtype).removeprefix("torch."), "sizes": sizes,
            "new_tokens": args.new_tokens, "timed_steps": args.new_tokens - 1 - args.skip,
            "copy_bandwidth_GBps": bandwidth / 1e9}
    print(f"{meta['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows, runs = resumed(args.out, meta) if args.resume else ([], [])
    meta["runs"] = runs + [{"command": args.command, **{k: meta[k] for k in RUN_FIELDS}}]
    done = {(r["model"], r["batch"], r["context"], r["path"]) for r in rows}
    header = f"{'model':24s} {'batch':>5s} {'context':>7s} {'path':15s} {'ms/step':>9s} {'tokens/s':>10s} " \
             f"{'cache MiB':>10s} {'floor ms':>9s}"
    print(header, flush=True)
    for name in args.models:
        if all((name, batch, context, path) in done for batch in args.batches for context in args.contexts
               for path in PATHS):
            continue
        torch.manual_seed(0)
        model = build_model(name, args.smoke, device, max(args.contexts) + args.new_tokens)
        config = model.config
        weights = parameter_bytes(model)
        # compile and autotune every kernel of both paths before anything is timed
        warm = torch.randint(1, config.vocab_size, (1, 32), device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            through_model_generate(model, warm, 4, 0, device)
            through_dla_generate(model, warm, 4, 0, device)
        for batch in args.batches:
            for context in args.contexts:
                prompt = torch.randint(1, config.vocab_size, (batch, context), device=device)
                for path in PATHS:
                    if (name, batch, context, path) in done:
                        continue
                    row = {"model": name, "batch": batch, "context": context, "path": path, "weight_bytes": weights}
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    try:
                        if path == "model.generate":
                            steps, cache_bytes = through_model_generate(model, prompt, args.new_tokens, args.skip,
                                                                        device)
                        else:
                            with warnings.catch_warnings(record=True) as caught:
                                warnings.simplefilter("always")
                                steps, cache_bytes, graph, births = through_dla_generate(
                                    model, prompt, args.new_tokens, args.skip, device)
                            row.update(cuda_graph=graph, births_per_step=births)
                            if caught:
                                row["note"] = str(caught[0].message)
                        ms = statistics.median(steps)
                        floor_ms = (weights + cache_bytes) / bandwidth * 1e3
                        row.update(ms_per_step=ms, tokens_per_s=batch / (ms * 1e-3), cache_bytes=cache_bytes,
                                   floor_ms=floor_ms, ms_per_step_min=min(steps), ms_per_step_max=max(steps),
                                   peak_bytes=peak_bytes(device))
                        births = row.get("births_per_step")
                        print(f"{name:24s} {batch:5d} {context:7d} {path:15s} {ms:9.3f} {row['tokens_per_s']:10.0f} "
                              f"{cache_bytes / 2**20:10.1f} {floor_ms:9.3f}"
                              + ("" if births is None else f"  births/step {births:.2f}")
                              + ("  (eager)" if path == "dla.generate" and not row["cuda_graph"]
                                 and device.type == "cuda" else ""), flush=True)
                    except torch.OutOfMemoryError as error:
                        where = [f"{f.filename.split('/dla/')[-1]}:{f.lineno} {f.name}"
                                 for f in traceback.extract_tb(error.__traceback__) if "/dla/" in f.filename]
                        row.update(ms_per_step=None, tokens_per_s=None, cache_bytes=None, floor_ms=None,
                                   error="out of memory", peak_bytes=peak_bytes(device), where=where[-3:])
                        print(f"{name:24s} {batch:5d} {context:7d} {path:15s} out of memory at "
                              f"{' < '.join(reversed(where[-3:]))} (peak {row['peak_bytes'] / 2**30:.1f} GiB)",
                              flush=True)
                    rows.append(row)
                    save_report({"meta": meta, "rows": rows}, args.out)  # a run cut short keeps its rows
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                del prompt
        del model
    return {"meta": meta, "rows": rows}


def plot(report: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    rows = [r for r in report["rows"] if r["ms_per_step"] is not None]
    batches = sorted({r["batch"] for r in report["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.5), squeeze=False)
    colours = dict(zip(MODELS, ("black", "tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, batch in zip(axes[0], batches):
        for name in MODELS:
            for route, style in zip(PATHS, ("--", "-")):
                points = sorted((r["context"], r["ms_per_step"]) for r in rows
                                if r["model"] == name and r["path"] == route and r["batch"] == batch)
                if points:
                    ax.plot(*zip(*points), style, marker="o", color=colours[name], label=f"{name} ({route})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # model.generate's host time is 10-30x the captured steps
        ax.set(title=f"batch {batch}", xlabel="context (tokens)", ylabel="ms per generated token step")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"decoding, {report['meta']['device']}")
    return save(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default 64)")
    ap.add_argument("--skip", type=int, default=3, help="first decoding steps left out of the timing (default 3)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny models, batches 1 2, contexts 16 32, 6 new tokens: every path in seconds on a CPU")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generate.json")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out (measured on the same device, versions and sizes) and "
                         "measure only the missing ones: a grid over several jobs, or one cut short")
    args = ap.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/generate.py", *(sys.argv[1:] if argv is None else argv)])
    if args.smoke:
        args.batches, args.contexts, args.new_tokens, args.skip = [1, 2], [16, 32], 6, 1
    if args.new_tokens < args.skip + 2:
        ap.error(f"--new-tokens must be at least --skip + 2 = {args.skip + 2} to time a step")
    if min(args.batches) < 1 or min(args.contexts) < 1:
        ap.error("--batches and --contexts must be positive")
    report = run(args)
    png = plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out}" + (f" and {png}" if png else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
