"""calibra's public verbs, each a job of :mod:`calibra.jobs`: ``calibrate`` (one calibration pass ->
``CalibrationStats`` and a file), ``quantize`` (model -> ``(QuantizedModel, report)`` and a folder),
``prune`` (model -> ``(model, report)`` and a folder). The CLI calls these."""

from calibra.jobs.calibrate import calibrate
from calibra.jobs.prune import prune
from calibra.jobs.quantize import quantize

__all__ = ["calibrate", "prune", "quantize"]
