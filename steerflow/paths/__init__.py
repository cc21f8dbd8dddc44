"""Probability paths: what ``x_t`` and the target ``u_t`` are during training."""
from .affine import PATHS, AffinePath, LinearPath, PathSample, get_path
from .schedules import (SCHEDULES, AbstractSchedule, CosineSchedule, LinearSchedule, PolynomialSchedule,
                        ScheduleValues, VPSchedule, get_schedule)

__all__ = ["PATHS", "AffinePath", "LinearPath", "PathSample", "get_path", "SCHEDULES", "AbstractSchedule",
           "CosineSchedule", "LinearSchedule", "PolynomialSchedule", "ScheduleValues", "VPSchedule",
           "get_schedule"]
