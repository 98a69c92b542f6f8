"""resolve_config: check a calibration config against the model, cap an unset sequence length, and
print the memory estimate -- all before the first weight is loaded (FAULTS rows 13 and 16)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from calibra.data.config import DEFAULT_SEQUENCE_CAP, CalibrationConfig, model_max_positions
from calibra.data.memory import MemoryEstimate, estimate_memory

__all__ = ["resolve_config"]

log = logging.getLogger("calibra.data")


def resolve_config(
    config: CalibrationConfig,
    model_config,
    *,
    dtype=torch.float32,
    observers=("hessian",),
    echo=print,
    print_estimate: bool = True,
    **estimate_kwargs,
) -> tuple[CalibrationConfig, MemoryEstimate]:
    """``(config with a concrete sequence_length, memory estimate)``; prints both via ``echo``
    (the estimate only with ``print_estimate``: the verbs print the job's memory plan, which includes it,
    and log the estimate's details at INFO level).

    Raises ValueError (from ``config.validate``) when a setting is out of range for this model.
    With ``sequence_length=None`` the length becomes ``min(model positions, 2048)`` and a note says
    so: a 128k-context model would otherwise ask for 128k-token samples.
    """
    max_positions = model_max_positions(model_config)
    config.validate(max_positions)
    if config.sequence_length is None:
        L = config.resolved_sequence_length(max_positions)
        where = f"the model allows {max_positions} positions" if max_positions else "the model states no position limit"
        note = (
            f"[data] sequence_length unset and {where}: capped at {L} tokens per sample "
            f"(cap {DEFAULT_SEQUENCE_CAP}); set sequence_length explicitly to change it"
        )
        echo(note)
        log.info(note)
        config = dataclasses.replace(config, sequence_length=L)
    if config.batch_size is None:
        b = config.resolved_batch_size(config.sequence_length)
        echo(f"[data] batch_size unset: {b} samples per forward pass (about {b * config.sequence_length} tokens)")
        config = dataclasses.replace(config, batch_size=b)
    estimate = estimate_memory(model_config, config, dtype=dtype, observers=observers, **estimate_kwargs)
    if print_estimate:
        echo(str(estimate))
    log.info("%s", estimate)
    return config, estimate
