#!/usr/bin/env python
"""Which MoE families of the model matrix calibra quantizes per expert, and which keep experts dense (why).

Builds the matrix's tiny random model of every causal-LM ``model_type`` of the installed transformers
(``tests/matrix/tiny_configs.py``), asks calibra's adapter for each decoder layer's MoE blocks (quantized
per expert: routing statistics, per-expert counts, Hessian shrinkage, a coverage row per expert) and for
the experts it leaves dense with the reason (``StructuralAdapter.dense_linears``), and prints the table of
the types that hold experts (docs/moe_coverage.md).

    PYTHONPATH=python python tools/moe_coverage.py --out docs/moe_coverage.md   # every type -> the docs page
    PYTHONPATH=python python tools/moe_coverage.py --types nemotron_h ergo      # to stdout

Exit status 1 when a type has dense experts whose reason is not one of :data:`EXPECTED_DENSE` (the
documented exceptions), so a new transformers layout that falls back to dense is noticed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "python"))

# experts calibra keeps dense on purpose, by module path suffix -> why (the same words as docs/moe_coverage.md)
EXPECTED_DENSE = {
    # JetMoE's mixture-of-attention: its "experts" are attention query/output projections chosen per token,
    # not an MLP; they stay dense (their routing is not an MLP expert's and no engine format stores them so)
    "self_attention.experts": "JetMoE's attention experts (query/output projections, not MLP experts)",
    # Llama 4: the block hands every expert every token, pre-scaled by its router score, through one batched
    # call without the routing, and transformers swaps the fused module for per-expert Linears on a quantized
    # load; calibra writes those Linears dense (compat.transformers.per_expert_tensors)
    "feed_forward.experts": "Llama 4's experts (called without the routing: every expert gets every token)",
}


@dataclass
class Row:
    model_type: str
    blocks: int = 0  # MoE blocks quantized per expert
    experts: int = 0  # experts per block (the first block's)
    dense: dict[str, str] = field(default_factory=dict)  # layer-relative experts path -> reason


def coverage(model_type: str) -> Row | None:
    """The MoE coverage of ``model_type``'s tiny model; None when it holds no experts (or is refused, or
    its tiny model does not build: the matrix says so)."""
    from calibra.models import get_adapter, refusal
    from tests.matrix.tiny_configs import tiny_model

    try:
        model = tiny_model(model_type)
    except Exception:  # noqa: BLE001 - the generator's limit, reported by the matrix
        return None
    if refusal(model_type, model.config.to_dict()) is not None:
        return None
    try:
        adapter = get_adapter(model)
    except (TypeError, ValueError):
        return None
    row = Row(model_type)
    for layer in adapter.layers:
        blocks = adapter.moe_blocks(layer)
        row.blocks += len(blocks)
        if blocks and not row.experts:
            row.experts = blocks[0].num_experts
        dense = getattr(adapter, "dense_linears", lambda _: {})(layer)
        for name, why in dense.items():  # the experts module's own reason first, then loose expert Linears
            if why.startswith("MoE experts:"):
                row.dense[name] = why.removeprefix("MoE experts: ")
        for name, why in dense.items():
            if why == "MoE expert":  # a Linear of an experts ModuleList no MoE block observes
                row.dense.setdefault(name.split(".experts.")[0] + ".experts", "expert Linears outside an MoE block")
    has_experts = row.blocks or row.dense or any(".experts." in n for n, _ in model.named_parameters())
    return row if has_experts else None


def unexpected(row: Row) -> dict[str, str]:
    """The dense experts of ``row`` that are not documented exceptions."""
    return {n: w for n, w in row.dense.items() if not any(n.endswith(k) for k in EXPECTED_DENSE)}


def table(rows: list[Row]) -> str:
    import transformers

    dense = [r for r in rows if r.dense]
    lines = [
        "# MoE coverage",
        "",
        "Every MoE `model_type` of the [model matrix](model_matrix.md) (its tiny random model holds experts), with",
        "the MoE blocks calibra quantizes per expert -- each expert's `gate_up_proj` / `down_proj` from the tokens",
        "the family's own router sends it, per-expert token counts, Hessian shrinkage toward the layer's pooled",
        "Hessian and a coverage row per expert in report.json (`calibra.calib.moe`) -- and the experts it keeps",
        "dense, with the reason calibra gives (`StructuralAdapter.dense_linears`, from",
        "`compat.transformers.standard_fused_experts_issue`). Shared experts are ordinary Linears of the block",
        "(quantized), routers and expert biases stay dense. The layouts are described in",
        "[ARCHITECTURE](ARCHITECTURE.md) and the per-expert export in [export](export.md#moe-models).",
        "",
        "Kept dense on purpose: Llama 4's experts (the block hands every expert every token, pre-scaled by its",
        "router score, in one call without the routing, so which tokens an expert serves is not in the call; on a",
        "quantized load transformers swaps them for per-expert Linears, which calibra writes dense) and JetMoE's",
        "mixture-of-attention experts (attention query/output projections chosen per token, not MLP experts).",
        "`tools/moe_coverage.py` exits 1 if any other experts stay dense.",
        "",
        f"transformers {transformers.__version__}: {len(rows)} MoE model types in the matrix, "
        f"{sum(not r.dense for r in rows)} with every expert quantized per expert, {len(dense)} with experts "
        f"kept dense (generated by `PYTHONPATH=python python tools/moe_coverage.py`).",
        "",
        "| model_type | MoE blocks quantized per expert | experts per block | experts kept dense (why) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        why = "; ".join(f"`{n}`: {w}" for n, w in r.dense.items()).replace("|", "\\|")
        lines.append(f"| `{r.model_type}` | {r.blocks} | {r.experts or ''} | {why} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from tests.matrix.tiny_configs import causal_lm_types

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", nargs="*", help="model types (default: every causal-LM type)")
    p.add_argument("--out", help="write the table here (default: stdout)")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    rows = [r for t in (a.types or causal_lm_types()) if (r := coverage(t)) is not None]
    text = table(rows)
    if a.out:
        Path(a.out).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    bad = {r.model_type: unexpected(r) for r in rows if unexpected(r)}
    for t, d in bad.items():
        print(f"{t}: experts kept dense without a documented reason: {d}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
