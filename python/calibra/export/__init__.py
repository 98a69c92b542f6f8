"""Exports of a :class:`~calibra.quant.model.QuantizedModel` in the formats inference engines load.

``export(qmodel, path, format)`` writes one format into ``path``, or several formats into
``path/<format>/`` subfolders (the whole ``path`` is still written atomically). Formats:

=====================  ==============================================================================
``compressed-tensors``  ``pack-quantized`` (int 2..8-bit, sym/asym) or ``nvfp4-pack-quantized``
``gptq``                GPTQ; ``checkpoint_format`` ``gptq`` (v1) when symmetric, ``gptq_v2`` when not
``mlx``                 MLX affine (mlx-lm)
``gguf-q4_0``           GGUF, llama architecture, Q4_0 (re-quantized from the effective weights)
``gguf-q8_0``           GGUF, llama architecture, Q8_0 (re-quantized from the effective weights)
``dense``               the effective weights as a plain Hugging Face checkpoint
=====================  ==============================================================================

Every format is checked before anything is written; a model a format cannot express (MR-GPTQ
rotations, act-order in compressed-tensors, ...) is refused with an ``ExportError`` naming the layer
and the fix. Every output folder holds ``calibra_manifest.json`` (sha256 per file, settings, seed,
versions); ``calibra.export.inspect`` reads and verifies it.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

from calibra.export import compressed_tensors, dense, gguf, gptq, mlx
from calibra.export.writer import ExportError, atomic_folder, check_target, verify_manifest, write_manifest

_MODULES = {
    "compressed-tensors": compressed_tensors,
    "gptq": gptq,
    "mlx": mlx,
    "gguf-q4_0": gguf.Q4_0,
    "gguf-q8_0": gguf.Q8_0,
    "dense": dense,
}
FORMATS = tuple(_MODULES)
_ALIASES = {
    "ct": "compressed-tensors",
    "compressed_tensors": "compressed-tensors",
    "gguf": "gguf-q4_0",
    "q4_0": "gguf-q4_0",
    "q8_0": "gguf-q8_0",
    "gguf_q4_0": "gguf-q4_0",
    "gguf_q8_0": "gguf-q8_0",
}


def parse_formats(format) -> list[str]:
    """``"gptq,mlx"`` or ``["gptq", "mlx"]`` -> canonical names, in order, without duplicates."""
    items = format.split(",") if isinstance(format, str) else list(format)
    out = []
    for f in items:
        key = str(f).strip().lower()
        key = _ALIASES.get(key, key)
        if key not in _MODULES:
            raise ValueError(f"[export] unknown format {f!r}; choose from {', '.join(FORMATS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError(f"[export] no format given; choose from {', '.join(FORMATS)}")
    return out


def precheck(format, names, *, rotated: bool, transposed=()) -> list[str]:
    """Before any weight loads: the refusals that need no quantized tensor -- MR-GPTQ's rotation
    (``rotated``), fused MoE expert weights among ``names`` (the modules that will be quantized) and
    transposed ``Conv1D`` modules (``transposed``, GPT-2) -- so
    a run is not refused only after its calibration. :func:`check` still checks everything at the end."""
    from types import SimpleNamespace

    from calibra.export import _common

    stub = SimpleNamespace(layers={n: SimpleNamespace(rotation="hadamard" if rotated else None) for n in names})
    fmts = parse_formats(format)
    for f in fmts:
        if f != "dense":
            _common.refuse_rotation(stub, f)
            if not getattr(_MODULES[f], "WRITES_EXPERTS", False):
                _common.refuse_experts(stub, f)
            _common.refuse_transposed(transposed, f)
    return fmts


def kept_dense(format, shapes, group_size: int) -> dict[str, str]:
    """Before any weight loads: the Linears (``shapes``: name -> ``(out_features, in_features)``) that one of
    the engine formats cannot hold with ``group_size`` -- a ragged last group where the loader needs whole
    groups (compressed-tensors, MLX), widths GPTQ kernels or GGUF blocks cannot take -- each with
    ``"<format>: <reason>"``. ``calibra.quantize(..., export=...)`` keeps them dense (unquantized) and
    records them (report.json ``summary.export_dense``, the export's manifest ``kept_dense``); calibra's own
    folder and 'dense' hold every width."""
    out: dict[str, str] = {}
    for f in parse_formats(format):
        rule = getattr(_MODULES[f], "width_problem", None)
        if rule is None:
            continue
        for name, (o, i) in shapes.items():
            why = None if name in out else rule(o, i, group_size)
            if why is not None:
                out[name] = f"{f}: {why}"
    return out


def check(qmodel, format) -> list[str]:
    """Raise ExportError if any of the formats cannot express ``qmodel``; returns the parsed formats."""
    from calibra.export import _common

    fmts = parse_formats(format)
    for f in fmts:
        if f != "compressed-tensors":
            _common.refuse_act_quant(qmodel, f)
        if f != "dense":
            moved = _common.transposed_modules(getattr(qmodel, "model", None))
            _common.refuse_transposed([n for n in qmodel.layers if n in moved], f)
        _MODULES[f].check(qmodel)
    return fmts


def export(
    qmodel, path, format="compressed-tensors", *, overwrite: bool = False, max_shard_bytes: int | None = None
) -> list[Path]:
    """Write ``qmodel`` to ``path`` in one or more formats; returns the written folders.

    Args:
        qmodel: a :class:`calibra.quant.model.QuantizedModel`.
        path: the output folder. It must not exist unless ``overwrite`` (then it is replaced whole).
        format: one name of :data:`FORMATS`, a comma-separated string or a list. One format is written
            into ``path`` itself; several go into ``path/<format>/``.
        overwrite: replace an existing ``path``.
        max_shard_bytes: largest safetensors shard (default 5 GiB).

    Everything is validated before writing; the files are written into a temporary folder beside
    ``path`` and renamed into place, so a failure or interruption never leaves a partial ``path``
    and an earlier ``path`` stays intact until the new one is complete.
    """
    fmts = check(qmodel, format)
    target = check_target(path, overwrite)
    with atomic_folder(target, overwrite=overwrite) as tmp:
        for f in fmts:
            folder = tmp if len(fmts) == 1 else tmp / f
            folder.mkdir(exist_ok=True)
            mod = _MODULES[f]
            extra = mod.write(qmodel, folder, max_shard_bytes=max_shard_bytes)
            write_manifest(
                folder, format=f, qmodel=qmodel, extra=extra, extra_versions=getattr(mod, "versions", lambda: {})()
            )
    return [target] if len(fmts) == 1 else [target / f for f in fmts]


class _CallableModule(types.ModuleType):
    """``calibra.export`` is both this subpackage and the verb: importing any ``calibra.export.*`` module
    binds the name ``export`` on ``calibra`` to the package, so the package itself forwards calls."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["export", "check", "kept_dense", "parse_formats", "FORMATS", "ExportError", "verify_manifest"]
