"""Run a causal LM over the protocol's windows and hand back fp32 log-probs of the scored positions.

Shared by perplexity, KL divergence and attribution so that all three score exactly the same
positions in the same order: two models iterated with :func:`iter_scored` over the same plan can
be zipped in lockstep.
"""

from __future__ import annotations

import inspect
import sys

from calibra.eval.windows import Window

#: how many bytes of fp32 logits (plus their log-softmax) one batch may hold; the batch size is
#: derived from it so that a 128k-vocab model does not allocate gigabytes per step.
LOGITS_BUDGET_BYTES = 256 * 1024 * 1024
MAX_BATCH = 8


def model_device(model):
    if hasattr(model, "iter_scored"):  # a model evaluated layer by layer (calibra.eval.streamed)
        return model.device
    for p in model.parameters():
        return p.device
    import torch

    return torch.device("cpu")


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def vocab_size(model) -> int:
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(v) if v else 32000


def batch_groups(plan: list[Window], batch_size: int | None, vocab: int):
    """Consecutive windows of equal length, at most ``batch_size`` per group (auto from the budget)."""
    group: list[Window] = []
    for w in plan:
        if group and (w.length != group[0].length or len(group) >= _batch_for(group + [w], batch_size, vocab)):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def _batch_for(group: list[Window], batch_size: int | None, vocab: int) -> int:
    if batch_size:
        return batch_size
    keep = max(w.scored for w in group) + 1
    per_window = keep * vocab * 4 * 2
    return max(1, min(MAX_BATCH, LOGITS_BUDGET_BYTES // max(per_window, 1)))


def iter_scored(
    model, ids, plan: list[Window], *, batch_size: int | None = None, progress: bool | None = None, desc: str = "eval"
):
    """Yield ``(logprobs, targets)`` per batch of windows: ``logprobs`` is ``[T, V]`` float32 (the
    log-softmax of the model's prediction for each scored token, in stream order), ``targets`` the
    ``[T]`` scored token ids (on the model's device). ``ids`` is the whole stream as a 1-D LongTensor.

    Only the logits of the positions that predict scored tokens are computed when the model takes
    ``logits_to_keep`` (every Hugging Face causal LM does), which halves the logits memory at the
    default ``stride = seq_len / 2``.
    """
    import torch

    own = getattr(model, "iter_scored", None)
    if own is not None:  # streamed from its shards, layer by layer (calibra.eval.streamed.StreamedLM)
        yield from own(ids, plan, batch_size=batch_size, progress=progress, desc=desc)
        return
    device = model_device(model)
    vocab = vocab_size(model)
    keep_arg = _accepts_logits_to_keep(model)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan), desc=desc, unit="win", leave=False)
        except ImportError:  # tqdm is a dependency, but a progress bar is never worth failing for
            bar = None
    ids = ids.to(device)
    # Grad mode is switched off per forward, never across the `yield`: a generator that yields inside
    # `with no_grad()` leaves grad disabled in its caller until it is closed (or garbage collected).
    for group in batch_groups(plan, batch_size, vocab):
        with torch.no_grad():
            x = torch.stack([ids[w.begin : w.end] for w in group])
            keep = max(w.scored for w in group) + 1
            kwargs = {"use_cache": False}
            if keep_arg and keep < x.shape[1]:
                kwargs["logits_to_keep"] = keep
            logits = model(input_ids=x, **kwargs).logits
            # the logits at position p predict token p + 1: the last `keep` positions predict the
            # last keep - 1 tokens (the final position predicts past the window and is dropped)
            logits = logits[:, -keep:-1] if logits.shape[1] >= keep else logits[:, :-1]
            rows = [logits[b, logits.shape[1] - w.scored :] for b, w in enumerate(group)]
            lp = torch.cat(rows).float().log_softmax(-1)
            targets = torch.cat([ids[w.score_from : w.end] for w in group])
            if not torch.isfinite(lp.gather(-1, targets[:, None])).all():
                raise FloatingPointError(
                    f"[eval] non-finite logits in tokens {group[0].begin}..{group[-1].end} of the eval "
                    "stream; the model overflows in its dtype (load it in float32) or its weights hold NaN/Inf"
                )
        yield lp, targets
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
