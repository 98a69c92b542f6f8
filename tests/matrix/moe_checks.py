"""Checks shared by the per-expert MoE tests (test_structural_moe.py, test_expert_layouts.py): a model's
experts quantized per expert with a coverage row each, its folder rebuilt to the same logits, and the
formats that cannot write its experts per expert refused by name while ``dense`` reloads equal."""

from __future__ import annotations

import pytest
import torch

from calibra.models import get_adapter

from .run_one import CAL, _logits

DENSE_TOL = 1e-5  # max |logit| difference of the reloaded dense export from calibra's simulated model


def moe_blocks(adapter) -> list[tuple[str, object]]:
    """``(block path, MoEBlock)`` of every MoE block of the model, layer by layer."""
    out = []
    for i, layer in enumerate(adapter.layers):
        out += [(f"{adapter.layer_name(i)}.{b.name}", b) for b in adapter.moe_blocks(layer)]
    return out


def assert_experts_quantized(qm, report, original) -> list[tuple[str, object]]:
    """Every expert of every MoE block of ``qm`` is quantized: its ``gate_up_proj`` / ``down_proj`` codes
    are in ``qm.layers``, the model holds exactly their dequantized weights (in the family's own layout,
    read back through ``compat.transformers.expert_slice``) and they differ from ``original``'s; the report's
    coverage table has one row per expert whose counts sum to top-k x the calibration tokens, with a
    shrinkage weight in (0, 1]. Returns the blocks."""
    from calibra.compat.transformers import expert_slice, experts_module

    blocks = moe_blocks(get_adapter(qm.model))
    assert blocks, "no MoE block found"
    n_tokens = CAL["num_samples"] * CAL["sequence_length"]
    rows = report["moe_coverage"]
    for key, b in blocks:
        ex, orig = experts_module(qm.model, f"{key}.experts"), experts_module(original, f"{key}.experts")
        for e in range(b.num_experts):
            for proj in ("gate_up_proj", "down_proj"):
                ql = qm.layers[f"{key}.experts.{e}.{proj}"]
                got = expert_slice(ex, proj, e)
                assert torch.equal(got, ql.weight.to(got.dtype)), f"{key} expert {e} {proj}"
                assert not torch.equal(got, expert_slice(orig, proj, e))
        mine = [r for r in rows if r["block"] == key]
        assert [r["expert"] for r in mine] == list(range(b.num_experts))
        assert sum(r["tokens"] for r in mine) == b.top_k * n_tokens
        assert all(0 < r["lambda"] <= 1 for r in mine)
    return blocks


def assert_folder_rebuilds(qm, folder) -> torch.Tensor:
    """calibra's folder rebuilds a model with the simulated model's logits; returns the ids it compared."""
    from calibra.quant.save import load

    rebuilt, _ = load(folder)
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (2, 12))
    assert torch.equal(_logits(rebuilt, ids), _logits(qm.model, ids))
    return ids


def assert_refused_then_dense_reloads(qm, tmp_path, ids, match: str) -> None:
    """compressed-tensors and GPTQ refuse the experts by name (``match``) before writing, and the ``dense``
    export (the effective weights) reloads in transformers within :data:`DENSE_TOL` of calibra's logits."""
    import calibra.export as E
    from calibra.export.writer import ExportError

    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(ExportError, match=match):
            E.export(qm, tmp_path / fmt, fmt)
    assert_dense_reloads(qm, tmp_path, ids)


def assert_dense_reloads(qm, tmp_path, ids) -> None:
    from transformers import AutoModelForCausalLM

    import calibra.export as E

    dense = E.export(qm, tmp_path / "dense", "dense")[0]
    reloaded = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    assert float((_logits(reloaded, ids) - _logits(qm.model, ids)).abs().max()) <= DENSE_TOL


def assert_folder_streams_the_experts(qm, folder) -> None:
    """The layer-by-layer reader of calibra's folder (``quant.streamed_load.DequantizedStore``) assembles every
    parameter the experts live in exactly as the simulated model holds it (slices placed in the family's own
    layout: transposed, split rows, ``up_proj``)."""
    from calibra.compat.transformers import expert_params, experts_module
    from calibra.io import inspect_model
    from calibra.quant.streamed_load import open_streamed_quantized

    streamed = open_streamed_quantized(inspect_model(str(folder), allow_quantized=True), qm.model.config, torch.float32)
    paths = {id(m): n for n, m in qm.model.named_modules()}
    for key, _ in moe_blocks(get_adapter(qm.model)):
        ex = experts_module(qm.model, f"{key}.experts")
        for proj in ("gate_up_proj", "down_proj"):
            for rel in expert_params(ex, proj):
                name = f"{paths[id(ex)]}.{rel}"
                assert torch.equal(streamed.store.read(name), qm.model.get_parameter(name).float()), name
