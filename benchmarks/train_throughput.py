"""Training throughput (tokens/s) and peak memory of the paper configs at sequence length 16K.

Each config runs in its own process (an out-of-memory config does not spoil the next): a few
warm-up steps (Triton compilation and autotuning, excluded), then timed optimizer steps of
``--rows`` rows of ``seq_len`` tokens per GPU (default one), packed (random tokens, documents of
mixed lengths as ``cu_seqlens``, none longer than ``seq_len``), bf16 autocast, AdamW, activation
checkpointing as the config says. Results are appended to the JSON file after every config, so a
run cut short keeps what it measured.

    # one GPU, all paper configs (a time budget per config, progress printed):
    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput_h100.json
    # two GPUs, FSDP2 (each config under torchrun); scaling vs the one-GPU file:
    python benchmarks/train_throughput.py --gpus 2 --baseline benchmarks/results/train_throughput_h100.json \\
        --out benchmarks/results/train_throughput_2xh100.json
    # the ~125M models of benchmarks/configs/ (the kernels' model-level targets), at 4K tokens, one row
    # per step and eight (32K tokens per step, the op benchmark's batch):
    python benchmarks/train_throughput.py --seq-len 4096 --configs benchmarks/configs/*_125m.yaml
    python benchmarks/train_throughput.py --seq-len 4096 --rows 8 --configs benchmarks/configs/*_125m.yaml
    # CPU smoke test
    python benchmarks/train_throughput.py --tiny --configs dla_mamba2_780m --out /tmp/tp.json

The result file's ``meta`` holds the versions, the date and the command.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STOP_MARGIN_S = 20  # a child's time to report and shut down (FSDP teardown) after its last timed step
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    """One config, in this process (under torchrun with --gpus > 1): prints one JSON line."""
    import torch

    from dla.data import Batch
    from dla.models import DLAForCausalLM
    from dla.train.distributed import enable_activation_checkpointing, init_runtime, shutdown, wrap_model
    from dla.train.loop import grad_clip, lm_loss
    from dla.train.optim import build_optimizer
    from experiments.paper.recipe import load, model_config

    built = time.perf_counter()
    cfg = load(args.worker)
    runtime = init_runtime("cpu" if args.tiny else "cuda")
    seq_len = args.seq_len or (128 if args.tiny else cfg.data.seq_len)
    config = model_config(cfg, tiny=args.tiny)
    config.max_position_embeddings = max(config.max_position_embeddings, seq_len)
    torch.manual_seed(0)
    model = DLAForCausalLM(config).to(runtime.device)
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.activation_checkpointing and not args.no_checkpointing:
        enable_activation_checkpointing(model)
    model = wrap_model(model, runtime, "fsdp")
    optimizer = build_optimizer(model, set(), cfg.optim)
    gen = torch.Generator().manual_seed(runtime.rank)
    lengths = []
    for _ in range(args.rows):
        total = 0
        while total < seq_len:  # documents of 1/8 to 1 of a row, the last one cut to fit
            n = min(int(torch.randint(seq_len // 8, seq_len + 1, (1,), generator=gen)), seq_len - total)
            lengths.append(n)
            total += n
    tokens = args.rows * seq_len
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    use_bf16 = runtime.device.type == "cuda"
    cuda = runtime.device.type == "cuda"

    def step(phases=False):
        # fresh random tokens every step: a repeated batch would be memorised (a large model's loss
        # then falls to ~0 within a few steps and looks like a leak of the targets)
        ids = torch.randint(0, config.vocab_size, (1, tokens + 1), generator=gen)
        batch = Batch(ids[:, :-1], ids[:, 1:], cu).to(runtime.device)
        with torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = lm_loss(model, batch)
        if phases:  # the first step compiles and autotunes: say which phase takes the time
            sync()
            progress(f"first forward done after {time.perf_counter() - started:.1f} s")
        loss.backward()
        if phases:
            sync()
            progress(f"first backward done after {time.perf_counter() - started:.1f} s")
        grad_clip(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def progress(msg):  # on stderr, so that a config stopped by its time share shows how far it got
        if runtime.is_main:
            print(f"  {args.worker}: {msg}", file=sys.stderr, flush=True)

    progress(f"built and wrapped in {time.perf_counter() - built:.1f} s")
    started = time.perf_counter()
    for i in range(args.warmup):
        step(phases=i == 0)
        sync()
        progress(f"warm-up step {i + 1}/{args.warmup} done after {time.perf_counter() - started:.1f} s")
    warmup_s = time.perf_counter() - started
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, budget_end = [], time.perf_counter() + args.budget

    def out_of_time() -> bool:
        """Past --budget, or another step would end after --stop-at (the parent's time share).
        All ranks decide together: one rank stopping alone would leave the others in a collective."""
        stop = time.perf_counter() > budget_end or (args.stop_at and time.time() + max(times) > args.stop_at)
        if runtime.distributed:
            flag = torch.tensor(float(stop), device=runtime.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        if runtime.is_main:
            print(f"  {args.worker}: step {i + 1}/{args.steps} {times[-1]:.2f} s, loss {loss.item():.3f}",
                  file=sys.stderr, flush=True)
        if i + 1 < args.steps and out_of_time():
            break
    step_s = sum(times) / len(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    result = {"config": args.worker, "parameters": n_params, "gpus": runtime.world_size, "seq_len": seq_len,
              "rows": args.rows, "tokens_per_step": tokens * runtime.world_size, "steps_timed": len(times),
              "warmup_steps": args.warmup,
              "warmup_s": warmup_s, "step_s": step_s, "step_times_s": times,
              "tokens_per_s": tokens * runtime.world_size / step_s,
              "tokens_per_s_per_gpu": tokens / step_s, "peak_mem_gib": peak,
              "activation_checkpointing": bool(cfg.activation_checkpointing and not args.no_checkpointing),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "tiny": args.tiny}
    if runtime.is_main:
        print("RESULT " + json.dumps(result), flush=True)
    shutdown(runtime)


def launch(name: str, args, timeout: float) -> dict:
    """Run one config in a child process (torchrun for several GPUs); its result or its error. The
    child stops timing steps early enough to report them within ``timeout`` (the kill is the backstop)."""
    stop_at = time.time() + timeout - STOP_MARGIN_S
    flags = ["--worker", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--budget", str(args.budget), "--stop-at", f"{stop_at:.1f}", "--rows", str(args.rows)] + (
        ["--tiny"] if args.tiny else []) + (
        ["--seq-len", str(args.seq_len)] if args.seq_len else []) + (
        ["--no-checkpointing"] if args.no_checkpointing else [])
    if args.gpus > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
               __file__] + flags
    else:
        cmd = [sys.executable, __file__] + flags
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # the child's progress goes on to our stderr as it comes; its last lines name a failure
    stdout, last_lines = [], collections.deque(maxlen=20)

    def echo_stderr():
        for line in proc.stderr:
            sys.stderr.write(line)
            last_lines.append(line.rstrip())

    readers = [threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True),
               threading.Thread(target=echo_stderr, daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: torchrun starts its workers in sessions of their own and stops them
        # only when it is terminated; killed, it left them training on the GPUs that the next
        # config was measured on
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return {"config": name, "gpus": args.gpus, "error": f"timed out after {timeout:.0f} s"}
    for reader in readers:
        reader.join(timeout=10)
    for line in stdout:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    # the exception's own line (e.g. "torch.OutOfMemoryError: CUDA out of memory. ..."), else the last line
    errors = [line for line in last_lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
    tail = errors[-1:] or [line for line in list(last_lines) + stdout if line.strip()][-1:] or ["no output"]
    return {"config": name, "gpus": args.gpus, "error": f"exit {proc.returncode}: {tail[0].strip()[:300]}"}


def add_scaling(rows: list[dict], baseline: Path | None) -> None:
    """``scaling_efficiency`` = tokens/s per GPU here / tokens/s on one GPU (same config)."""
    if baseline is None or not baseline.is_file():
        return
    one = {r["config"]: r for r in json.loads(baseline.read_text())["rows"] if r.get("gpus") == 1 and "error" not in r}
    for r in rows:
        if "error" not in r and r["config"] in one:
            r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / one[r["config"]]["tokens_per_s_per_gpu"]


def estimate(path: Path, tokens: float = 50e9, gpus: int = 8) -> str:
    """A Markdown table: the wall-clock days for ``tokens`` on ``gpus`` GPUs from measured rows,
    assuming per-GPU throughput scales as measured (the 2-GPU FSDP2 rows' efficiency when present,
    else perfectly). Used to fill the estimate section of docs/reproduce.md."""
    rows = [r for r in json.loads(Path(path).read_text())["rows"] if "error" not in r]
    lines = [f"| config | GPUs measured | tokens/s per GPU | peak GiB "
             f"| days for {tokens / 1e9:g}B tokens on {gpus} GPUs |",
             "|---|---|---|---|---|"]
    for r in rows:
        per_gpu = r["tokens_per_s_per_gpu"]
        days = tokens / (per_gpu * gpus) / 86400
        lines.append(f"| {r['config']} | {r['gpus']} ({r['device']}) | {per_gpu:,.0f} | "
                     f"{r['peak_mem_gib'] or 0:.1f} | {days:.1f} |")
    return "\n".join(lines) + "\n"


def versions() -> dict:
    """torch, Triton and fla versions of this environment, for the result file's ``meta``."""
    import importlib.metadata

    found = {}
    for name, dist in (("torch", "torch"), ("triton", "triton"), ("fla", "flash-linear-attention"),
                       ("transformers", "transformers")):
        try:
            found[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", help="paper config names or YAML paths (default: all paper configs)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (fewer if --budget runs out)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--budget", type=float, default=40, help="seconds of timed steps per config at most")
    p.add_argument("--stop-at", type=float, default=0, help=argparse.SUPPRESS)  # set by the parent for its child
    p.add_argument("--deadline", type=float, default=530, help="seconds for the whole run; each config gets an "
                   "equal share of what is left (a config over its share is stopped and reported)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per config (>1: torchrun + FSDP2)")
    p.add_argument("--seq-len", type=int, help="default: the config's (16384); --tiny: 128")
    p.add_argument("--rows", type=int, default=1, help="rows of --seq-len tokens per GPU and step (default 1)")
    p.add_argument("--no-checkpointing", action="store_true", help="turn activation checkpointing off")
    p.add_argument("--tiny", action="store_true", help="tiny widths on CPU (smoke test)")
    p.add_argument("--baseline", type=Path, help="a one-GPU result file, for scaling efficiency")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_throughput.json")
    p.add_argument("--estimate", type=Path, metavar="JSON", help="print the wall-clock estimate table of a result "
                   "file (--tokens on --estimate-gpus GPUs) and exit")
    p.add_argument("--tokens", type=float, default=50e9, help="token budget for --estimate")
    p.add_argument("--estimate-gpus", type=int, default=8)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error(f"--rows must be at least 1, got {args.rows}")
    if args.worker:
        worker(args)
        return 0
    if args.estimate:
        print(estimate(args.estimate, args.tokens, args.estimate_gpus), end="")
        return 0
    from experiments.paper.recipe import paper_configs

    names = args.configs or paper_configs()
    start, rows = time.perf_counter(), []
    meta = versions() | {"date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        left = args.deadline - (time.perf_counter() - start)
        share = left / (len(names) - i)
        print(f"[{i + 1}/{len(names)}] {name} on {args.gpus} {'CPU process' if args.tiny else 'GPU'}(s), "
              f"{share:.0f} s at most ({left:.0f} s left)", flush=True)
        row = launch(name, args, timeout=max(share, 10))
        rows.append(row)
        print("    " + (f"error: {row['error']}" if "error" in row else
                        f"{row['tokens_per_s']:,.0f} tokens/s, {row['step_s']:.2f} s/step over {row['steps_timed']} "
                        f"steps, peak {row['peak_mem_gib'] or 0:.1f} GiB"), flush=True)
        add_scaling(rows, args.baseline)
        meta["device"] = rows[0].get("device", meta.get("device"))
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
