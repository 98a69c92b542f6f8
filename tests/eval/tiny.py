"""Small models and a small tokenizer built locally, so the eval tests need no trained asset."""

from __future__ import annotations

import copy
import math

import torch

from calibra import assets

EOS = "<|endoftext|>"


def train_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(assets.builtin_texts("code")[:40], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def make_llama(vocab_size: int, seed: int = 0, layers: int = 3, max_pos: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
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


def direct_perplexity(model, ids, seq_len, stride):
    """The Hugging Face perplexity guide's loop, written out: one window at a time through
    ``model(input_ids, labels=...)`` with the already-scored labels masked to -100; each window's
    mean loss is weighted by the number of labels that really entered it (after the shift)."""
    n = ids.numel()
    nll_sum, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + seq_len, n)
            trg_len = end - prev_end
            x = ids[None, begin:end]
            y = x.clone()
            y[:, :-trg_len] = -100
            valid = int((y[:, 1:] != -100).sum())
            if valid:
                loss = model(input_ids=x, labels=y).loss
                nll_sum += float(loss) * valid
                count += valid
            prev_end = end
            if end == n:
                break
    return math.exp(nll_sum / count), count
