"""Calibration engine: layer-sequential runner, observers, MoE coverage, the statistics file."""

from calibra.calib.coverage import CoverageSelection, select_samples_for_coverage
from calibra.calib.moe import MoERecorder, coverage_table, refresh_coverage, shrunk_hessian
from calibra.calib.observers import (
    ChannelNormObserver,
    HessianObserver,
    KVCovarianceObserver,
    NonFiniteActivationError,
    Observer,
    RangeObserver,
    make_observers,
    percentile,
    smooth_factors,
)
from calibra.calib.runner import CalibrationOOMError, LayerRunner
from calibra.calib.stats import CalibrationStats, merge, model_identity

__all__ = [
    "LayerRunner",
    "CalibrationOOMError",
    "CalibrationStats",
    "merge",
    "model_identity",
    "Observer",
    "HessianObserver",
    "ChannelNormObserver",
    "RangeObserver",
    "KVCovarianceObserver",
    "NonFiniteActivationError",
    "make_observers",
    "percentile",
    "smooth_factors",
    "MoERecorder",
    "CoverageSelection",
    "select_samples_for_coverage",
    "shrunk_hessian",
    "coverage_table",
    "refresh_coverage",
]
