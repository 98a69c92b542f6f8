"""Command-line flags shared by several verbs (``calibra.cli`` and the ``calibra kv`` commands), written
once so that a default -- and its help text -- cannot differ between verbs."""

from __future__ import annotations


def add_sample_flags(p) -> None:
    """The calibration-data flags every calibrating verb shares (calibrate, quantize, prune, kv calibrate).

    ``--seq-len`` and ``--batch-size`` default to ``None``: the calibration pass caps the length at the
    model's context (at most 2048) and packs about 4096 tokens per forward pass, before any weight is read
    (``calibra.data.resolve_config``), so the defaults work on every model, the 256-position builtin ones
    included."""
    p.add_argument("--samples", type=int, default=128, help="calibration samples")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per calibration sample (default: the model's context, at most 2048)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="calibration samples per forward pass (default: about 4096 tokens per pass; 1 if memory is tight)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed that selects and orders the calibration samples")


def add_stream_flags(p) -> None:
    """``--stream`` / ``--no-stream`` (quantize, prune): how the model is read."""
    st = p.add_mutually_exclusive_group()
    st.add_argument(
        "--stream",
        dest="stream",
        action="store_const",
        const=True,
        default=None,
        help="read the model one decoder layer at a time from its shards and write the result layer by layer "
        "(host memory: one layer, not the model). Default: streamed only when the whole model does not fit "
        "the memory plan. The evaluation streams too; --resume continues a streamed job (docs/streaming.md)",
    )
    st.add_argument(
        "--no-stream", dest="stream", action="store_const", const=False, help="load the whole model even if large"
    )
