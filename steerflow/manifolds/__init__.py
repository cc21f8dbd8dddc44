"""Manifolds: Euclidean, sphere, flat torus, SO(3), hyperbolic, products — and the tools that make the
flat solvers, paths and likelihoods work on them (Chen & Lipman 2024, "Flow Matching on General
Geometries")."""
from .base import AbstractManifold
from .euclidean import Euclidean
from .hyperbolic import Hyperbolic, minkowski
from .likelihood import manifold_log_likelihood, riemannian_divergence
from .product import Product
from .registry import MANIFOLDS, get_manifold
from .so3 import SO3, hat, quaternion_to_matrix, rodrigues, rotation_log, vee
from .sphere import Sphere
from .torus import FlatTorus, wrap_angle
from .velocity import TangentVelocity

__all__ = ["AbstractManifold", "Euclidean", "Hyperbolic", "minkowski", "manifold_log_likelihood",
           "riemannian_divergence", "Product", "MANIFOLDS", "get_manifold", "SO3", "hat",
           "quaternion_to_matrix", "rodrigues", "rotation_log", "vee", "Sphere", "FlatTorus", "wrap_angle",
           "TangentVelocity"]

from .domains import BASES, AbstractDomain, Box, ReflectedPath, Simplex

__all__ += ["BASES", "AbstractDomain", "Box", "ReflectedPath", "Simplex"]

from .harmonics import SphericalHarmonics
from .vmf import RepeatedSites, VonMisesFisherMixture

__all__ += ["RepeatedSites", "SphericalHarmonics", "VonMisesFisherMixture"]
