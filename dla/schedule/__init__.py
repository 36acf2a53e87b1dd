"""Schedules (data), the policies that produce them, and the token scores they read."""

from dla.schedule.dynamic import MERGE_RULES, OPEN_STATES, SCORES, STATE_SCORES
from dla.schedule.policies import DEFAULT_CAPACITY, DEFAULT_THRESHOLD, POLICIES, plan_schedule, score_range
from dla.schedule.schedule import LABEL_RULES, NEVER, NONE, DenseSchedule, Schedule, SegmentState
from dla.schedule.scores import novelty_scores

__all__ = ["DEFAULT_CAPACITY", "DEFAULT_THRESHOLD", "LABEL_RULES", "MERGE_RULES", "OPEN_STATES", "POLICIES", "SCORES",
           "STATE_SCORES", "NEVER", "NONE", "DenseSchedule", "Schedule", "SegmentState", "plan_schedule",
           "novelty_scores", "score_range"]
