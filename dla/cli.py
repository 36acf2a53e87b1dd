"""The ``dla`` command: train, evaluate, inspect, benchmark, demo.

    dla train [CONFIG] [KEY=VALUE ...] [--resume]
    dla eval CHECKPOINT [--mqar] [--needle] [--text FILE ...] [--lm-eval TASK ...]
    dla inspect CHECKPOINT (--text FILE | --synthetic)
    dla bench [--quick]
    dla demo

``python -m dla ...`` is the same command (``torchrun --nproc_per_node=N -m dla train ...``
trains on N GPUs). Errors in what was asked for (a config key, a data file, a checkpoint) are
printed as one line and exit with status 2; an interrupted training run exits with 130.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

from dla.cpu_allocator import keep_freed_memory
from dla.data.tokenizer import text_tokenizer
from dla.errors import UserError
from dla.train.config import key_names
from dla.train.metrics import parse_duration

EPILOG_TRAIN = """\
examples:
  dla train configs/mqar.yaml
  dla train configs/mqar.yaml steps=2000 optim.lr=3e-3 model.policy=fenwick
  dla train configs/text.toml data.text.paths=corpus.jsonl out_dir=runs/text
  dla train configs/mqar.yaml --resume          # continue runs/... from its latest checkpoint
  dla train configs/text.toml --stop-after 3h50m   # a 4-hour job; the next job adds --resume
  torchrun --nproc_per_node=2 -m dla train configs/mqar.yaml parallel=fsdp

keys (model.* = the arguments of dla.DLAConfig: mixer, hidden_size, num_hidden_layers, head_dim,
state_size, policy, capacity, threshold, period, max_segment_len, merge, score, label_rule, ...):
"""


def output_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a directory to write results into (created), or :class:`UserError`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file: give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be created: {e.strerror}") from None
    return path


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is available")
    return torch.device(name)


# ----------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from dla.train import load_config, train
    from dla.train.config import to_dict

    config_files = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    if len(config_files) > 1:
        raise UserError(f"one config file at most, got {config_files} (overrides look like key=value)")
    cfg = load_config(config_files[0] if config_files else None, overrides)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    stop_at = None if args.stop_after is None else time.time() + args.stop_after
    if args.allow_config_change and not args.resume:
        raise UserError("--allow-config-change goes with --resume")
    result = train(cfg, resume=args.resume, show_progress=not args.quiet, stop_at=stop_at,
                   allow_config_change=args.allow_config_change)
    return 130 if result["status"] == "interrupted" else 0


# ----------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from dla.eval import (
        default_lengths,
        eval_lm_harness,
        eval_mqar,
        eval_needle,
        eval_text,
        synthetic_tasks,
    )
    from dla.train.checkpoint import load_model, resolve_checkpoint

    device = pick_device(args.device)
    directory = resolve_checkpoint(args.checkpoint)
    if args.suite:
        from dla.eval.suite import run_suite

        out = output_dir(args.out if args.out else directory / "eval")
        run_suite(directory, out, args.suite_data, args.suite_tasks, args.lm_eval_limit, args.batch_size, device,
                  args.ruler_lengths)
        print(f"wrote {out / 'suite.json'}, {out / 'suite.md'}")
        return 0
    if not all(0 <= d <= 1 for d in args.depths):
        raise UserError(f"--depths must be in [0, 1], got {args.depths}")
    model, tokenizer, train_config = load_model(directory, device)
    out = output_dir(args.out if args.out else directory / "eval")
    if not (args.mqar or args.needle or args.text or args.lm_eval):
        if tokenizer is not None:
            raise UserError("this is a text model: choose --text FILE and/or --lm-eval TASK (or --mqar / --needle)")
        args.mqar = args.needle = True
    mqar, needle, train_len = synthetic_tasks(train_config, model.config.vocab_size)
    lengths = args.lengths or default_lengths(train_len, model.config.max_position_embeddings)
    files = []
    if args.mqar:
        n = mqar.num_kv_pairs
        pairs = args.pairs or sorted({max(1, n // 2), n, 2 * n, 4 * n})
        files += eval_mqar(model, mqar, lengths, pairs, out, args.examples, args.seed, device)["files"]
    if args.needle:
        files += eval_needle(model, needle, lengths, args.depths, out, args.examples, args.seed, device)["files"]
    if args.text:
        files += eval_text(model, text_tokenizer(tokenizer, model), args.text, args.seq_len or train_len, out,
                           args.windows, device)["files"]
    if args.lm_eval:
        files += eval_lm_harness(directory, args.lm_eval, out, args.lm_eval_include, args.lm_eval_limit,
                                 args.batch_size, device)["files"]
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


# ----------------------------------------------------------------------------- inspect
def cmd_inspect(args) -> int:
    import torch

    from dla.eval import synthetic_tasks
    from dla.inspection import inspect_model, synthetic_example
    from dla.train.checkpoint import load_model, resolve_checkpoint

    if (args.text is None) == (not args.synthetic):
        raise UserError("give exactly one of --text FILE and --synthetic")
    device = pick_device(args.device)
    directory = resolve_checkpoint(args.checkpoint)
    model, tokenizer, train_config = load_model(directory, device)
    if args.text is not None:
        from dla.data import TextConfig, read_documents

        tok = text_tokenizer(tokenizer, model)
        ids = [i for _, text in read_documents(TextConfig(paths=[args.text])) for i in tok.encode(text)]
        source, render, regions = args.text, (lambda i: tok.decode([i])), None
    else:
        mqar, needle, train_len = synthetic_tasks(train_config, model.config.vocab_size)
        # the evaluation's layout (no training mixture): one example whose parts the regions name
        task = (needle if train_config and train_config["data"]["task"] == "needle" else mqar).evaluation_task()
        ids, regions = synthetic_example(task, train_len, args.seed)
        source, render = f"one {type(task).__name__} example (seed {args.seed})", (lambda i: f"{i} ")
    if not ids:
        raise UserError(f"{args.text} holds no text")
    if len(ids) > args.max_tokens:
        print(f"note: using the first {args.max_tokens} of {len(ids)} tokens (--max-tokens)", file=sys.stderr)
        ids = ids[: args.max_tokens]
        if regions:
            regions = {name: mask[: args.max_tokens] for name, mask in regions.items()}
    out = output_dir(args.out if args.out else directory / "inspect")
    with torch.no_grad():
        report = inspect_model(model, ids, render, out, source, args.heads, str(directory), regions)
    for layer in report["layers"]:
        opened = [len(h["opened"]) for h in layer["heads"]]
        merges = [len(h["merges"]) for h in layer["heads"]]
        print(f"layer {layer['layer']} ({layer['policy']}, C={layer['capacity']}): states opened per head {opened}, "
              f"merges per head {merges}")
    print(f"wrote {out / 'inspect.html'}, {out / 'inspect.png'}, {out / 'inspect.json'}")
    return 0


# ----------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from dla.bench import run_bench

    device = pick_device(args.device)
    gpu = device.type == "cuda"
    if args.lengths:
        lengths = args.lengths
    elif args.quick:
        lengths = [1024, 4096, 16384] if gpu else [256, 1024]
    else:
        lengths = [1024, 2048, 4096, 8192, 16384, 32768] if gpu else [256, 512, 1024, 2048, 4096]
    size = {"hidden_size": args.hidden_size or (1024 if gpu else 256), "num_hidden_layers": args.layers,
            "head_dim": 64, "state_size": 64}
    files = run_bench(output_dir(args.out), lengths, args.new_tokens, size, args.capacity, device, not args.skip_ops,
                      args.quick)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from dla.demo import run_demo

    run_demo(output_dir(args.out), pick_device(args.device), args.seed, args.steps, args.policies, args.workers)
    return 0


# ----------------------------------------------------------------------------- parser
class Parser(argparse.ArgumentParser):
    """Command-line mistakes are one ``error:`` line (status 2), as every other user error."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see '{self.prog} --help')")


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """``--device``, the same for every command that runs a model."""
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto (the default): CUDA when a GPU is visible, else the CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dla", description="Dynamic Linear Attention: train, evaluate, inspect, "
                                     "benchmark. 'dla COMMAND --help' describes each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    keys = textwrap.fill(" ".join(key_names()), width=100, initial_indent="  ", subsequent_indent="  ")
    p = sub.add_parser("train", help="train a DLA language model (synthetic recall or text)",
                       epilog=EPILOG_TRAIN + keys + "\nUse --print-config to see every value.",
                       formatter_class=fmt, description="Train a dla.DLAForCausalLM. Configs are YAML, TOML or JSON "
                       "files; KEY=VALUE overrides follow (unknown keys are errors). Checkpoints go to "
                       "OUT_DIR/checkpoints/step_N (save_pretrained + optimizer state); metrics to "
                       "OUT_DIR/metrics.{csv,jsonl}. Ctrl-C saves a resumable checkpoint.")
    p.add_argument("items", nargs="*", metavar="CONFIG | KEY=VALUE", help="a config file and/or overrides")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR's latest checkpoint: same step, "
                   "same data order, optimizer and RNG state")
    p.add_argument("--allow-config-change", action="store_true", help="with --resume: accept a changed model.*, "
                   "data.* or seed (the model is built from the new config and the saved weights must fit it)")
    p.add_argument("--stop-after", type=parse_duration, metavar="TIME", help="stop after the first step that ends "
                   "this long after the start (e.g. 3h50m, 90m, 600), saving a checkpoint (exit status 130); the "
                   "next job continues with --resume")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("eval", help="recall accuracy (MQAR, needle), loss by position, lm-evaluation-harness",
                       formatter_class=fmt, description="Evaluate a checkpoint (a saved model directory or a "
                       "training run's out_dir). Without a choice, a synthetic-task model gets --mqar and --needle. "
                       "Results go to OUT (default CHECKPOINT/eval) as JSON, tables on stdout, PNG plots.",
                       epilog="examples:\n  dla eval runs/mqar\n  dla eval runs/mqar --mqar --lengths 64 128 256 "
                       "--pairs 4 8 16 32\n  dla eval runs/text --text valid.jsonl\n  dla eval runs/text --lm-eval "
                       "my_task --lm-eval-include tasks/\n  dla eval runs/paper/dla_mamba2_780m --suite paper")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--mqar", action="store_true", help="MQAR accuracy by number of key-value pairs and length")
    p.add_argument("--needle", action="store_true", help="needle accuracy by depth and length (heatmap)")
    p.add_argument("--text", nargs="+", metavar="FILE", help="loss by position on these text / JSONL files")
    p.add_argument("--lm-eval", nargs="+", metavar="TASK", help="lm-evaluation-harness tasks (needs lm-eval)")
    p.add_argument("--lm-eval-include", metavar="DIR", help="a directory of extra lm-eval task YAMLs")
    p.add_argument("--lm-eval-limit", type=positive_int, metavar="N", help="at most N examples per lm-eval task")
    p.add_argument("--suite", choices=("paper",), help="the paper's three categories through lm-eval in one run, "
                   "one table (OUT/suite.json, OUT/suite.md); tasks whose data is absent are skipped, never downloaded")
    p.add_argument("--suite-data", metavar="DIR", help="local stand-in datasets: DIR/<dataset path>/ (e.g. "
                   "DIR/baber/piqa/validation.jsonl), found before the datasets cache")
    p.add_argument("--suite-tasks", nargs="+", metavar="TASK", help="a subset of the suite (tasks or categories)")
    p.add_argument("--ruler-lengths", type=positive_int, nargs="+", default=[4096, 8192, 16384], metavar="T",
                   help="RULER needle lengths for --suite")
    p.add_argument("--lengths", type=positive_int, nargs="+", metavar="T",
                   help="sequence lengths (default: the training length, x2, x4)")
    p.add_argument("--pairs", type=positive_int, nargs="+", metavar="N",
                   help="MQAR key-value pairs (default: n/2, n, 2n, 4n around the training value)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="D",
                   help="needle depths in [0, 1]")
    p.add_argument("--examples", type=positive_int, default=256, help="examples per cell of the recall grids")
    p.add_argument("--seq-len", type=positive_int, help="window length for --text (default: the training length)")
    p.add_argument("--windows", type=positive_int, default=64, help="at most this many windows for --text")
    p.add_argument("--batch-size", type=positive_int, default=8, help="batch size for lm-eval")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation data")
    add_device_argument(p)
    p.add_argument("--out", metavar="DIR", help="default CHECKPOINT/eval")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("inspect", help="per layer and head: which tokens opened a state, merges, the cache over time",
                       formatter_class=fmt, description="Run a checkpoint on one text and show what its DLA layers "
                       "did: an HTML page (the text with the tokens that opened a state marked, the merges), a PNG "
                       "(segment maps and the number of states over time per layer and head) and the JSON.",
                       epilog="example:\n  dla inspect runs/text --text story.txt --heads 0 1\n  dla inspect "
                       "runs/mqar --synthetic")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--text", metavar="FILE", help="a text or JSONL file (its documents are concatenated)")
    p.add_argument("--synthetic", action="store_true", help="one example of the task the model was trained on, "
                   "laid out as its evaluation is (no training mixture), with the task's parts marked (MQAR's "
                   "key-value pairs and queries; the needles and the query)")
    p.add_argument("--max-tokens", type=positive_int, default=256,
                   help="inspect the first N tokens (the pairwise maps are N x N)")
    p.add_argument("--heads", type=non_negative_int, nargs="+", metavar="H", help="heads to show (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --synthetic example")
    add_device_argument(p)
    p.add_argument("--out", metavar="DIR", help="default CHECKPOINT/inspect")
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("bench", help="op benchmarks and decoding speed / cache memory vs context",
                       formatter_class=fmt, description="Runs benchmarks/cpu_scaling.py (CPU) or benchmarks/ops.py "
                       "(GPU) when present, then decodes with DLA, Log-Linear (fenwick), single-state and attention "
                       "models of one size: tokens/s and cache bytes vs context length, as JSON and PNG.")
    p.add_argument("--quick", action="store_true", help="fewer and shorter lengths")
    p.add_argument("--skip-ops", action="store_true", help="only the decoding benchmark")
    p.add_argument("--lengths", type=positive_int, nargs="+", metavar="T", help="context lengths")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="tokens decoded per measurement")
    p.add_argument("--hidden-size", type=positive_int, help="model width (default 256 on CPU, 1024 on GPU)")
    p.add_argument("--layers", type=positive_int, default=4, help="model depth (default 4)")
    p.add_argument("--capacity", type=positive_int, default=16, help="DLA's capacity C (default 16)")
    add_device_argument(p)
    p.add_argument("--out", default="runs/bench", metavar="DIR", help="default runs/bench")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser("demo", help="train tiny DLA-Mamba-2 models with four policies on MQAR and compare",
                       formatter_class=fmt, description="Trains the dynamic, fenwick, fixed and single policies "
                       "(same model size, data and steps) on MQAR, prints an accuracy table and writes a plot. "
                       "About 11 minutes on 2 CPU cores; longer training on a GPU. Deterministic by --seed.")
    p.add_argument("--steps", type=positive_int, help="training steps per model (default: the device's preset)")
    p.add_argument("--policies", nargs="+", default=["dynamic", "fenwick", "fixed", "single"],
                   choices=("dynamic", "fenwick", "fixed", "single"))
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the models (default 0)")
    p.add_argument("--workers", type=positive_int,
                   help="models trained at once on CPU (default: one per core, at most 4)")
    add_device_argument(p)
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="default runs/demo")
    p.set_defaults(handler=cmd_demo)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; ``dla train``'s config file and overrides may also follow its flags."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # positional items after a flag: argparse leaves them over
        args.items += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:
        raise UserError(f"dla {args.command}: unrecognized arguments: {' '.join(extra)} "
                        f"(see 'dla {args.command} --help')")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        keep_freed_memory()  # CPU training would otherwise pay the kernel's page zeroing at every step
        return args.handler(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one during any other command
        print("\ninterrupted", file=sys.stderr)
        return 130
