"""calibra.data: calibration datasets, their configuration, tokenization into fixed-length samples,
and the memory estimate printed before a run.

    from calibra.data import CalibrationDataset, CalibrationConfig, tokenize_calibration

    cfg = CalibrationConfig(num_samples=128, sequence_length=512, dataset="builtin", seed=0)
    data = tokenize_calibration(CalibrationDataset.from_source(cfg.dataset), tokenizer, cfg,
                                max_positions=model.config.max_position_embeddings)
    for ids, mask in data.batches(cfg.batch_size): ...

Imports torch, never transformers (tokenizers and model configs are passed in) nor ``datasets``
(imported only when a hub set is loaded).
"""

from calibra.data.config import DEFAULT_SEQUENCE_CAP, CalibrationConfig, model_max_positions, recommended_samples
from calibra.data.dataset import CalibrationDataset, ChatSample
from calibra.data.hub import HUB_SETS, HubUnavailableError
from calibra.data.memory import MemoryEstimate, estimate_memory
from calibra.data.plan import resolve_config
from calibra.data.tokenize import TokenizedCalibration, pad_token_id, tokenize_calibration

__all__ = [
    "CalibrationDataset",
    "ChatSample",
    "CalibrationConfig",
    "TokenizedCalibration",
    "tokenize_calibration",
    "estimate_memory",
    "MemoryEstimate",
    "resolve_config",
    "recommended_samples",
    "model_max_positions",
    "pad_token_id",
    "HUB_SETS",
    "HubUnavailableError",
    "DEFAULT_SEQUENCE_CAP",
]
