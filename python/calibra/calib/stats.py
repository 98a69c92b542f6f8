"""The reusable statistics file: one calibration pass, saved once, rerun by any method, merged exactly.

Format: one ``.safetensors`` file. Tensors are the observers' sums (keys ``<kind>/<field>/<module>``,
see ``calibra.calib.observers``); the header's ``__metadata__["calibra"]`` is a JSON object with

* ``format`` (``"calibra-stats"``), ``format_version``, ``calibra_version``;
* ``model``: ``{"id": model identity hash, "model_type", "num_layers"}``;
* ``observers`` (sorted kinds), ``hessian_dtype``;
* ``counts``: token count of every statistic (``<kind>/<module>``);
* ``runs``: one entry per merged run (``dataset``, ``version``, ``seed``, ``fingerprint``,
  ``samples``, ``tokens``, ``sequence_length``) -- merging concatenates them;
* ``token_count`` (sum over runs), ``moe`` (quota, shrinkage tau, per-expert coverage) when the model
  has MoE layers.

Merging (``merge(a, b)``) adds sums and counts and takes elementwise min/max of ranges, so two runs
over disjoint samples merge to the statistics of one run over both -- no averages of averages. The
float64 sums of the merged file equal a single run's up to the order of additions (bitwise equal when
each side is one accumulation step, e.g. one batch per run; otherwise within a few fp64 ulps);
counts, min/max and histograms are exact. Files of different models, observers or Hessian dtypes are
refused.

Model identity hash (``model_identity``): sha256 over the canonical JSON of ``config.json`` (without
``transformers_version``, ``_name_or_path``, ``dtype``/``torch_dtype``: the same model saved by
another transformers version or loaded in another dtype is the same model) and, for every parameter
and buffer in name order, its name, shape and the float64 values of its first 16 elements. The
value sample tells fine-tunes of one architecture apart without reading every weight (hashing
all the weights of a 70B model takes minutes); it is not a cryptographic commitment to the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from calibra.mps import on_host

FORMAT = "calibra-stats"
FORMAT_VERSION = 1
_VOLATILE_CONFIG_KEYS = (
    "transformers_version",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "_commit_hash",
    "_attn_implementation_autoset",
    "_attn_implementation",
)


def model_identity(model, first_values=None) -> str:
    """sha256 identity of a model (see the module docstring for what it covers). ``first_values(name, n)``
    gives the first ``n`` values of a parameter that is on the meta device (a streamed model's weights are
    read from disk only when a layer runs), so a streamed model has the identity of the loaded one."""
    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    cfg = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    items = dict(model.named_parameters())
    items.update(dict(model.named_buffers()))
    for name in sorted(items):
        t = items[name]
        h.update(f"{name}:{tuple(t.shape)}".encode())
        if t.is_floating_point() and t.device.type == "meta" and first_values is not None:
            t = first_values(name, 16)
            if t is None:
                continue
        if t.is_floating_point() and t.device.type != "meta":
            with on_host():  # float64 on the CPU: MPS has none (the same bytes on every device)
                h.update(t.detach().reshape(-1)[:16].cpu().double().numpy().tobytes())
    return h.hexdigest()


def _merge_tensor(key: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"[stats] cannot merge {key}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
    if key.startswith("ranges/min/"):
        return torch.minimum(a, b)
    if key.startswith("ranges/max/"):
        return torch.maximum(a, b)
    return a + b


@dataclass
class CalibrationStats:
    """Named tensors (sums), token counts and metadata of one or more calibration runs."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    # -- access ------------------------------------------------------------------------------------
    def modules(self, kind: str = "hessian") -> list[str]:
        """Module paths that have a statistic of ``kind`` (e.g. every Linear and expert projection)."""
        field_ = {"hessian": "sum", "norms": "sumsq", "ranges": "hist"}.get(kind)
        pre = f"{kind}/{field_}/"
        return sorted(k[len(pre) :] for k in self.tensors if k.startswith(pre))

    def count(self, kind: str, module: str) -> int:
        return int(self.counts.get(f"{kind}/{module}", 0))

    def hessian(self, module: str, *, mean: bool = True, shrink: bool = True) -> torch.Tensor:
        """The Hessian of ``module``'s inputs.

        ``mean=False`` returns the raw sum ``sum x x^T``. With ``mean=True`` it is divided by the
        token count; for an MoE expert projection with ``shrink=True`` it is shrunk toward the
        layer's pooled Hessian with the recorded ``tau`` (``calibra.calib.moe.shrunk_hessian``), which
        also gives experts that saw no token a finite, well-defined Hessian.
        """
        key = f"hessian/sum/{module}"
        if key not in self.tensors:
            raise KeyError(
                f"[stats] no Hessian for {module!r}; this file has {len(self.modules())} "
                f"(e.g. {', '.join(self.modules()[:3])})"
            )
        if not mean:
            return self.tensors[key]
        if shrink and ".experts." in module:
            from calibra.calib.moe import shrunk_hessian

            return shrunk_hessian(self, module)[0]
        n = self.count("hessian", module)
        if n == 0:
            raise ValueError(f"[stats] {module} saw 0 calibration tokens; use more data or shrink=True")
        return self.tensors[key] / n

    @property
    def token_count(self) -> int:
        return int(self.metadata.get("token_count", 0))

    # -- merge -------------------------------------------------------------------------------------
    def merge(self, other: CalibrationStats) -> CalibrationStats:
        return merge(self, other)

    # -- file --------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write atomically: a temp file in the same folder, then ``os.replace`` (a crash never leaves a
        partial file at ``path``; an earlier file there stays intact until the new one is complete)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.metadata)
        meta["counts"] = dict(sorted(self.counts.items()))
        with on_host():  # host copies (float64 sums among them: MPS keeps those on the CPU)
            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.tensors.items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"calibra": json.dumps(meta, sort_keys=True)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path) -> CalibrationStats:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"[stats] no statistics file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"[stats] {path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
        if "calibra" not in header:
            raise ValueError(f"[stats] {path} has no calibra metadata; it is not a calibra statistics file")
        meta = json.loads(header["calibra"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"[stats] {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"[stats] {path} is format version {meta['format_version']}; this calibra reads "
                f"up to {FORMAT_VERSION}: upgrade calibra"
            )
        counts = {k: int(v) for k, v in meta.pop("counts", {}).items()}
        return cls(tensors=tensors, counts=counts, metadata=meta)


def merge(a: CalibrationStats, b: CalibrationStats) -> CalibrationStats:
    """Exact merge of two runs' statistics (sums and counts). Refuses different models, observers or
    Hessian dtypes, and statistics present in one file only."""
    for what, get in (
        ("model", lambda m: m.get("model", {}).get("id")),
        ("observers", lambda m: m.get("observers")),
        ("hessian dtype", lambda m: m.get("hessian_dtype")),
    ):
        va, vb = get(a.metadata), get(b.metadata)
        if va != vb:
            raise ValueError(
                f"[stats] cannot merge statistics of different {what}: {va!r} vs {vb!r}; "
                "calibrate both runs with the same model and --observers/--hessian-dtype"
            )
    ka, kb = set(a.tensors), set(b.tensors)
    if ka != kb:
        diff = sorted(ka ^ kb)
        raise ValueError(
            f"[stats] cannot merge: {len(diff)} statistics exist in one file only (e.g. {', '.join(diff[:3])})"
        )
    tensors = {k: _merge_tensor(k, a.tensors[k], b.tensors[k]) for k in sorted(ka)}
    counts = {k: a.counts.get(k, 0) + b.counts.get(k, 0) for k in sorted(set(a.counts) | set(b.counts))}
    meta = dict(a.metadata)
    meta["runs"] = list(a.metadata.get("runs", [])) + list(b.metadata.get("runs", []))
    meta["token_count"] = int(a.metadata.get("token_count", 0)) + int(b.metadata.get("token_count", 0))
    out = CalibrationStats(tensors=tensors, counts=counts, metadata=meta)
    if "moe" in meta:
        from calibra.calib.moe import refresh_coverage

        refresh_coverage(out)
    return out
