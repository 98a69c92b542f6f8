"""Where each in-memory parameter of a model lives in its checkpoint: the same name, a renamed tensor, or
per-expert tensors that transformers fuses at load time.

transformers 5 renames some families' tensors between disk and memory (Mixtral's
``block_sparse_moe.gate`` is ``mlp.gate`` in memory) and fuses the per-expert Linears of an MoE block into
3-D parameters (``mlp.experts.gate_up_proj [E, 2I, H]`` from ``experts.<e>.w1`` / ``.w3``). A streamed
job reads tensor by tensor, so it needs the inverse of that conversion: for a renamed parameter the disk
name, for a fused one the pieces -- ``(disk tensor, expert, first row, end row)`` -- whose rows fill it.

Both are learned from transformers' own save-time conversion (``compat.transformers.disk_name`` and
``fused_expert_layout``), run on the weightless model once per distinct parameter *pattern*: the layer
index is taken out of the name (``model.layers.{}.mlp.experts.gate_up_proj``), one layer is probed, and the
other layers' names are the probe's with their index put back. A probe whose disk names do not carry the
layer index where the in-memory name does is not generalised (that name is probed on its own).
"""

from __future__ import annotations

import dataclasses
import re

import torch

_FIRST_INDEX = re.compile(r"\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows ``r0:r1`` of expert ``expert`` of a fused parameter, stored as the 2-D tensor ``tensor``."""

    tensor: str
    expert: int
    r0: int
    r1: int


@dataclasses.dataclass(frozen=True)
class Fused:
    """A fused parameter of ``shape`` assembled from ``pieces`` (ordered as the flat parameter is)."""

    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def tensors(self) -> list[str]:
        return [p.tensor for p in self.pieces]


def _split_index(name: str) -> tuple[str, str] | None:
    """``(pattern, index)``: ``name`` with its first ``.<n>.`` segment (the layer index) as ``{}``."""
    m = _FIRST_INDEX.search(name)
    if m is None:
        return None
    return name[: m.start(1)] + "{}" + name[m.end(1) :], m.group(1)


def _with_index(disk: str, old: str, new: str) -> str | None:
    """``disk`` with its first ``.<n>.`` segment -- which must be ``old`` -- set to ``new``; else None."""
    m = _FIRST_INDEX.search(disk)
    if m is None or m.group(1) != old:
        return None
    return disk[: m.start(1)] + new + disk[m.end(1) :]


def _probe(model, name: str, param: torch.Tensor):
    """The disk source of one in-memory parameter: a disk name, a :class:`Fused`, or None (not converted;
    ``why`` when the conversion is one a reader cannot invert)."""
    from calibra.compat.transformers import disk_name, fused_expert_layout, is_fused_experts

    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if is_fused_experts(mod) and attr in ("gate_up_proj", "down_proj") and param.dim() == 3:
        layout = fused_expert_layout(model, name)  # ValueError: a transposing / interleaving layout
        pieces = [Piece(f"{d}.weight", e, r0, r1) for e, cut in layout.items() for d, r0, r1 in cut]
        return Fused(tuple(param.shape), tuple(sorted(pieces, key=lambda p: (p.expert, p.r0))))
    return disk_name(model, name, tuple(param.shape))


def _reindex(src, old: str, new: str):
    """A probed source with its layer index ``old`` replaced by ``new`` (None when it does not carry it)."""
    if isinstance(src, str):
        return _with_index(src, old, new)
    pieces = []
    for p in src.pieces:
        t = _with_index(p.tensor, old, new)
        if t is None:
            return None
        pieces.append(dataclasses.replace(p, tensor=t))
    return Fused(src.shape, tuple(pieces))


class DiskLayout:
    """``sources[name]``: the disk source of every parameter of ``model`` that ``store`` does not hold under
    its own name -- a disk tensor name (a rename) or a :class:`Fused`; ``missing``: why a parameter has no
    source the store holds (empty when the checkpoint streams). ``skip``: names never read (a tied head).
    A store that is not a checkpoint's ``WeightStore`` (a quantized folder's reader, which presents the
    model's own names itself) gets no sources."""

    def __init__(self, model, store, skip=frozenset()):
        self.sources: dict[str, str | Fused] = {}
        self.missing: str | None = None
        if not hasattr(store, "entries"):
            return
        probed: dict[tuple[str, tuple], tuple[str, object]] = {}  # pattern -> (its index, probe)
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in skip:
                continue
            if name in store:
                got = tuple(store.entries[name][2].shape)
                if got != tuple(p.shape):
                    self.missing = f"tensor {name} is stored as {list(got)}, the model's parameter is {list(p.shape)}"
                    return
                continue
            src = self._learn(model, name, p, probed)
            why = src if isinstance(src, _Why) else self._check(name, p, src, store)
            if why is not None:
                self.missing = str(why)
                return
            self.sources[name] = src

    @staticmethod
    def _learn(model, name, p, probed):
        split = _split_index(name)
        key = (split[0], tuple(p.shape)) if split else None
        if key in probed:
            index, first = probed[key]
            src = None if first is None else _reindex(first, index, split[1])
            if src is not None:
                return src
        try:
            src = _probe(model, name, p)
        except ValueError as e:
            return _Why(f"the checkpoint stores {name} in a layout calibra cannot read back tensor by tensor ({e})")
        if src is None:
            return _Why(f"the checkpoint has no tensor {name} (its tensors are named or fused differently)")
        if key is not None and key not in probed:
            probed[key] = (split[1], src)
        return src

    @staticmethod
    def _check(name: str, p, src, store):
        """None when the store holds ``src`` with the shapes ``p`` needs, else why not."""
        if isinstance(src, str):
            if src not in store:
                nor = "its tensors are named or fused differently" if src == name else f"nor {src}, its name on disk"
                return f"the checkpoint has no tensor {name} ({nor})"
            got = tuple(store.entries[src][2].shape)
            if got != tuple(p.shape):
                return f"tensor {src} is stored as {list(got)}, the model's parameter {name} is {list(p.shape)}"
            return None
        dtypes = set()
        for piece in src.pieces:
            want = (piece.r1 - piece.r0, *p.shape[2:])
            if piece.tensor not in store:
                return f"the checkpoint has no tensor {piece.tensor} (part of the model's fused {name})"
            got = tuple(store.entries[piece.tensor][2].shape)
            if got != want:
                return f"tensor {piece.tensor} is stored as {list(got)}, its rows of {name} are {list(want)}"
            dtypes.add(store.entries[piece.tensor][2].dtype)
        if len(dtypes) > 1:
            return f"the per-expert tensors of {name} are stored in different dtypes ({sorted(dtypes)})"
        return None

    def disk_tensors(self, name: str) -> list[str]:
        """The disk tensors that hold in-memory tensor ``name`` (itself when it is not converted)."""
        src = self.sources.get(name, name)
        return [src] if isinstance(src, str) else src.tensors


class _Why(str):
    """A reason a parameter has no readable source (returned, not raised, by the learning step)."""


__all__ = ["DiskLayout", "Fused", "Piece"]
