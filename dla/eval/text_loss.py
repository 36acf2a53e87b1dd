"""Loss by position on text: how much a model gains from longer context."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dla.data import TextConfig
from dla.data.text import read_documents
from dla.errors import DataError


@torch.no_grad()
def per_position_loss(model, tokenizer, paths: list[str], seq_len: int, max_windows: int = 64, batch_size: int = 8,
                      text_field: str = "text", device="cpu") -> torch.Tensor:
    """Mean next-token loss at every position ``0 .. seq_len - 1`` of consecutive windows of the
    documents in ``paths`` (concatenated, each followed by the end-of-document token), ``[seq_len]``."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    stream = [t for _, text in read_documents(TextConfig(paths=paths, text_field=text_field))
              for t in tokenizer.encode(text) + eos]
    if max_windows < 1 or seq_len < 1:
        raise ValueError(f"max_windows and seq_len must be >= 1, got {max_windows} and {seq_len}")
    windows = min(max_windows, max(0, (len(stream) - 1) // seq_len))
    if windows == 0:
        raise DataError(f"{', '.join(paths)}: {len(stream)} tokens, fewer than seq_len + 1 = {seq_len + 1} "
                        "(a shorter --seq-len, or more text)")
    tokens = torch.tensor(stream[: windows * seq_len + 1])
    rows = tokens[:-1].view(windows, seq_len)
    targets = tokens[1:].view(windows, seq_len)
    total = torch.zeros(seq_len, dtype=torch.float64)
    device_type = torch.device(device).type
    for start in range(0, windows, batch_size):
        x = rows[start: start + batch_size].to(device)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets[start: start + batch_size].flatten().to(device),
                               reduction="none")
        total += loss.view(-1, seq_len).sum(0).double().cpu()
    return total / windows
