"""Perplexity with the strided sliding-window protocol (see :mod:`calibra.eval.windows`).

``ppl = exp(nll)`` where ``nll`` is the mean negative log-likelihood, in nats, of every scored
token, computed from float32 logits whatever dtype the model runs in; the sum is accumulated in
float64 so that the order of batches does not change the result beyond rounding of single terms.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from calibra.eval._forward import iter_scored
from calibra.eval.windows import plan_windows


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    stream_tokens: int  # tokens in the evaluated stream (after max_tokens)
    windows: int
    seq_len: int
    stride: int
    dataset: dict = field(default_factory=dict)  # name, version (content hash), documents
    reference: PerplexityResult | None = None  # the reference's perplexity on the same tokens
    attribution: object = None  # AttributionResult when asked for

    def to_dict(self) -> dict:
        return {"metric": "perplexity", **asdict(self)}


def perplexity_from_ids(
    model,
    ids,
    *,
    seq_len: int,
    stride: int,
    batch_size: int | None = None,
    progress: bool | None = None,
    dataset: dict | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on the token stream ``ids`` (1-D LongTensor or list of ints)."""
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    plan = plan_windows(ids.numel(), seq_len, stride)
    total, count = 0.0, 0
    for lp, targets in iter_scored(model, ids, plan, batch_size=batch_size, progress=progress, desc="perplexity"):
        total -= float(lp.gather(-1, targets[:, None]).double().sum())
        count += targets.numel()
    nll = total / count
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=count,
        stream_tokens=int(ids.numel()),
        windows=len(plan),
        seq_len=seq_len,
        stride=stride,
        dataset=dict(dataset or {}),
    )
