"""Quantized fused MoE experts written per expert, under the names the original checkpoint uses.

transformers 5 holds a Mixtral / Qwen-MoE block's experts fused in memory: ``experts.gate_up_proj``
``[E, 2I, H]`` and ``experts.down_proj`` ``[E, H, I]``. calibra quantizes each expert's 2-D slice as one
layer, ``<block>.experts.<e>.gate_up_proj`` / ``.down_proj`` (``calibra.quant.apply``). Engines read
the checkpoint layout instead -- one Linear per expert and projection: Mixtral
``block_sparse_moe.experts.<e>.w1/w3/w2``, Qwen2/3-MoE ``mlp.experts.<e>.gate_proj/up_proj/down_proj``
-- and so does transformers' own loader, which re-fuses them (its conversion mapping).

The on-disk names, and which rows of a fused slice each one holds, are not tabulated here per family:
they are read off transformers' own save-time conversion (the one ``save_pretrained`` uses;
``compat.transformers.fused_expert_layout``), run on a probe of the fused parameter whose every row holds its own
(expert, row) index. Every ``<module>.weight`` the conversion yields is then a run of rows of one
expert's slice, and the quantized slice is cut at the same rows. Codes, scales and zero points are per
output row, so the cut is exact; the column groups (and an act-order ``g_idx``) are shared by the
pieces. A family whose conversion transposes or interleaves the rows is refused by name rather than
written wrong.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import torch

from calibra.export.writer import ExportError

_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_up_proj|down_proj)$")


def _fused_param(model, name: str) -> tuple[str, int] | None:
    """``(in-memory parameter key, expert index)`` of a quantized fused-expert slice, else None. The key is
    the parameter the slice lives in: ``<experts>.<proj>``, or for experts without a gate (Nemotron-H) the
    ``up_proj`` that calibra's ``gate_up_proj`` slice names (``compat.transformers.expert_params``)."""
    m = _EXPERT.match(name)
    if m is None:
        return None
    from calibra.compat.transformers import expert_params, experts_module, ungated_experts

    proj = m.group("proj")
    experts = None if model is None else experts_module(model, m.group("experts"))
    if experts is not None and ungated_experts(experts):  # (a layer-by-layer check has no model: calibra's name)
        (proj,) = expert_params(experts, proj)
    return f"{m.group('experts')}.{proj}", int(m.group("e"))


def pieces(model, key: str) -> dict[int, list[tuple[str, int, int]]]:
    """``{expert: [(on-disk module name, first row, end row), ...]}`` of the fused parameter ``key``
    (``compat.transformers.fused_expert_layout``), or ExportError naming the layout."""
    from calibra.compat.transformers import fused_expert_layout

    try:
        return fused_expert_layout(model, key)
    except ValueError as e:
        raise ExportError(
            f"[export] {e}: quantized experts of this layout cannot be written per expert here -- export 'dense' "
            f"(the effective weights)"
        ) from e


def fused_keys(qmodel) -> set[str]:
    """In-memory keys of the fused expert parameters whose experts are quantized (written per expert, so
    the dense remainder skips them). Every expert of a parameter must be quantized, or none."""
    counts: dict[str, set[int]] = {}
    for name in qmodel.layers:
        hit = _fused_param(getattr(qmodel, "model", None), name)
        if hit is not None:
            counts.setdefault(hit[0], set()).add(hit[1])
    from calibra.compat.transformers import expert_params, experts_module, parallel_experts, stacked_glu_experts

    for key, seen in counts.items():
        experts = experts_module(qmodel.model, key.rpartition(".")[0])
        if stacked_glu_experts(experts) or parallel_experts(experts):
            raise ExportError(
                f"[export] {key.rpartition('.')[0]} ({type(experts).__name__}): quantized experts export 'dense' "
                f"only (the effective weights) -- the checkpoint stores all experts whole in "
                f"{' / '.join(p for pr in ('gate_up_proj', 'down_proj') for p in expert_params(experts, pr))} and "
                f"transformers' loader reads them only so (no per-expert Linears to quantize)"
            )
        n_exp = qmodel.model.get_parameter(key).shape[0]
        if len(seen) != n_exp:
            missing = sorted(set(range(n_exp)) - seen)
            raise ExportError(
                f"[export] {key}: {len(seen)} of {n_exp} experts are quantized (expert {missing[0]} is not); a "
                f"checkpoint stores each fused tensor whole -- quantize all its experts, or export 'dense'"
            )
    return set(counts)


def row_slice(layer, r0: int, r1: int, name: str):
    """Rows ``r0:r1`` of a QuantizedLayer (per-row codes, scales and zero points; shared column groups)."""

    def rows(t):
        return None if t is None else t[r0:r1]

    return dataclasses.replace(
        layer,
        name=name,
        codes=rows(layer.codes),
        scales=rows(layer.scales),
        zeros=rows(layer.zeros),
        weight=rows(layer.weight),
    )


def disk_layers(qmodel) -> Iterator[tuple[str, object]]:
    """``(on-disk module name, QuantizedLayer)`` for every quantized weight: a Linear as it is, a fused
    expert slice cut into the per-expert Linears the checkpoint holds."""
    fused_keys(qmodel)  # refuse partly quantized fused tensors first
    cut: dict[str, dict] = {}  # one probe per fused parameter
    for name, layer in qmodel.layers.items():
        hit = _fused_param(getattr(qmodel, "model", None), name)
        if hit is None:
            yield name, layer
            continue
        key, e = hit
        if key not in cut:
            cut[key] = pieces(qmodel.model, key)
        for disk, r0, r1 in cut[key][e]:
            yield disk, row_slice(layer, r0, r1, disk)


def _fused_modules(model) -> Iterator[tuple[str, torch.nn.Module]]:
    from calibra.compat.transformers import holds_fused_experts

    return ((n, m) for n, m in model.named_modules() if holds_fused_experts(m))


def _disk_module(model, name: str, weight: torch.Tensor) -> str:
    """The on-disk module name of the in-memory module ``name`` (transformers' save-time renaming, e.g.
    Mixtral's ``mlp`` -> ``block_sparse_moe``)."""
    from calibra.compat.transformers import disk_name

    disk = disk_name(model, f"{name}.weight", tuple(weight.shape)) or f"{name}.weight"
    return disk[: -len(".weight")] if disk.endswith(".weight") else name


def dense_names(qmodel) -> list[str]:
    """On-disk module names that an MoE checkpoint keeps dense and compressed-tensors lists in ``ignore``
    (vLLM's MoE loaders and llm-compressor's recipes read it so): the routers -- each fused experts
    module's sibling with a ``[num_experts, hidden]`` weight (``gate``, ``router``) -- and the experts of
    a fused tensor left unquantized, per expert (when the checkpoint stores them per expert). Empty for a
    model without fused experts."""
    from calibra.compat.transformers import expert_params, fused_expert_count, fused_expert_layout

    model = qmodel.model
    quantized = fused_keys(qmodel)
    names: list[str] = []
    for path, mod in _fused_modules(model):
        block = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        n_exp = fused_expert_count(mod)
        for child_name, child in block.named_children():
            w = getattr(child, "weight", None)
            if child is not mod and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == n_exp:
                names.append(_disk_module(model, f"{path.rpartition('.')[0]}.{child_name}".lstrip("."), w))
        for proj in (*expert_params(mod, "gate_up_proj"), "down_proj"):
            key = f"{path}.{proj}"
            if key in quantized:
                continue
            try:
                layout = fused_expert_layout(model, key)
            except ValueError:  # saved fused (gpt-oss, GraniteMoE, Llama 4): no per-expert Linear to list
                continue
            names += [disk for cut in layout.values() for disk, _, _ in cut]
    return names


@dataclasses.dataclass
class Swapped:
    """Experts modules transformers replaces by per-expert Linears when it loads a compressed-tensors
    checkpoint (``compat.transformers.swapped_on_quantized_load``: Llama 4): their fused tensors are
    written instead as the replacement's dense per-expert weights (``tensors``, on-disk names; ``drop``:
    the fused keys they replace), listed in ``ignore`` (``modules``) so the loader keeps them dense."""

    tensors: dict[str, torch.Tensor]
    drop: set[str]
    modules: list[str]


def swapped_on_load(qmodel) -> Swapped:
    from calibra.compat.transformers import disk_name, per_expert_tensors, swapped_on_quantized_load

    model = qmodel.model
    try:
        paths = swapped_on_quantized_load(model)
    except ValueError as e:
        raise ExportError(f"[export] compressed-tensors: {e} -- export 'dense'") from e
    out = Swapped({}, set(), [])
    for path in paths:
        quantized = [n for n in qmodel.layers if n.startswith(f"{path}.")]
        if quantized:
            raise ExportError(
                f"[export] compressed-tensors: {path} holds quantized experts (e.g. {quantized[0]}), but "
                f"transformers replaces this fused module by per-expert Linears on load, a layout calibra does not "
                f"write quantized -- leave the experts dense or export 'dense'"
            )
        mod = model.get_submodule(path)
        disk = path
        for pname, p in mod.named_parameters(recurse=False):
            key = disk_name(model, f"{path}.{pname}", tuple(p.shape)) or f"{path}.{pname}"
            out.drop.add(key)
            disk = key[: -len(f".{pname}")]
        for rel, t in per_expert_tensors(mod).items():
            out.tensors[f"{disk}.{rel}"] = t
        out.modules += sorted({f"{disk}.{rel.rpartition('.')[0]}" for rel in per_expert_tensors(mod)})
    return out
