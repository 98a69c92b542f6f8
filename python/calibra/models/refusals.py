"""The model families calibra refuses, each with its reason -- decided from ``config.json`` alone, before
any weight is read (FAULTS row 1).

Every other causal-LM ``model_type`` of the installed transformers is accepted: an explicit adapter
(``explicit.ADAPTERS``) where a family's semantics need one, the structural adapter
(``structural.StructuralAdapter``) for the rest, which then checks the module tree itself (still on a
weightless copy) and refuses with its own reason when it finds no decoder layer stack.

The reasons form a short, documented list (docs/model_matrix.md): a refusal names one of ``REASONS``
and the detail for that family.
"""

from __future__ import annotations

REASONS = {
    "encoder-decoder": "an encoder-decoder model: calibra compresses decoder-only language models",
    "not-causal-lm": "not a causal language model of the installed transformers (no AutoModelForCausalLM class)",
    "encoder-only": "a bidirectional encoder with an LM head (is_decoder is false), not a decoder-only LM",
    "not-a-decoder-stack": "the model does not run its decoder layers one after another on the hidden states",
}

# model_type -> (reason key, detail). Families the structural adapter finds a stack in but whose layers
# are not a plain chain (each layer's output is the next one's input), so a layer-by-layer pass would
# compute something else than the model.
REFUSED: dict[str, tuple[str, str]] = {
    "hrm_text": ("not-a-decoder-stack", "hierarchical reasoning model: two stacks run in nested loops"),
    "xlm": ("not-a-decoder-stack", "attention and feed-forward blocks live in parallel lists, not in layers"),
    "xlnet": ("not-a-decoder-stack", "two-stream attention: every layer takes and returns two hidden streams"),
    "prophetnet": ("not-a-decoder-stack", "n-gram main/predict streams through each decoder layer"),
    "reformer": ("not-a-decoder-stack", "reversible layers take and return two hidden streams"),
    "blt": ("not-a-decoder-stack", "byte-latent: patcher, local encoder/decoder and a global stack in sequence"),
    "hy_v4": ("not-a-decoder-stack", "shared DSA layers take the top-k indices the previous layer's indexer computed"),
    "zaya": ("not-a-decoder-stack", "each layer takes the previous layer's router hidden states"),
    "kolibri1_1": ("not-a-decoder-stack", "each layer takes the index pool the previous layer returned"),
    "longcat_flash": ("not-a-decoder-stack", "each layer holds two attention/MLP sub-layers wired in its own loop"),
}

# BERT-style encoders that transformers also maps as causal LMs (``is_decoder=True`` makes them causal)
ENCODER_TYPES = frozenset(
    {
        "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
        "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl",
        "xmod",
    }
)  # fmt: skip


def refusal(model_type: str | None, config: dict | None = None) -> str | None:
    """The reason calibra refuses ``model_type`` (None when it is accepted), from the config alone."""
    if model_type in REFUSED:
        key, detail = REFUSED[model_type]
        return f"{REASONS[key]} ({detail})"
    if config is not None and config.get("is_encoder_decoder"):
        return REASONS["encoder-decoder"]
    if model_type in ENCODER_TYPES and not (config or {}).get("is_decoder"):
        return REASONS["encoder-only"]
    from calibra.models.explicit import ADAPTERS

    if model_type in ADAPTERS:
        return None
    if model_type not in causal_lm_types():
        return REASONS["not-causal-lm"]
    return None


def causal_lm_types() -> set[str]:
    """Every ``model_type`` that ``AutoModelForCausalLM`` maps in the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


__all__ = ["REASONS", "REFUSED", "refusal", "causal_lm_types"]
