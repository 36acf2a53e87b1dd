"""``DLACache``: the generation cache of a DLA model, in the shape ``transformers``' ``generate()`` uses."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from dla.layers import KVCache, MixerCache


class DLACache(Cache):
    """One entry per layer, one row per sequence, updated in place by the layers.

    DLA layers keep a :class:`dla.layers.MixerCache` (segment states, segmentation, previous key,
    convolution states): its size does not depend on how many tokens were seen. Attention layers
    keep a growing :class:`dla.layers.KVCache`, which allocates ``max_length`` slots per sequence
    at its first write (``generate()`` passes the longest its sequences can get) and doubles when
    full. ``seen_tokens`` counts the columns of every call, padding included, which is what
    ``generate()`` reads as the cache's sequence length.

    The states cannot be rolled back, so ``crop`` (assisted decoding) is unsupported; beam search
    and batch expansion reorder the rows.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config, max_length: int | None = None):
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be None or an int >= 1, got {max_length!r}")
        attention = config.mixer == "attention"
        super().__init__(layers=[KVCache(max_length=max_length) if attention else MixerCache()
                                 for _ in range(config.num_hidden_layers)])
        self.max_length, self.seen_tokens = max_length, 0

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def batch_size(self) -> int:
        """Sequences held, ``-1`` before the first call."""
        layer = self.layers[0]
        rows = layer.length if isinstance(layer, KVCache) else (None if layer.state is None else layer.state.states)
        return -1 if rows is None else rows.shape[0]

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length + self.seen_tokens, 0

    def update(self, *args, **kwargs):
        raise NotImplementedError("DLACache entries are updated by the layers themselves")

    def reset(self) -> None:
        self.layers = [KVCache(max_length=self.max_length) if isinstance(layer, KVCache) else MixerCache()
                       for layer in self.layers]
        self.seen_tokens = 0

    def advance(self, steps: int) -> None:
        """Count ``steps`` one-token calls whose tensor updates ran without Python (replays of a
        captured CUDA graph, :func:`dla.generate`): the host-side counters the layers keep."""
        self.seen_tokens += steps
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.size += steps

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("DLA and recurrent states cannot be rolled back, so the cache cannot be cropped")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.index_select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.index_select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.batch_size > 0:
            self.batch_select_indices(torch.arange(self.batch_size).repeat_interleave(repeats))
