"""What every dataset yields: token ids with their next-token targets, optionally packed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # targets that carry no loss (cross_entropy's default ignore_index)


@dataclass
class Batch:
    """``input_ids [B, T]`` and ``targets [B, T]``: ``targets[b, t]`` is the token that should
    follow ``input_ids[b, :t + 1]``, or :data:`IGNORE_INDEX` where no loss is taken (the
    targets are already shifted, so the loss is a plain per-position cross-entropy).

    A packed (variable-length) batch has ``B == 1`` and ``cu_seqlens`` (``[N + 1]``, int32)
    marking where each of its ``N`` documents starts; no document sees another.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor | None = None

    def to(self, device) -> Batch:
        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device)
        return Batch(self.input_ids.to(device), self.targets.to(device), cu)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def batch_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """The random generator of batch ``index`` of a run seeded ``seed``.

    Every batch has its own generator, so batch ``i`` is the same whichever batches came
    before it: resuming, skipping and splitting batches over processes need no bookkeeping.
    ``stream`` separates independent uses of one seed (training data vs. evaluation data)."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
