"""PCA bases from the covariance observer, the preset files (round trip, atomic pair, bad presets) and the
architecture checks (mismatched model, MLA)."""

from __future__ import annotations

import json

import pytest
import torch

from calibra.compat.transformers import with_cache
from calibra.kv import KVPreset, PCACache, PresetError, PresetMismatchError, load_preset
from calibra.kv.basis import pca, rank_grid
from calibra.kv.plan import KVArchitectureError, check_architecture
from tests.calib._tiny import build


def test_pca_matches_direct_covariance_of_observed_values(llama):
    """The basis from the observer's sums equals the eigen-decomposition of the values' covariance
    computed directly from a v_proj hook."""
    from calibra.api import calibrate
    from calibra.kv import bases_from_stats

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 96, (3, 24), generator=g)
    seen = []
    h = llama.model.layers[1].self_attn.v_proj.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    with torch.no_grad():
        llama(ids)
    h.remove()
    v = torch.cat(seen).reshape(-1, 2, 16).double()  # [n, Hkv, d]
    stats = calibrate(llama, (ids, None), observers=("kv",), progress=False, echo=None, device="cpu")
    b = bases_from_stats(stats, ["model.layers.1"], "v")[0]
    assert b.tokens == 72
    for head in range(2):
        x = v[:, head]
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / x.shape[0]
        evals = torch.linalg.eigvalsh(cov).flip(0)
        assert torch.allclose(b.mean[head].double(), mean, atol=1e-5)
        assert torch.allclose(b.values[head].double(), evals.clamp_min(0), atol=1e-5)
        # top direction: the covariance along it is the top eigenvalue
        u = b.vectors[head, :, 0].double()
        assert float(u @ cov @ u) == pytest.approx(float(evals[0]), rel=1e-4)
    assert b.explained(16) == pytest.approx(1.0) and 0 < b.explained(2) < 1


def test_pca_is_orthonormal_and_sorted():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, 8, generator=g, dtype=torch.float64) * torch.arange(1, 9, dtype=torch.float64) + 3
    outer = torch.einsum("nhi,nhj->hij", x, x)
    b = pca(outer, x.sum(0), 500)
    eye = torch.eye(8).expand(2, 8, 8)
    assert torch.allclose(b.vectors.transpose(-1, -2) @ b.vectors, eye, atol=1e-5)
    assert (b.values[:, :-1] >= b.values[:, 1:]).all()
    assert torch.allclose(b.mean.double(), x.mean(0), atol=1e-5)


def test_rank_grid():
    assert rank_grid(64) == [64, 48, 32, 24, 16, 8, 4]
    assert rank_grid(16)[0] == 16 and rank_grid(16)[-1] == 1


def _preset(plan, **over):
    kw = dict(
        model={"source": "random-llama", "model_type": "llama"},
        calibration={"dataset": "random"},
        quality={"perplexity": {"increase": 0.0}},
    )
    kw.update(over)
    return KVPreset(plan=plan, **kw)


def test_preset_round_trip(tmp_path, llama, llama_plan):
    plan = llama_plan.with_ranks({"k": [3, 9], "v": [5, 7]})
    path = _preset(plan).save(tmp_path / "kv_preset_random.json")
    assert path.exists() and (tmp_path / "kv_preset_random.safetensors").exists()
    meta = json.loads(path.read_text())
    assert meta["ranks"] == {"k": [3, 9], "v": [5, 7]} and meta["targets"] == "kv"
    assert meta["model"]["source"] == "random-llama" and meta["calibra_version"]
    back = load_preset(path)
    assert back.ranks == plan.ranks and back.targets == "kv"
    for w in ("k", "v"):
        for a, b in zip(plan.bases[w], back.plan.bases[w]):
            assert torch.equal(a.vectors, b.vectors) and torch.equal(a.mean, b.mean) and a.tokens == b.tokens
    back.check_model(llama)
    x = torch.randint(1, 96, (1, 9))
    with torch.no_grad():
        a = llama(x, **with_cache(llama, PCACache(llama, plan)), use_cache=True).logits
        b = llama(x, **with_cache(llama, PCACache(llama, back)), use_cache=True).logits
    assert torch.equal(a, b)


def test_preset_refuses_to_overwrite_and_keeps_the_old_pair(tmp_path, llama_plan):
    path = _preset(llama_plan.uniform(4)).save(tmp_path / "p.json")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        _preset(llama_plan.uniform(2)).save(path)
    assert path.read_bytes() == before
    _preset(llama_plan.uniform(2)).save(path, overwrite=True)
    assert load_preset(path).ranks["v"] == [2, 2]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_preset_path_must_be_json(tmp_path, llama_plan):
    with pytest.raises(ValueError, match=r"must end in \.json"):
        _preset(llama_plan).save(tmp_path / "p.safetensors")


@pytest.mark.parametrize(
    "damage, match",
    [
        ("missing_tensors", "bases file .* is missing"),
        ("other_tensors", "sha256 differs"),
        ("not_json", "not valid JSON"),
        ("other_format", "not a calibra KV preset"),
        ("future_version", "format_version"),
        ("bad_ranks", "bad ranks"),
        ("missing_field", "lacks the field 'ranks'"),
    ],
)
def test_bad_presets_are_clear_errors(tmp_path, llama_plan, damage, match):
    path = _preset(llama_plan.uniform(4)).save(tmp_path / "p.json")
    meta = json.loads(path.read_text())
    if damage == "missing_tensors":
        (tmp_path / "p.safetensors").unlink()
    elif damage == "other_tensors":
        _preset(llama_plan.uniform(4)).save(tmp_path / "q.json")
        (tmp_path / "q.safetensors").replace(tmp_path / "p.safetensors")
        data = bytearray((tmp_path / "p.safetensors").read_bytes())
        data[-1] ^= 1
        (tmp_path / "p.safetensors").write_bytes(bytes(data))
    elif damage == "not_json":
        path.write_text("{not json")
    elif damage == "other_format":
        path.write_text(json.dumps({**meta, "format": "something-else"}))
    elif damage == "future_version":
        path.write_text(json.dumps({**meta, "format_version": 99}))
    elif damage == "bad_ranks":
        path.write_text(json.dumps({**meta, "ranks": {"k": [4, 4], "v": [4, 999]}}))
    elif damage == "missing_field":
        path.write_text(json.dumps({k: v for k, v in meta.items() if k != "ranks"}))
    with pytest.raises((PresetError, FileNotFoundError), match=match):
        load_preset(path)


def test_missing_preset_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no preset at"):
        load_preset(tmp_path / "nope.json")


def test_preset_for_another_model_is_refused_before_any_work(llama_plan):
    other = build("llama", num_hidden_layers=3)
    with pytest.raises(PresetMismatchError, match="2 layers.*this model has 3 layers"):
        PCACache(other, llama_plan)
    qwen3 = build("qwen3")  # same layers/heads, head_dim 16 as well -> model_type differs
    with pytest.raises(PresetError, match="'llama' model"):
        _preset(llama_plan).check_model(qwen3)
    wide = build("llama", head_dim=32)
    with pytest.raises(PresetMismatchError, match="head_dim 32"):
        _preset(llama_plan).check_model(wide)


def test_plan_rank_validation(llama_plan):
    with pytest.raises(ValueError, match=r"rank of layer 1 must be an integer in 1\.\.16"):
        llama_plan.with_ranks({"k": [4, 4], "v": [4, 17]})
    with pytest.raises(ValueError, match="name 1 layers"):
        llama_plan.with_ranks({"k": [4], "v": [4, 4]})


def test_mla_is_refused_by_name(tmp_path):
    import calibra.kv as kv
    from calibra.models.adapter import attention_kind

    class Cfg:
        kv_lora_rank = 512
        num_attention_heads = 16

    assert attention_kind(Cfg) == "mla"
    with pytest.raises(KVArchitectureError, match="multi-head latent attention.*supported: standard"):
        check_architecture(type("A", (), {"attention_kind": "mla"}))
    folder = tmp_path / "deepseek"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "deepseek_v3", "kv_lora_rank": 512, "num_attention_heads": 16})
    )
    with pytest.raises(NotImplementedError, match="MLA"):
        kv.calibrate(str(folder), rank=8)


def test_standard_attention_kinds():
    from calibra.models.adapter import attention_kind

    assert attention_kind(build("llama").config) == "gqa"
    assert attention_kind(type("C", (), {"num_attention_heads": 4, "num_key_value_heads": 4})) == "mha"
