"""Two small measurements used by the training facts and the tests of the built-in models.

* :func:`perplexity` -- the held-out perplexity protocol quoted in each model's ``training.json``
  and in the README: every text is encoded without special tokens and followed by one
  end-of-text token, all of it is concatenated into one stream, the stream is cut into
  non-overlapping windows of ``seq_len`` tokens (a short tail is dropped), and the perplexity is
  ``exp`` of the mean next-token negative log-likelihood over every predicted position of every
  window (``seq_len - 1`` per window), computed in float32.
* :func:`expert_usage` -- for a Mixtral-style MoE, how many times each expert of each layer is
  among the router's top-k over the same kind of windows.

Deliberately tiny: a fuller evaluation module comes later. Only ``torch`` is imported, lazily;
the model and tokenizer are whatever the caller loaded.
"""

from __future__ import annotations

import math


def token_stream(tokenizer, texts) -> list[int]:
    """All ``texts`` encoded without special tokens, each followed by the end-of-text token (the
    evaluation protocol's own stream, so the two can never drift apart)."""
    from calibra.eval.windows import token_stream as eval_token_stream

    return eval_token_stream(tokenizer, texts)


def windows(ids: list[int], seq_len: int = 256, max_windows: int | None = None):
    """The stream cut into non-overlapping ``[n, seq_len]`` windows (a LongTensor); the tail is dropped."""
    import torch

    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"need at least {seq_len} tokens, got {len(ids)}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def perplexity(
    model, tokenizer, texts, seq_len: int = 256, max_windows: int | None = None, batch_size: int = 8
) -> float:
    """Held-out perplexity of ``model`` on ``texts`` (protocol in the module docstring)."""
    import torch

    x = windows(token_stream(tokenizer, texts), seq_len, max_windows)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            batch = x[i : i + batch_size].to(device)
            logits = model(input_ids=batch).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def expert_usage(
    model,
    tokenizer,
    texts,
    seq_len: int = 256,
    max_windows: int | None = None,
    batch_size: int = 8,
    only_windows=None,
    first_windows: bool = False,
):
    """``counts[layer][expert]``: how often each expert is among the router's top-k, per layer.

    ``only_windows``: measure only these window indices. With ``first_windows=True`` also return
    ``first[layer][expert]``, the first window index in which the expert is chosen (None if never).
    """
    import torch

    cfg = model.config
    n_exp = cfg.num_local_experts if hasattr(cfg, "num_local_experts") else cfg.num_experts
    top_k = cfg.num_experts_per_tok
    x = windows(token_stream(tokenizer, texts), seq_len, max_windows)
    index = torch.arange(x.shape[0]) if only_windows is None else torch.tensor(sorted(set(only_windows)))
    counts = None
    first = None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, index.numel(), batch_size):
            win = index[i : i + batch_size]
            out = model(input_ids=x[win], output_router_logits=True)
            per_layer = []
            for li, logits in enumerate(out.router_logits):
                idx = torch.topk(logits.float().reshape(-1, n_exp), top_k, dim=-1).indices
                per_layer.append(torch.bincount(idx.reshape(-1), minlength=n_exp))
                if first_windows:
                    first = first or [[None] * n_exp for _ in out.router_logits]
                    hit = torch.nn.functional.one_hot(idx, n_exp).sum(1).view(win.numel(), seq_len, n_exp).sum(1)
                    for e in range(n_exp):
                        rows = (hit[:, e] > 0).nonzero()
                        if first[li][e] is None and rows.numel():
                            first[li][e] = int(win[rows[0, 0]])
            layer_counts = torch.stack(per_layer)
            counts = layer_counts if counts is None else counts + layer_counts
    model.train(was_training)
    return (counts.tolist(), first) if first_windows else counts.tolist()
