"""Text data: documents from local files or a Hugging Face dataset, tokenised, then packed.

Sources: ``.jsonl`` files (one JSON object per line, the text under ``text_field``; a
malformed line is reported as ``file:line``), any other file as one plain-text document, glob
patterns of those, or a dataset name or directory for ``datasets.load_dataset`` (optional
dependency). Every document is followed by the tokenizer's end-of-document token.

Packing (``packing``):

- ``fixed``: the documents are concatenated into one token stream and cut into windows of
  ``seq_len + 1`` tokens (consecutive windows share one token: the last target of one window
  is the first input of the next); rows are windows in a seeded random order, a new order
  every epoch. Documents cross row boundaries.
- ``varlen``: whole documents, in a seeded random order, are packed greedily into batches of
  at most ``batch_size * seq_len`` tokens, one ``[1, total]`` row with ``cu_seqlens``; no
  document sees another. ``seq_len`` is the longest document allowed: a longer one is an
  error that names it (its file and line).

Batch ``i`` is a pure function of ``(seed, i)`` in both modes.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dla.data.batch import Batch, batch_generator
from dla.data.tokenizer import load_tokenizer
from dla.errors import ConfigError, DataError

PACKINGS = ("fixed", "varlen")
ORDER_STREAM = 1  # batch_generator stream of the per-epoch orders (stream 0 is the tasks' data)


@dataclass
class TextConfig:
    """Where the text comes from and how it is tokenised and packed."""

    paths: list[str] = field(default_factory=list)  # files or glob patterns (.jsonl or plain text)
    hf_dataset: str | None = None  # a name or directory for datasets.load_dataset
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"  # the field that holds the text, in JSONL lines and dataset rows
    hf_data_files: list[str] = field(default_factory=list)  # data_files for datasets.load_dataset (optional)
    tokenizer: str = "byte"  # "byte" or a Hugging Face tokenizer name / directory
    packing: str = "fixed"
    streaming: bool = False  # read, tokenise and pack on the fly (dla.data.stream) instead of all up front
    shuffle_buffer: int = 0  # streaming: documents shuffled in a seeded buffer of this many (0: stream order)

    def check(self) -> None:
        if self.packing not in PACKINGS:
            raise ConfigError(f"data.text.packing must be one of {PACKINGS}, got {self.packing!r}")
        if not self.paths and self.hf_dataset is None:
            raise ConfigError("text data needs data.text.paths (files) or data.text.hf_dataset")


def read_documents(cfg: TextConfig, seed: int = 0):
    """Yield ``(where, text)`` for every document; ``where`` names its file (and line). With
    ``cfg.streaming`` a Hugging Face dataset is streamed (``load_dataset(..., streaming=True)``,
    nothing is downloaded up front), shuffled in a buffer of ``cfg.shuffle_buffer`` documents."""
    for pattern in cfg.paths:
        files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not files:
            raise DataError(f"no data file matches {pattern!r}")
        for name in files:
            path = Path(name)
            if not path.is_file():
                raise DataError(f"data file not found: {name}")
            if path.suffix == ".jsonl":
                yield from _read_jsonl(path, cfg.text_field)
            else:
                yield str(path), path.read_text(encoding="utf-8", errors="replace")
    if cfg.hf_dataset is not None:
        try:
            import datasets
        except ImportError as e:
            raise ConfigError("data.text.hf_dataset needs the datasets package (pip install datasets)") from e
        if looks_like_path(cfg.hf_dataset) and not Path(cfg.hf_dataset).exists():
            raise DataError(f"data.text.hf_dataset: the directory {cfg.hf_dataset} does not exist")
        extra = {"data_files": cfg.hf_data_files} if cfg.hf_data_files else {}
        try:
            rows = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.hf_split, streaming=cfg.streaming,
                                         **extra)
        except (OSError, ValueError) as e:  # not found locally or on the Hub, offline, no such split
            raise DataError(f"data.text.hf_dataset {cfg.hf_dataset!r} cannot be loaded: {e} (a local directory must "
                            "exist; a Hub dataset needs the network or the datasets cache)") from None
        if cfg.streaming:
            if cfg.shuffle_buffer > 0:
                rows = rows.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
            for i, row in enumerate(rows):
                if cfg.text_field not in row:
                    raise DataError(f"dataset {cfg.hf_dataset!r} has no column {cfg.text_field!r} "
                                    f"(columns: {sorted(row)}); set data.text.text_field")
                yield f"{cfg.hf_dataset}[{i}]", row[cfg.text_field]
            return
        if cfg.text_field not in rows.column_names:
            raise DataError(f"dataset {cfg.hf_dataset!r} has no column {cfg.text_field!r} "
                            f"(columns: {rows.column_names}); set data.text.text_field")
        for i, text in enumerate(rows[cfg.text_field]):
            yield f"{cfg.hf_dataset}[{i}]", text


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hub dataset name (``user/name``): absolute, ``./``, ``../`` or ``~``."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or "\\" in name


def _read_jsonl(path: Path, text_field: str):
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line: {e.reason}); "
                                "JSONL files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise DataError(f"{path}:{lineno}: expected a JSON object with a string field {text_field!r}")
            yield f"{path}:{lineno}", row[text_field]


class TextDataset:
    """Tokenised documents, packed as :class:`TextConfig` says (see the module docstring)."""

    def __init__(self, cfg: TextConfig, seq_len: int, seed: int):
        cfg.check()
        self.cfg, self.seq_len, self.seed = cfg, seq_len, seed
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        self.documents = []  # (where, token ids including the end-of-document token)
        for where, text in read_documents(cfg):
            ids = self.tokenizer.encode(text) + eos
            if len(ids) >= 2:
                self.documents.append((where, torch.tensor(ids, dtype=torch.long)))
        if not self.documents:
            raise DataError("the text data holds no document of at least one token")
        if cfg.packing == "fixed":
            self.stream = torch.cat([ids for _, ids in self.documents])
            self.num_windows = (self.stream.numel() - 1) // seq_len
            if self.num_windows == 0:
                raise DataError(f"the text data has {self.stream.numel()} tokens, fewer than seq_len + 1 = "
                                f"{seq_len + 1}")
        else:
            for where, ids in self.documents:
                if ids.numel() - 1 > seq_len:
                    raise DataError(f"{where}: a document of {ids.numel() - 1} tokens is longer than the maximum "
                                    f"sequence length seq_len = {seq_len}; raise data.seq_len or use "
                                    "data.text.packing=fixed")
            # batch_size -> (bins of document indices, epochs binned so far)
            self._bins: dict[int, tuple[list[list[int]], int]] = {}
        self._orders: dict[int, torch.Tensor] = {}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _epoch_order(self, epoch: int, n: int) -> torch.Tensor:
        """The seeded order of the ``n`` windows or documents in ``epoch`` (the last two kept)."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = torch.randperm(n, generator=batch_generator(self.seed, epoch, ORDER_STREAM))
        return self._orders[epoch]

    def batch(self, index: int, batch_size: int) -> Batch:
        if self.cfg.packing == "fixed":
            rows = []
            for n in range(index * batch_size, (index + 1) * batch_size):
                window = int(self._epoch_order(n // self.num_windows, self.num_windows)[n % self.num_windows])
                rows.append(self.stream[window * self.seq_len: (window + 1) * self.seq_len + 1])
            rows = torch.stack(rows)
            return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
        docs = [self.documents[i][1] for i in self._varlen_bin(index, batch_size)]
        lengths = torch.tensor([0] + [d.numel() - 1 for d in docs])
        return Batch(torch.cat([d[:-1] for d in docs])[None], torch.cat([d[1:] for d in docs])[None],
                     cu_seqlens=lengths.cumsum(0).to(torch.int32))

    def _varlen_bin(self, index: int, batch_size: int) -> list[int]:
        """Documents of packed batch ``index``: epochs of greedily filled bins, appended lazily."""
        bins, epoch = self._bins.get(batch_size, ([], 0))
        budget = batch_size * self.seq_len
        while len(bins) <= index:
            current, used = [], 0
            for i in self._epoch_order(epoch, len(self.documents)).tolist():
                size = self.documents[i][1].numel() - 1
                if used + size > budget:
                    bins.append(current)
                    current, used = [], 0
                current.append(i)
                used += size
            bins.append(current)
            epoch += 1
        self._bins[batch_size] = (bins, epoch)
        return bins[index]
