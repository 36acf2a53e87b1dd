"""``dla eval``: recall accuracy (MQAR, needle), loss by position on text, and lm-evaluation-harness.

Every evaluation writes a JSON file (and a PNG where it has a picture) into the output
directory and returns what it wrote.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import replace
from pathlib import Path

from dla.data import MQAR, Needle
from dla.errors import UserError
from dla.eval.recall import format_grid, mean_per_token, mqar_accuracy, needle_accuracy
from dla.eval.text_loss import per_position_loss
from dla.plots import heatmap, line_plot


def default_lengths(train_seq_len: int, max_len: int) -> list[int]:
    """The training length and two longer ones (extrapolation), within the model's maximum."""
    return [n for n in (train_seq_len, 2 * train_seq_len, 4 * train_seq_len) if n <= max_len] or [max_len]


def eval_mqar(model, task: MQAR, lengths, pairs, out: Path, examples: int, seed: int, device) -> dict:
    rows = mqar_accuracy(model, task, lengths, pairs, examples=examples, seed=seed, device=device)
    table = format_grid(rows, "num_kv_pairs", "seq_len", "MQAR accuracy (rows: key-value pairs, columns: length)")
    (out / "mqar.json").write_text(json.dumps({"task": vars(task), "rows": rows, "table": table}, indent=1))
    print(table)
    return {"mqar": rows, "files": [out / "mqar.json"]}


def eval_needle(model, task: Needle, lengths, depths, out: Path, examples: int, seed: int, device) -> dict:
    rows = needle_accuracy(model, task, lengths, depths, examples=examples, seed=seed, device=device)
    table = format_grid(rows, "depth", "seq_len", "needle accuracy (rows: depth, columns: length)")
    per_token = mean_per_token(r["token_accuracy"] for r in rows)
    table += "\nper value token, first to last (mean over the cells): " + " / ".join(f"{t:.3f}" for t in per_token)
    (out / "needle.json").write_text(json.dumps({"task": vars(task), "rows": rows, "table": table}, indent=1))
    print(table)
    grid = [[next(r["accuracy"] for r in rows if r["depth"] == d and r["seq_len"] == n) for n in lengths]
            for d in depths]
    png = heatmap(grid, depths, lengths, out / "needle.png", f"needle retrieval ({task.num_needles} needle(s), "
                  f"value of {task.value_len} token(s))", "sequence length", "depth of the needle")
    return {"needle": rows, "files": [out / "needle.json"] + ([png] if png else [])}


def eval_text(model, tokenizer, paths: list[str], seq_len: int, out: Path, windows: int, device) -> dict:
    loss = per_position_loss(model, tokenizer, paths, seq_len, max_windows=windows, device=device)
    summary = {"paths": paths, "seq_len": seq_len, "mean_loss": float(loss.mean()), "per_position": loss.tolist()}
    (out / "text_loss.json").write_text(json.dumps(summary))
    print(f"text loss over {seq_len} positions: mean {summary['mean_loss']:.4f}, "
          f"first {loss[0]:.4f}, last {loss[-1]:.4f}")
    png = line_plot({"loss": (list(range(1, seq_len + 1)), loss.tolist())}, out / "text_loss.png",
                    "next-token loss by position", "position (tokens of context + 1)", "loss (nats)", logx=True)
    return {"text_loss": summary, "files": [out / "text_loss.json"] + ([png] if png else [])}


def eval_lm_harness(checkpoint: Path, tasks: list[str], out: Path, include_path: str | None, limit: int | None,
                    batch_size: int, device) -> dict:
    """lm-evaluation-harness's ``hf`` model on the checkpoint, as ``lm_eval --model hf --model_args
    pretrained=DIR,trust_remote_code=True`` runs it."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError("--lm-eval needs lm-evaluation-harness: pip install 'lm-eval[hf]'") from e
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--lm-eval-include {include_path}: not a directory")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t]) and not Path(t).is_file()]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        said = "; ".join(f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items())
        raise UserError(f"--lm-eval: no such lm-evaluation-harness task: {said}; 'lm_eval ls tasks' lists them, "
                        "--lm-eval-include DIR adds your own")
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={checkpoint},trust_remote_code=True",
                                      tasks=tasks, task_manager=manager, limit=limit,
                                      batch_size=batch_size, device=str(device))
    (out / "lm_eval.json").write_text(json.dumps(results["results"], indent=1, default=str))
    for task, metrics in results["results"].items():
        print(task, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return {"lm_eval": results["results"], "files": [out / "lm_eval.json"]}


def synthetic_tasks(train_config: dict | None, vocab_size: int) -> tuple[MQAR, Needle, int]:
    """The MQAR and needle tasks (vocabulary split) a model was trained with, and its training
    length; for a text model, or one not trained by ``dla train``, tasks over its vocabulary."""
    if train_config is None or train_config["data"]["task"] == "text":
        seq_len = 256 if train_config is None else train_config["data"]["seq_len"]
        return MQAR(vocab_size=vocab_size), Needle(vocab_size=vocab_size), seq_len
    data = train_config["data"]
    try:
        mqar, needle = MQAR(**data["mqar"]), replace(Needle(**data["needle"]), depth=None)
        seq_len = int(data["seq_len"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"the checkpoint's train_config.json does not describe its data ({type(e).__name__}: {e}): "
                        "it is damaged or comes from another version of dla") from None
    # the task it was not trained on uses the vocabulary of the one it was
    if data["task"] == "needle":
        mqar = replace(mqar, vocab_size=needle.vocab_size)
    else:
        needle = replace(needle, vocab_size=mqar.vocab_size)
    if mqar.vocab_size > vocab_size:
        raise UserError(f"the checkpoint's train_config.json describes a {data['task']} task of {mqar.vocab_size} "
                        f"tokens, more than the model's vocabulary ({vocab_size}): the files do not belong together")
    return mqar, needle, seq_len
