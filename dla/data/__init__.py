"""Training and evaluation data: synthetic recall tasks and packed text.

Every dataset has ``vocab_size`` and ``batch(index, batch_size) -> Batch``, a pure function of
the seed and the batch index (so a resumed or distributed run needs only the index).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dla.data.batch import IGNORE_INDEX, Batch, batch_generator
from dla.data.stream import StreamingTextDataset
from dla.data.synthetic import MQAR, TASKS, Needle, SyntheticDataset
from dla.data.text import TextConfig, TextDataset, read_documents
from dla.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, text_tokenizer
from dla.errors import ConfigError


@dataclass
class DataConfig:
    """``task`` picks one of the sections below; ``seq_len`` is the length of every sequence
    (for ``text`` with ``packing = "varlen"``: the longest document allowed)."""

    task: str = "mqar"  # mqar | needle | text
    seq_len: int = 256
    mqar: MQAR = field(default_factory=MQAR)
    needle: Needle = field(default_factory=Needle)
    text: TextConfig = field(default_factory=TextConfig)


def build_dataset(cfg: DataConfig, seed: int) -> SyntheticDataset | TextDataset | StreamingTextDataset:
    if cfg.seq_len < 1:
        raise ConfigError(f"data.seq_len must be >= 1, got {cfg.seq_len}")
    if cfg.task in TASKS:
        return SyntheticDataset(getattr(cfg, cfg.task), cfg.seq_len, seed)
    if cfg.task == "text":
        return (StreamingTextDataset if cfg.text.streaming else TextDataset)(cfg.text, cfg.seq_len, seed)
    raise ConfigError(f"data.task must be one of {(*TASKS, 'text')}, got {cfg.task!r}")


__all__ = ["Batch", "ByteTokenizer", "DataConfig", "HFTokenizer", "IGNORE_INDEX", "MQAR", "Needle",
           "StreamingTextDataset", "SyntheticDataset", "TextConfig", "TextDataset", "batch_generator", "build_dataset",
           "load_tokenizer", "read_documents", "text_tokenizer"]
