"""Streamed text: documents are read, tokenised and packed on the fly, never held all at once.

This is the pre-training path (``data.text.streaming = true``): a Hugging Face dataset streamed
with ``load_dataset(..., streaming=True)`` (or local files, read lazily), each document followed
by the end-of-document token, packed in stream order (optionally through a seeded shuffle buffer,
``data.text.shuffle_buffer``):

- ``varlen``: every micro-batch is one ``[1, batch_size * seq_len]`` row, filled exactly, with
  ``cu_seqlens`` at the document boundaries. A document longer than ``seq_len`` positions, or
  one that does not fit the room left in the batch, is cut; the next piece starts as a new
  sequence (in the next batch when this one is full). Consecutive pieces of a document share one
  token (the last target of one is the first input of the next), so no target is lost.
- ``fixed``: the same stream of pieces cut into ``[batch_size, seq_len]`` rows: documents
  cross rows and see each other (no ``cu_seqlens``), but no target is a token of the next
  document.

Batch ``i`` is the ``i``-th batch of the stream, so it is a pure function of the seed and ``i``
as the training loop needs. Batches must be asked for in increasing order to be cheap: each
process reads the whole stream and packs (then drops) the batches of the other processes, and
asking for an earlier batch (or resuming at step ``s``) re-reads the stream from its start.
"""

from __future__ import annotations

import torch

from dla.data.batch import Batch
from dla.data.text import TextConfig, read_documents
from dla.data.tokenizer import load_tokenizer
from dla.errors import DataError


class StreamingTextDataset:
    """Packed batches of a document stream (see the module docstring)."""

    def __init__(self, cfg: TextConfig, seq_len: int, seed: int):
        cfg.check()
        self.cfg, self.seq_len, self.seed = cfg, seq_len, seed
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self._restart(None)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _restart(self, batch_size: int | None) -> None:
        self._batch_size, self._next, self._pending = batch_size, 0, None
        self._tokens = self._token_pieces()

    def _token_pieces(self):
        """Token ids of every document (end-of-document token appended), in stream order."""
        eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        empty = True
        for _, text in read_documents(self.cfg, self.seed):
            ids = self.tokenizer.encode(text) + eos
            if len(ids) >= 2:
                empty = False
                yield torch.tensor(ids, dtype=torch.long)
        if empty:
            raise DataError("the text data holds no document of at least one token")

    def _next_document(self, pending: torch.Tensor | None) -> torch.Tensor:
        """The current document's unread tokens, or the next document (the stream loops over epochs)."""
        if pending is not None and pending.numel() >= 2:
            return pending
        try:
            return next(self._tokens)
        except StopIteration:
            self._tokens = self._token_pieces()  # a new epoch
            return next(self._tokens)

    def _pack(self, batch_size: int) -> Batch:
        budget = batch_size * self.seq_len
        inputs, targets, lengths = [], [], []
        used = 0
        while used < budget:
            doc = self._next_document(self._pending)
            n = doc.numel() - 1  # positions this document can still fill
            if self.cfg.packing == "fixed":
                take = min(n, budget - used)
            else:
                take = min(n, budget - used, self.seq_len)
            inputs.append(doc[:take])
            targets.append(doc[1:take + 1])
            lengths.append(take)
            used += take
            self._pending = doc[take:]  # starts with the last target: the pieces share one token
        input_ids, target_ids = torch.cat(inputs), torch.cat(targets)
        if self.cfg.packing == "fixed":
            return Batch(input_ids.view(batch_size, self.seq_len), target_ids.view(batch_size, self.seq_len))
        cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        return Batch(input_ids[None], target_ids[None], cu_seqlens=cu_seqlens)

    def batch(self, index: int, batch_size: int) -> Batch:
        if batch_size != self._batch_size or index < self._next:
            self._restart(batch_size)
        while True:
            batch = self._pack(batch_size)
            self._next += 1
            if self._next - 1 == index:
                return batch
