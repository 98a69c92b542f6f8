"""Evaluating inside a run must leave torch's grad mode as it found it (a pruned model may be fine-tuned
next): the eval generators once leaked inference mode into the whole process."""

from __future__ import annotations

import torch

import calibra
from calibra.prune import PruningConfig


def test_prune_with_eval_restores_grad_mode(llama_dir, calib):
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    calibra.prune(
        str(llama_dir),
        PruningConfig(method="wanda"),
        calib,
        evaluate=True,
        eval_max_tokens=200,
        eval_seq_len=64,
        progress=False,
        echo=None,
        device="cpu",
    )
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    x = torch.ones(3, requires_grad=True)
    (x * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_exact_kl_restores_grad_mode(llama_dir):
    from calibra.assets import load_model

    model, tok = load_model(str(llama_dir))
    calibra.evaluate(
        model, tokenizer=tok, metric="kl-divergence", reference=str(llama_dir), exact=True, max_tokens=150, seq_len=64
    )
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
