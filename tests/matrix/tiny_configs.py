"""Tiny random configurations of every causal-LM ``model_type`` the installed transformers ships.

Each config is the config class's own defaults (no network, no checkpoint) with every size shrunk by
attribute name -- hidden size, layers, heads, key/value heads, MLP and expert widths, experts, vocab --
and every per-layer list cut to the new depth, so a model of any family builds in milliseconds. Nested
configs (``text_config``, ``vision_config``, ...) are shrunk the same way. The names are the ones
transformers' config classes use across families; a family whose defaults do not shrink consistently
fails to build, and the matrix records that as a failure of the generator, not of calibra.
"""

from __future__ import annotations

import copy

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2
MAX_LAYERS = 8  # hybrids whose first attention layer comes late
INTERMEDIATE = 96
EXPERTS = 4
VOCAB = 512
SEED = 0

_HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "dim", "model_dim", "word_embed_proj_dim")
_LAYER_KEYS = ("num_blocks", "num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
_HEAD_KEYS = ("mamba_n_heads", "num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads")
_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "num_kv")
_INTER_KEYS = (
    "intermediate_size",
    "ffn_dim",
    "n_inner",
    "decoder_ffn_dim",
    "ffn_hidden_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "expert_intermediate_size",
    "moe_ffn_hidden_size",
    "ffn_size",
    "inner_hidden_size",
    "expert_hidden_size",
)
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
_HEAD_DIM_KEYS = ("mamba_d_head", "head_dim", "attention_head_dim", "kv_channels", "head_size")
# multi-head latent attention (DeepSeek-V2/V3 and relatives)
# (every projection width a multiple of 32, as GPTQ's kernels require: the matrix exports GPTQ too)
# (a sparse-attention indexer's head holds the rotary part and more: DeepSeek-V3.2, GLM-MoE-DSA)
_MLA = {
    "kv_lora_rank": 32,
    "q_lora_rank": 64,
    "qk_rope_head_dim": 32,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "index_head_dim": 64,
}
_SMALL = {
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "moe_top_k": 2,
    "num_experts_per_token": 2,
    "rotary_dim": HEAD_DIM // 2,
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    "moe_topk": 2,
    "top_k": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "max_window_layers": LAYERS,
    "num_codebooks": None,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _set(**values):
    def fix(config):
        for k, v in values.items():
            setattr(config, k, v)

    return fix


def _dbrx(config):
    # transformers' own DbrxConfig() does not build: the attention reads attn_config.rope_theta
    config.attn_config.rope_theta = 10000.0
    config.attn_config.clip_qkv = 8.0


# shrunk defaults that need one more consistent value, by model_type (each a limit of the generic shrink)
_FAMILY_FIXES = {
    "dbrx": _dbrx,
    "bamba": _set(attn_layer_indices=[1]),  # attention at layer 1 of 2
    # its default is all-Mamba, which transformers' own mask code refuses: one Mamba and one attention layer
    "granitemoehybrid": _set(layer_types=["linear_attention", "full_attention"]),
    "recurrent_gemma": _set(num_hidden_layers=3),  # one (recurrent, recurrent, attention) cycle
    "mamba2": _set(n_groups=1, expand=1),  # heads x head_dim must equal expand x hidden
}

_WIDTH_PATTERNS = ("intermediate", "dim_ff", "ffn", "_rank", "inner")
_KEEP = ("vocab_size", "max_position_embeddings", "n_positions", "sliding_window")

_NAMED = {*_HIDDEN_KEYS, *_LAYER_KEYS, *_HEAD_KEYS, *_KV_KEYS, *_INTER_KEYS, *_EXPERT_KEYS, *_HEAD_DIM_KEYS}

_UNSET_OK = ("num_experts_per_tok", "n_group", "topk_group")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def shrink(config, *, nested: bool = False):
    """A copy of ``config`` with every size made tiny (see the module docstring)."""
    config = copy.deepcopy(config)
    d = config.to_dict()
    old_layers = next((d[k] for k in _LAYER_KEYS if _is_int(d.get(k))), None)

    def put(key, value):
        if key in d and (d[key] is None or _is_int(d[key])):
            if value is None and _is_int(d[key]):
                return
            setattr(config, key, value)

    for k in _HIDDEN_KEYS:
        if _is_int(d.get(k)) and d[k] > HIDDEN:
            put(k, HIDDEN)
    for k in _LAYER_KEYS:
        if _is_int(d.get(k)) and d[k] > LAYERS:
            put(k, LAYERS)
    for k in _HEAD_KEYS:
        if _is_int(d.get(k)) and d[k] > HEADS:
            put(k, HEADS)
    for k in _KV_KEYS:
        if _is_int(d.get(k)) and d[k] > KV_HEADS:
            put(k, KV_HEADS)
    for k in _INTER_KEYS:
        if _is_int(d.get(k)) and d[k] > INTERMEDIATE:
            put(k, INTERMEDIATE)
    for k in _EXPERT_KEYS:
        if _is_int(d.get(k)) and d[k] > EXPERTS:
            put(k, EXPERTS)
    for k in _HEAD_DIM_KEYS:
        if _is_int(d.get(k)) and d[k] > HEAD_DIM:
            put(k, HEAD_DIM)
    # any other width by its name's pattern (family-specific MLP, shared-expert and low-rank widths)
    for k, v in d.items():
        if not _is_int(v) or k in _KEEP or k in _NAMED:
            continue
        low = k.lower()
        if ("head_dim" in low or "dim_head" in low or "headdim" in low) and v > HEAD_DIM:
            put(k, HEAD_DIM)
        elif ("hidden_size" in low or low.endswith("embedding_dim")) and v > HIDDEN:
            put(k, HIDDEN)  # another name of the model width (RWKV's attention_hidden_size, xLSTM's embedding_dim)
        elif any(p in low for p in _WIDTH_PATTERNS) and v > INTERMEDIATE:
            put(k, INTERMEDIATE)
    for k, v in _MLA.items():
        if _is_int(d.get(k)) and d[k] > v:
            put(k, v)
    for k, v in _SMALL.items():
        if k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if _is_int(d.get(k)) and d[k] >= VOCAB:
                put(k, v)
            continue
        if _is_int(d.get(k)) and v is not None and d[k] > v:
            put(k, v)
        elif k in _UNSET_OK and k in d and d[k] is None:
            put(k, v)  # a MoE config whose defaults leave top-k unset
    if "head_dim" in d and d["head_dim"] is None:
        put("head_dim", HEAD_DIM)
    if _is_int(d.get("qk_rope_head_dim")) and "head_dim" in d:
        config.head_dim = config.qk_rope_head_dim  # MLA: the rotary part is the "head_dim"
    if _is_int(d.get("kv_lora_rank")) and _is_int(d.get("num_key_value_heads")):
        config.num_key_value_heads = config.num_attention_heads  # MLA keys have every head
    # per-layer lists (layer_types, sliding-window patterns, MoE layer masks): keep the layers where each
    # kind of layer first appears (a hybrid keeps an attention layer), the same layers from every list
    if old_layers and old_layers > LAYERS:
        lists = {k: v for k, v in d.items() if isinstance(v, list) and len(v) == old_layers}
        keep: set[int] = set()
        for v in lists.values():
            first: dict[str, int] = {}
            for i, x in enumerate(v):
                first.setdefault(repr(x), i)
            keep.update(first.values())
        keep = sorted(keep)[:MAX_LAYERS]
        for i in range(old_layers):
            if len(keep) >= LAYERS:
                break
            if i not in keep:
                keep = sorted([*keep, i])
        per_layer = d.get("per_layer_config")
        if isinstance(per_layer, dict) and per_layer:  # heterogeneous layers: keep one of each, re-indexed
            extra = sorted(int(i) for i in per_layer)[:1]
            keep = sorted(set(keep) | {i for i in extra if i < old_layers})[:MAX_LAYERS]
            config.per_layer_config = {keep.index(int(i)): v for i, v in per_layer.items() if int(i) in keep}
        if lists or isinstance(per_layer, dict):
            for k in _LAYER_KEYS:
                if _is_int(d.get(k)):
                    put(k, len(keep))
            for k, v in lists.items():
                setattr(config, k, [v[i] for i in keep])
    if "mamba_expand" in d and "mamba_n_heads" in d:
        put("mamba_expand", 1)  # Mamba-2 heads x head size must equal expand x hidden (4 x 16 = 1 x 64)
        if _is_int(d.get("mamba_d_ssm")):
            put("mamba_d_ssm", HIDDEN)
    for k, fix in _FAMILY_FIXES.items():
        if getattr(config, "model_type", None) == k:
            fix(config)
    for k, v in d.items():
        if isinstance(v, dict) and "model_type" in v:
            sub = getattr(config, k, None)
            if sub is not None and hasattr(sub, "to_dict"):
                setattr(config, k, shrink(sub, nested=True))
    if not nested:
        for attr in ("_attn_implementation",):
            try:
                setattr(config, attr, "eager")
            except Exception:  # noqa: BLE001 - some configs make it read-only
                pass
    return config


def causal_lm_types() -> list[str]:
    """Every ``model_type`` that ``AutoModelForCausalLM`` maps in the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING

    return shrink(CONFIG_MAPPING[model_type]())


def tiny_model(model_type: str, seed: int = SEED):
    """A seeded tiny random ``AutoModelForCausalLM`` of ``model_type`` in float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
