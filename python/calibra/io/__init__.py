"""Reading models safely and writing artifacts that are complete or absent.

* :mod:`calibra.io.model_reader` -- every check on a model folder before a weight loads (FAULTS 1-10);
* :mod:`calibra.io.safetensors_header` -- the pure-Python, bounds-checked safetensors header parser;
* :mod:`calibra.io.checkpoint` -- layer checkpoints for ``--resume`` (FAULTS 22-24).

The atomic output folder and the manifest live in :mod:`calibra.export.writer` (every writer uses it).
"""

from calibra.io.model_reader import ModelFolder, ModelReadError, check_model_finite, inspect_model, load_model
from calibra.io.safetensors_header import CorruptShardError, read_header

__all__ = [
    "ModelFolder",
    "ModelReadError",
    "CorruptShardError",
    "inspect_model",
    "load_model",
    "check_model_finite",
    "read_header",
]
