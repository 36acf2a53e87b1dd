"""Dynamic Linear Attention (arXiv 2606.10650): the reference implementation.

The schedule is data: policies (``dla.schedule``) produce one ``death`` tensor per sequence and
head; every op (``dla.ops``) consumes it.
"""

from dla.ops import DLAState, chunk_dla, naive_dla, recurrent_dla
from dla.schedule import NEVER, NONE, POLICIES, Schedule, SegmentState, novelty_scores, plan_schedule

__version__ = "0.1.0"

__all__ = ["DLAState", "chunk_dla", "NEVER", "NONE", "POLICIES", "Schedule", "SegmentState", "naive_dla", "novelty_scores",
           "plan_schedule", "recurrent_dla"]
