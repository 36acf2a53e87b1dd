"""Value checks shared by the planner and the ops."""

from __future__ import annotations

import math

import torch


def nonfinite_flags(tensors) -> torch.Tensor:
    """``[len(tensors)]`` bool: which of ``tensors`` hold a NaN or an Inf, without reading anything on
    the host, in four operations whatever their number: every tensor's largest magnitude from one
    ``_foreach_norm`` of order inf (NaN or Inf exactly when the tensor holds one: its maximum propagates
    NaN; on a GPU one multi-tensor launch if they share a dtype, else a reduction each, launched from C++),
    stacked and compared, against six operations a tensor for ``~torch.isfinite(x).all()``. An empty
    tensor holds none (and has no infinity norm)."""
    tensors = list(tensors)
    with torch.no_grad():
        filled = [x for x in tensors if x.numel()]
        # the peaks in one dtype, wide enough for every input (exact: a maximum), so none is converted to stack them
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in filled) else torch.float32
        peaks = iter(torch._foreach_norm(filled, math.inf, dtype=dtype) if filled else ())
        # (a peak is >= 0 or NaN: it is finite exactly where it is below infinity)
        return ~(torch.stack([next(peaks) if x.numel() else x.new_zeros((), dtype=dtype) for x in tensors]) < math.inf)
