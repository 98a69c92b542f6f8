"""The evaluation block of a compression run's report: the uncompressed model's reference is collected
before compression, the compressed model is compared with it afterwards.

Shared by the model-level drivers (``calibra.quantize``, ``calibra.prune``), so report.json's ``eval``
block has one shape:
``protocol``, ``perplexity {baseline, compressed, increase}``, ``kl_divergence {mean, median, max,
direction, reverse, mode, top_k}``.
"""

from __future__ import annotations

import time

import torch

# A compression run's own evaluation scores the first 8192 held-out tokens by default: on the builtin
# models that is 64 windows of 256 per model (stride 128), about 10 s per pass on two CPU cores, which
# keeps the README quickstart (`calibra quantize` + export + eval) under a minute. It is a sanity check,
# not the quality table: the README's tables use the whole stream (benchmarks/quality_*.py), as does
# max_tokens=None (`--eval-max-tokens 0`).
REPORT_EVAL_TOKENS = 8192


class EvalSession:
    """Reference top-k logits of the uncompressed model on the held-out stream, then the comparison.

    ``label`` names the compressed model in the report's descriptions (``"pruned"``, ``"quantized"``).
    """

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
        label: str = "compressed",
        component: str = "eval",
    ):
        from calibra.eval import _texts, collect_reference, resolve_protocol
        from calibra.eval.windows import dataset_version, token_stream

        if tokenizer is None:
            raise ValueError(
                f"[{component}] evaluation needs the model's tokenizer (tokenizer=...), or turn evaluation off"
            )
        t0 = time.perf_counter()
        texts, name = _texts(dataset)
        ids = torch.tensor(token_stream(tokenizer, texts), dtype=torch.long)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        self.ids = ids
        self.label = label
        self.dataset = {"name": name, "version": dataset_version(texts), "documents": len(texts)}
        self.seq_len, self.stride = resolve_protocol(model, seq_len, stride)
        self.progress = progress
        self.ref = collect_reference(
            model, ids, seq_len=self.seq_len, stride=self.stride, top_k=top_k, progress=progress
        )
        self.seconds = time.perf_counter() - t0

    def finish(self, model) -> dict:
        """The report's ``eval`` block for ``model`` (the compressed one) against the reference."""
        from calibra.eval import compare

        t0 = time.perf_counter()
        r = compare(model, self.ref, self.ids, progress=self.progress, dataset=self.dataset)
        self.seconds += time.perf_counter() - t0
        return {
            "protocol": {
                "dataset": self.dataset,
                "seq_len": r.seq_len,
                "stride": r.stride,
                "windows": r.windows,
                "tokens_scored": r.tokens,
                "stream_tokens": r.stream_tokens,
                "description": f"strided sliding windows (stride = seq_len/2 by default), each token "
                f"scored once with up to seq_len - stride tokens of context; float32 "
                f"logits; KL per scored token between the uncompressed model (P) and the "
                f"{self.label} model (Q), top-k buckets (a lower bound of the exact KL)",
            },
            "perplexity": {
                "baseline": r.ppl_reference,
                "compressed": r.ppl_compressed,
                "increase": r.ppl_compressed - r.ppl_reference,
            },
            "kl_divergence": {
                "mean": r.kl_ref_cmp["mean"],
                "median": r.kl_ref_cmp["median"],
                "max": r.kl_ref_cmp["max"],
                "direction": f"KL(uncompressed || {self.label}), nats/token",
                "reverse": r.kl_cmp_ref,
                "mode": r.mode,
                "top_k": r.top_k,
            },
        }


__all__ = ["EvalSession", "REPORT_EVAL_TOKENS"]
