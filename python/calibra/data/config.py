"""CalibrationConfig: how much calibration data, in what shape, from where; checked before any
weight is loaded."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CalibrationConfig",
    "recommended_samples",
    "model_max_positions",
    "DEFAULT_SEQUENCE_CAP",
    "AUTO_BATCH_TOKENS",
    "auto_batch_size",
    "PACKINGS",
    "MAX_NUM_SAMPLES",
]

# When sequence_length is left unset, a 128k-context model would otherwise calibrate on 128k-token
# samples: attention scores alone would be heads x 128k^2 per sample. 2048 is the length the GPTQ
# paper calibrates with and more than any tool's default.
DEFAULT_SEQUENCE_CAP = 2048
# batch_size=None packs about this many tokens into each forward pass. Small models on a CPU spend
# most of a batch-1 pass in per-op overhead (8 x 256-token samples run ~5x faster than 8 passes of
# one); 4096 tokens keep a 70B layer's activations (4096 x 28672 fp32 = 448 MiB) modest on a GPU.
AUTO_BATCH_TOKENS = 4096
PACKINGS = ("concat", "truncate")
# Beyond ~10^6 samples a calibration run is a training run; a number that large is a typo.
MAX_NUM_SAMPLES = 1 << 20

# (parameters below, samples) -- see recommended_samples()
_RECOMMENDED = ((100e6, 32), (1e9, 64), (15e9, 128), (float("inf"), 256))


def auto_batch_size(num_samples: int, sequence_length: int) -> int:
    """Samples per forward pass carrying about AUTO_BATCH_TOKENS tokens (at least 1, at most all)."""
    return max(1, min(int(num_samples), AUTO_BATCH_TOKENS // max(1, int(sequence_length))))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def model_max_positions(model_config) -> int | None:
    """The longest sequence a model takes, from a transformers config (or None when it says none).

    Multimodal configs keep it on the text config; older GPT-style configs call it ``n_positions``.
    """
    if model_config is None:
        return None
    cfg = model_config
    if hasattr(cfg, "get_text_config"):
        try:
            cfg = cfg.get_text_config()
        except Exception:  # some configs raise when asked for a sub-config they lack
            cfg = model_config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        v = getattr(cfg, attr, None)
        if _is_int(v) and v > 0:
            return v
    return None


def recommended_samples(num_parameters: int) -> int:
    """Calibration samples to use for a model of ``num_parameters`` parameters.

    ============================  =======
    parameters                    samples
    ============================  =======
    < 100M (tiny / test models)   32
    100M - 1B                     64
    1B - 15B                      128
    >= 15B                        256
    ============================  =======

    Source: the GPTQ paper (Frantar et al., 2022) calibrates every model size with 128 random
    2048-token C4 segments; the AutoGPTQ / GPTQModel documentation recommends 128-256 samples of
    512-2048 tokens, with more for the largest models (whose Hessians are larger: in_features^2
    with in_features up to 28k+ needs many more tokens than in_features to be well conditioned).
    Small models have small Hessians (hidden <= ~1024) that are full rank after far fewer tokens,
    so fewer samples give the same result faster. Pair with ``sequence_length`` 512-2048.
    MoE models: each expert sees only ~top_k/num_experts of the tokens, so consider doubling.
    """
    if not _is_int(num_parameters) or num_parameters <= 0:
        raise ValueError(f"[data] num_parameters must be a positive int, got {num_parameters!r}")
    for bound, n in _RECOMMENDED:
        if num_parameters < bound:
            return n
    return _RECOMMENDED[-1][1]  # unreachable: the last bound is inf


@dataclass
class CalibrationConfig:
    """Calibration data settings.

    Attributes:
        num_samples: fixed-length samples to run through the model (>= 1).
        sequence_length: tokens per sample; ``None`` caps it at ``min(model positions, 2048)`` and
            prints a note with the memory estimate (see :func:`calibra.data.resolve_config`).
        batch_size: samples per forward pass (1 <= batch_size <= num_samples); ``None`` picks
            ``AUTO_BATCH_TOKENS // sequence_length`` (at least 1, at most num_samples) once the
            sequence length is known (:func:`calibra.data.resolve_config`).
        dataset: ``"builtin"``, a local ``.txt``/``.json``/``.jsonl`` path (or a folder), or a hub
            name (c4, wikitext2, bartowski-v3, the-stack).
        seed: selects and orders samples; the same seed gives the same tokens.
        packing: ``"concat"``: texts joined with EOS separators and cut into full-length chunks
            (no padding unless the data runs out); ``"truncate"``: one text per sample, truncated
            to sequence_length and right-padded.
        min_tokens: the floor below which too little data is an error; ``None`` = a quarter of
            ``num_samples * sequence_length``. Between the floor and the request: a warning.
        deduplicate: drop exact duplicate texts (after whitespace normalization) first.
    """

    num_samples: int = 128
    sequence_length: int | None = None
    batch_size: int | None = None
    dataset: str = "builtin"
    seed: int = 0
    packing: str = "concat"
    min_tokens: int | None = None
    deduplicate: bool = True

    def validate(self, max_positions: int | None = None) -> CalibrationConfig:
        """Raise ValueError naming the field and the fix; return self when everything is in range.

        ``max_positions``: the model's position limit (``model_max_positions(config)``), when known.
        """

        def bad(msg: str):
            raise ValueError(f"[data] {msg}")

        n = self.num_samples
        if not _is_int(n) or n < 1:
            bad(
                f"num_samples must be an int >= 1, got {n!r}; use e.g. num_samples=128 "
                f"(recommended_samples(num_parameters) suggests one per model size)"
            )
        if n > MAX_NUM_SAMPLES:
            bad(f"num_samples {n} is above the limit {MAX_NUM_SAMPLES}; calibration needs 128-256 samples, use fewer")
        L = self.sequence_length
        if L is not None:
            if not _is_int(L) or L < 1:
                bad(
                    f"sequence_length must be an int >= 1 or None (cap at the model's positions), "
                    f"got {L!r}; use e.g. sequence_length=512"
                )
            if max_positions is not None and L > max_positions:
                bad(
                    f"sequence_length {L} exceeds the model's {max_positions} positions; "
                    f"set sequence_length <= {max_positions} (or None to cap it automatically)"
                )
        b = self.batch_size
        if b is not None and (not _is_int(b) or b < 1):
            bad(
                f"batch_size must be an int >= 1 or None (about {AUTO_BATCH_TOKENS} tokens per pass), got "
                f"{b!r}; use batch_size=1 if memory is tight"
            )
        if b is not None and b > n:
            bad(f"batch_size {b} is larger than num_samples {n}; set batch_size <= {n}")
        if not _is_int(self.seed) or self.seed < 0 or self.seed >= 2**63:
            bad(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.packing not in PACKINGS:
            bad(f"packing must be one of {', '.join(map(repr, PACKINGS))}, got {self.packing!r}")
        if self.min_tokens is not None:
            if not _is_int(self.min_tokens) or self.min_tokens < 0:
                bad(f"min_tokens must be an int >= 0 or None (default floor), got {self.min_tokens!r}")
            if L is not None and self.min_tokens > n * L:
                bad(
                    f"min_tokens {self.min_tokens} exceeds the request num_samples x sequence_length "
                    f"= {n * L}, so it could never be met; set min_tokens <= {n * L}"
                )
        if not isinstance(self.deduplicate, bool):
            bad(f"deduplicate must be True or False, got {self.deduplicate!r}")
        from calibra.data.dataset import CalibrationDataset, source_kind

        if not isinstance(self.dataset, CalibrationDataset):
            source_kind(self.dataset)  # raises naming the alternatives
        return self

    def resolved_sequence_length(self, max_positions: int | None = None) -> int:
        """sequence_length, or the cap ``min(max_positions, 2048)`` when it is None."""
        if self.sequence_length is not None:
            return self.sequence_length
        return min(max_positions, DEFAULT_SEQUENCE_CAP) if max_positions else DEFAULT_SEQUENCE_CAP

    def resolved_batch_size(self, sequence_length: int) -> int:
        """batch_size, or about AUTO_BATCH_TOKENS tokens per pass when it is None."""
        if self.batch_size is not None:
            return self.batch_size
        return auto_batch_size(self.num_samples, sequence_length)

    def token_floor(self, sequence_length: int | None = None) -> int:
        """Fewest real tokens accepted: min_tokens, else a quarter of the request (at least 1)."""
        if self.min_tokens is not None:
            return self.min_tokens
        L = sequence_length if sequence_length is not None else self.resolved_sequence_length()
        return max(1, self.num_samples * L // 4)
