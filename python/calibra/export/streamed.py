"""Writing a quantized model while it is being quantized, one decoder layer at a time.

A streamed job (``calibra.io.streamed``) never holds the whole model, so it cannot hold the whole result
either. :class:`StreamedOutput` opens the output's atomic temporary folder (``writer.atomic_folder``) when
the job starts, writes each finished layer's tensors as one shard file (its quantized tensors in the
output format, its other tensors -- norms -- copied at their stored dtype), then the tensors outside the
decoder layers (embeddings, final norm, output head, read one at a time), and at the end renames the shards
``<prefix>-0000k-of-0000N.safetensors``, writes the index, the format's JSON files, the manifest and
report.json, and renames the folder into place. An error or Ctrl-C anywhere removes the temporary folder:
the output path holds a complete result or nothing (FAULTS rows 23, 25, 26).

Formats: calibra's own folder (``quantized-*.safetensors`` + ``quantized.safetensors.index.json``, read
back by ``calibra.quant.save.load``) and ``compressed-tensors``. Dense tensors keep their stored dtype
(bf16 stays bf16); quantized tensors are exactly those of the whole-model job. After a layer is written,
only a slim record (``QuantizedLayer.slim``: shapes and settings on the meta device) is kept.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from calibra.export import writer

FORMATS = (None, "compressed-tensors")
_FIELDS = ("codes", "scales", "zeros", "g_idx", "global_scale")


def refuse_format(formats) -> None:
    """Before any weight is read: the output formats a streamed job can write."""
    if formats is None:
        return
    if len(formats) != 1 or formats[0] not in FORMATS:
        raise ValueError(
            f"[quantize] a streamed job (the model is larger than the memory plan allows in one piece) writes "
            f"calibra's folder or compressed-tensors, not {', '.join(formats)}: use --export compressed-tensors "
            f"(or no --export), or export the other formats from calibra's folder afterwards"
        )


class _Shards:
    """Shard files written one at a time, named in order at the end."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix = folder, prefix
        self.parts: list[tuple[Path, list[str], int]] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        path = self.folder / f".part-{len(self.parts):05d}.safetensors"
        part = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(tensors)}
        save_file(part, str(path), metadata={"format": "pt"})
        self.parts.append((path, sorted(part), sum(t.numel() * t.element_size() for t in part.values())))

    def finish(self) -> None:
        n = len(self.parts)
        weight_map, total = {}, 0
        for k, (path, names, size) in enumerate(self.parts, 1):
            fname = f"{self.prefix}-{k:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / fname)
            weight_map.update(dict.fromkeys(names, fname))
            total += size
        writer.write_json(
            self.folder / f"{self.prefix}.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )


class StreamedOutput:
    """The output folder of a streamed quantization (see the module docstring).

    Args:
        output: the final folder; ``overwrite`` as everywhere.
        fmt: ``None`` (calibra's folder) or ``"compressed-tensors"``.
        weights: the job's ``StreamedModel`` (dense tensors are copied from its store).
    """

    def __init__(self, output, *, overwrite: bool, fmt: str | None, weights):
        if fmt not in FORMATS:
            raise ValueError(f"[quantize] a streamed job cannot write {fmt!r}")
        self.fmt, self.weights = fmt, weights
        self._stack = contextlib.ExitStack()
        self.tmp = self._stack.enter_context(writer.atomic_folder(output, overwrite=overwrite))
        self.shards = _Shards(self.tmp, "quantized" if fmt is None else "model")
        self.records: dict = {}
        self.written: set[str] = set()

    # -- per layer ----------------------------------------------------------------------------------
    def _quantized(self, name: str, ql) -> dict[str, torch.Tensor]:
        if self.fmt is None:
            return {f"{name}.{f}": getattr(ql, f) for f in _FIELDS if getattr(ql, f) is not None}
        from calibra.export import compressed_tensors

        compressed_tensors.check(SimpleNamespace(layers={name: ql}, model=None))
        return compressed_tensors.layer_tensors(name, ql)

    def layer(self, module: torch.nn.Module, qlayers: dict) -> None:
        """Write one finished decoder layer: ``qlayers`` maps module path -> QuantizedLayer (its targets)."""
        tensors = {}
        for name, ql in qlayers.items():
            tensors.update(self._quantized(name, ql))
            self.records[name] = ql.slim()
            self.written.add(f"{name}.weight")
        for name in self.weights.names(module):
            if name not in self.written:
                tensors[name] = self.weights.read_stored(name)
                self.written.add(name)
        self.shards.add(tensors)

    def rest(self) -> None:
        """The tensors outside the decoder layers, one read at a time (the largest -- embeddings, head --
        each get their own shard; the small ones share one)."""
        small = {}
        for name in sorted(self.weights.names(self.weights.model)):
            if name in self.written:
                continue
            t = self.weights.read_stored(name)
            self.written.add(name)
            if t.numel() * t.element_size() >= 64 * 2**20:
                self.shards.add({name: t})
            else:
                small[name] = t
        self.shards.add(small)

    # -- end ------------------------------------------------------------------------------------------
    def finish(self, qm, *, report: dict, files: dict, before_report=None) -> None:
        """Name the shards, write the format's files, the manifest and report.json, and move the folder
        into place. ``qm``: a QuantizedModel whose ``layers`` are the slim records."""
        from calibra.quant import save as qsave

        self.rest()
        self.shards.finish()
        tmp = self.tmp
        if self.fmt is None:
            qsave._write_json(tmp / qsave.MANIFEST, qsave.manifest(qm))
            qm.model.config.to_json_file(str(tmp / "config.json"), use_diff=False)
            writer.write_tokenizer(tmp, qm.tokenizer)
            for name, obj in files.items():
                qsave._write_json(tmp / name, obj)
            writer.write_manifest(tmp, format=qsave.FORMAT, qmodel=qm)
        else:
            from calibra.export import compressed_tensors

            report["export"] = {"formats": [self.fmt], "streamed": True}
            extra = compressed_tensors.write(qm, tmp, tensors_written=True)
            for name, obj in files.items():
                qsave._write_json(tmp / name, obj)
            versions = getattr(compressed_tensors, "versions", lambda: {})()
            writer.write_manifest(tmp, format=self.fmt, qmodel=qm, extra=extra, extra_versions=versions)
        if before_report is not None:
            before_report(report)
        qsave._write_json(tmp / "report.json", report)
        self._stack.close()  # the rename into place

    def abort(self, exc: BaseException) -> None:
        """Remove the temporary folder (the output path is untouched)."""
        self._stack.__exit__(type(exc), exc, exc.__traceback__)


__all__ = ["StreamedOutput", "refuse_format", "FORMATS"]
