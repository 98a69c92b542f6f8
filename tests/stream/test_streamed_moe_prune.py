"""Streamed pruning of transformers-5 MoE checkpoints (per-expert tensors on disk, fused 3-D experts in
memory): each pruned layer is written as the checkpoint stores it -- the fused experts cut back into their
per-expert tensors, at the stored dtype -- so the output holds exactly the whole-model job's tensors (which
``save_pretrained`` writes per expert too) cast to that dtype, with the same sparsity metadata and the same
MoE coverage in the report, on builtin:tiny-moe (Mixtral) and a sharded bf16 Qwen3-MoE; an interrupted
streamed prune resumes byte-identical."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import calibra  # noqa: E402
from calibra.data import CalibrationConfig  # noqa: E402
from calibra.prune.config import PruningConfig  # noqa: E402

from .test_streamed_quantize import _files, _tensors  # noqa: E402

CONFIGS = {
    "magnitude-2:4": PruningConfig(method="magnitude", pattern="2:4"),
    "wanda": PruningConfig(method="wanda", target_sparsity=0.5),
    "sparsegpt": PruningConfig(method="sparsegpt", target_sparsity=0.5),
    "sparsegpt-2:4": PruningConfig(method="sparsegpt", pattern="2:4"),
}


def _prune(folder, out, cfg, **kw):
    return calibra.prune(
        str(folder),
        cfg,
        CalibrationConfig(num_samples=8, sequence_length=64, seed=0),
        output=out,
        evaluate=False,
        progress=False,
        echo=None,
        **kw,
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streamed_moe_prune_writes_the_whole_model_tensors(moe_folder, name, tmp_path):
    cfg = CONFIGS[name]
    _, whole = _prune(moe_folder, tmp_path / "whole", cfg, stream=False)
    _, rep = _prune(moe_folder, tmp_path / "streamed", cfg, stream=True)
    assert rep["plan"]["placement"].startswith("streamed") and "streaming" not in whole
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert set(a) == set(b)  # the checkpoint's names: per-expert tensors, Mixtral's block_sparse_moe.gate
    experts = [k for k in a if ".experts." in k]
    assert experts and all(t.dim() == 2 for k, t in a.items() if k in experts)
    zeros = total = 0
    for k in a:  # whole-model: float32 (its dtype); streamed: the stored bf16
        assert b[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), b[k]), k
        if k in experts:
            assert torch.equal(a[k] == 0, b[k] == 0), k  # the expert's sparsity pattern survives the cast
            zeros, total = zeros + int((b[k] == 0).sum()), total + b[k].numel()
    assert zeros / total > 0.4  # the experts were pruned, and written back per expert
    assert (tmp_path / "whole" / "sparsity.json").read_bytes() == (tmp_path / "streamed" / "sparsity.json").read_bytes()
    assert whole["summary"] == rep["summary"]
    assert [m["module"] for m in whole["modules"]] == [m["module"] for m in rep["modules"]]
    data = cfg.method_enum.value != "magnitude"
    assert rep.get("moe_coverage") == whole.get("moe_coverage")
    assert (rep.get("moe_coverage") is not None) == data  # the routing the experts saw, when calibrating
    assert not calibra.export.verify_manifest(tmp_path / "streamed")


def test_streamed_moe_prune_loads_in_transformers_as_the_whole_model_output(qwen3_moe, tmp_path):
    """The streamed output is a checkpoint transformers reads back into fused experts: the same model as
    the whole-model job's output, once that is at the stored dtype."""
    import transformers

    cfg = CONFIGS["sparsegpt"]
    _prune(qwen3_moe, tmp_path / "whole", cfg, stream=False)
    _prune(qwen3_moe, tmp_path / "streamed", cfg, stream=True)
    load = transformers.AutoModelForCausalLM.from_pretrained
    w = dict(load(tmp_path / "whole", dtype=torch.bfloat16).named_parameters())
    s = dict(load(tmp_path / "streamed", dtype=torch.bfloat16).named_parameters())
    assert set(w) == set(s) and any(n.endswith("experts.gate_up_proj") for n in s)
    for n in w:
        assert torch.equal(w[n], s[n]), n


@pytest.mark.parametrize("name", ["magnitude-2:4", "sparsegpt"])
def test_streamed_moe_prune_resume_is_byte_identical(moe_folder, name, tmp_path, interrupt_after_layer):
    """Interrupted after layer 1 is committed, the streamed prune resumes from the shards in its work
    folder and writes the bytes of an uninterrupted streamed run, its MoE coverage included."""
    from calibra.io import checkpoint

    cfg = CONFIGS[name]
    _, ref = _prune(moe_folder, tmp_path / "ref", cfg, stream=True)
    interrupt_after_layer(lambda: _prune(moe_folder, tmp_path / "out", cfg, stream=True))
    _, rep = _prune(moe_folder, tmp_path / "out", cfg, stream=True, resume=True)
    assert rep["resumed_from_layer"] == 2
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
    assert rep.get("moe_coverage") == ref.get("moe_coverage")
    assert (ref.get("moe_coverage") is not None) == (name == "sparsegpt")
    assert not checkpoint.work_dir(tmp_path / "out").exists()
