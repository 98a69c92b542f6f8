"""Writing a quantized model while it is being quantized, one decoder layer at a time.

A streamed job (``calibra.io.streamed``) never holds the whole model, so it cannot hold the whole result
either. :class:`StreamedOutput` opens the output's atomic temporary folder (``writer.atomic_folder``) when
the job starts, writes each finished layer's tensors as one shard file (its quantized tensors in the
output format, its other tensors -- norms -- copied at their stored dtype), then the tensors outside the
decoder layers (embeddings, final norm, output head, read one at a time), and at the end renames the shards
``<prefix>-0000k-of-0000N.safetensors``, writes the index, the format's JSON files, the manifest and
report.json, and renames the folder into place. An error or Ctrl-C anywhere removes the temporary folder:
the output path holds a complete result or nothing (FAULTS rows 23, 25, 26).

The format is the caller's: it passes the function that turns one QuantizedLayer into the format's tensors
and the one that writes the format's files at the end (calibra's own folder: ``calibra.quant.save``;
``compressed-tensors``: ``calibra.export.compressed_tensors``). Dense tensors keep their stored dtype (bf16
stays bf16); quantized tensors are exactly those of the whole-model job. After a layer is written, only a
slim record (``QuantizedLayer.slim``: shapes and settings on the meta device) is kept.

Resumable: given ``staging`` (a folder in the job's checkpoint work folder, ``calibra.io.checkpoint``), the
shards are written there instead, where they survive a kill. Each ``layer_done`` returns a record of its
shard, which the job commits with the layer's checkpoint; a resumed job hands the committed records to
:meth:`StreamedOutput.restore` and continues with the next layer. :func:`result_record` /
:func:`result_from_record` turn the slim results into JSON and back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from pathlib import Path

import torch

from calibra.export import writer

FORMATS = (None, "compressed-tensors")


def refuse_format(formats, skeleton=None) -> None:
    """Before any weight is read: the output formats a streamed job can write (``skeleton()``: the weightless
    model; compressed-tensors of a family whose experts transformers swaps on a quantized load needs them
    rewritten, which a job writing the tensors as stored cannot do)."""
    if formats is None:
        return
    if skeleton is not None and list(formats) == ["compressed-tensors"]:
        from calibra.compat.transformers import swapped_on_quantized_load

        try:
            model = skeleton()
        except Exception:  # noqa: BLE001 - no skeleton, no early check (the export refuses at its end)
            model = None
        try:
            swapped = [] if model is None else swapped_on_quantized_load(model)
        except ValueError as e:
            swapped = [str(e)]
        if swapped:
            raise ValueError(
                f"[quantize] a streamed job writes the checkpoint's tensors as stored, but compressed-tensors "
                f"needs {swapped[0]} rewritten as the per-expert Linears transformers swaps in when it loads "
                f"the checkpoint: quantize without --export, then export compressed-tensors from calibra's folder"
            )
    if len(formats) != 1 or formats[0] not in FORMATS:
        raise ValueError(
            f"[quantize] a streamed job (the model is larger than the memory plan allows in one piece) writes "
            f"calibra's folder or compressed-tensors, not {', '.join(formats)}: use --export compressed-tensors "
            f"(or no --export), or export the other formats from calibra's folder afterwards"
        )


_DTYPE_NAMES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """A safetensors file written straight from the tensors' memory (contiguous, CPU): the header (JSON,
    space-padded to 8 bytes), then each tensor's bytes in name order. ``safetensors.torch.save_file`` first
    copies every tensor into one bytes object, which doubles the memory of a 1 GB embedding while it is
    written; this does not. Read back by safetensors in the tests."""
    import json

    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    names = sorted(tensors)
    for n in names:
        t = tensors[n]
        nb = t.numel() * t.element_size()
        header[n] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nb]}
        offset += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for n in names:
            t = tensors[n]
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


class _Shards:
    """Shard files written one at a time, named in order at the end."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix = folder, prefix
        self.parts: list[tuple[Path, list[str], int]] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> dict | None:
        """Write one part; returns its record (file name, tensor names, bytes of data)."""
        if not tensors:
            return None
        path = self.folder / f".part-{len(self.parts):05d}.safetensors"
        part = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(tensors)}
        write_safetensors(path, part, metadata={"format": "pt"})
        self.parts.append((path, sorted(part), sum(t.numel() * t.element_size() for t in part.values())))
        return {"file": path.name, "names": sorted(part), "bytes": self.parts[-1][2], "size": path.stat().st_size}

    def restore(self, record: dict) -> None:
        """Take back a part a killed run wrote (its record says what it holds); a missing or resized file
        fails, naming it."""
        path = self.folder / record["file"]
        if path.name != f".part-{len(self.parts):05d}.safetensors":
            raise ValueError(f"[export] resumed part {path.name} is out of order (expected part {len(self.parts)})")
        size = path.stat().st_size if path.is_file() else None
        if size != record["size"]:
            raise ValueError(
                f"[export] the resumed output's part {path} is missing or has another size ({size} bytes, "
                f"{record['size']} committed); pass --overwrite to start over"
            )
        self.parts.append((path, list(record["names"]), int(record["bytes"])))

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
    """The output folder of a streamed job (see the module docstring).

    Args:
        output: the final folder; ``overwrite`` as everywhere.
        prefix: shard name prefix (``model`` for engine formats, ``quantized`` for calibra's folder).
        layer_tensors: ``layer_tensors(name, QuantizedLayer) -> {tensor name: tensor}`` in the output format
            (it raises, before anything of that layer is written, on a layer the format cannot express);
            None: the compressor changed the layer's weights in place (pruning), and the layer is written as
            it is in memory, in the checkpoint's form (``StreamedModel.stored_tensors``: its names, fused
            experts cut back per expert, the stored dtype; with ``disk_names``).
        weights: the job's ``StreamedModel`` (dense tensors are copied from its store).
        staging: write into this folder (created if missing; a resumed job's shards are there) instead of a
            temporary one; it becomes ``output`` at :meth:`finish`, and :meth:`abort` leaves it to its owner
            (the checkpoints, which keep it for ``--resume`` or remove it).
        disk_names: write under the checkpoint's names, as engine formats do (``_common.dense_state``,
            ``export.experts``): dense tensors as the source checkpoint stores them (Mixtral's
            ``block_sparse_moe.gate``, per-expert Linears) and quantized fused-expert slices cut into the
            checkpoint's per-expert Linears; otherwise the model's own names, as calibra's folder does (a
            fused parameter whole, when not every expert of it is quantized).
    """

    def __init__(
        self,
        output,
        *,
        overwrite: bool,
        prefix: str,
        layer_tensors,
        weights,
        staging: Path | None = None,
        disk_names: bool = False,
    ):
        self.layer_tensors, self.weights = layer_tensors, weights
        self.disk_names = disk_names
        self.output, self.overwrite = output, overwrite
        self._stack = contextlib.ExitStack()
        if staging is None:
            self.tmp = self._stack.enter_context(writer.atomic_folder(output, overwrite=overwrite))
        else:
            writer.check_target(output, overwrite)
            self.tmp = Path(staging)
            self.tmp.mkdir(parents=True, exist_ok=True)
        self.staged = staging is not None
        self.shards = _Shards(self.tmp, prefix)
        self.written: set[str] = set()
        self.rss_after_layer: list[int] = []
        # dense tensors the job changed in place (SmoothQuant's folded norms): written from the module, at
        # the stored dtype, not copied from the checkpoint
        self.changed: set[str] = set()

    def layer(self, module: torch.nn.Module, qlayers: dict) -> dict:
        """Write one finished decoder layer: ``qlayers`` maps module path -> QuantizedLayer (its targets).
        Returns the layer's record for :meth:`restore` (its shard and the tensor names it covers)."""
        if self.layer_tensors is None:  # the compressor changed the module in place: write it as it is now
            tensors = self.weights.stored_tensors(module)
            names = [n for n in sorted(tensors) if n not in self.written]
            part = self.shards.add({n: tensors[n] for n in names})
            self.written.update(names)
            return {"part": part, "written": names}
        tensors, names = {}, []
        slices: dict[str, dict[int, object]] = {}  # fused parameter -> its quantized experts
        for name, ql in qlayers.items():
            hit = fused_slice(name, self.weights.model)
            if hit is None:
                tensors.update(self.layer_tensors(name, ql))
                names.append(f"{name}.weight")
            else:
                slices.setdefault(hit[0], {})[hit[1]] = (name, ql)
        covered = set(names)
        for key, experts in slices.items():
            covered |= self._fused(key, experts, tensors, names)
        names += sorted(covered - set(names))  # fused parameters replaced by their experts' tensors
        dense = [n for n in self.weights.names(module) if n not in covered]
        for name in [n for n in dense if n in self.changed]:
            disk = self.weights.layout.sources.get(name, name)
            if not isinstance(disk, str):  # pragma: no cover - smoothing folds into norms, never fused experts
                raise ValueError(f"[export] {name} was changed in place but is stored fused per expert")
            t = self.weights.model.get_parameter(name).detach()
            tensors[disk if self.disk_names else name] = t.to(self.weights.store.dtype(disk))
            names.append(disk if self.disk_names else name)
        dense = [n for n in dense if n not in self.changed]
        for name in self.weights.disk_names(dense) if self.disk_names else dense:
            if name not in self.written and name not in names:
                tensors[name] = self.weights.read_stored(name)
                names.append(name)
        part = self.shards.add(tensors)
        self.written.update(names)
        return {"part": part, "written": sorted(names)}

    def _fused(self, key: str, experts: dict, tensors: dict, names: list) -> set[str]:
        """Write the quantized experts ``{e: (name, QuantizedLayer)}`` of the fused parameter ``key``; returns the
        model's names they replace (``key`` when every expert is quantized)."""
        n_exp = self.weights.model.get_parameter(key).shape[0]
        if not self.disk_names:  # calibra's folder: each slice under its own name (export.experts' key)
            for e in sorted(experts):
                tensors.update(self.layer_tensors(*experts[e]))
            return {key} if len(experts) == n_exp else set()
        from calibra.export.experts import pieces, row_slice
        from calibra.export.writer import ExportError

        if len(experts) != n_exp:
            missing = min(set(range(n_exp)) - set(experts))
            raise ExportError(
                f"[export] {key}: {len(experts)} of {n_exp} experts are quantized (expert {missing} is not); a "
                f"checkpoint stores each fused tensor whole -- quantize all its experts, or export 'dense'"
            )
        src = self.weights.layout.sources.get(key)
        if src is not None and not isinstance(src, str):  # learned once per model (io.disk_layout)
            cut: dict[int, list] = {}
            for p in src.pieces:
                cut.setdefault(p.expert, []).append((p.tensor[: -len(".weight")], p.r0, p.r1))
        else:  # stored fused: the per-expert layout an engine reads, as the whole-model export finds it
            cut = pieces(self.weights.model, key)
        for e in sorted(experts):
            for disk, r0, r1 in cut[e]:
                tensors.update(self.layer_tensors(disk, row_slice(experts[e][1], r0, r1, disk)))
                names.append(f"{disk}.weight")
        return {key}

    def layer_done(self, module: torch.nn.Module, layer_name: str, results: dict) -> dict:
        """``after_layer`` for a compressor whose ``results`` (module path -> QuantizedLayer / PrunedLayer)
        gained layer ``layer_name``'s entries: write them with :meth:`layer`, and keep only their slim
        records in ``results``; the process's RSS after each layer goes to ``rss_after_layer``. Returns the
        layer's record (:meth:`layer`) with the slim results as JSON (:func:`result_record`)."""
        from calibra.rss import current_rss

        prefix = layer_name + "."
        done = {n: r for n, r in results.items() if n.startswith(prefix)}
        record = self.layer(module, done)
        for n, r in done.items():
            results[n] = r.slim()
        record["results"] = {n: result_record(results[n]) for n in sorted(done)}
        self.rss_after_layer.append(current_rss())
        return record

    def restore(self, record: dict, results: dict) -> None:
        """A layer a killed run finished: take back its shard (:meth:`layer`'s record) and put its slim
        results into ``results``."""
        if record.get("part") is not None:
            self.shards.restore(record["part"])
        self.written.update(record["written"])
        for n, doc in record.get("results", {}).items():
            results[n] = result_from_record(doc)

    def rest(self) -> None:
        """The tensors outside the decoder layers, one read at a time (the largest -- embeddings, head --
        each get their own shard; the small ones share one)."""
        small = {}
        names = self.weights.names(self.weights.model)
        for name in sorted(self.weights.disk_names(names) if self.disk_names else names):
            if name in self.written:
                continue
            t = self.weights.read_stored(name)
            self.written.add(name)
            if t.numel() * t.element_size() >= 64 * 2**20:
                self.shards.add({name: t})
            else:
                small[name] = t
        self.shards.add(small)

    def finish(self, write_files) -> None:
        """Write the rest of the tensors, name the shards, call ``write_files(folder)`` (the format's config
        and JSON files, the manifest, report.json) and move the folder into place."""
        self.rest()
        self.shards.finish()
        write_files(self.tmp)
        if self.staged:
            writer.move_into_place(self.tmp, self.output, self.overwrite)
        self._stack.close()  # the rename into place

    def abort(self, exc: BaseException) -> None:
        """Remove the temporary folder (the output path is untouched); a staging folder is left to its
        owner."""
        self._stack.__exit__(type(exc), exc, exc.__traceback__)


def fused_slice(name: str, model=None) -> tuple[str, int] | None:
    """``(fused parameter, expert)`` of a quantized fused-expert slice ``<block>.experts.<e>.<proj>`` (the
    key ``calibra.quant.apply`` gives it), else None. With the ``model``, the parameter is the one the slice
    lives in (Nemotron-H's ``up_proj`` for calibra's ``gate_up_proj``: ``compat.transformers.expert_params``)."""
    block, sep, rest = name.rpartition(".experts.")
    e, _, proj = rest.partition(".")
    if not sep or not e.isdigit() or proj not in ("gate_up_proj", "down_proj"):
        return None
    if model is not None:
        from calibra.compat.transformers import expert_params, experts_module, ungated_experts

        experts = experts_module(model, f"{block}.experts")
        if ungated_experts(experts):
            (proj,) = expert_params(experts, proj)
    return f"{block}.experts.{proj}", int(e)


# ------------------------------------------------------------------------------------- slim records as JSON
class DiscardedOutput:
    """What a distributed job's non-writing ranks put where the writer has its :class:`StreamedOutput`: the
    layers' results are slimmed as the writer's are, nothing is written (rank 0 writes the output)."""

    def __init__(self):
        self.rss_after_layer: list[int] = []

    def layer_done(self, module: torch.nn.Module, layer_name: str, results: dict) -> dict:
        prefix = layer_name + "."
        for n in [n for n in results if n.startswith(prefix)]:
            results[n] = results[n].slim()
        return {}

    def restore(self, record: dict, results: dict) -> None:
        """A layer a killed run finished (the writer's record, shared by rank 0): its slim results only."""
        for n, doc in record.get("results", {}).items():
            results[n] = result_from_record(doc)

    def finish(self, write_files) -> None:
        pass

    def abort(self, exc: BaseException) -> None:
        pass


def result_record(result) -> dict:
    """A slim result (``QuantizedLayer.slim()``, ``PrunedLayer.slim()``) as JSON: its dataclass, its fields,
    each tensor as its dtype and shape (they are on the meta device: nothing else is kept)."""
    return _encode(result)


def result_from_record(doc: dict):
    """The slim result :func:`result_record` wrote (tensors back on the meta device)."""
    return _decode(doc)


def _encode(v):
    if isinstance(v, torch.Tensor):
        return {"__tensor__": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        cls = type(v)
        fields = {f.name: _encode(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return {"__dataclass__": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}
    if isinstance(v, dict):
        return {"__dict__": [[_encode(k), _encode(x)] for k, x in v.items()]}
    if isinstance(v, (list, tuple)):
        return {"__list__": [_encode(x) for x in v], "tuple": isinstance(v, tuple)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"[export] cannot record a {type(v).__name__} in a layer checkpoint")


def _decode(v):
    if not isinstance(v, dict):
        return v
    if "__tensor__" in v:
        return torch.empty(v["shape"], dtype=getattr(torch, v["__tensor__"]), device="meta")
    if "__dataclass__" in v:
        module, _, name = v["__dataclass__"].rpartition(".")
        if not module.startswith("calibra."):
            raise ValueError(f"[export] a layer checkpoint names the class {v['__dataclass__']}, not calibra's")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: _decode(x) for k, x in v["fields"].items()})
    if "__dict__" in v:
        return {_decode(k): _decode(x) for k, x in v["__dict__"]}
    if "__list__" in v:
        items = [_decode(x) for x in v["__list__"]]
        return tuple(items) if v.get("tuple") else items
    raise ValueError(f"[export] unreadable layer checkpoint entry {sorted(v)}")


__all__ = ["StreamedOutput", "refuse_format", "FORMATS", "result_record", "result_from_record"]
