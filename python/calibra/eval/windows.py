"""The strided sliding-window protocol shared by perplexity and KL divergence.

The protocol is the one of the Hugging Face perplexity guide ("Perplexity of fixed-length
models"): the eval texts are encoded without special tokens and joined into one token stream
with the tokenizer's end-of-text token after every document; windows of ``seq_len`` tokens start
at ``0, stride, 2*stride, ...`` (the last one is cut at the end of the stream) and each window
scores only the tokens that no earlier window scored -- all of them for the first window, the
last ``stride`` for the others. A scored token is predicted from everything before it inside its
window, so with ``stride < seq_len`` every token but the first of the stream gets at least
``seq_len - stride`` tokens of context, and every position ``1 .. N-1`` is scored exactly once.

With ``stride == seq_len`` the windows do not overlap, and the first token of every window has
no context inside its window, so it is not scored (the guide's behaviour): ``N - windows``
tokens are scored.

Only ``torch`` is imported, lazily.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

from calibra.data.tokenize import encode_text

#: seq_len used when a model does not say how long its context is, and the cap on what it says
#: (a 128k-context model would otherwise get 128k-token windows: memory-hungry, and far beyond
#: what a comparable perplexity needs).
DEFAULT_SEQ_LEN_CAP = 2048


@dataclass(frozen=True)
class Window:
    """One window of the stream: tokens ``[begin, end)``; targets ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def plan_windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """The windows of the protocol for a stream of ``n_tokens`` tokens (see the module docstring)."""
    if seq_len < 2:
        raise ValueError(f"[eval] seq_len must be >= 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ValueError(
            f"[eval] stride must be in 1..seq_len ({seq_len}), got {stride}; "
            "use stride = seq_len for non-overlapping windows"
        )
    if n_tokens < 2:
        raise ValueError(
            f"[eval] the eval text has {n_tokens} token(s); at least 2 are needed "
            "to score one next-token prediction -- give a longer dataset"
        )
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        # a token is scored once, by the first window that contains it with some context
        score_from = max(prev_end, begin + 1)
        if end > score_from:
            out.append(Window(begin, end, score_from))
        prev_end = end
        if end == n_tokens:
            break
    return out


def token_stream(tokenizer, texts) -> list[int]:
    """All ``texts`` encoded without special tokens, each followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        warnings.warn("[eval] the tokenizer has no eos token; documents are joined without a separator", stacklevel=2)
    ids: list[int] = []
    for text in texts:
        ids.extend(encode_text(tokenizer, text))
        if eos is not None:
            ids.append(int(eos))
    return ids


def dataset_version(texts) -> str:
    """A short content hash of the eval texts: two reports with the same version scored the same text."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:12]


def default_seq_len(model) -> int:
    """The model's context length (``max_position_embeddings``), capped at :data:`DEFAULT_SEQ_LEN_CAP`."""
    cfg = getattr(model, "config", None)
    n = None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(n, int) and n > 1:
            break
        n = None
    return min(n, DEFAULT_SEQ_LEN_CAP) if n else DEFAULT_SEQ_LEN_CAP


def resolve_protocol(model, seq_len: int | None, stride: int | None, *, flag: str = "--seq-len") -> tuple[int, int]:
    """``(seq_len, stride)`` with the defaults filled in: the model's context capped at 2048, half of it.

    An explicit ``seq_len`` longer than the model's context is refused: positions past it were
    never trained and would make the perplexity meaningless.
    """
    ctx = default_seq_len(model)
    cfg_max = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if seq_len is None:
        seq_len = ctx
    elif isinstance(cfg_max, int) and seq_len > cfg_max:
        raise ValueError(
            f"[eval] seq_len {seq_len} exceeds the model's max_position_embeddings "
            f"{cfg_max}; pass {flag} {cfg_max} or less"
        )
    if stride is None:
        stride = max(1, seq_len // 2)
    return int(seq_len), int(stride)
