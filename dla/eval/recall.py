"""Recall accuracy of a model on held-out synthetic data: MQAR by (length, pairs), needle by (length, depth).

Evaluation batches come from their own random stream (:data:`EVAL_STREAM`), so with the
training seed they are still examples the model never trained on.
"""

from __future__ import annotations

import torch

from dla.data import IGNORE_INDEX, MQAR, Batch, Needle, SyntheticDataset
from dla.errors import DataError

EVAL_STREAM = 2


@torch.no_grad()
def target_hits(model, batch: Batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hits, answers)``, ``[B, T]`` masks: the targets the argmax predicts right, and the targets."""
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
        logits = model(input_ids=batch.input_ids.to(device), use_cache=False).logits
    answers = batch.targets != IGNORE_INDEX
    return (logits.argmax(-1).cpu() == batch.targets) & answers, answers


def _batches(task, seq_len: int, examples: int, batch_size: int, seed: int):
    data = SyntheticDataset(task, seq_len, seed, stream=EVAL_STREAM)
    for i, start in enumerate(range(0, examples, batch_size)):
        yield data.batch(i, min(batch_size, examples - start))


def mqar_accuracy(model, task: MQAR, lengths: list[int], pairs: list[int], examples: int = 256,
                  batch_size: int = 64, seed: int = 0, device="cpu") -> list[dict]:
    """One row per (seq_len, num_kv_pairs): the fraction of queries answered right
    (``accuracy`` is ``None`` where the pairs do not fit the length)."""
    rows = []
    for seq_len in lengths:
        for n in pairs:
            cell = task.evaluation_task(num_kv_pairs=n)  # one slice, never the mixture
            try:
                cell.check(seq_len)
            except DataError:
                rows.append({"seq_len": seq_len, "num_kv_pairs": n, "accuracy": None, "examples": 0})
                continue
            hits = answers = 0
            for batch in _batches(cell, seq_len, examples, batch_size, seed):
                h, a = target_hits(model, batch, device)
                hits, answers = hits + int(h.sum()), answers + int(a.sum())
            rows.append({"seq_len": seq_len, "num_kv_pairs": n, "accuracy": hits / answers, "examples": examples})
    return rows


def needle_accuracy(model, task: Needle, lengths: list[int], depths: list[float], examples: int = 64,
                    batch_size: int = 32, seed: int = 0, device="cpu") -> list[dict]:
    """One row per (seq_len, depth): ``accuracy``, the fraction of examples whose whole value came
    out right, and ``token_accuracy``, the fraction for each of its tokens (teacher forced), which
    tells a model that finds the needle but loses the value's tail from one that never finds it."""
    rows = []
    for seq_len in lengths:
        for depth in depths:
            cell = task.evaluation_task(depth=depth)  # one query, never the mixture
            found, per_token = 0, torch.zeros(task.value_len)
            for batch in _batches(cell, seq_len, examples, batch_size, seed):
                h, a = target_hits(model, batch, device)
                value_hits = h[a].view(len(h), task.value_len)  # the one query's targets, in order
                found += int(value_hits.all(1).sum())
                per_token += value_hits.sum(0)
            rows.append({"seq_len": seq_len, "depth": depth, "accuracy": found / examples,
                         "token_accuracy": (per_token / examples).tolist(), "examples": examples})
    return rows


def mean_per_token(token_accuracies) -> list[float]:
    """The element-wise mean of per-value-token accuracy lists (over cells, or over seeds)."""
    return [sum(t) / len(t) for t in zip(*token_accuracies)]


def format_grid(rows: list[dict], row_key: str, col_key: str, title: str) -> str:
    """A text table of ``accuracy`` with one line per ``row_key`` value and one column per ``col_key``."""
    row_values = sorted({r[row_key] for r in rows})
    col_values = sorted({r[col_key] for r in rows})
    cell = {(r[row_key], r[col_key]): r["accuracy"] for r in rows}
    width = max(8, *(len(str(c)) + 2 for c in col_values))
    lines = [title, f"{row_key:>14}" + "".join(f"{str(c):>{width}}" for c in col_values)]
    for rv in row_values:
        values = [cell.get((rv, c)) for c in col_values]
        lines.append(f"{str(rv):>14}" + "".join(f"{'-' if v is None else f'{v:.3f}':>{width}}" for v in values))
    return "\n".join(lines)
