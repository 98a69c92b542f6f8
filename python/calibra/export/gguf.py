"""GGUF for llama-architecture models (llama.cpp), Q4_0 or Q8_0, written with the ``gguf`` package
(``pip install calibra[gguf]``, imported only here and only when a GGUF export runs).

**GGUF re-quantizes.** Q4_0 and Q8_0 are llama.cpp's own block formats (32 values per block along the
row, one fp16 scale: Q8_0 ``x = d*q``, ``d = amax/127``; Q4_0 ``x = d*(q - 8)``, ``d = signed max /
-8``). They cannot hold calibra's codes, scales and zero points in general, so the exporter quantizes
calibra's *effective* dense weights (``QuantizedLayer.dense()``, which the simulated model already
holds) to the GGUF block format: the file computes a GGUF quantization of the calibra-compressed
weights, a different quantization from the QuantizedLayer's (even an int4 symmetric group-32 layer
lands on a different grid: calibra's scale is amax/7.5 with codes 0..15 round-to-nearest, Q4_0's is
signed-max/-8). The manifest and model card say so and record the extra error this adds
(``requant_nmse``: relative squared error of the GGUF weights against the effective weights).

Tensors (FORMATS.md section 5): the layers calibra quantized are stored as Q4_0/Q8_0; embeddings
and ``output.weight`` as F16 (F32 when the model is float32), norms as F32. Q and K weights are
permuted from Hugging Face's rotate-half layout to llama.cpp's interleaved RoPE layout. The
tokenizer (byte-level BPE from ``tokenizer.json``) is written as ``tokenizer.ggml.model = gpt2`` with
``tokenizer.ggml.pre = gpt-2`` (GPT-2's split regex).
"""

from __future__ import annotations

import json
import re

import torch

from calibra.export import _common
from calibra.export.writer import ExportError, write_card

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(
            "[export] GGUF export needs the gguf package: pip install 'calibra[gguf]' (gguf==0.19.0)"
        ) from e
    return gguf


def gguf_name(hf: str) -> str | None:
    if hf in _TOP_MAP:
        return _TOP_MAP[hf]
    m = _LAYER_RE.match(hf)
    if m and m.group(2) in _LAYER_MAP:
        return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    return None


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotate-half (HF) rows -> interleaved pairs (llama.cpp), as llama.cpp's converter does."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    rtype = rp.get("rope_type", "default")
    scaling = getattr(cfg, "rope_scaling", None)
    if rtype != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise ExportError(
            f"[export] gguf: rope type {rtype!r} / scaling {scaling!r} is not written by this "
            f"exporter (only default RoPE); export 'dense' and convert with llama.cpp"
        )
    return float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def width_problem(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why a Linear of this shape cannot be stored as Q4_0/Q8_0, or None: llama.cpp's blocks are 32 values
    of one row, so in_features must be a multiple of 32 (whatever calibra's own group was); such a layer is
    kept dense (written F16/F32)."""
    if in_features % 32:
        return f"in_features {in_features}: GGUF Q4_0/Q8_0 blocks are 32 values of a row"
    return None


class _GGUFFormat:
    def __init__(self, qtype: str):
        self.qtype = qtype  # "Q4_0" / "Q8_0"
        self.NAME = f"gguf-{qtype.lower()}"

    width_problem = staticmethod(width_problem)

    def versions(self) -> dict:
        return {"gguf": getattr(_gguf(), "__version__", None) or _pkg_version("gguf")}

    def check(self, qmodel) -> None:
        name = self.NAME
        _common.refuse_rotation(qmodel, name)
        _common.refuse_experts(qmodel, name)
        cfg = qmodel.model.config
        if getattr(cfg, "model_type", None) != "llama":
            raise ExportError(
                f"[export] {name} is written for the llama architecture only, the model is "
                f"{getattr(cfg, 'model_type', None)!r}; export 'dense' and convert it with llama.cpp"
            )
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise ExportError(f"[export] {name}: attention/MLP biases are not written by this exporter")
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if hd * cfg.num_attention_heads != cfg.hidden_size:
            raise ExportError(f"[export] {name}: head_dim {hd} x heads != hidden_size; not supported")
        _rope_theta(cfg)
        if qmodel.tokenizer is None or not hasattr(qmodel.tokenizer, "backend_tokenizer"):
            raise ExportError(
                f"[export] {name} needs the model's fast (tokenizer.json) tokenizer for the vocabulary; "
                f"the QuantizedModel has none"
            )
        tok = json.loads(qmodel.tokenizer.backend_tokenizer.to_str())
        pre = tok.get("pre_tokenizer") or {}
        if (
            tok.get("model", {}).get("type") != "BPE"
            or pre.get("type") != "ByteLevel"
            or not pre.get("use_regex", True)
        ):
            raise ExportError(
                f"[export] {name}: only byte-level BPE tokenizers with GPT-2's split (a plain ByteLevel "
                f"pre-tokenizer) are written, got model {tok.get('model', {}).get('type')} with "
                f"pre-tokenizer {pre.get('type')}; export 'dense' and use llama.cpp's converter"
            )
        bad = [n for n, l in qmodel.layers.items() if width_problem(*l.codes.shape, l.group_size)]
        if bad:
            raise ExportError(
                f"[export] {name}: {self.qtype} blocks need in_features divisible by 32; not: {', '.join(bad)}; "
                f"quantize with --export {name} (those layers are then kept dense, recorded in report.json)"
            )
        unknown = [k for k in _common.dense_state(qmodel) if gguf_name(k) is None]
        if unknown:
            raise ExportError(f"[export] {name}: tensors with no llama GGUF name: {', '.join(unknown[:5])}")

    # -----------------------------------------------------------------------------------------
    def _vocab(self, tokenizer):
        tok = json.loads(tokenizer.backend_tokenizer.to_str())
        vocab = dict(tok["model"]["vocab"])
        added = {a["id"]: a for a in tok.get("added_tokens", [])}
        for i, a in added.items():
            vocab[a["content"]] = i
        n = max(vocab.values()) + 1
        tokens = [f"[PAD{i}]" for i in range(n)]
        types = [5] * n  # UNUSED for holes
        for t, i in vocab.items():
            tokens[i] = t
            types[i] = 1
        for i, a in added.items():
            types[i] = 3 if a.get("special") else 4  # CONTROL / USER_DEFINED
        merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
        return tokens, types, merges

    def write(self, qmodel, folder, *, max_shard_bytes=None) -> dict:
        self.check(qmodel)
        gguf = _gguf()
        qt = getattr(gguf.GGMLQuantizationType, self.qtype)
        model, cfg = qmodel.model, qmodel.model.config
        dense_dt = gguf.GGMLQuantizationType.F32 if model.dtype == torch.float32 else gguf.GGMLQuantizationType.F16
        fname = f"model-{self.qtype.lower()}.gguf"
        w = gguf.GGUFWriter(str(folder / fname), "llama")
        w.add_name(str(qmodel.source))
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(int(cfg.num_hidden_layers))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(int(cfg.num_attention_heads))
        w.add_head_count_kv(int(cfg.num_key_value_heads))
        w.add_rope_dimension_count(int(cfg.hidden_size // cfg.num_attention_heads))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_file_type(int(getattr(gguf.LlamaFileType, f"MOSTLY_{self.qtype}")))
        tokens, types, merges = self._vocab(qmodel.tokenizer)
        w.add_tokenizer_model("gpt2")
        # "gpt-2" selects GPT-2's split regex in llama.cpp, the one a ByteLevel(use_regex=True) pre-tokenizer
        # uses; llama.cpp's "default" adds punctuation and digit splits and would tokenize differently
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        tk = qmodel.tokenizer
        for attr, fn in (
            ("bos_token_id", w.add_bos_token_id),
            ("eos_token_id", w.add_eos_token_id),
            ("pad_token_id", w.add_pad_token_id),
            ("unk_token_id", w.add_unk_token_id),
        ):
            if getattr(tk, attr, None) is not None:
                fn(int(getattr(tk, attr)))
        w.add_add_bos_token(bool(getattr(tk, "add_bos_token", False)))

        quantized = _common.quantized_weight_keys(qmodel)
        err_num = err_den = 0.0
        for hf, t in _common.dense_state(qmodel).items():
            name = gguf_name(hf)
            t = t.detach().float().cpu()
            if name.endswith("attn_q.weight"):
                t = permute_qk(t, cfg.num_attention_heads)
            elif name.endswith("attn_k.weight"):
                t = permute_qk(t, cfg.num_key_value_heads)
            arr = t.numpy()
            if hf in quantized:
                data = gguf.quants.quantize(arr, qt)
                back = gguf.quants.dequantize(data, qt).reshape(arr.shape)
                err_num += float(((back - arr) ** 2).sum())
                err_den += float((arr**2).sum())
                w.add_tensor(name, data, raw_dtype=qt)
            elif t.dim() == 1:
                w.add_tensor(name, arr)  # norms: F32
            elif dense_dt == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, arr.astype("float16"))
            else:
                w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        nmse = err_num / err_den if err_den else 0.0
        body = (
            f"llama.cpp GGUF ({self.qtype}) of a calibra-compressed model.\n\n"
            f"GGUF {self.qtype} is llama.cpp's own block format: the exporter re-quantized calibra's effective "
            f"(dequantized) weights to it, so this file is a different quantization than calibra's "
            f"(relative squared error added by the re-quantization: {nmse:.3e}).\n\n"
            f'```sh\nllama-simple -m {fname} "Hello"\n```'
        )
        write_card(
            folder,
            title=f"{qmodel.source} ({self.qtype}, GGUF)",
            base_model=str(qmodel.source),
            library_name="gguf",
            tags=["gguf", self.qtype.lower(), "calibra"],
            settings=dict(_common.base_card_settings(qmodel, self.NAME), requant_nmse=float(f"{nmse:.6e}")),
            body=body,
        )
        return {
            "checkpoint": {
                "format": f"gguf-{self.qtype.lower()}",
                "file": fname,
                "requantized": True,
                "requant_nmse": float(f"{nmse:.6e}"),
            }
        }


def _pkg_version(name: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


Q4_0 = _GGUFFormat("Q4_0")
Q8_0 = _GGUFFormat("Q8_0")
