"""What every format needs from a QuantizedModel: which weights are quantized, the dense remainder
of the state dict under the names transformers' loader expects, and the checks that refuse what
no format here can express (never write a file that loads but computes something else)."""

from __future__ import annotations

import re

import torch

from calibra.compat.transformers import saved_state
from calibra.export.writer import ExportError

_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<e>\d+)\.(?P<proj>gate_up_proj|down_proj)$")


def is_expert(name: str) -> bool:
    return _EXPERT.match(name) is not None


def refuse_rotation(qmodel, fmt: str) -> None:
    rotated = [n for n, l in qmodel.layers.items() if l.rotation is not None]
    if rotated:
        raise ExportError(
            f"[export] {fmt} cannot express MR-GPTQ's Hadamard rotation of the inputs ({len(rotated)} rotated "
            f"layer(s), e.g. {rotated[0]}): an engine would run the rotated weight on unrotated activations. "
            f"Export 'dense' (the effective weights), or quantize without MR-GPTQ"
        )


def refuse_experts(qmodel, fmt: str) -> None:
    experts = [n for n in qmodel.layers if is_expert(n)]
    if experts:
        raise ExportError(
            f"[export] {fmt}: quantized fused MoE expert weights ({len(experts)}, e.g. {experts[0]}) are not "
            f"written by this exporter; export 'compressed-tensors' or 'gptq' (per-expert weights under the "
            f"checkpoint's names), or 'dense'"
        )


def refuse_act_quant(qmodel, fmt: str) -> None:
    """Only compressed-tensors writes activation (input) scales and a KV-cache scheme: another format
    would load as a weight-only model and compute something else than what was evaluated."""
    what = [
        w
        for w, present in (
            (f"activation quantization ({getattr(qmodel, 'scheme', None)})", getattr(qmodel, "input_quant", None)),
            ("an FP8 KV cache", getattr(qmodel, "kv_scales", None)),
        )
        if present is not None
    ]
    if what:
        raise ExportError(
            f"[export] {fmt} cannot express {' and '.join(what)}; export 'compressed-tensors', or quantize "
            f"weight-only (no --scheme / --kv-cache)"
        )
    if fmt != "dense" and any(l.format == "fp8" for l in qmodel.layers.values()):
        raise ExportError(f"[export] {fmt} cannot express fp8 weights; export 'compressed-tensors' or 'dense'")


def transposed_modules(model) -> set[str]:
    """Module paths of GPT-2-style ``Conv1D`` modules (weight stored ``[in, out]``)."""
    from calibra.models.linear import is_conv1d

    return {n for n, m in model.named_modules() if is_conv1d(m)} if model is not None else set()


def refuse_transposed(names, fmt: str) -> None:
    """Engine formats load quantized weights into ``nn.Linear`` replacements; a ``Conv1D`` (GPT-2's
    transposed Linear) is not one, so its codes would be read as the wrong matrix. Refuse by name."""
    names = sorted(names)
    if names:
        raise ExportError(
            f"[export] {fmt}: {len(names)} quantized module(s) are GPT-2-style Conv1D layers (weight stored "
            f"[in, out], e.g. {names[0]}), which {fmt} loaders replace only as nn.Linear; export 'dense' (the "
            f"effective weights) or calibra's own folder"
        )


def quantized_weight_keys(qmodel) -> set[str]:
    return {f"{n}.weight" for n in qmodel.layers if not is_expert(n)}


def tied(model) -> bool:
    cfg = model.config
    tie = getattr(cfg, "tie_word_embeddings", False)
    if not tie:
        return False
    try:
        return model.get_output_embeddings().weight is model.get_input_embeddings().weight
    except AttributeError:
        return bool(tie)


def dense_state(qmodel, *, skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The model's tensors that stay dense, named as on disk (transformers' save-time renaming, e.g.
    fused experts back to per-expert weights), minus ``skip`` and a tied lm_head (FAULTS row 9: the
    loader re-ties it from the embeddings, as transformers' own save_pretrained does)."""
    model = qmodel.model
    sd = {k: v for k, v in model.state_dict().items() if k not in skip}
    if tied(model):
        out_name = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), "lm_head")
        if out_name in qmodel.layers:
            raise ExportError(
                f"[export] {out_name} is quantized but tied to the input embeddings "
                f"(tie_word_embeddings=true); untie it or leave it dense"
            )
        sd.pop(f"{out_name}.weight", None)
    return saved_state(model, sd)


def merged_on_load(model, keys) -> list[str]:
    """The in-memory tensors among ``keys`` (dense ones a checkpoint writes) that ``save_pretrained`` splits
    into several checkpoint tensors, which transformers' loader merges back (OLMo-Hybrid's ``conv1d`` from
    ``q/k/v_conv1d``, unquantized fused experts from per-expert Linears). transformers (5.25) drops such
    dense tensors when it loads a compressed-tensors checkpoint (docs/export.md, MoE models)."""
    sd = model.state_dict()
    out = []
    for k in keys:
        t = sd.get(k)
        if isinstance(t, torch.Tensor) and len(saved_state(model, {k: torch.empty(t.shape, device="meta")})) > 1:
            out.append(k)
    return out


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def uniform(qmodel, fmt: str):
    """The one (format, bits, group_size, symmetric) all quantized layers share (formats here write one
    scheme per checkpoint)."""
    schemes = {(l.format, l.bits, l.group_size, l.symmetric) for l in qmodel.layers.values()}
    if not schemes:
        raise ExportError(f"[export] {fmt}: the model has no quantized layers; export 'dense' instead")
    if len(schemes) > 1:
        raise ExportError(
            f"[export] {fmt}: layers use {len(schemes)} different schemes "
            f"{sorted(schemes)}; this exporter writes one scheme per checkpoint"
        )
    return next(iter(schemes))


def ragged_group(out_features: int, in_features: int, group_size: int) -> str | None:
    """The width rule of a format whose loader needs whole groups (compressed-tensors, MLX): the reason a
    group that does not divide in_features (calibra's ragged last group) cannot be written, else None."""
    if group_size > 0 and in_features % group_size:
        tail = in_features % group_size
        return f"in_features {in_features} leaves a ragged last group of {tail} (group {group_size})"
    return None


def refuse_widths(qmodel, fmt: str, rule) -> None:
    """A standalone export of a model quantized without this format in mind: the layers ``rule(out, in,
    group_size)`` refuses are named, with the fixes (``quantize --export FORMAT`` keeps them dense)."""
    bad = [
        f"{n} ({why})"
        for n, l in qmodel.layers.items()
        if (why := rule(l.codes.shape[0], l.codes.shape[1], l.group_size)) is not None
    ]
    if bad:
        raise ExportError(
            f"[export] {fmt} cannot hold {len(bad)} quantized layer(s): {'; '.join(bad[:5])}. Quantize with "
            f"--export {fmt} (those layers are then kept dense, recorded in report.json), or export 'dense' "
            f"or calibra's own folder (which holds ragged groups)"
        )


def trivial_g_idx(layer) -> bool:
    """True when g_idx is absent or equals col // group_size (plain contiguous groups)."""
    if layer.g_idx is None:
        return True
    n = layer.codes.shape[1]
    gs = n if layer.group_size == -1 else layer.group_size
    return bool(torch.equal(layer.g_idx.long().cpu(), torch.arange(n) // gs))


def base_card_settings(qmodel, fmt: str) -> dict:
    from calibra.export.writer import seed_of, settings_of

    s = {f"quant_{k}": v for k, v in settings_of(qmodel).items()}
    s["export_format"] = fmt
    s["seed"] = seed_of(qmodel)
    s["quantized_layers"] = len(qmodel.layers)
    return s


def write_hf_folder(
    folder,
    qmodel,
    tensors: dict | None,
    *,
    config_updates: dict,
    card: dict,
    metadata=None,
    max_shard_bytes: int | None = None,
    config_drop: tuple = (),
) -> None:
    """A Hugging Face-shaped folder: shards + index, config.json (with ``config_updates``),
    generation_config.json, tokenizer files and README.md. The manifest is written by the caller last.
    ``tensors`` None: the shards and their index are already in ``folder`` (a streamed job's)."""
    from calibra.export import writer

    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    if tensors is not None:
        writer.save_shards(folder, tensors, metadata=metadata, **kw)
    writer.write_config(folder, qmodel.model, config_updates, drop=config_drop)
    writer.write_generation_config(folder, qmodel.model)
    writer.write_tokenizer(folder, qmodel.tokenizer)
    writer.write_card(folder, base_model=qmodel.source, **card)
