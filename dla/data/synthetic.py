"""Synthetic recall tasks, generated on the fly and deterministic by (seed, batch index).

Both tasks split the vocabulary in two: keys come from ``[1, vocab_size // 2)`` and values
from ``[vocab_size // 2, vocab_size)``; token 0 is never a key.

- :class:`MQAR` -- multi-query associative recall as in Zoology (Arora et al., 2023): the
  sequence starts with ``num_kv_pairs`` key-value pairs, then every key is queried once, at a
  power-law distributed gap; the loss is taken only where the answer (the key's value) must
  be predicted. Positions between queries hold random tokens.
- :class:`Needle` -- passkey / multi-key needle-in-a-haystack retrieval: ``num_needles``
  needles (a key followed by ``value_len`` value tokens) hidden in filler, one of them at a
  chosen depth; the sequence ends with that needle's key and the model must produce its value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dla.data.batch import IGNORE_INDEX, Batch, batch_generator
from dla.errors import DataError


def _distinct(batch: int, low: int, high: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, count]`` tokens drawn without replacement from ``[low, high)``, per row (the
    ``count`` smallest of uniform draws: a uniform subset in random order; ``topk`` is ~10x
    faster than a full ``argsort``, and MQAR batches are drawn on the CPU every step)."""
    return torch.rand(batch, high - low, generator=generator).topk(count, 1, largest=False).indices + low


def _check_mixture(task: str, item: str, mixture: list[list[int]] | None, weights: list[float] | None,
                   seq_len: int) -> None:
    if mixture:
        for s in mixture:
            if len(s) != 2:
                raise DataError(f"{task}: every mixture slice must be [length, {item}], got {s}")
            if not 1 <= s[0] <= seq_len:
                raise DataError(f"{task}: mixture slice {s} is longer than seq_len = {seq_len}")
        if weights is not None and (len(weights) != len(mixture) or min(weights) < 0 or sum(weights) <= 0):
            raise DataError(f"{task}: mixture_weights must be {len(mixture)} non-negative numbers "
                            f"(one per slice, not all 0), got {weights}")
    elif weights is not None:
        raise DataError(f"{task}: mixture_weights needs a mixture")


def _mixed_batch(mixture: list[list[int]], weights: list[float] | None, seq_len: int, batch_size: int,
                 generator: torch.Generator, examples) -> Batch:
    """Rows of several ``[length, count]`` slices: each row draws its slice with probability
    proportional to ``weights`` (default equal), is made by ``examples(length, count, rows,
    generator)`` and padded to ``seq_len`` with token 0 and ignored targets."""
    weights = torch.tensor(weights or [1.0] * len(mixture), dtype=torch.float64)
    choice = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    targets = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
    for s, (length, count) in enumerate(mixture):
        rows = (choice == s).nonzero().flatten()
        if len(rows):
            part = examples(length, count, len(rows), generator)
            input_ids[rows, :length] = part.input_ids
            targets[rows, :length] = part.targets
    return Batch(input_ids, targets)


class _TrainingMixture:
    """For a task with a training ``mixture`` (MQAR, Needle): the evaluation draws one layout."""

    def evaluation_task(self, **changes):
        """This task without its training mixture, with ``changes`` (dataclass fields) applied."""
        return replace(self, mixture=None, mixture_weights=None, **changes)


@dataclass
class MQAR(_TrainingMixture):
    """Multi-query associative recall (Zoology's ``multiquery_ar``).

    Layout of one example of length ``seq_len`` (``n = num_kv_pairs``)::

        k1 v1 k2 v2 ... kn vn | . . k3 . k1 . . . k2 . ...
                              ^ queries: key k at position 2n + 2 * gap, target = its value

    ``gap`` is drawn without replacement from ``{0, .., (seq_len - 2n) // 2 - 1}`` with
    probability proportional to ``power_a * i ** (power_a - 1)`` (i = gap + 1), so small gaps
    are likely. ``random_non_queries`` fills the positions that are not queries with uniform
    random tokens (Zoology's default) instead of 0.

    ``mixture`` (``[[length, pairs], ...]``) trains on several slices at once, as Zoology does
    (e.g. ``[[64, 4], [128, 8], [256, 16], [256, 32], [256, 64]]``): every row of a batch draws
    its slice with probability proportional to ``mixture_weights`` (default: equal), is
    generated at that length with that many pairs, and is padded to ``seq_len`` with token 0
    and ignored targets. ``num_kv_pairs`` is then only the default of the evaluation; the
    evaluation (:func:`dla.eval.recall.mqar_accuracy`) never uses the mixture.
    """

    vocab_size: int = 8192
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = True
    mixture: list[list[int]] | None = None
    mixture_weights: list[float] | None = None

    def slices(self, seq_len: int) -> list[tuple[int, int]]:
        """``(length, pairs)`` of every training slice: the mixture, or ``(seq_len, num_kv_pairs)``."""
        if not self.mixture:
            return [(seq_len, self.num_kv_pairs)]
        return [tuple(s) for s in self.mixture]

    def check(self, seq_len: int) -> None:
        _check_mixture("mqar", "pairs", self.mixture, self.mixture_weights, seq_len)
        for length, n in {(seq_len, self.num_kv_pairs), *self.slices(seq_len)}:
            if n < 1:
                raise DataError(f"mqar: num_kv_pairs must be >= 1, got {n}")
            if 4 * n > length:
                raise DataError(f"mqar: {n} key-value pairs need seq_len >= 4 * num_kv_pairs = {4 * n}, got {length}")
            if min(self.vocab_size // 2 - 1, self.vocab_size - self.vocab_size // 2) < n:
                raise DataError(f"mqar: vocab_size {self.vocab_size} has fewer than {n} distinct keys or values; "
                                f"it must be >= {2 * n + 2}")
        if not self.power_a > 0:
            raise DataError(f"mqar: power_a must be > 0, got {self.power_a}")

    def batch(self, seq_len: int, batch_size: int, generator: torch.Generator) -> Batch:
        self.check(seq_len)
        if not self.mixture:
            return self._examples(seq_len, self.num_kv_pairs, batch_size, generator)
        return _mixed_batch(self.mixture, self.mixture_weights, seq_len, batch_size, generator, self._examples)

    def regions(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``[B, T]`` masks of the parts of an example without a mixture: the key-value pairs and
        the queried keys (what :func:`dla.inspection.boundary_stats` counts boundaries in)."""
        position = torch.arange(batch.input_ids.shape[1])
        return {"kv_pairs": (position < 2 * self.num_kv_pairs).expand_as(batch.input_ids),
                "queries": batch.targets != IGNORE_INDEX}

    def _examples(self, seq_len: int, n: int, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` examples of length ``seq_len`` with ``n`` pairs."""
        B, V = batch_size, self.vocab_size
        context = 2 * n
        keys = _distinct(B, 1, V // 2, n, generator)
        values = _distinct(B, V // 2, V, n, generator)
        kv = torch.stack([keys, values], -1).reshape(B, context)
        space = (seq_len - context) // 2
        i = torch.arange(1, space + 1, dtype=torch.float64)
        p = self.power_a * i ** (self.power_a - 1)
        gaps = torch.multinomial(p.expand(B, space), n, replacement=False, generator=generator)
        # one extra position so that the targets can be the inputs shifted by one
        queries = torch.zeros(B, seq_len - context + 1, dtype=torch.long).scatter_(1, 2 * gaps, keys)
        tokens = torch.cat([kv, queries], 1)
        answers = torch.full((B, seq_len + 1), IGNORE_INDEX, dtype=torch.long)
        answers.scatter_(1, context + 2 * gaps + 1, values)
        input_ids, targets = tokens[:, :-1], answers[:, 1:]
        if self.random_non_queries:
            noise = torch.randint(V, input_ids.shape, generator=generator)
            input_ids = torch.where(input_ids == 0, noise, input_ids)
        return Batch(input_ids.contiguous(), targets.contiguous())


@dataclass
class Needle(_TrainingMixture):
    """Passkey / multi-key needle retrieval.

    One example of length ``seq_len``: filler tokens (drawn from the value range, so that no
    key appears by chance), ``num_needles`` needles ``key v_1 .. v_m`` (``m = value_len``) at
    non-overlapping places, then the query ``key v_1 .. v_{m-1}`` of one of them at the end;
    the targets are its value tokens ``v_1 .. v_m`` (teacher forced). The queried needle starts
    at ``round(depth * (seq_len - m - (m + 1)))``, the others anywhere else. ``depth`` in [0, 1],
    or ``None`` for a uniformly random depth per example. ``value_len > 1`` with one needle is
    the passkey task.

    ``mixture`` (``[[length, needles], ...]``) trains on several slices at once, like MQAR's: every
    row draws its slice with probability proportional to ``mixture_weights``, has that many
    needles at random depths, asks for every one of them at the end (one query after another,
    in the order the needles were drawn), and is padded to ``seq_len`` with token 0 and ignored
    targets. A passkey example has ``m`` targets; a slice of n needles has ``n * m``, which is
    what lets short training runs leave the loss plateau. The evaluation
    (:func:`dla.eval.recall.needle_accuracy`) never uses the mixture.

    Values longer than 3 tokens test something else besides retrieval: a value token is also
    filler, so only the key tells a needle's tokens apart, and a short convolution of width 4
    (Mamba-2, Gated DeltaNet) sees the key together with ``v_1 .. v_3`` only. In a CPU pilot
    (``experiments/results/needle-cpu-pilot/``) Gated DeltaNet retrieved ``v_1 .. v_3`` 92-100%
    of the time and ``v_4``, ``v_5`` never. Filler from a range of its own (tried) made every
    token reachable but learned more slowly: 16-29% per token after the same 5,000 steps.
    """

    vocab_size: int = 8192
    num_needles: int = 1
    value_len: int = 1
    depth: float | None = None
    mixture: list[list[int]] | None = None
    mixture_weights: list[float] | None = None

    def check(self, seq_len: int) -> None:
        _check_mixture("needle", "needles", self.mixture, self.mixture_weights, seq_len)
        m = self.value_len
        if m < 1:
            raise DataError(f"needle: value_len must be >= 1, got {m}")
        if self.depth is not None and not 0 <= self.depth <= 1:
            raise DataError(f"needle: depth must be in [0, 1] or null, got {self.depth}")
        layouts = {(seq_len, self.num_needles, 1)} | {(length, n, n) for length, n in self.mixture or []}
        for length, n, queries in layouts:
            if n < 1:
                raise DataError(f"needle: num_needles must be >= 1, got {n}")
            if self.vocab_size // 2 - 1 < n or self.vocab_size - self.vocab_size // 2 < 2:
                raise DataError(f"needle: vocab_size {self.vocab_size} is too small for {n} needles")
            if (m + 1) * n + queries * m > length // 2:
                raise DataError(f"needle: {n} needles of {m + 1} tokens and {queries} "
                                f"quer{'y' if queries == 1 else 'ies'} "
                                f"of {m} need a length >= {2 * ((m + 1) * n + queries * m)} (at most half of the "
                                f"sequence is needles), got {length}")

    def batch(self, seq_len: int, batch_size: int, generator: torch.Generator) -> Batch:
        self.check(seq_len)
        if not self.mixture:
            return self._examples(seq_len, self.num_needles, 1, batch_size, generator)
        return _mixed_batch(self.mixture, self.mixture_weights, seq_len, batch_size, generator,
                            lambda length, n, rows, gen: self._examples(length, n, n, rows, gen))

    def _examples(self, seq_len: int, n: int, queries: int, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` examples with ``n`` needles, the first ``queries`` of them asked for."""
        B, m, V = batch_size, self.value_len, self.vocab_size
        width, haystack = m + 1, seq_len - queries * m  # each query takes m positions at the end
        keys = _distinct(B, 1, V // 2, n, generator)
        values = torch.randint(V // 2, V, (B, n, m), generator=generator)
        input_ids = torch.randint(V // 2, V, (B, seq_len), generator=generator)
        targets = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
        if self.depth is None and n > 1:  # training: every placement equally likely, drawn at once
            starts = self._spread(B, n, width, haystack, generator)
        else:
            starts = self._around_depth(B, n, width, haystack, generator)
        positions = (starts[:, :, None] + torch.arange(width)).reshape(B, n * width)
        input_ids.scatter_(1, positions, torch.cat([keys[:, :, None], values], 2).reshape(B, n * width))
        for j in range(queries):  # needle j is asked for by query j; needle 0 sits at the chosen depth
            at = haystack + j * m
            input_ids[:, at] = keys[:, j]
            input_ids[:, at + 1: at + m] = values[:, j, : m - 1]
            targets[:, at: at + m] = values[:, j]
        return Batch(input_ids, targets)

    def _around_depth(self, B: int, n: int, width: int, haystack: int, generator: torch.Generator) -> torch.Tensor:
        """``[B, n]`` starts: needle 0 at ``depth`` (random if None), the others by rejection
        sampling, which is fine at <= 50% occupancy."""
        depths = torch.rand(B, generator=generator) if self.depth is None else torch.full((B,), float(self.depth))
        starts = torch.empty(B, n, dtype=torch.long)
        starts[:, 0] = (depths * (haystack - width)).round().long()
        for b in range(B):
            taken = [int(starts[b, 0])]
            while len(taken) < n:
                s = int(torch.randint(haystack - width + 1, (1,), generator=generator))
                if all(abs(s - t) >= width for t in taken):
                    taken.append(s)
            starts[b] = torch.tensor(taken)
        return starts

    @staticmethod
    def _spread(B: int, n: int, width: int, haystack: int, generator: torch.Generator) -> torch.Tensor:
        """``[B, n]`` starts of n non-overlapping needles, uniform over all placements: n distinct
        x in ``[0, haystack - n (width - 1))``, each shifted by ``width - 1`` per smaller x, maps
        one to one onto them (the needles in random order)."""
        x = _distinct(B, 0, haystack - n * (width - 1), n, generator)
        rank = x.argsort(1).argsort(1)
        return x + rank * (width - 1)

    def regions(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``[B, T]`` masks of the needles in the haystack (each key and its value tokens) and of
        the queries at the end (the queried key and the values fed back), kept apart as MQAR's
        pairs and queries are: a state opened where a query starts has not found a needle."""
        queries = batch.targets != IGNORE_INDEX
        key = (batch.input_ids >= 1) & (batch.input_ids < self.vocab_size // 2) & ~queries  # filler, values >= V/2
        needles = key.clone()
        for shift in range(1, self.value_len + 1):
            needles[:, shift:] |= key[:, :-shift]
        return {"needles": needles, "queries": queries}


TASKS = {"mqar": MQAR, "needle": Needle}


@dataclass
class SyntheticDataset:
    """Batches of a synthetic task: batch ``i`` is a pure function of ``(seed, i)``."""

    task: MQAR | Needle
    seq_len: int
    seed: int
    stream: int = 0

    def __post_init__(self):
        self.task.check(self.seq_len)

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size

    def batch(self, index: int, batch_size: int) -> Batch:
        return self.task.batch(self.seq_len, batch_size, batch_generator(self.seed, index, self.stream))
