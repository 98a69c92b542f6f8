"""Measured, not assumed: the bytes a compressed cache holds and the quality it costs.

* :func:`measure_bytes` runs the same real tokens through the model twice -- once with transformers'
  ``DynamicCache``, once with :class:`~calibra.kv.cache.PCACache` -- and sums ``nbytes`` of the tensors
  each cache holds afterwards (keys, values, and the compressed cache's position ids).
* :class:`QualityProbe` is the evaluation of a compression run (``calibra.eval.session.EvalSession``):
  the uncompressed model's top-k log-probs on a token stream are collected once, then any number of
  plans are compared against them through :class:`~calibra.kv.model.KVCompressedLM` -- the forward pass
  that writes and reads K/V through the compressed cache, as generation does.
"""

from __future__ import annotations

import torch

from calibra.compat.transformers import dynamic_cache, with_cache
from calibra.kv.cache import PCACache
from calibra.kv.model import KVCompressedLM


def _dense_bytes(cache) -> dict[str, int]:
    k = sum(layer.keys.nbytes for layer in cache.layers if layer.keys is not None)
    v = sum(layer.values.nbytes for layer in cache.layers if layer.values is not None)
    return {"k": int(k), "v": int(v), "total": int(k + v)}


@torch.no_grad()
def measure_bytes(model, plan, input_ids: torch.Tensor) -> dict:
    """Cache bytes after a forward pass over ``input_ids [B, T]`` with a ``DynamicCache`` and with the
    compressed cache of ``plan``; ``ratio`` = compressed / dense, ``saving`` = 1 - ratio."""
    ids = input_ids.to(next(model.parameters()).device)
    if ids.dim() == 1:
        ids = ids[None]
    dense = dynamic_cache(model)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **with_cache(model, dense))
    comp = PCACache(model, plan)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **with_cache(model, comp))
    d = _dense_bytes(dense)
    c = comp.stored_bytes()
    c["total"] = c["k"] + c["v"] + c["positions"]
    return {
        "tokens": int(ids.numel()),
        "dense": d,
        "compressed": c,
        "ratio": c["total"] / d["total"],
        "saving": 1 - c["total"] / d["total"],
        "v_ratio": c["v"] / d["v"],
        "k_ratio": (c["k"] + c["positions"]) / d["k"],
    }


class QualityProbe:
    """Reference once on a token stream, then ``measure(plan)`` -> the report's ``eval`` block
    (``perplexity {baseline, compressed, increase}``, ``kl_divergence {...}``, ``protocol``)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        dataset="builtin",
        seq_len=None,
        stride=None,
        max_tokens=None,
        top_k: int = 64,
        progress: bool = True,
        label: str = "kv-compressed",
    ):
        from calibra.eval.session import EvalSession

        self.model = model
        self.session = EvalSession(
            model,
            tokenizer,
            dataset=dataset,
            seq_len=seq_len,
            stride=stride if stride is not None else seq_len,
            max_tokens=max_tokens,
            top_k=top_k,
            progress=progress,
            label=label,
            component="kv",
        )

    @property
    def ids(self) -> torch.Tensor:
        return self.session.ids

    def measure(self, plan) -> dict:
        return self.session.finish(KVCompressedLM(self.model, plan))

    def sample_window(self) -> torch.Tensor:
        """The first ``seq_len`` tokens of the stream: the input :func:`measure_bytes` uses."""
        return self.session.ids[: self.session.seq_len]


def metric_value(block: dict, metric: str) -> float:
    """The number a budget is about: ``ppl`` -> perplexity increase, ``kl`` -> mean KL(ref||cmp)."""
    return float(block["perplexity"]["increase"] if metric == "ppl" else block["kl_divergence"]["mean"])
