"""KL divergence between a reference model P and a compressed model Q on the same token windows.

Both models are scored on the positions of the strided protocol (:mod:`calibra.eval.windows`),
window batch by window batch; no full logits tensor ever outlives its batch and nothing is
written to disk.

Two modes:

* ``exact`` -- both models run on the same batch in lockstep and the full-vocabulary
  ``KL(P||Q) = sum_v P(v) (log P(v) - log Q(v))`` (and ``KL(Q||P)``) is taken per token.
* top-k (default, ``k = 64``) -- per position only the reference's ``k`` most likely tokens are
  kept (their log-probs and indices) plus the log of the remaining mass, a "rest" bucket. The
  compressed model's log-probs are read at the same indices and its own rest bucket is the mass
  outside them. The KL is taken between the two ``(k+1)``-bucket distributions.

  *The approximation.* Merging outcomes into buckets never increases a KL divergence (log-sum
  inequality / data processing), so the top-k value is a **lower bound** of the exact KL in both
  directions, and it grows monotonically with ``k`` (the top-k buckets are a coarsening of the
  top-k' buckets for k < k'), reaching the exact value at ``k = vocab``. The gap is the part of
  the divergence that lives in how each model spreads the tail mass among tokens the reference
  considers unlikely; for a trained model and ``k = 64`` it is small (measured in the tests and
  in the README). What top-k buys is that the reference can be reduced to ``T * (k+1)`` numbers
  (:class:`ReferenceTopK`), so it can be computed once and compared against many models -- the
  per-layer attribution does exactly that -- or computed before the compressed model is loaded.

Statistics reported per direction: mean, median and max over scored tokens (nats).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from calibra.eval._forward import iter_scored, model_device
from calibra.eval.windows import Window, plan_windows

DEFAULT_TOP_K = 64


# ------------------------------------------------------------------------------------ per-token math
def topk_buckets(lp, k: int):
    """``(idx, top, rest)`` of log-probs ``lp [T, V]``: the ``k`` largest (indices, log-probs) and the
    log of the remaining mass (``-inf`` when ``k == V``), computed as a logsumexp over the tokens
    outside the top ``k`` rather than ``log(1 - sum)``, which would lose every digit when the top-k
    mass is close to 1."""
    k = min(k, lp.shape[-1])
    top, idx = lp.topk(k, dim=-1)
    return idx, top, rest_logmass(lp, idx)


def rest_logmass(lp, idx):
    """log of the probability mass of ``lp [T, V]`` outside the indices ``idx [T, k]``."""
    return lp.scatter(-1, idx, float("-inf")).logsumexp(-1)


def _kl_rows(a, b):
    """``sum_j exp(a_j) (a_j - b_j)`` per row for log-distributions ``a``, ``b``; 0 log 0 = 0."""
    import torch

    pa = a.exp()
    term = torch.where(pa > 0, pa * (a - b), torch.zeros_like(a))
    return term.sum(-1)


def bucket_kl(p_top, p_rest, q_top, q_rest):
    """Per-token ``(KL(P||Q), KL(Q||P))`` on the (k+1)-bucket distributions (see the module docstring)."""
    import torch

    a = torch.cat([p_top, p_rest[:, None]], -1)
    b = torch.cat([q_top, q_rest[:, None]], -1)
    return _kl_rows(a, b), _kl_rows(b, a)


def exact_kl(lp, lq):
    """Per-token ``(KL(P||Q), KL(Q||P))`` over the full vocabulary from log-probs ``[T, V]``."""
    return _kl_rows(lp, lq), _kl_rows(lq, lp)


def token_stats(values) -> dict:
    """mean, median (the midpoint of the two middle values for an even count) and max of a 1-D tensor."""
    import torch

    v = values.double().flatten()
    s = torch.sort(v).values
    n = s.numel()
    median = float((s[(n - 1) // 2] + s[n // 2]) / 2)
    return {"mean": float(v.mean()), "median": median, "max": float(s[-1])}


# ------------------------------------------------------------------------------------------- results
@dataclass
class KLResult:
    kl_ref_cmp: dict  # KL(reference || compressed): mean, median, max over tokens (nats)
    kl_cmp_ref: dict  # KL(compressed || reference)
    mode: str  # "top-k" or "exact"
    top_k: int | None
    ppl_reference: float  # both perplexities on the very same scored tokens
    ppl_compressed: float
    tokens: int
    stream_tokens: int
    windows: int
    seq_len: int
    stride: int
    dataset: dict = field(default_factory=dict)
    attribution: object = None  # AttributionResult when asked for

    def to_dict(self) -> dict:
        return {"metric": "kl-divergence", **asdict(self)}


@dataclass
class ReferenceTopK:
    """The reference model reduced to what the top-k KL needs: per batch of windows, the top-k
    indices (int32) and log-probs, the rest-bucket log-mass, and the log-prob of the true next
    token (for the reference perplexity). ``T * (2k + 2)`` numbers for ``T`` scored tokens."""

    top_k: int
    plan: list[Window]
    batches: list[tuple]  # (idx int32 [T,k], top fp32 [T,k], rest fp32 [T], target_lp fp32 [T])
    stream_tokens: int
    seq_len: int
    stride: int
    batch_size: int | None

    @property
    def tokens(self) -> int:
        return sum(b[3].numel() for b in self.batches)

    def nll(self) -> float:
        return -sum(float(b[3].double().sum()) for b in self.batches) / self.tokens


def collect_reference(
    reference,
    ids,
    *,
    seq_len: int,
    stride: int,
    top_k: int = DEFAULT_TOP_K,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> ReferenceTopK:
    """Run the reference once over the windows and keep only its top-k per scored token."""
    import torch

    if top_k < 1:
        raise ValueError(f"[eval] top_k must be >= 1, got {top_k}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    plan = plan_windows(ids.numel(), seq_len, stride)
    batches = []
    for lp, targets in iter_scored(reference, ids, plan, batch_size=batch_size, progress=progress, desc="reference"):
        idx, top, rest = topk_buckets(lp, top_k)
        batches.append((idx.to(torch.int32), top, rest, lp.gather(-1, targets[:, None])[:, 0]))
    return ReferenceTopK(
        top_k=min(top_k, batches[0][1].shape[-1]),
        plan=plan,
        batches=batches,
        stream_tokens=int(ids.numel()),
        seq_len=seq_len,
        stride=stride,
        batch_size=batch_size,
    )


def compare(model, ref: ReferenceTopK, ids, *, progress: bool | None = None, dataset: dict | None = None) -> KLResult:
    """Top-k KL between a collected reference and ``model`` on the same windows."""
    import torch

    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() != ref.stream_tokens:
        raise ValueError(
            f"[eval] the reference was collected on {ref.stream_tokens} tokens, "
            f"the comparison got {ids.numel()}; use the same dataset and max_tokens"
        )
    device = model_device(model)
    pq, qp, nll_q = [], [], 0.0
    it = iter_scored(model, ids, ref.plan, batch_size=ref.batch_size, progress=progress, desc="compressed")
    for (lq, targets), (idx, top, rest, _) in zip(it, ref.batches):
        idx = idx.to(device=device, dtype=torch.long)
        q_top = lq.gather(-1, idx)
        a, b = bucket_kl(top.to(device), rest.to(device), q_top, rest_logmass(lq, idx))
        pq.append(a)
        qp.append(b)
        nll_q -= float(lq.gather(-1, targets[:, None]).double().sum())
    return _result(pq, qp, "top-k", ref.top_k, ref.nll(), nll_q / ref.tokens, ref.tokens, ref, dataset)


def kl_divergence_from_ids(
    reference,
    model,
    ids,
    *,
    seq_len: int,
    stride: int,
    top_k: int = DEFAULT_TOP_K,
    exact: bool = False,
    batch_size: int | None = None,
    progress: bool | None = None,
    dataset: dict | None = None,
) -> KLResult:
    """KL between ``reference`` and ``model`` on the stream ``ids``, both run in lockstep batch by
    batch (top-k or ``exact``); nothing but the per-token KL values is kept."""
    import torch

    if not exact and top_k < 1:
        raise ValueError(f"[eval] top_k must be >= 1, got {top_k}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    plan = plan_windows(ids.numel(), seq_len, stride)
    kw = dict(batch_size=batch_size, progress=progress)
    pq, qp, nll_p, nll_q, count, k_used = [], [], 0.0, 0.0, 0, None
    for (lp, t), (lq, _) in zip(
        iter_scored(reference, ids, plan, desc="reference", **kw),
        iter_scored(model, ids, plan, desc="compressed", **kw),
    ):
        lp = lp.to(lq.device)
        t = t.to(lq.device)
        if exact:
            a, b = exact_kl(lp, lq)
        else:
            idx, top, rest = topk_buckets(lp, top_k)
            k_used = idx.shape[-1]
            a, b = bucket_kl(top, rest, lq.gather(-1, idx), rest_logmass(lq, idx))
        pq.append(a)
        qp.append(b)
        nll_p -= float(lp.gather(-1, t[:, None]).double().sum())
        nll_q -= float(lq.gather(-1, t[:, None]).double().sum())
        count += t.numel()
    proto = ReferenceTopK(
        top_k=k_used or 0,
        plan=plan,
        batches=[],
        stream_tokens=int(ids.numel()),
        seq_len=seq_len,
        stride=stride,
        batch_size=batch_size,
    )
    return _result(
        pq,
        qp,
        "exact" if exact else "top-k",
        None if exact else k_used,
        nll_p / count,
        nll_q / count,
        count,
        proto,
        dataset,
    )


def _result(pq, qp, mode, top_k, nll_p, nll_q, count, ref: ReferenceTopK, dataset) -> KLResult:
    import torch

    return KLResult(
        kl_ref_cmp=token_stats(torch.cat(pq)),
        kl_cmp_ref=token_stats(torch.cat(qp)),
        mode=mode,
        top_k=top_k,
        ppl_reference=math.exp(nll_p),
        ppl_compressed=math.exp(nll_q),
        tokens=count,
        stream_tokens=ref.stream_tokens,
        windows=len(ref.plan),
        seq_len=ref.seq_len,
        stride=ref.stride,
        dataset=dict(dataset or {}),
    )
