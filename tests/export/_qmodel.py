"""Tiny QuantizedModels for the export tests: a random-weight Llama (or the built-in tiny-llama when
present) with a small byte-level BPE tokenizer trained here, quantized layer by layer with calibra's
RTN / GPTQ / MR-GPTQ solvers (GPTQ on a Hessian of random correlated activations)."""

from __future__ import annotations

import functools

import torch

from calibra.quant import MRGPTQConfig, RTNConfig, gptq_quantize, mr_gptq_quantize, rtn_quantize
from calibra.quant.model import QuantizedModel

VOCAB = 320


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from calibra.assets import builtin_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(builtin_texts("code")[:60], trainer)
    return tok.to_str()


def tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def tiny_llama(seed=0, hidden=64, inter=128, layers=2, dtype=torch.float32, tie=False, init=0.25):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        initializer_range=init,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    # dtype= at construction, not .to(dtype): .to would also cast RoPE's inv_freq buffer, which a loaded
    # checkpoint recomputes in float32, and the logits would differ for that reason alone
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def builtin_llama():
    """The built-in tiny-llama (float32) and its tokenizer, or None when not installed."""
    from calibra.assets import load_model

    try:
        return load_model("builtin:tiny-llama", dtype="float32")
    except FileNotFoundError:
        return None


def _hessian(n, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * 0.3 + torch.eye(n)
    x = torch.randn(4 * n, n, generator=g) @ mix
    x[:, :2] *= 5.0  # a few outlier channels make act-order's order non-trivial
    return x.T @ x, 4 * n


def quantize(model, tok, config, *, source="test:tiny-llama", targets=None, seed=0) -> QuantizedModel:
    """Quantize every Linear in the decoder layers (or ``targets``); weights -> effective dense weights."""
    layers = {}
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for i, name in enumerate(targets or names):
        mod = model.get_submodule(name)
        w = mod.weight.data
        if isinstance(config, RTNConfig):
            ql = rtn_quantize(w, config, name=name)
        else:
            h, n = _hessian(w.shape[1], seed + i)
            fn = mr_gptq_quantize if isinstance(config, MRGPTQConfig) else gptq_quantize
            ql = fn(w, h, n, config, name=name)
        mod.weight.data = ql.dense().to(w.dtype).clone()
        layers[name] = ql
    return QuantizedModel(
        model=model, tokenizer=tok, layers=layers, config=config, source=source, report={"seed": seed}
    )


def ids(batch=2, length=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()
