"""Probability paths: what ``x_t`` and the target ``u_t`` are during training.

Flat affine paths (linear / rectified, cosine, VP, polynomial), geodesic paths on manifolds
(:class:`GeodesicPath`), reflected paths in constrained domains (``steerflow.manifolds.ReflectedPath``)
and multimarginal interpolants on the simplex. All return :class:`PathSample`.
"""
from .affine import PATHS, AffinePath, LinearPath, PathSample, PathVelocity, get_path, path_from_record
from .geodesic import GeodesicPath
from .multimarginal import (GaussianConditionalMeans, MultimarginalInterpolant, StraightSimplexPath, edge_path,
                            vertex)
from .schedules import (SCHEDULES, AbstractSchedule, CosineSchedule, LinearSchedule, PolynomialSchedule,
                        ScheduleValues, VPSchedule, get_schedule)

__all__ = ["PATHS", "AffinePath", "LinearPath", "PathSample", "PathVelocity", "get_path", "path_from_record",
           "GeodesicPath", "GaussianConditionalMeans", "MultimarginalInterpolant", "StraightSimplexPath", "edge_path", "vertex",
           "SCHEDULES", "AbstractSchedule", "CosineSchedule", "LinearSchedule", "PolynomialSchedule",
           "ScheduleValues", "VPSchedule", "get_schedule"]
