"""Calibration texts -> fixed-length token samples with an attention mask.

Two packings (``CalibrationConfig.packing``):

* ``"concat"`` (default): texts, in a seeded random order, are joined with the EOS token between
  them and cut into ``sequence_length`` chunks. Every sample is full length unless the data runs
  out, when the last one is padded. If the tokenizer adds a prefix of special tokens by default
  (a BOS), every chunk starts with that prefix, as every sequence does at inference time.
* ``"truncate"``: one text per sample (seeded order), encoded the tokenizer's default way
  (special tokens included), truncated to ``sequence_length`` and right-padded.

Padding is on the right and ``attention_mask`` is False exactly at padding positions. In a causal
model a real token only attends to earlier positions, all of them real under right padding, so its
activations are those of the unpadded sequence; a Hessian accumulated over the rows where the mask is
True is therefore the Hessian of the same tokens unpadded (tests/test_data.py checks this on a model).

Determinism: the order comes from ``random.Random(seed)``; the fingerprint (sha256 over shape,
input_ids and mask bytes) identifies the exact tokens, so a stats file can tell when data changed.
"""

from __future__ import annotations

import hashlib
import logging
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from calibra.data.config import DEFAULT_SEQUENCE_CAP, CalibrationConfig
from calibra.data.dataset import CalibrationDataset

__all__ = ["TokenizedCalibration", "tokenize_calibration", "pad_token_id", "fingerprint"]

log = logging.getLogger("calibra.data")


@dataclass(frozen=True, eq=False)
class TokenizedCalibration:
    """Fixed-length calibration samples.

    Attributes:
        input_ids: int64 ``[S, L]``, right-padded with ``pad_id`` where a sample is short.
        attention_mask: bool ``[S, L]``, False exactly at padding positions.
        token_count: real (unpadded) tokens, ``attention_mask.sum()``.
        dataset, version: the dataset's name and version (content hash).
        seed: the seed that chose and ordered the samples.
        fingerprint: sha256 hex over the shape, input_ids and attention_mask bytes.
        pad_id: the id used for padding (the tokenizer's pad, else EOS, else 0).
        packing: ``"concat"`` or ``"truncate"``.
        requested_tokens: ``num_samples * sequence_length`` as configured.
        num_texts: texts read after de-duplication; num_duplicates / num_empty: texts dropped.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_count: int
    dataset: str
    version: str
    seed: int
    fingerprint: str
    pad_id: int = 0
    packing: str = "concat"
    requested_tokens: int = 0
    num_texts: int = 0
    num_duplicates: int = 0
    num_empty: int = 0

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def sequence_length(self) -> int:
        return int(self.input_ids.shape[1])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(ids [b, L], mask [b, L])`` in sample order; the last batch may be smaller."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"[data] batch_size must be an int >= 1, got {batch_size!r}")
        for start in range(0, self.num_samples, batch_size):
            yield (self.input_ids[start : start + batch_size], self.attention_mask[start : start + batch_size])

    def summary(self) -> str:
        pad = self.num_samples * self.sequence_length - self.token_count
        return (
            f"calibration data {self.dataset!r} ({self.version}): {self.num_samples} samples x "
            f"{self.sequence_length} tokens, {self.token_count} real tokens, {pad} padding, "
            f"packing={self.packing}, seed={self.seed}, {self.num_duplicates} duplicate texts "
            f"removed, fingerprint {self.fingerprint[:16]}"
        )


def fingerprint(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"calibra-calibration-v1 {tuple(input_ids.shape)}".encode())
    h.update(input_ids.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
    h.update(attention_mask.to(torch.uint8).contiguous().numpy().tobytes())
    return h.hexdigest()


def _first_id(v):
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def pad_token_id(tokenizer) -> int:
    """The pad id: the tokenizer's pad token, else its EOS (the usual choice for decoder-only
    models, which have no pad token), else 0. Deterministic; padding positions are masked anyway,
    so the choice never changes a statistic."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = _first_id(getattr(tokenizer, attr, None))
        if v is not None:
            return v
    return 0


def encode_text(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text``. Works with transformers tokenizers and raw ``tokenizers.Tokenizer``;
    never touches the network (the tokenizer is already loaded). ``verbose=False`` because documents
    are longer than the model's context on purpose: they are chunked afterwards, and transformers'
    "longer than the specified maximum sequence length" warning would only mislead."""
    try:
        out = tokenizer.encode(text, add_special_tokens=add_special_tokens, verbose=False)
    except TypeError:  # tokenizers.Tokenizer.encode has no `verbose`
        out = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if hasattr(out, "ids"):
        out = out.ids
    return [int(t) for t in out]


def _special_prefix(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts in front of every text by default (usually [BOS] or [])."""
    probe = "calibration"
    plain = encode_text(tokenizer, probe, False)
    full = encode_text(tokenizer, probe, True)
    if plain and len(full) > len(plain):
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return full[:i]
    return []


def _dedup(texts: list[tuple[str, bool]], enabled: bool):
    kept, seen, dups, empty = [], set(), 0, 0
    for text, is_chat in texts:
        key = " ".join(text.split())
        if not key:
            empty += 1
            continue
        if enabled:
            if key in seen:
                dups += 1
                continue
            seen.add(key)
        kept.append((text, is_chat))
    return kept, dups, empty


def _pack_concat(order, tokenizer, S: int, L: int):
    eos = _first_id(getattr(tokenizer, "eos_token_id", None))
    prefix = _special_prefix(tokenizer)
    body = L - len(prefix)
    if body < 1:
        raise ValueError(
            f"[data] sequence_length {L} leaves no room after the tokenizer's "
            f"{len(prefix)} prefix token(s); use sequence_length > {len(prefix)}"
        )
    need = S * body
    stream: list[int] = []
    for text, _is_chat in order:
        if len(stream) >= need:
            break  # enough data: the remaining texts are never tokenized
        ids = encode_text(tokenizer, text, False)
        if not ids:
            continue
        if stream and eos is not None:
            stream.append(eos)
        stream.extend(ids)
    rows = []
    for start in range(0, min(len(stream), need), body):
        rows.append(prefix + stream[start : start + body])
    return rows


def _pack_truncate(order, tokenizer, S: int, L: int):
    rows = []
    for text, is_chat in order:
        if len(rows) >= S:
            break
        # A rendered chat already carries the template's special tokens; add none on top.
        ids = encode_text(tokenizer, text, not is_chat)[:L]
        if ids:
            rows.append(ids)
    return rows


def tokenize_calibration(
    dataset: CalibrationDataset, tokenizer, config: CalibrationConfig, *, max_positions: int | None = None
) -> TokenizedCalibration:
    """Tokenize ``dataset`` into ``config.num_samples`` samples of ``sequence_length`` tokens.

    Args:
        dataset: the texts (chat rows are rendered with ``tokenizer``'s chat template).
        tokenizer: a loaded transformers tokenizer (or ``tokenizers.Tokenizer``).
        config: validated here against ``max_positions``.
        max_positions: the model's position limit; with ``sequence_length=None`` the length is
            capped at ``min(max_positions, 2048)`` and a note is printed.

    Raises ValueError when fewer real tokens than the floor (``config.token_floor``) come out;
    warns (``warnings`` and the ``calibra.data`` logger) with the real count between the floor and
    the request. Fewer samples than requested is possible only in that warned range.
    """
    if not isinstance(dataset, CalibrationDataset):
        raise TypeError(
            f"[data] dataset must be a CalibrationDataset, got {type(dataset).__name__}; "
            "use CalibrationDataset.from_source(spec) or CalibrationDataset(samples=[...])"
        )
    config.validate(max_positions)
    S = config.num_samples
    L = config.resolved_sequence_length(max_positions)
    if config.sequence_length is None:
        where = f"the model's {max_positions} positions" if max_positions else "no known position limit"
        note = (
            f"[data] sequence_length unset ({where}): using {L} tokens per sample "
            f"(cap {DEFAULT_SEQUENCE_CAP}); set sequence_length to choose"
        )
        print(note)
        log.info(note)

    rendered, dups, empty = _dedup(dataset.rendered(tokenizer), config.deduplicate)
    order = list(rendered)
    random.Random(config.seed).shuffle(order)

    if config.packing == "concat":
        rows = _pack_concat(order, tokenizer, S, L)
    else:
        rows = _pack_truncate(order, tokenizer, S, L)

    pad = pad_token_id(tokenizer)
    n = len(rows)
    input_ids = torch.full((n, L), pad, dtype=torch.int64)
    mask = torch.zeros((n, L), dtype=torch.bool)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        mask[i, : len(ids)] = True
    token_count = int(mask.sum())

    requested = S * L
    floor = config.token_floor(L)
    dropped = f"{dups} duplicate and {empty} empty texts removed" if (dups or empty) else "no texts removed"
    got = (
        f"dataset {dataset.name!r} gave {token_count} real tokens in {n} samples "
        f"({len(rendered)} texts, {dropped}); requested {S} samples x {L} tokens = {requested}"
    )
    if n == 0 or token_count < max(floor, 1):
        raise ValueError(
            f"[data] too little calibration data: {got}, below the floor of {max(floor, 1)} tokens. "
            f"Fix: add more text, lower num_samples, shorten sequence_length, or set min_tokens "
            f"to accept less"
        )
    if token_count < requested or n < S:
        msg = f"[data] less calibration data than requested: {got} ({token_count / requested:.0%})"
        if n < S:
            msg += f"; only {n} of {S} samples"
        if token_count < n * L:
            msg += f"; {n * L - token_count} padding positions are masked out"
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)

    result = TokenizedCalibration(
        input_ids=input_ids,
        attention_mask=mask,
        token_count=token_count,
        dataset=dataset.name,
        version=dataset.version,
        seed=config.seed,
        fingerprint=fingerprint(input_ids, mask),
        pad_id=pad,
        packing=config.packing,
        requested_tokens=requested,
        num_texts=len(rendered),
        num_duplicates=dups,
        num_empty=empty,
    )
    log.info("%s", result.summary())
    return result
