"""Schedules (data), the policies that produce them, and the token scores they read."""

from dla.schedule.policies import MERGE_RULES, POLICIES, plan_schedule
from dla.schedule.schedule import NEVER, NONE, DenseSchedule, Schedule, SegmentState
from dla.schedule.scores import novelty_scores

__all__ = ["MERGE_RULES", "POLICIES", "NEVER", "NONE", "DenseSchedule", "Schedule", "SegmentState", "plan_schedule",
           "novelty_scores"]
