"""``dla bench``: the op benchmarks of ``benchmarks/`` and a decoding benchmark.

Decoding: for DLA (dynamic policy), Log-Linear (fenwick policy), the single-state base and the
attention baseline -- the same model size, random weights -- prefill a context of each length,
then decode tokens one at a time from the cache. Reported: decoding tokens/s and the cache's
bytes after the prefill and decoding. Each (variant, length) gets a model whose
``max_position_embeddings`` is just that length, so the fenwick capacity grows with log2 of it
as Log-Linear Attention's does; the DLA and single-state caches have a fixed size and the
attention cache grows linearly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from dla.plots import pyplot, save

VARIANTS = {
    "DLA (dynamic)": {"mixer": "mamba2", "policy": "dynamic"},
    "Log-Linear (fenwick)": {"mixer": "mamba2", "policy": "fenwick"},
    "single state": {"mixer": "mamba2", "policy": "single"},
    "attention": {"mixer": "attention"},
}
WARMUP_TOKENS = 3
BENCHMARKS_DIR = Path("benchmarks")  # the repository's benchmarks/: dla bench run from a source checkout


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_benchmark(lengths: list[int], new_tokens: int, model_size: dict, capacity: int, device,
                     batch: int = 1) -> list[dict]:
    """One row per (variant, context length): ``tokens_per_s`` (decoding, per sequence x batch,
    after a few untimed warm-up tokens) and ``cache_bytes`` (after the prefill and decoding)."""
    from dla.models import DLACache, DLAConfig, DLAForCausalLM

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, variant in VARIANTS.items():
        for length in lengths:
            torch.manual_seed(0)
            extra = {"capacity": capacity} if variant.get("policy") == "dynamic" else {}
            config = DLAConfig(vocab_size=256, max_position_embeddings=length + new_tokens, **model_size, **variant,
                               **extra)
            model = DLAForCausalLM(config).to(device, dtype).eval()
            prompt = torch.randint(256, (batch, length), device=device)
            cache = DLACache(config)  # the layers update it in place
            token = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
            for _ in range(WARMUP_TOKENS):  # compile / autotune the decoding kernels outside the timing
                token = model(input_ids=token, cache=cache, use_cache=True).logits.argmax(-1)
            synchronize(device)
            started = time.perf_counter()
            for _ in range(new_tokens):
                token = model(input_ids=token, cache=cache, use_cache=True).logits.argmax(-1)
            synchronize(device)
            seconds = time.perf_counter() - started
            rows.append({"variant": name, "context": length, "tokens_per_s": batch * new_tokens / seconds,
                         "cache_bytes": cache.nbytes, "capacity": config.policy_config().capacity
                         if config.mixer != "attention" else None})
            print(f"{name:22s} context {length:6d}: {rows[-1]['tokens_per_s']:9.1f} tok/s, "
                  f"cache {cache.nbytes / 2**20:9.3f} MiB", flush=True)
    return rows


def plot_decoding(rows: list[dict], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in VARIANTS:
        points = [r for r in rows if r["variant"] == name]
        xs = [r["context"] for r in points]
        axes[0].plot(xs, [r["tokens_per_s"] for r in points], marker="o", label=name)
        axes[1].plot(xs, [r["cache_bytes"] / 2**20 for r in points], marker="o", label=name)
    for ax, ylabel in zip(axes, ("decoding tokens/s", "cache (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set(xlabel="context length", ylabel=ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("decoding speed vs context")
    axes[1].set_title("cache memory vs context")
    return save(fig, path)


def op_benchmarks(out: Path, quick: bool, device: torch.device) -> list[Path]:
    """Run ``benchmarks/cpu_scaling.py`` (CPU) or ``benchmarks/ops.py`` (GPU) when the working
    directory is a source checkout that has them; their JSON and PNG go to ``out``."""
    script = BENCHMARKS_DIR / ("ops.py" if device.type == "cuda" else "cpu_scaling.py")
    if not script.is_file():
        print(f"note: {script} is not here (not a source checkout), skipping the op benchmarks", file=sys.stderr)
        return []
    name = script.stem
    args = [sys.executable, str(script), "--out", str(out / (name + ".json" if device.type == "cuda" else name))]
    if quick:
        args += (["--lengths", "2048", "8192"] if device.type == "cuda"
                 else ["--lengths", "512", "1024", "--capacities", "1", "16", "--repeats", "1"])
    print("running", " ".join(args[1:]), flush=True)
    subprocess.run(args, check=True)
    return sorted(out.glob(name + ".*"))


def check_bench_args(lengths: list[int], new_tokens: int, model_size: dict, capacity: int) -> None:
    """:class:`UserError` for settings no benchmarked model can take (before anything runs)."""
    from dla.errors import UserError
    from dla.models import DLAConfig

    if not lengths or min(lengths) < 1 or new_tokens < 1 or capacity < 1:
        raise UserError(f"lengths, new tokens and capacity must be >= 1, got lengths {lengths}, "
                        f"{new_tokens} new tokens, capacity {capacity}")
    for variant in VARIANTS.values():
        extra = {"capacity": capacity} if variant.get("policy") == "dynamic" else {}
        try:
            DLAConfig(vocab_size=256, max_position_embeddings=max(lengths) + new_tokens, **model_size, **variant,
                      **extra)
        except ValueError as e:
            raise UserError(f"the benchmark model ({', '.join(f'{k}={v}' for k, v in model_size.items())}) is not "
                            f"valid: {e} (see --hidden-size, --layers)") from None


def run_bench(out: Path, lengths: list[int], new_tokens: int, model_size: dict, capacity: int, device,
              ops: bool, quick: bool) -> list[Path]:
    check_bench_args(lengths, new_tokens, model_size, capacity)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    files = op_benchmarks(out, quick, device) if ops else []
    rows = decode_benchmark(lengths, new_tokens, model_size, capacity, device)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "model": model_size,
            "capacity": capacity, "new_tokens": new_tokens}
    (out / "decoding.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    png = plot_decoding(rows, out / "decoding.png")
    return files + [out / "decoding.json"] + ([png] if png else [])
