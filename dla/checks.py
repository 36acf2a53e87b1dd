"""Value checks shared by the planner and the ops."""

from __future__ import annotations

import torch


def nonfinite_flags(tensors) -> torch.Tensor:
    """``[len(tensors)]`` bool: which of ``tensors`` hold a NaN or an Inf, without reading anything on
    the host. Two operations a tensor (its largest magnitude, which is NaN or Inf exactly when the
    tensor holds one: ``amax`` propagates NaN) instead of the six of ``~torch.isfinite(x).all()``
    (``isfinite`` is composed of four); an empty tensor holds none."""
    with torch.no_grad():
        peaks = [x.abs().amax() if x.numel() else x.new_zeros(()) for x in tensors]
        return ~torch.isfinite(torch.stack(peaks))
