"""FAULTS rows 1-8 and 10: every bad model folder is refused by calibra.io before a weight loads, with an
error naming the file/tensor and the fix -- and through the verbs (quantize, prune, calibrate, eval)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct

import pytest

import calibra
from calibra.io import CorruptShardError, ModelReadError, inspect_model, load_model, read_header
from calibra.quant import RTNConfig
from tests.io.conftest import build, torch, write_raw_safetensors


def _cfg(folder):
    return json.loads((folder / "config.json").read_text())


def _set_cfg(folder, **kv):
    cfg = _cfg(folder)
    cfg.update(kv)
    (folder / "config.json").write_text(json.dumps(cfg))


def _header_and_data(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_builtin_and_local_folders_pass(llama, sharded):
    assert inspect_model("builtin:tiny-llama").weight_format == "safetensors"
    assert len(inspect_model(sharded).weight_files) == 3
    mf = inspect_model(llama)
    assert "model.layers.0.mlp.down_proj.weight" in mf.tensor_names


# -------------------------------------------------------------------------------- row 1: config.json
def test_missing_config(llama, no_load):
    (llama / "config.json").unlink()
    with pytest.raises(ModelReadError, match=r"no config\.json.*Supported architectures: .*llama"):
        inspect_model(llama)


def test_invalid_json_config(llama, no_load, tmp_path):
    (llama / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ModelReadError, match=r"config\.json is not valid JSON"):
        calibra.quantize(str(llama), RTNConfig(group_size=16), output=tmp_path / "out", progress=False, echo=None)
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_supported(llama, no_load, tmp_path):
    _set_cfg(llama, model_type="t5", architectures=["T5ForConditionalGeneration"])
    with pytest.raises(
        ModelReadError,
        match=r"unsupported architecture model_type='t5' \(T5ForConditionalGeneration\): not a causal language "
        r"model.*; supported: .*llama.*mixtral.*qwen3",
    ):
        calibra.prune(
            str(llama),
            calibra.prune_config(method="magnitude") if hasattr(calibra, "prune_config") else _magnitude(),
            output=tmp_path / "out",
            progress=False,
            echo=None,
        )


def _magnitude():
    from calibra.prune import PruningConfig

    return PruningConfig(method="magnitude")


def test_nonsense_dimension(llama, no_load):
    _set_cfg(llama, hidden_size=-4)
    with pytest.raises(ModelReadError, match=r"hidden_size must be a positive integer, got -4"):
        inspect_model(llama)


# -------------------------------------------------------------------------------- row 2: index vs shards
def test_index_names_missing_shard(sharded, no_load):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        ModelReadError,
        match=r"names 1 shard\(s\) that are not in the folder: "
        r"model-00002-of-00003\.safetensors",
    ):
        inspect_model(sharded)


def test_index_tensor_missing_from_shard_and_extra(sharded, no_load):
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.9.mlp.gate_proj.weight"] = "model-00003-of-00003.safetensors"
    del idx["weight_map"]["model.norm.weight"]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ModelReadError) as e:
        inspect_model(sharded)
    msg = str(e.value)
    assert "missing from their shard: model.layers.9.mlp.gate_proj.weight (in model-00003-of-00003" in msg
    assert "not in the index (or under another shard): model.norm.weight" in msg


def test_single_file_missing_a_tensor_is_named(llama, no_load):
    """transformers would initialize a missing tensor at random with only a warning; calibra refuses."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(llama / "model.safetensors"))
    del sd["model.layers.1.self_attn.v_proj.weight"]
    sd["model.layers.0.mlp.bogus.weight"] = torch.zeros(2)
    save_file(sd, str(llama / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelReadError) as e:
        inspect_model(llama)
    assert "needs are in no weight file: model.layers.1.self_attn.v_proj.weight" in str(e.value)
    assert "belong to no module of the architecture: model.layers.0.mlp.bogus.weight" in str(e.value)


def test_moe_checkpoint_names_both_forms(tmp_path):
    """Mixtral saved by transformers 5 (per-expert names) passes; dropping one expert's tensor is named."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "moe"
    build(folder, arch="mixtral")
    inspect_model(folder)
    sd = load_file(str(folder / "model.safetensors"))
    victim = next(k for k in sorted(sd) if ".experts.2." in k)
    del sd[victim]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelReadError, match=f"in no weight file: {victim}"):
        inspect_model(folder)


# -------------------------------------------------------------------------------- rows 3, 4: headers
def test_truncated_shard_named_before_load(llama, no_load, tmp_path):
    path = llama / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(ModelReadError, match=r"model\.safetensors: corrupt or truncated.*1000 missing: truncated"):
        calibra.quantize(str(llama), RTNConfig(group_size=16), output=tmp_path / "out", progress=False, echo=None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case,match",
    [
        ("short", r"fewer than the 8-byte header length field"),
        ("length", r"header length field says \d+ bytes but the file has only"),
        ("huge_length", r"the format allows at most"),
        ("garbage", r"not valid UTF-8 JSON"),
        ("list", r"JSON list, not an object"),
        ("dtype", r"unknown dtype 'F17'"),
        ("shape", r"invalid shape \[-1, 4\]"),
        ("size", r"needs 64 bytes but its data_offsets \[0, 60\] span 60"),
        ("overlap", r"overlap"),
        ("beyond", r"ends at byte 128 of the data but the file holds only 64"),
        ("overflow", r"negative, reversed or overflowing"),
        ("reversed", r"negative, reversed or overflowing"),
    ],
)
def test_corrupt_headers_rejected(tmp_path, case, match):
    p = tmp_path / "x.safetensors"
    t = lambda b, e, shape=(4, 4): {"dtype": "F32", "shape": list(shape), "data_offsets": [b, e]}  # noqa: E731
    data = bytes(64)
    if case == "short":
        p.write_bytes(b"\x01\x02")
    elif case == "length":
        write_raw_safetensors(p, {"a": t(0, 64)}, data, length=10**6)
    elif case == "huge_length":
        write_raw_safetensors(p, {"a": t(0, 64)}, data, length=2**63)
    elif case == "garbage":
        p.write_bytes(struct.pack("<Q", 6) + b"\xff{oops" + data)
    elif case == "list":
        write_raw_safetensors(p, [1, 2], data)  # type: ignore[arg-type]
    elif case == "dtype":
        write_raw_safetensors(p, {"a": {"dtype": "F17", "shape": [4, 4], "data_offsets": [0, 64]}}, data)
    elif case == "shape":
        write_raw_safetensors(p, {"a": t(0, 64, (-1, 4))}, data)
    elif case == "size":
        write_raw_safetensors(p, {"a": t(0, 60)}, data)
    elif case == "overlap":
        write_raw_safetensors(p, {"a": t(0, 64), "b": t(32, 96)}, bytes(96))
    elif case == "beyond":
        write_raw_safetensors(p, {"a": t(0, 64), "b": t(64, 128)}, data)
    elif case == "overflow":
        write_raw_safetensors(p, {"a": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 2**64]}}, data)
    elif case == "reversed":
        write_raw_safetensors(p, {"a": t(64, 0)}, data)
    with pytest.raises(CorruptShardError, match=match) as e:
        read_header(p)
    assert "x.safetensors" in str(e.value)


def test_corrupt_shard_in_a_model_never_reaches_native_code(sharded, no_load, monkeypatch):
    """The native reader is never asked: the Python check runs first and names the shard."""
    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("native reader reached"))
    path = sharded / "model-00003-of-00003.safetensors"
    header, data = _header_and_data(path)
    names = sorted(k for k in header if k != "__metadata__")
    header[names[1]]["data_offsets"] = [0, header[names[1]]["data_offsets"][1] - header[names[1]]["data_offsets"][0]]
    write_raw_safetensors(path, header, data)
    with pytest.raises(ModelReadError, match=r"model-00003-of-00003\.safetensors: corrupt.*overlap"):
        inspect_model(sharded)


# -------------------------------------------------------------------------------- row 5: NaN/Inf
def test_nan_and_inf_in_weights_named_at_load(llama):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(llama / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    sd["model.norm.weight"][0] = float("inf")
    save_file(sd, str(llama / "model.safetensors"), metadata={"format": "pt"})
    inspect_model(llama)  # headers are fine: the values are only seen at load
    with pytest.raises(
        ModelReadError,
        match=r"non-finite weights in 2 tensor\(s\): "
        r"model\.layers\.1\.mlp\.up_proj\.weight \(1 NaN, 0 Inf of 2048\), "
        r"model\.norm\.weight \(0 NaN, 1 Inf of 32\)",
    ):
        load_model(llama)


def test_nan_weights_refused_by_quantize_before_any_work(llama, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(llama / "model.safetensors"))
    sd["model.layers.0.self_attn.k_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(llama / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight \(1 NaN"):
        calibra.quantize(str(llama), RTNConfig(group_size=16), output=tmp_path / "out", progress=False, echo=None)
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------- row 6: path safety
@pytest.mark.parametrize(
    "name,match",
    [
        ("../outside.safetensors", r"climbs out of the model folder with '\.\.'"),
        ("sub/../../outside.safetensors", r"climbs out"),
        ("/etc/passwd", r"an absolute path"),
        ("C:\\Windows\\x.safetensors", r"an absolute path"),
    ],
)
def test_index_shard_paths_refused(sharded, no_load, name, match):
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = name
    (sharded / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ModelReadError, match=match):
        inspect_model(sharded)


def test_symlink_out_of_the_folder_refused(sharded, tmp_path, no_load):
    outside = tmp_path / "elsewhere.safetensors"
    shard = sharded / "model-00001-of-00003.safetensors"
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    with pytest.raises(ModelReadError, match=r"is a symlink to .*elsewhere\.safetensors, outside the model folder"):
        inspect_model(sharded)


def test_symlinked_tokenizer_out_of_the_folder_refused(llama, tmp_path, no_load):
    (tmp_path / "secret").write_text("x")
    (llama / "tokenizer.json").unlink()
    os.symlink(tmp_path / "secret", llama / "tokenizer.json")
    with pytest.raises(ModelReadError, match=r"file 'tokenizer\.json' is a symlink"):
        inspect_model(llama)


def test_hub_cache_snapshot_symlinks_allowed(base_llama, tmp_path):
    """A Hugging Face cache snapshot links every file to ../../blobs/<hash>: that is inside the repo."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for p in base_llama.iterdir():
        shutil.copy(p, blobs / p.name)
        os.symlink(os.path.relpath(blobs / p.name, snap), snap / p.name)
    assert inspect_model(snap).weight_files[0].name == "model.safetensors"


# -------------------------------------------------------------------------------- row 7: pickle
def _to_pickle(folder):
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    return sd


def test_pickle_only_refused_by_default(llama, no_load, tmp_path):
    _to_pickle(llama)
    with pytest.raises(ModelReadError, match=r"only pickle weights \(pytorch_model\.bin\).*--allow-pickle"):
        calibra.quantize(str(llama), RTNConfig(group_size=16), output=tmp_path / "out", progress=False, echo=None)


def test_pickle_opt_in_uses_weights_only(llama, monkeypatch):
    sd = _to_pickle(llama)
    calls = []
    real = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    model, tok = load_model(llama, allow_pickle=True)
    assert calls == [True]
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, sd["model.layers.1.mlp.down_proj.weight"])
    assert tok is not None


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_refused_even_when_allowed(llama):
    _to_pickle(llama)
    with open(llama / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": _Evil()}, f)
    with pytest.raises(ModelReadError, match=r"pytorch_model\.bin: torch\.load\(weights_only=True\) refused"):
        load_model(llama, allow_pickle=True)


# -------------------------------------------------------------------------------- row 8: remote code
def test_remote_code_refused_without_flag(llama, no_load, tmp_path):
    _set_cfg(llama, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    with pytest.raises(ModelReadError, match=r"auto_map \(AutoModelForCausalLM\).*--trust-remote-code"):
        calibra.evaluate(str(llama), max_tokens=64)
    from calibra.cli import main

    with pytest.raises(ModelReadError, match=r"\[calibrate\].*runs Python code shipped with the model"):
        main(["calibrate", "--input", str(llama), "--output", str(tmp_path / "s.safetensors"), "--no-progress"])


def test_remote_code_passes_with_flag(llama, monkeypatch):
    import calibra.assets

    _set_cfg(llama, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    inspect_model(llama, trust_remote_code=True)
    seen = {}
    monkeypatch.setattr(calibra.assets, "load_model", lambda spec, dtype, **k: seen.update(k) or (_Stub(), None))
    load_model(llama, trust_remote_code=True)
    assert seen == {"trust_remote_code": True}


class _Stub:
    def named_parameters(self):
        return []

    def named_buffers(self):
        return []


# -------------------------------------------------------------------------------- row 10: already quantized
def test_quantization_config_refused(llama, no_load, tmp_path):
    _set_cfg(llama, quantization_config={"quant_method": "fp8"})
    with pytest.raises(
        ModelReadError,
        match=r"\[quantize\] .* already quantized \(its config\.json has a "
        r"quantization_config \(quant_method 'fp8'\)\)",
    ):
        calibra.quantize(str(llama), RTNConfig(group_size=16), output=tmp_path / "out", progress=False, echo=None)


@pytest.mark.parametrize(
    "dtype,name",
    [
        (torch.float8_e4m3fn, "model.layers.0.mlp.up_proj.weight"),
        (torch.int8, "model.layers.0.mlp.up_proj.weight"),
        (torch.int32, "model.layers.0.mlp.up_proj.qweight"),
    ],
)
def test_quantized_tensors_without_config_refused(llama, no_load, dtype, name):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(llama / "model.safetensors"))
    w = sd.pop("model.layers.0.mlp.up_proj.weight")
    sd[name] = w.to(dtype) if dtype.is_floating_point else (w * 10).to(dtype)
    save_file(sd, str(llama / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ModelReadError, match=f"already quantized \\(it holds packed/integer/FP8 weight tensors: {name}"
    ):
        inspect_model(llama)
    inspect_model(llama, allow_quantized=True)  # eval reads quantized checkpoints
