"""Small models and a small tokenizer built locally, so the eval tests need no trained asset."""
from __future__ import annotations

import copy

import torch

from calibra import assets

EOS = "<|endoftext|>"


def train_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(assets.builtin_texts("calibration")[:40], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def make_llama(vocab_size: int, seed: int = 0, layers: int = 3, max_pos: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      initializer_range=0.1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


def perturbed(model, scale: float, layers=None, seed: int = 1):
    """A copy of ``model`` with Gaussian noise of relative size ``scale`` added to the weight
    matrices of the given decoder layers (all when None); same noise direction for every scale."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(out.model.layers):
            if layers is not None and i not in layers:
                continue
            for p in layer.parameters():
                if p.ndim == 2:
                    noise = torch.randn(p.shape, generator=gen)
                    p.add_(noise * scale * p.std())
    return out
