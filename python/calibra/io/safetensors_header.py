"""Read and bounds-check a safetensors header in pure Python, before any native reader touches the file.

Layout (https://github.com/huggingface/safetensors): 8 bytes little-endian ``N``, then ``N`` bytes of
UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data buffer; offsets are relative to the start of the buffer.

Why in Python: the native reader rejects most bad files, but with messages that name neither the file
nor the fix, and a truncated shard is only discovered when its tensor is first touched -- possibly
hours into a run (FAULTS rows 3 and 4). Here every problem is a :class:`CorruptShardError` naming the
file, the tensor and what is wrong, raised before any weight is read. Only the header is read (a few
KiB to MiB), never the data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from calibra.io.errors import ModelReadError

# bytes per element of every dtype the format defines; sub-byte types (F4) count bits below
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# the reference implementation refuses headers above 100 MB; a larger N is a corrupt length field
MAX_HEADER_BYTES = 100 * 1000 * 1000
_MAX_OFFSET = 2**63  # offsets are u64 in the spec, i64 in most readers


class CorruptShardError(ModelReadError):
    """A safetensors file whose header is truncated, malformed or inconsistent with the file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    file_size: int
    header_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict

    @property
    def data_size(self) -> int:
        return self.file_size - 8 - self.header_size


def _fail(path: Path, what: str) -> CorruptShardError:
    return CorruptShardError(
        f"[model] {path}: corrupt or truncated safetensors file: {what}. Re-download or "
        f"re-save this file (a complete copy has the same size as the original)"
    )


def read_header(path) -> ShardHeader:
    """Parse and validate the header of the safetensors file ``path`` (see the module docstring).

    Checks: the length field fits in the file and below 100 MB; the JSON parses to an object; every
    entry has a known dtype, a shape of non-negative ints and two integer offsets with
    ``0 <= begin <= end`` inside the data buffer; ``end - begin`` equals the bytes the dtype and shape
    need (computed with Python integers, so a huge shape cannot overflow); no two tensors overlap; the
    file is not shorter than the last tensor (truncated download).
    """
    path = Path(path)
    size = os.path.getsize(path)
    if size < 8:
        raise _fail(path, f"the file has {size} bytes, fewer than the 8-byte header length field")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise _fail(path, f"header length field says {n} bytes (the format allows at most {MAX_HEADER_BYTES})")
        if 8 + n > size:
            raise _fail(path, f"header length field says {n} bytes but the file has only {size - 8} after it")
        raw = f.read(n)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"the header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _fail(path, f"the header is a JSON {type(doc).__name__}, not an object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _fail(path, "__metadata__ is not an object")
    data_size = size - 8 - n
    tensors: dict[str, TensorEntry] = {}
    for name, e in doc.items():
        if not isinstance(e, dict):
            raise _fail(path, f"entry {name!r} is not an object")
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in DTYPE_BITS:
            raise _fail(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _fail(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise _fail(path, f"tensor {name!r} has invalid data_offsets {offs!r}")
        begin, end = offs
        if begin < 0 or end < begin or end >= _MAX_OFFSET:
            raise _fail(path, f"tensor {name!r} has data_offsets [{begin}, {end}] (negative, reversed or overflowing)")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        need = (bits + 7) // 8
        if end - begin != need:
            raise _fail(
                path,
                f"tensor {name!r} ({dtype} {shape}) needs {need} bytes but its data_offsets "
                f"[{begin}, {end}] span {end - begin}",
            )
        tensors[name] = TensorEntry(name, dtype, tuple(shape), begin, end)
    prev = None
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if prev is not None and t.begin < prev.end and t.nbytes and prev.nbytes:
            raise _fail(
                path, f"tensors {prev.name!r} [{prev.begin}, {prev.end}] and {t.name!r} [{t.begin}, {t.end}] overlap"
            )
        prev = t if prev is None or t.end >= prev.end else prev
    last = max((t.end for t in tensors.values()), default=0)
    if last > data_size:
        worst = max(tensors.values(), key=lambda t: t.end)
        raise _fail(
            path,
            f"tensor {worst.name!r} ends at byte {last} of the data but the file holds only "
            f"{data_size} data bytes ({last - data_size} missing: truncated)",
        )
    return ShardHeader(path=path, file_size=size, header_size=n, tensors=tensors, metadata=dict(meta))
