"""Token-mixer layers: DLA on the Mamba-2 and Gated DeltaNet bases, and the attention baseline.

Each layer maps ``[B, T, hidden]`` (or packed ``[1, T_total, hidden]`` with ``cu_seqlens``) to the
same shape and continues earlier calls through a per-layer cache (:class:`MixerCache` for the DLA
layers, :class:`KVCache` for attention) that it updates in place.
"""

from dla.layers.attention import Attention, KVCache
from dla.layers.common import (
                               GatedRMSNorm,
                               LambdaProjection,
                               MixerCache,
                               PolicyConfig,
                               RouterScore,
                               ShortConvolution,
                               count_parameters,
)
from dla.layers.gated_deltanet import DLAGatedDeltaNet
from dla.layers.mamba2 import DLAMamba2

__all__ = ["Attention", "DLAGatedDeltaNet", "DLAMamba2", "GatedRMSNorm", "KVCache", "LambdaProjection", "MixerCache",
           "PolicyConfig", "RouterScore", "ShortConvolution", "count_parameters"]
