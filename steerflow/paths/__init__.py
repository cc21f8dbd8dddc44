"""Probability paths: what ``x_t`` and the target ``u_t`` are during training.

Flat affine paths (linear / rectified, cosine, VP, polynomial), geodesic paths on manifolds
(:class:`GeodesicPath`), reflected paths in constrained domains (:class:`ReflectedPath`, also
``steerflow.manifolds.ReflectedPath``) and multimarginal interpolants on the simplex. All return
:class:`PathSample`. Every path on a geometry lives here and takes its manifold or domain as an argument: the
paths sit below ``steerflow.manifolds`` in the package layers and import nothing from it.
"""
from .affine import PATHS, AffinePath, LinearPath, PathSample, PathVelocity, get_path, path_from_record
from .geodesic import GeodesicPath
from .multimarginal import (GaussianConditionalMeans, MultimarginalInterpolant, StraightSimplexPath, edge_path,
                            vertex)
from .reflected import ReflectedPath
from .schedules import (SCHEDULES, AbstractSchedule, CosineSchedule, LinearSchedule, PolynomialSchedule,
                        ScheduleValues, VPSchedule, get_schedule)

__all__ = ["PATHS", "AffinePath", "LinearPath", "PathSample", "PathVelocity", "get_path", "path_from_record",
           "GeodesicPath", "ReflectedPath", "GaussianConditionalMeans", "MultimarginalInterpolant",
           "StraightSimplexPath", "edge_path", "vertex",
           "SCHEDULES", "AbstractSchedule", "CosineSchedule", "LinearSchedule", "PolynomialSchedule",
           "ScheduleValues", "VPSchedule", "get_schedule"]
