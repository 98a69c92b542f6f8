"""Dense checkpoints: the simulated quantized (or pruned) model's effective weights as a plain
Hugging Face folder that anything reading dense checkpoints loads. Every QuantizedModel can be
written this way (MR-GPTQ rotations and MoE experts included), because the weights are already
the dense effective ones; pruned weights ship dense too (FORMATS.md 2.5)."""

from __future__ import annotations

from calibra.export import _common

NAME = "dense"


def check(qmodel) -> None:
    return None


def write(qmodel, folder, *, max_shard_bytes=None) -> dict:
    body = (
        "The effective (dequantized) weights of a calibra-compressed model, stored dense: it computes what "
        "calibra's simulated model computes, at the original size."
    )
    _common.write_hf_folder(
        folder,
        qmodel,
        _common.dense_state(qmodel),
        config_updates={},
        config_drop=("quantization_config",),
        card={
            "title": f"{qmodel.source} (dense effective weights)",
            "library_name": "transformers",
            "tags": ["calibra", "dense"],
            "settings": _common.base_card_settings(qmodel, NAME),
            "body": body,
        },
        max_shard_bytes=max_shard_bytes,
    )
    return {"checkpoint": {"format": "dense"}}
