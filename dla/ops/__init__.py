"""Ops: every path computes the same function of (q, k, v, g, beta, lam, schedule)."""

from dla.ops.chunk import chunk_dla
from dla.ops.common import DLAState
from dla.ops.naive import naive_dla
from dla.ops.recurrent import recurrent_dla, recurrent_step

__all__ = ["DLAState", "chunk_dla", "naive_dla", "recurrent_dla", "recurrent_step"]
