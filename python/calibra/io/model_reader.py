"""The one way calibra reads a model given by ``--input`` / ``--model``: check everything, then load.

Every verb (calibrate, quantize, prune, eval) calls :func:`inspect_model` before it loads a weight and
:func:`load_model` to load. :func:`inspect_model` reads only ``config.json``, the index and the
safetensors headers, and refuses (FAULTS rows 1-4, 6-8, 10):

* a missing or invalid ``config.json``, an architecture without an adapter (the supported list comes
  from ``calibra.models.registry``), a config that asks for remote code (``auto_map``) without
  ``trust_remote_code``;
* a model that is already quantized (``quantization_config`` / ``compression_config`` in the config,
  or packed/integer/FP8 weight tensors) unless the verb reads quantized models (eval);
* shard names with ``..``, absolute paths, or files that are symlinks leaving the folder (a Hugging Face
  cache snapshot's links into its own ``blobs/`` folder are allowed);
* a safetensors index naming missing shards, or tensors the shards do not hold (and the reverse), and
  tensors the architecture needs that no file holds / that the architecture does not have;
* truncated or corrupt headers (:mod:`calibra.io.safetensors_header`);
* pickle-only checkpoints unless ``allow_pickle`` (then they load with ``torch.load(weights_only=True)``).

:func:`load_model` then loads and names any parameter holding NaN/Inf (row 5).

Errors are :class:`ModelReadError` (a ``ValueError``) and say what is wrong, where, and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from calibra.io.errors import ModelReadError
from calibra.io.safetensors_header import FLOAT_DTYPES, ShardHeader, read_header

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# tensor name endings of packed/quantized checkpoints (GPTQ, AWQ, compressed-tensors, bitsandbytes, calibra)
_QUANT_SUFFIXES = (
    ".qweight",
    ".qzeros",
    ".g_idx",
    ".scales",
    ".weight_packed",
    ".weight_scale",
    ".weight_zero_point",
    ".weight_global_scale",
    ".SCB",
    ".absmax",
    ".quant_map",
    ".codes",
)
# buffers old checkpoints carry that no current architecture loads; harmless, not "extra tensors"
_IGNORED_EXTRA = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


@dataclass
class ModelFolder:
    """What :func:`inspect_model` found (no weight loaded)."""

    spec: str
    path: Path
    config: dict
    model_type: str
    weight_format: str
    """``"safetensors"`` or ``"pickle"``."""
    weight_files: list[Path]
    headers: dict[str, ShardHeader] = field(default_factory=dict)
    """file name -> header (safetensors only)."""
    quantized: str | None = None
    """Why the model looks quantized, or None."""

    @property
    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)

    @property
    def tensor_names(self) -> set[str]:
        return {n for h in self.headers.values() for n in h.tensors}


def _err(msg: str) -> ModelReadError:
    return ModelReadError(f"[model] {msg}")


# ---------------------------------------------------------------------------------------------- paths
def _hub_blobs(folder: Path) -> Path | None:
    """``<repo>/blobs`` when ``folder`` is a Hugging Face cache snapshot ``<repo>/snapshots/<rev>``."""
    if folder.parent.name == "snapshots":
        return folder.parent.parent / "blobs"
    return None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def safe_member(folder: Path, name: str, what: str) -> Path:
    """``folder / name`` after refusing absolute names, ``..`` and symlinks that leave ``folder``
    (FAULTS row 6): a crafted index must not make calibra read (or hash, or copy) files elsewhere."""
    if not isinstance(name, str) or not name:
        raise _err(f"{what} names an empty or non-string file {name!r}")
    if (
        os.path.isabs(name)
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
        or name.startswith(("/", "\\"))
    ):
        raise _err(
            f"{what} names {name!r}, an absolute path; shard names must be plain file names inside "
            f"the model folder {folder}"
        )
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise _err(f"{what} names {name!r}, which climbs out of the model folder with '..'; refusing to read it")
    path = folder / name
    root = folder.resolve()
    real = path.resolve()
    if not _inside(real, root):
        blobs = _hub_blobs(root)
        if not (blobs is not None and _inside(real, blobs.resolve())):
            raise _err(
                f"{what} {name!r} is a symlink to {real}, outside the model folder {root}; refusing to "
                f"follow it (copy the file into the folder if it is meant to be there)"
            )
    return path


# ---------------------------------------------------------------------------------------------- config
def read_config(folder: Path) -> dict:
    """config.json as a dict (row 1: missing, invalid JSON or not an object -> error)."""
    from calibra.models.registry import supported_architectures

    path = folder / "config.json"
    if not path.is_file():
        raise _err(
            f"{folder} has no config.json; give a Hugging Face model folder (config.json + weights). "
            f"Supported architectures: {', '.join(supported_architectures())}"
        )
    safe_member(folder, "config.json", "config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(f"{path} is not valid JSON ({e}); restore the file from the original checkpoint") from None
    if not isinstance(cfg, dict):
        raise _err(f"{path} holds a JSON {type(cfg).__name__}, not an object")
    return cfg


def check_architecture(cfg: dict, path: Path) -> str:
    from calibra.models.refusals import refusal
    from calibra.models.registry import supported_architectures

    model_type = cfg.get("model_type")
    reason = refusal(model_type, cfg)
    if reason is not None:
        arch = cfg.get("architectures")
        raise _err(
            f"{path}/config.json: unsupported architecture model_type={model_type!r}"
            + (f" ({', '.join(map(str, arch))})" if isinstance(arch, list) and arch else "")
            + f": {reason}; supported: {', '.join(supported_architectures())} (explicit adapters) and every "
            f"other causal-LM type of transformers by structure (docs/model_matrix.md)"
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        v = cfg.get(key, cfg.get("text_config", {}).get(key) if isinstance(cfg.get("text_config"), dict) else None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise _err(f"{path}/config.json: {key} must be a positive integer, got {v!r}")
    return model_type


def check_remote_code(cfg: dict, path: Path, trust_remote_code: bool) -> None:
    """Row 8: ``auto_map`` means the model's own Python code would run; only with the explicit flag."""
    if cfg.get("auto_map") and not trust_remote_code:
        raise _err(
            f"{path}/config.json has an auto_map ({', '.join(sorted(cfg['auto_map']))}): loading it runs "
            f"Python code shipped with the model. Read that code, then pass --trust-remote-code "
            f"(trust_remote_code=True) to allow it; or remove auto_map to use transformers' built-in "
            f"{cfg.get('model_type')!r} implementation"
        )


def quantization_reason(cfg: dict) -> str | None:
    for key in ("quantization_config", "compression_config", "quantization"):
        qc = cfg.get(key)
        if qc:
            method = qc.get("quant_method", qc.get("format", "?")) if isinstance(qc, dict) else "?"
            return f"its config.json has a {key} (quant_method {method!r})"
    return None


# ---------------------------------------------------------------------------------------------- weights
def _index_map(folder: Path, name: str) -> dict[str, str]:
    path = folder / name
    safe_member(folder, name, "index")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(f"{path} is not valid JSON ({e})") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise _err(f"{path} has no weight_map of tensor name -> shard file name")
    return wm


def _list(items, n: int = 12) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _find_weights(folder: Path, allow_pickle: bool) -> tuple[str, list[str], dict[str, str] | None]:
    """``(format, file names, weight_map or None)``."""
    if (folder / INDEX).is_file():
        wm = _index_map(folder, INDEX)
        files = sorted(set(wm.values()))
        for f in files:
            safe_member(folder, f, f"{INDEX}: shard")
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise _err(
                f"{folder}/{INDEX} names {len(missing)} shard(s) that are not in the folder: "
                f"{_list(missing)}; download them, or fix the index"
            )
        return "safetensors", files, wm
    if (folder / SINGLE).is_file():
        return "safetensors", [SINGLE], None
    others = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    if others and (folder / "quantization.json").is_file():
        return "safetensors", others, None  # calibra's own quantized folder (eval reads it)
    pickles = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if (folder / PICKLE_INDEX).is_file():
        wm = _index_map(folder, PICKLE_INDEX)
        pickles = sorted(set(wm.values()))
        missing = [f for f in pickles if not (safe_member(folder, f, f"{PICKLE_INDEX}: shard")).is_file()]
        if missing:
            raise _err(f"{folder}/{PICKLE_INDEX} names {len(missing)} missing shard(s): {_list(missing)}")
    if pickles:
        if not allow_pickle:
            raise _err(
                f"{folder} holds only pickle weights ({_list(pickles, 4)}). Unpickling can run arbitrary "
                f"code, so calibra refuses it by default: convert the checkpoint to safetensors, or pass "
                f"--allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True)"
            )
        return "pickle", pickles, None
    raise _err(f"{folder} has no weights: expected {SINGLE}, or {INDEX} with its shards")


def _check_index_vs_shards(folder: Path, wm: dict[str, str], headers: dict[str, ShardHeader]) -> None:
    """Row 2: every tensor of the index is in the shard it names, and every shard tensor is indexed."""
    missing = [f"{t} (in {f})" for t, f in wm.items() if t not in headers[f].tensors]
    extra = [f"{t} (in {f})" for f, h in headers.items() for t in h.tensors if wm.get(t) != f]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) listed in the index are missing from their shard: {_list(missing)}")
        if extra:
            parts.append(
                f"{len(extra)} tensor(s) in the shards are not in the index (or under another shard): {_list(extra)}"
            )
        raise _err(
            f"{folder}/{INDEX} does not match its shards: "
            + "; ".join(parts)
            + ". Re-download the checkpoint or regenerate the index"
        )


def quantized_tensors(headers: dict[str, ShardHeader]) -> list[str]:
    """Tensors that only a quantized checkpoint holds: packed/scale names, FP8/FP4, integer weights."""
    out = []
    for h in headers.values():
        for t in h.tensors.values():
            if (
                t.name.endswith(_QUANT_SUFFIXES)
                or t.dtype.startswith(("F8", "F4", "F6"))
                or (t.name.endswith(".weight") and t.dtype not in FLOAT_DTYPES)
            ):
                out.append(f"{t.name} ({t.dtype})")
    return out


def expected_tensors(folder: Path, trust_remote_code: bool = False) -> tuple[dict[str, set[str]], set[str]]:
    """``({in-memory name: its on-disk names}, optional in-memory names)`` of the architecture, from a
    weightless meta-device model. transformers 5 fuses some tensors in memory (MoE experts) and renames
    others, and saves them split/renamed, so a checkpoint may hold either form of each tensor.
    Optional: a tied lm_head (saved only once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from calibra.compat.transformers import saved_state

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    sd = model.state_dict()
    forms = {k: set(saved_state(model, {k: v})) for k, v in sd.items()}
    optional = set()
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    shared = out is not None and inp is not None and out.weight is inp.weight  # tied by a top-level flag too
    if shared or getattr(config.get_text_config(), "tie_word_embeddings", False):
        name = next((n for n, m in model.named_modules() if m is out), "lm_head")
        optional.add(f"{name}.weight")
    return forms, optional


def _check_expected(folder: Path, names: set[str], trust_remote_code: bool) -> None:
    """Row 2 for a single file too: tensors the architecture needs that no file holds (transformers would
    initialize them at random with a mere warning) and tensors no module takes."""
    forms, optional = expected_tensors(folder, trust_remote_code)
    missing = []
    for mem, disk in forms.items():
        if mem in optional or mem in names or (disk and disk <= names):
            continue
        missing += sorted(disk - names) if disk - {mem} else [mem]
    known = set(forms) | {d for disk in forms.values() for d in disk}
    extra = [n for n in names if n not in known and not n.endswith(_IGNORED_EXTRA)]
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} tensor(s) the architecture needs are in no weight file: {_list(missing)} "
                f"(they would be initialized at random)"
            )
        if extra:
            parts.append(
                f"{len(extra)} tensor(s) in the weight files belong to no module of the architecture: {_list(extra)}"
            )
        raise _err(
            f"{folder}: weights do not match config.json: "
            + "; ".join(parts)
            + ". Check that config.json belongs to these weights, or re-download the checkpoint"
        )


# ---------------------------------------------------------------------------------------------- API
def inspect_model(
    spec,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    allow_quantized: bool = False,
    check_tensors: bool = True,
    component: str = "model",
) -> ModelFolder:
    """Check the model folder of ``spec`` (``builtin:NAME`` or a path) without loading a weight.

    Raises :class:`ModelReadError` for every fault listed in the module docstring. ``allow_quantized``:
    the verb reads quantized checkpoints (eval); otherwise they are refused (row 10).
    ``check_tensors``: also compare the tensor names with the architecture (a meta-device model).
    ``component``: the ``[prefix]`` of error messages (the verb that reads the model).
    """
    try:
        return _inspect(spec, allow_pickle, trust_remote_code, allow_quantized, check_tensors)
    except ModelReadError as e:
        if component == "model":
            raise
        raise ModelReadError(str(e).replace("[model]", f"[{component}]", 1)) from None


def _inspect(spec, allow_pickle, trust_remote_code, allow_quantized, check_tensors) -> ModelFolder:
    from calibra.assets import resolve_model

    try:
        folder = resolve_model(str(spec))
    except FileNotFoundError as e:
        raise _err(str(e)) from None
    cfg = read_config(folder)
    model_type = check_architecture(cfg, folder)
    check_remote_code(cfg, folder, trust_remote_code)
    reason = quantization_reason(cfg)
    if reason and not allow_quantized:
        raise _err(
            f"{spec} is already quantized ({reason}). calibra compresses full-precision models only and "
            f"never re-quantizes silently: start from the original bf16/fp16/fp32 checkpoint"
        )
    for p in folder.iterdir():  # no file of the folder may lead outside it (tokenizer files included)
        if p.is_symlink():
            safe_member(folder, p.name, "file")
    fmt, names, wm = _find_weights(folder, allow_pickle)
    files = [folder / n for n in names]
    mf = ModelFolder(
        spec=str(spec),
        path=folder,
        config=cfg,
        model_type=model_type,
        weight_format=fmt,
        weight_files=files,
        quantized=reason,
    )
    if fmt == "safetensors":
        mf.headers = {n: read_header(folder / n) for n in names}
        if wm is not None:
            _check_index_vs_shards(folder, wm, mf.headers)
        q = quantized_tensors(mf.headers)
        if q:
            mf.quantized = mf.quantized or f"it holds quantized tensors ({_list(q, 4)})"
            if not allow_quantized:
                raise _err(
                    f"{spec} is already quantized (it holds packed/integer/FP8 weight tensors: "
                    f"{_list(q, 4)}). calibra compresses full-precision models only: start from the "
                    f"original bf16/fp16/fp32 checkpoint"
                )
        if check_tensors and not mf.quantized and not cfg.get("auto_map"):
            _check_expected(folder, mf.tensor_names, trust_remote_code)
    return mf


def check_model_finite(model, source: str = "model") -> None:
    """Row 5: name every parameter/buffer holding NaN or Inf (at load, before any work)."""
    import torch

    from calibra.finite import all_finite

    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "meta" and not all_finite(t):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            bad.append(f"{name} ({n_nan} NaN, {n_inf} Inf of {t.numel()})")
    if bad:
        raise _err(
            f"{source} has non-finite weights in {len(bad)} tensor(s): {_list(bad, 8)}. The checkpoint is "
            f"damaged (or was saved after a diverged training step); re-download or repair it"
        )


def _load_pickle(mf: ModelFolder, dtype, trust_remote_code: bool):
    """The opt-in pickle path: every file through ``torch.load(weights_only=True)`` (tensors and plain
    containers only: no code runs), then transformers builds the model from that state dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sd = {}
    for p in mf.weight_files:
        try:
            part = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise _err(
                f"{p}: torch.load(weights_only=True) refused or failed ({type(e).__name__}: {e}); the file is "
                f"corrupt or holds more than tensors"
            ) from None
        if isinstance(part, dict) and "state_dict" in part and isinstance(part["state_dict"], dict):
            part = part["state_dict"]
        if not isinstance(part, dict):
            raise _err(f"{p} does not hold a state dict (got {type(part).__name__})")
        sd.update(part)
    config = AutoConfig.from_pretrained(mf.path, local_files_only=True, trust_remote_code=trust_remote_code)
    cls = AutoModelForCausalLM._model_mapping[type(config)] if not trust_remote_code else None
    if cls is None:
        raise _err("pickle weights with remote code are not supported; convert the checkpoint to safetensors")
    model, info = cls.from_pretrained(None, config=config, state_dict=sd, dtype=dtype, output_loading_info=True)
    if info.get("missing_keys") or info.get("unexpected_keys"):
        raise _err(
            f"{mf.path}: pickle weights do not match config.json: missing {_list(info['missing_keys'])}; "
            f"unexpected {_list(info['unexpected_keys'])}"
        )
    return model


def load_model(
    spec,
    dtype="float32",
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    allow_quantized: bool = False,
    folder: ModelFolder | None = None,
):
    """``(model, tokenizer)`` after :func:`inspect_model` (pass its result as ``folder`` to skip a second
    check), NaN/Inf checked. Loading goes through :func:`calibra.assets.load_model` for safetensors."""
    import torch

    from calibra import assets

    mf = folder or inspect_model(
        spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, allow_quantized=allow_quantized
    )
    if mf.weight_format == "pickle":
        from transformers import AutoTokenizer

        dt = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        model = _load_pickle(mf, dt, trust_remote_code).eval()
        tokenizer = AutoTokenizer.from_pretrained(mf.path, local_files_only=True)
    else:
        kw = {"trust_remote_code": True} if trust_remote_code else {}
        model, tokenizer = assets.load_model(spec, dtype=dtype, **kw)
    check_model_finite(model, str(spec))
    return model, tokenizer


__all__ = [
    "ModelReadError",
    "ModelFolder",
    "inspect_model",
    "load_model",
    "check_model_finite",
    "safe_member",
    "read_config",
    "quantized_tensors",
    "expected_tensors",
]
